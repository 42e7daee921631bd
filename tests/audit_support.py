"""Helpers for the audit's tests: a site home with a sealed reserve, a small policy."""

from __future__ import annotations

from pathlib import Path

from passerelle import steps
from registry.audit.policy import default_policy_path
from transfer.acts import has_ledger
from transfer.identity import init_site

RESERVE_FRACTION = 0.25


def sealed(home: Path, data: Path, out: Path, fraction: float = RESERVE_FRACTION) -> Path:
    """Seal ``data``'s reserve at ``home`` (a site is created there if needed); return the
    training corpus written to ``out``."""
    if not has_ledger(home):
        init_site(home, "CHU-X")
    steps.seal_data(home, data, fraction, out)
    return out


# Edits of small_policy that let a small audit PASS on the membership and canary figures
# (too noisy to judge at test sizes), for tests about something else.
RELAXED_MEMBERSHIP = {
    "max_auc = 0.60": "max_auc = 1.0",
    "max_tpr_at_0_1pct_fpr = 0.02": "max_tpr_at_0_1pct_fpr = 1.0",
    "max_tpr_at_1pct_fpr = 0.05": "max_tpr_at_1pct_fpr = 1.0",
    "max_epsilon_lower_bound = 1.0": "max_epsilon_lower_bound = 100.0",
    "max_exposure_bits = 10.0": "max_exposure_bits = 24.0",
}


def small_policy(path: Path, **replace: str) -> Path:
    """The default policy with 4 reference models (the suite's budget) and edits."""
    text = default_policy_path().read_text().replace("reference_models = 8",
                                                     "reference_models = 4")
    for old, new in replace.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path
