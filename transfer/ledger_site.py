"""The ledger of a site home: its database URL, its signing key, the keys it trusts.

The glue between :mod:`transfer.ledger` (which knows nothing of site identities) and
:mod:`transfer.identity` / :mod:`transfer.trust`. A site's own records verify against
its current signing key and the keys it retired by rotation; a peer's export verifies
against the peer's keys in this site's trust store (trusted or superseded, not revoked).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transfer.identity import (
    PUBLIC_FILE,
    PublicIdentity,
    identity_dir,
    load_site,
    public_identity,
)
from transfer.ledger import Ledger, ledger_url
from transfer.records import EcdsaSigner, KeyRing, Record, RecordKind, Subject
from transfer.trust import Status, TrustStore


def open_ledger(home: Path, url: str | None = None) -> Ledger:
    """This site's ledger (``url``, else ``$PASSERELLE_LEDGER_URL``, else SQLite in home)."""
    return Ledger(ledger_url(home, url), public_identity(home).site)


def own_keys(home: Path) -> KeyRing:
    """The site's current signing key and the keys it retired by rotation."""
    keys = [public_identity(home).public_key]
    retired = identity_dir(home) / "retired"
    if retired.is_dir():
        keys += [PublicIdentity.from_file(child / PUBLIC_FILE).public_key
                 for child in sorted(retired.iterdir()) if (child / PUBLIC_FILE).is_file()]
    return KeyRing.of(*keys)


def peer_keys(home: Path, site: str) -> KeyRing:
    """The keys this site's trust store holds for ``site`` (trusted or superseded)."""
    return KeyRing.of(*[e.identity.public_key for e in TrustStore(home).entries()
                        if e.identity.site == site and e.status is not Status.REVOKED])


def site_signer(home: Path) -> EcdsaSigner:
    """The site's signing key (asks for or reads its passphrase if it has one)."""
    return EcdsaSigner(load_site(home).signing_key)


def append_record(home: Path, kind: RecordKind, subjects: Sequence[Subject],
                  fields: Mapping[str, Any], url: str | None = None) -> Record:
    """Append one record to this site's ledger, signed with the site's key."""
    signer = site_signer(home)
    with open_ledger(home, url) as ledger:
        return ledger.append(kind, subjects, fields, signer)
