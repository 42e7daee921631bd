"""The trainable TensorFlow executor for ONNX graphs, against real onnxruntime.

Model families: the reference PMSI coder (Keras -> tf2onnx), scikit-learn logistic
regression (skl2onnx, LinearClassifier), a Keras multilayer perceptron on float input
(tf2onnx) and a scikit-learn MLPClassifier (skl2onnx). Then refusals, and operators on
single-node graphs: every operator the ONNX node tests (tests/test_onnx_node_tests.py) do
not cover, and the cases they miss (bidirectional, reverse and length-masked GRU/LSTM,
1-D, grouped and 3-D convolutions, 1-D pooling). Vendors' architectures are in
tests/test_vendor_models.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
from onnx import TensorProto, helper, numpy_helper

from adapters.errors import (
    UnknownParameter,
    UnsupportedModel,
    UnsupportedOperator,
    UnsupportedOperators,
)
from adapters.onnx_export import OPSET, keras_to_onnx, sklearn_to_onnx
from adapters.onnx_tf import (
    ML_DOMAIN,
    OnnxExecutor,
    load_model,
    parameter_groups,
    supported_operators,
)
from passerelle.errors import BadInput
from registry.coder import CoderConfig, build_keras_model
from registry.vocabulary import VocabularyConfig

TOLERANCE = 1e-4
VOCAB, CLASSES, MAX_LEN, FEATURES = 200, 6, 24, 30


@dataclass
class Family:
    name: str
    proto: onnx.ModelProto
    input_name: str
    train_x: npt.NDArray[Any]
    train_y: npt.NDArray[np.int64]
    heldout_x: npt.NDArray[Any]
    score: str  # the output the loss is computed on
    probabilities: bool = False  # the score output is already a probability
    parity: dict[str, float] = field(default_factory=dict)


def _token_ids(rng: np.random.Generator, n: int) -> npt.NDArray[np.int32]:
    ids = rng.integers(1, VOCAB, size=(n, MAX_LEN)).astype(np.int32)
    lengths = rng.integers(1, MAX_LEN + 1, size=n)
    ids[np.arange(MAX_LEN)[None, :] >= lengths[:, None]] = 0  # padding, never a whole row
    return ids


def _frequencies(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    x = rng.random((n, FEATURES)) * (rng.random((n, FEATURES)) < 0.3)
    return np.asarray(x / np.maximum(x.sum(1, keepdims=True), 1e-6), dtype=np.float32)


def _random_weights(model: Any, seed: int) -> None:
    """Non-zero weights and biases, so that tf2onnx keeps the bias Add nodes."""
    rng = np.random.default_rng(seed)
    model.set_weights([(rng.normal(size=w.shape) * 0.3).astype(np.float32)
                       for w in model.get_weights()])


def _labels_of(x: npt.NDArray[Any], seed: int) -> npt.NDArray[np.int64]:
    flat = x.reshape(len(x), -1).astype(np.float64)
    w = np.random.default_rng(seed).normal(size=(flat.shape[1], CLASSES))
    return np.asarray(np.argmax(flat @ w, axis=1), dtype=np.int64)


def _coder() -> Family:
    tf.keras.utils.set_random_seed(0)
    config = CoderConfig(embedding_dim=16, hidden_units=32,
                         vocabulary=VocabularyConfig(max_len=MAX_LEN))
    model = build_keras_model(VOCAB, CLASSES, config)
    _random_weights(model, 1)
    rng = np.random.default_rng(2)
    x = _token_ids(rng, 256)
    return Family("coder", keras_to_onnx(model, MAX_LEN), "token_ids", x,
                  _labels_of(x % 7, 3), _token_ids(rng, 200), "logits")


def _logreg() -> Family:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    x = _frequencies(rng, 300)
    y = _labels_of(x, 5)
    model = LogisticRegression(max_iter=500).fit(x, y)
    return Family("logreg", sklearn_to_onnx(model, FEATURES), "bag_of_words", x, y,
                  _frequencies(rng, 200), "logits")


def _keras_mlp() -> Family:
    import tf2onnx

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input(shape=(FEATURES,), dtype="float32", name="features")
    h = tf.keras.layers.Dense(32, activation="relu", name="h1")(inp)
    h = tf.keras.layers.Dense(16, activation="tanh", name="h2")(h)
    out = tf.keras.layers.Dense(CLASSES, name="logits")(h)
    model = tf.keras.Model(inp, out, name="mlp")
    _random_weights(model, 6)
    spec = (tf.TensorSpec((None, FEATURES), tf.float32, name="features"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(256, FEATURES)).astype(np.float32)
    return Family("keras-mlp", proto, "features", x, _labels_of(x, 8),
                  rng.normal(size=(200, FEATURES)).astype(np.float32),
                  proto.graph.output[0].name)


def _sklearn_mlp() -> Family:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, FEATURES)).astype(np.float32)
    y = _labels_of(x, 10)
    with warnings.catch_warnings():  # a few hundred iterations are enough here
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0).fit(x, y)
    proto = convert_sklearn(model, initial_types=[("features", FloatTensorType([None, FEATURES]))],
                            target_opset={"": OPSET, "ai.onnx.ml": 3},
                            options={id(model): {"zipmap": False}})
    return Family("sklearn-mlp", proto, "features", x, y,
                  rng.normal(size=(200, FEATURES)).astype(np.float32), "probabilities",
                  probabilities=True)


BUILDERS: Mapping[str, Callable[[], Family]] = {
    "coder": _coder, "logreg": _logreg, "keras-mlp": _keras_mlp, "sklearn-mlp": _sklearn_mlp}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request: pytest.FixtureRequest) -> Family:
    return BUILDERS[request.param]()


@pytest.fixture(scope="module")
def coder() -> Family:
    return _coder()


def _ort(proto: onnx.ModelProto, feeds: Mapping[str, Any]) -> dict[str, Any]:
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def _max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _loss(fam: Family, scores: Any, y: Any) -> Any:
    if fam.probabilities:
        picked = tf.gather(scores, y, batch_dims=1)
        return -tf.reduce_mean(tf.math.log(picked + 1e-7))
    return tf.reduce_mean(
        tf.keras.losses.sparse_categorical_crossentropy(y, scores, from_logits=True))


def _train(fam: Family, executor: OnnxExecutor, steps: int = 5, lr: float = 0.5) -> list[float]:
    """A few real SGD steps inside tf.function; returns the losses."""
    optimizer = tf.keras.optimizers.SGD(lr)

    def one_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = _loss(fam, executor({fam.input_name: x}, [fam.score])[fam.score], y)
        grads = tape.gradient(loss, executor.trainable_variables)
        assert all(g is not None for g in grads)
        optimizer.apply_gradients(zip(grads, executor.trainable_variables, strict=True))
        return loss

    step = tf.function(one_step)

    return [float(step(fam.train_x, fam.train_y)) for _ in range(steps)]


# ------------------------------------------------------------------ model families


@pytest.mark.slow
def test_executor_matches_onnxruntime_before_training(family: Family) -> None:
    executor = OnnxExecutor.from_model(family.proto)
    feeds = {family.input_name: family.heldout_x}
    expected = _ort(family.proto, feeds)
    got = executor(feeds)
    assert set(got) == set(expected)
    for name, value in expected.items():
        if value.dtype.kind == "f":
            diff = _max_diff(value, got[name].numpy())
            print(f"{family.name} before training {name}: max abs diff {diff:.3g}")
            assert diff <= TOLERANCE
        else:
            np.testing.assert_array_equal(value, got[name].numpy())


@pytest.mark.slow
@pytest.mark.parametrize("which", ["keras_model", "logreg_model"])
def test_executor_matches_the_coder_trained_on_the_corpus(
    which: str, request: pytest.FixtureRequest
) -> None:
    """The real reference coders (conftest: trained on the synthetic corpus, real vocabulary)."""
    from passerelle import steps
    from registry.coder import bag_of_words, load_source_model
    from registry.model_dir import Framework, open_model_dir
    from registry.vocabulary import Vocabulary

    report: steps.TrainReport = request.getfixturevalue(which)
    model_dir = open_model_dir(report.out_dir)
    source = load_source_model(model_dir.model_file, model_dir.metadata.framework)
    ids = np.load(report.out_dir / "parity_inputs.npy")
    if model_dir.metadata.framework is Framework.KERAS:
        proto, feeds = keras_to_onnx(source, ids.shape[1]), {"token_ids": ids}
    else:
        vocab = Vocabulary.load(report.out_dir / "vocabulary.json")
        bow = bag_of_words(ids, len(vocab))
        proto, feeds = sklearn_to_onnx(source, bow.shape[1]), {"bag_of_words": bow}
    got = OnnxExecutor.from_model(proto)(feeds)["logits"].numpy()
    diff = _max_diff(got, _ort(proto, feeds)["logits"])
    print(f"{which} (corpus-trained) vs onnxruntime: max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.slow
def test_trained_weights_are_written_back_and_run_in_onnxruntime(
    family: Family, tmp_path: Path
) -> None:
    executor = OnnxExecutor.from_model(family.proto)
    before = {v.name: v.numpy().copy() for v in executor.trainable_variables}
    losses = _train(family, executor)
    assert losses[-1] < losses[0]
    for v in executor.trainable_variables:
        assert not np.array_equal(v.numpy(), before[v.name]), v.name

    path = tmp_path / "finetuned.onnx"
    onnx.save(executor.to_model(), str(path))
    written = load_model(path)
    onnx.checker.check_model(written, full_check=True)
    feeds = {family.input_name: family.heldout_x}
    new = _ort(written, feeds)
    old = _ort(family.proto, feeds)
    mine = executor(feeds)
    for name, value in new.items():
        if value.dtype.kind != "f":
            continue
        diff = _max_diff(value, mine[name].numpy())
        print(f"{family.name} after training {name}: max abs diff {diff:.3g}, "
              f"moved {_max_diff(value, old[name]):.3g}")
        assert diff <= TOLERANCE
        assert _max_diff(value, old[name]) > 1e-3  # the file really changed
    # Same graph: same initializer names, dtypes and shapes, same nodes.
    assert [(t.name, t.data_type, list(t.dims)) for t in written.graph.initializer] == \
        [(t.name, t.data_type, list(t.dims)) for t in family.proto.graph.initializer]
    assert [n.SerializeToString() for n in written.graph.node if n.op_type != "LinearClassifier"] \
        == [n.SerializeToString() for n in family.proto.graph.node
            if n.op_type != "LinearClassifier"]


def _without_weights(model: onnx.ModelProto, names: set[str]) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [t for t in copy.graph.initializer if t.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    return bytes(copy.SerializeToString())


@pytest.mark.slow
def test_frozen_layers_stay_byte_identical(coder: Family) -> None:
    executor = OnnxExecutor.from_model(coder.proto, trainable=["logits"])  # short layer name
    trained = {p.name for p in executor.parameters if p.trainable}
    assert trained == {"pmsi_coder/logits/MatMul/ReadVariableOp:0",
                       "pmsi_coder/logits/BiasAdd/ReadVariableOp:0"}
    assert len(executor.trainable_variables) == 2
    _train(coder, executor)
    written = executor.to_model()
    old = {t.name: t.SerializeToString() for t in coder.proto.graph.initializer}
    new = {t.name: t.SerializeToString() for t in written.graph.initializer}
    for name in old:
        assert (old[name] == new[name]) == (name not in trained), name
    # Everything but the trained tensors is byte for byte the original.
    assert _without_weights(written, trained) == _without_weights(coder.proto, trained)


@pytest.mark.slow
def test_frozen_logreg_coefficients_stay_byte_identical() -> None:
    fam = _logreg()
    executor = OnnxExecutor.from_model(fam.proto, trainable=["LinearClassifier.intercepts"])
    _train(fam, executor)
    (old_node,), (new_node,) = fam.proto.graph.node, executor.to_model().graph.node
    old = {a.name: a.SerializeToString() for a in old_node.attribute}
    new = {a.name: a.SerializeToString() for a in new_node.attribute}
    assert {k for k in old if old[k] != new[k]} == {"intercepts"}


@pytest.mark.slow
def test_layers_are_named_after_keras_layers(coder: Family) -> None:
    groups = parameter_groups(coder.proto)
    assert set(groups) == {"pmsi_coder/embedding", "pmsi_coder/hidden", "pmsi_coder/logits"}
    assert sorted(groups["pmsi_coder/hidden"]) == [
        "pmsi_coder/hidden/BiasAdd/ReadVariableOp:0", "pmsi_coder/hidden/MatMul/ReadVariableOp:0"]
    executor = OnnxExecutor.from_model(coder.proto, trainable=["pmsi_coder/embedding"])
    assert executor.groups() == groups
    assert [p.group for p in executor.parameters if p.trainable] == ["pmsi_coder/embedding"]
    assert all(len(p.consumers) == 1 for p in executor.parameters)  # no tied weights


@pytest.mark.slow
def test_training_an_integer_initializer_is_refused(coder: Family) -> None:
    with pytest.raises(UnsupportedModel, match="only float"):
        OnnxExecutor.from_model(coder.proto, trainable=["pmsi_coder/embedding/NotEqual/y:0"])


@pytest.mark.slow
def test_unknown_trainable_name_is_refused(coder: Family) -> None:
    with pytest.raises(UnknownParameter, match="no weight or group"):
        OnnxExecutor.from_model(coder.proto, trainable=["pmsi_coder/attention"])


@pytest.mark.slow
def test_per_example_gradients_with_vectorized_map_match_a_loop(coder: Family) -> None:
    executor = OnnxExecutor.from_model(coder.proto)
    variables = executor.trainable_variables
    x, y = coder.train_x[:16], coder.train_y[:16]

    def one(xy: tuple[Any, Any]) -> list[Any]:
        with tf.GradientTape() as tape:
            logits = executor({"token_ids": xy[0][tf.newaxis]})["logits"]
            loss = tf.keras.losses.sparse_categorical_crossentropy(
                xy[1][tf.newaxis], logits, from_logits=True)
        return [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]

    vectorized = tf.function(lambda a, b: tf.vectorized_map(one, (a, b)))(x, y)
    looped = [one((tf.constant(x[i]), tf.constant(y[i]))) for i in range(len(x))]
    for k in range(len(variables)):
        np.testing.assert_allclose(vectorized[k].numpy(),
                                   np.stack([g[k].numpy() for g in looped]), atol=1e-6)


def test_tied_weight_is_one_variable_read_by_every_consumer() -> None:
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32) * 2, "w")
    model = onnx.shape_inference.infer_shapes(_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="enc/MatMul"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="dec/MatMul")], [w]))
    executor = OnnxExecutor.from_model(model)
    (param,) = executor.parameters
    assert param.consumers == ("enc/MatMul", "dec/MatMul") and param.group == "enc"
    x = np.ones((2, 3), np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(executor({"x": x})["y"])
    (grad,) = tape.gradient(loss, executor.trainable_variables)
    # d/dW sum(x W W) = x^T 1 W^T + (x W)^T 1: both uses contribute
    ones = np.ones((2, 3), np.float32)
    expected = x.T @ ones @ (np.eye(3) * 2).T + (x @ (np.eye(3) * 2)).T @ ones
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-6)


# ------------------------------------------------------------------------ refusals


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] | None = None,
           opsets: Mapping[str, int] | None = None, **kw: Any) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits or [])
    imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": OPSET}).items()]
    return helper.make_model(graph, opset_imports=imports, **kw)


def _relu_model() -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(_model([helper.make_node("Relu", ["x"], ["y"])]))


def test_unsupported_operators_are_all_listed_at_once() -> None:
    w = numpy_helper.from_array(np.ones((1, 8, 3), np.float32), "w")
    r = numpy_helper.from_array(np.ones((1, 8, 2), np.float32), "r")
    model = _model([
        helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),
        helper.make_node("Einsum", ["x3", "w"], ["h"], equation="bij,bjk->bik"),
        helper.make_node("Frobnicate", ["h"], ["f"], domain="com.example"),
        helper.make_node("Relu", ["f"], ["y"]),
    ], [w, r, numpy_helper.from_array(np.array([1], np.int64), "axes")],
        {"": OPSET, "com.example": 1})
    with pytest.raises(UnsupportedOperators) as info:
        OnnxExecutor.from_model(model)
    assert info.value.operators == (("", "Einsum"), ("com.example", "Frobnicate"))
    assert isinstance(info.value, BadInput) and info.value.exit_code == 2
    assert "ai.onnx::Einsum" in str(info.value) and "com.example::Frobnicate" in str(info.value)


def test_model_local_function_is_refused() -> None:
    fn = helper.make_function("com.example", "MyRelu", ["a"], ["b"],
                              [helper.make_node("Relu", ["a"], ["b"])],
                              [helper.make_opsetid("", OPSET)])
    model = _model([helper.make_node("MyRelu", ["x"], ["y"], domain="com.example")],
                   opsets={"": OPSET, "com.example": 1}, functions=[fn])
    with pytest.raises(UnsupportedModel, match="model-local functions") as info:
        OnnxExecutor.from_model(model)
    assert not isinstance(info.value, UnsupportedOperators)


def test_subgraph_attribute_is_refused() -> None:
    body = helper.make_graph([], "body", [], [])
    node = helper.make_node("Relu", ["x"], ["y"])
    node.attribute.append(helper.make_attribute("then_branch", body))
    with pytest.raises(UnsupportedModel, match="subgraph"):
        OnnxExecutor.from_model(_model([node]))


def test_external_data_is_neither_loaded_nor_accepted(tmp_path: Path) -> None:
    secret = tmp_path / "outside.bin"
    secret.write_bytes(np.arange(6, dtype=np.float32).tobytes())
    inside = tmp_path / "model"
    inside.mkdir()
    w = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3, 2])
    w.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "../outside.bin", "offset": "0", "length": "24"}.items():
        w.external_data.add(key=key, value=value)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [w])
    onnx.save(model, str(inside / "model.onnx"))

    loaded = load_model(inside / "model.onnx")
    assert loaded.graph.initializer[0].raw_data == b""  # the path was never followed
    with pytest.raises(UnsupportedModel, match="external data"):
        OnnxExecutor.from_model(loaded)


def test_opset_outside_the_supported_range_is_refused() -> None:
    with pytest.raises(UnsupportedModel, match="opset 11"):
        OnnxExecutor.from_model(_model([helper.make_node("Relu", ["x"], ["y"])],
                                       opsets={"": 11}))


def test_unreadable_file_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\x00not a protobuf\xff" * 3)
    with pytest.raises(BadInput):
        load_model(tmp_path / "m.onnx")


def test_missing_input_is_bad_input() -> None:
    executor = OnnxExecutor.from_model(_relu_model())
    with pytest.raises(BadInput, match="missing inputs"):
        executor({})


# ------------------------------------------------------------- one op at a time
# (layout=1 recurrent cases are in the ONNX node tests only: onnxruntime refuses them)

F, I32, I64, B, S = (TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64,
                     TensorProto.BOOL, TensorProto.STRING)
_rng = np.random.default_rng(0)
A34 = _rng.normal(size=(3, 4)).astype(np.float32)
B4 = _rng.normal(size=(4,)).astype(np.float32)
P34 = _rng.uniform(0.5, 2.0, size=(3, 4)).astype(np.float32)
P4 = _rng.uniform(0.5, 2.0, size=(4,)).astype(np.float32)
A234 = _rng.normal(size=(2, 3, 4)).astype(np.float32)
X54 = _rng.normal(size=(5, 4)).astype(np.float32)


@dataclass(frozen=True)
class OpCase:
    id: str
    op: str
    args: tuple[str, ...]
    inputs: Mapping[str, npt.NDArray[Any]]
    consts: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[tuple[str, int], ...] = (("y", F),)
    domain: str = ""
    opset: int = OPSET


def _c(id: str, op: str, args: str, inputs: Mapping[str, Any],
       consts: Mapping[str, Any] | None = None, out: int = F, **kw: Any) -> OpCase:
    outputs = kw.pop("outputs", (("y", out),))
    opset = kw.pop("opset", OPSET)
    domain = kw.pop("domain", "")
    return OpCase(id, op, tuple(args.split()), inputs, consts or {}, kw, outputs, domain, opset)


def _i64(*v: Any) -> npt.NDArray[np.int64]:
    return np.array(v, dtype=np.int64)


def _w(*shape: int) -> npt.NDArray[np.float32]:
    return (_rng.normal(size=shape) * 0.5).astype(np.float32)


T, NB, DIN, H = 5, 3, 4, 3  # time steps, batch, input size, hidden size
XS = _rng.normal(size=(T, NB, DIN)).astype(np.float32)
LENS = np.array([5, 2, 3], np.int32)
_RNN_OUT = (("y", F), ("h", F))
_LSTM_OUT = (("y", F), ("h", F), ("c", F))


def _rnn(gates: int, dirs: int, **extra: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
    return {"w": _w(dirs, gates * H, DIN), "r": _w(dirs, gates * H, H),
            "b": _w(dirs, 2 * gates * H), **extra}


_RECURRENT_CASES = [
    _c("GRU-forward", "GRU", "x w r b", {"x": XS}, _rnn(3, 1), outputs=_RNN_OUT, hidden_size=H),
    _c("GRU-reverse-linear-before-reset", "GRU", "x w r b", {"x": XS}, _rnn(3, 1),
       outputs=_RNN_OUT, hidden_size=H, direction="reverse", linear_before_reset=1),
    _c("GRU-bidirectional-lengths-initial", "GRU", "x w r b lens h0", {"x": XS},
       _rnn(3, 2, lens=LENS, h0=_w(2, NB, H)), outputs=_RNN_OUT, hidden_size=H,
       direction="bidirectional", linear_before_reset=1),
    _c("GRU-clip-relu", "GRU", "x w r", {"x": XS * 3}, _rnn(3, 1), outputs=_RNN_OUT,
       hidden_size=H, clip=0.5, activations=["Sigmoid", "Relu"]),
    _c("LSTM-forward", "LSTM", "x w r b", {"x": XS}, _rnn(4, 1), outputs=_LSTM_OUT,
       hidden_size=H),
    _c("LSTM-reverse-lengths", "LSTM", "x w r b lens", {"x": XS}, _rnn(4, 1, lens=LENS),
       outputs=_LSTM_OUT, hidden_size=H, direction="reverse"),
    _c("LSTM-bidirectional-lengths-initial-peepholes", "LSTM", "x w r b lens h0 c0 p",
       {"x": XS}, _rnn(4, 2, lens=LENS, h0=_w(2, NB, H), c0=_w(2, NB, H), p=_w(2, 3 * H)),
       outputs=_LSTM_OUT, hidden_size=H, direction="bidirectional"),
]
X1D = _rng.normal(size=(2, 4, 11)).astype(np.float32)
X2D = _rng.normal(size=(2, 4, 7, 6)).astype(np.float32)
_CONV_CASES = [
    _c("Conv-1d-same", "Conv", "x w b", {"x": X1D}, {"w": _w(6, 4, 3), "b": _w(6)},
       auto_pad="SAME_UPPER"),
    _c("Conv-1d-pads-stride-dilation", "Conv", "x w", {"x": X1D}, {"w": _w(5, 4, 3)},
       pads=[2, 1], strides=[2], dilations=[2]),
    _c("Conv-1d-group", "Conv", "x w b", {"x": X1D}, {"w": _w(6, 2, 2), "b": _w(6)}, group=2),
    _c("Conv-1d-depthwise-same-lower", "Conv", "x w", {"x": X1D}, {"w": _w(4, 1, 4)}, group=4,
       auto_pad="SAME_LOWER", strides=[3]),
    _c("Conv-2d", "Conv", "x w b", {"x": X2D}, {"w": _w(3, 4, 3, 2), "b": _w(3)},
       pads=[1, 0, 1, 1], strides=[2, 1], dilations=[1, 2]),
    _c("Conv-3d-group", "Conv", "x w b", {"x": _rng.normal(size=(1, 4, 5, 4, 6)).astype("f")},
       {"w": _w(4, 2, 2, 3, 2), "b": _w(4)}, group=2, pads=[1, 0, 1, 0, 1, 1], strides=[1, 2, 2]),
    _c("MaxPool-1d", "MaxPool", "x", {"x": X1D}, kernel_shape=[3], strides=[2], pads=[1, 1]),
    _c("MaxPool-1d-ceil", "MaxPool", "x", {"x": X1D}, kernel_shape=[2], strides=[3],
       ceil_mode=1),
    _c("AveragePool-1d-pads", "AveragePool", "x", {"x": X1D}, kernel_shape=[3], pads=[1, 2],
       count_include_pad=0),
    _c("AveragePool-2d-count-pads", "AveragePool", "x", {"x": X2D}, kernel_shape=[2, 3],
       strides=[2, 2], pads=[1, 1, 0, 1], count_include_pad=1),
]
_LC = {"coefficients": _rng.normal(size=12).astype(np.float32).tolist(),
       "intercepts": [0.1, -0.2, 0.3]}
_LC_OUT = (("label", I64), ("y", F))
CASES = [
    *(_c(op, op, "a b", {"a": A34, "b": B4}) for op in ("Add", "Sub", "Mul")),
    _c("Div", "Div", "a b", {"a": A34, "b": P4}),
    _c("Div-int-truncates", "Div", "a b", {"a": np.array([[7, -7, 9], [-9, 5, 1]], np.int32),
                                           "b": np.array([2, 2, -4], np.int32)}, out=I32),
    _c("Pow", "Pow", "a b", {"a": P34, "b": B4}),
    _c("Where", "Where", "c a b", {"c": A34 > 0, "a": A34, "b": B4}),
    *(_c(op, op, "a", {"a": A34}) for op in ("Identity", "Relu", "Tanh", "Sigmoid", "Neg",
                                              "Abs", "Exp")),
    *(_c(op, op, "a", {"a": P34}) for op in ("Sqrt", "Log", "Reciprocal")),
    _c("Not", "Not", "a", {"a": A34 > 0}, out=B),
    _c("Equal", "Equal", "a b", {"a": (A34 * 2).astype(np.int32)},
       {"b": np.array(0, np.int32)}, out=B),
    _c("Greater", "Greater", "a b", {"a": A34, "b": B4}, out=B),
    _c("Less", "Less", "a b", {"a": A34, "b": B4}, out=B),
    _c("Cast-float-int", "Cast", "a", {"a": A34 * 3}, out=I32, to=I32),
    _c("Cast-bool-float", "Cast", "a", {"a": A34 > 0}, to=F),
    _c("Constant", "Constant", "", {}, value=numpy_helper.from_array(A34)),
    _c("MatMul", "MatMul", "a w", {"a": A234}, {"w": _rng.normal(size=(4, 5)).astype("f")}),
    _c("MatMul-1d", "MatMul", "a w", {"a": B4}, {"w": _rng.normal(size=(4, 5)).astype("f")}),
    _c("Gemm", "Gemm", "a w c", {"a": A34}, {"w": _rng.normal(size=(5, 4)).astype("f"),
                                           "c": _rng.normal(size=(5,)).astype("f")},
       transB=1, alpha=0.5, beta=2.0),
    _c("Gemm-transA", "Gemm", "a w", {"a": A34}, {"w": _rng.normal(size=(3, 2)).astype("f")},
       transA=1),
    _c("Softmax", "Softmax", "a", {"a": A234}, axis=1),
    _c("LogSoftmax", "LogSoftmax", "a", {"a": A234}),
    _c("Gather-negative", "Gather", "a i", {"a": X54}, {"i": _i64([0, -1], [2, 4])}),
    _c("Gather-axis1", "Gather", "a i", {"a": X54}, {"i": _i64(2, -3)}, axis=1),
    _c("ReduceSum", "ReduceSum", "a axes", {"a": A234}, {"axes": _i64(1)}, keepdims=0),
    _c("ReduceSum-all", "ReduceSum", "a", {"a": A234}),
    _c("ReduceSum-noop", "ReduceSum", "a axes", {"a": A234}, {"axes": _i64()},
       noop_with_empty_axes=1),
    _c("ReduceMean-17", "ReduceMean", "a", {"a": A234}, axes=[-1]),
    _c("ReduceMean-18", "ReduceMean", "a axes", {"a": A234}, {"axes": _i64(0, 2)},
       keepdims=0, opset=18),
    _c("ReduceMax", "ReduceMax", "a", {"a": A234}, axes=[1], keepdims=0),
    _c("Unsqueeze", "Unsqueeze", "a axes", {"a": A34}, {"axes": _i64(0, -1)}),
    _c("Squeeze", "Squeeze", "a axes", {"a": A234[:, :1, :]}, {"axes": _i64(1)}),
    _c("Squeeze-all", "Squeeze", "a", {"a": A234[:1, :, :1]}),
    _c("Reshape-zero", "Reshape", "a s", {"a": A234}, {"s": _i64(0, -1)}),
    _c("Reshape", "Reshape", "a s", {"a": A234}, {"s": _i64(4, 6)}),
    _c("Flatten", "Flatten", "a", {"a": A234}, axis=2),
    _c("Flatten-0", "Flatten", "a", {"a": A234}, axis=0),
    _c("Transpose", "Transpose", "a", {"a": A234}, perm=[2, 0, 1]),
    _c("Transpose-default", "Transpose", "a", {"a": A234}),
    _c("Concat", "Concat", "a b c", {"a": A34[:, :3], "b": A34[:, :1], "c": P34}, axis=-1),
    _c("Shape", "Shape", "a", {"a": A234}, out=I64, start=1),
    _c("ArgMax-last", "ArgMax", "a", {"a": np.array([[1, 3, 3], [2, 2, 0]], np.float32)},
       out=I64, axis=1, keepdims=0, select_last_index=1),
    _c("ArgMax", "ArgMax", "a", {"a": A34}, out=I64),
    _c("LinearClassifier", "LinearClassifier", "a", {"a": X54}, domain="ai.onnx.ml",
       outputs=_LC_OUT, classlabels_ints=[0, 1, 2], post_transform="NONE", **_LC),
    _c("LinearClassifier-softmax", "LinearClassifier", "a", {"a": X54}, domain="ai.onnx.ml",
       outputs=_LC_OUT, classlabels_ints=[5, 7, 9], post_transform="SOFTMAX", **_LC),
    _c("LinearClassifier-logistic", "LinearClassifier", "a", {"a": X54}, domain="ai.onnx.ml",
       outputs=(("label", S), ("y", F)), classlabels_strings=["I10", "J18", "K35"],
       post_transform="LOGISTIC", **_LC),
    _c("LinearClassifier-binary", "LinearClassifier", "a", {"a": X54}, domain="ai.onnx.ml",
       outputs=_LC_OUT, classlabels_ints=[0, 1], coefficients=_LC["coefficients"][:4],
       intercepts=[0.3]),
    _c("LinearClassifier-binary-logistic", "LinearClassifier", "a", {"a": X54},
       domain="ai.onnx.ml", outputs=_LC_OUT, classlabels_ints=[3, 8],
       coefficients=_LC["coefficients"][:4], intercepts=[0.3], post_transform="LOGISTIC"),
    _c("ArrayFeatureExtractor", "ArrayFeatureExtractor", "a i", {"a": X54},
       {"i": _i64(3, 0)}, domain="ai.onnx.ml"),
    _c("ArrayFeatureExtractor-1d", "ArrayFeatureExtractor", "c i",
       {"i": _i64(2, 0, 2)}, {"c": _i64(10, 20, 30, 40)}, out=I64, domain="ai.onnx.ml"),
    *(_c(f"Normalizer-{norm}", "Normalizer", "a", {"a": np.vstack([X54, np.zeros((1, 4), "f")])},
         domain="ai.onnx.ml", norm=norm) for norm in ("MAX", "L1", "L2")),
    _c("Scaler", "Scaler", "a", {"a": X54}, domain="ai.onnx.ml",
       offset=[0.5, -1.0, 0.0, 2.0], scale=[2.0, 0.5, 1.0, -1.0]),
    _c("Scaler-one-value", "Scaler", "a", {"a": X54}, domain="ai.onnx.ml", offset=[0.5],
       scale=[3.0]),
    *_RECURRENT_CASES,
    *_CONV_CASES,
]


def _single_op_model(case: OpCase) -> onnx.ModelProto:
    def info(name: str, value: npt.NDArray[Any]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)

    node = helper.make_node(case.op, list(case.args), [n for n, _ in case.outputs],
                            domain=case.domain, **case.attrs)
    graph = helper.make_graph(
        [node], case.id, [info(n, v) for n, v in case.inputs.items()],
        [helper.make_tensor_value_info(n, t, None) for n, t in case.outputs],
        [numpy_helper.from_array(v, n) for n, v in case.consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # output shapes
    ranks = {k: v.ndim for k, v in _ort(model, case.inputs).items()}  # where inference can't
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.shape.dim.extend(
                onnx.TensorShapeProto.Dimension(dim_param=f"d{i}") for i in range(ranks[out.name]))
    return model


def test_every_operator_without_a_node_test_has_a_single_op_case() -> None:
    """Each operator of the table is checked against onnxruntime here or against the ONNX
    node tests (tests/test_onnx_node_tests.py), and recurrent, convolution and pooling
    operators, whose node tests miss bidirectional, reverse, sequence_lens, 1-D and
    grouped cases, are checked here too."""
    from tests.onnx_node_suite import claimed_tests

    by_node_test = {t.operator for t in claimed_tests()}
    here = {(c.domain, c.op) for c in CASES}
    assert set(supported_operators()) - by_node_test <= here
    assert {("", "GRU"), ("", "LSTM"), ("", "Conv"), ("", "MaxPool"),
            ("", "AveragePool"), (ML_DOMAIN, "Normalizer")} <= here


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_single_op_matches_onnxruntime(case: OpCase) -> None:
    model = _single_op_model(case)
    expected = _ort(model, case.inputs)
    got = OnnxExecutor.from_model(model)(case.inputs)
    for name, value in expected.items():
        mine = got[name].numpy()
        assert mine.shape == value.shape, name
        if value.dtype.kind == "f":
            np.testing.assert_allclose(mine, value, rtol=1e-5, atol=1e-6)
        elif value.dtype.kind == "O":
            assert [m.decode() for m in mine.ravel()] == list(value.ravel())
        else:
            assert mine.dtype == value.dtype, name
            np.testing.assert_array_equal(mine, value)


def test_single_op_weights_train_in_graph_mode() -> None:
    """Gemm's weight initializers become variables that a tf.function step updates."""
    case = next(c for c in CASES if c.id == "Gemm")
    executor = OnnxExecutor.from_model(_single_op_model(case))
    assert sorted(p.name for p in executor.parameters if p.trainable) == ["c", "w"]

    def gradients(a: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(executor({"a": a})["y"] ** 2)
        return tape.gradient(loss, executor.trainable_variables)

    grads = tf.function(gradients)(A34)
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)


