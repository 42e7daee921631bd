"""The ledger of a site home: its database URL, its signing key, the keys it trusts.

The glue between :mod:`transfer.ledger` (which knows nothing of site identities) and
:mod:`transfer.identity` / :mod:`transfer.trust`. A site's own records verify against
its current signing key and the keys it retired by rotation; a peer's export verifies
against the peer's keys in this site's trust store (trusted or superseded, not revoked).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passerelle.errors import ModelNotFound
from registry.store import TAG, ModelStore, VersionInfo, VersionRef, default_tracking_uri
from transfer.identity import (
    PUBLIC_FILE,
    PublicIdentity,
    identity_dir,
    load_site,
    public_identity,
)
from transfer.ledger import (
    Checkpoint,
    DigestChecker,
    Ledger,
    PeerCheck,
    Verification,
    check_peer,
    ledger_url,
    read_checkpoint,
)
from transfer.ledger_errors import UnrecordedRotation
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


# -- digests against the site's MLflow store ------------------------------------------

DIGEST_TAGS = {"model_dir_digest": TAG + "model_dir_digest", "onnx_digest": TAG + "onnx_digest"}
"""Record field -> MLflow version tag that must still say the same digest."""


def _version_of(record: Record) -> VersionRef | None:
    """The version of this site's registry a record speaks of, if any."""
    if record.kind is RecordKind.BUNDLE_REFUSED:
        return None  # nothing was registered
    if record.kind is RecordKind.BUNDLE_RECEIVED:
        name, version = record.fields.get("local_model"), record.fields.get("local_version")
    else:
        name, version = record.fields.get("model"), record.fields.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        return None
    try:
        return VersionRef(name, version)
    except (ValueError, TypeError):
        return None


def mlflow_digest_checker(home: Path, store: ModelStore | None = None) -> DigestChecker:
    """A ``digest_checker`` comparing a record's model-directory and ONNX digests with
    the tags of the version in this site's MLflow store, where that version still
    exists. Without an MLflow store at all (no ``mlflow.db``, no tracking URI), nothing
    is compared."""
    found: dict[VersionRef, VersionInfo | None] = {}
    stores: list[ModelStore] = [store] if store is not None else []

    def lookup(ref: VersionRef) -> VersionInfo | None:
        if ref not in found:
            if not stores:
                uri = default_tracking_uri(home)
                if uri == f"sqlite:///{home.resolve() / 'mlflow.db'}" and \
                        not (home / "mlflow.db").is_file():
                    return None
                stores.append(ModelStore(home))
            try:
                found[ref] = stores[0].get(ref)
            except ModelNotFound:
                found[ref] = None
        return found[ref]

    def check(record: Record) -> str | None:
        if not any(isinstance(record.fields.get(f), str) for f in DIGEST_TAGS):
            return None
        ref = _version_of(record)
        info = None if ref is None else lookup(ref)
        if info is None:
            return None
        for field, tag in DIGEST_TAGS.items():
            named, stored = record.fields.get(field), info.tags.get(tag)
            if isinstance(named, str) and stored is not None and stored != named:
                return (f"{field} {named} differs from {stored}, the digest MLflow now holds "
                        f"for {ref}")
        return None

    return check


@dataclass(frozen=True)
class SiteVerification:
    """What ``records verify`` established for a site's ledger."""

    ledger: Verification
    checkpoint: Checkpoint | None
    peer: PeerCheck | None


def check_current_key(home: Path, ledger: Ledger) -> None:
    """Refuse (:class:`UnrecordedRotation`) when the signing key in the home is not the
    last one the ledger records for this site: the key of its last own
    ``trust_rotated`` record, else the key that signed its first record. Call once the
    chain verifies."""
    records = ledger.records()
    if not records:
        return
    expected = records[0].keyid
    for r in records:
        if r.kind is RecordKind.TRUST_ROTATED and r.fields.get("own_key"):
            expected = str(r.fields.get("fingerprint"))
    current = public_identity(home).fingerprint
    if current != expected:
        raise UnrecordedRotation(
            f"site {ledger.site}: the signing key in the home ({current}) is not the last "
            f"one the ledger records ({expected}): a key rotation was not recorded (a "
            "'site rotate' killed before its trust_rotated record?); the next recorded "
            "act records it if the previous key is in identity/retired/")


def verify_site(home: Path, url: str | None = None, checkpoint: Path | None = None,
                peer: Path | None = None) -> SiteVerification:
    """Signatures, chain and MLflow digests; then a checkpoint and a peer's export if given.

    Raises (never returns a failure): :class:`~transfer.ledger_errors.LedgerBroken`,
    checkpoint or peer mismatches, each naming what is wrong.
    """
    with open_ledger(home, url) as ledger:
        result = ledger.verify(own_keys(home), mlflow_digest_checker(home))
        check_current_key(home, ledger)
        from adapters.budget_store import check_store  # the budget store holds the charges

        check_store(home, ledger.records(kind=RecordKind.FINETUNE_STARTED))
        cp = None
        if checkpoint is not None:
            cp = read_checkpoint(checkpoint, own_keys(home))
            ledger.check_checkpoint(cp)
        peer_check = None
        if peer is not None:
            peer_check = check_peer(ledger, peer, lambda site: peer_keys(home, site))
    return SiteVerification(result, cp, peer_check)
