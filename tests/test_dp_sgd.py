"""DP-SGD's clipping paths, noise and randomness (adapters/dp.py, adapters/randomness.py).

Every per-unit norm and clipped sum is checked against a one-unit-at-a-time reference
(a plain tape over the sum of the unit's stays' losses, clipped by tensorflow-privacy's
``GaussianSumQuery.preprocess_record``), on graphs that exercise each form the
ghost-norm path knows (MatMul, Gemm with transB and its C bias, Add biases, embeddings
read by Gather, a weight read twice, a MatMul over token positions in both its forms,
Conv 1-D and 2-D and a tied kernel, LayerNormalization, BatchNormalization, Mul/Sub
weights broadcast over positions, a weight read through a Transpose), on the vendors'
models of tests/vendor_models.py, and on graphs it must refuse or detect (a weight read
directly and transposed, a time-major layer, factors that mix the stays of a batch).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import pytest
import tensorflow as tf
from onnx import TensorProto, helper, numpy_helper
from tensorflow_privacy import GaussianSumQuery

from adapters.dp import (
    CLIP_MARGIN,
    ClipPath,
    DpSgd,
    DpSgdPlan,
    GradientNotFinite,
    poisson_sample,
    train_dp_sgd,
)
from adapters.onnx_export import keras_to_onnx
from adapters.onnx_tf import OnnxExecutor
from adapters.randomness import SecureRandom
from passerelle.errors import BadInput
from registry.coder import CoderConfig, build_keras_model
from registry.vocabulary import VocabularyConfig

N_CLASSES = 3


def _init(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_type: int,
           x_shape: list[Any], opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", x_type, x_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", N_CLASSES])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _dense_graph() -> onnx.ModelProto:
    """MatMul + Add bias + Relu, then Gemm(transB, alpha) with its C bias."""
    rng = np.random.default_rng(0)
    return _model([
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="enc/MatMul"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="enc/Add"),
        helper.make_node("Relu", ["hb"], ["r"], name="enc/Relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="out/Gemm", transB=1,
                         alpha=0.7),
    ], [_init(rng, "w1", 4, 5), _init(rng, "b1", 5), _init(rng, "w2", N_CLASSES, 5),
        _init(rng, "b2", N_CLASSES)], TensorProto.FLOAT, ["n", 4])


def _tied_graph() -> onnx.ModelProto:
    """w1 read by two MatMuls, a bias read by two Adds."""
    rng = np.random.default_rng(1)
    return _model([
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="enc/MatMul"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="enc/Add"),
        helper.make_node("Tanh", ["hb"], ["t"], name="enc/Tanh"),
        helper.make_node("MatMul", ["t", "w1"], ["h2"], name="mid/MatMul"),
        helper.make_node("Add", ["h2", "b"], ["h2b"], name="mid/Add"),
        helper.make_node("MatMul", ["h2b", "w2"], ["logits"], name="out/MatMul"),
    ], [_init(rng, "w1", 4, 4), _init(rng, "b", 4), _init(rng, "w2", 4, N_CLASSES)],
        TensorProto.FLOAT, ["n", 4])


def _residual_graph() -> onnx.ModelProto:
    """A MatMul output read by its bias Add and by a residual Add: the weight's output
    gradient is not the Add's (the bias cannot be folded into the layer)."""
    rng = np.random.default_rng(6)
    return _model([
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="enc/MatMul"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="enc/Add"),
        helper.make_node("Relu", ["hb"], ["r"], name="enc/Relu"),
        helper.make_node("Add", ["r", "h"], ["res"], name="res/Add"),
        helper.make_node("MatMul", ["res", "w2"], ["logits"], name="out/MatMul"),
    ], [_init(rng, "w1", 4, 4), _init(rng, "b1", 4), _init(rng, "w2", 4, N_CLASSES)],
        TensorProto.FLOAT, ["n", 4])


