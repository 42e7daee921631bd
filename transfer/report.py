"""The compliance officer's report: one self-contained page about this site's ledger.

``write_report(home, out, lang=...)`` checks the ledger (signatures, chain, digests
against the site's MLflow store) and writes one HTML file that needs nothing else
(inline CSS and script, images as ``data:`` URIs, a Content-Security-Policy that forbids
any fetch), or a PDF of it (``FILE.pdf``, printed by headless Chromium). The page is
signed by the site's key (:mod:`transfer.report_signature`).

Top to bottom: the integrity verdict; a summary, one line per question a data protection
officer asks (:data:`SUMMARY`: a table of record kinds -> line builder, so a kind added
later slots in with one entry; kinds no entry covers get a generic line); the site's
identity and trust store; transfers out, each with its evidence (the audit's figures,
ROC plot, policy, override) and links to its records; transfers in, with the sender's
audit as shipped; the DP runs and budget per dataset; every record, filterable and
expandable to its full signed statement; the report's digest and signature.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from registry.store import ModelStore
from transfer.evidence import (
    FINETUNE_DONE,
    FINETUNE_FAILED,
    FINETUNE_STARTED,
    AuditEvidence,
    DpRun,
    budgets,
    dp_runs,
    shipped_audits,
    source_audits,
)
from transfer.evidence_html import (
    audit_html,
    budget_table,
    curve_png,
    dp_table,
)
from transfer.evidence_html import (
    epsilon_curve_png as _epsilon_curve_png,
)
from transfer.i18n import Lang, down, numbers_in, parse_utc, text, up, up_significant, when
from transfer.identity import public_identity
from transfer.ledger import Verification, read_export, verify_records
from transfer.ledger_errors import LedgerBroken, PeerMismatch
from transfer.ledger_site import (
    mlflow_digest_checker,
    open_ledger,
    own_keys,
    peer_keys,
    site_signer,
)
from transfer.pdf import print_pdf
from transfer.records import Record
from transfer.report_html import (
    code,
    dl,
    e,
    model_of,
    page,
    rec_link,
    records_section,
    signature_section,
    table,
    verdict,
)
from transfer.report_signature import sidecar, sign_bytes, sign_page
from transfer.trust import Status, TrustEntry, TrustStore

__all__ = ["SUMMARY", "Report", "_epsilon_curve_png", "build_report", "render_html",
           "write_report"]

EXPIRY_WARNING_DAYS = 14


@dataclass(frozen=True)
class Integrity:
    """The verdict at the top: the chain verified (with digests), or where it broke."""

    ok: bool
    summary: str
    verification: Verification | None = None


@dataclass(frozen=True)
class Report:
    site: str
    fingerprint: str
    age_recipient: str
    generated: str
    integrity: Integrity
    trust: tuple[TrustEntry, ...]
    records: tuple[Record, ...]
    audits: Mapping[str, AuditEvidence] = field(default_factory=dict)  # "name/version"
    shipped: Mapping[str, AuditEvidence] = field(default_factory=dict)  # local name/version
    runs: tuple[DpRun, ...] = ()
    curves: Mapping[int, str] = field(default_factory=dict)  # run record seq -> data: URI
    arrivals: Mapping[str, Record] = field(default_factory=dict)  # our bundle_created id ->
    #   the peer's bundle_received/refused naming it, from the peers' verified exports
    peers: tuple[str, ...] = ()  # the sites whose exports were given

    def of_kind(self, *kinds: str) -> list[Record]:
        """Records whose kind's value is one of ``kinds`` (names of kinds, so that kinds
        other modules add are found without importing them)."""
        return [r for r in self.records if r.kind.value in kinds]

    def about(self, kind: str, model: Any, version: Any) -> list[Record]:
        return [r for r in self.of_kind(kind)
                if r.fields.get("model") == model and r.fields.get("version") == version]

    @property
    def now(self) -> datetime:
        return parse_utc(self.generated) or datetime.now(UTC)


# -- gathering ------------------------------------------------------------------------


def _arrivals(home: Path, site: str, exports: Sequence[Path]
              ) -> tuple[dict[str, Record], tuple[str, ...]]:
    """The peers' records of our bundles, from their exports (each chain verified with the
    peer's keys in this site's trust store, else refused)."""
    found: dict[str, Record] = {}
    peers = []
    for path in exports:
        theirs = read_export(path)
        peer = theirs[0].site
        try:
            verify_records(theirs, peer_keys(home, peer))
        except LedgerBroken as e:
            raise PeerMismatch((f"the export of site {peer} ({path}): {e}",)) from e
        peers.append(peer)
        for r in theirs:
            if r.kind.value in ("bundle_received", "bundle_refused") and \
                    r.fields.get("from") == site and isinstance(r.fields.get("peer_record"),
                                                                str):
                found.setdefault(str(r.fields["peer_record"]), r)
    return found, tuple(peers)


def build_report(home: Path, url: str | None = None, store: ModelStore | None = None,
                 now: datetime | None = None, peers: Sequence[Path] = ()) -> Report:
    """Everything the page shows, the ledger checked first; ``peers``: other sites'
    ``records export`` files, to show whether each bundle was received."""
    me = public_identity(home)
    arrivals, peer_sites = _arrivals(home, me.site, peers)
    with open_ledger(home, url) as ledger:
        try:
            result = ledger.verify(own_keys(home), mlflow_digest_checker(home, store))
            integrity = Integrity(True, f"{result.count} records: every signature, the "
                                  "chain and the digests still held in MLflow verify",
                                  result)
        except LedgerBroken as e:
            integrity = Integrity(False, str(e))
        try:
            records = tuple(ledger.records())
        except LedgerBroken:  # a record no longer parses: only the verdict can be shown
            records = ()
    runs = tuple(dp_runs(records))
    curves = {run.record.seq: uri for run in runs if (uri := curve_png(run)) is not None}
    return Report(site=me.site, fingerprint=me.fingerprint, age_recipient=me.age_recipient,
                  generated=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
                  integrity=integrity, trust=tuple(TrustStore(home).entries()),
                  records=records, audits=source_audits(home, records, store),
                  shipped=shipped_audits(home, records, store), runs=runs, curves=curves,
                  arrivals=arrivals, peers=peer_sites)


# -- the summary: one line per question, built from a table of kinds -------------------

Severity = Literal["ok", "warn", "bad", ""]
Answer = tuple[str, Severity]  # (HTML, severity)
Builder = Callable[[Report, Lang], Answer]


@dataclass(frozen=True)
class SummaryLine:
    """One question of the summary, the record kinds it answers from, its builder."""

    question: str  # a key of transfer.i18n.STRINGS
    kinds: tuple[str, ...]
    build: Builder


def _items(items: Sequence[str], lang: Lang) -> str:
    return "<br>".join(items) if items else e(text(lang, "none_recorded"))


def _integrity_line(report: Report, lang: Lang) -> Answer:
    i = report.integrity
    word = text(lang, "integrity_ok" if i.ok else "integrity_broken")
    return f"<b>{e(word)}</b> — {e(_integrity_summary(report, lang))}", "ok" if i.ok else "bad"


def receipt(report: Report, created: Record, lang: Lang) -> tuple[str, Severity]:
    """Whether the recipients recorded the bundle, by their verified exports."""
    arrival = report.arrivals.get(created.id)
    if arrival is not None:
        key = "receipt_yes" if arrival.kind.value == "bundle_received" else "receipt_refused"
        return e(text(lang, key, site=arrival.site, time=when(arrival.time), seq=arrival.seq,
                      check=arrival.fields.get("check"))), \
            "" if key == "receipt_yes" else "bad"
    missing = [s for s in created.fields.get("to") or [] if s in report.peers]
    if missing:
        return e(text(lang, "receipt_no", site=", ".join(missing))), "bad"
    return text(lang, "receipt_unknown"), ""


def _sent_line(report: Report, lang: Lang) -> Answer:
    items: list[str] = []
    severity: Severity = "ok"
    for r in report.of_kind("bundle_created"):
        f = r.fields
        line = e(text(lang, "sent_line", model=f"{f.get('model')}/{f.get('version')}",
                      to=", ".join(f.get("to") or []), verdict=f.get("audit_verdict")))
        line += f" ({rec_link(r)}, <a href='#transfer-{r.seq}'>{e(text(lang, 'evidence'))}"
        line += "</a>)"
        if report.peers:
            got, bad = receipt(report, r, lang)
            line += f"<br><span class='{bad}'>{got}</span>"
            severity = "bad" if bad else severity
        for o in report.about("export_override", f.get("model"), f.get("version")):
            severity = "bad"
            line += "<br><span class='bad'>" + e(text(
                lang, "override_line", verdict=o.fields.get("audit_verdict"),
                approver=o.fields.get("approver"),
                justification=o.fields.get("justification"))) + f"</span> ({rec_link(o)})"
        items.append(line)
    return _items(items, lang), severity if items else ""


def _received_line(report: Report, lang: Lang) -> Answer:
    items: list[str] = []
    severity: Severity = ""
    for r in report.of_kind("bundle_received"):
        line = e(text(lang, "received_line", model=f"{r.fields.get('model')}/"
                      f"{r.fields.get('version')}", sender=r.fields.get("from"),
                      local=f"{r.fields.get('local_model')}/{r.fields.get('local_version')}",
                      verdict=r.fields.get("audit_verdict"))) + f" ({rec_link(r)})"
        if not str(r.fields.get("audit_verdict")).startswith("PASS"):
            severity, line = "bad", f"<span class='bad'>{line}</span>"
        items.append(line)
    return _items(items, lang), severity


def _refused_line(report: Report, lang: Lang) -> Answer:
    refused = report.of_kind("bundle_refused")
    if not refused:
        return e(text(lang, "none_recorded")), "ok"
    reasons = ", ".join(f"{rec_link(r)} {e(r.fields.get('check'))}" for r in refused)
    return text(lang, "refused_line", n=len(refused), reasons=reasons), "warn"


def _budget_line(report: Report, lang: Lang) -> Answer:
    found = budgets(report.runs)
    if not found:
        return e(text(lang, "no_budget")), ""
    lines: list[str] = []
    severity: Severity = "ok"
    for b in found:
        if b.remaining is not None and b.cap and b.remaining < 0.1 * b.cap:
            severity = "warn"
        lines.append(e(text(lang, "budget_line", dataset=b.dataset[:19] + "…",
                            spent=up(b.spent), cap=f"{b.cap:g}" if b.cap else "?",
                            remaining=down(b.remaining), delta=up_significant(b.delta),
                            unit=b.unit, runs=b.runs)))
    return "<br>".join(lines), severity


def _finetune_problems_line(report: Report, lang: Lang) -> Answer:
    bad = [run for run in report.runs if run.outcome != "done"]
    if not bad:
        return e(text(lang, "none_recorded")), "ok" if report.runs else ""
    items = [f"{rec_link(run.record)} {e(model_of(run.record))}: "
             + e(text(lang, "run_failed" if run.outcome == "failed" else "run_interrupted"))
             for run in bad]
    return "<br>".join(items), "bad"


def _withdrawn_line(report: Report, lang: Lang) -> Answer:
    items = []
    for r in report.of_kind("model_withdrawn", "notice_received", "notice_refused"):
        f = r.fields
        withdrawn = [str(v) for v in f.get("withdrawn") or [] if isinstance(v, str)]
        parts = [rec_link(r), e(model_of(r))]
        if withdrawn:
            parts.append("(" + e(", ".join(withdrawn)) + ")")
        if f.get("to"):
            parts.append("→ " + e(", ".join(str(t) for t in f["to"])))
        if f.get("from") or f.get("claimed_from"):
            parts.append(e(text(lang, "from")) + " " + e(f.get("from") or f.get("claimed_from")))
        reason = f.get("reason") or f.get("check")
        items.append(" ".join(parts) + (f": “{e(reason)}”" if reason else ""))
    return _items(items, lang), "warn" if items else ""


def _expiring_line(report: Report, lang: Lang) -> Answer:
    items: list[str] = []
    severity: Severity = ""
    for r in report.of_kind("bundle_created"):
        expires = parse_utc(str(r.fields.get("expires") or ""))
        if expires is None:
            continue
        what = f"{model_of(r)} → {', '.join(r.fields.get('to') or [])}"
        days = (expires - report.now).total_seconds() / 86400
        if days >= 0:
            items.append(e(text(lang, "expires_in", what=what, when=when(expires.isoformat()),
                                days=int(days))) + f" ({rec_link(r)})")
            if days < EXPIRY_WARNING_DAYS:
                severity = "warn"
        else:
            items.append(e(text(lang, "expired_on", what=what, when=when(expires.isoformat())))
                         + f" ({rec_link(r)})")
    return _items(items, lang), severity


def _policy_line(report: Report, lang: Lang) -> Answer:
    items = [f"{rec_link(r)} {e(r.fields.get('setting'))}: {e(r.fields.get('old'))} → "
             f"{e(r.fields.get('new'))} ({e(r.fields.get('approver'))}: "
             f"“{e(r.fields.get('justification'))}”)"
             for r in report.of_kind("site_policy_changed")]
    return _items(items, lang), "warn" if items else ""


def _trust_line(report: Report, lang: Lang) -> Answer:
    trusted = sum(1 for t in report.trust if t.status is Status.TRUSTED)
    changes = report.of_kind("trust_added", "trust_revoked", "trust_rotated")
    sites = ", ".join(sorted({t.identity.site for t in report.trust
                              if t.status is Status.TRUSTED}))
    return (e(text(lang, "trust_line", trusted=trusted, changes=len(changes)))
            + (f" ({e(sites)})" if sites else "")), ""


SUMMARY: tuple[SummaryLine, ...] = (
    SummaryLine("q_integrity", (), _integrity_line),
    SummaryLine("q_sent", ("bundle_created", "export", "export_override", "model_registered",
                           "audit_verdict"), _sent_line),
    SummaryLine("q_received", ("bundle_received",), _received_line),
    SummaryLine("q_refused", ("bundle_refused",), _refused_line),
    SummaryLine("q_budget", FINETUNE_DONE, _budget_line),
    SummaryLine("q_finetune_problems", (FINETUNE_STARTED, FINETUNE_FAILED),
                _finetune_problems_line),
    SummaryLine("q_withdrawn", ("model_withdrawn", "notice_received", "notice_refused"),
                _withdrawn_line),
    SummaryLine("q_expiring", (), _expiring_line),
    SummaryLine("q_policy", ("site_policy_changed",), _policy_line),
    SummaryLine("q_trust", ("trust_added", "trust_revoked", "trust_rotated"), _trust_line),
)
"""The summary's questions, in order. A new record kind gets its line by one entry here."""


