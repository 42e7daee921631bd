"""How well an attack separates members from non-members, and what that proves.

Scores are "higher means more likely a member". From them:

* the ROC curve, its AUC, TPR at fixed low FPR (0.1 %, 1 %) and the best balanced
  accuracy (LiRA's reporting, Carlini et al. 2022);
* an empirical lower bound on epsilon (Jagielski et al. 2020, Kairouz et al. 2015): an
  (epsilon, delta)-DP mechanism forces every test to satisfy
  ``FPR + e^eps * FNR >= 1 - delta`` and ``FNR + e^eps * FPR >= 1 - delta``, so observed
  error rates bound epsilon from below. The error rates are replaced by their one-sided
  Clopper-Pearson upper limits, and because the threshold is chosen on the same scores,
  the confidence level is split (Bonferroni) over every threshold examined and over the
  two rates, so the bound holds at the stated confidence whatever threshold wins;
* the largest lower bound those sample sizes could ever show (a perfect attack), so
  that a small audit is not read as proof of safety.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import beta

FloatArray = npt.NDArray[np.float64]
LOW_FPRS = (0.001, 0.01)


@dataclass(frozen=True)
class Roc:
    fpr: FloatArray  # increasing, from 0 to 1
    tpr: FloatArray
    thresholds: FloatArray  # predict "member" when score >= threshold


@dataclass(frozen=True)
class EpsilonBound:
    """A one-sided lower confidence bound on epsilon at ``confidence``, for ``delta``."""

    epsilon_lower: float
    epsilon_max_detectable: float
    confidence: float
    delta: float
    thresholds_tested: int
    threshold: float | None  # the threshold giving the bound (None if the bound is 0)


@dataclass(frozen=True)
class AttackMetrics:
    members: int
    nonmembers: int
    auc: float
    tpr_at_fpr: dict[float, float]
    balanced_accuracy: float
    epsilon: EpsilonBound


def roc_curve(member_scores: FloatArray, nonmember_scores: FloatArray) -> Roc:
    """The exact empirical ROC curve, one point per distinct score (ties kept together)."""
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError("both member and non-member scores are needed")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("scores must be finite")
    thresholds = np.unique(np.concatenate([m, n]))[::-1]
    m_sorted, n_sorted = np.sort(m), np.sort(n)
    tp = m.size - np.searchsorted(m_sorted, thresholds, side="left")
    fp = n.size - np.searchsorted(n_sorted, thresholds, side="left")
    fpr = np.concatenate([[0.0], fp / n.size])
    tpr = np.concatenate([[0.0], tp / m.size])
    return Roc(fpr=fpr, tpr=tpr, thresholds=np.concatenate([[np.inf], thresholds]))


def auc(roc: Roc) -> float:
    return float(np.trapz(roc.tpr, roc.fpr))


def tpr_at_fpr(roc: Roc, target: float) -> float:
    """The best TPR among thresholds whose FPR does not exceed ``target``."""
    ok = roc.fpr <= target + 1e-12
    return float(roc.tpr[ok].max())


def balanced_accuracy(roc: Roc) -> float:
    return float(np.max((roc.tpr + 1.0 - roc.fpr) / 2.0))


def cp_upper(errors: npt.ArrayLike, n: int, alpha: float) -> FloatArray:
    """One-sided Clopper-Pearson upper limit of a binomial rate at level 1 - alpha."""
    k = np.asarray(errors, dtype=np.float64)
    upper = beta.ppf(1.0 - alpha, k + 1.0, n - k)
    return np.where(k >= n, 1.0, upper)


def epsilon_lower_bound(
    roc: Roc, members: int, nonmembers: int, delta: float = 0.0, confidence: float = 0.95
) -> EpsilonBound:
    """Jagielski et al.'s bound with Clopper-Pearson limits, Bonferroni over thresholds."""
    if not 0.0 <= delta < 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError("need 0 <= delta < 1 and 0 < confidence < 1")
    points = roc.fpr.size
    alpha = (1.0 - confidence) / (2.0 * points)
    fpr_hi = cp_upper(np.rint(roc.fpr * nonmembers), nonmembers, alpha)
    fnr_hi = cp_upper(np.rint((1.0 - roc.tpr) * members), members, alpha)
    eps = np.maximum(_log_ratio(1.0 - delta - fnr_hi, fpr_hi),
                     _log_ratio(1.0 - delta - fpr_hi, fnr_hi))
    best = int(np.argmax(eps))
    best_eps = max(0.0, float(eps[best]))
    perfect_fpr = float(cp_upper(0, nonmembers, alpha))
    perfect_fnr = float(cp_upper(0, members, alpha))
    max_detectable = max(0.0, float(np.max([_log_ratio(1.0 - delta - perfect_fnr, perfect_fpr),
                                            _log_ratio(1.0 - delta - perfect_fpr, perfect_fnr)])))
    return EpsilonBound(
        epsilon_lower=best_eps,
        epsilon_max_detectable=max_detectable,
        confidence=confidence,
        delta=delta,
        thresholds_tested=points,
        threshold=float(roc.thresholds[best]) if best_eps > 0 else None,
    )


def evaluate_attack(
    member_scores: FloatArray, nonmember_scores: FloatArray, delta: float = 0.0,
    confidence: float = 0.95,
) -> AttackMetrics:
    roc = roc_curve(member_scores, nonmember_scores)
    m, n = len(member_scores), len(nonmember_scores)
    return AttackMetrics(
        members=m,
        nonmembers=n,
        auc=auc(roc),
        tpr_at_fpr={f: tpr_at_fpr(roc, f) for f in LOW_FPRS},
        balanced_accuracy=balanced_accuracy(roc),
        epsilon=epsilon_lower_bound(roc, m, n, delta, confidence),
    )


def _log_ratio(num: npt.ArrayLike, den: npt.ArrayLike) -> FloatArray:
    num_a = np.asarray(num, dtype=np.float64)
    den_a = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where((num_a > 0) & (den_a > 0), np.log(num_a / den_a), -np.inf)
    return np.asarray(out, dtype=np.float64)

