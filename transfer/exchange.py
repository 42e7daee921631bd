"""Send and receive models: ``bundle create``, ``bundle verify`` and ``bundle receive``.

The source side takes a registered version's shippable ONNX folder (the one logged by
``model export`` under ``onnx/``, its digest checked against the version's tag; else a
fresh conversion), refuses it unless the export gate passed for those exact bytes (PASS
audit verdict or recorded override), adds the audit report when there is one, writes a
transfer statement and seals it (transfer.bundle). The
receiving side verifies everything, installs the model atomically under
``received/`` in its home and registers it with lineage tags; a refused bundle leaves
no plaintext and no registry entry.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from passerelle.digests import canonical_json, sha256_bytes, sha256_file
from passerelle.errors import BadInput, GateRefused, PasserelleError, Refused
from registry.store import TAG, ModelStore, VersionInfo, VersionRef
from transfer.acts import Recorder, has_ledger, recorder, subject
from transfer.archive import Limits
from transfer.bundle import (
    DEFAULT_VALIDITY,
    MODEL_DIR,
    ONNX_FILE,
    SIGNATURE_FILE,
    VerifiedBundle,
    bundle_directory,
    check_envelope,
    finish_interrupted,
    make_transfer,
    max_validity,
    open_bundle,
    pending_journal,
    read_envelope,
    read_statement,
    record_received,
    reserve_sequence,
    sending_area,
)
from transfer.errors import DigestMismatch, Rollback
from transfer.identity import (
    PublicIdentity,
    SiteIdentity,
    load_site,
    public_identity,
    site_fingerprints,
    verify,
)
from transfer.ledger import Ledger, ledger_url
from transfer.records import (
    Record,
    RecordKind,
    Subject,
    bundle_arrived_fields,
    bundle_created_fields,
)
from transfer.statement import Header, TransferStatement
from transfer.trust import TrustStore

RECEIVED_DIR = "received"


@dataclass(frozen=True)
class CreatedBundle:
    path: Path
    digest: str
    statement: TransferStatement
    size: int
    finished: tuple[Path, ...] = ()  # bundles of killed creates finished first


@dataclass(frozen=True)
class Verification:
    """What ``bundle verify`` established."""

    header: Header
    sender: PublicIdentity
    decrypted: bool  # False: only the outer header was checked (no identity here)
    statement: TransferStatement | None
    bundle_digest: str | None


@dataclass(frozen=True)
class ReceivedModel:
    version: VersionInfo
    directory: Path
    statement: TransferStatement
    bundle_digest: str
    already: bool = False  # this very bundle was registered before: nothing was done


AUDIT_REPORT = "audit-report.json"  # registry.audit.runner.REPORT_FILE, under audit/
SHIPPED_AUDIT_REPORT = "audit_report.json"


def received_name(sender: str, model: str) -> str:
    """The local registry name of a model received from ``sender``: ``SENDER.MODEL``
    (MLflow refuses '/' and ':' in names). It is only ever used for models received from
    that sender: a local model of that name, or one from another sender whose names join
    to the same text, is refused, never merged (registry tags say whose it is)."""
    return f"{sender}.{model}"


def export_gate(info: VersionInfo, onnx_digest: str, pinned_policy: str) -> str:
    """The verdict a version may leave with, or :class:`GateRefused`.

    It may leave with a PASS audit verdict for these exact ONNX bytes under the site's
    pinned audit policy, or with an export override recorded for these bytes by
    ``model export --override`` (registry.export).
    """
    from registry.export import audit_passed

    tags = info.tags
    verdict = tags.get(TAG + "audit.verdict")
    if audit_passed(tags, onnx_digest, pinned_policy):
        return "PASS"
    if tags.get(TAG + "export.override.onnx_digest") == onnx_digest:
        approver = tags.get(TAG + "export.override.approver", "unknown")[:200]
        return f"{verdict or 'none'} (export override by {approver})"
    raise GateRefused(f"{info.ref} may not leave this site: no PASS audit verdict under the "
                      "site's pinned policy for its ONNX bytes and no recorded export "
                      "override (run 'passerelle model audit', or 'passerelle model export "
                      "--override ...')")


def _add_audit_report(store: ModelStore, info: VersionInfo, ship: Path, work: Path,
                      onnx_digest: str) -> None:
    """Ship the audit report beside the model when the audit speaks of these bytes."""
    if info.tags.get(TAG + "audit.onnx_digest") != onnx_digest:
        return
    folder = work / "audit"
    folder.mkdir()
    report = store.download(info, f"audit/{AUDIT_REPORT}", folder)
    shutil.copyfile(report, ship / SHIPPED_AUDIT_REPORT)


def create_bundle(home: Path, store: ModelStore, ref: VersionRef, to: Sequence[str],
                  out: Path, now: datetime | None = None,
                  validity: timedelta = DEFAULT_VALIDITY,
                  overwrite: bool = False) -> CreatedBundle:
    """``bundle create``: seal a registered version for the sites ``to``.

    Plaintext (the exported ONNX folder, the staged and signed model) lives only in the
    home's private ``.sending/`` area; beside ``out`` only ciphertext is written, moved
    into place at the end. The sequence number is taken under a lock. A create killed
    after its ``bundle_created`` record is finished first (see
    :func:`transfer.bundle.finish_interrupted`); ``CreatedBundle.finished`` names them.
    """
    from registry.audit.policy import pinned_policy_digest
    from registry.export import shippable

    if not overwrite and (out.exists() or out.is_symlink()):
        raise BadInput(f"{out}: already exists")
    if not out.resolve().parent.is_dir():
        raise BadInput(f"{out.resolve().parent}: no such directory")
    if not to:
        raise BadInput("name at least one recipient site (--to)")
    longest = max_validity(home)
    if validity > longest:
        raise BadInput(f"a validity of {validity.days} days is longer than this site allows "
                       f"({longest.days} days, transfer.max_validity_days)")
    identity = load_site(home)
    trust = TrustStore(home)
    recipients = [trust.recipient(site) for site in dict.fromkeys(to)]
    finished = finish_interrupted(home, identity, _created_record(home, identity))
    pinned = pinned_policy_digest(home)  # the only audit policy this site's gate accepts
    _gate_before_export(store.get(ref), pinned)  # refused before anything is converted
    with recorder(home, identity) as rec, sending_area(home) as work:
        export = shippable(store, ref, work / "onnx")  # digest re-checked, or converted
        info = store.get(ref)  # the tags as they are now
        verdict = export_gate(info, export.onnx_digest, pinned)
        ship = export.directory
        if sha256_file(ship / ONNX_FILE) != export.onnx_digest:
            raise DigestMismatch(f"{ref}: model.onnx changed on the way")
        _add_audit_report(store, info, ship, work, export.onnx_digest)
        sequence = reserve_sequence(home, ref.name)
        statement = TransferStatement(
            transfer=make_transfer(identity, recipients, ref.name, ref.version, sequence,
                                   now, validity),
            purpose=info.tags.get(TAG + "purpose", ""),
            legal_basis=info.tags.get(TAG + "legal_basis", ""),
            audit_verdict=verdict, onnx_digest=export.onnx_digest)
        digest = bundle_directory(identity, ship, statement, recipients, out,
                                  _created_hook(rec, statement, info), staging=work,
                                  journal=pending_journal(home, work), overwrite=overwrite)
    return CreatedBundle(out, digest, statement, out.stat().st_size, tuple(finished))


def _created_record(home: Path, identity: SiteIdentity) -> Callable[[str], str | None]:
    """The id of this site's ``bundle_created`` record naming a payload digest, if any."""
    def find(payload_digest: str) -> str | None:
        if not has_ledger(home):
            return None
        with Ledger(ledger_url(home), identity.site) as ledger:
            for r in ledger.records(kind=RecordKind.BUNDLE_CREATED):
                if r.fields.get("bundle") == payload_digest:
                    return r.id
        return None

    return find