def _other_line(report: Report, lang: Lang) -> Answer | None:
    """Kinds no summary line speaks of: counted, so nothing recorded goes unmentioned."""
    covered = {k for line in SUMMARY for k in line.kinds}
    counts: dict[str, list[Record]] = {}
    for r in report.records:
        if r.kind.value not in covered:
            counts.setdefault(r.kind.value, []).append(r)
    if not counts:
        return None
    return "<br>".join(
        e(text(lang, "count_of_kind", n=len(found), kind=kind)) + " ("
        + ", ".join(rec_link(r) for r in found[:10]) + ("…" if len(found) > 10 else "") + ")"
        for kind, found in sorted(counts.items())), ""


def _summary(report: Report, lang: Lang) -> str:
    rows, classes = [], []
    answers = [(line.question, line.build(report, lang)) for line in SUMMARY]
    other = _other_line(report, lang)
    if other is not None:
        answers.append(("q_other", other))
    for question, (answer, severity) in answers:
        rows.append([f"<b>{e(text(lang, question))}</b>", answer])
        classes.append({"bad": "bad", "warn": "warn"}.get(severity, ""))
    return (f'<section id="summary"><h2>{e(text(lang, "summary"))}</h2>'
            + table([text(lang, "question"), text(lang, "answer")], rows, classes)
            + "</section>")