def _token_graph() -> onnx.ModelProto:
    """An embedding read twice (mean and max over tokens), a MatMul applied per token
    (several positions per stay), then a dense layer."""
    rng = np.random.default_rng(2)
    axes = numpy_helper.from_array(np.asarray([1], np.int64), "axes")
    return _model([
        helper.make_node("Gather", ["emb", "x"], ["e"], name="emb/Gather"),
        helper.make_node("Gather", ["emb", "x"], ["e2"], name="emb/Gather2"),
        helper.make_node("MatMul", ["e", "wt"], ["pt"], name="tok/MatMul"),
        helper.make_node("Relu", ["pt"], ["rt"], name="tok/Relu"),
        helper.make_node("ReduceSum", ["rt", "axes"], ["s"], name="pool/Sum", keepdims=0),
        helper.make_node("ReduceMax", ["e2"], ["m"], name="pool/Max", axes=[1], keepdims=0),
        helper.make_node("Concat", ["s", "m"], ["c"], name="pool/Concat", axis=1),
        helper.make_node("MatMul", ["c", "wo"], ["o"], name="out/MatMul"),
        helper.make_node("Add", ["o", "bo"], ["logits"], name="out/Add"),
    ], [_init(rng, "emb", 11, 3), _init(rng, "wt", 3, 4), _init(rng, "wo", 7, N_CLASSES),
        _init(rng, "bo", N_CLASSES), axes], TensorProto.INT64, ["n", 5])


@pytest.fixture(scope="module")
def coder_graph() -> onnx.ModelProto:
    """The reference PMSI coder's own architecture (masked embedding mean, two Dense),
    converted by tf2onnx as a vendor's model would be."""
    config = CoderConfig(embedding_dim=8, hidden_units=16, seed=4,
                         vocabulary=VocabularyConfig(max_len=12))
    return keras_to_onnx(build_keras_model(40, N_CLASSES, config), 12)


def _batch(graph: str, rng: np.random.Generator) -> tuple[np.ndarray[Any, Any], ...]:
    seg = np.asarray([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4], np.int32)  # 5 units, 11 stays
    y = rng.integers(0, N_CLASSES, size=len(seg))
    if graph == "coder":
        x = rng.integers(1, 40, size=(len(seg), 12)).astype(np.int32)
        x[:, 6:] = 0  # padding (masked)
        x[1] = x[0]  # two identical stays of one patient: their rows add up
    elif graph == "tokens":
        x = rng.integers(-11, 11, size=(len(seg), 5))  # negative ids count from the end
    else:  # dense, tied, residual
        x = 3 * rng.normal(size=(len(seg), 4)).astype(np.float32)
    return x, y, seg


def _reference(executor: OnnxExecutor, name: str, x: Any, y: Any, seg: Any,
               clip: float) -> tuple[list[float], list[np.ndarray[Any, Any]]]:
    """One unit at a time: its stays' summed gradient, its norm, clipped by
    tensorflow-privacy's rule; the sum of the clipped gradients."""
    query = GaussianSumQuery(l2_norm_clip=clip, stddev=0.0)
    params = query.derive_sample_params(query.initial_global_state())
    norms, total = [], None
    for u in range(int(seg.max()) + 1):
        with tf.GradientTape() as tape:
            logits = executor({name: x[seg == u]})["logits"]
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                y[seg == u], logits))
        grads = [tf.convert_to_tensor(g)
                 for g in tape.gradient(loss, executor.trainable_variables)]
        norms.append(math.sqrt(sum(float(tf.reduce_sum(g ** 2)) for g in grads)))
        clipped = [c.numpy() for c in query.preprocess_record(params, grads)]
        total = clipped if total is None else [t + c for t, c in zip(total, clipped,
                                                                       strict=True)]
    assert total is not None
    return norms, total


GRAPHS = {"dense": _dense_graph, "tied": _tied_graph, "tokens": _token_graph,
          "residual": _residual_graph}


