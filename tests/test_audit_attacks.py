"""The membership-inference attacks and their metrics, on cases whose answer is known."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
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
    tune_rmia_a,
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


def test_joint_patient_statistic_sums_the_stays_log_likelihood_ratios() -> None:
    units, scores = aggregate_by_unit([1.0, 3.0, 5.0], ["P2", "P1", "P2"], how="sum")
    assert units == ["P1", "P2"] and scores.tolist() == [3.0, 6.0]
    with pytest.raises(ValueError):
        aggregate_by_unit([1.0], ["P1"], how="max")


def test_summing_beats_averaging_when_members_have_more_evidence() -> None:
    """Patients with several weakly leaky stays: the joint (summed) LLR separates them
    at least as well as the mean, and better when stay counts vary."""
    rng = np.random.default_rng(RNG_SEED)
    units, llr, member = [], [], []
    for j in range(600):
        stays = int(rng.integers(1, 7))
        is_member = j % 2 == 0
        for _ in range(stays):
            units.append(f"P{j:04d}")
            llr.append(rng.normal(0.4 if is_member else -0.4, 1.0))
            member.append(is_member)
    units_a, llr_a, member_a = np.array(units), np.array(llr), np.array(member)
    aucs = {}
    for how in ("mean", "sum"):
        m = aggregate_by_unit(llr_a[member_a], list(units_a[member_a]), how)[1]
        n = aggregate_by_unit(llr_a[~member_a], list(units_a[~member_a]), how)[1]
        aucs[how] = evaluate_attack(m, n).auc
    assert aucs["sum"] > aucs["mean"] + 0.01, aucs


def _uninfluenced_model(n: int, k: int, z: int, rng: np.random.Generator) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A model whose output on each input does not depend on training: every model
    (target and references) gives example i the same p_i; examples differ."""
    p = rng.beta(2, 2, size=2 * n)
    pz = rng.beta(2, 2, size=z)
    mask = _refs(2 * n, k, rng)
    mask[0], mask[1] = True, False
    return p, np.tile(p, (k, 1)), mask, pz, np.tile(pz, (k, 1))


def test_rmia_on_a_model_that_learns_nothing_is_chance_with_spread_scores() -> None:
    """The issue's degenerate case: with the population scaled unlike the target, every
    score was 0. Scored alike, the scores spread over [0, 1] and the AUC is chance."""
    rng = np.random.default_rng(RNG_SEED)
    n, k, z = 1000, 8, 500
    target, refs, mask, pz, zr = _uninfluenced_model(n, k, z, rng)
    se = math.sqrt((2 * n + 1) / (12 * n * n))
    for a in (0.0, 0.3, 0.6, 1.0):
        scores = rmia_offline(target, refs, mask, pz, zr, a)
        metrics = evaluate_attack(scores[:n], scores[n:])
        assert abs(metrics.auc - 0.5) < 4 * se, a
        if a < 1.0:  # at a = 1 every ratio is exactly 1: no test can rank anything
            assert np.mean(scores == 0.0) < 0.01 and np.std(scores) > 0.2, a
            assert len(np.unique(scores)) > 100, a
    # The form the issue found (plain mean for Pr(z), scaled Pr(x)) piles up at 0.
    p_out = np.where(~mask, refs, 0).sum(0) / (~mask).sum(0)
    old_x = target / (0.65 * p_out + 0.35)
    old = np.searchsorted(np.sort(pz / zr.mean(0)), old_x) / z
    assert np.mean(old == 0.0) > 0.9


def _privacy_meter_rmia(target_x: np.ndarray, ref_x: np.ndarray, in_x: np.ndarray,
                        target_z: np.ndarray, ref_z: np.ndarray, a: float) -> np.ndarray:
    """Privacy Meter's ``run_rmia`` (privacytrustlab/ml_privacy_meter, attacks.py), ported
    line by line: OUT signals of x, all reference signals of z, the same offline scaling,
    ratio_x / ratio_z > 1 averaged over z."""
    out_signals = np.where(~in_x, ref_x, 0.0).T  # (examples, models) as Privacy Meter
    out_signals = -np.sort(-out_signals, axis=1)[:, : int((~in_x).sum(axis=0).min())]
    mean_out_x = np.mean(out_signals, axis=1)
    mean_x = (1 + a) / 2 * mean_out_x + (1 - a) / 2
    prob_ratio_x = target_x.ravel() / mean_x
    z_out_signals = ref_z.T  # all population data are OUT for all models
    mean_out_z = np.mean(z_out_signals, axis=1)
    mean_z = (1 + a) / 2 * mean_out_z + (1 - a) / 2
    prob_ratio_z = target_z.ravel() / mean_z
    ratios = prob_ratio_x[:, np.newaxis] / prob_ratio_z
    return np.asarray(np.average(ratios > 1.0, axis=1), dtype=np.float64)