# -- sections ---------------------------------------------------------------------------


def _integrity_summary(report: Report, lang: Lang) -> str:
    i = report.integrity
    if i.ok and i.verification is not None:
        return text(lang, "integrity_count", n=i.verification.count)
    return i.summary


def _integrity(report: Report, lang: Lang) -> str:
    i = report.integrity
    state = "ok" if i.ok else "broken"
    word = text(lang, "integrity_ok" if i.ok else "integrity_broken")
    return (f'<section id="verdict" class="{state}"><b>{e(word)}</b> &mdash; '
            f"{e(_integrity_summary(report, lang))}.<br><span class='sub'>"
            f"{text(lang, 'integrity_detail')}</span></section>")


def _identity(report: Report, lang: Lang) -> str:
    return (f'<section id="identity"><h2>{e(text(lang, "identity"))}</h2>' + dl([
        (text(lang, "site"), e(report.site)),
        (text(lang, "fingerprint"), code(report.fingerprint)),
        (text(lang, "age_recipient"), code(report.age_recipient)),
        (text(lang, "record_count"), e(len(report.records)))]) + "</section>")


def _trust(report: Report, lang: Lang) -> str:
    rows = [(e(t.identity.site), code(t.identity.fingerprint), e(t.status.value),
             e(when(t.added)), e(when(t.changed) if t.changed else "")) for t in report.trust]
    body = table((text(lang, "site"), text(lang, "fingerprint"), text(lang, "status"),
                  text(lang, "added"), text(lang, "changed")), rows) if rows else \
        f"<p>{e(text(lang, 'no_trust'))}</p>"
    return f'<section id="trust"><h2>{e(text(lang, "trust"))}</h2>{body}</section>'


