"""A vendor's scikit-learn model as Passerelle reads stays: a bag of words.

:func:`prepare_sklearn` takes a fitted estimator or Pipeline as the vendor has it and
returns :class:`PreparedSklearn`: an estimator that takes Passerelle's bag of words
(:meth:`passerelle.vocabulary.Vocabulary.bag_of_words`), the vocabulary when it came from
the vendor's vectorizer, and the input kind. ``adapters.onnx_export.sklearn_to_onnx``
converts the estimator; ``adapters.onnx_export.sklearn_logits`` scores it.

* A model that already takes a bag of words (a bare classifier, or a Pipeline of
  transformers + classifier, fitted on Passerelle's bag of words) is returned as it is,
  with no vocabulary: the vendor's ``vocabulary.json`` is the one the manifest names.
* A Pipeline that starts on raw text with a ``TfidfVectorizer`` or ``CountVectorizer``
  becomes Passerelle's contract:

  1. the Vocabulary's tokens are ``<pad>``, ``<oov>``, then the vectorizer's features in
     column order (``vocabulary_``): vectorizer column ``j`` is Passerelle column
     ``j + 2``. The two reserved columns are kept; Passerelle's bag of words leaves them
     at zero, and the estimator gets zero weights for them (a linear model's
     coefficients, an MLP's first layer, a tree's feature indices shifted by two), so
     nothing is gathered or sliced in the ONNX graph;
  2. the vectorizer's weighting becomes a ``TfidfTransformer`` with the same ``idf_``,
     ``norm`` and ``use_idf`` (``smooth_idf`` is already in ``idf_``), followed by the
     pipeline's other steps, widened by the two reserved columns.

  Passerelle's bag of words holds token *frequencies* (counts divided by the number of
  in-vocabulary tokens, over the first ``max_len`` tokens), not counts. The two agree
  after any per-row normalisation, so the pipeline must normalise first: a
  TfidfVectorizer with ``norm`` "l1" or "l2" and ``sublinear_tf=False``, or a
  CountVectorizer followed by a TfidfTransformer (same conditions) or a Normalizer.
  ``norm=None``, ``sublinear_tf=True`` and ``binary=True`` read counts and are refused.

The tokenisation must be Passerelle's (:func:`passerelle.vocabulary.tokenize`: NFC, lower
case, maximal runs of letters and digits, ``_`` separating words, accents kept):
``analyzer="word"``, ``ngram_range=(1, 1)``, ``lowercase=True``, ``strip_accents=None``,
no ``tokenizer``/``preprocessor``, and a ``token_pattern`` of :data:`TOKEN_PATTERNS`.
scikit-learn's default ``(?u)\\b\\w\\w+\\b`` is refused: ``\\w`` includes ``_``, so
``dose_max`` is one feature for scikit-learn and the two tokens ``dose``, ``max`` for
Passerelle. Use ``token_pattern=r"(?u)[^\\W_][^\\W_]+"`` (the default's tokens, with
``_`` separating words; single letters, which the default drops, are out of vocabulary
for Passerelle and count for nothing) or ``r"(?u)[^\\W_]+"`` (Passerelle's tokens
exactly). Stop words and ``min_df``/``max_df``/``max_features`` are fine: the features
they remove are absent from the vocabulary. The vectorizer's ``stop_words_`` (the
pruned terms, data about the corpus) is not carried over.

Agreement holds when the texts are NFC (Passerelle normalises; scikit-learn does not) and
at most ``max_len`` tokens long (Passerelle truncates; scikit-learn reads everything):
``max_len`` is a parameter of :func:`prepare_sklearn`, recorded in the vocabulary.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from passerelle.contract import InputKind
from passerelle.errors import BadInput
from passerelle.vocabulary import (
    CLINICAL_SECTIONS,
    Vocabulary,
    VocabularyConfig,
    VocabularyStats,
    tokenize,
)

RESERVED = 2  # <pad>, <oov>: Passerelle's columns 0 and 1, always zero in a bag of words
DEFAULT_MAX_LEN = 512
COMPATIBLE_PATTERN = r"(?u)[^\W_][^\W_]+"
TOKEN_PATTERNS = frozenset({
    COMPATIBLE_PATTERN, r"[^\W_][^\W_]+", r"(?u)[^\W_]{2,}", r"[^\W_]{2,}",
    r"(?u)[^\W_]+", r"[^\W_]+",
})
_SKLEARN_DEFAULT_PATTERN = r"(?u)\b\w\w+\b"


class UnsupportedVectorizer(BadInput):
    """The vendor's text pipeline reads text in a way Passerelle cannot reproduce."""


