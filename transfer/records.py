"""Ledger records: in-toto Statements v1 in DSSE envelopes, signed with ECDSA P-256.

A record is one signed statement about one consequential act of a site::

    envelope = {"payloadType": "application/vnd.in-toto+json",
                "payload": base64(canonical_json(statement)),
                "signatures": [{"keyid": "sha256:<hex of DER SubjectPublicKeyInfo>",
                                "sig": base64(DER ECDSA P-256/SHA-256 over PAE)}]}
    statement = {"_type": "https://in-toto.io/Statement/v1",
                 "subject": [{"name": ..., "digest": {"sha256": "<hex>"}}, ...],
                 "predicateType": "https://passerelle.dev/ledger/<kind>/v1",
                 "predicate": {<kind-specific fields>, "seq": n, "prev": id | null,
                               "site": name, "time": ISO 8601 UTC}}

PAE is DSSE's pre-authentication encoding,
``"DSSEv1" SP len(type) SP type SP len(body) SP body``. A record's id is
``sha256:<hex>`` of the envelope's canonical JSON; ``prev`` is the id of the site's
previous record, so a site's records form one chain.

Everything that is hashed has one encoding: the payload must be canonical JSON, the
base64 must be canonical, the signature DER-canonical with a low ``s``. A record whose
bytes could be rewritten without the key therefore cannot exist.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NewType, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from passerelle.digests import canonical_json, sha256_bytes
from transfer.ledger_errors import MalformedRecord

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_PREFIX = "https://passerelle.dev/ledger/"
RESERVED_FIELDS = frozenset({"seq", "prev", "site", "time"})
MAX_ENVELOPE = 1 << 20  # one record: 1 MiB is far above anything a site appends

RecordId = NewType("RecordId", str)  # sha256:<hex> of the envelope's canonical JSON
KeyId = NewType("KeyId", str)  # sha256:<hex> of the DER SubjectPublicKeyInfo

_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_P256_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)


class RecordKind(StrEnum):
    """The consequential acts a site records."""

    MODEL_REGISTERED = "model_registered"
    AUDIT_VERDICT = "audit_verdict"
    EXPORT = "export"
    EXPORT_OVERRIDE = "export_override"
    BUNDLE_CREATED = "bundle_created"
    BUNDLE_RECEIVED = "bundle_received"
    BUNDLE_REFUSED = "bundle_refused"
    FINETUNE_STARTED = "finetune_started"
    FINETUNE = "finetune"
    TRUST_ADDED = "trust_added"
    TRUST_REVOKED = "trust_revoked"
    TRUST_ROTATED = "trust_rotated"
    SITE_POLICY_CHANGED = "site_policy_changed"
    PSEUDONYM_KEY_CREATED = "pseudonym_key_created"
    MODEL_SIGNED = "model_signed"
    MODEL_WITHDRAWN = "model_withdrawn"
    NOTICE_RECEIVED = "notice_received"
    NOTICE_REFUSED = "notice_refused"
    MODEL_USED = "model_used"
    RESERVE_SEALED = "reserve_sealed"
    AUDIT_HALVES_DRAWN = "audit_halves_drawn"  # halves of the audit pool for vendor models

    @property
    def predicate_type(self) -> str:
        return f"{PREDICATE_PREFIX}{self.value}/v1"

    @classmethod
    def from_predicate_type(cls, text: str) -> RecordKind:
        for kind in cls:
            if kind.predicate_type == text:
                return kind
        raise MalformedRecord(f"unknown predicateType {text!r}")


def is_record_id(text: str) -> bool:
    return bool(_ID.match(text))


def is_site_name(text: str) -> bool:
    return bool(_SITE.match(text))


# -- keys ---------------------------------------------------------------------------


def keyid_of(key: ec.EllipticCurvePublicKey) -> KeyId:
    """``sha256:<hex>`` of the DER SubjectPublicKeyInfo (the site fingerprint)."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyId(sha256_bytes(der))