def _links(report: Report, model: Any, version: Any) -> str:
    found = [r for kind in ("model_registered", "audit_verdict", "export", "export_override")
             for r in report.about(kind, model, version)]
    return " · ".join(rec_link(r) for r in found)


def _transfers_out(report: Report, lang: Lang) -> str:
    items = []
    for r in report.of_kind("bundle_created"):
        f = r.fields
        model, version = f.get("model"), f.get("version")
        items.append(
            f"<div class='transfer' id='transfer-{r.seq}'><h3>{e(model)}/{e(version)} "
            f"&rarr; {e(', '.join(f.get('to') or []))}</h3>" + dl([
                (text(lang, "record"), f"{rec_link(r)} {code(r.id)} ({e(when(r.time))})"),
                (text(lang, "links"), _links(report, model, version)),
                (text(lang, "sequence"), e(f.get("sequence"))),
                (text(lang, "purpose"), e(f.get("purpose"))),
                (text(lang, "legal_basis"), e(f.get("legal_basis"))),
                (text(lang, "verdict_shipped"), verdict(f.get("audit_verdict"))),
                (text(lang, "validity"), e(text(lang, "validity_value",
                                                created=when(str(f.get("created"))),
                                                expires=when(str(f.get("expires")))))),
                (text(lang, "receipt"), "<span class='{1}'>{0}</span>".format(
                    *receipt(report, r, lang))),
                (text(lang, "payload_digest"), code(f.get("bundle"))),
                (text(lang, "onnx_digest"), code(f.get("onnx_digest"))),
                (text(lang, "signature_chain"), e(text(
                    lang, "verified" if report.integrity.ok else "see_verdict")))])
            + audit_html(report.audits.get(f"{model}/{version}"), lang,
                         report.about("export_override", model, version)) + "</div>")
    body = "".join(items) or f"<p>{e(text(lang, 'no_out'))}</p>"
    return f'<section id="transfers-out"><h2>{e(text(lang, "transfers_out"))}</h2>{body}</section>'