@pytest.mark.parametrize("graph", ["dense", "tied", "residual", "tokens", "coder"])
@pytest.mark.parametrize("path", [ClipPath.GHOST, ClipPath.PER_EXAMPLE])
def test_per_patient_norms_and_clipped_sum_equal_the_one_patient_at_a_time_reference(
        graph: str, path: ClipPath, coder_graph: onnx.ModelProto) -> None:
    """A patient's stays summed, then clipped once over all trained weights (tied weights
    as one), on both paths; a wrong Gram term, a bias counted twice, an embedding row
    not summed over a patient's stays, or a tied weight clipped per use all fail."""
    proto = coder_graph if graph == "coder" else GRAPHS[graph]()
    executor = OnnxExecutor.from_model(proto)
    name = executor.input_names[0]
    x, y, seg = _batch(graph, np.random.default_rng(5))
    norms_ref, _ = _reference(executor, name, x, y, seg, 1.0)
    clip = float(np.median(norms_ref))  # some patients clipped, some not
    # ours clips at clip * (1 - CLIP_MARGIN) (the float64 rounding margin)
    norms_ref, sum_ref = _reference(executor, name, x, y, seg, clip * (1 - CLIP_MARGIN))
    sgd = DpSgd(executor, name, "logits", clip, 1.0, tf.keras.optimizers.SGD(0.1),
                path=path)
    summed, norms = sgd.clipped_sum(x, y, seg, int(seg.max()) + 1)
    assert sgd.path is path
    np.testing.assert_allclose(norms.numpy(), norms_ref, rtol=1e-5)
    for got, want in zip(summed, sum_ref, strict=True):
        assert got.dtype == tf.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6 * clip)


def test_the_coder_and_the_tied_graph_take_the_ghost_path_by_default(
        coder_graph: onnx.ModelProto) -> None:
    for graph, proto in (("coder", coder_graph), ("tied", _tied_graph()),
                         ("tokens", _token_graph()), ("dense", _dense_graph())):
        executor = OnnxExecutor.from_model(proto)
        name = executor.input_names[0]
        sgd = DpSgd(executor, name, "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.1))
        assert sgd.path is ClipPath.GHOST
        x, y, seg = _batch(graph, np.random.default_rng(6))
        sgd.private_step(x, y, seg, int(seg.max()) + 1, 5.0)  # the check step
        assert sgd.path is ClipPath.GHOST and not sgd.fallback_reason


def test_a_weight_read_by_an_unknown_layer_takes_the_per_example_path() -> None:
    """A trained weight read by Div (not linear in the weight: a layer the ghost-norm
    path does not know): the general path runs and says why; forcing the ghost path is
    refused."""
    rng = np.random.default_rng(3)
    proto = _model([
        helper.make_node("Div", ["x", "scale"], ["xs"], name="scale/Div"),
        helper.make_node("MatMul", ["xs", "w"], ["logits"], name="out/MatMul"),
    ], [_init(rng, "scale", 4), _init(rng, "w", 4, N_CLASSES)], TensorProto.FLOAT, ["n", 4])
    executor = OnnxExecutor.from_model(proto)
    sgd = DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.1))
    assert sgd.path is ClipPath.PER_EXAMPLE and "Div" in sgd.fallback_reason
    x, y, seg = _batch("dense", np.random.default_rng(7))
    norms_ref, sum_ref = _reference(executor, "x", x, y, seg, 1 - CLIP_MARGIN)
    summed, norms = sgd.clipped_sum(x, y, seg, 5)
    np.testing.assert_allclose(norms.numpy(), norms_ref, rtol=1e-5, atol=1e-9)
    for got, want in zip(summed, sum_ref, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(BadInput, match="ghost-norm"):
        DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.1),
              path=ClipPath.GHOST)


def test_a_graph_that_mixes_stays_of_a_batch_is_caught_and_falls_back() -> None:
    """Known layers, but a frozen ReduceMean over the batch axis makes a stay's loss
    depend on the others: ghost norms would be wrong. The first step with two units
    compares both paths, uses the per-example result and keeps that path."""
    rng = np.random.default_rng(4)
    proto = _model([
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="enc/MatMul"),
        helper.make_node("ReduceMean", ["h"], ["m"], name="norm/Mean", axes=[0]),
        helper.make_node("Sub", ["h", "m"], ["c"], name="norm/Sub"),
        helper.make_node("MatMul", ["c", "w2"], ["logits"], name="out/MatMul"),
    ], [_init(rng, "w1", 4, 4), _init(rng, "w2", 4, N_CLASSES)], TensorProto.FLOAT,
        ["n", 4])
    executor = OnnxExecutor.from_model(proto)
    sgd = DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.0))
    assert sgd.path is ClipPath.GHOST
    x, y, seg = _batch("dense", np.random.default_rng(8))
    sgd.private_step(x, y, seg, 5, 5.0)
    assert sgd.path is ClipPath.PER_EXAMPLE and "differ" in sgd.fallback_reason


