"""Deployment at the receiving site: what is checked before a model codes a stay.

A version may code stays only if it is one this site can vouch for:

* a **received** version (``bundle receive``): its files verify with the OpenSSF Model
  Signing signature that came in the bundle, by the sender's key, still pinned (not
  revoked) in the trust store;
* an **own** version (``finetune``): its files and its lineage statement verify with the
  signature this site made when it registered it (:func:`sign_local_version`), by this
  site's key (current or retired by rotation).

:func:`verify_version` checks, in this order, before any byte is parsed as ONNX:

1. the version exists (else exit 2);
2. it is not withdrawn: no ``model_withdrawn`` / ``notice_received`` record of this
   site's ledger names it, and no ``passerelle.withdrawn`` tag is set;
3. its files are fetched from MLflow into a private folder and
   (4) their signature verifies (received: sender's pinned key; own: this site's key);
5. the ONNX digest equals the one this site's ledger recorded for the version
   (``bundle_received`` or ``finetune``) and the one the signed statement names;
6. the ONNX safety checks (no external data, model-local functions, unknown domains);
7. the very bytes that were hashed are handed to onnxruntime
   (:class:`transfer.scoring.Coder`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from passerelle.digests import canonical_json, sha256_bytes, sha256_file
from passerelle.errors import PasserelleError, Refused
from registry.model_dir import LABELS, VOCABULARY
from registry.store import TAG, ModelStore, VersionInfo, VersionRef
from registry.vocabulary import Vocabulary
from transfer import onnx_safety
from transfer.acts import Recorder, has_ledger, subject
from transfer.bundle import private_workspace, sign_model_dir, verify_model_signature
from transfer.errors import DigestMismatch, SignatureInvalid
from transfer.identity import load_site, public_identity
from transfer.ledger_errors import MalformedRecord
from transfer.ledger_site import open_ledger, own_keys
from transfer.records import Record, RecordKind, check_signature
from transfer.trust import TrustStore

ONNX_FILE = "model.onnx"
SIGNED_ARTIFACT = "signed"  # MLflow folder of an own version: lineage statement + signature
LINEAGE_FILE = "lineage_statement.json"
SIGNATURE_FILE = "model.sig"
LINEAGE_FORMAT = "passerelle-lineage-statement"
WITHDRAWN_TAG = TAG + "withdrawn"
# MLflow's own description of the version (registry.tracking.log_signature), logged beside
# the model's files; not part of what was signed, never read to code a stay.
MLFLOW_METADATA = ("MLmodel",)


class NotVerified(Refused):
    """The version cannot be vouched for: unsigned, bad signature or digest, no record."""


class Withdrawn(Refused):
    """The version, or one it derives from, was withdrawn."""


# --------------------------------------------------------------------------- ledger


def site_records(home: Path, url: str | None = None) -> list[Record]:
    """This site's ledger records, each signature checked (none without an identity)."""
    if not has_ledger(home):
        return []
    keys = own_keys(home)
    with open_ledger(home, url) as ledger:
        records = ledger.records()
    for record in records:
        try:
            check_signature(record, keys)
        except MalformedRecord as e:
            raise NotVerified(f"ledger record {record.seq} does not verify ({e}); run "
                              "`passerelle records verify`") from e
    return records


def withdrawn_versions(records: Iterable[Record]) -> dict[VersionRef, str]:
    """Local version -> reason, for every version a withdrawal record names."""
    out: dict[VersionRef, str] = {}
    for r in records:
        if r.kind in (RecordKind.MODEL_WITHDRAWN, RecordKind.NOTICE_RECEIVED):
            for text in r.fields.get("withdrawn", []):
                if isinstance(text, str) and "/" in text:
                    out.setdefault(VersionRef.parse(text), str(r.fields.get("reason", "")))
    return out


def finished(record: Record) -> bool:
    """A ``finetune`` record of a run that registered a version (not failed/interrupted)."""
    return bool(record.fields.get("outcome", "finished") == "finished")


def recorded_onnx_digest(records: Iterable[Record], ref: VersionRef) -> str | None:
    """The ONNX digest this site's ledger recorded when the version was registered."""
    found = None
    for r in records:
        f = r.fields
        local = ((f.get("local_model"), f.get("local_version"))
                 if r.kind is RecordKind.BUNDLE_RECEIVED else (f.get("model"), f.get("version"))
                 if r.kind is RecordKind.FINETUNE and finished(r) else None)
        if local == (ref.name, ref.version):
            found = f.get("onnx_digest")
    return found if isinstance(found, str) else None


