"""Canary exposure (Carlini et al. 2019, "The Secret Sharer").

A canary is a secret of a known shape (here 9 digits) planted in some training stays.
Its exposure is ``log2(R) - log2(rank)``, where ``R`` is the number of secrets compared
(the true one and ``candidates`` random ones of the same shape) and ``rank`` the true
secret's rank when ordered by the model's loss on the canary stays (lowest first).
Ties are ranked at their mean position, so a model that cannot tell secrets apart
(the secret is out of its vocabulary, say) shows an exposure of about one bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from passerelle.corpus import Canary, Stay

FloatArray = npt.NDArray[np.float64]
Scorer = Callable[[Sequence[Mapping[str, str]], Sequence[str]], FloatArray]  # -> p(true code)



@dataclass(frozen=True)
class Exposure:
    canary_id: str
    stays: int
    candidates: int
    rank: float
    exposure_bits: float
    max_bits: float


def _random_secrets(canary: Canary, count: int, rng: np.random.Generator) -> list[str]:
    symbols = rng.choice(list(canary.alphabet), size=(count, canary.length))
    return [canary.separator.join(row) for row in symbols if
            canary.separator.join(row) != canary.secret]


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
    return Exposure(canary_id=canary.canary_id, stays=len(canary.stay_ids),
                    candidates=len(secrets) - 1, rank=rank,
                    exposure_bits=math.log2(total) - math.log2(rank),
                    max_bits=math.log2(total))
