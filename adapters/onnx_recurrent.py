"""The ONNX recurrent operators (GRU, LSTM) of the executor's operator table.

Registered into :mod:`adapters.onnx_tf`'s table when that module is imported. ONNX
semantics (opset 14/22): ``direction`` forward, reverse or bidirectional; gate order
``z, r, h`` (GRU) and ``i, o, f, c`` (LSTM) in ``W``, ``R`` and ``B``; GRU's
``linear_before_reset``; LSTM's peepholes ``P`` (``i, o, f``); ``clip`` on every gate's
pre-activation; ``sequence_lens`` (the state stops at each sequence's length, the outputs
past it are zero, the reverse direction starts at the sequence's last element);
``initial_h``/``initial_c``; ``layout`` 0 (time major) or 1 (batch major). Outputs ``Y``,
``Y_h`` and (LSTM) ``Y_c``.

A sequence whose length is known when the graph is built is unrolled step by step (plain
TensorFlow operations: gradients, ``tf.function`` and ``tf.vectorized_map`` all work);
otherwise the steps run in ``tf.scan``.

Refused when the executor is built: ``activation_alpha``/``activation_beta``,
activations other than Sigmoid, Tanh, Relu and Softsign, LSTM's ``input_forget=1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from adapters.onnx_tf import NodeContext, OpResult, Tensor, register_op

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": tf.math.sigmoid, "tanh": tf.math.tanh, "relu": tf.nn.relu,
    "softsign": tf.math.softsign,
}
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}
_GATES = {"GRU": 3, "LSTM": 4}
_DEFAULTS = {"GRU": ("Sigmoid", "Tanh"), "LSTM": ("Sigmoid", "Tanh", "Tanh")}

Cell = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t, h, c) -> (h, c)


def _check_recurrent(ctx: NodeContext) -> str | None:
    op = ctx.node.op_type
    reasons = []
    direction = ctx.attr("direction", "forward")
    if direction not in _DIRECTIONS:
        reasons.append(f"direction={direction!r}")
    for name in ("activation_alpha", "activation_beta"):
        if ctx.attr(name) is not None:
            reasons.append(f"{name} is not supported")
    for act in ctx.attr("activations") or []:
        name = act.decode() if isinstance(act, bytes) else str(act)
        if name.lower() not in _ACTIVATIONS:
            reasons.append(f"activation {name!r} is not supported "
                           f"(only {', '.join(sorted(_ACTIVATIONS))})")
    if op == "LSTM" and int(ctx.attr("input_forget", 0)):
        reasons.append("input_forget=1 is not supported")
    return "; ".join(reasons) or None


def _activations(ctx: NodeContext, directions: int) -> list[list[Callable[[Tensor], Tensor]]]:
    op = ctx.node.op_type
    per = len(_DEFAULTS[op])
    names = [a.decode() if isinstance(a, bytes) else str(a)
             for a in ctx.attr("activations") or []]
    if not names:
        names = list(_DEFAULTS[op]) * directions
    elif len(names) == per and directions == 2:
        names = names * 2
    fns = [_ACTIVATIONS[n.lower()] for n in names]
    return [fns[d * per:(d + 1) * per] for d in range(directions)]


def _clipper(ctx: NodeContext) -> Callable[[Tensor], Tensor]:
    clip = ctx.attr("clip")
    if clip is None:
        return lambda t: t
    bound = float(clip)
    return lambda t: tf.clip_by_value(t, -bound, bound)


def _gru_cell(ctx: NodeContext, r: Tensor, rb: Tensor,
              acts: Sequence[Callable[[Tensor], Tensor]]) -> Cell:
    f, g = acts
    clip = _clipper(ctx)
    hidden = int(r.shape[-1])
    before = bool(ctx.attr("linear_before_reset", 0))
    r_zr, r_h = r[:2 * hidden], r[2 * hidden:]
    rb_zr, rb_h = rb[:2 * hidden], rb[2 * hidden:]

    def cell(xw: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        zr = xw[:, :2 * hidden] + tf.linalg.matmul(h, r_zr, transpose_b=True) + rb_zr
        z = f(clip(zr[:, :hidden]))
        reset = f(clip(zr[:, hidden:]))
        if before:
            inner = reset * (tf.linalg.matmul(h, r_h, transpose_b=True) + rb_h)
        else:
            inner = tf.linalg.matmul(reset * h, r_h, transpose_b=True) + rb_h
        candidate = g(clip(xw[:, 2 * hidden:] + inner))
        return (1 - z) * candidate + z * h, c

    return cell


def _lstm_cell(ctx: NodeContext, r: Tensor, rb: Tensor, p: Tensor | None,
               acts: Sequence[Callable[[Tensor], Tensor]]) -> Cell:
    f, g, act_h = acts
    clip = _clipper(ctx)
    hidden = int(r.shape[-1])

    def cell(xw: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        gates = xw + tf.linalg.matmul(h, r, transpose_b=True) + rb
        i, o, fg, cc = (gates[:, k * hidden:(k + 1) * hidden] for k in range(4))
        if p is not None:
            i, fg = i + p[:hidden] * c, fg + p[2 * hidden:] * c
        i, fg = f(clip(i)), f(clip(fg))
        c_new = fg * c + i * g(clip(cc))
        if p is not None:
            o = o + p[hidden:2 * hidden] * c_new
        return f(clip(o)) * act_h(c_new), c_new

    return cell


def _run_direction(cell: Cell, xw: Tensor, h: Tensor, c: Tensor,
                   mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``cell`` over the time-major ``xw``; returns (Y, last h, last c)."""

    def step(h: Tensor, c: Tensor, x_t: Tensor, m: Tensor | None) -> tuple[Tensor, ...]:
        h_new, c_new = cell(x_t, h, c)
        if m is None:
            return h_new, c_new, h_new
        return (tf.where(m, h_new, h), tf.where(m, c_new, c),
                tf.where(m, h_new, tf.zeros_like(h_new)))

    steps = xw.shape[0]
    if steps is not None:
        ys = []
        for t in range(int(steps)):
            h, c, y = step(h, c, xw[t], None if mask is None else mask[t])
            ys.append(y)
        y_all = tf.stack(ys) if ys else tf.zeros([0, *h.shape], h.dtype)
        return y_all, h, c

    def scan_step(carry: tuple[Tensor, Tensor, Tensor], elems: Any) -> tuple[Tensor, ...]:
        x_t, m = elems if mask is not None else (elems, None)
        return step(carry[0], carry[1], x_t, m)

    elems = (xw, mask) if mask is not None else xw
    hs, cs, ys_all = tf.scan(scan_step, elems, initializer=(h, c, tf.zeros_like(h)))
    size = tf.shape(hs)[0]
    last_h = tf.cond(size > 0, lambda: hs[size - 1], lambda: h)
    last_c = tf.cond(size > 0, lambda: cs[size - 1], lambda: c)
    return ys_all, last_h, last_c


