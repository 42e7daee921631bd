"""The model-status dossier (``passerelle report --model NAME/VERSION``): for one version,
what a provider documents under the CNIL's method for the status of an AI model under the
GDPR (July 2025) and the EDPB opinion 28/2024, in French or English, signed like the
site's report and printable to PDF.

Sections: (1) the model; (2) training data and legal basis; (3) the attacks run and their
results against the policy; (4) the identifier scan; (5) the measures taken (vocabulary
floor, identifier filter, export gate, signed and encrypted transfer, DP at this site);
(6) the conclusion, drawn from the verdict, with its limits (the largest epsilon the audit
could have detected, the attacks tried, the EDPB's case-by-case test); (7) the signed
records about the version. Every statement is drawn from the ledger (checked first) and
from MLflow artefacts whose digests the ledger names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from passerelle.errors import BadInput
from registry.store import TAG, ModelStore, VersionRef
from transfer.evidence import AuditEvidence, DpRun, vocabulary_config
from transfer.evidence_html import _dict, _list, audit_html, dp_table, scan_html
from transfer.i18n import Lang, down, numbers_in, text, up, up_significant, when
from transfer.records import Record
from transfer.report import Report, build_report, predicate_of, publish
from transfer.report_html import code, dl, e, page, rec_link, records_section, table, verdict


class UnknownVersion(BadInput):
    """The ledger of this site says nothing about that version."""


@dataclass(frozen=True)
class Dossier:
    ref: VersionRef
    report: Report
    records: tuple[Record, ...]  # about this version
    tags: Mapping[str, str]  # the version's MLflow tags ({} if it is gone)
    audit: AuditEvidence | None  # this site's audit, else the sender's as shipped
    overrides: tuple[Record, ...]
    runs: tuple[DpRun, ...]  # DP runs that made this version (or started from it)
    vocabulary: Mapping[str, Any]  # the vocabulary settings stored with the version


def _about(record: Record, ref: VersionRef) -> bool:
    f = record.fields
    return (f.get("model") == ref.name and f.get("version") == ref.version) or \
        (f.get("local_model") == ref.name and f.get("local_version") == ref.version) or \
        (f.get("model") == ref.name and f.get("source_version") == ref.version)


def build_dossier(home: Path, ref: VersionRef, url: str | None = None,
                  store: ModelStore | None = None, now: datetime | None = None) -> Dossier:
    """The ledger checked, the version's records and evidence gathered."""
    report = build_report(home, url, store, now)
    if not any(_about(r, ref) for r in report.records):
        raise UnknownVersion(f"no record about {ref} in the ledger of site {report.site}")
    try:
        tags: Mapping[str, str] = (store or ModelStore(home)).get(ref).tags
    except BadInput:
        tags = {}
    key = str(ref)
    source = tags.get(TAG + "finetuned_from")
    lineage = [ref]  # a fine-tuned version: its source's records tell where it came from
    if source:
        with contextlib.suppress(BadInput):
            lineage.append(VersionRef.parse(source))
    records = tuple(r for r in report.records if any(_about(r, v) for v in lineage))
    audit = report.audits.get(key) or report.shipped.get(key) or (
        report.shipped.get(source) if source else None)
    overrides = tuple(r for r in records if r.kind.value == "export_override")
    runs = tuple(run for run in report.runs if _about(run.record, ref))
    vocabulary = vocabulary_config(home, key, store)
    return Dossier(ref, report, records, tags, audit, overrides, runs, vocabulary)


def _first(records: Sequence[Record], kind: str) -> Record | None:
    return next((r for r in records if r.kind.value == kind), None)


def _model(d: Dossier, lang: Lang) -> str:
    t = d.tags
    lineage = []
    received = _first(d.records, "bundle_received")
    if received is not None:
        lineage.append(e(text(lang, "received_from", site=received.fields.get("from"),
                              version=received.fields.get("version"))) + " "
                       + rec_link(received))
    if t.get(TAG + "finetuned_from"):
        lineage.append(e(text(lang, "finetuned_from", source=t[TAG + "finetuned_from"])))
    return (f'<section id="d-model"><h2>{e(text(lang, "d_model"))}</h2>' + dl([
        (text(lang, "model"), f"<b>{e(d.ref)}</b>"),
        (text(lang, "site"), e(d.report.site)),
        (text(lang, "architecture"), e(t.get(TAG + "architecture", "—"))),
        (text(lang, "framework"), e(t.get(TAG + "framework", "ONNX"))),
        (text(lang, "onnx_digest"), code(t.get(TAG + "onnx_digest", "—"))),
        (text(lang, "lineage"), "<br>".join(lineage) or "—")]) + "</section>")