def test_a_clipped_patient_never_exceeds_the_clip_norm(coder_graph: onnx.ModelProto) -> None:
    """One patient with a huge gradient: its contribution's norm is clip * (1 - margin),
    never above clip (the float64 margin against rounding)."""
    executor = OnnxExecutor.from_model(coder_graph)
    x, y, _ = _batch("coder", np.random.default_rng(9))
    seg = np.zeros(len(y), np.int32)
    sgd = DpSgd(executor, "token_ids", "logits", 1e-3, 1.0, tf.keras.optimizers.SGD(0.1),
                path=ClipPath.GHOST)
    summed, norms = sgd.clipped_sum(x, y, seg, 1)
    total = math.sqrt(sum(float(np.sum(g.numpy() ** 2)) for g in summed))
    assert float(norms[0]) > 100 * 1e-3 and total <= 1e-3
    assert total == pytest.approx(1e-3 * (1 - CLIP_MARGIN), rel=1e-9)


def test_noise_is_float64_with_stddev_clip_times_z_on_the_sum() -> None:
    """Empty batches: the update is the noise divided by the expected batch size. With a
    seeded generator it is exactly clip * z * (the generator's normals) / B, rounded to
    float32; its measured std is clip * z / B."""
    clip, z, b = 2.0, 1.5, 4.0
    executor = OnnxExecutor.from_model(_dense_graph())
    before = np.concatenate([v.numpy().ravel() for v in executor.trainable_variables])
    sgd = DpSgd(executor, "x", "logits", clip, z, tf.keras.optimizers.SGD(1.0),
                rng=np.random.default_rng(11))
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int32))
    sgd.private_step(*empty, 0, expected_batch_size=b)
    after = np.concatenate([v.numpy().ravel() for v in executor.trainable_variables])
    normals = np.random.default_rng(11).standard_normal(len(before))
    expected = (clip * z * normals / b).astype(np.float32)
    np.testing.assert_allclose(before - after, expected, rtol=1e-6, atol=1e-6)
    moved = []
    for _ in range(300):  # statistics on every coordinate
        start = np.concatenate([v.numpy().ravel() for v in executor.trainable_variables])
        sgd.private_step(*empty, 0, expected_batch_size=b)
        moved.append(start - np.concatenate([v.numpy().ravel()
                                             for v in executor.trainable_variables]))
    assert np.std(np.concatenate(moved)) == pytest.approx(clip * z / b, rel=0.03)


def test_production_randomness_is_the_os_csprng_and_never_repeats() -> None:
    executor = OnnxExecutor.from_model(_dense_graph())
    sgd = DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(1.0))
    assert isinstance(sgd.rng, SecureRandom)
    a, b = SecureRandom().standard_normal(1000), SecureRandom().standard_normal(1000)
    assert not np.any(a == b)


def test_secure_uniforms_are_53_bit_and_normals_standard() -> None:
    rng = SecureRandom()
    u = rng.random(200_000)
    assert u.dtype == np.float64 and u.min() >= 0 and u.max() < 1
    assert np.all(u * 2.0 ** 53 == np.floor(u * 2.0 ** 53))  # on the 2^-53 grid
    assert np.mean(u) == pytest.approx(0.5, abs=0.005)
    z = rng.standard_normal(200_001)
    assert len(z) == 200_001 and np.all(np.isfinite(z))
    assert np.mean(z) == pytest.approx(0.0, abs=0.01)
    assert np.std(z) == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.05, abs=0.003)  # the tails


