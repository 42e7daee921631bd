"""The report's languages, its rounding against the user and its times."""

from __future__ import annotations

from datetime import UTC, datetime

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
