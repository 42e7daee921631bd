"""Black-box membership-inference attacks, written from the papers on numpy and scipy.

tensorflow-privacy 0.9.0's wheel lacks its membership-inference code and the package
that carries it cannot be installed beside our stack (DESIGN.md, Dependencies), so the
three attacks the audit runs are here. Every function takes the model's probability of
the *true* label for each example and returns scores where higher means "more likely a
member".

* Loss/confidence threshold (Yeom et al. 2018): score = log p_y = -cross-entropy loss.
* LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles"),
  on logit-scaled confidences phi = log(p / (1 - p)):
  - online: Gaussian fits of phi over reference models trained with (IN) and without
    (OUT) the example; score = log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)
    (the likelihood ratio of the paper, Algorithm 1);
  - offline: OUT models only. **Implemented as in the paper**, a one-sided test,
    score = P[Z < phi] with Z ~ N(mu_out, s_out) (section 5.2). The authors' released
    code uses a density ratio instead; we do not.
  With few reference models the per-example variance is unstable; ``global_variance``
  uses one variance for all examples, as the paper recommends below 64 models.
* RMIA (Zarifzadeh et al. 2024, "Low-Cost High-Power Membership Inference Attacks"),
  offline: Pr(x) is approximated from OUT models as ((1 + a)/2) * mean_out p(x) +
  (1 - a)/2 (their offline scaling, a in [0, 1]); the likelihood ratio of x,
  p(x|theta) / Pr(x), is compared with that of population samples z; the score is
  the share of z that x dominates by a factor gamma. Population samples are scored
  exactly like x: they are OUT for every reference model (never in any training set),
  and Pr(z) gets the same offline scaling (as Privacy Meter's ``run_rmia`` does). ``a``
  is tuned as Privacy Meter's ``tune_offline_a`` does (:func:`tune_rmia_a`): attack one
  reference model with the others, keep the ``a`` of the grid 0, 0.1, ..., 1 with the
  highest AUC.

The attacks are only as strong as the reference models are like the target.
:func:`reference_fit_shift` measures it on the same scores: the mean distance, in
reference-model standard deviations, between the target's phi on its members and the
reference models' phi on those examples when IN, and on its non-members and OUT. A
recipe that reproduces the target's training gives about 0 on both sides; reference
models that fit less (fewer steps, a weaker model, a stand-in recipe) leave the
members far above them, and the attacks calibrated on them are blunt.

Per patient (:func:`aggregate_by_unit`), the LiRA statistics are summed over the
patient's stays (the joint likelihood-ratio test of independent observations: the
log-likelihood ratios add up); loss and RMIA scores, which are not log-likelihood
ratios, are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import norm

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
_P_CLIP = 1e-12
_MIN_STD = 1e-6


def logit_scale(p: npt.ArrayLike) -> FloatArray:
    """phi(p) = log(p) - log(1 - p), with p clipped away from 0 and 1."""
    q = np.clip(np.asarray(p, dtype=np.float64), _P_CLIP, 1.0 - _P_CLIP)
    return np.asarray(np.log(q) - np.log1p(-q), dtype=np.float64)


def loss_threshold_scores(target_p: npt.ArrayLike) -> FloatArray:
    """Yeom et al.: the negative cross-entropy loss on the true label."""
    q = np.clip(np.asarray(target_p, dtype=np.float64), _P_CLIP, 1.0)
    return np.asarray(np.log(q), dtype=np.float64)


def _check(target_p: FloatArray, ref_p: FloatArray, in_mask: BoolArray) -> None:
    if ref_p.ndim != 2 or ref_p.shape != in_mask.shape or ref_p.shape[1] != target_p.shape[0]:
        raise ValueError("ref_p and in_mask must be (reference models, examples)")


def _masked_stats(phi: FloatArray, mask: BoolArray, global_variance: bool) -> tuple[
        FloatArray, FloatArray]:
    count = mask.sum(axis=0)
    if (count == 0).any():
        raise ValueError("every example needs at least one reference model on this side")
    mean = np.where(mask, phi, 0.0).sum(axis=0) / count
    dev = np.where(mask, phi - mean, 0.0)
    if global_variance:
        var = float((dev**2).sum() / max(1, int(mask.sum()) - 1))
        std = np.full(mean.shape, np.sqrt(var))
    else:
        std = np.sqrt((dev**2).sum(axis=0) / np.maximum(1, count - 1))
    return mean, np.maximum(std, _MIN_STD)


@dataclass(frozen=True)
class FitShift:
    """How far the target's scores are from those of the reference models (phi units of
    the reference models' own spread): ``members`` = mean over the target's members of
    (phi_target - mean phi of the reference models IN on the example) / s_in, and
    ``nonmembers`` likewise against the models OUT."""

    members: float
    nonmembers: float


def _pooled_stats(phi: FloatArray, mask: BoolArray) -> tuple[FloatArray, float]:
    """Per-example mean over the masked models and the pooled within-example standard
    deviation (each example's mean costs one degree of freedom)."""
    mean, _ = _masked_stats(phi, mask, global_variance=True)
    dof = int(mask.sum()) - int(mask.shape[1])
    if dof < 1:
        raise ValueError("too few reference models to measure their spread")
    var = float((np.where(mask, phi - mean, 0.0) ** 2).sum() / dof)
    return mean, max(float(np.sqrt(var)), _MIN_STD)


def reference_fit_shift(target_p: npt.ArrayLike, ref_p: npt.ArrayLike,
                        in_mask: npt.ArrayLike, is_member: npt.ArrayLike) -> FitShift:
    t = np.asarray(target_p, dtype=np.float64)
    r = np.asarray(ref_p, dtype=np.float64)
    m = np.asarray(in_mask, dtype=bool)
    member = np.asarray(is_member, dtype=bool)
    _check(t, r, m)
    if member.shape != t.shape or not member.any() or member.all():
        raise ValueError("is_member must mark some, not all, of the examples")
    phi_t, phi_r = logit_scale(t), logit_scale(r)
    mu_in, s_in = _pooled_stats(phi_r, m)
    mu_out, s_out = _pooled_stats(phi_r, ~m)
    return FitShift(members=float(np.mean(phi_t[member] - mu_in[member]) / s_in),
                    nonmembers=float(np.mean(phi_t[~member] - mu_out[~member]) / s_out))


def lira_online(target_p: npt.ArrayLike, ref_p: npt.ArrayLike, in_mask: npt.ArrayLike,
                global_variance: bool = True) -> FloatArray:
    t = np.asarray(target_p, dtype=np.float64)
    r = np.asarray(ref_p, dtype=np.float64)
    m = np.asarray(in_mask, dtype=bool)
    _check(t, r, m)
    phi_t, phi_r = logit_scale(t), logit_scale(r)
    mu_in, s_in = _masked_stats(phi_r, m, global_variance)
    mu_out, s_out = _masked_stats(phi_r, ~m, global_variance)
    score = norm.logpdf(phi_t, mu_in, s_in) - norm.logpdf(phi_t, mu_out, s_out)
    return np.asarray(score, dtype=np.float64)


def lira_offline(target_p: npt.ArrayLike, ref_p: npt.ArrayLike, in_mask: npt.ArrayLike,
                 global_variance: bool = True) -> FloatArray:
    t = np.asarray(target_p, dtype=np.float64)
    r = np.asarray(ref_p, dtype=np.float64)
    m = np.asarray(in_mask, dtype=bool)
    _check(t, r, m)
    mu_out, s_out = _masked_stats(logit_scale(r), ~m, global_variance)
    # log P[Z < phi]: keeps resolution in the upper tail, where members are.
    score = norm.logcdf(logit_scale(t), mu_out, s_out)
    return np.asarray(score, dtype=np.float64)


def rmia_offline(
    target_p: npt.ArrayLike, ref_p: npt.ArrayLike, in_mask: npt.ArrayLike,
    population_target_p: npt.ArrayLike, population_ref_p: npt.ArrayLike,
    a: float = 0.3, gamma: float = 1.0,
) -> FloatArray:
    """RMIA offline. ``population_*``: the same probabilities on population samples z."""
    t = np.asarray(target_p, dtype=np.float64)
    r = np.asarray(ref_p, dtype=np.float64)
    m = np.asarray(in_mask, dtype=bool)
    _check(t, r, m)
    if not 0.0 <= a <= 1.0 or gamma <= 0:
        raise ValueError("need 0 <= a <= 1 and gamma > 0")
    zt = np.asarray(population_target_p, dtype=np.float64)
    zr = np.asarray(population_ref_p, dtype=np.float64)
    if zr.ndim != 2 or zr.shape != (r.shape[0], zt.shape[0]) or zt.size == 0:
        raise ValueError("population_ref_p must be (reference models, population samples)")
    out_count = (~m).sum(axis=0)
    if (out_count == 0).any():
        raise ValueError("every example needs at least one OUT reference model")
    p_out = np.where(~m, r, 0.0).sum(axis=0) / out_count
    ratio_x = np.maximum(t, _P_CLIP) / _offline_pr(p_out, a)
    # Population samples are OUT for every reference model: the same estimate of Pr(.)
    ratio_z = np.sort(np.maximum(zt, _P_CLIP) / _offline_pr(zr.mean(axis=0), a))
    # share of z with ratio_x / ratio_z > gamma, i.e. ratio_z < ratio_x / gamma
    dominated = np.searchsorted(ratio_z, ratio_x / gamma, side="left")
    return np.asarray(dominated / ratio_z.size, dtype=np.float64)


def _offline_pr(p_out: FloatArray, a: float) -> FloatArray:
    """RMIA's offline approximation of Pr(x) from the mean OUT probability."""
    return np.maximum((1.0 + a) / 2.0 * p_out + (1.0 - a) / 2.0, _P_CLIP)


RMIA_A_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def tune_rmia_a(ref_p: npt.ArrayLike, in_mask: npt.ArrayLike, population_ref_p: npt.ArrayLike,
                grid: Sequence[float] = RMIA_A_GRID) -> float:
    """Privacy Meter's ``tune_offline_a``: the ``a`` that best attacks a reference model.

    Reference model 0 plays the target, the others are its references; its known
    membership gives an AUC for each ``a`` of the grid; the first best one is kept.
    Examples with no OUT model among the others are left out of the tuning.
    """
    from registry.audit.metrics import auc, roc_curve

    r = np.asarray(ref_p, dtype=np.float64)
    m = np.asarray(in_mask, dtype=bool)
    zr = np.asarray(population_ref_p, dtype=np.float64)
    if r.shape[0] < 2 or r.shape != m.shape or zr.shape[0] != r.shape[0]:
        raise ValueError("tuning needs at least two reference models and matching shapes")
    usable = (~m[1:]).any(axis=0)
    pseudo_in = m[0, usable]
    if pseudo_in.all() or not pseudo_in.any():
        return float(grid[0])
    best_a, best_auc = float(grid[0]), -1.0
    for a in grid:
        s = rmia_offline(r[0, usable], r[1:, usable], m[1:, usable], zr[0], zr[1:], a)
        value = auc(roc_curve(s[pseudo_in], s[~pseudo_in]))
        if value > best_auc:
            best_a, best_auc = float(a), value
    return best_a


def aggregate_by_unit(scores: npt.ArrayLike, units: Sequence[str],
                      how: str = "mean") -> tuple[list[str], FloatArray]:
    """One score per privacy unit (patient): the mean or the sum of its examples' scores.

    With the patient as the privacy unit the question is "was this patient in the
    training set", asked once per patient, not once per stay. ``how="sum"`` is the joint
    test for scores that are log-likelihood ratios of independent stays (LiRA).
    """
    if how not in ("mean", "sum"):
        raise ValueError("how must be 'mean' or 'sum'")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape[0] != len(units):
        raise ValueError("one unit id per score is needed")
    names, inverse = np.unique(np.asarray(units), return_inverse=True)
    sums = np.bincount(inverse, weights=s)
    counts = np.bincount(inverse) if how == "mean" else np.ones(len(names))
    return [str(u) for u in names], np.asarray(sums / counts, dtype=np.float64)
