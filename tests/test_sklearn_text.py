"""A vendor's text pipeline (TfidfVectorizer/CountVectorizer + estimator, fitted on raw
text) as Passerelle's bag-of-words contract: the ONNX of its bag-of-words form on
Passerelle's encoding equals the source pipeline on raw text, and analyses Passerelle
cannot reproduce are refused with what to change."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import (
    CountVectorizer,
    HashingVectorizer,
    TfidfTransformer,
    TfidfVectorizer,
)
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler, Normalizer
from sklearn.svm import LinearSVC

from adapters.onnx_export import sklearn_logits, sklearn_to_onnx
from adapters.sklearn_text import (
    COMPATIBLE_PATTERN,
    RESERVED,
    UnsupportedVectorizer,
    prepare_sklearn,
)
from passerelle.contract import InputKind
from passerelle.corpus import read_corpus
from passerelle.errors import BadInput
from passerelle.vocabulary import CLINICAL_SECTIONS, Vocabulary, select_text, tokenize

P = COMPATIBLE_PATTERN
PIPELINES: dict[str, Callable[[], Any]] = {
    "tfidf+LinearSVC": lambda: make_pipeline(TfidfVectorizer(token_pattern=P), LinearSVC()),
    "tfidf(min_df, stop words)+LinearSVC": lambda: make_pipeline(
        TfidfVectorizer(token_pattern=P, min_df=3, stop_words=["de", "la", "le", "et"]),
        LinearSVC()),
    "count+tfidf+LogisticRegression": lambda: make_pipeline(
        CountVectorizer(token_pattern=P), TfidfTransformer(),
        LogisticRegression(max_iter=300)),
    "count+Normalizer+SGDClassifier": lambda: make_pipeline(
        CountVectorizer(token_pattern=r"(?u)[^\W_]+"), Normalizer(),  # noqa: S106
        SGDClassifier(random_state=0)),
    "tfidf(l1)+MaxAbsScaler+LinearSVC": lambda: make_pipeline(
        TfidfVectorizer(token_pattern=P, norm="l1"), MaxAbsScaler(), LinearSVC()),
    "tfidf+RandomForest": lambda: make_pipeline(
        TfidfVectorizer(token_pattern=P),
        RandomForestClassifier(n_estimators=20, max_depth=12, random_state=0)),
    "tfidf+MLPClassifier": lambda: make_pipeline(
        TfidfVectorizer(token_pattern=P), MLPClassifier((16,), max_iter=30, random_state=0)),
}


def _texts(corpus: Path) -> tuple[list[str], list[str]]:
    stays = read_corpus(corpus).stays
    return ([select_text(s.sections.as_dict(), CLINICAL_SECTIONS) for s in stays],
            [s.main_diagnosis for s in stays])


def _fit(model: Any, texts: list[str], codes: list[str]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(texts, codes)


@pytest.fixture(scope="module")
def texts_x(corpus_x: Path) -> tuple[list[str], list[str]]:
    return _texts(corpus_x)


@pytest.fixture(scope="module")
def texts_y(corpus_y: Path) -> list[str]:
    return _texts(corpus_y)[0]


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_bag_of_words_onnx_equals_the_source_pipeline_on_raw_text(
        kind: str, texts_x: tuple[list[str], list[str]], texts_y: list[str]) -> None:
    model = _fit(PIPELINES[kind](), *texts_x)
    prepared = prepare_sklearn(model)
    assert prepared.input_kind is InputKind.BAG_OF_WORDS and prepared.vocabulary is not None
    vocab = prepared.vocabulary
    assert prepared.n_features == len(vocab) == len(model.steps[0][1].vocabulary_) + RESERVED
    proto = sklearn_to_onnx(prepared.estimator, prepared.n_features)
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for split, texts in (("X", texts_x[0]), ("Y", texts_y)):
        source = sklearn_logits(model, texts)  # the vendor's pipeline on raw text
        got = session.run(["logits"], {"bag_of_words": vocab.bag_of_words(texts)})[0]
        top1 = float((source.argmax(1) == got.argmax(1)).mean())
        diff = float(np.abs(source - got).max())
        print(f"{kind} on {split} ({len(texts)} stays, {len(vocab)} columns): "
              f"top-1 agreement {top1:.4f}, max |diff| {diff:.2e}")
        assert top1 == 1.0 and diff <= 1e-4


def test_vocabulary_is_the_vectorizers_features_in_column_order(
        texts_x: tuple[list[str], list[str]], tmp_path: Path) -> None:
    model = _fit(PIPELINES["tfidf+LinearSVC"](), *texts_x)
    vectorizer, svc = model.steps[0][1], model.steps[1][1]
    prepared = prepare_sklearn(model, max_len=300, sections=("motif", "conclusion"))
    vocab = prepared.vocabulary
    assert vocab is not None
    assert vocab.tokens[:2] == ("<pad>", "<oov>")
    assert list(vocab.tokens[2:]) == list(vectorizer.get_feature_names_out())
    assert vocab.config.max_len == 300 and vocab.config.sections == ("motif", "conclusion")
    # the reserved columns carry zero weights; the others are the vendor's, unchanged
    widened = prepared.estimator.steps[-1][1]
    assert (widened.coef_[:, :RESERVED] == 0).all()
    np.testing.assert_array_equal(widened.coef_[:, RESERVED:], svc.coef_)
    np.testing.assert_array_equal(prepared.estimator.steps[0][1].idf_[RESERVED:],
                                  vectorizer.idf_)
    assert svc.coef_.shape[1] == len(vectorizer.vocabulary_)  # the source is untouched
    vocab.save(tmp_path / "vocabulary.json")
    assert Vocabulary.load(tmp_path / "vocabulary.json").tokens == vocab.tokens


def test_a_model_on_bag_of_words_is_kept_as_it_is() -> None:
    x = np.eye(6, dtype=np.float32)
    svc = LinearSVC().fit(x, [0, 1, 2, 0, 1, 2])
    prepared = prepare_sklearn(svc)
    assert prepared.estimator is svc and prepared.vocabulary is None
    assert prepared.input_kind is InputKind.BAG_OF_WORDS and prepared.n_features == 6


def test_the_default_token_pattern_splits_words_otherwise() -> None:
    """Why scikit-learn's default token_pattern is refused: '_' is a word character for
    it and a separator for Passerelle; the compatible pattern agrees on every token of
    two or more characters."""
    text = "Dose_max atteinte, reprise J2 à l'hôpital: ECG_normal"
    default = re.findall(r"(?u)\b\w\w+\b", text.lower())
    compatible = re.findall(COMPATIBLE_PATTERN, text.lower())
    assert "dose_max" in default and "dose_max" not in tokenize(text)
    assert compatible == [t for t in tokenize(text) if len(t) >= 2]


REFUSED: dict[str, tuple[Callable[[], Any], str]] = {
    "char analyzer": (lambda: TfidfVectorizer(analyzer="char"), "analyzer='word'"),
    "char_wb analyzer": (lambda: TfidfVectorizer(analyzer="char_wb"), "analyzer='word'"),
    "bigrams": (lambda: TfidfVectorizer(token_pattern=P, ngram_range=(1, 2)),
                r"ngram_range=\(1, 1\)"),
    "custom tokenizer": (lambda: TfidfVectorizer(tokenizer=str.split, token_pattern=None),
                         "tokenizer=None"),
    "custom preprocessor": (lambda: TfidfVectorizer(preprocessor=str.upper, token_pattern=P),
                            "preprocessor=None"),
    "no lower case": (lambda: TfidfVectorizer(lowercase=False, token_pattern=P),
                      "lowercase=True"),
    "accents stripped": (lambda: TfidfVectorizer(strip_accents="unicode", token_pattern=P),
                         "strip_accents=None"),
    "default token pattern": (lambda: TfidfVectorizer(), re.escape(COMPATIBLE_PATTERN)),
    "other token pattern": (lambda: TfidfVectorizer(token_pattern=r"\S+"),  # noqa: S106
                            re.escape(COMPATIBLE_PATTERN)),
    "no norm": (lambda: TfidfVectorizer(token_pattern=P, norm=None), "norm='l2'"),
    "sublinear tf": (lambda: TfidfVectorizer(token_pattern=P, sublinear_tf=True),
                     "sublinear_tf=False"),
    "binary": (lambda: TfidfVectorizer(token_pattern=P, binary=True), "binary=False"),
    "raw counts": (lambda: CountVectorizer(token_pattern=P), "TfidfTransformer"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_vectorizer_passerelle_cannot_reproduce_is_refused(
        case: str, texts_x: tuple[list[str], list[str]]) -> None:
    make, fix = REFUSED[case]
    texts, codes = texts_x
    model = _fit(make_pipeline(make(), LinearSVC()), texts[:300], codes[:300])
    with pytest.raises(UnsupportedVectorizer, match=fix) as caught:
        prepare_sklearn(model)
    assert isinstance(caught.value, BadInput) and caught.value.exit_code == 2
    assert "\n" not in str(caught.value)


def test_hashing_vectorizer_is_refused() -> None:
    model = make_pipeline(HashingVectorizer(n_features=64), LinearSVC())
    model.fit(["douleur thoracique", "fièvre toux", "douleur abdominale", "toux"],
              ["a", "b", "a", "b"])
    with pytest.raises(UnsupportedVectorizer, match="no vocabulary"):
        prepare_sklearn(model)


def test_counts_then_raw_tfidf_is_refused(texts_x: tuple[list[str], list[str]]) -> None:
    texts, codes = texts_x
    model = _fit(make_pipeline(CountVectorizer(token_pattern=P), TfidfTransformer(norm=None),
                               LinearSVC()), texts[:300], codes[:300])
    with pytest.raises(UnsupportedVectorizer, match="TfidfTransformer after it has norm=None"):
        prepare_sklearn(model)


def test_fixed_vocabulary_with_tokens_passerelle_never_produces_is_refused() -> None:
    model = make_pipeline(TfidfVectorizer(token_pattern=P,
                                          vocabulary=["douleur", "ecg_normal", "toux"]),
                          LinearSVC())
    model.fit(["douleur ecg_normal", "toux", "douleur", "toux toux"], ["a", "b", "a", "b"])
    with pytest.raises(UnsupportedVectorizer, match="column 1") as caught:
        prepare_sklearn(model)
    assert "ecg_normal" not in str(caught.value)  # counts and columns, never a token
