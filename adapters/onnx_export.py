"""Source framework -> ONNX: Keras through tf2onnx, scikit-learn through skl2onnx.

Both produce a model with one input and one output named ``logits`` (n, C) float32, at
the pinned opset, so that parity can be checked logit for logit.

What ``logits`` is for a scikit-learn model (:func:`sklearn_logits` computes the same
thing with scikit-learn itself, for the parity reference):

* an estimator with a ``decision_function`` (LogisticRegression, LinearSVC,
  SGDClassifier, RidgeClassifier, ...): the decision function, one column per class.
  For two classes scikit-learn returns one score ``d`` (positive: ``classes_[1]``);
  Passerelle writes the two columns ``(0, d)``: the argmax is ``predict`` and the
  softmax is LogisticRegression's ``predict_proba`` (skl2onnx itself writes ``(-d, d)``,
  whose softmax is ``sigmoid(2d)``);
* MLPClassifier: ``log(predict_proba)`` computed as a log-softmax of the output layer's
  pre-activation (``(0, z)`` for two classes), so it stays finite and trainable;
* anything else (RandomForest, ExtraTrees, DecisionTree, naive Bayes, ...):
  ``log(max(predict_proba, PROBABILITY_FLOOR))`` (a tree ensemble gives many exact zeros).

A Pipeline is converted as its transformers (Normalizer, StandardScaler, MaxAbsScaler,
TfidfTransformer, ...) followed by its final estimator. The transformers' constants
(TfidfTransformer's idf, ...) are written as ``Constant`` nodes, not initializers: they
are preprocessing fitted at the source, and fine-tuning (which trains every float
initializer and declared weight attribute, :mod:`adapters.onnx_tf`) leaves them as they
are; the final estimator's weights stay trainable.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from passerelle import __version__
from passerelle.errors import ConversionError

OPSET = 17
ML_OPSET = 3
PRODUCER = "passerelle"
INPUT = "bag_of_words"
OUTPUT = "logits"
PROBABILITY_FLOOR = 1e-7  # log(0) would be -inf; a tree ensemble's zeros become log(1e-7)
_PROBE_TOLERANCE = 1e-4


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
    rename_output(proto, outputs[0], "logits")
    return _stamp(proto)


# ------------------------------------------------------------------------ scikit-learn


def sklearn_to_onnx(model: Any, n_features: int) -> onnx.ModelProto:
    """Convert a fitted classifier, or a Pipeline of transformers + classifier, taking a
    float32 bag of words (n, n_features); one output ``logits`` (n, C) (see the module
    docstring for what the logits are). The result is checked against
    :func:`sklearn_logits` on a few generated rows before it is returned."""
    transformers, estimator = _split(model)
    if transformers:
        from sklearn.pipeline import Pipeline

        pre_model = Pipeline(transformers)
        width = _transformed_width(pre_model, n_features)
        head = _estimator_to_onnx(estimator, width, "features")
        proto = _compose(_transformers_to_onnx(pre_model, n_features), head, "features")
    else:
        proto = _estimator_to_onnx(estimator, n_features, INPUT)
    proto = _stamp(proto)
    _probe(model, proto, n_features)
    return proto


def sklearn_logits(model: Any, inputs: Any) -> npt.NDArray[np.float32]:
    """The logits of a fitted scikit-learn classifier or Pipeline, by scikit-learn itself,
    with the convention of :func:`sklearn_to_onnx` (``inputs`` may be raw texts for a
    pipeline that starts with a vectorizer)."""
    transformers, estimator = _split(model)
    x = inputs
    for _, step in transformers:
        x = step.transform(x)
    kind = _score_kind(estimator)
    if kind == "decision":
        d = np.asarray(estimator.decision_function(x), dtype=np.float64)
        if d.ndim == 1:
            d = np.stack([np.zeros_like(d), d], axis=1)
        return d.astype(np.float32)
    if kind == "mlp":
        return _mlp_log_proba(estimator, x).astype(np.float32)
    p = np.asarray(estimator.predict_proba(x), dtype=np.float64)
    out: npt.NDArray[np.float32] = np.log(np.maximum(p, PROBABILITY_FLOOR)).astype(np.float32)
    return out


def _split(model: Any) -> tuple[list[tuple[str, Any]], Any]:
    from sklearn.pipeline import Pipeline

    if isinstance(model, Pipeline):
        steps = [(n, s) for n, s in model.steps if s not in (None, "passthrough")]
        if not steps:
            raise ConversionError("the pipeline has no estimator")
        return steps[:-1], steps[-1][1]
    return [], model


def _score_kind(estimator: Any) -> str:
    from sklearn.base import is_classifier
    from sklearn.neural_network import MLPClassifier

    if not is_classifier(estimator):
        raise ConversionError(f"{type(estimator).__name__} is not a classifier; Passerelle "
                              "ships classifiers (one logit per code)")
    if isinstance(estimator, MLPClassifier):
        return "mlp"
    if hasattr(estimator, "decision_function"):
        return "decision"
    if hasattr(estimator, "predict_proba"):
        return "proba"
    raise ConversionError(f"{type(estimator).__name__} has neither decision_function nor "
                          "predict_proba: it has no scores to ship")


def _mlp_log_proba(mlp: Any, x: Any) -> npt.NDArray[np.float64]:
    """log(predict_proba) of an MLPClassifier as a log-softmax of the last layer."""
    from sklearn.neural_network._base import ACTIVATIONS

    if mlp._label_binarizer.y_type_ == "multilabel-indicator":
        raise ConversionError("a multi-label MLPClassifier is not supported")
    a = x.toarray() if hasattr(x, "toarray") else np.asarray(x, dtype=np.float64)
    a = a.astype(np.float64)
    last = len(mlp.coefs_) - 1
    for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_, strict=True)):
        a = a @ w + b
        if i != last:
            ACTIVATIONS[mlp.activation](a)  # in place
    if a.shape[1] == 1:  # two classes: p1 = sigmoid(z) = softmax(0, z)[1]
        a = np.concatenate([np.zeros_like(a), a], axis=1)
    top = a.max(axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = a - top - np.log(np.exp(a - top).sum(axis=1, keepdims=True))
    return out


def _allowed_options(estimator: Any) -> dict[str, Any]:
    from skl2onnx._supported_operators import sklearn_operator_name_map
    from skl2onnx.common._registration import get_converter

    alias = sklearn_operator_name_map.get(type(estimator))
    if alias is None:
        raise ConversionError(f"skl2onnx has no converter for {type(estimator).__name__}")
    return dict(get_converter(alias).get_allowed_options() or {})


def _convert(model: Any, n_features: int, input_name: str,
             options: dict[int, dict[str, Any]] | None) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    try:
        proto: onnx.ModelProto = convert_sklearn(
            model,
            initial_types=[(input_name, FloatTensorType([None, n_features]))],
            target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
            options=options,
        )
    except Exception as e:  # skl2onnx raises RuntimeError, NotImplementedError, ...
        raise ConversionError(f"skl2onnx could not convert the model: {e}") from e
    return proto


def _estimator_to_onnx(estimator: Any, n_features: int, input_name: str) -> onnx.ModelProto:
    """The final estimator alone, output ``logits``."""
    kind = _score_kind(estimator)
    allowed = _allowed_options(estimator)
    options: dict[str, Any] = {}
    if "zipmap" in allowed:
        options["zipmap"] = False
    if kind == "decision":
        if "raw_scores" not in allowed:
            raise ConversionError(f"skl2onnx cannot write the decision function of "
                                  f"{type(estimator).__name__}")
        options["raw_scores"] = True
    proto = _convert(estimator, n_features, input_name, {id(estimator): options})
    names = [o.name for o in proto.graph.output]
    if len(names) != 2:
        raise ConversionError(f"expected (label, scores) outputs, got {names}")
    scores = names[1]  # the label output is argmax of the scores: dropped
    n_classes = len(estimator.classes_)
    if kind == "decision":
        if n_classes == 2:
            scores = _two_class_scores(proto, scores)
        rename_output(proto, scores, OUTPUT)
        _set_single_output(proto, n_classes)
    elif kind == "mlp":
        _mlp_log_softmax(proto, n_classes)
    else:
        floor = "passerelle_probability_floor"
        proto.graph.initializer.append(
            numpy_helper.from_array(np.array(PROBABILITY_FLOOR, np.float32), floor))
        proto.graph.node.extend([
            helper.make_node("Max", [scores, floor], ["passerelle_floored"],
                             name="passerelle_floor"),
            helper.make_node("Log", ["passerelle_floored"], [OUTPUT], name="passerelle_log"),
        ])
        _set_single_output(proto, n_classes)
    _prune(proto)
    return proto


def _two_class_scores(proto: onnx.ModelProto, scores: str) -> str:
    """skl2onnx writes a two-class decision function as ``(-d, d)``; Passerelle ships
    ``(0, d)``. A LinearClassifier (coefficients ``(-w, w)``, intercepts ``(-b, b)``)
    gets its first row zeroed; any other graph (SGDClassifier's MatMul, Mul by -1,
    Concat) gets ``Concat(0, Slice(scores, column 1))`` appended."""
    node = next((n for n in proto.graph.node if scores in n.output), None)
    if node is not None and node.op_type == "LinearClassifier":
        attrs = {a.name: a for a in node.attribute}
        coefficients = list(attrs["coefficients"].floats)
        half = len(coefficients) // 2
        attrs["coefficients"].floats[:] = [0.0] * half + coefficients[half:]
        intercepts = attrs.get("intercepts")
        if intercepts is not None and len(intercepts.floats) == 2:
            intercepts.floats[:] = [0.0, intercepts.floats[1]]
        return scores
    for name, value in (("passerelle_one", 1), ("passerelle_two", 2)):
        proto.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64),
                                                               name))
    proto.graph.node.extend([
        helper.make_node("Slice", [scores, "passerelle_one", "passerelle_two",
                                   "passerelle_one"], ["passerelle_positive"],
                         name="passerelle_positive"),
        helper.make_node("Sub", ["passerelle_positive", "passerelle_positive"],
                         ["passerelle_zero"], name="passerelle_zero"),
        helper.make_node("Concat", ["passerelle_zero", "passerelle_positive"],
                         ["passerelle_two_class"], axis=1, name="passerelle_two_class"),
    ])
    return "passerelle_two_class"


def _mlp_log_softmax(proto: onnx.ModelProto, n_classes: int) -> None:
    """Replace the output activation (Softmax, or Sigmoid for two classes) by a
    log-softmax of its input; everything after it is pruned."""
    acts = [n for n in proto.graph.node if n.op_type in ("Softmax", "Sigmoid")]
    if not acts:
        raise ConversionError("MLPClassifier: no output activation in the converted graph")
    last = acts[-1]
    z = last.input[0]
    if last.op_type == "Softmax":
        proto.graph.node.append(helper.make_node("LogSoftmax", [z], [OUTPUT], axis=-1,
                                                 name="passerelle_log_softmax"))
    else:
        proto.graph.node.extend([
            helper.make_node("Sub", [z, z], ["passerelle_zero"], name="passerelle_zero"),
            helper.make_node("Concat", ["passerelle_zero", z], ["passerelle_pair"], axis=1,
                             name="passerelle_pair"),
            helper.make_node("LogSoftmax", ["passerelle_pair"], [OUTPUT], axis=-1,
                             name="passerelle_log_softmax"),
        ])
    _set_single_output(proto, n_classes)


def _set_single_output(proto: onnx.ModelProto, n_classes: int) -> None:
    del proto.graph.output[:]
    proto.graph.output.append(
        helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [None, n_classes]))


def _transformed_width(pre: Any, n_features: int) -> int:
    try:
        out = pre.transform(np.zeros((1, n_features), dtype=np.float32))
    except Exception as e:  # a transformer fitted on another width raises ValueError
        raise ConversionError(f"the pipeline's transformers do not take {n_features} "
                              f"features: {e}") from e
    return int(out.shape[1])


def _transformers_to_onnx(pre: Any, n_features: int) -> onnx.ModelProto:
    """The pipeline's transformers, their constants frozen into Constant nodes."""
    proto = _convert(pre, n_features, INPUT, None)
    if len(proto.graph.output) != 1:
        raise ConversionError("the pipeline's transformers give "
                              f"{len(proto.graph.output)} outputs; expected one")
    proto = onnx.compose.add_prefix(proto, "pre_")
    _rename_input(proto, "pre_" + INPUT, INPUT)
    constants = [helper.make_node("Constant", [], [t.name], value=t, name=f"{t.name}_const")
                 for t in proto.graph.initializer]
    del proto.graph.initializer[:]
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(constants + nodes)
    return proto


