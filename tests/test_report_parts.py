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
