"""How the audit trains its reference models: a recipe, one per kind of model.

A recipe fits a model on a list of stays with a seed and a budget of gradient steps and
returns a scorer (p(true code) per stay). The audit asks the recipe how many steps the
target took on its training set and gives each reference model the same number, so the
reference models are as trained as the target (Carlini et al. 2022 and Zarifzadeh et al.
2024 train reference models exactly like the target). A recipe without a notion of steps
(a convex solver run to convergence) answers ``None`` and uses its own schedule.

The built-in PMSI coder is one recipe (:class:`CoderRecipe`, and the public function
:func:`coder_recipe`, entry point ``passerelle-coder``). A vendor's recipe is a public
recipe function (passerelle.recipes: ``TrainingSet -> model``); :class:`FunctionRecipe`
adapts it to this protocol: Passerelle encodes the stays itself (the target's vocabulary,
input kind and dtype), calls the function, and scores the model it returns.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from passerelle.errors import BadInput
from passerelle.recipes import RecipeFunction, RecipeInfo, TrainingSet
from registry.audit.scoring import coder_probabilities, softmax, true_label_probability
from registry.coder import Architecture, CoderConfig, Examples, bag_of_words, fit_coder
from registry.model_dir import InputKind
from registry.vocabulary import Vocabulary, VocabularyConfig, select_text

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


def coder_recipe(training: TrainingSet) -> Any:
    """The built-in coder as a public recipe (entry point ``passerelle-coder``): the Keras
    embedding-mean model on token ids, or logistic regression on a bag of words, with the
    default hyperparameters, for ``training.steps`` steps (default: 4 epochs of 128)."""
    if training.inputs.dtype.kind == "f":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=20.0, max_iter=300, random_state=training.seed)
        return model.fit(training.inputs, training.labels)
    import tensorflow as tf

    from registry.coder import build_keras_model

    config = CoderConfig(vocabulary=VocabularyConfig(max_len=training.inputs.shape[1]),
                         seed=training.seed)
    epochs = CoderRecipe(config).epochs_for(len(training.labels), training.steps)
    tf.keras.utils.set_random_seed(training.seed)
    model = build_keras_model(max(training.vocabulary_size, int(training.inputs.max()) + 1),
                              len(training.codes), config)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(training.inputs, training.labels, epochs=epochs, batch_size=config.batch_size,
              shuffle=True, verbose=0)
    return model


_DTYPES = {"int32": np.int32, "int64": np.int64, "float32": np.float32}


@dataclass(frozen=True)
class Encoding:
    """How Passerelle turns stays into the target's input, and reads its output."""

    vocabulary: Vocabulary
    input_kind: InputKind
    dtype: str  # "int32" | "int64" | "float32"
    codes: tuple[str, ...]  # the target's label table: the output's columns
    scores: str = "logits"  # what the model outputs: "logits" | "probabilities"

    def encode(self, stays: Examples) -> tuple[npt.NDArray[Any], tuple[str, ...]]:
        texts = tuple(select_text(s, self.vocabulary.config.sections) for s in stays.sections)
        ids = self.vocabulary.encode(list(texts))
        x = bag_of_words(ids, len(self.vocabulary)) \
            if self.input_kind is InputKind.BAG_OF_WORDS else ids
        return x.astype(_DTYPES[self.dtype]), texts


@dataclass(frozen=True)
class FunctionRecipe:
    """A public recipe function as the audit's :class:`Recipe`.

    Passerelle encodes every stay itself (:class:`Encoding`: the target's vocabulary,
    input kind and dtype), hands the function the half's stays whose code is in the
    target's label table (a stay with another code cannot be a training example of that
    table), and scores the model returned on every pool stay (softmax of its logits)."""

    function: RecipeFunction
    info: RecipeInfo
    encoding: Encoding
    target_steps: int | None  # what the target took (declared, or the built-in schedule)

    @property
    def name(self) -> str:
        return self.info.name

    def steps(self, train_stays: int) -> int | None:
        return self.target_steps

    def fit(self, train: Examples, seed: int, steps: int | None) -> StayScorer:
        codes = self.encoding.codes
        index = {c: i for i, c in enumerate(codes)}
        known = train.subset([i for i, c in enumerate(train.codes) if c in index])
        x, texts = self.encoding.encode(known)
        training = TrainingSet(inputs=x, labels=np.array([index[c] for c in known.codes],
                                                         dtype=np.int64),
                               texts=texts, codes=codes, seed=seed, steps=steps,
                               vocabulary_size=len(self.encoding.vocabulary))
        try:
            model = self.function(training)
        except Exception as e:  # the vendor's code failed: its error, on one line
            raise BadInput(f"recipe {self.name!r} raised {type(e).__name__}: "
                           f"{_one_line(e)}") from e
        return model_scorer(model, self.encoding, f"recipe {self.name!r}")


def model_scorer(model: Any, encoding: Encoding, what: str) -> StayScorer:
    """p(true code) per stay under ``model`` (BadInput if it cannot be scored or its output
    is not one score per code of the table)."""
    def score(stays: Examples) -> FloatArray:
        x, texts = encoding.encode(stays)
        logits = _checked_logits(model, x, texts, encoding.scores, len(encoding.codes), what)
        return true_label_probability(softmax(logits), encoding.codes, stays.codes)

    return score


def _checked_logits(model: Any, x: npt.NDArray[Any], texts: tuple[str, ...], scores: str,
                    n_codes: int, what: str) -> npt.NDArray[np.float64]:
    try:
        out = np.asarray(_model_logits(model, x, texts, scores), dtype=np.float64)
    except Exception as e:
        raise BadInput(f"{what} returned a model Passerelle cannot score: "
                       f"{type(e).__name__}: {_one_line(e)}") from e
    if out.shape != (len(x), n_codes):
        raise BadInput(f"{what} returned a model whose scores have shape {out.shape} on "
                       f"{len(x)} stays; expected ({len(x)}, {n_codes}), one per code")
    if not np.isfinite(out).all():
        raise BadInput(f"{what} returned a model whose scores are not finite")
    return out


def _model_logits(model: Any, x: npt.NDArray[Any], texts: tuple[str, ...],
                  scores: str) -> npt.NDArray[np.float64]:
    """(n, C) logits of what a recipe returned, through the intake's framework bridge
    (registry.sources.source_logits) once its framework is known from its type."""
    from registry.sources import source_logits

    return np.asarray(source_logits(model, framework_of_model(model), x, texts, scores),
                      dtype=np.float64)


def framework_of_model(model: Any) -> str:
    """"onnx" | "sklearn" | "keras" from the type of a model in memory (TypeError else)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return "onnx"
    if hasattr(model, "decision_function") or hasattr(model, "predict_proba"):
        return "sklearn"
    if "tensorflow" in sys.modules and isinstance(model, sys.modules["tensorflow"].keras.Model):
        return "keras"
    raise TypeError(f"a {type(model).__module__}.{type(model).__name__} is neither a Keras "
                    "model, a scikit-learn estimator nor an onnx.ModelProto")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
