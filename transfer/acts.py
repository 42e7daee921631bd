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

import shutil
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
        record_unrecorded_rotation(home, site, ledger)
        yield Recorder(ledger, signer)


def record_unrecorded_rotation(home: Path, site: SiteIdentity, ledger: Ledger) -> bool:
    """Settle a ``site rotate`` killed between the key swap and its ``trust_rotated``
    record: when the current key names a previous one and no record of this site's own
    rotation names the current key, append that record now, signed (as ``site rotate``
    signs it) by the previous key kept in ``identity/retired/``, once that key is checked
    to have vouched for the current one. Run before any act is recorded, so no record
    is signed by a key the ledger has not seen rotated in. Whether a record was added.
    """
    from transfer.errors import IdentityError
    from transfer.identity import record_rotation

    previous = site.public.previous_fingerprint
    if previous is None:
        return False
    if any(r.fields.get("own_key") and r.fields.get("fingerprint") == site.fingerprint
           for r in ledger.records(kind=RecordKind.TRUST_ROTATED)):
        _remove_swapped_out(home)  # a kill after the record, before the clean-up
        return False
    retired = identity_dir(home) / "retired" / previous.removeprefix("sha256:")
    if not (retired / PUBLIC_FILE).is_file():
        raise IdentityError(
            f"site {site.site}: the current key {site.fingerprint} was rotated in but no "
            f"trust_rotated record names it, and the previous key is not in {retired}; "
            "restore that folder (from a backup) so the rotation can be recorded")
    old = load_site(home, site.passphrase, retired)
    site.public.verify_rotation(old.signing_key.public_key())
    record_rotation(Recorder(ledger, EcdsaSigner(old.signing_key)), old, site.public)
    _remove_swapped_out(home)
    return True


def _remove_swapped_out(home: Path) -> None:
    """The swapped-out identity folder a killed rotation left (its keys are kept in
    ``identity/retired/``)."""
    for stale in home.glob(".identity-old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def subject(kind: str, name: str, digest: str | None) -> list[Subject]:
    """``[Subject("kind:name", digest)]``, or nothing when the digest is unknown."""
    if not digest or not digest.startswith("sha256:") or len(digest) != 71:
        return []
    return [Subject.of(f"{kind}:{name}", digest)]