def check_not_withdrawn(info: VersionInfo, records: Sequence[Record]) -> None:
    """(2) Refuse a version that a withdrawal names (ledger) or that is tagged withdrawn."""
    reason = withdrawn_versions(records).get(info.ref)
    if reason is None and WITHDRAWN_TAG in info.tags:
        reason = info.tags.get(TAG + "withdrawn.reason", "")
    if reason is not None:
        raise Withdrawn(f"{info.ref} was withdrawn ({reason or 'no reason given'})")


def check_ancestors(store: ModelStore, info: VersionInfo, records: Sequence[Record]) -> None:
    """(2) ... nor is any version it was fine-tuned from (followed through the tags)."""
    seen = {info.ref}
    current = info
    while (parent := current.tags.get(TAG + "finetuned_from")) is not None:
        ref = VersionRef.parse(parent)
        if ref in seen:
            raise NotVerified(f"{info.ref}: its lineage loops at {ref}")
        seen.add(ref)
        current = store.get(ref)
        try:
            check_not_withdrawn(current, records)
        except Withdrawn as e:
            raise Withdrawn(f"{info.ref} derives from a withdrawn version: {e}") from e


# --------------------------------------------------------------------------- lineage


@dataclass(frozen=True)
class Lineage:
    """The signed statement of where an own version comes from."""

    site: str
    fingerprint: str
    model: str
    version: str
    onnx_digest: str
    source: Mapping[str, str]  # the version it was made from: model, version, digests
    finetune_record: str | None
    dataset: str | None
    created: str

    def to_json(self) -> dict[str, Any]:
        return {"format": LINEAGE_FORMAT, "format_version": 1, "site": self.site,
                "fingerprint": self.fingerprint, "model": self.model,
                "version": self.version, "onnx_digest": self.onnx_digest,
                "source": dict(self.source), "finetune_record": self.finetune_record,
                "dataset": self.dataset, "created": self.created}

    @classmethod
    def from_json(cls, doc: Any) -> Lineage:
        try:
            if not isinstance(doc, dict) or doc.get("format") != LINEAGE_FORMAT or \
                    doc.get("format_version") != 1 or not isinstance(doc["source"], dict):
                raise NotVerified("not a lineage statement (format version 1)")
            return cls(site=str(doc["site"]), fingerprint=str(doc["fingerprint"]),
                       model=str(doc["model"]), version=str(doc["version"]),
                       onnx_digest=str(doc["onnx_digest"]),
                       source={str(k): str(v) for k, v in doc["source"].items()},
                       finetune_record=doc["finetune_record"], dataset=doc["dataset"],
                       created=str(doc["created"]))
        except (KeyError, TypeError) as e:
            raise NotVerified(f"lineage statement is missing a field: {e}") from e


_SOURCE_TAGS = ("finetuned_from", "source_onnx_digest", "received_from", "sender_fingerprint",
                "bundle_digest", "source_model", "source_version", "transfer_sequence")


