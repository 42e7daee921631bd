"""Consequential acts and the ledger: the one helper through which every act is recorded.

A site home with an identity has a ledger: each act (model registered, audit verdict,
export and override, bundle created, received or refused, trust added, revoked or
rotated) appends one signed record in the same operation. The recorder is opened
*before* the act, so an unusable ledger (unreachable database, locked key) stops the
act before it happens; the record is appended before the act's result is moved into
place wherever the act allows it, and a failed append fails the command with one line.

A home without an identity (a bare registry, as in the first steps of the story) has
no ledger: the act proceeds and no record is written (there is no key to sign with).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from passerelle.errors import PasserelleError
from transfer.identity import PUBLIC_FILE, SiteIdentity, identity_dir, load_site
from transfer.ledger import Ledger, ledger_url
from transfer.ledger_errors import ActNotRecorded
from transfer.records import EcdsaSigner, Record, RecordKind, Subject


def has_ledger(home: Path) -> bool:
    """Whether acts at ``home`` are recorded: the home has a site identity."""
    return (identity_dir(home) / PUBLIC_FILE).is_file()


class Recorder:
    """Appends the records of acts to one site's ledger (or nothing, without identity)."""

    def __init__(self, ledger: Ledger | None, signer: EcdsaSigner | None) -> None:
        self._ledger = ledger
        self._signer = signer

    @property
    def enabled(self) -> bool:
        return self._ledger is not None

    def record(self, kind: RecordKind, subjects: Sequence[Subject],
               fields: Mapping[str, Any]) -> Record | None:
        """Append one record; :class:`ActNotRecorded` if that fails; None without ledger."""
        if self._ledger is None or self._signer is None:
            return None
        try:
            return self._ledger.append(kind, subjects, fields, self._signer)
        except PasserelleError as e:
            raise ActNotRecorded(f"{kind.value} could not be recorded in the ledger: "
                                 f"{e}") from e


@contextmanager
def recorder(home: Path, identity: SiteIdentity | None = None) -> Iterator[Recorder]:
    """A :class:`Recorder` for ``home``, checked usable (key and database) before the act."""
    if not has_ledger(home):
        yield Recorder(None, None)
        return
    site = identity or load_site(home)
    signer = EcdsaSigner(site.signing_key)
    with Ledger(ledger_url(home), site.site) as ledger:
        yield Recorder(ledger, signer)


def subject(kind: str, name: str, digest: str | None) -> list[Subject]:
    """``[Subject("kind:name", digest)]``, or nothing when the digest is unknown."""
    if not digest or not digest.startswith("sha256:") or len(digest) != 71:
        return []
    return [Subject.of(f"{kind}:{name}", digest)]
