"""How the audit trains its reference models: a recipe, one per kind of model.

A recipe fits a model on a list of stays with a seed and a budget of gradient steps and
returns a scorer (p(true code) per stay). The audit asks the recipe how many steps the
target took on its training set and gives each reference model the same number, so the
reference models are as trained as the target (Carlini et al. 2022 and Zarifzadeh et al.
2024 train reference models exactly like the target). A recipe without a notion of steps
(a convex solver run to convergence) answers ``None`` and uses its own schedule.

The built-in PMSI coder is one recipe (:class:`CoderRecipe`); a vendor's own recipe
implements the same two methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from registry.audit.scoring import coder_probabilities, true_label_probability
from registry.coder import Architecture, CoderConfig, Examples, fit_coder

FloatArray = npt.NDArray[np.float64]
StayScorer = Callable[[Examples], FloatArray]  # stays -> p(true code) per stay


class Recipe(Protocol):
    """What the audit needs from the recipe that made the target."""

    @property
    def name(self) -> str:
        """The recipe's name, for the report."""

    def steps(self, train_stays: int) -> int | None:
        """Gradient steps the recipe takes on ``train_stays`` stays (None: its own schedule)."""

    def fit(self, train: Examples, seed: int, steps: int | None) -> StayScorer:
        """Train on ``train`` with ``seed`` for about ``steps`` gradient steps."""


@dataclass(frozen=True)
class FittedReference:
    scorer: StayScorer
    steps: int | None


@dataclass(frozen=True)
class CoderRecipe:
    """The built-in coder (registry.coder): Keras epochs of mini-batches, or logreg."""

    config: CoderConfig
    name: str = "passerelle-coder"

    def _batches(self, stays: int) -> int:
        return max(1, math.ceil(stays / self.config.batch_size))

    def steps(self, train_stays: int) -> int | None:
        if self.config.architecture is Architecture.LOGREG:
            return None
        return self.config.epochs * self._batches(train_stays)

    def epochs_for(self, stays: int, steps: int | None) -> int:
        """Whole epochs on ``stays`` stays closest to ``steps`` steps (at least one)."""
        if steps is None:
            return self.config.epochs
        return max(1, round(steps / self._batches(stays)))

    def fit(self, train: Examples, seed: int, steps: int | None) -> StayScorer:
        config = replace(self.config, seed=seed, epochs=self.epochs_for(len(train), steps))
        coder = fit_coder(train, config)

        def score(stays: Examples) -> FloatArray:
            probs = coder_probabilities(coder, list(stays.sections))
            return true_label_probability(probs, coder.codes, stays.codes)

        return score