def _training(d: Dossier, lang: Lang) -> str:
    reg = _first(d.records, "model_registered")
    received = _first(d.records, "bundle_received")
    origin = reg or received
    f: Mapping[str, Any] = origin.fields if origin is not None else {}
    t = d.tags
    pairs = [
        (text(lang, "purpose"), e(f.get("purpose") or t.get(TAG + "purpose"))),
        (text(lang, "legal_basis"), e(f.get("legal_basis") or t.get(TAG + "legal_basis"))),
        (text(lang, "controller"), e(f.get("data_controller")
                                     or t.get(TAG + "data_controller") or d.report.site)),
        (text(lang, "training_site"), e(f.get("training_site") or f.get("from")
                                        or t.get(TAG + "training_site"))),
        (text(lang, "unit"), e(f.get("privacy_unit") or t.get(TAG + "privacy_unit"))),
        (text(lang, "dataset_fingerprint"), code(f.get("dataset_fingerprint") or (
            t.get(TAG + "dataset_fingerprint") if reg is not None else None) or "—")),
    ]
    tuned = [run for run in d.runs if run.fields.get("version") == d.ref.version]
    pairs += [(text(lang, "finetune_dataset"), code(run.fields.get("dataset")) + " "
               + rec_link(run.record)) for run in tuned]
    if reg is not None:
        pairs.append((text(lang, "record"), rec_link(reg)))
    return f'<section id="d-training"><h2>{e(text(lang, "d_training"))}</h2>{dl(pairs)}</section>'


def _attacks(d: Dossier, lang: Lang) -> str:
    body = audit_html(d.audit, lang, d.overrides)
    if d.audit is not None and d.audit.doc is not None:
        criteria = _list(d.audit.doc, "criteria")
        rows = [[e(c.get("name")), e(up(c.get("measured"))), "≤ " + e(c.get("limit")),
                 "<span class='pass'>" + e(text(lang, "yes")) + "</span>" if c.get("passed")
                 else "<span class='fail'>" + e(text(lang, "no")) + "</span>"]
                for c in criteria if isinstance(c, dict)]
        body += (f"<details><summary>{e(text(lang, 'criteria'))} ({len(rows)})</summary>"
                 + table([text(lang, k) for k in ("criteria", "measured", "limit",
                                                   "passed")], rows) + "</details>")
    return f'<section id="d-attacks"><h2>{e(text(lang, "d_attacks"))}</h2>{body}</section>'


def _scan(d: Dossier, lang: Lang) -> str:
    body = scan_html(d.audit.doc, lang) if d.audit is not None and d.audit.doc else \
        e(text(lang, "no_audit"))
    return f'<section id="d-scan"><h2>{e(text(lang, "d_scan"))}</h2><p>{body}</p></section>'


def _dp_sentence(run: DpRun, lang: Lang, key: str) -> str:
    f = run.fields
    return text(lang, key, eps=up(f.get("epsilon")), rdp=up(f.get("epsilon_rdp")),
                delta=up_significant(f.get("delta")), unit=f.get("privacy_unit"))


def _measures(d: Dossier, lang: Lang) -> list[str]:
    vocab = d.vocabulary
    items = []
    if "min_patients" in vocab:
        items.append(text(lang, "m_vocab", n=vocab["min_patients"],
                          filter=f"drop_identifiers = {vocab.get('drop_identifiers')}"))
    else:
        items.append(text(lang, "m_vocab_unknown"))
    items += [text(lang, "m_gate"), text(lang, "m_onnx")]
    done = [run for run in d.runs if run.outcome == "done"
            and run.fields.get("version") == d.ref.version]
    items += [_dp_sentence(run, lang, "m_dp") for run in done] or [text(lang, "m_no_dp")]
    return items