def _transfers_in(report: Report, lang: Lang) -> str:
    items = []
    for r in report.of_kind("bundle_received"):
        f = r.fields
        local = f"{f.get('local_model')}/{f.get('local_version')}"
        tuned = [run for run in report.runs if run.fields.get("model") == f.get("local_model")
                 and run.fields.get("source_version") == f.get("local_version")]
        items.append(
            f"<div class='transfer' id='transfer-{r.seq}'><h3>{e(f.get('model'))}/"
            f"{e(f.get('version'))} {e(text(lang, 'from'))} {e(f.get('from'))}</h3>" + dl([
                (text(lang, "record"), f"{rec_link(r)} {code(r.id)} ({e(when(r.time))})"),
                (text(lang, "sender_record"), code(f.get("peer_record"))),
                (text(lang, "sender_key"), code(f.get("sender_fingerprint"))),
                (text(lang, "registered_as"), e(local)),
                (text(lang, "purpose"), e(f.get("purpose"))),
                (text(lang, "legal_basis"), e(f.get("legal_basis"))),
                (text(lang, "controller"), e(report.site)),
                (text(lang, "sender_verdict"), verdict(f.get("audit_verdict"))),
                (text(lang, "payload_digest"), code(f.get("bundle"))),
                (text(lang, "onnx_digest"), code(f.get("onnx_digest"))),
                (text(lang, "bundle_signatures"), e(text(lang, "bundle_signatures_ok"))),
                (text(lang, "links"), " · ".join(rec_link(run.record) for run in tuned))])
            + (audit_html(report.shipped[local], lang) if local in report.shipped else "")
            + "</div>")
    refused = [(rec_link(r), e(when(r.time)),
                e(r.fields.get("from") or f"claimed {r.fields.get('claimed_from', '?')}"),
                e(r.fields.get("check")), e(r.fields.get("reason")))
               for r in report.of_kind("bundle_refused")]
    body = "".join(items) or f"<p>{e(text(lang, 'no_in'))}</p>"
    body += f"<h3>{e(text(lang, 'refused'))}</h3>" + (
        table([text(lang, k) for k in ("record", "time", "from", "check", "reason")], refused)
        if refused else f"<p>{e(text(lang, 'none'))}</p>")
    return f'<section id="transfers-in"><h2>{e(text(lang, "transfers_in"))}</h2>{body}</section>'


