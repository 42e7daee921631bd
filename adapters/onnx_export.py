"""Source framework -> ONNX: Keras through tf2onnx, scikit-learn through skl2onnx.

Both produce a model with one input and one output named ``logits`` (raw scores: for
logistic regression, the decision function), at the pinned opset, so that parity can
be checked logit for logit.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import onnx

from passerelle import __version__
from passerelle.errors import ConversionError

OPSET = 17
PRODUCER = "passerelle"


def keras_to_onnx(model: Any, max_len: int, dtype: str = "int32") -> onnx.ModelProto:
    """Convert a Keras model taking token ids of shape (batch, max_len) (``dtype`` int32 or
    int64), or float32 token frequencies of shape (batch, max_len = vocabulary size)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    import tensorflow as tf
    import tf2onnx

    name = "bag_of_words" if dtype == "float32" else "token_ids"
    spec = (tf.TensorSpec((None, max_len), tf.as_dtype(dtype), name=name),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    except Exception as e:  # tf2onnx raises anything from ValueError to KeyError
        raise ConversionError(f"tf2onnx could not convert the model: {e}") from e
    outputs = [o.name for o in proto.graph.output]
    if len(outputs) != 1:
        raise ConversionError(f"expected one output, the converter produced {outputs}")
    _rename_output(proto, outputs[0], "logits")
    return _stamp(proto)


def sklearn_to_onnx(model: Any, n_features: int) -> onnx.ModelProto:
    """Convert a fitted linear classifier taking float32 token frequencies."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    try:
        proto = convert_sklearn(
            model,
            initial_types=[("bag_of_words", FloatTensorType([None, n_features]))],
            target_opset={"": OPSET, "ai.onnx.ml": 3},
            options={id(model): {"zipmap": False, "raw_scores": True}},
        )
    except Exception as e:  # skl2onnx raises RuntimeError, NotImplementedError, ...
        raise ConversionError(f"skl2onnx could not convert the model: {e}") from e
    names = [o.name for o in proto.graph.output]
    if len(names) != 2:
        raise ConversionError(f"expected (label, scores) outputs, got {names}")
    # Keep the scores only: the label output is argmax of the scores.
    scores = names[1]
    del proto.graph.output[0]
    _rename_output(proto, scores, "logits")
    _prune(proto)
    return _stamp(proto)


def _rename_output(proto: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in proto.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
    for out in proto.graph.output:
        if out.name == old:
            out.name = new


def _prune(proto: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing uses (after an output was removed)."""
    needed = {o.name for o in proto.graph.output}
    kept = []
    for node in reversed(proto.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(kept))
    unused = [t for t in proto.graph.initializer if t.name not in needed]
    for tensor in unused:
        proto.graph.initializer.remove(tensor)


def _stamp(proto: onnx.ModelProto) -> onnx.ModelProto:
    proto.producer_name = PRODUCER
    proto.producer_version = __version__
    proto.doc_string = ""
    return proto