def test_secure_poisson_sampling_takes_each_unit_with_probability_q() -> None:
    rng = SecureRandom()
    sizes = [len(poisson_sample(rng, 1000, 0.05)) for _ in range(400)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.03)
    assert np.std(sizes) == pytest.approx(math.sqrt(1000 * 0.05 * 0.95), rel=0.15)


def test_a_seeded_run_is_reproducible_and_an_os_seeded_one_is_not() -> None:
    """``rng`` drives both sampling and noise: the same seed gives the same weights (what
    tests need), SecureRandom never does (what production needs)."""
    x, y, _ = _batch("dense", np.random.default_rng(12))
    units = list(range(len(y)))
    plan = DpSgdPlan.make(len(y), 4, 2, 1.0, 1.0)

    def run(rng: Any) -> np.ndarray[Any, Any]:
        executor = OnnxExecutor.from_model(_dense_graph())
        sgd = DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.1),
                    rng=rng)
        train_dp_sgd(sgd, plan, x, y, units, rng)
        return np.concatenate([v.numpy().ravel() for v in executor.trainable_variables])

    np.testing.assert_array_equal(run(np.random.default_rng(1)), run(np.random.default_rng(1)))
    assert not np.array_equal(run(SecureRandom()), run(SecureRandom()))


@pytest.mark.parametrize("path", [ClipPath.GHOST, ClipPath.PER_EXAMPLE])
def test_a_non_finite_gradient_stops_the_step_before_anything_is_applied(
        path: ClipPath) -> None:
    """NaN compares false with the clip bound, so it would pass through unclipped: the
    step is refused and the weights are left as they were."""
    executor = OnnxExecutor.from_model(_dense_graph())
    sgd = DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.1), path=path)
    x, y, seg = _batch("dense", np.random.default_rng(13))
    x[4, 0] = np.inf
    before = [v.numpy().copy() for v in executor.trainable_variables]
    with pytest.raises(GradientNotFinite, match="not finite"):
        sgd.private_step(x, y, seg, 5, 5.0)
    for v, b in zip(executor.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)


# ------------------------------------------- sequences, convolutions, normalisation


def _sequence_graph() -> onnx.ModelProto:
    """Per-position layers over 3 positions: a 3-D MatMul and its bias, LayerNormalization
    (scale and bias), a Mul by a weight broadcast over features, a Sub from a positional
    weight, a MatMul whose weight is read through a Transpose (a view), a wide MatMul over
    2 positions (the pair form: 2 * (8 + 8) < 8 * 8), mean over positions, Gemm."""
    rng = np.random.default_rng(31)
    pair_shape = numpy_helper.from_array(np.asarray([-1, 2, 8], np.int64), "pair_shape")
    return _model([
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="seq/MatMul"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="seq/Add"),
        helper.make_node("LayerNormalization", ["hb", "ln_scale", "ln_bias"], ["ln"],
                         name="norm/LayerNormalization", axis=-1, epsilon=1e-5),
        helper.make_node("Mul", ["ln", "gate"], ["gated"], name="gate/Mul"),
        helper.make_node("Sub", ["position", "gated"], ["shifted"], name="pos/Sub"),
        helper.make_node("Transpose", ["w2_raw"], ["w2"], name="view/Transpose",
                         perm=[1, 0]),
        helper.make_node("MatMul", ["shifted", "w2"], ["h2"], name="view/MatMul"),
        helper.make_node("Tanh", ["h2"], ["t2"], name="view/Tanh"),
        helper.make_node("Reshape", ["t2", "pair_shape"], ["pairs"], name="wide/Reshape"),
        helper.make_node("MatMul", ["pairs", "w_wide"], ["wide"], name="wide/MatMul"),
        helper.make_node("ReduceMean", ["wide"], ["m"], name="pool/Mean", axes=[1],
                         keepdims=0),
        helper.make_node("Gemm", ["m", "w3", "b3"], ["logits"], name="out/Gemm"),
    ], [_init(rng, "w1", 4, 6), _init(rng, "b1", 6), _init(rng, "ln_scale", 6),
        _init(rng, "ln_bias", 6), _init(rng, "gate", 4, 1), _init(rng, "position", 1, 4, 6),
        _init(rng, "w2_raw", 4, 6), _init(rng, "w_wide", 8, 8), _init(rng, "w3", 8, N_CLASSES),
        _init(rng, "b3", N_CLASSES), pair_shape], TensorProto.FLOAT, ["n", 4, 4])


