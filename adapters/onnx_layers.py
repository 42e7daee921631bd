"""Operators of the ONNX executor's table for convolutions, pooling, padding and normalisation.

Registered into :mod:`adapters.onnx_tf`'s operator table when that module is imported (this
module is never imported on its own). Tensors keep ONNX's channels-first layout
(``N, C, spatial...``) between nodes; a convolution transposes to TensorFlow's
channels-last layout and back around ``tf.nn.convolution``.

Convolution: 1-, 2- and 3-D, explicit ``pads`` or ``auto_pad`` (``SAME_UPPER``,
``SAME_LOWER``, ``VALID``), ``strides``, ``dilations`` and ``group`` (one convolution per
group). Pooling (``MaxPool``, ``AveragePool``) is computed window offset by window offset
with strided slices of the padded input, so that strides, dilations, ``ceil_mode`` and
``count_include_pad`` all follow ONNX exactly; ``MaxPool``'s ``Indices`` output is
refused. ``BatchNormalization`` runs in inference mode only (``training_mode=1`` is
refused); its scale and bias train, its running mean and variance are constants (a
gradient step could make a variance negative).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import tensorflow as tf

from adapters.errors import UnsupportedModel
from adapters.onnx_tf import ML_DOMAIN, NodeContext, OpResult, Tensor, register_op

# ------------------------------------------------------------------------ geometry


def _spatial(ctx: NodeContext, x: Tensor) -> int:
    rank = x.shape.rank
    if rank is None or rank < 3:
        raise UnsupportedModel(f"{ctx.node.op_type} node {ctx.node.name!r}: input of rank "
                               f"{rank}, expected (N, C, spatial...)")
    return int(rank) - 2


def _list(ctx: NodeContext, name: str, n: int, default: int) -> list[int]:
    value = ctx.attr(name)
    return [default] * n if value is None or len(value) == 0 else [int(v) for v in value]


def _pads(ctx: NodeContext, sizes: list[Any], kernel: list[int], strides: list[int],
          dilations: list[int]) -> list[tuple[Any, Any]]:
    """(begin, end) padding per spatial axis, from ``pads`` or ``auto_pad``."""
    n = len(kernel)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = _list(ctx, "pads", 2 * n, 0)
        return [(pads[i], pads[i + n]) for i in range(n)]
    if auto == "VALID":
        return [(0, 0)] * n
    out: list[tuple[Any, Any]] = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        if isinstance(size, int):
            total: Any = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
        else:
            total = tf.maximum(((size + s - 1) // s - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
        out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
    return out


def _sizes(x: Tensor) -> list[Any]:
    """Spatial sizes: Python ints when known when the graph is built, else scalar tensors."""
    dynamic = tf.shape(x, out_type=tf.int64)
    return [int(d) if d is not None else dynamic[i + 2]
            for i, d in enumerate(x.shape.as_list()[2:])]


def _check_auto_pad(ctx: NodeContext) -> str | None:
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return f"auto_pad={auto!r}"
    return None


# ---------------------------------------------------------------------- convolution


@register_op("", "Conv", check=_check_auto_pad)
def _conv(ctx: NodeContext, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    n = _spatial(ctx, x)
    if n > 3:
        raise UnsupportedModel(f"Conv node {ctx.node.name!r}: {n}-D convolution")
    kernel = [int(k) for k in w.shape[2:]]
    strides = _list(ctx, "strides", n, 1)
    dilations = _list(ctx, "dilations", n, 1)
    group = int(ctx.attr("group", 1))
    sizes = _sizes(x)
    pads = _pads(ctx, sizes, kernel, strides, dilations)
    if all(isinstance(v, int) for v in sizes):
        y = _conv_by_patches(x, w, kernel, strides, dilations, group, sizes, pads)
    else:
        y = _conv_by_tf(x, w, strides, dilations, group, pads)
    if b is not None:
        y = y + tf.reshape(b, [1, -1] + [1] * n)
    return y


def _conv_by_patches(x: Tensor, w: Tensor, kernel: list[int], strides: list[int],
                     dilations: list[int], group: int, sizes: list[int],
                     pads: list[tuple[Any, Any]]) -> Tensor:
    """Convolution as one matrix product over the kernel's shifted windows (im2col).

    Sizes known when the graph is built (text models have a fixed length). Unlike
    ``tf.nn.convolution``, whose filter gradient ``tf.vectorized_map`` can only run as a
    loop, its per-example gradients vectorise: DP-SGD's per-stay gradients stay cheap.
    """
    patches, outs = _patches(x, int(x.shape[1]), kernel, strides, dilations, sizes, pads)
    windows = int(np.prod(kernel))
    channels, batch = int(x.shape[1]), tf.shape(x)[0]
    m = int(w.shape[0])
    per_group, out_group = channels // group, m // group
    ys = []
    for g in range(group):
        cols = patches[:, g * per_group * windows:(g + 1) * per_group * windows]
        wg = tf.reshape(w[g * out_group:(g + 1) * out_group], [out_group, -1])  # M/g, C/g*K
        ys.append(tf.linalg.matmul(wg, cols))  # N, M/g, positions
    y = tf.concat(ys, axis=1) if group > 1 else ys[0]
    return tf.reshape(y, tf.stack([batch, m, *outs]))


def _patches(x: Tensor, channels: int, kernel: list[int], strides: list[int],
             dilations: list[int], sizes: list[int],
             pads: list[tuple[Any, Any]]) -> tuple[Tensor, list[int]]:
    """(N, C*K, positions) columns of the kernel's windows (channel-major, then the
    kernel's cells in row-major order: the layout of ``w.reshape(M, C*K)``), and the
    output's spatial sizes."""
    padded = tf.pad(x, [[0, 0], [0, 0], *[[int(a), int(z)] for a, z in pads]])
    outs = [(size + int(a) + int(z) - ((k - 1) * d + 1)) // s + 1
            for size, k, s, d, (a, z) in zip(sizes, kernel, strides, dilations, pads,
                                              strict=True)]
    windows = _windows(padded, kernel, strides, dilations, outs)  # K x [N, C, out...]
    patches = tf.stack(windows, axis=2)  # N, C, K, out...
    batch = tf.shape(x)[0]
    shape = tf.stack([batch, channels * len(windows), int(np.prod(outs))])
    return tf.reshape(patches, shape), outs


