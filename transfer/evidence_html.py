"""The evidence as HTML, shared by the site report and the model dossier: the audit's
table per attack with the policy's limits, canary exposure, the redacted identifier scan,
the policy and whether it was the site's pinned one; the DP runs and budgets.

Privacy figures are rounded against the user (:func:`transfer.i18n.up` / ``down``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from transfer.evidence import AuditEvidence, Budget, DpRun
from transfer.i18n import STRINGS, Lang, down, text, up, up_significant, when
from transfer.records import Record
from transfer.report_html import code, dl, e, rec_link, table, verdict

ATTACKS = ("loss-threshold", "lira-online", "lira-offline", "rmia-offline")
_LIMITS = (("auc", "max_auc"), ("tpr_at_0.1%_fpr", "max_tpr_at_0_1pct_fpr"),
           ("tpr_at_1%_fpr", "max_tpr_at_1pct_fpr"),
           ("epsilon_lower_bound", "max_epsilon_lower_bound"))


def _dict(doc: Any, key: str) -> dict[str, Any]:
    value = doc.get(key) if isinstance(doc, dict | Mapping) else None
    return value if isinstance(value, dict) else {}


def _list(doc: Any, key: str) -> list[Any]:
    value = doc.get(key) if isinstance(doc, dict | Mapping) else None
    return value if isinstance(value, list) else []


def _num(cell: str) -> str:
    return f"<span class='num'>{cell}</span>"


def _criteria(doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    found = doc.get("criteria")
    if not isinstance(found, list):
        return {}
    return {str(c.get("name")): c for c in found if isinstance(c, dict)}


def attack_table(doc: Mapping[str, Any], lang: Lang) -> str:
    """Per attack: AUC, TPR at 0.1 % and 1 % FPR, the epsilon bounds and sample sizes; the
    policy's limit under each figure; rows of attacks that broke a limit in red."""
    attacks = doc.get("attacks")
    if not isinstance(attacks, dict):
        return ""
    criteria = _criteria(doc)
    rows, classes = [], []
    for name in [*[a for a in ATTACKS if a in attacks], *sorted(set(attacks) - set(ATTACKS))]:
        m = attacks[name] if isinstance(attacks[name], dict) else {}
        tpr, eps = _dict(m, "tpr_at_fpr"), _dict(m, "epsilon_lower_bound")
        failed = any(not criteria.get(f"{name}.{label}", {}).get("passed", True)
                     for label, _ in _LIMITS)
        rows.append([e(name), _num(up(m.get("auc"))), _num(up(tpr.get("0.001"))),
                     _num(up(tpr.get("0.01"))), _num(up(eps.get("epsilon_lower"))),
                     _num(down(eps.get("epsilon_max_detectable"))), _num(e(m.get("members"))),
                     _num(e(m.get("nonmembers")))])
        classes.append("bad" if failed else "")
    limits = {label: criteria.get(f"{ATTACKS[0]}.{label}", {}).get("limit")
              for label, _ in _LIMITS}
    if any(v is not None for v in limits.values()):
        rows.append([f"<i>{e(text(lang, 'limit'))}</i>", *[
            _num("≤ " + e(limits[label])) if limits[label] is not None else ""
            for label, _ in _LIMITS], "", "", ""])
        classes.append("")
    return table([text(lang, k) for k in ("attack", "auc", "tpr_01", "tpr_1", "eps_lower",
                                          "eps_max", "members", "nonmembers")], rows, classes)


def canary_html(doc: Mapping[str, Any], lang: Lang) -> str:
    canaries = _list(doc, "canaries")
    if not canaries:
        return e(text(lang, "no_canaries", held=doc.get("canaries_held_out", 0)))
    worst = _criteria(doc).get("canaries.max_exposure_bits", {})
    items = [text(lang, "canary_row", i=i + 1, bits=up(c.get("exposure_bits"), 2),
                  max=down(c.get("max_bits"), 2))
             for i, c in enumerate(canaries) if isinstance(c, dict)]
    limit = f" ({e(text(lang, 'limit'))} ≤ {e(worst.get('limit'))})" if worst else ""
    return "<br>".join(e(i) for i in items) + limit


def scan_html(doc: Mapping[str, Any], lang: Lang) -> str:
    scan = _dict(doc, "scan")
    findings, scanned = _list(scan, "findings"), _dict(scan, "scanned")
    if not findings:
        return e(text(lang, "scan_clean", files=len(scanned)))
    rows = [[e(f.get("kind")), code(f.get("file")), e(f.get("where")), code(f.get("redacted"))]
            for f in findings[:50] if isinstance(f, dict)]
    counts = _dict(scan, "counts")
    head = ", ".join(f"{e(k)}: {e(v)}" for k, v in sorted(counts.items()))
    return f"<p>{head}</p>" + table([text(lang, "finding"), "file", text(lang, "where"),
                                     text(lang, "redacted")], rows)