def _conv_graph() -> onnx.ModelProto:
    """A 2-D Conv with padding, stride and its bias, BatchNormalization (inference), a
    1x1 Conv with dilation attributes, global average pooling, Gemm."""
    rng = np.random.default_rng(32)
    mean = numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "bn_mean")
    var = numpy_helper.from_array(rng.uniform(0.5, 2, size=3).astype(np.float32), "bn_var")
    return _model([
        helper.make_node("Conv", ["x", "k1", "c1"], ["h"], name="conv1/Conv",
                         kernel_shape=[2, 3], pads=[1, 1, 0, 1], strides=[1, 2]),
        helper.make_node("BatchNormalization", ["h", "bn_scale", "bn_bias", "bn_mean",
                                                "bn_var"], ["bn"], name="bn/BatchNorm"),
        helper.make_node("Relu", ["bn"], ["r"], name="bn/Relu"),
        helper.make_node("Conv", ["r", "k2"], ["h2"], name="conv2/Conv",
                         kernel_shape=[1, 1], dilations=[1, 1]),
        helper.make_node("GlobalAveragePool", ["h2"], ["p"], name="pool/Global"),
        helper.make_node("Flatten", ["p"], ["f"], name="pool/Flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], name="out/Gemm", transB=1),
    ], [_init(rng, "k1", 3, 2, 2, 3), _init(rng, "c1", 3), _init(rng, "bn_scale", 3),
        _init(rng, "bn_bias", 3), mean, var, _init(rng, "k2", 4, 3, 1, 1),
        _init(rng, "w3", N_CLASSES, 4), _init(rng, "b3", N_CLASSES)],
        TensorProto.FLOAT, ["n", 2, 4, 5])


def _tied_conv_graph() -> onnx.ModelProto:
    """One 1-D kernel read by two Conv nodes (tied), one scale read by two Muls."""
    rng = np.random.default_rng(33)
    return _model([
        helper.make_node("Conv", ["x", "k"], ["h"], name="conv1/Conv", kernel_shape=[3],
                         pads=[1, 1]),
        helper.make_node("Mul", ["h", "s"], ["hs"], name="conv1/Mul"),
        helper.make_node("Tanh", ["hs"], ["t"], name="conv1/Tanh"),
        helper.make_node("Conv", ["t", "k"], ["h2"], name="conv2/Conv", kernel_shape=[3],
                         pads=[2, 0], dilations=[1]),
        helper.make_node("Mul", ["h2", "s"], ["h2s"], name="conv2/Mul"),
        helper.make_node("ReduceMax", ["h2s"], ["m"], name="pool/Max", axes=[2], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["logits"], name="out/MatMul"),
    ], [_init(rng, "k", 2, 2, 3), _init(rng, "s", 2, 1), _init(rng, "w", 2, N_CLASSES)],
        TensorProto.FLOAT, ["n", 2, 6])


def _direct_and_view_graph() -> onnx.ModelProto:
    """A weight read directly by one MatMul and, transposed, by another: its two reads
    are not of one tensor (the ghost-norm path must not clip them apart, nor add them up
    in different layouts)."""
    rng = np.random.default_rng(34)
    return _model([
        helper.make_node("MatMul", ["x", "w"], ["h"], name="enc/MatMul"),
        helper.make_node("Tanh", ["h"], ["t"], name="enc/Tanh"),
        helper.make_node("Transpose", ["w"], ["wt"], name="dec/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["t", "wt"], ["back"], name="dec/MatMul"),
        helper.make_node("MatMul", ["back", "out"], ["logits"], name="out/MatMul"),
    ], [_init(rng, "w", 4, 4), _init(rng, "out", 4, N_CLASSES)], TensorProto.FLOAT,
        ["n", 4])


def _time_major_graph() -> onnx.ModelProto:
    """Positions moved to the leading axis before a per-position MatMul (time-major):
    the leading axis no longer keeps a batch's stays apart."""
    rng = np.random.default_rng(35)
    axes = numpy_helper.from_array(np.asarray([0], np.int64), "axes")
    return _model([
        helper.make_node("Transpose", ["x"], ["tm"], name="tm/Transpose", perm=[1, 0, 2]),
        helper.make_node("MatMul", ["tm", "w"], ["h"], name="tm/MatMul"),
        helper.make_node("ReduceSum", ["h", "axes"], ["logits"], name="tm/Sum", keepdims=0),
    ], [_init(rng, "w", 4, N_CLASSES), axes], TensorProto.FLOAT, ["n", 3, 4])


NEW_GRAPHS = {"sequence": (_sequence_graph, (4, 4)), "conv": (_conv_graph, (2, 4, 5)),
              "tied-conv": (_tied_conv_graph, (2, 6))}


def _float_batch(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray[Any, Any], ...]:
    rng = np.random.default_rng(seed)
    seg = np.asarray([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4], np.int32)
    x = rng.normal(size=(len(seg), *shape)).astype(np.float32)
    x[1] = x[0]  # two identical stays of one patient
    return x, rng.integers(0, N_CLASSES, size=len(seg)), seg


def _assert_equal_to_reference(executor: OnnxExecutor, name: str, x: Any, y: Any, seg: Any,
                               output: str = "logits") -> DpSgd:
    """The ghost-norm path (forced) against the one-patient-at-a-time reference, at a
    clip that clips some patients and not others; returns the (default-path) DpSgd after
    its checked first step."""
    norms_ref, _ = _reference(executor, name, x, y, seg, 1.0)
    clip = float(np.median(norms_ref))
    norms_ref, sum_ref = _reference(executor, name, x, y, seg, clip * (1 - CLIP_MARGIN))
    sgd = DpSgd(executor, name, output, clip, 1.0, tf.keras.optimizers.SGD(0.0),
                path=ClipPath.GHOST)
    summed, norms = sgd.clipped_sum(x, y, seg, int(seg.max()) + 1)
    np.testing.assert_allclose(norms.numpy(), norms_ref, rtol=1e-5)
    for got, want in zip(summed, sum_ref, strict=True):
        assert got.dtype == tf.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6 * clip)
    checked = DpSgd(executor, name, output, clip, 1.0, tf.keras.optimizers.SGD(0.0))
    checked.private_step(x, y, seg, int(seg.max()) + 1, 5.0)  # the first-step check
    return checked


@pytest.mark.parametrize("graph", sorted(NEW_GRAPHS))
def test_sequence_conv_and_normalisation_layers_take_the_ghost_path_and_equal_the_reference(
        graph: str) -> None:
    """3-D MatMul and its bias, the pair form, LayerNormalization, BatchNormalization,
    Mul/Sub weights broadcast over positions, a weight read through a Transpose, 2-D and
    1-D Conv with padding, stride and bias, a tied kernel: a wrong window layout, a
    broadcast axis summed wrongly, a view not put back in the weight's order, or a tied
    kernel clipped per use all fail."""
    build, shape = NEW_GRAPHS[graph]
    executor = OnnxExecutor.from_model(build())
    x, y, seg = _float_batch(shape, 41)
    sgd = _assert_equal_to_reference(executor, "x", x, y, seg)
    assert sgd.path is ClipPath.GHOST and not sgd.fallback_reason


def test_a_weight_read_directly_and_through_a_view_falls_back_and_stays_exact() -> None:
    """Two reads of one weight on different tensors (w and its transpose): the ghost-norm
    path does not sum them, so the run falls back (never clipped per read); forcing the
    ghost path is refused."""
    executor = OnnxExecutor.from_model(_direct_and_view_graph())
    x, y, seg = _batch("dense", np.random.default_rng(42))
    sgd = DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.0))
    norms_ref, sum_ref = _reference(executor, "x", x, y, seg, 1 - CLIP_MARGIN)
    summed, norms = sgd.clipped_sum(x, y, seg, 5)
    assert sgd.path is ClipPath.PER_EXAMPLE and "Transpose" in sgd.fallback_reason
    np.testing.assert_allclose(norms.numpy(), norms_ref, rtol=1e-5)
    for got, want in zip(summed, sum_ref, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(BadInput, match="ghost-norm"):
        DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.0),
              path=ClipPath.GHOST)


