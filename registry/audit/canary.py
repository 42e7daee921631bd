"""Canary exposure (Carlini et al. 2019, "The Secret Sharer").

A canary is a secret of a known shape planted in some training stays: the corpus
generator's secrets are words of the clinical vocabulary (passerelle.corpus
CANARY_ALPHABET), so a vocabulary keeps them and a model can memorise the combination.
The model's loss on the canary stays is computed with the true secret and with
``candidates`` random secrets of the same shape (same alphabet, same length):

* ``rank``: the true secret's rank among them, lowest loss first (ties at their mean
  position); ``rank_exposure_bits = log2(candidates + 1) - log2(rank)``, at most
  ``log2(candidates + 1)``;
* ``exposure_bits``: the paper's extrapolation (section 4.3) beyond the candidate count:
  a skew-normal distribution fitted to the candidates' losses gives
  ``-log2 P[loss(random secret) <= loss(true secret)]``, capped at the log2 of the
  number of possible secrets. This is what the policy limits: it grows with
  memorisation instead of stopping at the candidate count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import skewnorm

from passerelle.corpus import Canary, Stay

FloatArray = npt.NDArray[np.float64]
Scorer = Callable[[Sequence[Mapping[str, str]], Sequence[str]], FloatArray]  # -> p(true code)



@dataclass(frozen=True)
class Exposure:
    canary_id: str
    stays: int
    candidates: int
    rank: float
    rank_exposure_bits: float
    exposure_bits: float  # skew-normal extrapolation, capped at max_bits
    max_bits: float  # log2 of the number of possible secrets


def _random_secrets(canary: Canary, count: int, rng: np.random.Generator) -> list[str]:
    symbols = rng.choice(list(canary.symbols), size=(count, canary.length))
    return [canary.separator.join(row) for row in symbols if
            canary.separator.join(row) != canary.secret]


def extrapolated_exposure(true_loss: float, other_losses: FloatArray, max_bits: float) -> float:
    """-log2 P[loss <= true_loss] under a skew-normal fitted to ``other_losses``."""
    others = np.asarray(other_losses, dtype=np.float64)
    spread = float(np.std(others))
    if others.size < 10 or spread <= 1e-12 * max(1.0, abs(float(np.mean(others)))):
        below = float(np.mean(others < true_loss) + np.mean(others == true_loss) / 2)
        return min(max_bits, max(0.0, -math.log2(max(below, 2.0 ** -max_bits))))
    shape, loc, scale = skewnorm.fit(others)
    log_cdf = float(skewnorm.logcdf(true_loss, shape, loc, scale))
    return min(max_bits, max(0.0, -log_cdf / math.log(2.0)))


def canary_exposure(
    canary: Canary, stays: Mapping[str, Stay], true_label_p: Scorer, candidates: int,
    rng: np.random.Generator,
) -> Exposure:
    """Exposure of one canary, from the model's loss summed over the canary's stays."""
    secrets = [canary.secret, *_random_secrets(canary, candidates, rng)]
    needle = canary.template.format(secret=canary.secret)
    losses = np.zeros(len(secrets))
    for stay_id in canary.stay_ids:
        stay = stays[stay_id]
        base = stay.sections.as_dict()
        variants = []
        for secret in secrets:
            line = canary.template.format(secret=secret)
            variants.append({k: v.replace(needle, line) for k, v in base.items()})
        p = true_label_p(variants, [stay.main_diagnosis] * len(variants))
        losses -= np.log(np.maximum(p, 1e-300))
    true_loss = losses[0]
    others = losses[1:]
    rank = 1.0 + float(np.sum(others < true_loss)) + float(np.sum(others == true_loss)) / 2.0
    total = float(len(secrets))
    space_bits = canary.length * math.log2(len(canary.symbols))
    return Exposure(canary_id=canary.canary_id, stays=len(canary.stay_ids),
                    candidates=len(secrets) - 1, rank=rank,
                    rank_exposure_bits=math.log2(total) - math.log2(rank),
                    exposure_bits=extrapolated_exposure(float(true_loss), others, space_bits),
                    max_bits=space_bits)
