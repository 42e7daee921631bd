"""What a killed ``model register`` or ``finetune`` leaves, and how the next one removes it.

Registry: the run of a local registration is tagged (registry.store.REGISTER_TAG,
FINETUNE_TAG: the site's fingerprint and the name). A SIGKILL after the run was created
and before the act's ledger record leaves a run, maybe a version, that the ledger never
recorded. The next registration into the same name removes them first
(:func:`clean_killed`, under :func:`home_lock`, which every registration holds until
its record is written); until then ``model audit``, ``model export`` and
``bundle create`` refuse such a version, and ``finetune`` too, also one a killed
``bundle receive`` left (:func:`check_recorded`).

Work folders: ``model register`` stages the intake in ``HOME/.intake/register-*`` and
``finetune`` trains in ``HOME/.passerelle-finetune-*``; a SIGKILL leaves such a folder
behind (with a model, or a model trained on the site's data). Each command holds an exclusive
``fcntl.flock`` on the ``.lock`` file inside its folder for the folder's whole life; the
next command of the same kind removes every folder of that kind whose lock it can take
(its owner is dead) and keeps the others (a live concurrent command). Folders are
created, locked and cleaned under :func:`home_lock`, so a cleaner never sees a folder
before its owner holds its lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from passerelle.errors import BadInput, ModelNotFound
from registry.store import (
    FINETUNE_TAG,
    RECEIVE_TAG,
    REGISTER_TAG,
    TAG,
    ModelStore,
    VersionInfo,
    VersionRef,
    run_mark,
)
from transfer.acts import has_ledger
from transfer.records import RecordKind

LOCK_FILE = ".lock"  # inside each work folder, locked by its owner


@contextmanager
def locked_workspace(home: Path, parent: Path, prefix: str,
                     remove_parent: bool = False) -> Iterator[Path]:
    """A new 0700 folder ``parent/prefixXXXX``, locked for as long as it is used and
    removed on every path out; stale ``parent/prefix*`` folders of killed commands are
    removed first. ``remove_parent``: also remove ``parent`` at the end once it is empty.
    OSError if the folder cannot be made."""
    home.mkdir(parents=True, exist_ok=True)
    with home_lock(home):
        parent.mkdir(mode=0o700, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        lock = (path / LOCK_FILE).open("a")
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        clean_stale(parent, prefix, path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        lock.close()
        if remove_parent:
            with home_lock(home), suppress(OSError):
                parent.rmdir()


def clean_stale(parent: Path, prefix: str, mine: Path | None = None) -> list[Path]:
    """Remove the ``parent/prefix*`` folders whose lock is free (their command died);
    those whose lock is held by a live command are kept. Returns what was removed."""
    removed = []
    for child in sorted(parent.glob(prefix + "*")):
        if child == mine or child.is_symlink() or not child.is_dir():
            continue
        try:
            fd = os.open(child / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            if e.errno != errno.ELOOP:
                continue  # gone meanwhile, or not ours to judge: kept
            fd = -1  # a link in place of the lock: no command holds it
        try:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(child, ignore_errors=True)
        except BlockingIOError:
            continue  # a live command's folder
        finally:
            if fd >= 0:
                os.close(fd)
        removed.append(child)
    return removed


@contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the home folder itself (no lock file is left in a home
    that a refused command must leave as it was). Held while a work folder is made,
    locked and cleaned, and by a local registration (``model register``, ``finetune``)
    from its registry cleaning or its new run to its ledger record, so that no cleaner
    takes a live registration's unrecorded version for a killed one's."""
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class UnrecordedVersion(BadInput):
    """A version a killed registration left: the site's ledger does not record it."""


@dataclass(frozen=True)
class LocalAct:
    """A local registration: its run tag, the record that completes it, its command."""

    run_tag: str
    kind: RecordKind
    command: str

    @property
    def digest(self) -> str:
        """The digest field its record and the version's tags share."""
        return "model_dir_digest" if self.kind is RecordKind.MODEL_REGISTERED \
            else "onnx_digest"

    def recorded(self, home: Path) -> set[tuple[str, str, str]]:
        """(name, version, digest) of every version this act recorded in the ledger (for
        ``finetune``: with outcome ``finished``)."""
        from transfer.ledger_site import open_ledger

        digest = self.digest
        with open_ledger(home) as ledger:
            return {(str(r.fields.get("model")), str(r.fields.get("version")),
                     str(r.fields.get(digest)))
                    for r in ledger.records(kind=self.kind)
                    if self.kind is not RecordKind.FINETUNE
                    or r.fields.get("outcome") == "finished"}

    def key(self, info: VersionInfo) -> tuple[str, str, str]:
        """What :meth:`recorded` holds for ``info`` if its record was written."""
        return (info.ref.name, info.ref.version, str(info.tags.get(TAG + self.digest)))


