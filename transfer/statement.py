"""The transfer statement (signed inside the bundle) and the outer header.

Both carry the same :class:`Transfer`: who sends what to whom, with which sequence
number and validity window. The statement is a file of the model-signed directory;
the header is signed separately, and the receiver checks that the two agree
(mix-and-match) after decrypting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from transfer.errors import MalformedBundle
from transfer.identity import Fingerprint, SiteName

STATEMENT_FILE = "transfer_statement.json"
STATEMENT_FORMAT = "passerelle-transfer-statement"
HEADER_FORMAT = "passerelle-bundle-header"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEXT_LIMIT = 500


@dataclass(frozen=True)
class Party:
    site: SiteName
    fingerprint: Fingerprint

    def to_json(self) -> dict[str, str]:
        return {"site": self.site, "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, doc: Any) -> Party:
        if not isinstance(doc, dict) or set(doc) != {"site", "fingerprint"} or not all(
                isinstance(v, str) and v for v in doc.values()):
            raise MalformedBundle("a party must be {site, fingerprint}")
        if not _SITE.match(doc["site"]) or not _DIGEST.match(doc["fingerprint"]):
            raise MalformedBundle("a party needs a valid site name and fingerprint")
        return cls(SiteName(doc["site"]), Fingerprint(doc["fingerprint"]))


def parse_time(text: Any, what: str) -> datetime:
    try:
        value = datetime.fromisoformat(str(text))
    except ValueError as e:
        raise MalformedBundle(f"{what}: {text!r} is not an ISO 8601 time") from e
    if value.tzinfo is None:
        raise MalformedBundle(f"{what}: time without a time zone")
    return value


@dataclass(frozen=True)
class Transfer:
    """What both the header and the statement say about the transfer."""

    sender: Party
    recipients: tuple[Party, ...]
    model: str
    version: str
    sequence: int
    created: str
    expires: str

    def __post_init__(self) -> None:
        if not self.recipients:
            raise MalformedBundle("a bundle needs at least one recipient")
        if type(self.sequence) is not int or self.sequence < 1 or \
                not re.fullmatch(r"[1-9][0-9]{0,8}", self.version):
            raise MalformedBundle("sequence and version must be positive whole numbers")
        if not _MODEL.match(self.model):  # it names a folder at the receiving site
            raise MalformedBundle(f"{self.model!r} is not a valid model name")
        if parse_time(self.expires, "expires") <= parse_time(self.created, "created"):
            raise MalformedBundle("a bundle must expire after it is created")

    @property
    def created_at(self) -> datetime:
        return parse_time(self.created, "created")

    @property
    def expires_at(self) -> datetime:
        return parse_time(self.expires, "expires")

    def names(self, fingerprint: Fingerprint) -> bool:
        return any(r.fingerprint == fingerprint for r in self.recipients)

    def to_json(self) -> dict[str, Any]:
        return {"sender": self.sender.to_json(),
                "recipients": [r.to_json() for r in self.recipients],
                "model": self.model, "version": self.version, "sequence": self.sequence,
                "created": self.created, "expires": self.expires}

    @classmethod
    def from_json(cls, doc: Any) -> Transfer:
        try:
            if not isinstance(doc["recipients"], list) or not isinstance(doc["sequence"], int):
                raise MalformedBundle("recipients must be a list and sequence an integer")
            return cls(sender=Party.from_json(doc["sender"]),
                       recipients=tuple(Party.from_json(r) for r in doc["recipients"]),
                       model=str(doc["model"]), version=str(doc["version"]),
                       sequence=doc["sequence"], created=str(doc["created"]),
                       expires=str(doc["expires"]))
        except (KeyError, TypeError) as e:
            raise MalformedBundle(f"transfer is missing a field: {e}") from e


@dataclass(frozen=True)
class TransferStatement:
    """The signed statement inside the bundle: the transfer and why it is lawful."""

    transfer: Transfer
    purpose: str
    legal_basis: str
    audit_verdict: str
    onnx_digest: str

    def __post_init__(self) -> None:
        for name in ("purpose", "legal_basis", "audit_verdict"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > _TEXT_LIMIT:
                raise MalformedBundle(f"statement {name} must be a short text")
        if not _DIGEST.match(self.onnx_digest):
            raise MalformedBundle("statement onnx_digest must be a sha256 digest")

    def to_json(self) -> dict[str, Any]:
        return {"format": STATEMENT_FORMAT, "format_version": 1,
                "transfer": self.transfer.to_json(), "purpose": self.purpose,
                "legal_basis": self.legal_basis, "audit_verdict": self.audit_verdict,
                "onnx_digest": self.onnx_digest}

    @classmethod
    def from_json(cls, doc: Any) -> TransferStatement:
        try:
            if not isinstance(doc, dict) or doc.get("format") != STATEMENT_FORMAT or \
                    doc.get("format_version") != 1:
                raise MalformedBundle("not a transfer statement (format version 1)")
            return cls(transfer=Transfer.from_json(doc["transfer"]),
                       purpose=doc["purpose"], legal_basis=doc["legal_basis"],
                       audit_verdict=doc["audit_verdict"], onnx_digest=str(doc["onnx_digest"]))
        except (KeyError, TypeError) as e:
            raise MalformedBundle(f"statement is missing a field: {e}") from e


@dataclass(frozen=True)
class Header:
    """The outer header: the transfer plus the encrypted payload's digest and size.

    ``ledger_record`` is the id of the sender's ``bundle_created`` ledger record, which
    names this payload's digest (so the record is appended after encryption and before
    the header is signed; it cannot be inside the encrypted, model-signed statement,
    whose bytes the payload digest covers). The header's signature binds the record id
    to the payload digest; the receiver's ``bundle_received``/``bundle_refused`` record
    names it as ``peer_record``. Absent in bundles from sites without a ledger.
    """

    transfer: Transfer
    payload_digest: str
    payload_size: int
    ledger_record: str | None = None

    def __post_init__(self) -> None:
        if not _DIGEST.match(self.payload_digest) or self.payload_size < 1:
            raise MalformedBundle("header payload must have a sha256 digest and a size")
        if self.ledger_record is not None and not (
                isinstance(self.ledger_record, str) and _DIGEST.match(self.ledger_record)):
            raise MalformedBundle("header ledger_record must be a record id (sha256:<hex>)")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": HEADER_FORMAT, "format_version": 1,
            "transfer": self.transfer.to_json(),
            "payload": {"digest": self.payload_digest, "size": self.payload_size}}
        if self.ledger_record is not None:
            doc["ledger_record"] = self.ledger_record
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Header:
        try:
            if not isinstance(doc, dict) or doc.get("format") != HEADER_FORMAT or \
                    doc.get("format_version") != 1:
                raise MalformedBundle("not a bundle header (format version 1)")
            payload = doc["payload"]
            if type(payload["size"]) is not int:
                raise MalformedBundle("payload size must be an integer")
            record = doc.get("ledger_record")
            if record is not None and not isinstance(record, str):
                raise MalformedBundle("header ledger_record must be a record id")
            return cls(transfer=Transfer.from_json(doc["transfer"]),
                       payload_digest=str(payload["digest"]), payload_size=payload["size"],
                       ledger_record=record)
        except (KeyError, TypeError) as e:
            raise MalformedBundle(f"header is missing a field: {e}") from e