def _gate_before_export(info: VersionInfo, pinned_policy: str) -> None:
    """A version with no logged export is converted (and the export logged on it) by
    ``shippable``; refuse first unless its tags already let some ONNX bytes leave."""
    if TAG + "onnx_digest" in info.tags:
        return
    candidate = (info.tags.get(TAG + "audit.onnx_digest")
                 or info.tags.get(TAG + "export.override.onnx_digest") or "")
    export_gate(info, candidate, pinned_policy)


def _created_hook(rec: Recorder, statement: TransferStatement,
                  info: VersionInfo) -> Callable[[str, int], str | None]:
    """Append ``bundle_created`` (naming the encrypted payload) before the header is
    signed; its id goes into the header (see :class:`transfer.statement.Header`)."""
    t = statement.transfer
    statement_digest = sha256_bytes(canonical_json(statement.to_json()))

    def hook(payload_digest: str, payload_size: int) -> str | None:
        record = rec.record(
            RecordKind.BUNDLE_CREATED,
            subject("bundle-payload", f"{t.model}/{t.version}#{t.sequence}", payload_digest)
            + subject("onnx", f"{t.model}/{t.version}", statement.onnx_digest)
            + subject("transfer-statement", f"{t.model}/{t.version}#{t.sequence}",
                      statement_digest)
            + subject("model", f"{t.model}/{t.version}",
                      info.tags.get(TAG + "model_dir_digest")),
            bundle_created_fields(
                to=[r.site for r in t.recipients], model=t.model, version=t.version,
                bundle=payload_digest, payload_size=payload_size, sequence=t.sequence,
                recipients=[r.to_json() for r in t.recipients], created=t.created,
                expires=t.expires, purpose=statement.purpose,
                legal_basis=statement.legal_basis, audit_verdict=statement.audit_verdict,
                onnx_digest=statement.onnx_digest, statement_digest=statement_digest,
                model_dir_digest=info.tags.get(TAG + "model_dir_digest")))
        return None if record is None else record.id

    return hook