def test_a_time_major_layer_is_refused_by_the_layout_probe() -> None:
    """A MatMul over a (positions, stays, features) tensor: the probe sees a leading axis
    that does not grow with the batch and the per-example path runs."""
    executor = OnnxExecutor.from_model(_time_major_graph())
    x, y, seg = _float_batch((3, 4), 43)
    sgd = DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.0))
    assert sgd.path is ClipPath.GHOST  # every read is of a known kind...
    sgd.private_step(x, y, seg, 5, 5.0)
    assert sgd.path is ClipPath.PER_EXAMPLE and "leading axis" in sgd.fallback_reason


def test_a_scale_whose_factor_mixes_the_stays_is_caught_by_the_first_step_check() -> None:
    """A Mul weight whose other factor is centred over the batch axis (a stay's loss
    depends on the others): the layout is fine, the norms are wrong, the first step's
    comparison with the per-example path catches it."""
    rng = np.random.default_rng(44)
    proto = _model([
        helper.make_node("ReduceMean", ["x"], ["m"], name="norm/Mean", axes=[0]),
        helper.make_node("Sub", ["x", "m"], ["c"], name="norm/Sub"),
        helper.make_node("Mul", ["c", "gamma"], ["cg"], name="norm/Mul"),
        helper.make_node("MatMul", ["cg", "w"], ["logits"], name="out/MatMul"),
    ], [_init(rng, "gamma", 4), _init(rng, "w", 4, N_CLASSES)], TensorProto.FLOAT, ["n", 4])
    executor = OnnxExecutor.from_model(proto)
    sgd = DpSgd(executor, "x", "logits", 1.0, 1.0, tf.keras.optimizers.SGD(0.0))
    x, y, seg = _batch("dense", np.random.default_rng(45))
    sgd.private_step(x, y, seg, 5, 5.0)
    assert sgd.path is ClipPath.PER_EXAMPLE and "differ" in sgd.fallback_reason


