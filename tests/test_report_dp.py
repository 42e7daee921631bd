"""The report's epsilon-over-steps curve of a fine-tuning run."""

from __future__ import annotations

import base64

from adapters.dp import Accountant, dp_sgd_event, epsilon_of
from transfer.report import _epsilon_curve_png


def test_epsilon_curve_is_an_inline_png_and_rdp_bounds_the_claim() -> None:
    q, z, steps, delta = 0.025, 1.0, 400, 1e-5
    claimed = epsilon_of([dp_sgd_event(q, z, steps)], delta, Accountant.PLD)
    uri = _epsilon_curve_png(q, z, steps, delta, claimed)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # RDP is an upper bound: the curve's last point is not below the PLD claim
    assert epsilon_of([dp_sgd_event(q, z, steps)], delta, Accountant.RDP) >= claimed