def test_refused_attribute_uses_are_listed_at_once_when_the_executor_is_built() -> None:
    """Before any training step: every node using an operator in a way the executor does
    not claim is named, with the reason."""
    w, r = numpy_helper.from_array(_w(1, 9, 3), "w"), numpy_helper.from_array(_w(1, 9, 3), "r")
    model = _model([
        helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),
        helper.make_node("GRU", ["x3", "w", "r"], ["gy", "gh"], name="gru", hidden_size=3,
                         activations=["HardSigmoid", "Tanh"]),
        helper.make_node("MaxPool", ["gy"], ["p", "indices"], name="pool", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["p"], ["y"]),
    ], [w, r, numpy_helper.from_array(_i64(1), "axes")])
    model.graph.output[0].type.tensor_type.shape.dim.extend(
        onnx.TensorShapeProto.Dimension(dim_param=f"d{i}") for i in range(4))
    with pytest.raises(UnsupportedOperator) as info:
        OnnxExecutor.from_model(model)
    assert [(op, name) for _, op, name, _ in info.value.problems] == [("GRU", "gru"),
                                                                       ("MaxPool", "pool")]
    assert "'HardSigmoid' is not supported" in str(info.value)
    assert "Indices output" in str(info.value)
    assert isinstance(info.value, UnsupportedOperators) and info.value.exit_code == 2