# ------------------------------------------------------------ the vendors' models


@pytest.mark.parametrize("name", ["keras-conv1d", "keras-transformer", "torch-conv",
                                  "keras-bigru", "torch-lstm"])
def test_vendor_models_clip_exactly_on_the_path_they_take(name: str) -> None:
    """Each vendor architecture of tests/vendor_models.py: Conv1D (same, causal, dilated,
    biases folded by tf2onnx), the transformer encoder (q/k/v/output projections through
    Gemm and a reshaped kernel, LayerNormalization as Mul/Sub, the folded positional
    embedding, the gelu feed-forward), the PyTorch Conv classifier: ghost-norm path,
    norms and clipped sums equal to the one-patient-at-a-time reference. Recurrent
    layers (GRU, LSTM) stay on the per-example path, and say so."""
    from tests.vendor_models import vendor_model

    model = vendor_model(name, n_train=11, n_heldout=1)
    executor = OnnxExecutor.from_model(model.proto)
    seg = np.asarray([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4], np.int32)
    x, y = model.train_x, model.train_y
    if name in ("keras-bigru", "torch-lstm"):
        sgd = DpSgd(executor, model.input_name, "logits", 1.0, 1.0,
                    tf.keras.optimizers.SGD(0.0))
        assert sgd.path is ClipPath.PER_EXAMPLE
        assert ("GRU" if "gru" in name else "LSTM") in sgd.fallback_reason
        norms_ref, _ = _reference(executor, model.input_name, x, y, seg, 1.0)
        _, norms = sgd.clipped_sum(x, y, seg, 5)
        np.testing.assert_allclose(norms.numpy(), norms_ref, rtol=1e-5)
        return
    sgd = _assert_equal_to_reference(executor, model.input_name, x, y, seg)
    assert sgd.path is ClipPath.GHOST and not sgd.fallback_reason
