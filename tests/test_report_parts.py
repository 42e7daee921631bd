"""Parts of the report: its languages, rounding against the user, times, the pinned policy."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from transfer.i18n import LANGS, STRINGS, down, text, up, up_significant, when


def test_every_phrase_exists_in_french_and_english_with_the_same_fields() -> None:
    import string

    for key, phrases in STRINGS.items():
        assert set(phrases) == set(LANGS), key
        fields = [{f for _, f, _, _ in string.Formatter().parse(phrases[lang]) if f}
                  for lang in LANGS]
        assert fields[0] == fields[1], key
        assert phrases["fr"] != "" and phrases["en"] != ""


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_epsilon_is_never_shown_smaller_nor_remaining_budget_larger(x: float) -> None:
    assert float(up(x)) >= x and float(up(x)) - x < 1e-3 + 1e-9 * x
    assert float(down(x)) <= x and x - float(down(x)) < 1e-3 + 1e-9 * x
    assert float(up_significant(x)) >= x


def test_the_issues_epsilon_is_rounded_up_and_delta_keeps_its_digits() -> None:
    assert up(2.9953155448684337) == "2.996"  # never 2.995
    assert down(7.0046844551315663) == "7.004"
    assert up_significant(1e-5) == "0.00001" and up_significant(1 / 3000) == "0.000334"
    assert up(None) == "?"


def test_times_are_shown_in_utc_with_paris_time_beside() -> None:
    winter = datetime(2026, 12, 1, 9, 17, 41, tzinfo=UTC).isoformat()
    summer = datetime(2026, 7, 1, 22, 30, tzinfo=UTC).isoformat()
    assert when(winter) == "2026-12-01 09:17:41 UTC (10:17:41 Paris)"
    assert when(summer) == "2026-07-01 22:30:00 UTC (2026-07-02 00:30:00 Paris)"
    assert text("fr", "expires_in", what="m", when="w", days=3) == "m expire le w (dans 3 jours)"


def test_an_audit_under_another_policy_than_the_pinned_one_is_flagged(tmp_path: Path) -> None:
    from registry.audit.policy import load_policy
    from transfer.evidence import AuditEvidence, pinned_policy_at
    from transfer.evidence_html import policy_html
    from transfer.identity import init_site
    from transfer.ledger_site import append_record, open_ledger
    from transfer.records import RecordKind

    home = tmp_path / "x"
    init_site(home, "X")
    default = load_policy().digest
    audit = {"model": "m", "version": "1", "verdict": "PASS", "policy": "passerelle-default",
             "policy_digest": default}
    append_record(home, RecordKind.AUDIT_VERDICT, [], audit)
    pinned = "sha256:" + "ab" * 32
    append_record(home, RecordKind.SITE_POLICY_CHANGED, [], {
        "setting": "audit.policy_sha256", "old": "", "new": pinned, "approver": "A",
        "justification": "B", "policy_digest": "sha256:" + "cd" * 32})
    append_record(home, RecordKind.AUDIT_VERDICT, [], audit)
    with open_ledger(home) as ledger:
        records = ledger.records()
    before, after = records[0], records[2]
    assert pinned_policy_at(records, before.seq) == ""  # nothing pinned: the default
    assert pinned_policy_at(records, after.seq) == pinned
    ok = AuditEvidence("m/1", before, "missing", None, None, "", default)
    flagged = AuditEvidence("m/1", after, "missing", None, None, pinned, default)
    assert ok.under_pinned_policy is True and flagged.under_pinned_policy is False
    assert "the site&#x27;s pinned policy" in policy_html(ok, "en")
    assert f"NOT the site&#x27;s pinned policy ({pinned})" in policy_html(flagged, "en")
    assert "PAS la politique épinglée du site" in policy_html(flagged, "fr")


def test_failed_and_interrupted_runs_are_red_and_the_budget_counts_them(tmp_path: Path) -> None:
    import re

    from transfer.evidence import budgets, dp_runs
    from transfer.identity import init_site
    from transfer.ledger_site import append_record
    from transfer.records import RecordKind
    from transfer.report import build_report, render_html

    home = tmp_path / "y"
    init_site(home, "Y")
    run = {"model": "m", "version": "2", "source_version": "1", "dataset": "sha256:" + "d" * 64,
           "privacy_unit": "patient", "epsilon": 1.00001, "epsilon_rdp": 1.2, "delta": 1e-5,
           "noise_multiplier": 1.1, "sampling_rate": 0.02, "steps": 100,
           "accuracy_before": 0.5, "accuracy_after": 0.6, "budget_cap": 10.0}
    append_record(home, RecordKind.FINETUNE, [], {**run, "budget_spent": 1.00001})
    append_record(home, RecordKind.FINETUNE, [], {**run, "budget_spent": 2.5, "outcome": "failed",
                                                  "reason": "ParityError: 3e-4 > 1e-4"})
    append_record(home, RecordKind.FINETUNE, [], {**run, "budget_spent": 3.5,
                                                  "outcome": "interrupted"})
    report = build_report(home)
    assert [r.outcome for r in dp_runs(report.records)] == ["done", "failed", "interrupted"]
    (budget,) = budgets(report.runs)
    assert (budget.spent, budget.runs) == (3.5, 3)  # the newest record says
    assert budget.delta == 3e-5  # every run's delta, failed ones too
    page = render_html(report, "en")
    summary = re.search(r'<section id="summary".*?</section>', page, re.S).group(0)  # type: ignore[union-attr]
    assert re.search(r'<tr class="bad"><td><b>Did a fine-tuning run fail or stop midway\?'
                     r"</b></td><td>.*FAILED.*INTERRUPTED", summary, re.S)
    assert "spent ε = 3.5 of cap 10, remaining 6.5, at δ = 0.00003" in summary
    assert "ParityError: 3e-4 &gt; 1e-4" in page and "1.001" in page  # ε 1.00001 shown up


def test_french_pages_write_a_decimal_comma_and_keep_the_rounding_direction() -> None:
    from transfer.i18n import numbers_in

    assert (up(2.9953155), down(4.33471), up_significant(1.23456e-5)) == \
        ("2.996", "4.334", "0.0000124")
    with numbers_in("fr"):
        assert (up(2.9953155), down(4.33471), up_significant(1.23456e-5)) == \
            ("2,996", "4,334", "0,0000124")
        assert up(3) == "3"
    assert up(2.9953155) == "2.996"  # only inside the French page


def test_the_dossier_names_the_recipe_the_audit_recorded_in_both_languages() -> None:
    from transfer.evidence_html import recipe_text

    doc = {"recipe": {"name": "tests.vendor_recipes:keras_conv1d", "kind": "module",
                      "digest": "sha256:0123456789abcdef0123"}}
    en, fr = recipe_text(doc, "en", "patient"), recipe_text(doc, "fr", "patient")
    assert en.startswith("the vendor's recipe (Python module): tests.vendor_recipes:keras_conv1d")
    assert "sha256:0123456789a" in en and en.endswith("by patient")
    assert fr.startswith("la recette du fournisseur (module Python) : tests.vendor_recipes")
    reinit = recipe_text({"recipe": {"name": "onnx-reinit", "kind": "onnx-reinit",
                                     "digest": "sha256:ab"}}, "fr", "patient")
    assert reinit.startswith("copies réinitialisées de l'ONNX livré")
    # an audit from before recipes were recorded keeps the generic wording
    assert recipe_text({}, "en", "patient").startswith("the model's own training recipe")


def test_the_reference_models_fit_is_shown_signed_rounded_away_from_0_and_red_when_failed(
) -> None:
    from transfer.evidence_html import _fit_shift
    from transfer.i18n import numbers_in

    def doc(members: float, passed: bool) -> dict[str, object]:
        return {"reference_fit_shift": {"members": members, "nonmembers": 0.0211},
                "criteria": [{"name": "recipe.members_fit_shift", "measured": abs(members),
                              "limit": 2.0, "passed": passed},
                             {"name": "recipe.nonmembers_fit_shift", "measured": 0.0211,
                              "limit": 2.0, "passed": True}]}

    [(label, value)] = _fit_shift(doc(-0.0812, True), "en")
    assert label == "reference models' fit" and value.startswith("<span class='good'>")
    assert "members score −0.09 standard deviations" in value and "+0.03 from" in value
    assert "(limit ±2;" in value
    with numbers_in("fr"):
        [(label, value)] = _fit_shift(doc(5.341, False), "fr")
    assert label == "ajustement des modèles de référence"
    assert value.startswith("<span class='bad'>") and "+5,35 écarts-types" in value
    assert _fit_shift({}, "en") == []  # a report from before the check: nothing shown