class Signer(Protocol):
    """Signs the PAE bytes of a record; ``keyid`` names the public key that verifies."""

    @property
    def keyid(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


class Verifier(Protocol):
    """The public key a keyid stands for, or None when that key is not trusted."""

    def public_key(self, keyid: str) -> ec.EllipticCurvePublicKey | None: ...


def _require_p256(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> None:
    if key.curve.name != "secp256r1":
        raise MalformedRecord(f"ledger keys are ECDSA P-256, not {key.curve.name}")


class EcdsaSigner:
    """A :class:`Signer` over an ECDSA P-256 private key (SHA-256, low-s DER)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        _require_p256(key)
        self._key = key
        self._keyid = keyid_of(key.public_key())

    @property
    def keyid(self) -> str:
        return self._keyid

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        return encode_dss_signature(r, min(s, _P256_ORDER - s))


@dataclass(frozen=True)
class KeyRing:
    """A :class:`Verifier` over a fixed set of ECDSA P-256 public keys."""

    keys: Mapping[str, ec.EllipticCurvePublicKey]

    @classmethod
    def of(cls, *keys: ec.EllipticCurvePublicKey) -> KeyRing:
        for key in keys:
            _require_p256(key)
        return cls({keyid_of(k): k for k in keys})

    def public_key(self, keyid: str) -> ec.EllipticCurvePublicKey | None:
        return self.keys.get(keyid)


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


# -- statements ---------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """What a record speaks of: a name and the sha256 of its bytes."""

    name: str
    sha256: str  # hex, as in-toto writes it

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MalformedRecord("a subject needs a non-empty name")
        if not isinstance(self.sha256, str) or not _HEX.match(self.sha256):
            raise MalformedRecord(f"subject {self.name!r}: digest is not 64 hex digits")

    @classmethod
    def of(cls, name: str, digest: str) -> Subject:
        """From a ``sha256:<hex>`` digest as :mod:`passerelle.digests` writes it."""
        return cls(name, digest.removeprefix("sha256:"))

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "digest": {"sha256": self.sha256}}

    @classmethod
    def from_json(cls, doc: Any) -> Subject:
        if not isinstance(doc, dict) or set(doc) != {"name", "digest"} or \
                not isinstance(doc["digest"], dict) or set(doc["digest"]) != {"sha256"}:
            raise MalformedRecord("a subject must be {name, digest: {sha256}}")
        return cls(doc["name"], doc["digest"]["sha256"])


def format_time(when: datetime) -> str:
    """UTC, microseconds, ``+00:00``: one fixed width, so the text sorts as time does."""
    if when.tzinfo is None:
        raise MalformedRecord("a record time needs a time zone")
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def parse_time(text: Any, what: str) -> datetime:
    try:
        value = datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise MalformedRecord(f"{what}: {text!r} is not an ISO 8601 time with a zone")
    return value


@dataclass(frozen=True)
class Record:
    """One verified-in-form ledger record. Build only with :func:`seal` or :func:`parse`.

    ``parse`` checks the form (canonical encodings, statement shape); the signature is
    checked by :func:`check_signature` against a :class:`Verifier`.
    """

    id: RecordId
    envelope: str  # the envelope's canonical JSON text, as stored and exported
    kind: RecordKind
    seq: int
    prev: RecordId | None
    site: str
    time: str
    subjects: tuple[Subject, ...]
    fields: Mapping[str, Any] = field(hash=False)
    keyid: str
    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    @property
    def model(self) -> str | None:
        value = self.fields.get("model")
        return value if isinstance(value, str) else None

    def statement(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.payload)
        return result

    def summary(self) -> dict[str, Any]:
        """The record for people and ``--json``: metadata, subjects, predicate fields."""
        return {"id": self.id, "seq": self.seq, "kind": self.kind.value, "site": self.site,
                "time": self.time, "prev": self.prev, "keyid": self.keyid,
                "subjects": [{"name": s.name, "digest": s.digest} for s in self.subjects],
                "fields": dict(self.fields)}


def statement_of(kind: RecordKind, subjects: tuple[Subject, ...], fields: Mapping[str, Any],
                 *, seq: int, prev: RecordId | None, site: str, when: datetime
                 ) -> dict[str, Any]:
    clash = RESERVED_FIELDS & set(fields)
    if clash:
        raise MalformedRecord(f"predicate fields {sorted(clash)} are set by the ledger")
    predicate = {**fields, "seq": seq, "prev": prev, "site": site, "time": format_time(when)}
    return {"_type": STATEMENT_TYPE, "subject": [s.to_json() for s in subjects],
            "predicateType": kind.predicate_type, "predicate": predicate}


def seal(statement: Mapping[str, Any], signer: Signer) -> Record:
    """Sign a statement into a DSSE envelope and return it as a record."""
    return parse(sign_envelope(statement, signer))


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise MalformedRecord(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as e:
        raise MalformedRecord(f"{what} is not valid base64") from e
    if base64.b64encode(raw).decode() != text:
        raise MalformedRecord(f"{what} is not canonical base64")
    return raw


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_canonical(text: str | bytes, what: str) -> Any:
    """Parse JSON that must already be in canonical form (so its hash is well defined)."""
    try:
        doc = json.loads(text, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MalformedRecord(f"{what} is not JSON") from e
    data = text.encode() if isinstance(text, str) else text
    if canonical_json(doc) != data:
        raise MalformedRecord(f"{what} is not canonical JSON")
    return doc


def open_envelope(envelope: str) -> tuple[bytes, str, bytes]:
    """The payload, keyid and signature of a canonical single-signature DSSE envelope."""
    if len(envelope) > MAX_ENVELOPE:
        raise MalformedRecord("envelope larger than 1 MiB")
    env = load_canonical(envelope, "envelope")
    if not isinstance(env, dict) or set(env) != {"payloadType", "payload", "signatures"}:
        raise MalformedRecord("not a DSSE envelope {payloadType, payload, signatures}")
    if env["payloadType"] != PAYLOAD_TYPE:
        raise MalformedRecord(f"payloadType is not {PAYLOAD_TYPE}")
    sigs = env["signatures"]
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict) or \
            set(sigs[0]) != {"keyid", "sig"} or not isinstance(sigs[0]["keyid"], str):
        raise MalformedRecord("a record carries exactly one signature {keyid, sig}")
    return _b64(env["payload"], "payload"), sigs[0]["keyid"], _b64(sigs[0]["sig"], "signature")


def sign_envelope(statement: Mapping[str, Any], signer: Signer) -> str:
    """The canonical JSON text of a DSSE envelope over ``statement``."""
    payload = canonical_json(statement)
    sig = signer.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
                "signatures": [{"keyid": signer.keyid, "sig": base64.b64encode(sig).decode()}]}
    return canonical_json(envelope).decode()


def parse(envelope: str) -> Record:
    """A record from its envelope text; refuses anything not exactly in canonical form."""
    # (1) the envelope: canonical JSON with exactly the DSSE fields and one signature
    payload, keyid, signature = open_envelope(envelope)
    # (2) the payload: canonical JSON of an in-toto Statement v1
    st = load_canonical(payload, "payload")
    if not isinstance(st, dict) or set(st) != {"_type", "subject", "predicateType",
                                               "predicate"}:
        raise MalformedRecord("payload is not an in-toto statement")
    if st["_type"] != STATEMENT_TYPE:
        raise MalformedRecord(f"statement _type is not {STATEMENT_TYPE}")
    if not isinstance(st["subject"], list) or not isinstance(st["predicateType"], str):
        raise MalformedRecord("statement subject must be a list")
    subjects = tuple(Subject.from_json(s) for s in st["subject"])
    kind = RecordKind.from_predicate_type(st["predicateType"])
    # (3) the chain fields of the predicate
    pred = st["predicate"]
    if not isinstance(pred, dict) or not set(pred) >= RESERVED_FIELDS:
        raise MalformedRecord("predicate lacks seq, prev, site or time")
    seq, prev, site = pred["seq"], pred["prev"], pred["site"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise MalformedRecord(f"seq {seq!r} is not a whole number")
    if prev is not None and not (isinstance(prev, str) and _ID.match(prev)):
        raise MalformedRecord(f"prev {prev!r} is not a record id")
    if (prev is None) != (seq == 0):
        raise MalformedRecord("only the first record (seq 0) has no prev")
    if not isinstance(site, str) or not _SITE.match(site):
        raise MalformedRecord(f"site {site!r} is not a site name")
    parse_time(pred["time"], "predicate time")
    fields = {k: v for k, v in pred.items() if k not in RESERVED_FIELDS}
    return Record(id=RecordId(sha256_bytes(envelope.encode())), envelope=envelope, kind=kind,
                  seq=seq, prev=RecordId(prev) if prev else None, site=site,
                  time=pred["time"], subjects=subjects, fields=fields,
                  keyid=keyid, payload=payload, signature=signature)


def check_signature(record: Record, verifier: Verifier) -> None:
    """Raise :class:`MalformedRecord` unless a trusted key signed the record (low-s DER)."""
    verify_signature(record.keyid, record.payload, record.signature, verifier)


def verify_signature(keyid: str, payload: bytes, signature: bytes, verifier: Verifier) -> None:
    """Raise :class:`MalformedRecord` unless ``keyid`` is trusted and signed the payload."""
    key = verifier.public_key(keyid)
    if key is None:
        raise MalformedRecord(f"signed by {keyid}, which is not a trusted key")
    try:
        r, s = decode_dss_signature(signature)
        if encode_dss_signature(r, s) != signature or s > _P256_ORDER // 2:
            raise MalformedRecord("signature is not in canonical low-s DER form")
        key.verify(signature, pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as e:
        raise MalformedRecord(f"signature by {keyid} does not verify") from e


# -- the fields that tie two sites' ledgers together ---------------------------------
# ``records verify --peer`` matches a peer's ``bundle_created`` addressed to this site
# with this site's ``bundle_received``/``bundle_refused`` naming it, and the other way.


def bundle_created_fields(*, to: list[str], model: str, version: str, bundle: str,
                          **extra: Any) -> dict[str, Any]:
    """Fields of a ``bundle_created`` record: recipients, model, version, bundle digest."""
    return {**extra, "to": sorted(to), "model": model, "version": version, "bundle": bundle}


def bundle_arrived_fields(*, sender: str, peer_record: str | None, model: str, version: str,
                          bundle: str, **extra: Any) -> dict[str, Any]:
    """Fields of a ``bundle_received``/``bundle_refused`` record (add ``reason`` if refused).

    ``peer_record`` is the id of the sender's ``bundle_created`` record, carried in the
    bundle's signed header; None for a bundle that carries none (its sender keeps no
    ledger), which ``records verify --peer`` then reports as unmatched. ``bundle`` is the
    digest of the encrypted payload, which both records name.
    """
    if peer_record is not None and not is_record_id(peer_record):
        raise MalformedRecord(f"peer_record {peer_record!r} is not a record id")
    return {**extra, "from": sender, "peer_record": peer_record, "model": model,
            "version": version, "bundle": bundle}