def _measures_section(d: Dossier, lang: Lang) -> str:
    items = "".join(f"<li>{e(i)}</li>" for i in _measures(d, lang))
    runs = dp_table(d.runs, lang) if d.runs else ""
    return (f'<section id="d-measures"><h2>{e(text(lang, "d_measures"))}</h2><ul>{items}</ul>'
            f"{runs}</section>")


def conclusion(d: Dossier, lang: Lang) -> list[str]:
    """The conclusion's sentences (plain text), drawn from the verdict and its limits."""
    if d.audit is None or d.audit.doc is None:
        out = [text(lang, "c_none")]
    else:
        doc = d.audit.doc
        policy = str(_dict(doc, "policy").get("name", "?"))
        failed = [str(c.get("name")) for c in _list(doc, "failed") if isinstance(c, dict)]
        if doc.get("verdict") == "PASS":
            out = [text(lang, "c_pass", policy=policy, attacks=len(doc.get("attacks") or {}))]
        else:
            out = [text(lang, "c_fail", policy=policy, failed=", ".join(failed) or "?")]
        for o in d.overrides:
            out.append(text(lang, "c_override", approver=o.fields.get("approver"),
                            justification=o.fields.get("justification")))
        attacks = _dict(doc, "attacks")
        ceiling = [float(a["epsilon_lower_bound"]["epsilon_max_detectable"])
                   for a in attacks.values() if isinstance(a, dict)
                   and isinstance(a.get("epsilon_lower_bound"), dict)
                   and isinstance(a["epsilon_lower_bound"].get("epsilon_max_detectable"),
                                  int | float)]
        out.append(text(lang, "c_limits", members=doc.get("members", "?"),
                        nonmembers=doc.get("nonmembers", "?"),
                        eps_max=down(max(ceiling)) if ceiling else "?"))
    done = [run for run in d.runs if run.outcome == "done"
            and run.fields.get("version") == d.ref.version]
    out += [_dp_sentence(run, lang, "c_dp") for run in done]
    return out


def render_dossier(d: Dossier, lang: Lang = "en") -> str:
    """The dossier page, unsigned, with numbers written the way ``lang`` writes them."""
    with numbers_in(lang):
        return _render_dossier(d, lang)


def _render_dossier(d: Dossier, lang: Lang) -> str:
    title = text(lang, "dossier_title", model=str(d.ref))
    verdict_line = ""
    if d.audit is not None and d.audit.doc is not None:
        verdict_line = f"<p>{text(lang, 'audit_verdict')}: {verdict(d.audit.doc.get('verdict'))}"
        verdict_line += "".join(f" — <span class='bad'>{e(text(lang, 'override_by'))} "
                                f"{e(o.fields.get('approver'))}</span>" for o in d.overrides)
        verdict_line += "</p>"
    integrity = text(lang, "integrity_ok" if d.report.integrity.ok else "integrity_broken")
    body = (
        f"<h1>{e(title)}</h1><p class='sub'>"
        + e(text(lang, "generated", time=when(d.report.generated)))
        + f"</p><section id='verdict' class='{'ok' if d.report.integrity.ok else 'broken'}'>"
        f"<b>{e(integrity)}</b>{verdict_line}</section>"
        f"<p>{e(text(lang, 'dossier_intro'))}</p>"
        + _model(d, lang) + _training(d, lang) + _attacks(d, lang) + _scan(d, lang)
        + _measures_section(d, lang)
        + f'<section id="d-conclusion"><h2>{e(text(lang, "d_conclusion"))}</h2>'
        + "".join(f"<p>{e(s)}</p>" for s in conclusion(d, lang)) + "</section>"
        + records_section(d.records, lang, "d-records", "d_records"))
    return page(lang, title, body)


def write_dossier(home: Path, ref: VersionRef, out: Path, lang: Lang = "en",
                  url: str | None = None, store: ModelStore | None = None,
                  now: datetime | None = None) -> Dossier:
    """Build the version's dossier and write it, signed, to ``out`` (.html or .pdf)."""
    d = build_dossier(home, ref, url, store, now)
    publish(home, out, render_dossier(d, lang),
            predicate_of(d.report, lang, f"model {ref}"), lang, d.report.site)
    return d

