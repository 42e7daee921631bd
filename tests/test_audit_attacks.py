"""The membership-inference attacks and their metrics, on cases whose answer is known."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from registry.audit.attacks import (
    aggregate_by_unit,
    lira_offline,
    lira_online,
    logit_scale,
    loss_threshold_scores,
    rmia_offline,
)
from registry.audit.metrics import cp_upper, epsilon_lower_bound, evaluate_attack, roc_curve

RNG_SEED = 20261128


def _refs(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Reference models trained on random halves: each example IN for about half."""
    return rng.random((k, n)) < 0.5


def test_every_attack_on_a_constant_model_is_chance_and_proves_nothing() -> None:
    rng = np.random.default_rng(RNG_SEED)
    n, k = 400, 8
    members, nonmembers = np.full(n, 0.3), np.full(n, 0.3)  # same output for every input
    refs, mask = np.full((k, 2 * n), 0.3), _refs(2 * n, k, rng)
    mask[0], mask[1] = True, False  # at least one IN and one OUT model per example
    target = np.concatenate([members, nonmembers])
    population = np.full(200, 0.3)
    attacks = {
        "loss": loss_threshold_scores(target),
        "lira-online": lira_online(target, refs, mask),
        "lira-offline": lira_offline(target, refs, mask),
        "rmia": rmia_offline(target, refs, mask, population, np.full((k, 200), 0.3)),
    }
    se = math.sqrt((n + n + 1) / (12 * n * n))  # AUC standard error with no signal
    for name, scores in attacks.items():
        metrics = evaluate_attack(scores[:n], scores[n:])
        # float rounding of the per-example fits may break ties at random: sampling error
        assert metrics.auc == pytest.approx(0.5, abs=3 * se), name
        assert metrics.epsilon.epsilon_lower == 0.0, name
        assert metrics.tpr_at_fpr[0.001] == 0.0, name


def test_independent_noise_scores_have_chance_auc_and_zero_epsilon() -> None:
    rng = np.random.default_rng(RNG_SEED)
    n = 2000
    metrics = evaluate_attack(rng.normal(size=n), rng.normal(size=n))
    se = math.sqrt((n + n + 1) / (12 * n * n))  # AUC standard error under H0
    assert abs(metrics.auc - 0.5) < 4 * se
    assert metrics.epsilon.epsilon_lower == 0.0


def test_perfectly_separable_scores_have_auc_one_and_hit_the_detectable_maximum() -> None:
    members, nonmembers = np.linspace(10, 11, 500), np.linspace(0, 1, 500)
    metrics = evaluate_attack(members, nonmembers)
    assert metrics.auc == 1.0
    assert metrics.tpr_at_fpr == {0.001: 1.0, 0.01: 1.0}
    assert metrics.balanced_accuracy == 1.0
    eps = metrics.epsilon
    assert eps.epsilon_lower == pytest.approx(eps.epsilon_max_detectable)
    assert 0 < eps.epsilon_lower < 10, "500 + 500 samples cannot prove a large epsilon"


def test_clopper_pearson_upper_limit_matches_the_closed_form_at_zero_errors() -> None:
    assert float(cp_upper(0, 100, 0.05)) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert float(cp_upper(100, 100, 0.05)) == 1.0
    # the defining property: at the upper limit u, P[Binomial(n, u) <= k] = alpha
    for k, n in ((5, 50), (1, 1000), (37, 80)):
        u = float(cp_upper(k, n, 0.05))
        assert binom.cdf(k, n, u) == pytest.approx(0.05, rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(eps=st.floats(0.2, 3.0), seed=st.integers(0, 2**32 - 1))
def test_lower_bound_never_exceeds_the_epsilon_of_a_known_mechanism(eps: float,
                                                                    seed: int) -> None:
    """Randomised response with parameter eps is eps-DP: the bound must stay below it."""
    rng = np.random.default_rng(seed)
    n = 20000
    p = math.exp(eps) / (1 + math.exp(eps))
    members = (rng.random(n) < p).astype(float)
    nonmembers = (rng.random(n) < 1 - p).astype(float)
    bound = epsilon_lower_bound(roc_curve(members, nonmembers), n, n)
    assert bound.epsilon_lower <= eps
    assert bound.epsilon_lower > 0.6 * eps, "the bound should be reasonably tight here"


def test_lira_separates_when_in_and_out_confidences_differ() -> None:
    rng = np.random.default_rng(RNG_SEED)
    n, k = 300, 16
    mask = _refs(2 * n, k, rng)
    mask[0], mask[1] = True, False
    in_phi, out_phi = 3.0, 0.0
    ref_phi = np.where(mask, in_phi, out_phi) + rng.normal(0, 0.5, size=mask.shape)
    ref_p = 1 / (1 + np.exp(-ref_phi))
    target_phi = np.concatenate([rng.normal(in_phi, 0.5, n), rng.normal(out_phi, 0.5, n)])
    target_p = 1 / (1 + np.exp(-target_phi))
    for attack in (lira_online, lira_offline):
        metrics = evaluate_attack(*np.split(attack(target_p, ref_p, mask), 2))
        assert metrics.auc > 0.99, attack.__name__
        assert metrics.tpr_at_fpr[0.01] > 0.5, attack.__name__


def test_rmia_ranks_members_above_population() -> None:
    rng = np.random.default_rng(RNG_SEED)
    n, k, z = 300, 4, 500
    mask = np.zeros((k, 2 * n), dtype=bool)  # offline: all reference models OUT
    ref_p = rng.uniform(0.2, 0.4, size=(k, 2 * n))
    target_p = np.concatenate([rng.uniform(0.7, 0.9, n), rng.uniform(0.2, 0.4, n)])
    scores = rmia_offline(target_p, ref_p, mask, rng.uniform(0.2, 0.4, z),
                          rng.uniform(0.2, 0.4, size=(k, z)))
    assert evaluate_attack(scores[:n], scores[n:]).auc > 0.99


def test_patient_scores_average_their_stays() -> None:
    units, scores = aggregate_by_unit([1.0, 3.0, 5.0], ["P2", "P1", "P2"])
    assert units == ["P1", "P2"]
    assert scores.tolist() == [3.0, 3.0]


def test_logit_scale_is_finite_at_the_edges() -> None:
    assert np.isfinite(logit_scale([0.0, 1.0])).all()


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        roc_curve(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError):
        lira_online(np.ones(3) / 2, np.ones((2, 4)) / 2, np.ones((2, 4), dtype=bool))


def test_roc_plot_is_a_png(tmp_path: Path) -> None:
    from registry.audit.plots import plot_roc

    rng = np.random.default_rng(RNG_SEED)
    roc = roc_curve(rng.normal(1, 1, 500), rng.normal(0, 1, 500))
    out = plot_roc({"loss": roc}, tmp_path / "roc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