def _compose(pre: onnx.ModelProto, head: onnx.ModelProto, head_input: str) -> onnx.ModelProto:
    """``pre``'s output feeds ``head``'s input ``head_input``: one graph."""
    link = pre.graph.output[0].name
    for node in head.graph.node:
        node.input[:] = [link if i == head_input else i for i in node.input]
    graph = pre.graph
    graph.node.extend(head.graph.node)
    graph.initializer.extend(head.graph.initializer)
    del graph.output[:]
    graph.output.extend(head.graph.output)
    del graph.value_info[:]
    versions = {o.domain: o.version for o in pre.opset_import}
    for o in head.opset_import:
        versions[o.domain] = max(o.version, versions.get(o.domain, 0))
    del pre.opset_import[:]
    pre.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
    pre.ir_version = max(pre.ir_version, head.ir_version)
    return pre


def _probe(model: Any, proto: onnx.ModelProto, n_features: int) -> None:
    """Run the ONNX on a few generated bags of words against scikit-learn: a convention
    slip (column order, sign, a missing transformer) is a ConversionError here, not a
    parity failure later."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.random((16, n_features)).astype(np.float32)
    x[x < 0.9] = 0.0
    x /= np.maximum(x.sum(axis=1, keepdims=True), 1e-9)
    expected = sklearn_logits(model, x)
    try:
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT], {INPUT: x})[0]
    except Exception as e:  # onnxruntime raises its own exception types
        raise ConversionError(f"onnxruntime cannot run the converted model: {e}") from e
    if got.shape != expected.shape:
        raise ConversionError(f"the converted model gives logits of shape {got.shape}; "
                              f"scikit-learn gives {expected.shape}")
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(got - expected).max())
    if not diff <= _PROBE_TOLERANCE * scale:
        raise ConversionError(f"the converted model differs from scikit-learn by {diff:.3g} "
                              "on generated inputs")


def _rename_input(proto: onnx.ModelProto, old: str, new: str) -> None:
    for node in proto.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    for value in proto.graph.input:
        if value.name == old:
            value.name = new


def rename_output(proto: onnx.ModelProto, old: str, new: str) -> None:
    """Rename the graph output ``old`` (and every edge that reads it) to ``new``."""
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