@pytest.mark.parametrize("op", ["Loop", "If", "Scan"])
def test_control_flow_is_refused_with_the_way_to_export_without_it(op: str) -> None:
    body = helper.make_graph([], "body", [], [])
    attrs: dict[str, Any] = {"body": body} if op != "If" else {
        "then_branch": body, "else_branch": body}
    if op == "Scan":
        attrs["num_scan_inputs"] = 1
    node = helper.make_node(op, ["x"] if op == "Scan" else ["", "x"] if op == "Loop" else ["x"],
                            ["y"], **attrs)
    with pytest.raises(UnsupportedOperators) as info:
        OnnxExecutor.from_model(_model([node]))
    assert info.value.operators == (("", op),)
    message = str(info.value)
    assert "fixed sequence length" in message and "LSTM/GRU" in message


def test_recurrent_gradients_reach_every_weight_in_graph_mode() -> None:
    """The bidirectional LSTM's W, R, B and peepholes all get a gradient (sequence_lens
    and initial states included), inside tf.function."""
    case = next(c for c in CASES if c.id == "LSTM-bidirectional-lengths-initial-peepholes")
    executor = OnnxExecutor.from_model(_single_op_model(case))
    names = sorted(p.name for p in executor.parameters if p.trainable)
    assert names == ["b", "c0", "h0", "p", "r", "w"]

    def gradients(x: Any) -> Any:
        with tf.GradientTape() as tape:
            out = executor({"x": x})
            loss = tf.reduce_sum(out["y"] ** 2) + tf.reduce_sum(out["c"])
        return tape.gradient(loss, executor.trainable_variables)

    grads = tf.function(gradients)(XS)
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)