def test_rmia_matches_privacy_meter_on_identical_scores() -> None:
    rng = np.random.default_rng(RNG_SEED)
    n, k, z = 400, 8, 300
    # every example OUT for exactly k/2 models, so Privacy Meter's "keep the k/2 largest
    # masked signals" is the mean over OUT models
    mask = np.zeros((k, 2 * n), dtype=bool)
    for j in range(2 * n):
        mask[rng.permutation(k)[: k // 2], j] = True
    ref = rng.uniform(0.05, 0.95, size=(k, 2 * n))
    target = np.clip(ref.mean(0) + np.r_[np.full(n, 0.1), np.zeros(n)]
                     + rng.normal(0, 0.05, 2 * n), 0.01, 0.99)
    pz, zr = rng.uniform(0.05, 0.95, z), rng.uniform(0.05, 0.95, size=(k, z))
    for a in (0.0, 0.3, 0.7, 1.0):
        ours = rmia_offline(target, ref, mask, pz, zr, a)
        theirs = _privacy_meter_rmia(target, ref, mask, pz, zr, a)
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_rmia_a_is_tuned_like_privacy_meter_on_a_reference_model() -> None:
    """``tune_rmia_a`` attacks reference model 0 with the others and keeps the best a of
    the grid: it must equal the a found by scanning that grid with Privacy Meter's RMIA."""
    rng = np.random.default_rng(RNG_SEED)
    n, k, z = 600, 9, 300
    mask = np.zeros((k, n), dtype=bool)
    for j in range(n):
        mask[rng.permutation(k)[: k // 2], j] = True
    difficulty = rng.uniform(0.1, 0.9, n)
    ref = np.clip(difficulty + np.where(mask, 0.08, 0.0) + rng.normal(0, 0.05, (k, n)),
                  0.01, 0.99)
    zr = np.clip(rng.uniform(0.1, 0.9, (k, z)) + rng.normal(0, 0.05, (k, z)), 0.01, 0.99)
    tuned = tune_rmia_a(ref, mask, zr)
    aucs = {}
    for a in [round(0.1 * i, 1) for i in range(11)]:
        s = _privacy_meter_rmia(ref[0], ref[1:], mask[1:], zr[0], zr[1:], a) \
            if (~mask[1:]).sum(0).min() > 0 else None
        assert s is not None
        aucs[a] = evaluate_attack(s[mask[0]], s[~mask[0]]).auc
    assert tuned == max(aucs, key=lambda a: (aucs[a], -a))


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


def test_reference_models_get_as_many_gradient_steps_as_the_target() -> None:
    """Reference models train on about half the pool: the same epochs would give them
    about half the target's steps (the issue measured 60 %); the recipe matches steps."""
    from registry.audit.recipe import CoderRecipe
    from registry.coder import Architecture, CoderConfig

    recipe = CoderRecipe(CoderConfig(epochs=4, batch_size=128))
    target = recipe.steps(2434)
    assert target == 4 * 20
    epochs = recipe.epochs_for(1500, target)  # 12 batches an epoch
    assert epochs == 7 and abs(epochs * 12 - target) <= 12 // 2 + 1
    assert recipe.epochs_for(10, 3) == 3 and recipe.epochs_for(10_000, 1) == 1
    logreg = CoderRecipe(CoderConfig(architecture=Architecture.LOGREG))
    assert logreg.steps(2434) is None and logreg.epochs_for(100, None) == 4


def _canary_world() -> tuple[object, dict[str, object]]:
    from passerelle.corpus import generate

    corpus = generate("X", 60, 7, canaries=1)
    canary = corpus.canaries[0]
    return canary, {s.stay_id: s for s in corpus.stays}


@pytest.mark.parametrize("memorised, low, high", [(0.0, 0.0, 6.0), (3.0, 12.0, 24.0)])
def test_canary_exposure_grows_with_memorisation_beyond_the_candidate_count(
    memorised: float, low: float, high: float,
) -> None:
    """A model whose loss on the canary stays is lower by ``memorised`` nats for the true
    secret than for other secrets of the same words: without memorisation the exposure
    is a few bits; with it, the skew-normal extrapolation goes past log2(1001) = 9.97,
    where the rank alone must stop."""
    from registry.audit.canary import canary_exposure

    canary, stays = _canary_world()
    secret = canary.template.format(secret=canary.secret)  # type: ignore[attr-defined]

    def scorer(sections: object, codes: object) -> np.ndarray:
        out = []
        for s in sections:  # type: ignore[attr-defined]
            text = " ".join(s.values())
            noise = (zlib.crc32(text.encode()) % 1000) / 1000.0  # a fixed difficulty per text
            loss = 1.0 + noise - (memorised if secret in text else 0.0)
            out.append(np.exp(-loss))
        return np.array(out)

    e = canary_exposure(canary, stays, scorer, 1000, np.random.default_rng(1))  # type: ignore[arg-type]
    assert low <= e.exposure_bits <= high, e
    assert e.rank_exposure_bits <= math.log2(1001) + 1e-9 and e.max_bits == 24.0
    if memorised:
        assert e.rank == 1.0 and e.exposure_bits > e.rank_exposure_bits + 2


def test_canary_exposure_of_a_model_that_cannot_tell_secrets_apart_is_one_bit() -> None:
    from registry.audit.canary import extrapolated_exposure

    assert extrapolated_exposure(1.0, np.ones(1000), 24.0) == pytest.approx(1.0)
    rng = np.random.default_rng(RNG_SEED)
    others = rng.normal(0, 1, 5000)
    assert extrapolated_exposure(0.0, others, 24.0) == pytest.approx(1.0, abs=0.1)
    assert extrapolated_exposure(-3.0, others, 24.0) == pytest.approx(-math.log2(0.00135),
                                                                       abs=0.5)


def test_the_reference_fit_shift_is_0_for_a_target_like_the_references_and_grows_with_the_gap(
) -> None:
    """Synthetic logit-scaled scores: per example a difficulty, IN models 1.5 above OUT
    models, spread 0.7 between models. A target drawn like the models scores about 0 on
    both sides; one whose members sit 3 spreads above the IN models scores about 3 on
    the members' side only; the pooled spread does not depend on how many models there
    are (4 or 16)."""
    from registry.audit.attacks import logit_scale, reference_fit_shift

    rng = np.random.default_rng(5)
    n = 4000
    difficulty = rng.normal(-1.0, 2.0, n)
    member = np.arange(n) < n // 2

    def expit(phi: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(1.0 / (1.0 + np.exp(-phi)), dtype=np.float64)

    for k in (4, 16):
        in_mask = np.zeros((k, n), dtype=bool)
        for j in range(n):
            in_mask[rng.permutation(k)[: k // 2], j] = True
        phi_r = difficulty + 1.5 * in_mask + rng.normal(0.0, 0.7, (k, n))
        like = difficulty + 1.5 * member + rng.normal(0.0, 0.7, n)
        shift = reference_fit_shift(expit(like), expit(phi_r), in_mask, member)
        assert abs(shift.members) < 0.1 and abs(shift.nonmembers) < 0.1, shift
        above = like + 3 * 0.7 * member
        shift = reference_fit_shift(expit(above), expit(phi_r), in_mask, member)
        assert shift.members == pytest.approx(3.0, abs=0.15) and abs(shift.nonmembers) < 0.1
        weak = reference_fit_shift(expit(like), expit(phi_r - 1.5 * in_mask), in_mask, member)
        assert weak.members == pytest.approx(1.5 / 0.7, abs=0.15), weak  # IN models like OUT
    assert logit_scale(expit(np.array([2.0])))[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="too few reference models"):
        reference_fit_shift(expit(like[:4]), expit(phi_r[:2, :4]),
                            np.array([[True] * 4, [False] * 4]),
                            np.array([True, True, False, False]))
