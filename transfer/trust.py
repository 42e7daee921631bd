"""The trust store: the sites this site accepts models from and sends models to.

Each site is pinned by the fingerprint of its signing key. A key is ``trusted``,
``superseded`` (replaced by a rotation it signed; no longer accepted) or ``revoked``
(refused from then on, and never trusted again). Stored as ``trust.json`` in the
site's home, replaced atomically on every change.

Adding an identity file:

* a new site name: the key is pinned (the administrator checked the fingerprint
  out of band; ``expect`` lets the command line check it too);
* the same key again: nothing changes;
* a new key for a site already trusted: accepted only if the identity is signed by the
  currently trusted key of that site (rotation); the old key becomes ``superseded``;
* a revoked key, or a rotation signed by a revoked key: refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from transfer.acts import recorder, subject
from transfer.errors import (
    BadIdentityFile,
    RevokedSigner,
    SignatureInvalid,
    TrustError,
    UnknownSite,
    UntrustedSigner,
)
from transfer.identity import Fingerprint, PublicIdentity, SiteName
from transfer.records import RecordKind

TRUST_FILE = "trust.json"


class Status(StrEnum):
    TRUSTED = "trusted"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


class AddOutcome(StrEnum):
    PINNED = "pinned"
    ROTATED = "rotated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class TrustEntry:
    identity: PublicIdentity
    status: Status
    added: str
    changed: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"identity": self.identity.to_json(), "status": self.status.value,
                "added": self.added, "changed": self.changed}


class TrustStore:
    """The pinned keys of one site's peers, keyed by fingerprint."""

    def __init__(self, home: Path) -> None:
        self.path = home / TRUST_FILE
        self._entries: dict[Fingerprint, TrustEntry] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            for fp, raw in doc["keys"].items():
                identity = PublicIdentity.from_json(raw["identity"])
                if identity.fingerprint != fp:
                    raise TrustError(f"{self.path}: entry {fp} holds another key")
                self._entries[Fingerprint(fp)] = TrustEntry(
                    identity, Status(raw["status"]), str(raw["added"]), raw.get("changed"))
        except (OSError, ValueError, KeyError, TypeError, BadIdentityFile) as e:
            raise TrustError(f"{self.path}: the trust store is unreadable or malformed: "
                             f"{e}") from e

    def _save(self) -> None:
        doc = {"format": "passerelle-trust-store", "format_version": 1,
               "keys": {fp: e.to_json() for fp, e in sorted(self._entries.items())}}
        fd, tmp = tempfile.mkstemp(prefix=".trust-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _save_recorded(self, kind: RecordKind, identity: PublicIdentity,
                       previous: PublicIdentity | None) -> None:
        """Record the trust decision in the site's ledger, then save the store.

        The record comes first: if it cannot be appended, the store is left unchanged.
        """
        subjects = subject("key", identity.site, identity.fingerprint)
        fields = {"peer": identity.site, "fingerprint": identity.fingerprint}
        if previous is not None:
            subjects += subject("key", f"{previous.site}/previous", previous.fingerprint)
            fields["previous_fingerprint"] = previous.fingerprint
        with recorder(self.path.parent) as rec:
            rec.record(kind, subjects, fields)
            self._save()

    def entries(self) -> list[TrustEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.identity.site, e.added))

    def _trusted_for(self, site: SiteName) -> TrustEntry | None:
        for entry in self._entries.values():
            if entry.identity.site == site and entry.status is Status.TRUSTED:
                return entry
        return None

    def add(self, identity: PublicIdentity, expect: Fingerprint | None = None,
            now: datetime | None = None) -> AddOutcome:
        """Pin a new site, accept a signed rotation, or refuse (see the module doc)."""
        stamp = (now or datetime.now(UTC)).replace(microsecond=0).isoformat()
        if expect is not None and expect != identity.fingerprint:
            raise TrustError(f"{identity.site}: fingerprint {identity.fingerprint} is not "
                             f"the expected {expect}")
        known = self._entries.get(identity.fingerprint)
        if known is not None:
            if known.status is Status.REVOKED:
                raise RevokedSigner(f"{identity.site}: key {identity.fingerprint} was "
                                    "revoked and cannot be trusted again")
            if known.status is Status.SUPERSEDED:
                raise TrustError(f"{identity.site}: key {identity.fingerprint} was replaced "
                                 "by a newer key")
            return AddOutcome.UNCHANGED
        current = self._trusted_for(identity.site)
        previous = (self._entries.get(identity.previous_fingerprint)
                    if identity.previous_fingerprint else None)
        if previous is not None and previous.status is Status.REVOKED:
            raise RevokedSigner(f"{identity.site}: the new key is vouched for by the revoked "
                                f"key {previous.identity.fingerprint}")
        if current is None:
            self._entries[identity.fingerprint] = TrustEntry(identity, Status.TRUSTED, stamp)
            self._save_recorded(RecordKind.TRUST_ADDED, identity, None)
            return AddOutcome.PINNED
        if previous is None or previous.identity.fingerprint != current.identity.fingerprint:
            raise TrustError(
                f"{identity.site} is already trusted with key {current.identity.fingerprint}; "
                "a new key must be signed by it (site rotate), or revoke the old key first")
        try:
            identity.verify_rotation(current.identity.public_key)
        except SignatureInvalid as e:
            raise BadIdentityFile(f"{identity.site}: the rotation is not signed by the "
                                  f"trusted key {current.identity.fingerprint}") from e
        self._entries[current.identity.fingerprint] = TrustEntry(
            current.identity, Status.SUPERSEDED, current.added, stamp)
        self._entries[identity.fingerprint] = TrustEntry(identity, Status.TRUSTED, stamp)
        self._save_recorded(RecordKind.TRUST_ROTATED, identity, current.identity)
        return AddOutcome.ROTATED

    def revoke(self, fingerprint: Fingerprint, now: datetime | None = None) -> TrustEntry:
        entry = self._entries.get(fingerprint)
        if entry is None:
            raise TrustError(f"no key {fingerprint} in the trust store")
        stamp = (now or datetime.now(UTC)).replace(microsecond=0).isoformat()
        revoked = TrustEntry(entry.identity, Status.REVOKED, entry.added, stamp)
        self._entries[fingerprint] = revoked
        self._save_recorded(RecordKind.TRUST_REVOKED, entry.identity, None)
        return revoked

    def sender(self, fingerprint: str, site: str) -> PublicIdentity:
        """The trusted key that signed a bundle, or a refusal that says why."""
        entry = self._entries.get(Fingerprint(fingerprint))
        if entry is None:
            raise UntrustedSigner(f"sender {site!r} key {fingerprint} is not in the trust "
                                  "store")
        if entry.status is Status.REVOKED:
            raise RevokedSigner(f"sender {site!r} key {fingerprint} was revoked")
        if entry.status is Status.SUPERSEDED:
            raise UntrustedSigner(f"sender {site!r} key {fingerprint} was replaced by a "
                                  "newer key")
        if entry.identity.site != site:
            raise UntrustedSigner(f"key {fingerprint} belongs to {entry.identity.site!r}, "
                                  f"not {site!r}")
        return entry.identity

    def recipient(self, site: str) -> PublicIdentity:
        """The trusted identity of a site we send to."""
        entry = self._trusted_for(SiteName(site))
        if entry is None:
            raise UnknownSite(f"no trusted site named {site!r} (trust add its identity file)")
        return entry.identity
