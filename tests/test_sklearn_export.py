"""scikit-learn estimators and Pipelines -> ONNX with one output ``logits``: parity with
scikit-learn (onnxruntime, max |diff| <= 1e-4, same top-1) for every estimator kind,
bare and behind each preprocessing step, for two classes and for several.

Data: small generated bags of words (token frequencies, as Passerelle encodes them) whose
label depends on a few columns, so that every estimator learns something."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler, Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from adapters.onnx_export import PROBABILITY_FLOOR, sklearn_logits, sklearn_to_onnx
from passerelle.errors import ConversionError

V = 40
TOLERANCE = 1e-4

ESTIMATORS: dict[str, Callable[[], Any]] = {
    "LogisticRegression": lambda: LogisticRegression(max_iter=500),
    "LinearSVC": lambda: LinearSVC(),
    "SGDClassifier": lambda: SGDClassifier(random_state=0),
    "RandomForest": lambda: RandomForestClassifier(n_estimators=8, max_depth=6,
                                                   random_state=0),
    "MLPClassifier": lambda: MLPClassifier((12,), max_iter=200, random_state=0),
}
STEPS: dict[str, Callable[[], Any] | None] = {
    "bare": None,
    "Normalizer": Normalizer,
    "StandardScaler": lambda: StandardScaler(with_mean=False),
    "MaxAbsScaler": MaxAbsScaler,
    "TfidfTransformer": TfidfTransformer,
}


def _data(n_classes: int, n: int = 240) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    rng = np.random.default_rng(n_classes)
    counts = rng.poisson(0.4, (n, V)).astype(np.float32)
    y = (counts[:, :n_classes].argmax(1) + (counts[:, n_classes:].sum(1) > 6)) % n_classes
    return counts / np.maximum(counts.sum(1, keepdims=True), 1), y


def _onnx_logits(proto: onnx.ModelProto, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    out: npt.NDArray[Any] = session.run(["logits"], {"bag_of_words": x})[0]
    return out


def _fitted(estimator: str, step: str, n_classes: int) -> tuple[Any, npt.NDArray[Any]]:
    x, y = _data(n_classes)
    make = STEPS[step]
    model = ESTIMATORS[estimator]() if make is None else make_pipeline(
        make(), ESTIMATORS[estimator]())
    with warnings.catch_warnings():  # convergence warnings on tiny data
        warnings.simplefilter("ignore")
        model.fit(x, y)
    return model, x


@pytest.mark.parametrize("n_classes", [2, 5])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_onnx_logits_equal_the_source_model(estimator: str, step: str,
                                            n_classes: int) -> None:
    model, x = _fitted(estimator, step, n_classes)
    proto = sklearn_to_onnx(model, V)
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert [i.name for i in proto.graph.input] == ["bag_of_words"]
    got = _onnx_logits(proto, x)
    expected = sklearn_logits(model, x)
    assert got.shape == expected.shape == (len(x), n_classes)
    if estimator == "RandomForest" and step == "StandardScaler":
        # A float32 Scaler can move a value across a split threshold that scikit-learn
        # compared in float64: registration's parity check refuses such a model. Here
        # only the top-1 is asserted.
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
        return
    assert np.abs(got - expected).max() <= TOLERANCE
    assert (got.argmax(1) == expected.argmax(1)).all()
    # the top-1 is the source's predict
    predicted = np.searchsorted(model.classes_, model.predict(x))
    assert (got.argmax(1) == predicted).all()


@pytest.mark.parametrize("estimator", ["LogisticRegression", "LinearSVC", "SGDClassifier"])
def test_two_classes_are_zero_and_the_decision_function(estimator: str) -> None:
    model, x = _fitted(estimator, "bare", 2)
    got = _onnx_logits(sklearn_to_onnx(model, V), x)
    d = model.decision_function(x)
    np.testing.assert_allclose(got[:, 0], 0.0, atol=0)
    assert np.abs(got[:, 1] - d).max() <= TOLERANCE
    if estimator == "LogisticRegression":  # softmax of (0, d) is predict_proba
        e = np.exp(got - got.max(1, keepdims=True))
        np.testing.assert_allclose(e / e.sum(1, keepdims=True), model.predict_proba(x),
                                   atol=1e-5)


@pytest.mark.parametrize("n_classes", [2, 5])
def test_mlp_logits_are_log_predict_proba(n_classes: int) -> None:
    model, x = _fitted("MLPClassifier", "bare", n_classes)
    got = _onnx_logits(sklearn_to_onnx(model, V), x)
    assert np.abs(got - np.log(model.predict_proba(x))).max() <= TOLERANCE


def test_forest_logits_are_floored_log_predict_proba() -> None:
    model, x = _fitted("RandomForest", "bare", 5)
    proto = sklearn_to_onnx(model, V)
    got = _onnx_logits(proto, x)
    p = model.predict_proba(x)
    assert (p == 0).any()  # the floor is exercised
    assert np.abs(got - np.log(np.maximum(p, PROBABILITY_FLOOR))).max() <= TOLERANCE
    assert np.isfinite(got).all()
    assert any(n.op_type == "TreeEnsembleClassifier" for n in proto.graph.node)


def test_pipeline_constants_are_not_trainable_weights() -> None:
    """The TfidfTransformer's idf is preprocessing: a Constant node, so fine-tuning (which
    trains initializers) moves only the estimator's weights."""
    from adapters.onnx_tf import parameter_groups

    model, _ = _fitted("SGDClassifier", "TfidfTransformer", 5)
    proto = sklearn_to_onnx(model, V)
    weights = [w for names in parameter_groups(proto).values() for w in names]
    idf = model.steps[0][1].idf_
    for name in weights:
        tensor = next(t for t in proto.graph.initializer if t.name == name)
        assert onnx.numpy_helper.to_array(tensor).size != idf.size
    assert any(n.op_type == "Constant" for n in proto.graph.node)
    assert set(parameter_groups(proto)) == {"MatMul", "Add"}