@pytest.mark.parametrize("case_id", ["GRU-bidirectional-lengths-initial",
                                     "LSTM-bidirectional-lengths-initial-peepholes"])
def test_recurrent_ops_run_when_the_sequence_length_is_unknown(case_id: str) -> None:
    """A time dimension unknown when the graph is traced runs the steps in tf.scan: same
    outputs (and gradients) as the unrolled steps."""
    case = next(c for c in CASES if c.id == case_id)
    executor = OnnxExecutor.from_model(_single_op_model(case))
    names = [n for n, _ in case.outputs]

    def run(x: Any) -> Any:
        with tf.GradientTape() as tape:
            out = executor({"x": x})
            loss = tf.add_n([tf.reduce_sum(out[n] ** 2) for n in names])
        return [out[n] for n in names], tape.gradient(loss, executor.trainable_variables)

    unrolled = run(tf.constant(XS))
    scanned = tf.function(run, input_signature=[tf.TensorSpec([None, None, DIN])])(XS)
    for mine, ref in zip([*scanned[0], *scanned[1]], [*unrolled[0], *unrolled[1]], strict=True):
        np.testing.assert_allclose(mine.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_batch_normalization_statistics_never_train() -> None:
    """Running mean and variance are constants: only scale and bias are weights, and a
    training step cannot make a variance negative."""
    c = 4
    inits = {"scale": _w(c), "bias": _w(c), "mean": _w(c),
             "var": _rng.uniform(0.5, 1.0, size=c).astype(np.float32)}
    case = _c("BatchNormalization-weights", "BatchNormalization", "x scale bias mean var",
              {"x": X2D}, inits, epsilon=1e-3)
    model = _single_op_model(case)
    executor = OnnxExecutor.from_model(model)
    assert [p.name for p in executor.parameters] == ["scale", "bias"]
    with pytest.raises(UnknownParameter):
        OnnxExecutor.from_model(model, trainable=["var"])
    optimizer = tf.keras.optimizers.SGD(0.01)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(executor({"x": X2D})["y"] ** 2)
        grads = tape.gradient(loss, executor.trainable_variables)
        optimizer.apply_gradients(zip(grads, executor.trainable_variables, strict=True))
    written = {t.name: numpy_helper.to_array(t) for t in executor.to_model().graph.initializer}
    np.testing.assert_array_equal(written["var"], inits["var"])
    np.testing.assert_array_equal(written["mean"], inits["mean"])
    assert not np.array_equal(written["scale"], inits["scale"])
    np.testing.assert_allclose(executor({"x": X2D})["y"].numpy(),
                               _ort(executor.to_model(), {"x": X2D})["y"], rtol=1e-5, atol=1e-5)
