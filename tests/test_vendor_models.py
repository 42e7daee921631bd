"""Vendors' architectures on the trainable executor, against real onnxruntime.

For each model of ``tests/vendor_models.py`` (Keras Conv1D, transformer encoder, BiGRU and
BiLSTM through tf2onnx; PyTorch-exporter-style conv and LSTM classifiers): the
executor's logits match onnxruntime's, every trainable weight gets a non-zero gradient,
a few SGD steps (inside ``tf.function``) lower the loss, and the written-back graph
still runs in onnxruntime with the executor's logits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf

from adapters.errors import UnsupportedOperators
from adapters.onnx_tf import OnnxExecutor
from tests.vendor_models import MAX_LEN, NAMES, VendorModel, vendor_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=NAMES)
def vendor(request: pytest.FixtureRequest) -> VendorModel:
    return vendor_model(request.param)


def _ort_logits(proto: onnx.ModelProto, feeds: Mapping[str, Any]) -> Any:
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(["logits"], dict(feeds))[0]


def _max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


def _trainable(executor: OnnxExecutor) -> list[Any]:
    return [p for p in executor.parameters if p.trainable]


def _loss(executor: OnnxExecutor, name: str, x: Any, y: Any) -> Any:
    logits = executor({name: x})["logits"]
    return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True))


@pytest.mark.slow
def test_vendor_model_logits_match_onnxruntime(vendor: VendorModel) -> None:
    executor = OnnxExecutor.from_model(vendor.proto)
    feeds = {vendor.input_name: vendor.heldout_x}
    diff = _max_diff(executor(feeds)["logits"].numpy(), _ort_logits(vendor.proto, feeds))
    print(f"{vendor.name}: executor vs onnxruntime max abs diff {diff:.3g}")
    assert diff <= TOLERANCE
    if vendor.keras_model is not None:  # and the converted graph is the Keras model
        keras = vendor.keras_model(vendor.heldout_x).numpy()
        assert _max_diff(executor(feeds)["logits"].numpy(), keras) <= TOLERANCE


@pytest.mark.slow
def test_vendor_model_trains_and_its_written_back_graph_matches_onnxruntime(
        vendor: VendorModel) -> None:
    executor = OnnxExecutor.from_model(vendor.proto)
    variables = executor.trainable_variables
    assert len(variables) >= 4
    optimizer = tf.keras.optimizers.SGD(0.5)

    # traced once for any batch size, as DP-SGD's steps are (unknown batch dimension)
    @tf.function(input_signature=[tf.TensorSpec([None, MAX_LEN], vendor.train_x.dtype),
                                  tf.TensorSpec([None], tf.int64)])
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = _loss(executor, vendor.input_name, x, y)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss, [tf.reduce_sum(tf.abs(tf.convert_to_tensor(g))) for g in grads]

    before = [v.numpy().copy() for v in variables]
    first, sizes = step(vendor.train_x, vendor.train_y)  # gradients at the initial weights
    dead = [p.name for p, size in zip(_trainable(executor), sizes, strict=True)
            if float(size) < 1e-8]
    # softmax ignores a shift shared by a query's scores, so the key bias of attention
    # has a zero gradient (up to rounding) in any transformer: the only exception
    assert [n for n in dead if "/attention/key/add/" not in n] == []
    losses = [float(first)] + [float(step(vendor.train_x, vendor.train_y)[0])
                               for _ in range(5)]
    print(f"{vendor.name}: losses {[round(v, 4) for v in losses]}")
    assert losses[-1] < losses[0]
    unchanged = [p.name for p, v, b in zip(_trainable(executor), variables, before, strict=True)
                 if np.array_equal(v.numpy(), b)]
    assert unchanged == [n for n in dead if n in unchanged]

    written = executor.to_model()
    onnx.checker.check_model(written, full_check=True)
    assert [n.name for n in written.graph.node] == [n.name for n in vendor.proto.graph.node]
    feeds = {vendor.input_name: vendor.heldout_x}
    new = _ort_logits(written, feeds)
    assert _max_diff(new, executor(feeds)["logits"].numpy()) <= TOLERANCE
    assert _max_diff(new, _ort_logits(vendor.proto, feeds)) > 1e-3  # the weights did move


@pytest.mark.slow
def test_vendor_model_per_example_gradients_under_vectorized_map_match_a_loop(
        vendor: VendorModel) -> None:
    """DP-SGD's per-stay gradients (adapters/dp.py: tf.vectorized_map over the executor, one
    stay of batch 1 per call) equal the gradients computed one stay at a time, and are
    vectorised: no operator (an embedding's gather from a variable, a convolution's
    filter gradient) makes tf.vectorized_map fall back to a loop over the stays."""
    executor = OnnxExecutor.from_model(vendor.proto)
    variables = executor.trainable_variables
    x, y = vendor.train_x[:3], vendor.train_y[:3]

    def one(args: Any) -> list[Any]:
        xi, yi = args
        with tf.GradientTape() as tape:
            loss = _loss(executor, vendor.input_name, xi[tf.newaxis], yi[tf.newaxis])
        return [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v)
                for g, v in zip(tape.gradient(loss, variables), variables, strict=True)]

    loops: list[str] = []  # tf.vectorized_map says so when it falls back to a loop
    handler = _Collect(loops)
    tf.get_logger().addHandler(handler)
    try:
        vectorized = tf.function(lambda a, b: tf.vectorized_map(one, (a, b)))(x, y)
    finally:
        tf.get_logger().removeHandler(handler)
    assert [m for m in loops if "while_loop" in m] == []  # vectorised, not a loop per stay
    one_at_a_time = tf.function(one)
    for i in range(len(x)):
        looped = one_at_a_time((tf.constant(x[i]), tf.constant(y[i])))
        for v, g, ref in zip(variables, vectorized, looped, strict=True):
            assert _max_diff(g[i].numpy(), ref.numpy()) <= 1e-5, v.name


@pytest.mark.slow
def test_masked_keras_lstm_is_refused_with_the_way_to_export_it() -> None:
    """mask_zero=True makes tf2onnx write a Loop: refused before anything trains, and the
    message says how to export the model so that it can be fine-tuned."""
    from adapters.onnx_export import keras_to_onnx
    from tests.vendor_models import keras_masked_bilstm

    proto = keras_to_onnx(keras_masked_bilstm(), MAX_LEN)
    assert "Loop" in {n.op_type for n in proto.graph.node}
    with pytest.raises(UnsupportedOperators) as info:
        OnnxExecutor.from_model(proto)
    assert info.value.operators == (("", "Loop"),)
    assert "mask_zero=True" in str(info.value) and "LSTM/GRU" in str(info.value)


GROUPS = {
    "keras-conv1d": {"conv_causal", "conv_same", "conv_valid", "embedding", "logits"},
    "keras-transformer": {"attention_output", "key", "query", "value", "ffn_in", "ffn_out",
                          "logits", "norm_1", "norm_2", "token_embedding",
                          "tf.__operators__.add"},  # the position embedding, folded
    "keras-bigru": {"forward_gru", "embedding", "logits"},  # one ONNX GRU, both directions
    "keras-bilstm": {"bilstm", "embedding", "logits"},
    "torch-conv": {"conv", "embedding", "fc"},
    "torch-lstm": {"lstm", "embedding", "fc"},
}


def test_vendor_model_weights_are_grouped_by_the_layer_that_made_them(
        vendor: VendorModel) -> None:
    """--trainable names layers: tf2onnx's own nodes (Gemm__150, GRU__577) and TensorFlow's
    inner scopes (Tensordot, batchnorm) must not hide the Keras layer; a weight read only
    by Shape is no weight."""
    groups = OnnxExecutor.from_model(vendor.proto).groups()
    assert {g.rsplit("/", 1)[-1] for g in groups} == GROUPS[vendor.name]
