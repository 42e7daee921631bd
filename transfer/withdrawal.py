"""Withdrawing a model version, here and at the sites it was sent to.

``passerelle model withdraw NAME/VERSION --reason TEXT`` marks the version and every
version of this site derived from it (fine-tuned from it, transitively) withdrawn: a
``model_withdrawn`` record names them all, then each gets the ``passerelle.withdrawn``
tags in MLflow. If this site sent the version (``bundle_created`` records), it also
writes a **withdrawal notice** (``--out FILE``) for the recipients.

A notice is in the bundle's format family: canonical JSON ``{"notice": {...},
"signature": base64 ECDSA P-256/SHA-256 over the canonical notice}``, signed with the
site's key, naming the sender and recipients (site and fingerprint), the model and
version, the bundles that carried it (payload digests), a sequence number (one more
than the last notice this site issued) and the reason. It holds no patient data and is
not encrypted.

``passerelle notice receive FILE`` at a recipient checks, in this order:

1. the file: at most 64 KiB of canonical JSON of that shape;
2. the sender's key is pinned in the trust store and not revoked;
3. the signature verifies with it;
4. this site is one of the recipients;
5. not dated in the future (5 minutes of clock skew);
6. not a replay: its sequence is above every notice accepted from that sender;

then it marks withdrawn every local version received from the sender as that model and
version (``bundle_received`` records) and every version derived from them, records
``notice_received`` (naming them) and sets the tags. A refused notice is recorded as
``notice_refused`` with the reason, and nothing is marked.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from passerelle.digests import canonical_json, sha256_bytes, sha256_file
from passerelle.errors import BadInput, Refused
from registry.store import TAG, ModelStore, VersionRef
from transfer.acts import Recorder, recorder, subject
from transfer.deploy import WITHDRAWN_TAG, finished, site_records, withdrawn_versions
from transfer.errors import Expired, NotAddressedToUs, Rollback
from transfer.identity import load_site, sign, verify
from transfer.records import Record, RecordKind
from transfer.statement import Party, parse_time
from transfer.trust import TrustStore

NOTICE_FORMAT = "passerelle-withdrawal-notice"
MAX_NOTICE = 64 * 1024
MAX_REASON = 500
CLOCK_SKEW = timedelta(minutes=5)


class MalformedNotice(Refused):
    """The file is not a well-formed Passerelle withdrawal notice."""


@dataclass(frozen=True)
class Notice:
    """What a signed withdrawal notice says."""

    sender: Party
    recipients: tuple[Party, ...]
    model: str
    version: str
    sequence: int
    created: str
    reason: str
    bundles: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.recipients:
            raise MalformedNotice("a notice needs at least one recipient")
        if type(self.sequence) is not int or self.sequence < 1:
            raise MalformedNotice("a notice's sequence must be a positive whole number")
        VersionRef.parse(f"{self.model}/{self.version}")
        parse_time(self.created, "created")
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON:
            raise MalformedNotice("a notice's reason must be a short text")

    def names(self, fingerprint: str) -> bool:
        return any(r.fingerprint == fingerprint for r in self.recipients)

    def to_json(self) -> dict[str, Any]:
        return {"format": NOTICE_FORMAT, "format_version": 1, "sender": self.sender.to_json(),
                "recipients": [r.to_json() for r in self.recipients], "model": self.model,
                "version": self.version, "sequence": self.sequence, "created": self.created,
                "reason": self.reason, "bundles": list(self.bundles)}

    @classmethod
    def from_json(cls, doc: Any) -> Notice:
        try:
            if not isinstance(doc, dict) or doc.get("format") != NOTICE_FORMAT or \
                    doc.get("format_version") != 1:
                raise MalformedNotice("not a withdrawal notice (format version 1)")
            if not isinstance(doc["recipients"], list) or not isinstance(doc["bundles"], list):
                raise MalformedNotice("recipients and bundles must be lists")
            return cls(sender=Party.from_json(doc["sender"]),
                       recipients=tuple(Party.from_json(r) for r in doc["recipients"]),
                       model=str(doc["model"]), version=str(doc["version"]),
                       sequence=doc["sequence"], created=str(doc["created"]),
                       reason=doc["reason"], bundles=tuple(str(b) for b in doc["bundles"]))
        except (KeyError, TypeError) as e:
            raise MalformedNotice(f"notice is missing a field: {e}") from e
        except BadInput as e:
            raise MalformedNotice(f"notice: {e}") from e
        except Refused as e:  # a malformed party (transfer.errors.MalformedBundle)
            raise MalformedNotice(f"notice: {e}") from e


@dataclass(frozen=True)
class Withdrawal:
    withdrawn: tuple[VersionRef, ...]
    notice: Path | None
    recipients: tuple[str, ...]
    record: str | None


# --------------------------------------------------------------------------- lineage


def derived_versions(store: ModelStore, records: Sequence[Record],
                     roots: Iterable[VersionRef]) -> list[VersionRef]:
    """``roots`` and every local version fine-tuned from them, transitively (from the
    ledger's ``finetune`` records and the versions' ``finetuned_from`` tags)."""
    children: dict[VersionRef, set[VersionRef]] = {}
    for r in records:
        if r.kind is RecordKind.FINETUNE and finished(r):
            f = r.fields
            if all(isinstance(f.get(k), str) for k in ("model", "version", "source_version")):
                children.setdefault(VersionRef(f["model"], f["source_version"]), set()).add(
                    VersionRef(f["model"], f["version"]))
    names = {r.name for r in roots} | {c.name for cs in children.values() for c in cs}
    for name in names:
        for version in store.versions(name):
            ref = VersionRef(name, version)
            parent = store.get(ref).tags.get(TAG + "finetuned_from")
            if parent:
                children.setdefault(VersionRef.parse(parent), set()).add(ref)
    out: list[VersionRef] = []
    todo = list(roots)
    while todo:
        ref = todo.pop(0)
        if ref not in out:
            out.append(ref)
            todo += sorted(children.get(ref, ()), key=lambda v: (v.name, int(v.version)))
    return out


def _mark(store: ModelStore, refs: Iterable[VersionRef], reason: str, when: str,
          by: str) -> None:
    for ref in refs:
        store.set_tags(store.get(ref), {WITHDRAWN_TAG: "true", TAG + "withdrawn.reason": reason,
                                        TAG + "withdrawn.time": when, TAG + "withdrawn.by": by})


def check_reason(reason: str) -> str:
    text = " ".join(reason.split())
    if not text or len(text) > MAX_REASON:
        raise BadInput(f"the reason must be a non-empty text of at most {MAX_REASON} "
                       "characters")
    return text


# --------------------------------------------------------------------------- withdraw


def withdraw_version(store: ModelStore, ref: VersionRef, reason: str, out: Path | None,
                     now: datetime | None = None) -> Withdrawal:
    """``model withdraw``: mark withdrawn here; a signed notice if the version was sent."""
    home = store.home
    reason = check_reason(reason)
    store.get(ref)  # unknown: exit 2
    identity = load_site(home)
    records = site_records(home)
    if ref in withdrawn_versions(records):
        raise BadInput(f"{ref} is already withdrawn")
    sent = [r for r in records if r.kind is RecordKind.BUNDLE_CREATED
            and r.fields.get("model") == ref.name and r.fields.get("version") == ref.version]
    recipients = {p["fingerprint"]: Party.from_json(p) for r in sent
                  for p in r.fields.get("recipients", [])}
    if recipients and out is None:
        sites = ", ".join(sorted(p.site for p in recipients.values()))
        raise BadInput(f"{ref} was sent to {sites}: name the withdrawal notice to write "
                       "with --out FILE")
    if out is not None:
        if not recipients:
            raise BadInput(f"{ref} was never sent from this site: no notice to write (drop --out)")
        if out.exists():
            raise BadInput(f"{out}: already exists")
        if not out.absolute().parent.is_dir():
            raise BadInput(f"{out.absolute().parent}: no such directory")
    when = (now or datetime.now(UTC)).replace(microsecond=0).isoformat()
    withdrawn = derived_versions(store, records, [ref])
    raw: bytes | None = None
    sequence = None
    if out is not None:
        sequence = 1 + max((int(r.fields.get("notice_sequence") or 0) for r in records
                            if r.kind is RecordKind.MODEL_WITHDRAWN), default=0)
        notice = Notice(sender=Party(identity.site, identity.fingerprint),
                        recipients=tuple(recipients[k] for k in sorted(recipients)),
                        model=ref.name, version=ref.version, sequence=sequence,
                        created=when, reason=reason,
                        bundles=tuple(sorted({str(r.fields.get("bundle")) for r in sent})))
        body = notice.to_json()
        raw = canonical_json({"notice": body,
                              "signature": sign(identity.signing_key, canonical_json(body))})
    with recorder(home, identity) as rec:
        record = rec.record(
            RecordKind.MODEL_WITHDRAWN,
            subject("notice", str(ref), None if raw is None else sha256_bytes(raw)),
            {"model": ref.name, "version": ref.version, "reason": reason,
             "withdrawn": [str(v) for v in withdrawn],
             "to": sorted(p.site for p in recipients.values()),
             "notice_digest": None if raw is None else sha256_bytes(raw),
             "notice_sequence": sequence})
        if out is not None and raw is not None:
            _write(out, raw)
        _mark(store, withdrawn, reason, when, identity.site)
    return Withdrawal(tuple(withdrawn), out, tuple(sorted(p.site for p in recipients.values())),
                      None if record is None else record.id)


def _write(out: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # meant to be sent to the recipients
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- receive


@dataclass(frozen=True)
class AppliedNotice:
    notice: Notice
    withdrawn: tuple[VersionRef, ...]
    digest: str


def read_notice(path: Path) -> tuple[Notice, dict[str, Any], str, bytes]:
    """(1) Parse a notice file: (notice, its JSON body, signature, raw bytes)."""
    try:
        if path.stat().st_size > MAX_NOTICE:
            raise MalformedNotice(f"{path.name}: larger than {MAX_NOTICE} bytes")
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise BadInput(f"{path}: no such file") from e
    except OSError as e:
        raise BadInput(f"{path}: cannot read: {e.strerror}") from e
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedNotice(f"{path.name}: not a JSON withdrawal notice") from e
    if not isinstance(doc, dict) or set(doc) != {"notice", "signature"} or \
            not isinstance(doc["signature"], str) or canonical_json(doc) != raw:
        raise MalformedNotice(f"{path.name}: not canonical {{notice, signature}}")
    try:
        base64.b64decode(doc["signature"], validate=True)
    except ValueError as e:
        raise MalformedNotice(f"{path.name}: the signature is not base64") from e
    return Notice.from_json(doc["notice"]), doc["notice"], doc["signature"], raw


def receive_notice(home: Path, path: Path, now: datetime | None = None,
                   store: ModelStore | None = None) -> AppliedNotice:
    """``notice receive``: steps 1-6 of the module docstring, then apply the withdrawal.

    The registry (``store``, default the home's) is opened only once the notice passed
    every check: a refused notice creates nothing in the home but its ledger record."""
    me = load_site(home)
    moment = now or datetime.now(UTC)
    with recorder(home, me) as rec:
        try:
            records = site_records(home)
            notice, body, signature, raw = read_notice(path)                    # (1)
            sender = TrustStore(home).sender(notice.sender.fingerprint,          # (2)
                                             notice.sender.site)
            verify(sender.public_key, canonical_json(body), signature,           # (3)
                   f"{path.name}: withdrawal notice")
            if not notice.names(me.fingerprint):                                # (4)
                raise NotAddressedToUs(f"{path.name} is addressed to "
                                       f"{', '.join(r.site for r in notice.recipients)}, "
                                       f"not to this site ({me.site})")
            if parse_time(notice.created, "created") > moment + CLOCK_SKEW:     # (5)
                raise Expired(f"{path.name} is dated in the future ({notice.created})")
            last = max((int(r.fields.get("sequence") or 0) for r in records      # (6)
                        if r.kind is RecordKind.NOTICE_RECEIVED
                        and r.fields.get("from") == notice.sender.site), default=0)
            if notice.sequence <= last:
                raise Rollback(f"{path.name}: notice sequence {notice.sequence} from "
                               f"{notice.sender.site} is not newer than the last accepted "
                               f"({last}): a replay")
        except Refused as e:
            _record_refused(rec, path, e)
            raise
        digest = sha256_bytes(raw)
        store = store or ModelStore(home)
        local = [VersionRef(str(r.fields["local_model"]), str(r.fields["local_version"]))
                 for r in records if r.kind is RecordKind.BUNDLE_RECEIVED
                 and r.fields.get("from") == notice.sender.site
                 and r.fields.get("model") == notice.model
                 and r.fields.get("version") == notice.version
                 and isinstance(r.fields.get("local_model"), str)]
        withdrawn = derived_versions(store, records, local)
        rec.record(RecordKind.NOTICE_RECEIVED,
                   subject("notice", f"{notice.sender.site}:{notice.model}/{notice.version}",
                           digest) + subject("key", notice.sender.site,
                                             notice.sender.fingerprint),
                   {"from": notice.sender.site, "model": notice.model,
                    "version": notice.version, "sequence": notice.sequence,
                    "reason": notice.reason, "notice": digest,
                    "sender_fingerprint": notice.sender.fingerprint,
                    "bundles": list(notice.bundles), "withdrawn": [str(v) for v in withdrawn]})
        _mark(store, withdrawn, notice.reason, moment.replace(microsecond=0).isoformat(),
              notice.sender.site)
    return AppliedNotice(notice, tuple(withdrawn), digest)


def _record_refused(rec: Recorder, path: Path, error: Refused) -> None:
    """``notice_refused`` with the reason and what the file claims (unauthenticated)."""
    fields: dict[str, Any] = {"reason": " ".join(str(error).split())[:2000],
                              "check": type(error).__name__}
    subjects = []
    try:
        digest = sha256_file(path)
        fields["notice_file"] = digest
        subjects += subject("notice", path.name, digest)
        doc = json.loads(path.read_bytes()[:MAX_NOTICE].decode("utf-8"))
        claimed = doc["notice"]
        fields.update(claimed_from=str(claimed["sender"]["site"])[:64],
                      claimed_model=str(claimed["model"])[:128],
                      claimed_version=str(claimed["version"])[:16])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    rec.record(RecordKind.NOTICE_REFUSED, subjects, fields)


__all__ = ["AppliedNotice", "MalformedNotice", "Notice", "Withdrawal", "derived_versions",
           "read_notice", "receive_notice", "withdraw_version"]