def _recurrent(ctx: NodeContext, x: Tensor, w: Tensor, r: Tensor, b: Tensor | None,
               lengths: Tensor | None, h0: Tensor | None, c0: Tensor | None = None,
               p: Tensor | None = None) -> OpResult:
    op = ctx.node.op_type
    gates = _GATES[op]
    batch_major = bool(ctx.attr("layout", 0))
    if batch_major:
        x = tf.transpose(x, [1, 0, 2])
        h0 = None if h0 is None else tf.transpose(h0, [1, 0, 2])
        c0 = None if c0 is None else tf.transpose(c0, [1, 0, 2])
    direction = ctx.attr("direction", "forward")
    directions = _DIRECTIONS[direction]
    hidden = int(ctx.attr("hidden_size", int(r.shape[-1])))
    batch = tf.shape(x)[1]
    mask = None
    if lengths is not None:
        lengths = tf.cast(lengths, tf.int32)
        mask = (tf.range(tf.shape(x)[0])[:, tf.newaxis] < lengths[tf.newaxis, :])[..., None]
    acts = _activations(ctx, directions)
    ys, hs, cs = [], [], []
    for d in range(directions):
        backwards = direction == "reverse" or d == 1
        bias = (tf.zeros([2 * gates * hidden], x.dtype) if b is None else b[d])
        wb, rb = bias[:gates * hidden], bias[gates * hidden:]
        h = tf.zeros(tf.stack([batch, hidden]), x.dtype) if h0 is None else h0[d]
        c = tf.zeros(tf.stack([batch, hidden]), x.dtype) if c0 is None else c0[d]
        xs = x
        if backwards:
            xs = (tf.reverse(x, [0]) if lengths is None
                  else tf.reverse_sequence(x, lengths, seq_axis=0, batch_axis=1))
        xw = tf.linalg.matmul(xs, w[d], transpose_b=True) + wb
        cell = (_gru_cell(ctx, r[d], rb, acts[d]) if op == "GRU"
                else _lstm_cell(ctx, r[d], rb, None if p is None else p[d], acts[d]))
        y, h, c = _run_direction(cell, xw, h, c, mask)
        if backwards:
            y = (tf.reverse(y, [0]) if lengths is None
                 else tf.reverse_sequence(y, lengths, seq_axis=0, batch_axis=1))
        ys.append(y)
        hs.append(h)
        cs.append(c)
    y_all, h_all, c_all = tf.stack(ys, axis=1), tf.stack(hs), tf.stack(cs)
    if batch_major:
        y_all = tf.transpose(y_all, [2, 0, 1, 3])
        h_all, c_all = tf.transpose(h_all, [1, 0, 2]), tf.transpose(c_all, [1, 0, 2])
    return (y_all, h_all) if op == "GRU" else (y_all, h_all, c_all)


@register_op("", "GRU", check=_check_recurrent)
def _gru(ctx: NodeContext, x: Tensor, w: Tensor, r: Tensor, b: Tensor | None = None,
         lengths: Tensor | None = None, h0: Tensor | None = None) -> OpResult:
    return _recurrent(ctx, x, w, r, b, lengths, h0)


@register_op("", "LSTM", check=_check_recurrent)
def _lstm(ctx: NodeContext, x: Tensor, w: Tensor, r: Tensor, b: Tensor | None = None,
          lengths: Tensor | None = None, h0: Tensor | None = None, c0: Tensor | None = None,
          p: Tensor | None = None) -> OpResult:
    return _recurrent(ctx, x, w, r, b, lengths, h0, c0, p)