def verify_bundle(path: Path, home: Path, now: datetime | None = None,
                  limits: Limits = Limits()) -> Verification:  # noqa: B008
    """``bundle verify``: every check, decrypting in a private place if we have keys."""
    moment = now or datetime.now(UTC)
    if not (home / "identity").is_dir():
        env, sender = check_envelope(path, TrustStore(home), None, home, moment)
        return Verification(env.header, sender, False, None, None)
    identity = load_site(home)
    with open_bundle(path, home, identity, moment, limits) as vb:
        return Verification(vb.header, vb.sender, True, vb.statement, vb.bundle_digest)


def receive_bundle(path: Path, home: Path, store: ModelStore, now: datetime | None = None,
                   limits: Limits = Limits(),  # noqa: B008
                   identity: SiteIdentity | None = None) -> ReceivedModel:
    """``bundle receive``: verify, install atomically, register with lineage tags.

    Idempotent and safe to re-run after a kill at any point (all under the receiving
    lock): a bundle already registered and recorded is not registered again (the result
    says ``already``); a version left by a killed receive without its ledger record, and
    runs left without a version, are removed before the bundle is registered anew.
    """
    me = identity or load_site(home)
    with recorder(home, me) as rec:
        try:
            with open_bundle(path, home, me, now, limits) as vb:
                t = vb.statement.transfer
                name = received_name(t.sender.site, t.model)
                store.check_received_name(name, t.sender.site, t.model)
                for fingerprint in site_fingerprints(home):  # also from before a rotation
                    store.clean_received(name, lambda info: _recorded(home, me, info),
                                         fingerprint)
                dest = (home / RECEIVED_DIR / t.sender.site / t.model /
                        f"{t.version}-{t.sequence}")
                done = _registered(home, me, store, name, vb.bundle_digest)
                if done is not None:
                    record_received(home, t)
                    return ReceivedModel(done, dest, vb.statement, vb.bundle_digest, True)
                if dest.exists():
                    # Only a receive of this very bundle that died before recording it
                    # (the rollback check passed) can have left it: replace it.
                    shutil.rmtree(dest)
                dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.rename(vb.root, dest)
                try:
                    version = store.register_received(
                        dest / MODEL_DIR, name, _lineage_tags(vb.statement, vb.bundle_digest),
                        lambda info: _record_received(rec, vb, info),
                        sender=t.sender.site, source_model=t.model, receiver=me.fingerprint)
                except BaseException:
                    shutil.rmtree(dest, ignore_errors=True)
                    raise
                record_received(home, t)
        except Rollback as e:
            again = _already_received(path, home, me, store)
            if again is not None:
                return again
            _record_refused(rec, path, home, me, e)
            raise
        except Refused as e:
            _record_refused(rec, path, home, me, e)
            raise
    return ReceivedModel(version, dest, vb.statement, vb.bundle_digest)