@dataclass(frozen=True)
class PreparedSklearn:
    """A scikit-learn model on Passerelle's bag of words.

    ``estimator`` takes float32 bag-of-words rows of width ``n_features``;
    ``vocabulary`` is set when it was built from the vendor's vectorizer (else the
    manifest's vocabulary applies, of ``n_features`` tokens)."""

    estimator: Any
    vocabulary: Vocabulary | None
    input_kind: InputKind
    n_features: int


def prepare_sklearn(model: Any, *, max_len: int = DEFAULT_MAX_LEN,
                    sections: Sequence[str] = CLINICAL_SECTIONS) -> PreparedSklearn:
    """The vendor's fitted estimator or Pipeline, as an estimator on Passerelle's bag of
    words (see the module docstring). Raises :class:`UnsupportedVectorizer` (exit 2)
    for a vectorizer whose analysis Passerelle cannot reproduce, with what to change."""
    from sklearn.feature_extraction.text import CountVectorizer, HashingVectorizer
    from sklearn.pipeline import Pipeline

    steps = _steps(model)
    first = steps[0][1] if steps else model
    if isinstance(first, HashingVectorizer):
        raise UnsupportedVectorizer(
            "HashingVectorizer has no vocabulary: Passerelle needs the features' tokens; "
            "use a TfidfVectorizer or CountVectorizer")
    if not isinstance(first, CountVectorizer):  # TfidfVectorizer is a CountVectorizer
        n = getattr(model, "n_features_in_", None)
        if not isinstance(n, int | np.integer):
            raise BadInput(f"{type(model).__name__} does not say how many features it "
                           "takes (n_features_in_): is it fitted?")
        return PreparedSklearn(model, None, InputKind.BAG_OF_WORDS, int(n))
    if len(steps) < 2:
        raise UnsupportedVectorizer("a vectorizer alone is not a classifier: the pipeline "
                                    "must end with an estimator")
    _check_analysis(first)
    tokens = _features(first)
    rest = [step for _, step in steps[1:]]
    weighting = _weighting(first, rest[0] if len(rest) > 1 else None, len(tokens))
    width = len(tokens) + RESERVED
    widened = [(f"step{i}", _widen(step, width)) for i, step in enumerate(rest)]
    bow_steps = ([("tfidf", weighting)] if weighting is not None else []) + widened
    estimator = Pipeline(bow_steps) if len(bow_steps) > 1 else bow_steps[0][1]
    vocabulary = Vocabulary(
        tokens=("<pad>", "<oov>", *tokens),
        config=VocabularyConfig(min_patients=1, drop_identifiers=False,
                                max_size=width, max_len=max_len, sections=tuple(sections)),
        stats=VocabularyStats(candidate_tokens=len(tokens), dropped_rare=0,
                              dropped_identifier=0, dropped_over_size=0))
    return PreparedSklearn(estimator, vocabulary, InputKind.BAG_OF_WORDS, width)


def _steps(model: Any) -> list[tuple[str, Any]]:
    from sklearn.pipeline import Pipeline

    if not isinstance(model, Pipeline):
        return []
    return [(n, s) for n, s in model.steps if s not in (None, "passthrough")]


# ------------------------------------------------------------------ the analysis