def policy_html(ev: AuditEvidence, lang: Lang) -> str:
    doc = ev.doc or {}
    policy = _dict(doc, "policy")
    name = (ev.record.fields.get("policy") if ev.record is not None else None) or \
        policy.get("name")
    out = f"{e(name)} {code(ev.policy_digest)}"
    pinned = ev.under_pinned_policy
    if pinned is True:
        out += f" — <span class='good'>{e(text(lang, 'policy_pinned'))}</span>"
    elif pinned is False:
        out += (" — <span class='bad'>" + e(text(lang, "policy_not_pinned",
                                                 pinned=ev.pinned_digest)) + "</span>")
    return out


def audit_html(ev: AuditEvidence | None, lang: Lang,
               overrides: Sequence[Record] = ()) -> str:
    """Everything about one version's audit, with its ROC plot beside it."""
    if ev is None:
        return f"<p>{e(text(lang, 'no_audit'))}</p>" + _overrides(overrides, lang)
    doc = ev.doc or {}
    pairs: list[tuple[str, str]] = []
    if ev.record is not None:
        f = ev.record.fields
        failed = ", ".join(f.get("failed") or []) or text(lang, "none")
        pairs += [(text(lang, "audit_verdict"), f"{verdict(f.get('verdict'))} "
                   f"({rec_link(ev.record)}, {e(when(ev.record.time))})"),
                  (text(lang, "failed_criteria"), e(failed))]
    else:
        pairs.append((text(lang, "audit_verdict"), verdict(doc.get("verdict"))))
    pairs.append((text(lang, "policy"), policy_html(ev, lang)))
    if ev.record is not None:
        pairs += [(text(lang, "audited_onnx"), code(ev.record.fields.get("onnx_digest"))),
                  (text(lang, "audit_report"), code(ev.record.fields.get("report_digest")))]
    status_class = {"matches": "good", "shipped": "good"}.get(ev.status, "bad")
    pairs.append((text(lang, "evidence"), f"<span class='{status_class}'>"
                  f"{e(text(lang, 'report_' + ev.status))}</span>"))
    if ev.doc is not None:
        unit = str(doc.get("privacy_unit", "patient"))
        pairs += [(text(lang, "membership_question"), e(doc.get("membership_question"))),
                  (text(lang, "reference_models"), e(doc.get("reference_models"))),
                  (text(lang, "recipe"), e(recipe_text(doc, lang, unit))),
                  *_fit_shift(doc, lang),
                  (text(lang, "canaries"), canary_html(doc, lang)),
                  (text(lang, "scan"), scan_html(doc, lang))]
    body = dl(pairs)
    if ev.doc is not None:
        body += attack_table(doc, lang) + f"<p class='sub'>{e(text(lang, 'epsilon_note'))}</p>"
    body += _overrides(overrides, lang)
    plot = (f'<img class="roc" alt="ROC {e(ev.ref)}" src="{ev.roc}">' if ev.roc else
            f"<p class='sub'>{e(text(lang, 'roc_missing'))}</p>" if ev.record else "")
    return f"<div class='flex'><div>{body}</div><div>{plot}</div></div>"


def _fit_shift(doc: Mapping[str, Any], lang: Lang) -> list[tuple[str, str]]:
    """The check that the reference models fit like the target (reports from before it
    existed: nothing)."""
    shift = doc.get("reference_fit_shift")
    if not isinstance(shift, Mapping):
        return []
    crit = _criteria(doc)
    limit = crit.get("recipe.members_fit_shift", {}).get("limit")
    if not isinstance(limit, int | float):
        return []
    failed = any(not crit.get(f"recipe.{side}_fit_shift", {}).get("passed", True)
                 for side in ("members", "nonmembers"))
    try:
        value = text(lang, "fit_shift_value", members=_signed(float(shift["members"])),
                     nonmembers=_signed(float(shift["nonmembers"])), limit=up(float(limit), 2))
    except (KeyError, TypeError, ValueError):
        return []
    return [(text(lang, "fit_shift"),
             f"<span class='{'bad' if failed else 'good'}'>{e(value)}</span>")]


def _signed(value: float) -> str:
    """A shift with its sign, its size rounded away from 0 (never shown nearer 0)."""
    return ("+" if value >= 0 else "−") + up(abs(value), 2)


def recipe_text(doc: Mapping[str, Any], lang: Lang, unit: str) -> str:
    """Which recipe trained the reference models, as the audit recorded it (an audit
    from before recipes were recorded: the generic wording)."""
    recipe = doc.get("recipe")
    if not isinstance(recipe, Mapping) or "kind" not in recipe:
        return text(lang, "recipe_value", unit=unit)
    kind = str(recipe["kind"])
    label = text(lang, f"recipe_kind_{kind}") if f"recipe_kind_{kind}" in STRINGS else kind
    return text(lang, "recipe_named", kind=label, name=recipe.get("name", "?"),
                digest=str(recipe.get("digest", ""))[:19], unit=unit)