def _recorded(home: Path, me: SiteIdentity, info: VersionInfo) -> bool:
    """Whether this site's ledger holds the ``bundle_received`` record of ``info``."""
    from transfer.ledger import Ledger, ledger_url

    with Ledger(ledger_url(home), me.site) as ledger:
        return receive_recorded(ledger.records(kind=RecordKind.BUNDLE_RECEIVED), info)


def receive_recorded(records: Iterable[Record], info: VersionInfo) -> bool:
    """Whether one of these ``bundle_received`` records is that of the version ``info``
    (its bundle digest, local name and version)."""
    digest = info.tags.get(TAG + "bundle_digest")
    return any(r.fields.get("bundle_file") == digest
               and r.fields.get("local_model") == info.ref.name
               and r.fields.get("local_version") == info.ref.version for r in records)


def _registered(home: Path, me: SiteIdentity, store: ModelStore, name: str,
                bundle_digest: str) -> VersionInfo | None:
    """The version this bundle was registered and recorded as, if any."""
    for info in store.received_versions(name, bundle_digest):
        if _recorded(home, me, info):
            return info
    return None


def _already_received(path: Path, home: Path, me: SiteIdentity,
                      store: ModelStore) -> ReceivedModel | None:
    """A refused-as-not-newer bundle that is the very one registered here: a no-op."""
    try:
        env = read_envelope(path)
        digest = sha256_file(path)
    except (PasserelleError, OSError):
        return None
    t = env.header.transfer
    done = _registered(home, me, store, received_name(t.sender.site, t.model), digest)
    if done is None:
        return None
    dest = home / RECEIVED_DIR / t.sender.site / t.model / f"{t.version}-{t.sequence}"
    try:
        statement = read_statement(dest / MODEL_DIR)
    except PasserelleError:
        return None
    if statement.transfer != t:
        return None
    return ReceivedModel(done, dest, statement, digest, True)


def _record_received(rec: Recorder, vb: VerifiedBundle, info: VersionInfo) -> None:
    """``bundle_received``: who sent what, the sender's record, where it was registered."""
    t = vb.statement.transfer
    rec.record(
        RecordKind.BUNDLE_RECEIVED,
        subject("bundle", f"{t.sender.site}:{t.model}/{t.version}#{t.sequence}",
                vb.bundle_digest)
        + subject("bundle-payload", f"{t.model}/{t.version}#{t.sequence}",
                  vb.header.payload_digest)
        + subject("onnx", str(info.ref), vb.statement.onnx_digest)
        + subject("key", t.sender.site, t.sender.fingerprint),
        bundle_arrived_fields(
            sender=t.sender.site, peer_record=vb.header.ledger_record, model=t.model,
            version=t.version, bundle=vb.header.payload_digest, bundle_file=vb.bundle_digest,
            sequence=t.sequence, sender_fingerprint=t.sender.fingerprint,
            local_model=info.ref.name, local_version=info.ref.version,
            onnx_digest=vb.statement.onnx_digest, audit_verdict=vb.statement.audit_verdict,
            purpose=vb.statement.purpose, legal_basis=vb.statement.legal_basis))


