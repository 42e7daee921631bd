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
  the share of z that x dominates by a factor gamma.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    pr_x = (1.0 + a) / 2.0 * p_out + (1.0 - a) / 2.0
    pr_z = zr.mean(axis=0)  # population samples: every reference model is OUT-like
    ratio_x = np.maximum(t, _P_CLIP) / np.maximum(pr_x, _P_CLIP)
    ratio_z = np.sort(np.maximum(zt, _P_CLIP) / np.maximum(pr_z, _P_CLIP))
    # share of z with ratio_x / ratio_z > gamma, i.e. ratio_z < ratio_x / gamma
    dominated = np.searchsorted(ratio_z, ratio_x / gamma, side="left")
    return np.asarray(dominated / ratio_z.size, dtype=np.float64)


def aggregate_by_unit(scores: npt.ArrayLike, units: Sequence[str]) -> tuple[list[str], FloatArray]:
    """One score per privacy unit (patient): the mean of its examples' scores.

    With the patient as the privacy unit the question is "was this patient in the
    training set", asked once per patient, not once per stay.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.shape[0] != len(units):
        raise ValueError("one unit id per score is needed")
    names, inverse = np.unique(np.asarray(units), return_inverse=True)
    sums = np.bincount(inverse, weights=s)
    counts = np.bincount(inverse)
    return [str(u) for u in names], np.asarray(sums / counts, dtype=np.float64)