def sign_local_version(store: ModelStore, info: VersionInfo, rec: Recorder,
                       finetune_record: Record | None, now: datetime | None = None) -> None:
    """Sign a version this site made (fine-tuned) with the site's key.

    The version's ``onnx/`` files plus a lineage statement (source version and its
    digests, the fine-tuning record, the dataset) are signed with OpenSSF Model Signing;
    the statement and the signature are logged under ``signed/`` on the version and a
    ``model_signed`` record names both. A home without a site identity cannot sign:
    its versions stay unsigned, and ``predict``/``serve`` refuse them.
    """
    if not has_ledger(store.home):
        return
    identity = load_site(store.home)
    tags = info.tags
    lineage = Lineage(
        site=identity.site, fingerprint=identity.fingerprint, model=info.ref.name,
        version=info.ref.version, onnx_digest=tags.get(TAG + "onnx_digest", ""),
        source={k: tags[TAG + k] for k in _SOURCE_TAGS if TAG + k in tags},
        finetune_record=None if finetune_record is None else finetune_record.id,
        dataset=tags.get(TAG + "dataset_fingerprint"),
        created=(now or datetime.now(UTC)).replace(microsecond=0).isoformat())
    with private_workspace(store.home, ".passerelle-sign-") as work:
        model = _model_files(store.download(info, "onnx", work / "dl"))
        if sha256_file(model / ONNX_FILE) != lineage.onnx_digest:
            raise DigestMismatch(f"{info.ref}: the registered model.onnx differs from its tag")
        statement = canonical_json(lineage.to_json())
        (model / LINEAGE_FILE).write_bytes(statement)
        signed = work / SIGNED_ARTIFACT
        signed.mkdir()
        sign_model_dir(identity, model, signed / SIGNATURE_FILE)
        shutil.copyfile(model / LINEAGE_FILE, signed / LINEAGE_FILE)
        signature_digest = sha256_file(signed / SIGNATURE_FILE)
        rec.record(RecordKind.MODEL_SIGNED,
                   subject("onnx", str(info.ref), lineage.onnx_digest)
                   + subject("lineage", str(info.ref), sha256_bytes(statement))
                   + subject("signature", str(info.ref), signature_digest),
                   {"model": info.ref.name, "version": info.ref.version,
                    "onnx_digest": lineage.onnx_digest,
                    "lineage_digest": sha256_bytes(statement),
                    "signature_digest": signature_digest, "source": dict(lineage.source),
                    "finetune_record": lineage.finetune_record, "dataset": lineage.dataset})
        store.attach(info, signed, SIGNED_ARTIFACT,
                     {TAG + "signed_by": identity.site,
                      TAG + "lineage_digest": sha256_bytes(statement)})


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class VerifiedModel:
    """A version that passed every check of :func:`verify_version`, with its bytes."""

    info: VersionInfo
    onnx_bytes: bytes
    onnx_digest: str
    vocabulary: Vocabulary
    codes: tuple[str, ...]
    labels: Mapping[str, str]
    signer: str  # the site whose key signed it
    origin: str  # "received" or "own"


def verify_version(store: ModelStore, ref: VersionRef) -> VerifiedModel:
    """Steps 1-7 of the module docstring; :class:`Refused` (exit 1) on any failure."""
    home = store.home
    info = store.get(ref)                                                   # (1)
    records = site_records(home)
    check_not_withdrawn(info, records)                                      # (2)
    check_ancestors(store, info, records)
    expected = recorded_onnx_digest(records, ref)
    with private_workspace(home, ".passerelle-verify-") as work:
        try:
            model = _model_files(store.download(info, "onnx", work / "dl"))  # (3)
        except PasserelleError as e:
            raise NotVerified(f"{ref}: its ONNX files cannot be fetched: {e}") from e
        if not (model / ONNX_FILE).is_file():
            raise NotVerified(f"{ref}: no {ONNX_FILE} in the registry")
        if TAG + "finetuned_from" in info.tags:                             # (4)
            origin, signer, named = "own", *_verify_own(store, info, model, work)
        elif TAG + "received_from" in info.tags:
            origin, signer, named = "received", *_verify_received(home, info, model, work,
                                                                  expected)
        else:
            raise NotVerified(f"{ref} is neither a received nor a fine-tuned version of "
                              "this site: nothing signed vouches for it")
        onnx_bytes = (model / ONNX_FILE).read_bytes()
        digest = sha256_bytes(onnx_bytes)                                   # (5)
        if expected is None:
            raise NotVerified(f"{ref}: this site's ledger holds no record of its ONNX digest")
        if digest != expected or digest != named:
            raise DigestMismatch(f"{ref}: model.onnx ({digest}) differs from the digest "
                                 f"recorded in the ledger ({expected})")
        onnx_safety.check_model(model / ONNX_FILE)                          # (6)
        if sha256_file(model / ONNX_FILE) != digest:
            raise DigestMismatch(f"{ref}: model.onnx changed while it was checked")
        vocab = _vocabulary(model / VOCABULARY)
        codes, labels = _labels(model / LABELS)
    return VerifiedModel(info, onnx_bytes, digest, vocab, codes, labels, signer, origin)


def _model_files(folder: Path) -> Path:
    """The downloaded ``onnx/`` folder without MLflow's own metadata file."""
    for name in MLFLOW_METADATA:
        (folder / name).unlink(missing_ok=True)
    return folder