def _record_refused(rec: Recorder, path: Path, home: Path, me: SiteIdentity,
                    error: Refused) -> None:
    """``bundle_refused`` with the reason. The sender and its ``bundle_created`` record
    are named (``from``, ``peer_record``) only when the outer header is authentic (signed
    by a trusted key) and addressed to this site; otherwise what the header claims is
    kept as ``claimed_from``, which ``records verify --peer`` does not match."""
    if not rec.enabled:
        return
    fields: dict[str, Any] = {"reason": " ".join(str(error).split())[:2000],
                              "check": type(error).__name__}
    subjects: list[Subject] = []
    try:
        digest = sha256_file(path)
        fields["bundle_file"] = digest
        subjects += subject("bundle", path.name, digest)
    except OSError:
        pass
    try:
        env = read_envelope(path)
        t = env.header.transfer
        fields["claimed_from"] = t.sender.site
        fields["sequence"] = t.sequence
        sender = TrustStore(home).sender(t.sender.fingerprint, t.sender.site)
        verify(sender.public_key, canonical_json(env.header_doc), env.signature, "header")
    except PasserelleError:
        if "claimed_from" in fields:  # unauthenticated: kept apart from model/version
            fields.update(claimed_model=t.model, claimed_version=t.version)
        rec.record(RecordKind.BUNDLE_REFUSED, subjects, fields)
        return
    if not t.names(me.fingerprint):
        fields.update(claimed_model=t.model, claimed_version=t.version)
    else:
        fields = bundle_arrived_fields(
            sender=t.sender.site, peer_record=env.header.ledger_record, model=t.model,
            version=t.version, bundle=env.header.payload_digest,
            sender_fingerprint=t.sender.fingerprint, **fields)
        subjects += subject("bundle-payload", f"{t.model}/{t.version}#{t.sequence}",
                            env.header.payload_digest)
    rec.record(RecordKind.BUNDLE_REFUSED, subjects, fields)


def _lineage_tags(statement: TransferStatement, bundle_digest: str) -> dict[str, str]:
    t = statement.transfer
    return {
        TAG + "received_from": t.sender.site,
        TAG + "sender_fingerprint": t.sender.fingerprint,
        TAG + "bundle_digest": bundle_digest,
        TAG + "source_model": t.model,
        TAG + "source_version": t.version,
        TAG + "transfer_sequence": str(t.sequence),
        TAG + "transfer_created": t.created,
        TAG + "audit_verdict": statement.audit_verdict or "none",
        TAG + "purpose": statement.purpose,
        TAG + "legal_basis": statement.legal_basis,
        TAG + "onnx_digest": statement.onnx_digest,
    }


def describe(verification: Verification) -> dict[str, Any]:
    h = verification.header.transfer
    return {"sender": h.sender.site, "sender_fingerprint": h.sender.fingerprint,
            "recipients": [r.site for r in h.recipients], "model": h.model,
            "version": h.version, "sequence": h.sequence, "created": h.created,
            "expires": h.expires, "payload_digest": verification.header.payload_digest,
            "payload_size": verification.header.payload_size,
            "decrypted": verification.decrypted, "bundle_digest": verification.bundle_digest,
            "signature_file": SIGNATURE_FILE}


__all__ = ["CreatedBundle", "ReceivedModel", "Verification", "create_bundle", "describe",
           "export_gate", "public_identity", "receive_bundle", "verify_bundle"]