def test_regressor_is_refused_with_a_reason() -> None:
    from sklearn.linear_model import Ridge

    x, y = _data(5)
    with pytest.raises(ConversionError, match="not a classifier"):
        sklearn_to_onnx(Ridge().fit(x, y.astype(float)), V)


def test_transformers_of_another_width_are_refused() -> None:
    model, _ = _fitted("LinearSVC", "MaxAbsScaler", 5)
    with pytest.raises(ConversionError, match=f"do not take {V + 3} features"):
        sklearn_to_onnx(model, V + 3)


@pytest.mark.parametrize("n_classes", [2, 5])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("estimator", ["LogisticRegression", "LinearSVC", "SGDClassifier",
                                       "MLPClassifier"])
def test_the_executor_runs_and_differentiates_the_written_onnx(
        estimator: str, step: str, n_classes: int) -> None:
    """What fine-tuning needs: the executor gives onnxruntime's logits, every default
    trainable weight gets a gradient, and the preprocessing's constants are not weights."""
    import tensorflow as tf

    from adapters.model_kind import default_trainable, refuse_untrainable
    from adapters.onnx_tf import OnnxExecutor

    model, x = _fitted(estimator, step, n_classes)
    proto = sklearn_to_onnx(model, V)
    refuse_untrainable(proto)
    executor = OnnxExecutor.from_model(proto)
    got = executor({"bag_of_words": x})["logits"].numpy()
    assert np.abs(got - _onnx_logits(proto, x)).max() <= TOLERANCE
    assert default_trainable(proto)
    with tf.GradientTape() as tape:
        logits = executor({"bag_of_words": x[:16]})["logits"]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.zeros(16, tf.int64), logits=logits))
    grads = tape.gradient(loss, executor.trainable_variables)
    assert grads and all(g is not None for g in grads)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


def test_a_forest_is_refused_by_the_executor_with_the_reason() -> None:
    from adapters.model_kind import NotGradientTrainable, refuse_untrainable

    model, _ = _fitted("RandomForest", "TfidfTransformer", 5)
    with pytest.raises(NotGradientTrainable,
                       match="gradient-based DP-SGD does not apply to tree ensembles"):
        refuse_untrainable(sklearn_to_onnx(model, V))
