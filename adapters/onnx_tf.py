"""ONNX -> TensorFlow: a trainable executor in which the ONNX graph stays the source of truth.

``OnnxExecutor.from_model(proto)`` turns every float weight of the graph into a
``tf.Variable`` (trainable unless frozen) and every other initializer into a constant,
then runs the graph node by node, each node through a function of the operator table
(``@register_op(domain, op_type)``, one function per operator, opacus-style). Calling
the executor is ordinary TensorFlow: it works eagerly, under ``tf.GradientTape`` (the
gradients reach the variables) and inside ``tf.function``/``tf.vectorized_map`` (the
Python side only reads static ranks and build-time constants). ``to_model()`` writes the
variables back into a copy of the same graph: same tensor names, dtypes and shapes,
every other byte unchanged.

Weights
    A *weight* is a float initializer (float16/32/64) of rank 1 or more, or a float-list
    attribute that an operator declares as a weight (``LinearClassifier``'s
    ``coefficients`` and ``intercepts``, named ``"<node name>.<attribute>"``). Integer
    and bool initializers (axes, shapes, mask values) and float scalars (rank 0: the
    constants tf2onnx folds into initializers, such as gelu's 0.5 and 1/sqrt(2), an
    epsilon, the fill value of ``ones``/``zeros``) are constants and never train; so is
    a float initializer that only ``Shape``/``Size`` nodes read (tf2onnx leaves such
    copies of a kernel behind after folding the kernel into a ``Gemm``), and running
    statistics (``BatchNormalization``'s mean and variance: see ``register_op``).

Groups ("layers")
    Every weight belongs to the group of the first node that consumes it: the node's
    name without its last ``/`` component, or the node's name when it has none. For a
    Keras model converted by tf2onnx this is the Keras layer: the initializers
    ``pmsi_coder/hidden/MatMul/ReadVariableOp:0`` and
    ``pmsi_coder/hidden/BiasAdd/ReadVariableOp:0`` are consumed by the nodes
    ``pmsi_coder/hidden/MatMul`` and ``pmsi_coder/hidden/BiasAdd``: group
    ``pmsi_coder/hidden``. A selection may name a weight, a group, or a group's last
    component (``hidden``) when no other group ends the same way. A node tf2onnx wrote
    itself has no scope (``Gemm__150``, ``GRU__577``): its weights join the group of the
    nearest scoped node its outputs flow into (a folded attention kernel joins
    ``.../attention/query``). For skl2onnx graphs,
    whose node names have no scope, the group is the node (``LinearClassifier``,
    ``MatMul1``). A node without a name, or whose name another node shares, is called
    ``<name or op_type>_<index>``. See :func:`parameter_groups`.

Tied weights
    A weight read by several nodes is one variable (its gradient sums the uses);
    ``Parameter.consumers`` names every reader, so that per-example clipping can treat
    it as one weight or refuse it.

Per-example gradients
    ``tf.vectorized_map`` over the executor (one example per call, batch dimension 1)
    gives the same gradients as a loop. Note that an embedding's per-example gradient
    is then a dense (vocabulary x dim) tensor per example: cheap for dense layers,
    expensive for large embeddings.

Caveat for tf2onnx graphs: a Keras bias that is exactly zero at export is folded away
(no ``Add`` node, no initializer), so it cannot train afterwards.

The table
    Elementwise, shape, indexing and reduction operators live here; convolution,
    pooling, padding and normalisation in :mod:`adapters.onnx_layers`; GRU and LSTM in
    :mod:`adapters.onnx_recurrent` (both register into this table on import). Each
    operator is validated against the ONNX backend node tests shipped in the onnx
    package (``scripts/onnx_node_tests.py`` prints the counts per operator) and, where
    those tests miss cases vendors' exporters write, against onnxruntime.

What is refused (``UnsupportedModel``, a ``BadInput``), before ``onnx.checker`` runs:
model-local functions (onnx 1.17's checker can overflow its stack on cyclic ones),
external data, subgraph attributes, a default-domain opset outside
``SUPPORTED_OPSETS``, and operators outside the table (``UnsupportedOperators``,
listing them all at once; ``Loop``, ``If`` and ``Scan`` with the way to export without
them: a fixed sequence length, recurrent layers as the ONNX LSTM/GRU operators). When
the executor is built, each operator's ``check`` refuses the attribute values, inputs
and outputs it does not claim (``UnsupportedOperator``, every node listed with its
reason): ``MaxPool``'s ``Indices``, training-mode ``BatchNormalization`` and
``Dropout``, recurrent activations other than Sigmoid/Tanh/Relu/Softsign, casts to
strings or bfloat16, ...
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from adapters.errors import (
    UnknownParameter,
    UnsupportedModel,
    UnsupportedOperator,
    UnsupportedOperators,
)
from passerelle.errors import BadInput

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf

Tensor = Any  # tf.Tensor or tf.Variable; TensorFlow ships no type information
OpResult = Tensor | tuple[Tensor, ...]
OpFunction = Callable[..., OpResult]
OpCheck = Callable[["NodeContext"], "str | None"]  # a reason to refuse the node, or None
F = TypeVar("F", bound=OpFunction)

# protobuf's parse error (imported by name: protobuf ships no type stubs here)
_DecodeError: type[Exception] = importlib.import_module("google.protobuf.message").DecodeError
ML_DOMAIN = "ai.onnx.ml"
STRING = onnx.TensorProto.STRING
SUPPORTED_OPSETS: Mapping[str, range] = {"": range(13, 23), ML_DOMAIN: range(1, 6)}

_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                          onnx.TensorProto.FLOAT16})
_TF_DTYPES: Mapping[int, Any] = {
    onnx.TensorProto.FLOAT: tf.float32, onnx.TensorProto.DOUBLE: tf.float64,
    onnx.TensorProto.FLOAT16: tf.float16, onnx.TensorProto.BFLOAT16: tf.bfloat16,
    onnx.TensorProto.INT8: tf.int8, onnx.TensorProto.INT16: tf.int16,
    onnx.TensorProto.INT32: tf.int32, onnx.TensorProto.INT64: tf.int64,
    onnx.TensorProto.UINT8: tf.uint8, onnx.TensorProto.UINT16: tf.uint16,
    onnx.TensorProto.UINT32: tf.uint32, onnx.TensorProto.UINT64: tf.uint64,
    onnx.TensorProto.BOOL: tf.bool, onnx.TensorProto.STRING: tf.string,
}


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


# --------------------------------------------------------------------------- op table


@dataclass(frozen=True)
class OpSpec:
    """One entry of the operator table."""

    domain: str
    op_type: str
    function: OpFunction
    weights: tuple[str, ...] = ()  # float-list attributes that hold weights
    check: OpCheck | None = None  # run on every node when the executor is built
    statistics: tuple[int, ...] = ()  # input positions holding statistics, never weights


_OPS: dict[tuple[str, str], OpSpec] = {}


def register_op(domain: str, op_type: str, *, weights: Sequence[str] = (),
                check: OpCheck | None = None,
                statistics: Sequence[int] = ()) -> Callable[[F], F]:
    """Register ``function(ctx, *inputs)`` as the implementation of ``domain::op_type``.

    The function receives a :class:`NodeContext` and the node's inputs (``None`` for an
    omitted optional input) and returns a tensor or a tuple of tensors, one per output.
    ``weights`` names float-list attributes that the executor turns into variables and
    hands to the function through ``ctx.weight(name)``. ``check(ctx)``, run on every node
    of the operator when the executor is built, returns the reason why this use of the
    operator (an attribute value, an output) is refused, or ``None``: all refusals of a
    graph are raised together as :class:`~adapters.errors.UnsupportedOperator`.
    ``statistics`` lists input positions that hold statistics of the training data
    (BatchNormalization's running mean and variance): an initializer read there is a
    constant, not a weight (a gradient step could make a variance negative).
    """

    def decorate(function: F) -> F:
        key = (_domain(domain), op_type)
        if key in _OPS:
            raise ValueError(f"operator {key} registered twice")
        _OPS[key] = OpSpec(key[0], op_type, function, tuple(weights), check,
                           tuple(statistics))
        return function

    return decorate


def supported_operators() -> list[tuple[str, str]]:
    """Every ``(domain, op_type)`` of the operator table, sorted (default domain ``""``)."""
    return sorted(_OPS)


@dataclass(frozen=True)
class NodeContext:
    """What an operator function may read besides its inputs, fixed when the plan is built."""

    node: onnx.NodeProto
    opset: int
    attributes: Mapping[str, Any]
    constants: Mapping[str, npt.NDArray[Any]]  # build-time values of tensors, by name
    weights: Mapping[str, Tensor]  # attribute weights (variables or constants)

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.attributes.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def weight(self, name: str) -> Tensor | None:
        return self.weights.get(name)

    def has_input(self, index: int) -> bool:
        return index < len(self.node.input) and bool(self.node.input[index])

    def has_output(self, index: int) -> bool:
        return index < len(self.node.output) and bool(self.node.output[index])

    def known(self, index: int, value: Tensor | None) -> npt.NDArray[Any] | None:
        """Like :meth:`static`, but ``None`` (not a refusal) when the value is only known
        when the graph runs."""
        if not self.has_input(index):
            return None
        name = self.node.input[index]
        if name in self.constants:
            return self.constants[name]
        found = tf.get_static_value(value)
        return None if found is None else np.asarray(found)

    def static(self, index: int, value: Tensor | None) -> npt.NDArray[Any] | None:
        """The build-time value of input ``index`` (axes, shapes), or ``None`` if omitted."""
        if index >= len(self.node.input) or not self.node.input[index]:
            return None
        name = self.node.input[index]
        if name in self.constants:
            return self.constants[name]
        known = tf.get_static_value(value)
        if known is None:
            raise UnsupportedModel(
                f"{self.node.op_type} node {self.node.name!r}: input {name!r} must be a "
                "constant (an initializer or a Constant node)")
        return np.asarray(known)


# ------------------------------------------------------------------ elementwise ops


def _unary(op_type: str, fn: Callable[[Tensor], Tensor]) -> None:
    register_op("", op_type)(lambda ctx, x: fn(x))


for _op, _fn in {
    "Identity": tf.identity, "Relu": tf.nn.relu, "Tanh": tf.math.tanh,
    "Sigmoid": tf.math.sigmoid, "Sqrt": tf.math.sqrt, "Exp": tf.math.exp,
    "Log": tf.math.log, "Neg": tf.math.negative, "Abs": tf.math.abs,
    "Reciprocal": tf.math.reciprocal, "Not": tf.math.logical_not,
}.items():
    _unary(_op, _fn)


def _binary(op_type: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    register_op("", op_type)(lambda ctx, a, b: fn(a, b))


for _op, _fn2 in {
    "Add": tf.math.add, "Sub": tf.math.subtract, "Mul": tf.math.multiply,
    "Equal": tf.math.equal, "Greater": tf.math.greater, "Less": tf.math.less,
}.items():
    _binary(_op, _fn2)


@register_op("", "Div")
def _div(ctx: NodeContext, a: Tensor, b: Tensor) -> Tensor:
    if a.dtype.is_integer:  # ONNX integer division truncates toward zero
        return tf.truncatediv(a, b)
    return tf.math.divide(a, b)


@register_op("", "Pow")
def _pow(ctx: NodeContext, a: Tensor, b: Tensor) -> Tensor:
    return tf.math.pow(a, tf.cast(b, a.dtype))


@register_op("", "Where")
def _where(ctx: NodeContext, cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return tf.where(cond, a, b)


def _check_cast(ctx: NodeContext) -> str | None:
    if ctx.attr("to") == STRING:
        return "casting to strings is not supported"
    if ctx.attr("to") == onnx.TensorProto.BFLOAT16:  # TensorFlow rounds differently
        return "casting to bfloat16 is not supported"
    return None


@register_op("", "Cast", check=_check_cast)
def _cast(ctx: NodeContext, x: Tensor) -> Tensor:
    if x.dtype == tf.string:
        raise UnsupportedModel(f"Cast node {ctx.node.name!r}: casting strings to numbers "
                               "is not supported")
    return tf.cast(x, _tf_dtype(int(ctx.attr("to"))))


@register_op("", "Constant")
def _constant(ctx: NodeContext) -> Tensor:
    return tf.constant(ctx.constants[ctx.node.output[0]])


for _op, _fn in {
    "Erf": tf.math.erf, "Floor": tf.math.floor, "Ceil": tf.math.ceil, "Sign": tf.math.sign,
    "Softsign": tf.math.softsign, "Sin": tf.math.sin, "Cos": tf.math.cos,
}.items():
    _unary(_op, _fn)

for _op, _fn2 in {
    "And": tf.math.logical_and, "Or": tf.math.logical_or, "Xor": tf.math.logical_xor,
    "GreaterOrEqual": tf.math.greater_equal, "LessOrEqual": tf.math.less_equal,
}.items():
    _binary(_op, _fn2)


@register_op("", "LeakyRelu")
def _leaky_relu(ctx: NodeContext, x: Tensor) -> Tensor:
    alpha = tf.cast(float(ctx.attr("alpha", 0.01)), x.dtype)
    return tf.where(x >= 0, x, x * alpha)


@register_op("", "Elu")
def _elu(ctx: NodeContext, x: Tensor) -> Tensor:
    alpha = tf.cast(float(ctx.attr("alpha", 1.0)), x.dtype)
    return tf.where(x >= 0, x, alpha * (tf.math.exp(tf.minimum(x, 0)) - 1))


@register_op("", "Selu")
def _selu(ctx: NodeContext, x: Tensor) -> Tensor:
    alpha = tf.cast(float(ctx.attr("alpha", 1.67326319217681884765625)), x.dtype)
    gamma = tf.cast(float(ctx.attr("gamma", 1.05070102214813232421875)), x.dtype)
    return gamma * tf.where(x > 0, x, alpha * (tf.math.exp(tf.minimum(x, 0)) - 1))


@register_op("", "HardSigmoid")
def _hard_sigmoid(ctx: NodeContext, x: Tensor) -> Tensor:
    alpha = tf.cast(float(ctx.attr("alpha", 0.2)), x.dtype)
    beta = tf.cast(float(ctx.attr("beta", 0.5)), x.dtype)
    return tf.clip_by_value(alpha * x + beta, tf.cast(0, x.dtype), tf.cast(1, x.dtype))


def _check_gelu(ctx: NodeContext) -> str | None:
    kind = ctx.attr("approximate", "none")
    return None if kind in ("none", "tanh") else f"approximate={kind!r}"


@register_op("", "Gelu", check=_check_gelu)
def _gelu(ctx: NodeContext, x: Tensor) -> Tensor:
    return tf.nn.gelu(x, approximate=ctx.attr("approximate", "none") == "tanh")


def _variadic(op_type: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    def run(ctx: NodeContext, *xs: Tensor) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out if len(xs) > 1 else tf.identity(out)

    register_op("", op_type)(run)


_variadic("Sum", tf.math.add)


def _max(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise maximum; NaN wins, as in onnxruntime and numpy."""
    out = tf.math.maximum(a, b)
    if a.dtype.is_floating:
        out = tf.where(tf.math.is_nan(a) | tf.math.is_nan(b), a + b, out)
    return out


def _min(a: Tensor, b: Tensor) -> Tensor:
    out = tf.math.minimum(a, b)
    if a.dtype.is_floating:
        out = tf.where(tf.math.is_nan(a) | tf.math.is_nan(b), a + b, out)
    return out


_variadic("Max", _max)
_variadic("Min", _min)


@register_op("", "Mean")
def _mean(ctx: NodeContext, *xs: Tensor) -> Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out / tf.cast(len(xs), out.dtype)


@register_op("", "Clip")
def _clip(ctx: NodeContext, x: Tensor, low: Tensor | None = None,
          high: Tensor | None = None) -> Tensor:
    # min(max(x, low), high): when low > high every value becomes high, as in ONNX
    if low is not None:
        x = tf.math.maximum(x, tf.cast(low, x.dtype))
    if high is not None:
        x = tf.math.minimum(x, tf.cast(high, x.dtype))
    return x


@register_op("", "Dropout")
def _dropout(ctx: NodeContext, x: Tensor, ratio: Tensor | None = None,
             training: Tensor | None = None) -> OpResult:
    """Inference: the identity (and an all-true mask). Training-mode dropout is refused."""
    mode = ctx.known(2, training)
    if training is not None and (mode is None or bool(np.ravel(mode)[0])):
        raise UnsupportedModel(f"Dropout node {ctx.node.name!r}: training_mode must be a "
                               "constant false (export the model in eval mode)")
    return tf.identity(x), tf.ones_like(x, dtype=tf.bool)


# -------------------------------------------------------------------- linear algebra


@register_op("", "MatMul")
def _matmul(ctx: NodeContext, a: Tensor, b: Tensor) -> Tensor:
    # numpy semantics: a 1-D operand is promoted to a matrix, then the axis is dropped
    a1, b1 = a.shape.rank == 1, b.shape.rank == 1
    out = tf.linalg.matmul(a[tf.newaxis, :] if a1 else a, b[:, tf.newaxis] if b1 else b)
    if b1:
        out = tf.squeeze(out, -1)
    if a1:
        out = tf.squeeze(out, -2 if not b1 else -1)
    return out


@register_op("", "Gemm")
def _gemm(ctx: NodeContext, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    y = tf.linalg.matmul(a, b, transpose_a=bool(ctx.attr("transA", 0)),
                         transpose_b=bool(ctx.attr("transB", 0)))
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    if alpha != 1.0:
        y = y * tf.cast(alpha, y.dtype)
    if c is not None:
        y = y + (c if beta == 1.0 else c * tf.cast(beta, c.dtype))
    return y


@register_op("", "Softmax")
def _softmax(ctx: NodeContext, x: Tensor) -> Tensor:
    return tf.nn.softmax(x, axis=int(ctx.attr("axis", -1)))  # opset >= 13 semantics


@register_op("", "LogSoftmax")
def _log_softmax(ctx: NodeContext, x: Tensor) -> Tensor:
    return tf.nn.log_softmax(x, axis=int(ctx.attr("axis", -1)))


# ----------------------------------------------------------------- indexing, shapes


@register_op("", "Gather")
def _gather(ctx: NodeContext, data: Tensor, indices: Tensor) -> Tensor:
    axis = int(ctx.attr("axis", 0))
    size = tf.shape(data, out_type=indices.dtype)[axis]
    indices = tf.where(indices < 0, indices + size, indices)  # ONNX allows negative indices
    if isinstance(data, tf.Variable):  # a plain gather, which tf.vectorized_map vectorises
        data = tf.convert_to_tensor(data)  # (a variable's own gather it only loops over)
    return tf.gather(data, indices, axis=axis)


@register_op(ML_DOMAIN, "ArrayFeatureExtractor")
def _array_feature_extractor(ctx: NodeContext, x: Tensor, indices: Tensor) -> Tensor:
    out = tf.gather(x, tf.reshape(indices, [-1]), axis=-1)
    return out[tf.newaxis] if x.shape.rank == 1 else out


def _axes(values: npt.NDArray[Any] | Sequence[int], rank: int) -> list[int]:
    return sorted(int(a) + rank if int(a) < 0 else int(a) for a in np.ravel(values))


@register_op("", "Unsqueeze")
def _unsqueeze(ctx: NodeContext, x: Tensor, axes: Tensor) -> Tensor:
    wanted = ctx.static(1, axes)
    assert wanted is not None  # noqa: S101  (a required input; the checker enforces it)
    for axis in _axes(wanted, x.shape.rank + wanted.size):
        x = tf.expand_dims(x, axis)
    return x


@register_op("", "Squeeze")
def _squeeze(ctx: NodeContext, x: Tensor, axes: Tensor | None = None) -> Tensor:
    wanted = ctx.static(1, axes)
    return tf.squeeze(x, axis=None if wanted is None else _axes(wanted, x.shape.rank))


@register_op("", "Reshape")
def _reshape(ctx: NodeContext, x: Tensor, shape: Tensor) -> Tensor:
    allow_zero = bool(ctx.attr("allowzero", 0))
    known = tf.get_static_value(shape) if ctx.node.input[1] not in ctx.constants \
        else ctx.constants[ctx.node.input[1]]
    if known is not None and (allow_zero or 0 not in np.ravel(known)):
        return tf.reshape(x, [int(d) for d in np.ravel(known)])
    shape = tf.cast(shape, tf.int64)
    if not allow_zero:  # 0 copies the input's dimension at the same position
        n = int(shape.shape[0])
        dims = tf.concat([tf.shape(x, out_type=tf.int64), tf.zeros([n], tf.int64)], 0)[:n]
        shape = tf.where(tf.equal(shape, 0), dims, shape)
    return tf.reshape(x, shape)


@register_op("", "Flatten")
def _flatten(ctx: NodeContext, x: Tensor) -> Tensor:
    axis = int(ctx.attr("axis", 1))
    axis = axis + x.shape.rank if axis < 0 else axis
    outer = tf.reduce_prod(tf.shape(x)[:axis])
    return tf.reshape(x, tf.stack([outer, -1]))


@register_op("", "Transpose")
def _transpose(ctx: NodeContext, x: Tensor) -> Tensor:
    perm = ctx.attr("perm")
    return tf.transpose(x, perm=None if perm is None else list(perm))


@register_op("", "Concat")
def _concat(ctx: NodeContext, *xs: Tensor) -> Tensor:
    return tf.concat(list(xs), axis=int(ctx.attr("axis")))


@register_op("", "Shape")
def _shape(ctx: NodeContext, x: Tensor) -> Tensor:
    return tf.shape(x, out_type=tf.int64)[int(ctx.attr("start", 0)):ctx.attr("end")]


@register_op("", "ArgMax")
def _argmax(ctx: NodeContext, x: Tensor) -> Tensor:
    axis = int(ctx.attr("axis", 0))
    axis = axis + x.shape.rank if axis < 0 else axis
    if ctx.attr("select_last_index", 0):
        last = tf.shape(x, out_type=tf.int64)[axis] - 1
        out = last - tf.math.argmax(tf.reverse(x, [axis]), axis=axis, output_type=tf.int64)
    else:
        out = tf.math.argmax(x, axis=axis, output_type=tf.int64)
    return tf.expand_dims(out, axis) if ctx.attr("keepdims", 1) else out


def _ints(values: npt.NDArray[Any] | Sequence[int]) -> list[int]:
    return [int(v) for v in np.ravel(values)]


@register_op("", "Slice")
def _slice(ctx: NodeContext, x: Tensor, starts: Tensor, ends: Tensor,
           axes: Tensor | None = None, steps: Tensor | None = None) -> Tensor:
    """numpy slicing on the listed axes (negative indices count from the end; out-of-range
    bounds are clamped; a negative step walks backwards), through ``tf.strided_slice``."""
    rank = x.shape.rank
    n = int(starts.shape[0])
    given = ctx.static(3, axes)
    wanted = list(range(n)) if given is None else [a + rank if a < 0 else a
                                                    for a in _ints(given)]
    stride = [1] * n if steps is None else _ints(ctx.static(4, steps))  # type: ignore[arg-type]
    if 0 in stride:
        raise UnsupportedModel(f"Slice node {ctx.node.name!r}: a step of 0")
    strides = [1] * rank
    for axis, s in zip(wanted, stride, strict=True):
        strides[axis] = s
    mask = sum(1 << a for a in range(rank) if a not in wanted)
    known_starts, known_ends = ctx.known(1, starts), ctx.known(2, ends)

    def full(values: npt.NDArray[Any] | None, tensor: Tensor) -> Any:
        if values is not None:
            out = np.zeros(rank, np.int64)
            out[wanted] = np.ravel(values).astype(np.int64)
            return out
        return tf.tensor_scatter_nd_update(tf.zeros([rank], tf.int64),
                                           [[a] for a in wanted], tf.cast(tensor, tf.int64))

    return tf.strided_slice(x, full(known_starts, starts), full(known_ends, ends),
                            np.asarray(strides, np.int64), begin_mask=mask, end_mask=mask)


@register_op("", "Expand")
def _expand(ctx: NodeContext, x: Tensor, shape: Tensor) -> Tensor:
    """Two-way broadcast of ``x`` with ``shape`` (a 1 in ``shape`` keeps ``x``'s size)."""
    known = ctx.known(1, shape)
    if known is not None and x.shape.is_fully_defined():  # static: shapes stay known
        return tf.broadcast_to(x, np.broadcast_shapes(tuple(x.shape.as_list()),
                                                      tuple(_ints(known))))
    target = tf.cast(shape, tf.int64) if known is None else tf.constant(_ints(known), tf.int64)
    return tf.broadcast_to(x, tf.broadcast_dynamic_shape(tf.shape(x, out_type=tf.int64),
                                                         target))


@register_op("", "Tile")
def _tile(ctx: NodeContext, x: Tensor, repeats: Tensor) -> Tensor:
    known = ctx.known(1, repeats)
    return tf.tile(x, _ints(known) if known is not None else tf.cast(repeats, tf.int64))


@register_op("", "ConstantOfShape")
def _constant_of_shape(ctx: NodeContext, shape: Tensor) -> Tensor:
    value = ctx.attr("value")
    fill = (np.zeros(1, np.float32) if value is None
            else np.ravel(numpy_helper.to_array(value)))
    known = ctx.known(0, shape)
    dims: Any = _ints(known) if known is not None else tf.cast(shape, tf.int64)
    return tf.fill(dims, tf.constant(fill[0], dtype=tf.as_dtype(fill.dtype)))


@register_op("", "Range")
def _range(ctx: NodeContext, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    dtype = start.dtype
    if dtype in (tf.int16, tf.int8):  # tf.range counts in int32/int64/float only
        out = tf.range(tf.cast(start, tf.int32), tf.cast(limit, tf.int32),
                       tf.cast(delta, tf.int32))
        return tf.cast(out, dtype)
    return tf.range(start, limit, delta, dtype=dtype)


@register_op("", "CumSum")
def _cumsum(ctx: NodeContext, x: Tensor, axis: Tensor) -> Tensor:
    known = ctx.static(1, axis)
    assert known is not None  # noqa: S101  (a required input)
    return tf.math.cumsum(x, axis=int(np.ravel(known)[0]),
                          exclusive=bool(ctx.attr("exclusive", 0)),
                          reverse=bool(ctx.attr("reverse", 0)))


@register_op("", "Split")
def _split(ctx: NodeContext, x: Tensor, split: Tensor | None = None) -> OpResult:
    axis = int(ctx.attr("axis", 0))
    axis = axis + x.shape.rank if axis < 0 else axis
    n = len(ctx.node.output)
    sizes: list[int] | None = None
    if split is not None:
        sizes = _ints(ctx.static(1, split))  # type: ignore[arg-type]
    elif ctx.attr("split") is not None:  # opset < 13
        sizes = _ints(ctx.attr("split"))
    if sizes is None:
        total = x.shape[axis]
        if total is None:
            return tuple(tf.split(x, n, axis=axis))
        chunk = -(-int(total) // n)  # opset 18: the last chunk may be smaller
        sizes = [min(chunk, int(total) - i * chunk) for i in range(n)]
    return tuple(tf.split(x, sizes, axis=axis))


@register_op("", "ReverseSequence")
def _reverse_sequence(ctx: NodeContext, x: Tensor, lengths: Tensor) -> Tensor:
    return tf.reverse_sequence(x, lengths, seq_axis=int(ctx.attr("time_axis", 0)),
                               batch_axis=int(ctx.attr("batch_axis", 1)))


# -------------------------------------------------------------------------- reductions


def _reduce(fn: Callable[..., Tensor], axes_input_since: int) -> OpFunction:
    def run(ctx: NodeContext, x: Tensor, axes: Tensor | None = None) -> Tensor:
        if ctx.opset >= axes_input_since:
            given = ctx.static(1, axes)
        else:
            given = None if ctx.attr("axes") is None else np.asarray(ctx.attr("axes"))
        if given is None or given.size == 0:
            if ctx.attr("noop_with_empty_axes", 0):
                return tf.identity(x)
            wanted = None
        else:
            wanted = _axes(given, x.shape.rank)
        return fn(x, axis=wanted, keepdims=bool(ctx.attr("keepdims", 1)))

    return run


register_op("", "ReduceSum")(_reduce(tf.math.reduce_sum, 13))
register_op("", "ReduceMean")(_reduce(tf.math.reduce_mean, 18))


def _reduce_max(x: Tensor, axis: Any, keepdims: bool) -> Tensor:
    if x.dtype == tf.bool:  # opset 20 reduces booleans too
        return tf.math.reduce_any(x, axis=axis, keepdims=keepdims)
    return tf.math.reduce_max(x, axis=axis, keepdims=keepdims)


def _reduce_min(x: Tensor, axis: Any, keepdims: bool) -> Tensor:
    if x.dtype == tf.bool:
        return tf.math.reduce_all(x, axis=axis, keepdims=keepdims)
    return tf.math.reduce_min(x, axis=axis, keepdims=keepdims)


register_op("", "ReduceMax")(_reduce(_reduce_max, 18))


def _sum_square(x: Tensor, axis: Any, keepdims: bool) -> Tensor:
    return tf.math.reduce_sum(tf.math.square(x), axis=axis, keepdims=keepdims)


def _l1(x: Tensor, axis: Any, keepdims: bool) -> Tensor:
    return tf.math.reduce_sum(tf.math.abs(x), axis=axis, keepdims=keepdims)


def _l2(x: Tensor, axis: Any, keepdims: bool) -> Tensor:
    return tf.math.sqrt(_sum_square(x, axis, keepdims))


def _log_sum(x: Tensor, axis: Any, keepdims: bool) -> Tensor:
    return tf.math.log(tf.math.reduce_sum(x, axis=axis, keepdims=keepdims))


def _log_sum_exp(x: Tensor, axis: Any, keepdims: bool) -> Tensor:
    return tf.math.reduce_logsumexp(x, axis=axis, keepdims=keepdims)


for _op, _reducer in {
    "ReduceMin": _reduce_min, "ReduceProd": tf.math.reduce_prod,
    "ReduceSumSquare": _sum_square, "ReduceL1": _l1, "ReduceL2": _l2,
    "ReduceLogSum": _log_sum, "ReduceLogSumExp": _log_sum_exp,
}.items():
    register_op("", _op)(_reduce(_reducer, 18))


# ------------------------------------------------------------------- ai.onnx.ml ops


@register_op(ML_DOMAIN, "LinearClassifier", weights=("coefficients", "intercepts"))
def _linear_classifier(ctx: NodeContext, x: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs (label, scores): ``scores = x @ coefficients.reshape(targets, -1).T + b``."""
    if x.dtype != tf.float64:
        x = tf.cast(x, tf.float32)
    coefficients, intercepts = ctx.weight("coefficients"), ctx.weight("intercepts")
    if coefficients is None:
        raise UnsupportedModel(f"LinearClassifier {ctx.node.name!r} has no coefficients")
    if intercepts is not None:
        n_targets = int(intercepts.shape[0])
    else:  # no intercepts: the feature count must be known to count the targets
        n_targets = int(coefficients.shape[0]) // int(x.shape[-1])
    weights = tf.reshape(tf.cast(coefficients, x.dtype), [n_targets, -1])
    scores = tf.linalg.matmul(x, weights, transpose_b=True)
    if intercepts is not None:
        scores = scores + tf.cast(intercepts, x.dtype)
    ints, strings = ctx.attr("classlabels_ints"), ctx.attr("classlabels_strings")
    labels: Any = (tf.constant(list(ints), tf.int64) if ints is not None
                   else tf.constant([s.decode() for s in strings or []], tf.string))
    n_labels = int(labels.shape[0])
    kind = str(ctx.attr("post_transform", "NONE"))
    if n_targets == 1 and n_labels == 2:
        return _binary_linear_classifier(kind, scores, labels)
    scores = _post_transform(kind, scores)
    if n_targets > 1:
        best = tf.math.argmax(scores, axis=-1, output_type=tf.int64)
        label = tf.gather(labels, best) if n_labels else best
    else:
        threshold = 0.0 if kind == "NONE" else 0.5
        positive = scores[:, 0] >= threshold
        first = labels[0] if n_labels else tf.constant(1, tf.int64)
        label = tf.where(positive, first, tf.zeros_like(first))
    return label, scores


def _binary_linear_classifier(kind: str, s: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """One score ``s`` for two classes, as onnxruntime computes it: ``(1 - t, t)`` with
    ``t = sigmoid(s)`` for LOGISTIC and ``t = s`` otherwise (no softmax is applied); the
    label is the second class when ``s > 0``. (The ONNX reference writes ``(-s, s)``;
    onnxruntime is what runs the models, so its semantics win.)"""
    if kind == "PROBIT":
        raise UnsupportedModel("binary LinearClassifier with PROBIT is not supported")
    t = tf.math.sigmoid(s) if kind == "LOGISTIC" else s
    label = tf.where(s[:, 0] > 0, labels[1], labels[0])
    return label, tf.concat([1 - t, t], axis=-1)


def _post_transform(kind: str, scores: Tensor) -> Tensor:
    if kind == "NONE":
        return scores
    if kind == "LOGISTIC":
        return tf.math.sigmoid(scores)
    if kind == "SOFTMAX":
        return tf.nn.softmax(scores, axis=-1)
    if kind == "SOFTMAX_ZERO":  # zero scores get zero probability
        nonzero = tf.not_equal(scores, 0)
        e = tf.where(nonzero, tf.exp(scores - tf.reduce_max(scores, -1, keepdims=True)), 0)
        return e / tf.reduce_sum(e, -1, keepdims=True)
    if kind == "PROBIT":
        return tf.math.sqrt(tf.constant(2.0, scores.dtype)) * tf.math.erfinv(2 * scores - 1)
    raise UnsupportedModel(f"unknown post_transform {kind!r}")


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Parameter:
    """A float weight of the graph, where it lives and whether it trains."""

    name: str  # initializer name, or "<node name>.<attribute>"
    group: str  # see the module docstring
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    consumers: tuple[str, ...]  # names of the nodes that read it (more than one: tied)
    location: Literal["initializer", "attribute"]


@dataclass(frozen=True)
class _Step:
    spec: OpSpec
    ctx: NodeContext


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file without ever following its external-data references."""
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except (OSError, ValueError, _DecodeError) as e:
        raise BadInput(f"cannot read ONNX model {Path(path).name}: {e}") from e


def parameter_groups(model: onnx.ModelProto) -> dict[str, tuple[str, ...]]:
    """Group name -> names of the float weights in that group (see the module docstring)."""
    groups: dict[str, list[str]] = {}
    for name, (group, _, _) in _weight_sources(model).items():
        groups.setdefault(group, []).append(name)
    return {g: tuple(names) for g, names in sorted(groups.items())}


def _node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique name per node: its own when it has a unique one, else op type and index."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.name] = counts.get(node.name, 0) + 1
    return [n.name if n.name and counts[n.name] == 1 else f"{n.name or n.op_type}_{i}"
            for i, n in enumerate(graph.node)]


def _scope(node_name: str) -> str:
    if "/" not in node_name:
        return node_name
    scope = node_name.rsplit("/", 1)[0]
    while "/" in scope and scope.rsplit("/", 1)[1] in _TF_INNER_SCOPES:
        scope = scope.rsplit("/", 1)[0]
    return scope


# name scopes TensorFlow opens inside a Keras layer (Dense on 3-D input, LayerNormalization,
# a recurrent layer's function): their weights belong to the layer
_TF_INNER_SCOPES = frozenset({"Tensordot", "batchnorm", "PartitionedCall"})


def _downstream_scopes(graph: onnx.GraphProto, names: Sequence[str]) -> dict[str, str]:
    """For a node without a scope (tf2onnx names the nodes it writes itself ``Gemm__150``,
    ``GRU__577``): the scope of the nearest scoped node its outputs flow into (the
    ``.../attention/query/add`` that follows a folded query kernel), if any."""
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for inp in node.input:
            readers.setdefault(inp, []).append(i)
    out: dict[str, str] = {}
    for start, name in enumerate(names):
        if "/" in name:
            continue
        frontier, seen = [start], {start}
        for _ in range(_SCOPE_SEARCH_DEPTH):
            following = sorted({j for i in frontier for o in graph.node[i].output
                                for j in readers.get(o, []) if j not in seen})
            scoped = [names[j] for j in following if "/" in names[j]]
            if scoped:
                out[name] = _scope(scoped[0])
                break
            seen.update(following)
            frontier = following
    return out


_SCOPE_SEARCH_DEPTH = 4


_SHAPE_READERS = frozenset({"Shape", "Size"})  # read a tensor's shape, never its values


def _weight_sources(
    model: onnx.ModelProto,
) -> dict[str, tuple[str, tuple[str, ...], Literal["initializer", "attribute"]]]:
    """Float weight name -> (group, consumer node names, location), in graph order."""
    names = _node_names(model.graph)
    downstream = _downstream_scopes(model.graph, names)
    ops = {name: node.op_type for name, node in zip(names, model.graph.node, strict=True)}
    consumers: dict[str, list[str]] = {}
    valued: set[str] = set()  # tensors some node reads for their values, not only their shape
    attribute_weights: dict[str, tuple[str, tuple[str, ...], Literal["attribute"]]] = {}
    for name, node in zip(names, model.graph.node, strict=True):
        spec = _OPS.get((_domain(node.domain), node.op_type))
        for position, inp in enumerate(node.input):
            consumers.setdefault(inp, []).append(name)
            shape_only = node.op_type in _SHAPE_READERS and not _domain(node.domain)
            if not shape_only and not (spec is not None and position in spec.statistics):
                valued.add(inp)
        for attr in node.attribute:
            if spec is not None and attr.name in spec.weights:
                attribute_weights[f"{name}.{attr.name}"] = (_scope(name), (name,), "attribute")
    out: dict[str, tuple[str, tuple[str, ...], Literal["initializer", "attribute"]]] = {}
    for t in model.graph.initializer:  # (a float scalar is arithmetic, not a weight)
        if t.data_type in _FLOAT_TYPES and t.name in valued and len(t.dims):
            users = tuple(dict.fromkeys(consumers[t.name]))
            first = next(u for u in users if ops[u] not in _SHAPE_READERS)  # one exists
            out[t.name] = (downstream.get(first, _scope(first)), users, "initializer")
    out.update(attribute_weights)
    return out


def _tf_dtype(onnx_type: int) -> Any:
    try:
        return _TF_DTYPES[onnx_type]
    except KeyError:
        raise UnsupportedModel(
            f"unsupported tensor type {helper.tensor_dtype_to_string(onnx_type)}") from None


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name).lstrip("_./-") or "weight"


# ----------------------------------------------------------------- model validation


def _validate(model: onnx.ModelProto) -> dict[str, int]:
    """Refuse what the executor does not run; return the opset version per domain."""
    graph = model.graph
    # (1) model-local functions: refused before the checker (cyclic ones overflow it)
    if len(model.functions):
        names = ", ".join(sorted(f"{f.domain}::{f.name}" for f in model.functions))
        raise UnsupportedModel(f"model-local functions are not supported: {names}")
    # (2) external data, anywhere a tensor can live
    tensors = [*graph.initializer, *(s.values for s in graph.sparse_initializer)]
    for node in graph.node:
        for attr in node.attribute:
            tensors.extend([attr.t] if attr.HasField("t") else [])
            tensors.extend(attr.tensors)
    external = [t.name for t in tensors
                if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data)]
    if external:
        raise UnsupportedModel(f"external data is not supported: {sorted(external)}")
    if len(graph.sparse_initializer):
        raise UnsupportedModel("sparse initializers are not supported")
    # (3) every operator in the table, all unsupported ones listed at once; control flow
    #     gets the way out (an exporter setting), not only a refusal
    unsupported = {(_domain(n.domain), n.op_type) for n in graph.node} - set(_OPS)
    flow = sorted(op for d, op in unsupported if not d and op in _CONTROL_FLOW)
    if flow:
        raise UnsupportedOperators(unsupported, hint=_CONTROL_FLOW_HINT.format(", ".join(flow)))
    if unsupported:
        raise UnsupportedOperators(unsupported)
    # (4) no subgraphs (If, Loop, Scan) or graph-valued attributes on any node
    with_graphs = [n.name or n.op_type for n in graph.node for a in n.attribute
                   if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)]
    if with_graphs:
        raise UnsupportedModel(f"subgraph attributes are not supported: {with_graphs}")
    # (5) opsets the table's semantics were written for
    opsets = {_domain(o.domain): int(o.version) for o in model.opset_import}
    for domain in {_domain(n.domain) for n in graph.node}:
        version = opsets.get(domain)
        if version is None or version not in SUPPORTED_OPSETS.get(domain, range(0)):
            raise UnsupportedModel(
                f"opset {version} of domain {domain or 'ai.onnx'!r} is not supported")
    # (6) the structural checker, now that the inputs it chokes on are gone
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise BadInput(f"invalid ONNX model: {str(e).splitlines()[0]}") from e
    # (7) dense tensor inputs only
    for value in graph.input:
        if not value.type.HasField("tensor_type"):
            raise UnsupportedModel(f"input {value.name!r} is not a tensor")
    return opsets


_CONTROL_FLOW = frozenset({"Loop", "If", "Scan", "SequenceMap"})
_CONTROL_FLOW_HINT = (
    "{} runs a subgraph, which the executor does not train; export without control flow: "
    "a fixed sequence length (pad or truncate to max_len), recurrent layers exported as the "
    "ONNX LSTM/GRU operators (Keras: no mask, i.e. no mask_zero=True and no Masking layer, "
    "so that tf2onnx writes LSTM/GRU instead of a Loop; PyTorch: nn.LSTM/nn.GRU, no Python "
    "loop over time steps, no data-dependent if), or a Python loop unrolled at export")


def _check_nodes(steps: Sequence[_Step]) -> None:
    """(8) every operator's own refusals (attributes, outputs), all listed at once."""
    problems: list[tuple[str, str, str, str]] = []
    for step in steps:
        if step.spec.check is not None:
            reason = step.spec.check(step.ctx)
            if reason:
                node = step.ctx.node
                problems.append((_domain(node.domain), node.op_type,
                                 node.name or node.op_type, reason))
    if problems:
        raise UnsupportedOperator(problems)


def _resolve_trainable(
    model: onnx.ModelProto,
    sources: Mapping[str, tuple[str, tuple[str, ...], str]],
    selection: Collection[str] | None,
) -> set[str]:
    if selection is None:
        return set(sources)
    if isinstance(selection, str):
        raise TypeError("trainable is a collection of names, not one string")
    by_group: dict[str, list[str]] = {}
    for name, (group, _, _) in sources.items():
        by_group.setdefault(group, []).append(name)
    short: dict[str, list[str]] = {}
    for group in by_group:
        short.setdefault(group.rsplit("/", 1)[-1], []).append(group)
    non_float = {t.name for t in model.graph.initializer if t.data_type not in _FLOAT_TYPES}
    chosen: set[str] = set()
    for item in selection:
        if item in sources:
            chosen.add(item)
        elif item in by_group:
            chosen.update(by_group[item])
        elif len(short.get(item, [])) == 1:
            chosen.update(by_group[short[item][0]])
        elif item in non_float:
            raise UnsupportedModel(f"cannot train {item!r}: only float tensors train")
        elif len(short.get(item, [])) > 1:
            raise UnknownParameter(f"{item!r} is ambiguous: {sorted(short[item])}")
        else:
            raise UnknownParameter(f"no weight or group named {item!r}; groups are "
                                   f"{sorted(by_group)}")
    return chosen


# ---------------------------------------------------------------------------- executor


class OnnxExecutor:
    """Run an ONNX graph as TensorFlow operations with its float weights as variables."""

    def __init__(
        self,
        model: onnx.ModelProto,
        steps: Sequence[_Step],
        tensors: Mapping[str, Tensor],
        variables: Mapping[str, Any],
        parameters: Sequence[Parameter],
    ) -> None:
        """Use :meth:`from_model`; this only stores what it built."""
        self._model = model
        self._steps = tuple(steps)
        self._tensors = dict(tensors)
        self._variables = dict(variables)
        self._parameters = tuple(parameters)
        init = {t.name for t in model.graph.initializer}
        self.input_names = tuple(v.name for v in model.graph.input if v.name not in init)
        self.output_names = tuple(v.name for v in model.graph.output)
        self._input_dtypes = {v.name: _tf_dtype(v.type.tensor_type.elem_type)
                              for v in model.graph.input if v.name not in init}

    @classmethod
    def from_model(
        cls, model: onnx.ModelProto, trainable: Collection[str] | None = None
    ) -> OnnxExecutor:
        """Validate ``model`` and build the executor.

        ``trainable``: names of weights, groups or short group names that train; the
        other float weights become constants. ``None`` trains every float weight.
        """
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        opsets = _validate(proto)
        sources = _weight_sources(proto)
        chosen = _resolve_trainable(proto, sources, trainable)

        tensors: dict[str, Tensor] = {}
        variables: dict[str, Any] = {}
        constants: dict[str, npt.NDArray[Any]] = {}
        parameters: list[Parameter] = []

        def hold(name: str, value: npt.NDArray[Any], location: Any) -> Tensor:
            if name in sources:
                group, users, _ = sources[name]
                parameters.append(Parameter(name, group, tuple(value.shape), str(value.dtype),
                                            name in chosen, users, location))
            if name in chosen:
                variables[name] = tf.Variable(value, trainable=True, name=_sanitize(name))
                return variables[name]
            if name not in sources:
                constants[name] = value
            return tf.constant(value)

        for t in proto.graph.initializer:
            if t.data_type == onnx.TensorProto.STRING:
                raise UnsupportedModel(f"string initializer {t.name!r} is not supported")
            tensors[t.name] = hold(t.name, numpy_helper.to_array(t), "initializer")

        steps: list[_Step] = []
        for node_name, node in zip(_node_names(proto.graph), proto.graph.node, strict=True):
            spec = _OPS[(_domain(node.domain), node.op_type)]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            weights: dict[str, Tensor] = {}
            for attr_name in spec.weights:
                if attr_name in attrs:
                    value = np.asarray(attrs.pop(attr_name), dtype=np.float32)
                    key = f"{node_name}.{attr_name}"
                    weights[attr_name] = hold(key, value, "attribute")
            if node.op_type == "Constant" and not node.domain:
                constants[node.output[0]] = _constant_value(node, attrs)
            ctx = NodeContext(node, opsets[_domain(node.domain)], attrs, constants, weights)
            steps.append(_Step(spec, ctx))
        _check_nodes(steps)
        return cls(proto, steps, tensors, variables, parameters)

    # ----------------------------------------------------------------- introspection

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        """Every float weight, trainable or frozen, in graph order."""
        return self._parameters

    @property
    def trainable_variables(self) -> tuple[Any, ...]:
        """The ``tf.Variable`` of every trainable weight, in :attr:`parameters` order."""
        return tuple(self._variables[p.name] for p in self._parameters if p.trainable)

    @property
    def variables_by_name(self) -> Mapping[str, Any]:
        return dict(self._variables)

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Group name -> weight names (see :func:`parameter_groups`)."""
        out: dict[str, list[str]] = {}
        for p in self._parameters:
            out.setdefault(p.group, []).append(p.name)
        return {g: tuple(v) for g, v in sorted(out.items())}

    # -------------------------------------------------------------------------- run

    def __call__(
        self, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Run the graph; returns the graph outputs (or ``outputs``) by name."""
        wanted = tuple(outputs) if outputs is not None else self.output_names
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in wanted if n not in self.output_names]
        if missing or unknown:
            raise BadInput(f"missing inputs {missing}, unknown outputs {unknown}")
        env: dict[str, Tensor] = dict(self._tensors)
        for name in self.input_names:
            try:
                env[name] = tf.convert_to_tensor(inputs[name], dtype=self._input_dtypes[name])
            except (TypeError, ValueError) as e:
                raise BadInput(f"input {name!r}: {e}") from e
        for step in self._needed(wanted):
            args = [env[n] if n else None for n in step.ctx.node.input]
            result = step.spec.function(step.ctx, *args)
            values = result if isinstance(result, tuple) else (result,)
            for name, value in zip(step.ctx.node.output, values, strict=False):
                if name:
                    env[name] = value
        return {name: env[name] for name in wanted}

    # ------------------------------------------------------------- per-layer hook

    @property
    def nodes(self) -> Mapping[str, onnx.NodeProto]:
        """Every node by its unique name (the names of :attr:`Parameter.consumers`)."""
        return dict(zip(_node_names(self._model.graph), self._model.graph.node, strict=True))

    def trace(self, inputs: Mapping[str, Any], names: Sequence[str]) -> dict[str, Tensor]:
        """Run the graph as far as needed for ``names`` (any tensors of the graph: node
        outputs, inputs, initializers) and return them by name. For per-layer activations
        and output gradients (DP-SGD's ghost norms); same semantics as calling."""
        env: dict[str, Tensor] = dict(self._tensors)
        for name in self.input_names:
            try:
                env[name] = tf.convert_to_tensor(inputs[name], dtype=self._input_dtypes[name])
            except (KeyError, TypeError, ValueError) as e:
                raise BadInput(f"input {name!r}: {e}") from e
        for step in self._needed(names):
            args = [env[n] if n else None for n in step.ctx.node.input]
            result = step.spec.function(step.ctx, *args)
            values = result if isinstance(result, tuple) else (result,)
            for name, value in zip(step.ctx.node.output, values, strict=False):
                if name:
                    env[name] = value
        return {name: env[name] for name in names}

    def _needed(self, wanted: Sequence[str]) -> list[_Step]:
        need = set(wanted)
        kept: list[_Step] = []
        for step in reversed(self._steps):
            if need.intersection(step.ctx.node.output):
                kept.append(step)
                need.update(step.ctx.node.input)
        return kept[::-1]

    # --------------------------------------------------------------------- write back

    def to_model(self) -> onnx.ModelProto:
        """A copy of the graph with every variable's current value written back.

        Same tensor names, dtypes and shapes; frozen weights, nodes, metadata and
        everything else byte-identical. Checked with ``full_check=True``.
        """
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        initializers = {t.name: t for t in model.graph.initializer}
        attributes = {f"{name}.{a.name}": a
                      for name, n in zip(_node_names(model.graph), model.graph.node, strict=True)
                      for a in n.attribute}
        for p in self._parameters:
            if not p.trainable:
                continue
            value = np.asarray(self._variables[p.name].numpy())
            if p.location == "initializer":
                _write_tensor(initializers[p.name], value)
            else:
                attributes[p.name].floats[:] = value.astype(np.float32).ravel().tolist()
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as e:  # a bug here, not bad input
            raise AssertionError(f"written-back model fails the checker: {e}") from e
        return model


def _write_tensor(tensor: onnx.TensorProto, value: npt.NDArray[Any]) -> None:
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    if tuple(value.shape) != tuple(tensor.dims):
        raise AssertionError(f"{tensor.name}: shape {value.shape} != {list(tensor.dims)}")
    for field in ("float_data", "double_data", "int32_data", "raw_data"):
        tensor.ClearField(field)
    tensor.raw_data = np.ascontiguousarray(value, dtype=dtype).tobytes()


def _constant_value(node: onnx.NodeProto, attrs: Mapping[str, Any]) -> npt.NDArray[Any]:
    if "value" in attrs:
        return np.asarray(numpy_helper.to_array(attrs["value"]))
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise UnsupportedModel(f"Constant node {node.name!r}: unsupported value {sorted(attrs)}")


# The table's other sections register themselves on import (they use register_op above).
from adapters import onnx_layers, onnx_recurrent  # noqa: E402, F401