def _overrides(overrides: Sequence[Record], lang: Lang) -> str:
    return "".join(dl([
        (text(lang, "override_by"), f"<b class='bad'>{e(o.fields.get('approver'))}</b> "
                                    f"({rec_link(o)}, {e(when(o.time))})"),
        (text(lang, "justification"), e(o.fields.get("justification"))),
        (text(lang, "verdict_overridden"), verdict(o.fields.get("audit_verdict")))])
        for o in overrides)


def dp_table(runs: Sequence[DpRun], lang: Lang) -> str:
    """Every run: epsilon by PLD (the claim) and RDP, delta, unit, noise, q, steps,
    accuracy before and after, outcome; failed and interrupted runs in red."""
    rows, classes = [], []
    for run in runs:
        f = run.fields
        model = f"{f.get('model')}/{f.get('version')}" if f.get("version") else \
            str(f.get("model") or "")
        source = f" ← {f.get('model')}/{f.get('source_version')}" if f.get("source_version") \
            else ""
        outcome = {"done": text(lang, "run_done"), "failed": text(lang, "run_failed"),
                   "interrupted": text(lang, "run_interrupted")}[run.outcome]
        acc = (f"{down(f.get('accuracy_before'), 4)} → {down(f.get('accuracy_after'), 4)}"
               if f.get("accuracy_after") is not None else "—")
        rows.append([rec_link(run.record), e(when(run.record.time)), e(model + source),
                     code(str(f.get("dataset") or "")[:19]),
                     _num(up(f.get("epsilon"))), _num(up(f.get("epsilon_rdp"))),
                     _num(up_significant(f.get("delta"))), e(f.get("privacy_unit")),
                     _num(down(f.get("noise_multiplier"), 4)),
                     _num(up_significant(f.get("sampling_rate"), 4)), _num(e(f.get("steps"))),
                     e(acc), e(outcome) + (f"<br>{e(f.get('reason'))}" if f.get("reason")
                                           else "")])
        classes.append("" if run.outcome == "done" else "bad")
    return table([text(lang, k) for k in ("record", "time", "model", "dataset", "eps_pld",
                                          "eps_rdp", "delta", "unit", "noise", "q", "steps",
                                          "accuracy", "outcome")], rows, classes)


def budget_table(found: Sequence[Budget], lang: Lang) -> str:
    rows = [[code(b.dataset[:19] + "…"), _num(up(b.spent)), _num(e(f"{b.cap:g}") if b.cap
                                                               is not None else "?"),
             _num(down(b.remaining)), _num(up_significant(b.delta)), e(b.unit), _num(e(b.runs))]
            for b in found]
    return table([text(lang, k) for k in ("dataset", "spent", "cap", "remaining", "delta",
                                          "unit", "runs")], rows)


def curve_png(run: DpRun) -> str | None:
    """Epsilon over the steps (RDP at the run's delta) with the claimed PLD epsilon at the
    end and the target as a line, as a PNG ``data:`` URI; None without the figures."""
    f = run.fields
    try:
        q, z = float(f["sampling_rate"]), float(f["noise_multiplier"])
        steps, delta, claimed = int(f["steps"]), float(f["delta"]), float(f["epsilon"])
    except (KeyError, TypeError, ValueError):
        return None
    target = f.get("target_epsilon")
    return epsilon_curve_png(q, z, steps, delta, claimed,
                             float(target) if isinstance(target, int | float) else None)


def epsilon_curve_png(q: float, z: float, steps: int, delta: float, claimed: float,
                      target: float | None = None) -> str:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adapters.dp import Accountant, dp_sgd_event, epsilon_of

    points = sorted({max(1, round(steps * i / 24)) for i in range(1, 25)})
    eps = [epsilon_of([dp_sgd_event(q, z, k)], delta, Accountant.RDP) for k in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    ax.plot(points, eps, marker=".", label="RDP accountant (upper bound, looser)")
    ax.scatter([steps], [claimed], color="crimson", zorder=3,
               label=f"claimed at the end: {up(claimed)} (PLD, tighter)")
    ax.axhline(target if target is not None else claimed, color="crimson", linestyle="--",
               linewidth=0.8, label="target epsilon" if target is not None else
               "claimed epsilon (PLD)")
    ax.set(xlabel="DP-SGD steps", ylabel=f"epsilon at delta = {delta:g}",
           title=f"Epsilon over steps (q = {q:.4g}, noise = {z:.4g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
