"""The compliance officer's report: one self-contained HTML page about this site's ledger.

``write_report(home, out)`` checks the ledger (signatures, chain, digests against the
site's MLflow store) and writes one HTML file that needs nothing else: inline CSS, the
audit ROC plots as ``data:`` URIs, and a Content-Security-Policy that forbids any
fetch. Sections, top to bottom: the overall integrity verdict; the site's identity;
the trust store; transfers out (each with its audit verdict, ROC plot and any export
override) and in (with the sender's record it names); refusals; the differential-privacy
budget; every record.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from passerelle.errors import PasserelleError
from registry.store import ModelStore, VersionRef
from transfer.identity import public_identity
from transfer.ledger import Verification
from transfer.ledger_errors import LedgerBroken
from transfer.ledger_site import mlflow_digest_checker, open_ledger, own_keys
from transfer.records import Record, RecordKind
from transfer.trust import TrustEntry, TrustStore

ROC_ARTIFACT = "audit/roc.png"
MAX_IMAGE = 4 << 20  # a ROC plot is tens of kB; refuse to inline anything huge


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
    roc: dict[str, str] = field(default_factory=dict)  # "name/version" -> data: URI
    dp_curves: dict[int, str] = field(default_factory=dict)  # finetune record seq -> data: URI

    def of_kind(self, *kinds: RecordKind) -> list[Record]:
        return [r for r in self.records if r.kind in kinds]


# -- gathering ------------------------------------------------------------------------


def build_report(home: Path, url: str | None = None, store: ModelStore | None = None,
                 now: datetime | None = None) -> Report:
    """Everything the page shows, the ledger checked first."""
    me = public_identity(home)
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
    return Report(site=me.site, fingerprint=me.fingerprint, age_recipient=me.age_recipient,
                  generated=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
                  integrity=integrity, trust=tuple(TrustStore(home).entries()),
                  records=records, roc=_roc_plots(home, records, store),
                  dp_curves=_dp_curves(records))


def _dp_curves(records: Sequence[Record]) -> dict[int, str]:
    """For each fine-tuning run, epsilon over the steps (RDP, at the run's delta) with the
    claimed final epsilon (PLD), as PNG ``data:`` URIs."""
    curves = {}
    for r in records:
        if r.kind is not RecordKind.FINETUNE:
            continue
        try:
            q, z = float(r.fields["sampling_rate"]), float(r.fields["noise_multiplier"])
            steps, delta = int(r.fields["steps"]), float(r.fields["delta"])
            claimed = float(r.fields["epsilon"])
        except (KeyError, TypeError, ValueError):
            continue  # an older record without the figures: the table still shows it
        curves[r.seq] = _epsilon_curve_png(q, z, steps, delta, claimed)
    return curves


def _epsilon_curve_png(q: float, z: float, steps: int, delta: float, claimed: float) -> str:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adapters.dp import Accountant, dp_sgd_event, epsilon_of

    points = sorted({max(1, round(steps * i / 24)) for i in range(1, 25)})
    eps = [epsilon_of([dp_sgd_event(q, z, k)], delta, Accountant.RDP) for k in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    ax.plot(points, eps, marker=".", label="RDP accountant (upper bound)")
    ax.scatter([steps], [claimed], color="crimson", zorder=3,
               label=f"claimed at the end: {claimed:.4f} (PLD)")
    ax.set(xlabel="DP-SGD steps", ylabel=f"epsilon at delta = {delta:g}",
           title=f"Epsilon over steps (q = {q:.4g}, noise = {z:.4g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _roc_plots(home: Path, records: Sequence[Record],
               store: ModelStore | None) -> dict[str, str]:
    """The ROC plot of every audited version still in MLflow, as ``data:`` URIs."""
    refs = {f"{r.fields.get('model')}/{r.fields.get('version')}"
            for r in records if r.kind is RecordKind.AUDIT_VERDICT}
    plots: dict[str, str] = {}
    if not refs:
        return plots
    store = store or ModelStore(home)
    with tempfile.TemporaryDirectory(prefix=".report-", dir=home) as tmp:
        for i, text in enumerate(sorted(refs)):
            try:
                info = store.get(VersionRef.parse(text))
                png = store.download(info, ROC_ARTIFACT, Path(tmp) / str(i))
                data = png.read_bytes()
            except (PasserelleError, OSError, ValueError):
                continue  # the version or its plot is gone: the page says so
            if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) <= MAX_IMAGE:
                plots[text] = "data:image/png;base64," + base64.b64encode(data).decode()
    return plots


# -- rendering ------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1180px;color:#1d2733;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#57606a}
#verdict{padding:1em 1.2em;border-radius:8px;font-size:1.15em;margin:1em 0}
#verdict.ok{background:#dafbe1;border:2px solid #1a7f37}
#verdict.broken{background:#ffebe9;border:2px solid #cf222e}
table{border-collapse:collapse;width:100%;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f6f8fa}
code{font-size:.85em;word-break:break-all}
.transfer{border:1px solid #d0d7de;border-radius:8px;padding:.8em 1em;margin:1em 0}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
img.roc{max-width:520px;border:1px solid #d0d7de}
.flex{display:flex;gap:1.5em;flex-wrap:wrap}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _code(value: Any) -> str:
    return f"<code>{_e(value)}</code>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict_class(text: Any) -> str:
    return "pass" if str(text).startswith("PASS") else "fail"


def _dl(pairs: Iterable[tuple[str, str]]) -> str:
    return _table(("", ""), ((f"<b>{_e(k)}</b>", v) for k, v in pairs)).replace(
        "<thead><tr><th></th><th></th></tr></thead>", "")


def _integrity(report: Report) -> str:
    i = report.integrity
    state, word = ("ok", "VERIFIED") if i.ok else ("broken", "BROKEN")
    return (f'<section id="verdict" class="{state}"><b>Ledger integrity: {word}</b> '
            f"&mdash; {_e(i.summary)}.<br><span class='sub'>Checked: the signature of every "
            "record (this site's current and retired keys), the hash chain from the first "
            "record, and that the model and ONNX digests named still match the site's "
            "MLflow store where the versions still exist. Dropped newest records are "
            "detectable only against a checkpoint or a peer's export kept elsewhere "
            "(<code>passerelle records verify --checkpoint/--peer</code>).</span></section>")


def _identity(report: Report) -> str:
    return ('<section id="identity"><h2>Site identity</h2>' + _dl([
        ("site", _e(report.site)), ("signing key fingerprint", _code(report.fingerprint)),
        ("age recipient", _code(report.age_recipient)),
        ("records in the ledger", _e(len(report.records)))]) + "</section>")


def _trust(report: Report) -> str:
    rows = [(_e(t.identity.site), _code(t.identity.fingerprint), _e(t.status.value),
             _e(t.added), _e(t.changed or "")) for t in report.trust]
    body = _table(("site", "fingerprint", "status", "added", "changed"), rows) if rows else \
        "<p>No site is trusted.</p>"
    return f'<section id="trust"><h2>Trust store</h2>{body}</section>'


def _audit_evidence(report: Report, model: Any, version: Any) -> str:
    audits = [r for r in report.of_kind(RecordKind.AUDIT_VERDICT)
              if r.fields.get("model") == model and r.fields.get("version") == version]
    overrides = [r for r in report.of_kind(RecordKind.EXPORT_OVERRIDE)
                 if r.fields.get("model") == model and r.fields.get("version") == version]
    parts = []
    if audits:
        a = audits[-1]
        failed = ", ".join(a.fields.get("failed") or []) or "none"
        parts.append(_dl([
            ("audit verdict", f"<span class='{_verdict_class(a.fields.get('verdict'))}'>"
                              f"{_e(a.fields.get('verdict'))}</span> (record seq {a.seq})"),
            ("failed criteria", _e(failed)),
            ("policy", f"{_e(a.fields.get('policy'))} {_code(a.fields.get('policy_digest'))}"),
            ("audited ONNX", _code(a.fields.get("onnx_digest"))),
            ("audit report", _code(a.fields.get("report_digest")))]))
    else:
        parts.append("<p>No audit verdict recorded at this site for this version.</p>")
    for o in overrides:
        parts.append(_dl([
            ("export override by", f"<b>{_e(o.fields.get('approver'))}</b> (record seq "
                                   f"{o.seq}, {_e(o.time[:19])})"),
            ("justification", _e(o.fields.get("justification"))),
            ("verdict overridden", _e(o.fields.get("audit_verdict")))]))
    roc = report.roc.get(f"{model}/{version}")
    plot = (f'<img class="roc" alt="ROC curves of the membership-inference attacks on '
            f'{_e(model)}/{_e(version)}" src="{roc}">' if roc else
            "<p class='sub'>No ROC plot in this site's MLflow store for this version.</p>")
    return f"<div class='flex'><div>{''.join(parts)}</div><div>{plot}</div></div>"


def _transfers_out(report: Report) -> str:
    created = report.of_kind(RecordKind.BUNDLE_CREATED)
    items = []
    for r in created:
        f = r.fields
        items.append(
            f"<div class='transfer'><h3>{_e(f.get('model'))}/{_e(f.get('version'))} "
            f"&rarr; {_e(', '.join(f.get('to') or []))}</h3>" + _dl([
                ("record", f"seq {r.seq} {_code(r.id)} ({_e(r.time[:19])})"),
                ("sequence", _e(f.get("sequence"))),
                ("purpose", _e(f.get("purpose"))), ("legal basis", _e(f.get("legal_basis"))),
                ("verdict shipped", f"<span class='{_verdict_class(f.get('audit_verdict'))}'>"
                                    f"{_e(f.get('audit_verdict'))}</span>"),
                ("payload digest", _code(f.get("bundle"))),
                ("ONNX digest", _code(f.get("onnx_digest"))),
                ("signature and chain", "verified" if report.integrity.ok else
                 "see the integrity verdict above")])
            + _audit_evidence(report, f.get("model"), f.get("version")) + "</div>")
    body = "".join(items) or "<p>No bundle was created at this site.</p>"
    return f'<section id="transfers-out"><h2>Transfers out</h2>{body}</section>'


def _transfers_in(report: Report) -> str:
    items = []
    for r in report.of_kind(RecordKind.BUNDLE_RECEIVED):
        f = r.fields
        items.append(
            f"<div class='transfer'><h3>{_e(f.get('model'))}/{_e(f.get('version'))} from "
            f"{_e(f.get('from'))}</h3>" + _dl([
                ("record", f"seq {r.seq} {_code(r.id)} ({_e(r.time[:19])})"),
                ("sender's bundle_created record", _code(f.get("peer_record"))),
                ("sender key", _code(f.get("sender_fingerprint"))),
                ("registered here as", _e(f"{f.get('local_model')}/{f.get('local_version')}")),
                ("purpose", _e(f.get("purpose"))), ("legal basis", _e(f.get("legal_basis"))),
                ("sender's audit verdict",
                 f"<span class='{_verdict_class(f.get('audit_verdict'))}'>"
                 f"{_e(f.get('audit_verdict'))}</span> (the audit and its ROC plot are "
                 "evidence at the sending site, in its report)"),
                ("payload digest", _code(f.get("bundle"))),
                ("ONNX digest", _code(f.get("onnx_digest"))),
                ("bundle signatures", "outer header and OpenSSF model signature verified "
                                      "with the sender's pinned key before installation")])
            + "</div>")
    refused = [(f"seq {r.seq}", _e(r.time[:19]),
                _e(r.fields.get("from") or f"claimed {r.fields.get('claimed_from', '?')}"),
                _e(r.fields.get("check")), _e(r.fields.get("reason")))
               for r in report.of_kind(RecordKind.BUNDLE_REFUSED)]
    body = "".join(items) or "<p>No bundle was received at this site.</p>"
    body += "<h3>Refused bundles</h3>" + (
        _table(("record", "time", "from", "check", "reason"), refused) if refused else
        "<p>None.</p>")
    return f'<section id="transfers-in"><h2>Transfers in</h2>{body}</section>'


def _dp_budget(report: Report) -> str:
    runs = report.of_kind(RecordKind.FINETUNE)
    if not runs:
        body = "<p>No fine-tuning run recorded: no differential-privacy budget spent.</p>"
    else:
        body = _table(("record", "time", "model", "dataset", "epsilon", "delta"), [
            (f"seq {r.seq}", _e(r.time[:19]), _e(r.model), _code(r.fields.get("dataset")),
             _e(r.fields.get("epsilon")), _e(r.fields.get("delta"))) for r in runs])
        body += "".join(
            f'<figure class="dp-curve"><img alt="epsilon over steps, record seq {seq}" '
            f'src="{uri}"><figcaption>record seq {seq}</figcaption></figure>'
            for seq, uri in sorted(report.dp_curves.items()))
    return f'<section id="dp-budget"><h2>Differential-privacy budget</h2>{body}</section>'


def _records(report: Report) -> str:
    rows = [(_e(r.seq), _e(r.time[:19]), _e(r.kind.value),
             _e(f"{r.model}/{r.fields.get('version', '')}" if r.model else ""),
             _code(r.id[:23] + "…")) for r in report.records]
    return ('<section id="records"><h2>Every record</h2>'
            + _table(("seq", "time (UTC)", "kind", "model", "id"), rows) + "</section>")


def render_html(report: Report) -> str:
    """The page: UTF-8 HTML, no external resource (a CSP forbids any fetch)."""
    title = f"Passerelle — ledger report of {report.site}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='sub'>Generated {_e(report.generated)} from the "
        "site's signed ledger, trust store and MLflow store.</p>"
        + _integrity(report) + _identity(report) + _trust(report)
        + _transfers_out(report) + _transfers_in(report) + _dp_budget(report)
        + _records(report) + "</body></html>\n")


def write_report(home: Path, out: Path, url: str | None = None,
                 store: ModelStore | None = None, now: datetime | None = None) -> Report:
    """Build the report and write it to ``out`` atomically."""
    report = build_report(home, url, store, now)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(render_html(report).encode("utf-8"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return report