def _check_analysis(v: Any) -> None:
    """Refuse what Passerelle's tokenizer (passerelle.vocabulary.tokenize) does not do."""
    name = type(v).__name__
    fix = f'token_pattern=r"{COMPATIBLE_PATTERN}"'
    if v.input != "content":
        raise UnsupportedVectorizer(f"{name}(input={v.input!r}): Passerelle passes the "
                                    "stay's text; use input='content'")
    if v.analyzer != "word":
        raise UnsupportedVectorizer(
            f"{name}(analyzer={v.analyzer!r}): Passerelle reads words, not characters or "
            "a custom analyzer; use analyzer='word'")
    if tuple(v.ngram_range) != (1, 1):
        raise UnsupportedVectorizer(f"{name}(ngram_range={tuple(v.ngram_range)}): "
                                    "Passerelle's bag of words has single words; use "
                                    "ngram_range=(1, 1)")
    if v.tokenizer is not None or v.preprocessor is not None:
        raise UnsupportedVectorizer(
            f"{name} has a custom tokenizer or preprocessor: Passerelle cannot reproduce "
            f"it; use tokenizer=None, preprocessor=None and {fix}")
    if not v.lowercase:
        raise UnsupportedVectorizer(f"{name}(lowercase=False): Passerelle lower-cases "
                                    "every text; use lowercase=True")
    if v.strip_accents is not None:
        raise UnsupportedVectorizer(
            f"{name}(strip_accents={v.strip_accents!r}): Passerelle keeps accents; use "
            "strip_accents=None")
    if v.token_pattern == _SKLEARN_DEFAULT_PATTERN:
        raise UnsupportedVectorizer(
            f"{name} uses scikit-learn's default token_pattern, in which '_' joins words "
            f"(Passerelle splits on it); refit with {fix}")
    if v.token_pattern not in TOKEN_PATTERNS:
        raise UnsupportedVectorizer(
            f"{name}(token_pattern={v.token_pattern!r}) is not Passerelle's tokenizer; "
            f"use {fix}")


def _features(v: Any) -> tuple[str, ...]:
    vocab = getattr(v, "vocabulary_", None)
    if not isinstance(vocab, dict) or not vocab:
        raise BadInput(f"{type(v).__name__} has no vocabulary_: is it fitted?")
    by_column = sorted(vocab.items(), key=lambda kv: kv[1])
    if [c for _, c in by_column] != list(range(len(by_column))):
        raise UnsupportedVectorizer(f"{type(v).__name__}.vocabulary_ does not number its "
                                    "columns 0..n-1")
    tokens = tuple(t for t, _ in by_column)
    foreign = [i for i, t in enumerate(tokens) if tokenize(t) != [t]]
    if foreign:  # (a count and a column, never the token: it may be an identifier)
        raise UnsupportedVectorizer(
            f"{len(foreign)} of the vectorizer's features (first: column {foreign[0]}) are "
            "not tokens Passerelle's tokenizer can produce (lower case, NFC, letters and "
            "digits only)")
    return tokens


def _weighting(v: Any, following: Any, n_tokens: int) -> Any:
    """The TfidfTransformer that stands for the vectorizer's weighting (None for a
    CountVectorizer), after checking that counts are normalised per row first."""
    from sklearn.feature_extraction.text import TfidfTransformer, TfidfVectorizer
    from sklearn.preprocessing import Normalizer

    name = type(v).__name__
    if v.binary:
        raise UnsupportedVectorizer(f"{name}(binary=True) is not reproduced; Passerelle's "
                                    "bag of words holds token frequencies: use binary=False")
    if isinstance(v, TfidfVectorizer):
        _check_scale_free(name, v.norm, v.sublinear_tf)
        t = TfidfTransformer(norm=v.norm, use_idf=v.use_idf, smooth_idf=v.smooth_idf,
                             sublinear_tf=False)
        if v.use_idf:
            t.idf_ = np.concatenate([np.ones(RESERVED), np.asarray(v.idf_, np.float64)])
        t.n_features_in_ = n_tokens + RESERVED
        return t
    if isinstance(following, TfidfTransformer):
        _check_scale_free("the TfidfTransformer after it", following.norm,
                          following.sublinear_tf)
        return None
    if isinstance(following, Normalizer):
        return None
    raise UnsupportedVectorizer(
        f"{name} gives counts, and Passerelle's bag of words holds token frequencies "
        "(counts / in-vocabulary tokens): follow it with a TfidfTransformer(norm='l2') or "
        "a Normalizer, or use TfidfVectorizer(norm='l2')")


