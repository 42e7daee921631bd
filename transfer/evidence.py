"""The evidence behind the records, gathered for the report and the dossier.

The ledger says what was decided and names digests; the figures are in the MLflow store.
Each figure shown is tied to a signed record:

* at the source, the audit report (``audit/audit-report.json``) is shown only when its
  SHA-256 is the ``report_digest`` of the signed ``audit_verdict`` record, and the policy
  it was run under is compared with the policy the site had pinned at that moment (the
  ``site_policy_changed`` records before it, else the shipped default);
* at the receiving site, the sender's audit report travelled inside the signed bundle
  (``audit_report.json``, covered by the OpenSSF model signature checked at receipt);
* DP runs come from the ``finetune`` records themselves, with ``finetune_started``
  records (when the ledger has them: a run's start is recorded before it trains, its end
  names the start and its outcome) to show failed and interrupted runs.
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from passerelle.digests import sha256_bytes
from passerelle.errors import PasserelleError
from registry.store import ModelStore, VersionRef
from transfer.records import Record

ROC_ARTIFACT = "audit/roc.png"
REPORT_ARTIFACT = "audit/audit-report.json"
SHIPPED_REPORT_ARTIFACT = "onnx/audit_report.json"
MAX_IMAGE = 4 << 20  # a ROC plot is tens of kB; refuse to inline anything huge
MAX_REPORT = 8 << 20
PIN_SETTING = "audit.policy_sha256"

# Kinds by their value, so that kinds other branches add slot in by name.
AUDIT = "audit_verdict"
FINETUNE_DONE = ("finetune", "finetune_ended")
FINETUNE_STARTED = "finetune_started"
FINETUNE_FAILED = "finetune_failed"

Status = Literal["matches", "differs", "missing", "shipped"]
Outcome = Literal["done", "failed", "interrupted"]


@dataclass(frozen=True)
class AuditEvidence:
    """One version's audit: its record, its report (when it checked), its ROC plot."""

    ref: str
    record: Record | None  # the audit_verdict record (None at a receiving site)
    status: Status
    doc: Mapping[str, Any] | None = field(default=None, hash=False)
    roc: str | None = None  # data: URI
    pinned: str | None = None  # the digest the site pinned then ("" : the shipped default)
    default_digest: str | None = None

    @property
    def policy_digest(self) -> str | None:
        if self.record is not None:
            value = self.record.fields.get("policy_digest")
            return value if isinstance(value, str) else None
        policy = (self.doc or {}).get("policy")
        return str(policy.get("digest")) if isinstance(policy, dict) else None

    @property
    def pinned_digest(self) -> str | None:
        """The policy the site had pinned when the audit ran (the default if none)."""
        return self.pinned or self.default_digest

    @property
    def under_pinned_policy(self) -> bool | None:
        if self.record is None or self.pinned_digest is None:
            return None
        return self.policy_digest == self.pinned_digest


@dataclass(frozen=True)
class DpRun:
    """A fine-tuning run as the ledger tells it: its end record (or its start record when
    it never ended) and the start record, when the ledger has one."""

    record: Record
    outcome: Outcome
    started: Record | None = None

    @property
    def fields(self) -> Mapping[str, Any]:
        if self.started is None or self.started is self.record:
            return self.record.fields
        return {**self.started.fields, **self.record.fields}


@dataclass(frozen=True)
class Budget:
    """What one dataset has spent, as the newest run on it that states it says."""

    dataset: str
    spent: float | None
    cap: float | None
    delta: float  # the sum of the runs' deltas (the composed guarantee's delta)
    unit: str
    runs: int

    @property
    def remaining(self) -> float | None:
        if self.spent is None or self.cap is None:
            return None
        return max(0.0, self.cap - self.spent)


def _default_policy_digest() -> str | None:
    try:
        from registry.audit.policy import load_policy

        return load_policy().digest
    except PasserelleError:
        return None


def pinned_policy_at(records: Sequence[Record], seq: int) -> str:
    """The audit policy digest the site had pinned just before record ``seq`` ("" none)."""
    pinned = ""
    for r in records:
        if r.seq >= seq:
            break
        if r.kind.value == "site_policy_changed" and r.fields.get("setting") == PIN_SETTING:
            pinned = str(r.fields.get("new") or "")
    return pinned


def _download(store: ModelStore, ref: str, artifact: str, tmp: Path, limit: int) -> bytes | None:
    try:
        info = store.get(VersionRef.parse(ref))
        path = store.download(info, artifact, tmp)
        if not path.is_file() or path.stat().st_size > limit:
            return None
        return path.read_bytes()
    except (PasserelleError, OSError, ValueError):
        return None