REGISTER = LocalAct(REGISTER_TAG, RecordKind.MODEL_REGISTERED, "model register")
FINETUNE = LocalAct(FINETUNE_TAG, RecordKind.FINETUNE, "finetune")


def site_fingerprint(home: Path) -> str:
    """The fingerprint of the home's site identity, "" without one."""
    from transfer.identity import public_identity

    return str(public_identity(home).fingerprint) if has_ledger(home) else ""


def site_fingerprints(home: Path) -> list[str]:
    """This site's fingerprint and those of its keys retired by ``site rotate``: every
    mark its registrations may carry ([""] without an identity)."""
    from transfer.identity import site_fingerprints as fingerprints

    return fingerprints(home) if site_fingerprint(home) else [""]


def clean_killed(store: ModelStore, name: str, act: LocalAct,
                 notice: Callable[[str], None] | None = None) -> list[str]:
    """Remove what killed ``act`` runs of this site left in ``name``: versions without
    their ledger record and runs without a version (with their artifacts); each removal
    is one line to ``notice`` (default: stderr). Without a ledger no version can be
    judged: only runs without a version are removed."""
    home = store.home
    if not home.is_dir():  # nothing was ever done here
        return []
    marks = [run_mark(fingerprint, name) for fingerprint in site_fingerprints(home)]
    done: list[set[tuple[str, str, str]]] = []

    def keep(info: VersionInfo) -> bool:
        if not has_ledger(home):
            return True
        if not done:  # read only when there is a version to judge (no ledger created)
            done.append(act.recorded(home))
        return act.key(info) in done[0]

    with home_lock(home):  # also what was left before a key rotation
        removed = [what for mark in marks
                   for what in store.clean_unrecorded(name, act.run_tag, mark, keep)]
    say = notice or (lambda line: print(line, file=sys.stderr))
    for what in removed:
        say(f"removed {what}, left by a killed `passerelle {act.command}` of {name} "
            "(never recorded in the ledger)")
    return removed


def check_recorded(store: ModelStore, ref: VersionRef) -> None:
    """Refuse (:class:`UnrecordedVersion`, exit 2) a version made by ``model register``
    or ``finetune`` (its run is tagged so) that the site's ledger does not record: a
    killed one's leftover. The tag's fingerprint is not compared, so a leftover from
    before a key rotation is refused too. Nothing to check in a home without a ledger."""
    home = store.home
    if not has_ledger(home):
        return
    try:
        info = store.get(ref)
    except ModelNotFound:
        return  # the command says so itself, after its own checks of its input
    tags = store.run_tags(info)
    if tags.get(RECEIVE_TAG, "").rpartition(" ")[2] == ref.name and \
            not _receive_recorded(home, info):
        raise UnrecordedVersion(
            f"{ref} was left by a killed `passerelle bundle receive`: the site's ledger has "
            f"no bundle_received record of it; receiving that bundle again removes it")
    for act in (REGISTER, FINETUNE):
        # Whichever identity tagged it (this site's before a rotation, or another site
        # sharing the registry): a version this ledger does not record is not shipped.
        if tags.get(act.run_tag, "").rpartition(" ")[2] == ref.name and \
                act.key(info) not in act.recorded(home):
            raise UnrecordedVersion(
                f"{ref} was left by a killed `passerelle {act.command}`: the site's ledger "
                f"has no {act.kind.value} record of it; the next `passerelle "
                f"{act.command}` into {ref.name} removes it")


def _receive_recorded(home: Path, info: VersionInfo) -> bool:
    """Whether the ledger holds the ``bundle_received`` record of this received version."""
    from transfer.exchange import receive_recorded
    from transfer.ledger_site import open_ledger

    with open_ledger(home) as ledger:
        return receive_recorded(ledger.records(kind=RecordKind.BUNDLE_RECEIVED), info)