def conv_patches(ctx: NodeContext, x: Tensor, kernel: list[int],
                 sizes: list[int]) -> Tensor:
    """The im2col columns of Conv node ``ctx`` on ``x`` (N, C, spatial... with the
    spatial ``sizes`` given), as the executor's own convolution computes them: (N, C*K,
    positions), so that the convolution is ``w.reshape(M, C*K) @ columns`` (group 1).
    For DP-SGD's ghost norms (a convolution is a dense layer over its windows)."""
    n = len(kernel)
    strides = _list(ctx, "strides", n, 1)
    dilations = _list(ctx, "dilations", n, 1)
    pads = _pads(ctx, list(sizes), kernel, strides, dilations)
    return _patches(x, int(x.shape[1]), kernel, strides, dilations, list(sizes), pads)[0]


def _conv_by_tf(x: Tensor, w: Tensor, strides: list[int], dilations: list[int], group: int,
                pads: list[tuple[Any, Any]]) -> Tensor:
    """``tf.nn.convolution`` (channels last) when a spatial size is only known at run time."""
    n = len(strides)
    last = [0, *range(2, n + 2), 1]  # NC... -> N...C
    xt = tf.pad(tf.transpose(x, last), [[0, 0], *[list(p) for p in pads], [0, 0]])
    wt = tf.transpose(w, [*range(2, n + 2), 1, 0])  # M, C/g, k... -> k..., C/g, M
    # TensorFlow refuses strides and dilations above 1 together: stride afterwards
    both = any(s > 1 for s in strides) and any(d > 1 for d in dilations)
    step = [1] * n if both else strides
    xs = tf.split(xt, group, axis=-1) if group > 1 else [xt]
    ws = tf.split(wt, group, axis=-1) if group > 1 else [wt]
    ys = [tf.nn.convolution(xi, wi, strides=step, padding="VALID", dilations=dilations)
          for xi, wi in zip(xs, ws, strict=True)]
    y = tf.concat(ys, axis=-1) if group > 1 else ys[0]
    if both:
        y = y[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]
    return tf.transpose(y, [0, n + 1, *range(1, n + 1)])


def _windows(padded: Tensor, kernel: list[int], strides: list[int], dilations: list[int],
             outs: list[int]) -> list[Tensor]:
    """One strided slice of ``padded`` (N, C, spatial...) per kernel offset, in the
    row-major order of the kernel's cells: each is (N, C, out...)."""
    windows = []
    for offsets in itertools.product(*[range(k) for k in kernel]):
        index = [slice(None), slice(None)]
        for o, d, s, out in zip(offsets, dilations, strides, outs, strict=True):
            index.append(slice(o * d, o * d + (out - 1) * s + 1, s))
        windows.append(padded[tuple(index)])
    return windows


# -------------------------------------------------------------------------- pooling


def _check_pool(ctx: NodeContext) -> str | None:
    if ctx.node.op_type == "MaxPool" and ctx.has_output(1):
        return "the Indices output is not supported"
    if int(ctx.attr("count_include_pad", 0)) and int(ctx.attr("ceil_mode", 0)):
        # the ONNX reference and onnxruntime disagree on the divisor of windows that
        # reach into the cells ceil_mode adds: refused rather than guessed
        return "count_include_pad=1 with ceil_mode=1 is not supported"
    return _check_auto_pad(ctx)