def _png_uri(data: bytes | None) -> str | None:
    if data is None or not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) > MAX_IMAGE:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _json(data: bytes | None) -> dict[str, Any] | None:
    try:
        doc = json.loads(data) if data is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def source_audits(home: Path, records: Sequence[Record],
                  store: ModelStore | None) -> dict[str, AuditEvidence]:
    """The newest audit of every version audited here, its report checked against the
    digest in its signed record."""
    newest: dict[str, Record] = {}
    for r in records:
        if r.kind.value == AUDIT:
            newest[f"{r.fields.get('model')}/{r.fields.get('version')}"] = r
    if not newest:
        return {}
    store = store or ModelStore(home)
    default = _default_policy_digest()
    found: dict[str, AuditEvidence] = {}
    with tempfile.TemporaryDirectory(prefix=".report-", dir=home) as tmp:
        for i, (ref, record) in enumerate(sorted(newest.items())):
            data = _download(store, ref, REPORT_ARTIFACT, Path(tmp) / f"r{i}", MAX_REPORT)
            status: Status
            if data is None:
                status, doc = "missing", None
            elif sha256_bytes(data) != record.fields.get("report_digest"):
                status, doc = "differs", None
            else:
                status, doc = "matches", _json(data)
            roc = _png_uri(_download(store, ref, ROC_ARTIFACT, Path(tmp) / f"p{i}", MAX_IMAGE))
            found[ref] = AuditEvidence(ref, record, status, doc, roc,
                                       pinned_policy_at(records, record.seq), default)
    return found


def shipped_audits(home: Path, records: Sequence[Record],
                   store: ModelStore | None) -> dict[str, AuditEvidence]:
    """For every version received here: the sender's audit report shipped in the bundle
    (keyed by the local NAME/VERSION)."""
    local = [f"{r.fields.get('local_model')}/{r.fields.get('local_version')}"
             for r in records if r.kind.value == "bundle_received"]
    if not local:
        return {}
    store = store or ModelStore(home)
    found: dict[str, AuditEvidence] = {}
    with tempfile.TemporaryDirectory(prefix=".report-", dir=home) as tmp:
        for i, ref in enumerate(sorted(set(local))):
            doc = _json(_download(store, ref, SHIPPED_REPORT_ARTIFACT, Path(tmp) / str(i),
                                  MAX_REPORT))
            if doc is not None:
                found[ref] = AuditEvidence(ref, None, "shipped", doc)
    return found


_OUTCOMES: dict[str, Outcome] = {"finished": "done", "done": "done", "failed": "failed",
                                 "interrupted": "interrupted"}


def dp_runs(records: Sequence[Record]) -> list[DpRun]:
    """Completed runs, failed and interrupted ones, and runs that started and never ended
    (a process killed mid-run: shown as interrupted). An end record names its start
    (``started_record``); one without an ``outcome`` field is a completed run."""
    runs: list[DpRun] = []
    open_starts: dict[str, Record] = {}
    for r in records:
        kind = r.kind.value
        if kind == FINETUNE_STARTED:
            open_starts[r.id] = r
        elif kind in FINETUNE_DONE or kind == FINETUNE_FAILED:
            started = open_starts.pop(str(r.fields.get("started_record")), None)
            outcome = "failed" if kind == FINETUNE_FAILED else \
                _OUTCOMES.get(str(r.fields.get("outcome", "finished")), "failed")
            runs.append(DpRun(r, outcome, started))
    runs += [DpRun(r, "interrupted", r) for r in open_starts.values()]
    return sorted(runs, key=lambda run: (run.started or run.record).seq)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _decimal_sum(values: Iterable[float]) -> float:
    """The sum of decimal figures (deltas as the site gave them: 3 × 1e-5 is 3e-5, not
    3.0000000000000004e-05 as binary floats add up)."""
    return float(sum((Decimal(repr(v)) for v in values), Decimal(0)))


def budgets(runs: Sequence[DpRun]) -> list[Budget]:
    """Per dataset: spent and cap as the newest run that states them says, delta summed
    over every run that touched it (a failed or interrupted run may have spent too)."""
    by_dataset: dict[str, list[DpRun]] = {}
    for run in runs:
        dataset = run.fields.get("dataset")
        if isinstance(dataset, str):
            by_dataset.setdefault(dataset, []).append(run)
    out = []
    for dataset, touched in sorted(by_dataset.items()):
        stating = sorted((r for run in touched for r in (run.started, run.record)
                          if r is not None and _number(r.fields.get("budget_spent")) is not None),
                         key=lambda r: r.seq)
        last = stating[-1].fields if stating else touched[-1].fields
        delta = _number(last.get("budget_delta_sum"))
        out.append(Budget(
            dataset=dataset,
            spent=_number(last.get("budget_spent")),
            cap=_number(last.get("budget_cap")),
            delta=delta if delta is not None else _decimal_sum(
                _number(run.fields.get("delta")) or 0.0 for run in touched),
            unit=str(last.get("privacy_unit") or "?"), runs=len(touched)))
    return out


def vocabulary_config(home: Path, ref: str, store: ModelStore | None) -> dict[str, Any]:
    """The vocabulary settings stored with a version (min_patients, drop_identifiers...),
    from its ONNX directory, else its source model directory; {} if neither is there."""
    store = store or ModelStore(home)
    with tempfile.TemporaryDirectory(prefix=".report-", dir=home) as tmp:
        for i, artifact in enumerate(("onnx/vocabulary.json", "model/vocabulary.json")):
            doc = _json(_download(store, ref, artifact, Path(tmp) / str(i), 64 << 20))
            if doc is not None and isinstance(doc.get("config"), dict):
                return {k: v for k, v in doc["config"].items() if k != "sections"}
    return {}