def _check_scale_free(what: str, norm: Any, sublinear_tf: bool) -> None:
    if norm not in ("l1", "l2"):
        raise UnsupportedVectorizer(
            f"{what} has norm={norm!r}: Passerelle's bag of words holds token frequencies, "
            "which equal counts only after normalising each row; use norm='l2' or 'l1'")
    if sublinear_tf:
        raise UnsupportedVectorizer(
            f"{what} has sublinear_tf=True (1 + log(count)): Passerelle's bag of words "
            "holds token frequencies, not counts; use sublinear_tf=False")


# -------------------------------------------------- two more columns, zero weights


def _widen(step: Any, width: int) -> Any:
    """A copy of ``step`` that takes ``width`` columns, the first two (Passerelle's
    reserved ones, always zero) with no effect."""
    for kind, widen in _WIDENERS:
        if isinstance(step, kind()):
            out: Any = copy.deepcopy(step)
            widen(out)
            out.n_features_in_ = width
            return out
    raise UnsupportedVectorizer(
        f"{type(step).__name__} after the vectorizer: Passerelle cannot give it its two "
        "reserved columns; supported: TfidfTransformer, Normalizer, MaxAbsScaler, "
        "StandardScaler, linear classifiers, MLPClassifier, decision trees and forests")


def _pad(values: Any, fill: float) -> Any:
    return np.concatenate([np.full(RESERVED, fill, dtype=np.asarray(values).dtype),
                           np.asarray(values)])


def _widen_tfidf(t: Any) -> None:
    if t.use_idf:
        t.idf_ = _pad(t.idf_, 1.0)


def _widen_scaler(s: Any) -> None:
    for name, fill in (("scale_", 1.0), ("max_abs_", 1.0), ("var_", 1.0), ("mean_", 0.0)):
        if getattr(s, name, None) is not None:
            setattr(s, name, _pad(getattr(s, name), fill))
    seen = getattr(s, "n_samples_seen_", None)
    if isinstance(seen, np.ndarray):
        s.n_samples_seen_ = _pad(seen, float(seen.max()))


def _widen_linear(m: Any) -> None:
    coef = np.asarray(m.coef_)
    m.coef_ = np.hstack([np.zeros((coef.shape[0], RESERVED), coef.dtype), coef])


def _widen_mlp(m: Any) -> None:
    first = m.coefs_[0]
    m.coefs_ = [np.vstack([np.zeros((RESERVED, first.shape[1]), first.dtype), first]),
                *m.coefs_[1:]]


def _widen_tree(t: Any) -> None:
    from sklearn.tree._tree import Tree

    old = t.tree_
    state = old.__getstate__()
    nodes = state["nodes"].copy()
    inner = nodes["feature"] >= 0
    nodes["feature"][inner] += RESERVED
    state["nodes"] = nodes
    new = Tree(old.n_features + RESERVED, np.asarray(old.n_classes, dtype=np.intp),
               old.n_outputs)
    new.__setstate__(state)
    t.tree_ = new
    t.n_features_in_ = old.n_features + RESERVED


def _widen_forest(f: Any) -> None:
    for tree in f.estimators_:
        _widen_tree(tree)


def _types(*names: str) -> Callable[[], tuple[type, ...]]:
    def load() -> tuple[type, ...]:
        import importlib

        out = []
        for dotted in names:
            module, _, attr = dotted.rpartition(".")
            out.append(getattr(importlib.import_module(module), attr))
        return tuple(out)
    return load


_WIDENERS: tuple[tuple[Callable[[], tuple[type, ...]], Callable[[Any], None]], ...] = (
    (_types("sklearn.feature_extraction.text.TfidfTransformer"), _widen_tfidf),
    (_types("sklearn.preprocessing.Normalizer"), lambda s: None),
    (_types("sklearn.preprocessing.MaxAbsScaler", "sklearn.preprocessing.StandardScaler"),
     _widen_scaler),
    (_types("sklearn.linear_model._base.LinearClassifierMixin"), _widen_linear),
    (_types("sklearn.neural_network.MLPClassifier"), _widen_mlp),
    (_types("sklearn.tree._classes.BaseDecisionTree"), _widen_tree),
    (_types("sklearn.ensemble._forest.BaseForest"), _widen_forest),
)