def _dp_budget(report: Report, lang: Lang) -> str:
    if not report.runs:
        body = f"<p>{e(text(lang, 'no_budget'))}.</p>"
    else:
        body = (f"<h3>{e(text(lang, 'budget_per_dataset'))}</h3>"
                + budget_table(budgets(report.runs), lang)
                + f"<h3>{e(text(lang, 'dp_runs'))}</h3>" + dp_table(report.runs, lang)
                + f"<p class='sub'>{e(text(lang, 'dp_rounding'))}</p>")
        body += "".join(
            f'<figure class="dp-curve"><img class="curve" alt="epsilon over steps, record '
            f'{seq}" src="{uri}"><figcaption>{e(text(lang, "record"))} #{seq}</figcaption>'
            "</figure>" for seq, uri in sorted(report.curves.items()))
    return f'<section id="dp-budget"><h2>{e(text(lang, "dp_budget"))}</h2>{body}</section>'


def render_html(report: Report, lang: Lang = "en") -> str:
    """The page, unsigned: UTF-8 HTML, no external resource (a CSP forbids any fetch)."""
    title = text(lang, "site_title", site=report.site)
    with numbers_in(lang):
        body = (f"<h1>{e(title)}</h1><p class='sub'>"
                f"{e(text(lang, 'generated', time=when(report.generated)))}</p>"
                + _integrity(report, lang) + _summary(report, lang) + _identity(report, lang)
                + _trust(report, lang) + _transfers_out(report, lang)
                + _transfers_in(report, lang) + _dp_budget(report, lang)
                + records_section(report.records, lang))
    return page(lang, title, body)


def predicate_of(report: Report, lang: Lang, scope: str) -> dict[str, Any]:
    """What the report's signed statement says about it."""
    head = report.records[-1] if report.records else None
    return {"site": report.site, "scope": scope, "lang": lang, "generated": report.generated,
            "records": len(report.records), "ledger_head": None if head is None else head.id,
            "ledger_verified": report.integrity.ok}


# -- writing --------------------------------------------------------------------------


def _write_atomically(out: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(home: Path, out: Path, unsigned: str, predicate: Mapping[str, Any],
            lang: Lang, site: str) -> None:
    """Sign the page with the site's key and write it to ``out`` (HTML), or print it to a
    PDF with its envelope beside it (``FILE.pdf.dsse.json``); atomically, nothing partial
    left on failure."""
    signer = site_signer(home)
    signed = sign_page(unsigned, signer, predicate, signature_section(lang, site))
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() != ".pdf":
        _write_atomically(out, signed.encode("utf-8"))
        return
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.absolute().parent) as tmp:
        html_file, pdf_file = Path(tmp) / "page.html", Path(tmp) / "page.pdf"
        html_file.write_text(signed, encoding="utf-8")
        print_pdf(html_file, pdf_file)
        data = pdf_file.read_bytes()
        envelope = sign_bytes(data, signer, {**predicate, "format": "pdf"})
        _write_atomically(sidecar(out), (envelope + "\n").encode())
        try:
            _write_atomically(out, data)
        except BaseException:
            sidecar(out).unlink(missing_ok=True)
            raise


def write_report(home: Path, out: Path, url: str | None = None,
                 store: ModelStore | None = None, now: datetime | None = None,
                 lang: Lang = "en", peers: Sequence[Path] = ()) -> Report:
    """Build the site's report and write it, signed, to ``out`` (.html or .pdf)."""
    report = build_report(home, url, store, now, peers)
    publish(home, out, render_html(report, lang), predicate_of(report, lang, "site"), lang,
            report.site)
    return report