def _verify_received(home: Path, info: VersionInfo, model: Path, work: Path,
                     expected: str | None) -> tuple[str, str]:
    """(4) A received version: the bundle's model signature by the pinned sender key.

    The signature came in the bundle and was installed beside the model under
    ``HOME/received/``; it is the one whose installed model has the ONNX digest this
    site's ledger recorded on receipt."""
    site = info.tags[TAG + "received_from"]
    fingerprint = info.tags.get(TAG + "sender_fingerprint", "")
    sender = TrustStore(home).sender(fingerprint, site)  # untrusted or revoked: refused
    signatures = [p for p in sorted((home / "received").rglob(SIGNATURE_FILE))
                  if (p.parent / "model" / ONNX_FILE).is_file()
                  and sha256_file(p.parent / "model" / ONNX_FILE) == expected]
    if expected is None or not signatures:
        raise NotVerified(f"{info.ref}: no bundle installed under {home / 'received'} holds "
                          f"the ONNX bytes the ledger recorded on receipt ({expected}): the "
                          "model was changed after it was received, or its bundle is gone")
    _check_signature(info.ref, model, signatures[0], sender.signing_key_pem, work,
                     f"the sender's ({site})")
    try:
        statement = json.loads((model / "transfer_statement.json").read_text("utf-8"))
        named = str(statement["onnx_digest"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NotVerified(f"{info.ref}: no readable transfer statement") from e
    return site, named


def _verify_own(store: ModelStore, info: VersionInfo, model: Path,
                work: Path) -> tuple[str, str]:
    """(4) An own version: its files + lineage statement, signed by this site's key."""
    home = store.home
    if not has_ledger(home):
        raise NotVerified(f"{info.ref}: this home has no site identity to check its "
                          "signature with")
    try:
        signed = store.download(info, SIGNED_ARTIFACT, work / "signed")
    except PasserelleError as e:
        raise NotVerified(f"{info.ref} is not signed by this site (no {SIGNED_ARTIFACT}/ "
                          "in the registry)") from e
    if not (signed / LINEAGE_FILE).is_file() or not (signed / SIGNATURE_FILE).is_file():
        raise NotVerified(f"{info.ref}: its signature or lineage statement is missing")
    shutil.copyfile(signed / LINEAGE_FILE, model / LINEAGE_FILE)
    errors = []
    for key in own_keys(home).keys.values():
        from cryptography.hazmat.primitives import serialization

        pem = key.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        try:
            _check_signature(info.ref, model, signed / SIGNATURE_FILE, pem, work,
                             "this site's")
            break
        except SignatureInvalid as e:
            errors.append(e)
    else:
        raise errors[0] if errors else SignatureInvalid(f"{info.ref}: no key to check with")
    try:
        lineage = Lineage.from_json(json.loads((model / LINEAGE_FILE).read_text("utf-8")))
    except (OSError, ValueError) as e:
        raise NotVerified(f"{info.ref}: the lineage statement is not JSON") from e
    if (lineage.model, lineage.version) != (info.ref.name, info.ref.version):
        raise NotVerified(f"{info.ref}: the signed lineage statement speaks of "
                          f"{lineage.model}/{lineage.version}")
    (model / LINEAGE_FILE).unlink()
    return public_identity(home).site, lineage.onnx_digest


def _check_signature(ref: VersionRef, model: Path, signature: Path, key_pem: str,
                     work: Path, whose: str) -> None:
    """OpenSSF Model Signing verification, refused in one readable line naming the files
    that changed."""
    try:
        verify_model_signature(model, signature, key_pem, work)
    except SignatureInvalid as e:
        text = str(e.__cause__ or e)
        changed = sorted(set(re.findall(r"[Hh]ash mismatch for \\?'([^'\\]+)", text)))
        extra = sorted(set(re.findall(r"[Ee]xtra files? [^:]*: ?\[([^\]]*)\]", text)))
        detail = f" ({', '.join(changed)} changed)" if changed else \
            f" (unexpected files: {extra[0]})" if extra else ""
        raise SignatureInvalid(f"{ref}: the signature does not verify with {whose} key over "
                               f"the files in the registry{detail}") from e


def _vocabulary(path: Path) -> Vocabulary:
    try:
        return Vocabulary.load(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NotVerified(f"{path.name}: unreadable vocabulary: {e}") from e


def _labels(path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        codes = tuple(str(c) for c in doc["codes"])
        labels = {c: str(doc["labels"].get(c, "")) for c in codes}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise NotVerified(f"{path.name}: unreadable labels: {e}") from e
    return codes, labels


__all__ = ["Lineage", "NotVerified", "VerifiedModel", "Withdrawn", "check_ancestors",
           "check_not_withdrawn", "recorded_onnx_digest", "sign_local_version",
           "site_records", "verify_version", "withdrawn_versions"]