def _pool(ctx: NodeContext, x: Tensor, kind: str) -> Tensor:
    n = _spatial(ctx, x)
    sizes = x.shape.as_list()[2:]
    if any(s is None for s in sizes):
        raise UnsupportedModel(f"{ctx.node.op_type} node {ctx.node.name!r}: spatial sizes "
                               "must be fixed (export with a fixed sequence length)")
    kernel = [int(k) for k in ctx.attr("kernel_shape")]
    strides = _list(ctx, "strides", n, 1)
    dilations = _list(ctx, "dilations", n, 1)
    pads = _pads(ctx, sizes, kernel, strides, dilations)
    ceil = bool(ctx.attr("ceil_mode", 0))
    outs, extra = [], []
    for size, k, s, d, (pb, pe) in zip(sizes, kernel, strides, dilations, pads, strict=True):
        span = (k - 1) * d + 1
        room = size + pb + pe - span
        out = (-(-room // s) if ceil else room // s) + 1
        if ceil and (out - 1) * s >= size + pb:  # a window may not start in the end padding
            out -= 1
        outs.append(out)
        extra.append(max((out - 1) * s + span - (size + pb + pe), 0))
    widths = [[0, 0], [0, 0], *[[pb, pe + e] for (pb, pe), e in zip(pads, extra, strict=True)]]
    if kind == "max":
        low = x.dtype.min if not x.dtype.is_floating else -np.inf
        padded = tf.pad(x, widths, constant_values=tf.cast(low, x.dtype))
    else:
        padded = tf.pad(x, widths)
    windows = _windows(padded, kernel, strides, dilations, outs)
    if kind == "max":
        result = windows[0]
        for w in windows[1:]:
            result = tf.math.maximum(result, w)
        return result
    total = tf.add_n(windows)
    # divisor: the window's cells inside the input, plus the explicit padding when
    # count_include_pad (never the cells added for ceil_mode)
    include = bool(ctx.attr("count_include_pad", 0))
    ones = np.pad(np.ones(sizes, np.float64), [(pb, pe) for pb, pe in pads],
                  constant_values=1.0 if include else 0.0)
    ones = np.pad(ones, [(0, e) for e in extra])
    count = np.zeros(outs)
    for offsets in itertools.product(*[range(k) for k in kernel]):
        cells = tuple(slice(o * d, o * d + (out - 1) * s + 1, s)
                      for o, d, s, out in zip(offsets, dilations, strides, outs, strict=True))
        count = count + ones[cells]
    return total / tf.constant(np.maximum(count, 1.0), dtype=x.dtype)


@register_op("", "MaxPool", check=_check_pool)
def _max_pool(ctx: NodeContext, x: Tensor) -> Tensor:
    return _pool(ctx, x, "max")


@register_op("", "AveragePool", check=_check_pool)
def _average_pool(ctx: NodeContext, x: Tensor) -> Tensor:
    return _pool(ctx, x, "average")


@register_op("", "GlobalMaxPool")
def _global_max_pool(ctx: NodeContext, x: Tensor) -> Tensor:
    return tf.math.reduce_max(x, axis=list(range(2, x.shape.rank)), keepdims=True)


@register_op("", "GlobalAveragePool")
def _global_average_pool(ctx: NodeContext, x: Tensor) -> Tensor:
    return tf.math.reduce_mean(x, axis=list(range(2, x.shape.rank)), keepdims=True)


# -------------------------------------------------------------------------- padding


def _check_pad(ctx: NodeContext) -> str | None:
    mode = ctx.attr("mode", "constant")
    return None if mode in ("constant", "reflect", "edge") else f"mode={mode!r}"


@register_op("", "Pad", check=_check_pad)
def _pad(ctx: NodeContext, x: Tensor, pads: Tensor, value: Tensor | None = None,
         axes: Tensor | None = None) -> Tensor:
    rank = int(x.shape.rank)
    given = ctx.static(1, pads)
    assert given is not None  # noqa: S101  (a required input)
    flat = [int(p) for p in np.ravel(given)]
    chosen = ctx.static(3, axes)
    wanted = (list(range(rank)) if chosen is None
              else [int(a) + rank if int(a) < 0 else int(a) for a in np.ravel(chosen)])
    begin, end = [0] * rank, [0] * rank
    k = len(wanted)
    for i, axis in enumerate(wanted):
        begin[axis], end[axis] = flat[i], flat[i + k]
    if any(p < 0 for p in begin + end):  # negative pads crop
        index = tuple(slice(-b if b < 0 else None, e if e < 0 else None)
                      for b, e in zip(begin, end, strict=True))
        x = x[index]
        begin, end = [max(b, 0) for b in begin], [max(e, 0) for e in end]
    widths = [[b, e] for b, e in zip(begin, end, strict=True)]
    mode = ctx.attr("mode", "constant")
    if mode == "constant":
        fill = tf.zeros([], x.dtype) if value is None else tf.reshape(value, [])
        return tf.pad(x, widths, constant_values=fill)
    if mode == "reflect":
        return tf.pad(x, widths, mode="REFLECT")
    for axis, (b, e) in enumerate(zip(begin, end, strict=True)):  # edge: repeat the border
        size = tf.shape(x)[axis]
        parts = [tf.repeat(tf.gather(x, [0], axis=axis), b, axis=axis), x,
                 tf.repeat(tf.gather(x, [size - 1], axis=axis), e, axis=axis)]
        x = tf.concat(parts, axis=axis) if b or e else x
    return x


# -------------------------------------------------------------------- normalisation


def _check_batch_norm(ctx: NodeContext) -> str | None:
    if int(ctx.attr("training_mode", 0)):
        return "training_mode=1 (export the model in inference mode)"
    if any(ctx.has_output(i) for i in (1, 2)):
        return "the running mean and variance outputs (training mode) are not supported"
    return None


@register_op("", "BatchNormalization", check=_check_batch_norm, statistics=(3, 4))
def _batch_normalization(ctx: NodeContext, x: Tensor, scale: Tensor, bias: Tensor,
                         mean: Tensor, var: Tensor) -> Tensor:
    shape = [1, -1] + [1] * (int(x.shape.rank) - 2)
    eps = tf.cast(float(ctx.attr("epsilon", 1e-5)), x.dtype)

    def cast(t: Tensor) -> Tensor:
        return tf.reshape(tf.cast(t, x.dtype), shape)

    inv = tf.math.rsqrt(cast(var) + eps) * cast(scale)
    return (x - cast(mean)) * inv + cast(bias)


@register_op("", "LayerNormalization")
def _layer_normalization(ctx: NodeContext, x: Tensor, scale: Tensor,
                         bias: Tensor | None = None) -> OpResult:
    rank = int(x.shape.rank)
    axis = int(ctx.attr("axis", -1))
    axes = list(range(axis + rank if axis < 0 else axis, rank))
    stash = tf.float32 if int(ctx.attr("stash_type", 1)) == 1 else x.dtype
    if x.dtype == tf.float64:
        stash = tf.float64
    xs = tf.cast(x, stash)
    mean = tf.math.reduce_mean(xs, axis=axes, keepdims=True)
    centred = xs - mean
    var = tf.math.reduce_mean(tf.math.square(centred), axis=axes, keepdims=True)
    inv = tf.math.rsqrt(var + tf.cast(float(ctx.attr("epsilon", 1e-5)), stash))
    y = tf.cast(centred * inv, x.dtype) * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv


def _check_normalizer(ctx: NodeContext) -> str | None:
    norm = ctx.attr("norm", "MAX")
    return None if norm in ("MAX", "L1", "L2") else f"norm={norm!r}"


@register_op(ML_DOMAIN, "Normalizer", check=_check_normalizer)
def _normalizer(ctx: NodeContext, x: Tensor) -> Tensor:
    """Row-wise ``x / norm(x)`` (MAX: the row's largest value, L1, L2), float output;
    a row whose norm is zero is left as it is, as onnxruntime does."""
    x = tf.cast(x, tf.float32) if x.dtype != tf.float64 else x
    norm = ctx.attr("norm", "MAX")
    if norm == "MAX":
        scale = tf.math.reduce_max(x, axis=-1, keepdims=True)
    elif norm == "L1":
        scale = tf.math.reduce_sum(tf.math.abs(x), axis=-1, keepdims=True)
    else:
        scale = tf.math.sqrt(tf.math.reduce_sum(tf.math.square(x), axis=-1, keepdims=True))
    safe = tf.where(tf.equal(scale, 0), tf.ones_like(scale), scale)
    out = x / safe
    return out[tf.newaxis] if x.shape.rank == 1 else out


@register_op(ML_DOMAIN, "Scaler")
def _scaler(ctx: NodeContext, x: Tensor) -> Tensor:
    """``(x - offset) * scale`` per feature (one value: every feature), float output. The
    offsets and scales are the preprocessing's constants (StandardScaler's mean and
    1/std), not weights: fine-tuning leaves them as they are."""
    x = tf.cast(x, tf.float32) if x.dtype != tf.float64 else x
    offset = ctx.attr("offset")
    scale = ctx.attr("scale")
    if offset is not None and len(offset):
        x = x - tf.constant(np.asarray(offset), x.dtype)
    if scale is not None and len(scale):
        x = x * tf.constant(np.asarray(scale), x.dtype)
    return x[tf.newaxis] if x.shape.rank == 1 else x
