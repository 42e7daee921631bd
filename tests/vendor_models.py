"""Small models built the way vendors build theirs, for tests that need a vendor's model.

Keras models (token ids in, logits out), converted with the project's tf2onnx exporter
(``adapters.onnx_export.keras_to_onnx``, opset 17):

- :func:`keras_conv1d`: Embedding, Conv1D (same, causal and dilated), MaxPooling1D,
  GlobalMaxPooling1D, Dense;
- :func:`keras_transformer`: token and position embeddings, one encoder block
  (MultiHeadAttention, residuals, LayerNormalization, a gelu feed-forward), average
  pooling, Dense;
- :func:`keras_bigru` and :func:`keras_bilstm`: an unmasked Bidirectional GRU (last
  state) or LSTM (every step, max-pooled), Dense;
- :func:`keras_masked_bilstm`: the same behind ``mask_zero=True``, which tf2onnx writes
  as a ``Loop``: the executor refuses it (not in :data:`NAMES`).

ONNX graphs written with ``onnx.helper`` the way ``torch.onnx.export`` (opset 17) writes a
small PyTorch text classifier (PyTorch is not a dependency): parameters named after the
module (``embedding.weight``, ``fc.bias``) or ``onnx::<Op>_<n>`` when the exporter
rewrote them, nodes named ``/<module>/<Op>``, intermediate tensors
``/<module>/<Op>_output_0``, int64 token ids with a dynamic batch axis:

- :func:`torch_conv_classifier`: Gather on the embedding, Transpose, Conv, Relu,
  ReduceMax and ReduceMean over time, Concat, Gemm;
- :func:`torch_lstm_classifier`: Gather, Transpose, a bidirectional LSTM whose initial
  states are built from the batch size (Shape, Gather, Unsqueeze, Concat,
  ConstantOfShape), Transpose, Reshape, ReduceMax, Gemm.

Every builder is deterministic (seeded) and small (vocabulary 60, 8 tokens, 4 classes),
with non-zero weights everywhere (tf2onnx folds away a bias that is exactly zero).
:func:`vendor_models` gives them all with training and held-out token ids and labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, MAX_LEN, CLASSES, EMBED = 60, 8, 4, 8
TORCH_OPSET = 17


@dataclass(frozen=True)
class VendorModel:
    name: str
    proto: onnx.ModelProto
    input_name: str
    train_x: npt.NDArray[Any]
    train_y: npt.NDArray[np.int64]
    heldout_x: npt.NDArray[Any]
    keras_model: Any = None  # the source model, for the Keras ones


# ------------------------------------------------------------------------------- data


def token_ids(rng: np.random.Generator, n: int, dtype: Any = np.int32) -> npt.NDArray[Any]:
    """Token ids in [1, VOCAB) with trailing padding (0), never a whole row of padding."""
    ids = rng.integers(1, VOCAB, size=(n, MAX_LEN))
    lengths = rng.integers(3, MAX_LEN + 1, size=n)
    ids[np.arange(MAX_LEN)[None, :] >= lengths[:, None]] = 0
    return np.asarray(ids, dtype=dtype)


def teacher_labels(ids: npt.NDArray[Any], seed: int) -> npt.NDArray[np.int64]:
    """Labels from a fixed random bag-of-tokens teacher, so that there is something to learn."""
    w = np.random.default_rng(seed).normal(size=(VOCAB, CLASSES))
    w[0] = 0.0
    return np.asarray(np.argmax(w[ids].sum(axis=1), axis=1), dtype=np.int64)


def _randomise(model: Any, seed: int, scale: float = 0.3) -> None:
    rng = np.random.default_rng(seed)
    model.set_weights([(rng.normal(size=w.shape) * scale).astype(np.float32)
                       for w in model.get_weights()])


# ------------------------------------------------------------------------------ Keras


def _keras() -> Any:
    import tensorflow as tf

    # Keras names unnamed layers (tf.__operators__.add, forward_gru) with a per-process
    # counter: a fresh session keeps the names the same whatever was built before
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    return tf.keras


def keras_conv1d() -> Any:
    keras = _keras()
    layers = keras.layers
    ids = keras.Input((MAX_LEN,), dtype="int32", name="token_ids")
    h = layers.Embedding(VOCAB, EMBED, name="embedding")(ids)
    h = layers.Conv1D(8, 3, padding="same", activation="relu", name="conv_same")(h)
    h = layers.Conv1D(8, 2, padding="causal", dilation_rate=2, activation="relu",
                      name="conv_causal")(h)
    h = layers.MaxPooling1D(2, name="pool")(h)
    h = layers.Conv1D(6, 3, padding="valid", activation="tanh", name="conv_valid")(h)
    h = layers.GlobalMaxPooling1D(name="global_max")(h)
    model = keras.Model(ids, layers.Dense(CLASSES, name="logits")(h), name="vendor_conv1d")
    _randomise(model, 11)
    return model


def keras_transformer() -> Any:
    import tensorflow as tf

    keras = _keras()
    layers = keras.layers
    ids = keras.Input((MAX_LEN,), dtype="int32", name="token_ids")
    tokens = layers.Embedding(VOCAB, EMBED, name="token_embedding")(ids)
    positions = layers.Embedding(MAX_LEN, EMBED, name="position_embedding")(
        tf.range(MAX_LEN)[tf.newaxis, :])
    h = tokens + positions
    attended = layers.MultiHeadAttention(2, 4, name="attention")(h, h)
    h = layers.LayerNormalization(epsilon=1e-6, name="norm_1")(h + attended)
    f = layers.Dense(16, activation="gelu", name="ffn_in")(h)
    f = layers.Dense(EMBED, name="ffn_out")(f)
    h = layers.LayerNormalization(epsilon=1e-6, name="norm_2")(h + f)
    h = layers.GlobalAveragePooling1D(name="mean")(h)
    model = keras.Model(ids, layers.Dense(CLASSES, name="logits")(h),
                        name="vendor_transformer")
    _randomise(model, 12)
    return model


def keras_bigru() -> Any:
    keras = _keras()
    layers = keras.layers
    ids = keras.Input((MAX_LEN,), dtype="int32", name="token_ids")
    h = layers.Embedding(VOCAB, EMBED, name="embedding")(ids)  # no mask_zero: no Loop
    h = layers.Bidirectional(layers.GRU(6), name="bigru")(h)
    model = keras.Model(ids, layers.Dense(CLASSES, name="logits")(h), name="vendor_bigru")
    _randomise(model, 13)
    return model


def keras_bilstm() -> Any:
    keras = _keras()
    layers = keras.layers
    ids = keras.Input((MAX_LEN,), dtype="int32", name="token_ids")
    h = layers.Embedding(VOCAB, EMBED, name="embedding")(ids)
    h = layers.Bidirectional(layers.LSTM(5, return_sequences=True), name="bilstm")(h)
    h = layers.GlobalMaxPooling1D(name="global_max")(h)
    model = keras.Model(ids, layers.Dense(CLASSES, name="logits")(h), name="vendor_bilstm")
    _randomise(model, 14)
    return model


def keras_masked_bilstm() -> Any:
    """A BiLSTM behind ``mask_zero=True``: tf2onnx writes it as a Loop (refused)."""
    keras = _keras()
    layers = keras.layers
    ids = keras.Input((MAX_LEN,), dtype="int32", name="token_ids")
    h = layers.Embedding(VOCAB, EMBED, mask_zero=True, name="embedding")(ids)
    h = layers.Bidirectional(layers.LSTM(5), name="bilstm")(h)
    model = keras.Model(ids, layers.Dense(CLASSES, name="logits")(h), name="vendor_masked")
    _randomise(model, 15)
    return model


# ------------------------------------------------------------- torch.onnx.export style


def _init(rng: np.random.Generator, name: str, *shape: int,
          scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)


def _ints(name: str, *values: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _torch_model(name: str, nodes: list[onnx.NodeProto],
                 inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "main_graph",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                       ["batch_size", MAX_LEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", CLASSES])],
        inits)
    model = helper.make_model(graph, producer_name="pytorch", producer_version="2.3.1",
                              opset_imports=[helper.make_opsetid("", TORCH_OPSET)])
    model.ir_version = 8
    model.graph.name = name
    onnx.checker.check_model(model, full_check=True)
    return model


def torch_conv_classifier() -> onnx.ModelProto:
    """``Embedding(60, 8) -> Conv1d(8, 6, 3, padding=1) -> relu -> [max, mean] over time ->
    Linear(12, 4)``, as torch.onnx.export writes it."""
    rng = np.random.default_rng(21)
    o = "_output_0"
    nodes = [
        helper.make_node("Gather", ["embedding.weight", "input_ids"], [f"/embedding/Gather{o}"],
                         name="/embedding/Gather"),
        helper.make_node("Transpose", [f"/embedding/Gather{o}"], [f"/Transpose{o}"],
                         name="/Transpose", perm=[0, 2, 1]),
        helper.make_node("Conv", [f"/Transpose{o}", "conv.weight", "conv.bias"],
                         [f"/conv/Conv{o}"], name="/conv/Conv", dilations=[1], group=1,
                         kernel_shape=[3], pads=[1, 1], strides=[1]),
        helper.make_node("Relu", [f"/conv/Conv{o}"], [f"/Relu{o}"], name="/Relu"),
        helper.make_node("ReduceMax", [f"/Relu{o}"], [f"/ReduceMax{o}"], name="/ReduceMax",
                         axes=[2], keepdims=0),
        helper.make_node("ReduceMean", [f"/Relu{o}"], [f"/ReduceMean{o}"], name="/ReduceMean",
                         axes=[2], keepdims=0),
        helper.make_node("Concat", [f"/ReduceMax{o}", f"/ReduceMean{o}"], [f"/Concat{o}"],
                         name="/Concat", axis=1),
        helper.make_node("Gemm", [f"/Concat{o}", "onnx::Gemm_12", "fc.bias"], ["logits"],
                         name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1),
    ]
    inits = [_init(rng, "embedding.weight", VOCAB, EMBED), _init(rng, "conv.weight", 6, EMBED, 3),
             _init(rng, "conv.bias", 6), _init(rng, "onnx::Gemm_12", CLASSES, 12),
             _init(rng, "fc.bias", CLASSES)]
    return _torch_model("torch_conv_classifier", nodes, inits)


def torch_lstm_classifier() -> onnx.ModelProto:
    """``Embedding(60, 8) -> LSTM(8, 5, batch_first=True, bidirectional=True) -> max over
    time -> Linear(10, 4)``, as torch.onnx.export writes it (its LSTM weights already in
    ONNX gate order, named ``onnx::LSTM_<n>``; zero initial states sized from the batch)."""
    rng = np.random.default_rng(22)
    hidden, o = 5, "_output_0"
    nodes = [
        helper.make_node("Gather", ["embedding.weight", "input_ids"], [f"/embedding/Gather{o}"],
                         name="/embedding/Gather"),
        helper.make_node("Shape", ["input_ids"], [f"/lstm/Shape{o}"], name="/lstm/Shape"),
        helper.make_node("Constant", [], [f"/lstm/Constant{o}"], name="/lstm/Constant",
                         value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", [f"/lstm/Shape{o}", f"/lstm/Constant{o}"],
                         [f"/lstm/Gather{o}"], name="/lstm/Gather", axis=0),
        helper.make_node("Constant", [], [f"/lstm/Constant_1{o}"], name="/lstm/Constant_1",
                         value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Unsqueeze", [f"/lstm/Gather{o}", f"/lstm/Constant_1{o}"],
                         [f"/lstm/Unsqueeze{o}"], name="/lstm/Unsqueeze"),
        helper.make_node("Concat", ["onnx::Concat_20", f"/lstm/Unsqueeze{o}", "onnx::Concat_21"],
                         [f"/lstm/Concat{o}"], name="/lstm/Concat", axis=0),
        helper.make_node("ConstantOfShape", [f"/lstm/Concat{o}"], [f"/lstm/ConstantOfShape{o}"],
                         name="/lstm/ConstantOfShape",
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Transpose", [f"/embedding/Gather{o}"], [f"/lstm/Transpose{o}"],
                         name="/lstm/Transpose", perm=[1, 0, 2]),
        helper.make_node("LSTM", [f"/lstm/Transpose{o}", "onnx::LSTM_30", "onnx::LSTM_31",
                                  "onnx::LSTM_29", "", f"/lstm/ConstantOfShape{o}",
                                  f"/lstm/ConstantOfShape{o}"],
                         [f"/lstm/LSTM{o}", "/lstm/LSTM_output_1", "/lstm/LSTM_output_2"],
                         name="/lstm/LSTM", direction="bidirectional", hidden_size=hidden),
        helper.make_node("Transpose", [f"/lstm/LSTM{o}"], [f"/lstm/Transpose_1{o}"],
                         name="/lstm/Transpose_1", perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", [f"/lstm/Transpose_1{o}", "onnx::Reshape_40"],
                         [f"/lstm/Reshape{o}"], name="/lstm/Reshape", allowzero=0),
        helper.make_node("ReduceMax", [f"/lstm/Reshape{o}"], [f"/ReduceMax{o}"],
                         name="/ReduceMax", axes=[1], keepdims=0),
        helper.make_node("Gemm", [f"/ReduceMax{o}", "fc.weight", "fc.bias"], ["logits"],
                         name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1),
    ]
    inits = [_init(rng, "embedding.weight", VOCAB, EMBED),
             _init(rng, "onnx::LSTM_29", 2, 8 * hidden),
             _init(rng, "onnx::LSTM_30", 2, 4 * hidden, EMBED),
             _init(rng, "onnx::LSTM_31", 2, 4 * hidden, hidden),
             _ints("onnx::Concat_20", 2), _ints("onnx::Concat_21", hidden),
             _ints("onnx::Reshape_40", 0, 0, -1),
             _init(rng, "fc.weight", CLASSES, 2 * hidden), _init(rng, "fc.bias", CLASSES)]
    return _torch_model("torch_lstm_classifier", nodes, inits)


# ------------------------------------------------------------------------- all of them

KERAS_BUILDERS: Mapping[str, Callable[[], Any]] = {
    "keras-conv1d": keras_conv1d, "keras-transformer": keras_transformer,
    "keras-bigru": keras_bigru, "keras-bilstm": keras_bilstm}
TORCH_BUILDERS: Mapping[str, Callable[[], onnx.ModelProto]] = {
    "torch-conv": torch_conv_classifier, "torch-lstm": torch_lstm_classifier}
NAMES = (*KERAS_BUILDERS, *TORCH_BUILDERS)


def vendor_model(name: str, n_train: int = 96, n_heldout: int = 64) -> VendorModel:
    """One of :data:`NAMES`, converted to ONNX, with seeded data."""
    seed = NAMES.index(name)
    rng = np.random.default_rng(100 + seed)
    if name in KERAS_BUILDERS:
        from adapters.onnx_export import keras_to_onnx

        keras_model = KERAS_BUILDERS[name]()
        proto, input_name, dtype = keras_to_onnx(keras_model, MAX_LEN), "token_ids", np.int32
    else:
        keras_model, proto = None, TORCH_BUILDERS[name]()
        input_name, dtype = "input_ids", np.int64
    x = token_ids(rng, n_train, dtype)
    return VendorModel(name, proto, input_name, x, teacher_labels(x, 200 + seed),
                       token_ids(rng, n_heldout, dtype), keras_model)
