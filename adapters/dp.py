"""Differential privacy for fine-tuning: accounting (dp-accounting) and DP-SGD.

Accounting
    One DP-SGD run is ``steps`` compositions of a Poisson-subsampled Gaussian mechanism
    (sampling rate ``q``, noise multiplier ``z``): the dp-accounting event
    ``SelfComposed(PoissonSampled(q, Gaussian(z)), steps)``. :func:`epsilon` gives its
    epsilon at ``delta`` by the RDP accountant (dp-accounting's default orders) or the
    PLD accountant (``value_discretization_interval`` 1e-4, pessimistic estimate). With
    dp-accounting 0.4.3 the tensorflow-privacy MNIST tutorial setting (q = 256/60000,
    z = 1.1, steps = int(60 * 60000 / 256) = 14062, delta 1e-5) gives 2.597 (RDP) and
    2.382 (PLD).

    :func:`calibrate_noise` finds the smallest noise multiplier whose epsilon, by the
    *claimed* accountant (PLD by default), is at most the target, with
    ``dp_accounting.calibrate_dp_mechanism``, then verifies it and raises the noise
    until the verification holds: the claimed epsilon never exceeds the target.

DP-SGD (:func:`train_dp_sgd`)
    1. Poisson sampling of privacy units: at every step each unit (a patient, or a stay)
       is taken independently with probability ``q``, from uniforms of ``rng``
       (:class:`adapters.randomness.SecureRandom`, the OS's CSPRNG, in production).
    2. Per-unit gradient norms over *all* trainable weights together, a unit's gradient
       being the sum of its stays' gradients (its stays summed, then clipped once).
       Gradients are taken with respect to the *variables* and the weights' reads, so a
       weight read by several nodes (tied) is one weight whose uses are summed before
       its norm is taken. Two paths (:class:`ClipPath`):
       ghost-norm: one forward and one backward pass of the batch to every trained
       layer's output; norms from layer inputs and output gradients, per layer:
       MatMul/Gemm weights on one position per stay in Gram form; on several (3-D
       activations: attention projections, feed-forward) the pairs of a unit's stays
       in Gram form or the per-stay gradients ``L^T R`` of that layer alone, whichever
       costs less (``P (d_in + d_out)`` against ``d_in d_out``); Conv kernels (group
       1) as dense layers over their im2col windows (per-stay gradients); biases and
       elementwise weights of Add/Sub/Mul (LayerNormalization and BatchNormalization
       scale and shift, written as ops or as the ONNX operators, positional weights,
       Conv biases) as per-stay sums over the positions they broadcast on; embedding
       rows by segment sums (only the rows a unit's tokens touch); a weight read
       through views of itself alone (Reshape, Transpose, Squeeze...) by its view, put
       back in its own order. No per-stay gradient of the whole model is materialised.
       Recurrent layers (GRU, LSTM), Div, and a weight read both directly and through a
       view, or by two kinds of layer, take the other path:
       per-example (any graph the executor runs): per-stay gradients with
       ``tf.vectorized_map``, summed per unit (``unsorted_segment_sum``).
       The ghost-norm path runs when every trained weight is read by a layer it knows,
       when a probe (the graph run on 2 and on 3 copies of one stay) shows every tensor
       those layers read keeping a batch's stays apart along its leading axis, and only
       after its norms and clipped sum matched the per-example path's on the first
       step with two units (else the run falls back; :attr:`DpSgd.path` says which ran).
       Tensorflow-privacy's own fast clipping is not used: it knows only Keras layers,
       under-clips tied weights and divides by the realised batch size (DESIGN.md).
    3. Each unit is clipped to L2 norm ``clip`` (factor ``min(1, clip / norm)``, the rule
       of tensorflow-privacy's ``GaussianSumQuery.preprocess_record``), in float64 with a
       rounding margin (README, "Floating point"), and the clipped contributions summed:
       on the ghost-norm path as the layers' gradient forms with each stay weighted by its
       unit's factor.
    4. Gaussian noise of stddev ``clip * z`` per coordinate, drawn in float64 from ``rng``
       and added to the float64 sum.
    5. The noisy sum is divided by the *expected* batch size ``q * units`` (not the
       realised one), cast to the weights' dtype and applied by an optimizer
       (post-processing). A step with no sampled unit still adds the noise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import dp_accounting
import numpy as np
import numpy.typing as npt

from adapters.randomness import RandomSource, SecureRandom
from passerelle.errors import BadInput, Refused

PLD_DISCRETIZATION = 1e-4
Progress = Callable[[str, int, int], None]


class Accountant(StrEnum):
    RDP = "rdp"
    PLD = "pld"


@dataclass(frozen=True)
class DpSetting:
    """One DP-SGD run as the accountant sees it."""

    sampling_rate: float
    noise_multiplier: float
    steps: int
    delta: float

    def __post_init__(self) -> None:
        if not 0 < self.sampling_rate <= 1:
            raise BadInput(f"sampling rate must be in (0, 1], not {self.sampling_rate}")
        if not self.noise_multiplier > 0:
            raise BadInput("noise multiplier must be positive")
        if self.steps < 1:
            raise BadInput("steps must be at least 1")
        check_delta(self.delta)

    def event(self) -> dp_accounting.DpEvent:
        return dp_sgd_event(self.sampling_rate, self.noise_multiplier, self.steps)


def check_epsilon(epsilon: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise BadInput(f"epsilon must be a positive number, not {epsilon}")


def check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise BadInput(f"delta must be in (0, 1), not {delta}")


def default_delta(units: int) -> float:
    """Well under 1 / number of privacy units: min(1e-5, 1 / (10 * units))."""
    return min(1e-5, 1.0 / (10 * max(units, 1)))


def dp_sgd_event(q: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    sampled = gaussian if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    return dp_accounting.SelfComposedDpEvent(sampled, steps)


def make_accountant(kind: Accountant) -> dp_accounting.PrivacyAccountant:
    if kind is Accountant.RDP:
        return dp_accounting.rdp.RdpAccountant()
    return dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def epsilon_of(events: Sequence[dp_accounting.DpEvent], delta: float,
               kind: Accountant) -> float:
    """Epsilon at ``delta`` of the composition of ``events``."""
    accountant = make_accountant(kind)
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def epsilon(setting: DpSetting, kind: Accountant) -> float:
    return epsilon_of([setting.event()], setting.delta, kind)


def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                    kind: Accountant = Accountant.PLD) -> float:
    """The smallest noise multiplier (to calibration tolerance) whose epsilon by ``kind``
    is at most ``target_epsilon``; verified after calibration, never above the target."""
    check_epsilon(target_epsilon)
    check_delta(delta)
    DpSetting(sampling_rate, 1.0, steps, delta)  # validates q and steps

    def event(z: float) -> dp_accounting.DpEvent:
        return dp_sgd_event(sampling_rate, z, steps)

    # RDP first (fast at any noise), then PLD inside [0.7 z_rdp, z_rdp]: PLD
    # evaluations at small noise multipliers (huge epsilons) are slow.
    z = _bisect(Accountant.RDP, event, target_epsilon, delta,
                dp_accounting.LowerEndpointAndGuess(1e-2, 1.0))
    if kind is Accountant.PLD:
        # BadInput: the PLD epsilon at 0.7 z_rdp is already under the target: keep z_rdp
        with contextlib.suppress(BadInput):
            z = _bisect(kind, event, target_epsilon, delta,
                        dp_accounting.ExplicitBracketInterval(0.7 * z, z), tol=0.005 * z)
    # verification: the bisection brackets from above, but never trust it
    for _ in range(100):
        if epsilon_of([event(z)], delta, kind) <= target_epsilon:
            return z
        z *= 1.001
    raise AssertionError("noise calibration did not converge below the target")


def _bisect(kind: Accountant, event: Callable[[float], dp_accounting.DpEvent],
            target_epsilon: float, delta: float, bracket: Any, tol: float = 1e-3) -> float:
    try:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(kind), event, target_epsilon, delta, bracket, tol=tol))
    except (ValueError, RuntimeError) as e:
        raise BadInput(f"cannot reach epsilon {target_epsilon} at delta {delta}: {e}") from e


# ------------------------------------------------------------------------- DP-SGD


@dataclass(frozen=True)
class DpSgdPlan:
    """How a DP-SGD run samples, clips and noises (everything the accountant needs)."""

    units: int  # number of privacy units in the training data
    expected_batch_size: float  # q * units
    sampling_rate: float
    steps: int
    noise_multiplier: float
    clip: float

    @classmethod
    def make(cls, units: int, expected_batch_size: int, epochs: int, clip: float,
             noise_multiplier: float) -> DpSgdPlan:
        if units < 2:
            raise BadInput("DP-SGD needs at least two privacy units")
        q = min(1.0, expected_batch_size / units)
        steps = max(1, math.ceil(epochs / q))
        return cls(units, q * units, q, steps, noise_multiplier, clip)


def per_unit_groups(unit_of_stay: Sequence[int], units: int) -> list[npt.NDArray[np.int64]]:
    """Stay indices of every unit, unit by unit."""
    groups: list[list[int]] = [[] for _ in range(units)]
    for i, u in enumerate(unit_of_stay):
        groups[u].append(i)
    return [np.asarray(g, dtype=np.int64) for g in groups]


def poisson_sample(rng: RandomSource, units: int, q: float) -> npt.NDArray[np.int64]:
    """Every unit independently with probability ``q``: the indices of the chosen ones
    (one uniform per unit; :class:`SecureRandom` in production)."""
    return np.flatnonzero(rng.random(units) < q).astype(np.int64)


class GradientNotFinite(Refused):
    """A unit's gradient is NaN or infinite: the step is stopped before it is applied."""


class ClipPath(StrEnum):
    """How per-unit gradient norms are computed (the clipped sum is the same)."""

    GHOST = "ghost-norm"  # from layer activations and output gradients, one backward pass
    PER_EXAMPLE = "per-example"  # per-stay gradients materialised (tf.vectorized_map)


# Floating point (README, "Floating point"): norms, clipping and sums in float64; every
# unit clipped to CLIP * (1 - CLIP_MARGIN) against a norm over-estimated by a rounding
# bound; a unit's factor is also at most CANCELLATION_BOUND * clip / S_u (S_u: the sum
# of its per-position gradient norms), so that no clipped term exceeds that bound and the
# float64 rounding of the sum (at most terms * 2**-53 * sum of |terms| per coordinate)
# stays inside the margin while terms * (units + 1) <= MAX_STEP_TERMS.
CLIP_MARGIN = 1e-5
CANCELLATION_BOUND = 1e3
_ULP = 2.0 ** -53
MAX_STEP_TERMS = int(CLIP_MARGIN / (2 * _ULP * CANCELLATION_BOUND))


@dataclass(frozen=True)
class _Use:
    """One read of a trainable weight (or of a view of it) by a node the ghost-norm path
    knows."""

    kind: Literal["dense", "bias", "rows", "conv", "scale"]
    output: str  # the node's output (its gradient is taken)
    operand: str  # dense/conv: the activation; rows: the indices; bias: Add's other
    #               input; scale: the other factor ("" for a sum: Add, Sub, a bias)
    transpose: bool  # dense: the weight's layout is (out, in) (Gemm transB)
    scale: float  # Gemm alpha (dense) or beta (bias); scale: -1 for Sub's subtrahend
    via: str = ""  # the view of the weight this node reads ("" for the weight itself)
    form: Literal["", "mul", "batchnorm", "layernorm"] = ""  # scale: the other factor
    node: Any = field(default=None, compare=False)  # conv, scale: the NodeProto
    extra: tuple[str, ...] = ()  # tensors the form also needs (batchnorm: mean, var)


# nodes that only rearrange a weight (their output is a permutation of its entries)
_VIEW_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                       "Identity"})
_SHAPE_OPS = frozenset({"Shape", "Size"})  # read a weight's shape, never its values


def _use_of(node: Any, weight: str, shape: tuple[int, ...] | None,
            via: str = "") -> _Use | None:
    """The ghost-norm form of ``node`` reading ``weight`` (``shape`` None: a view whose
    shape is only known when the graph runs), or None (unknown layer)."""
    from onnx import helper

    ins = list(node.input)
    if node.domain not in ("", "ai.onnx") or ins.count(weight) != 1 or not node.output:
        return None
    pos, out, op = ins.index(weight), node.output[0], node.op_type
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank2 = shape is None or len(shape) == 2
    bias_shape = shape is not None and len(shape) >= 1 and all(d == 1 for d in shape[:-1])
    if op == "MatMul" and pos == 1 and rank2:
        return _Use("dense", out, ins[0], False, 1.0, via)
    if op == "Gemm" and not attrs.get("transA", 0):
        if pos == 1 and rank2:
            return _Use("dense", out, ins[0], bool(attrs.get("transB", 0)),
                        float(attrs.get("alpha", 1.0)), via)
        if pos == 2 and bias_shape and not via:
            return _Use("bias", out, "", False, float(attrs.get("beta", 1.0)))
        if pos == 2:
            return _Use("scale", out, "", False, float(attrs.get("beta", 1.0)), via)
    if op == "Add" and bias_shape and not via:
        return _Use("bias", out, ins[1 - pos], False, 1.0)
    if op in ("Add", "Sub") and len(ins) == 2:
        return _Use("scale", out, "", False, -1.0 if op == "Sub" and pos == 1 else 1.0, via)
    if op == "Mul" and len(ins) == 2:
        return _Use("scale", out, ins[1 - pos], False, 1.0, via, "mul")
    if op == "Gather" and pos == 0 and (shape is not None and len(shape) == 2) \
            and int(attrs.get("axis", 0)) == 0 and not via:
        return _Use("rows", out, ins[1], False, 1.0)
    if op == "Conv" and int(attrs.get("group", 1)) == 1 \
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"", ""):
        if pos == 1:
            return _Use("conv", out, ins[0], True, 1.0, via, node=node)
        if pos == 2:
            return _Use("scale", out, "", False, 1.0, via, node=node)
    if op == "BatchNormalization" and pos in (1, 2) and len(ins) == 5:
        return _Use("scale", out, ins[0] if pos == 1 else "", False, 1.0, via,
                    "batchnorm" if pos == 1 else "", node, (ins[3], ins[4]))
    if op == "LayerNormalization" and pos in (1, 2):
        return _Use("scale", out, ins[0] if pos == 1 else "", False, 1.0, via,
                    "layernorm" if pos == 1 else "", node)
    return None


def _readers(executor: Any) -> dict[str, list[str]]:
    """Tensor name -> names of the nodes that read it."""
    out: dict[str, list[str]] = {}
    for name, node in executor.nodes.items():
        for inp in dict.fromkeys(node.input):
            out.setdefault(inp, []).append(name)
    return out


def _weight_uses(nodes: Any, readers: dict[str, list[str]], name: str,
                 shape: tuple[int, ...]) -> tuple[list[_Use | None], list[str]]:
    """The uses of weight ``name`` through views (Reshape, Transpose... of the weight
    alone, followed to the nodes that compute with it); the nodes that read it."""
    tensor, via, readers_of = name, "", [c for c in readers.get(name, [])
                                         if nodes[c].op_type not in _SHAPE_OPS]
    for _ in range(8):  # a chain of views of the weight alone
        if len(readers_of) != 1:
            break
        node = nodes[readers_of[0]]
        if node.op_type not in _VIEW_OPS or node.domain not in ("", "ai.onnx") \
                or list(node.input).count(tensor) != 1 or node.input[0] != tensor \
                or len(node.output) != 1:
            break
        tensor = via = node.output[0]
        readers_of = [c for c in readers.get(tensor, []) if nodes[c].op_type not in _SHAPE_OPS]
    return [_use_of(nodes[c], tensor, None if via else shape, via) for c in readers_of], \
        readers_of


def ghost_plan(executor: Any) -> tuple[list[tuple[_Use, ...]] | None, str]:
    """For every trainable weight (in ``trainable_variables`` order) the reads the
    ghost-norm path knows: MatMul/Gemm weights (dense, any number of positions per
    stay), Conv kernels (dense over the kernel's windows), biases and elementwise
    weights of Add/Sub/Mul (normalisation scales and shifts, positional weights, Conv
    biases, BatchNormalization and LayerNormalization scale and bias), Gather rows
    (embeddings), each possibly read through views of the weight alone (Reshape,
    Transpose...). A weight read several times (tied) is one weight, all its reads of
    one kind on one tensor. ``(None, reason)`` when some weight is read any other way."""
    nodes = executor.nodes
    readers = _readers(executor)
    plan: list[tuple[_Use, ...]] = []
    for p in executor.parameters:
        if not p.trainable:
            continue
        uses, names = _weight_uses(nodes, readers, p.name, p.shape)
        known = [u for u in uses if u is not None]
        if not uses:
            return None, f"{p.name} is read by no node the ghost-norm path knows"
        if len(known) != len(uses):
            bad = sorted({nodes[c].op_type for c, u in zip(names, uses, strict=True)
                          if u is None})
            return None, f"{p.name} is read by {', '.join(bad)}"
        if len({u.kind for u in known}) != 1:
            return None, f"{p.name} is read as {sorted({u.kind for u in known})}"
        plan.append(tuple(known))
    return plan, ""


class DpSgd:
    """One clipped, noised step at a time over an executor's trainable variables.

    ``rng`` draws the Gaussian noise (float64, :class:`SecureRandom` unless a test passes
    a seeded generator). ``path`` forces a clipping path; by default the ghost-norm path
    runs when :func:`ghost_plan` knows every trainable weight's layer, after checking on
    the first step with two units that its norms and clipped sum equal the per-example
    path's (else it falls back for the rest of the run: :attr:`path`,
    :attr:`fallback_reason`)."""

    def __init__(self, executor: Any, input_name: str, output_name: str, clip: float,
                 noise_multiplier: float, optimizer: Any, rng: RandomSource | None = None,
                 path: ClipPath | None = None) -> None:
        import tensorflow as tf

        self._tf = tf
        self.variables = list(executor.trainable_variables)
        if not self.variables:
            raise BadInput("no weight trains: choose --trainable layers")
        if not (math.isfinite(clip) and clip > 0 and math.isfinite(noise_multiplier)
                and noise_multiplier > 0):
            raise BadInput("clip and noise multiplier must be positive finite numbers")
        self.clip = clip
        self.stddev = clip * noise_multiplier
        self.rng: RandomSource = rng if rng is not None else SecureRandom()
        self._optimizer = optimizer
        self._sizes = [int(np.prod(v.shape)) for v in self.variables]
        plan, reason = ghost_plan(executor)
        if path is ClipPath.GHOST and plan is None:
            raise BadInput(f"the ghost-norm path does not know this graph: {reason}")
        self.path = path or (ClipPath.GHOST if plan is not None else ClipPath.PER_EXAMPLE)
        self.fallback_reason = reason if plan is None else ""
        self._checked = path is not None
        variables = self.variables

        def loss_of(x: Any, y: Any) -> Any:
            logits = executor({input_name: x})[output_name]
            return tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)

        def per_stay(x: Any, y: Any) -> list[Any]:
            def one(args: Any) -> list[Any]:
                xi, yi = args
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(loss_of(xi[tf.newaxis], yi[tf.newaxis]))
                grads = tape.gradient(loss, variables)
                return [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v)
                        for g, v in zip(grads, variables, strict=True)]

            out: list[Any] = tf.vectorized_map(one, (x, y))
            return out

        def per_example_sum(x: Any, y: Any, seg: Any, n: Any) -> tuple[list[Any], Any, Any]:
            grads = [tf.cast(g, tf.float64) for g in per_stay(x, y)]
            rows = tf.shape(x)[0]
            per_unit = [tf.math.unsorted_segment_sum(g, seg, n) for g in grads]
            sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [n, -1]), 1)
                           for g in per_unit])
            stay_norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [rows, -1]),
                                                        1) for g in grads]))
            s = tf.math.unsorted_segment_sum(stay_norm, seg, n)
            terms = tf.cast(rows, tf.float64)
            factor, norms = _factors(tf, sq, tf.zeros_like(sq), (terms + 16) * _ULP * s, s,
                                     clip)
            return [tf.tensordot(factor, g, axes=1) for g in per_unit], norms, terms

        readers: dict[str, int] = {}  # how many nodes (or graph outputs) read a tensor
        for node in executor.nodes.values():
            for name in set(node.input):
                readers[name] = readers.get(name, 0) + 1
        for name in executor.output_names:
            readers[name] = readers.get(name, 0) + 1
        self._pairs = _pair_biases(plan, readers) if plan is not None else {}
        self._plan, self._executor, self._input_name = plan, executor, input_name
        self._forced = path is ClipPath.GHOST
        self._layout: _Layout | None = None  # measured on the first batch (_prepare)
        self._layers: dict[int, int] = {}

        def ghost_sum(x: Any, y: Any, seg: Any, n: Any) -> tuple[list[Any], Any, Any]:
            # only traced once the plan exists and the probe has measured it
            assert plan is not None and self._layout is not None  # noqa: S101
            return _ghost_clipped_sum(tf, executor, input_name, output_name, variables,
                                      plan, self._layers, self._layout, clip, x, y, seg, n)

        def plain(x: Any, y: Any) -> list[Any]:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_of(x, y))
            return list(tape.gradient(loss, variables))

        def noised(summed: Any, noise: Any, expected_batch_size: Any) -> list[Any]:
            parts = tf.split(noise, self._sizes)
            return [tf.cast((s + self.stddev * tf.reshape(z, tf.shape(s)))
                            / expected_batch_size, v.dtype)
                    for s, z, v in zip(summed, parts, variables, strict=True)]

        def fused(sum_fn: Callable[..., Any]) -> Callable[..., Any]:
            def step(x: Any, y: Any, seg: Any, n: Any, noise: Any, size: Any) -> Any:
                summed, norms, terms = sum_fn(x, y, seg, n)
                return noised(summed, noise, size), terms, tf.reduce_all(
                    tf.math.is_finite(norms))
            return step

        # autograph off: the Python control flow here is over the graph's static structure
        def compiled(fn: Callable[..., Any]) -> Any:
            return tf.function(fn, reduce_retracing=True, autograph=False)

        self.per_stay_gradients = compiled(per_stay)
        self._per_example_sum = compiled(per_example_sum)
        self._ghost_sum = compiled(ghost_sum)
        self._plain = tf.function(plain, reduce_retracing=True)
        self._noised = compiled(noised)
        # one call per step once the path is settled: clipped sum, noise, division
        self._steps = {ClipPath.GHOST: compiled(fused(ghost_sum)),
                       ClipPath.PER_EXAMPLE: compiled(fused(per_example_sum))}

    def clipped_sum(self, x: npt.NDArray[Any], y: npt.NDArray[Any],
                    seg: npt.NDArray[Any], n_units: int) -> tuple[list[Any], Any]:
        """Sum over units of each unit's clipped (summed-over-stays) gradient (float64),
        and the units' gradient norms before clipping."""
        tf = self._tf
        if n_units == 0:
            return [tf.zeros(v.shape, tf.float64) for v in self.variables], tf.zeros([0])
        self._prepare(x)
        args = self._args(x, y, seg, n_units)
        if self.path is ClipPath.PER_EXAMPLE:
            summed, norms, terms = self._per_example_sum(*args)
        elif self._checked:
            summed, norms, terms = self._ghost_sum(*args)
        elif n_units < 2:  # the check needs two units; this step is exact meanwhile
            summed, norms, terms = self._per_example_sum(*args)
        else:
            summed, norms, terms = self._check_ghost(args)
        _check_margin(float(terms), n_units)
        return summed, norms

    def _prepare(self, x: npt.NDArray[Any]) -> None:
        """Before the first ghost-norm step: measure how the graph's tensors split by
        stay (:func:`_probe_layout`); a graph that does not keep stays apart on a
        leading axis falls back to the per-example path (refused when forced)."""
        if self.path is not ClipPath.GHOST or self._layout is not None or not len(x):
            return
        assert self._plan is not None  # noqa: S101  (the ghost path has a plan)
        try:
            layout = _probe_layout(self._tf, self._executor, self._input_name, x,
                                   self._plan, self.variables)
            layers = _foldable(self._plan, self._pairs, layout)
        except _NotPlanned as e:
            if self._forced:
                raise BadInput(f"the ghost-norm path does not know this graph: {e}") from e
            self.path, self.fallback_reason = ClipPath.PER_EXAMPLE, str(e)
            return
        self._layout, self._layers = layout, layers

    def _args(self, x: npt.NDArray[Any], y: npt.NDArray[Any], seg: npt.NDArray[Any],
              n_units: int) -> tuple[Any, ...]:
        tf = self._tf
        return (tf.constant(x), tf.constant(y), tf.constant(seg, tf.int32),
                tf.constant(n_units, tf.int32))

    def _check_ghost(self, args: tuple[Any, ...]) -> tuple[list[Any], Any, Any]:
        """The first ghost-norm step with two units, checked against the per-example
        path; the per-example result is the one used."""
        reference: tuple[list[Any], Any, Any] = self._per_example_sum(*args)
        self._checked = True
        try:
            ghost = self._ghost_sum(*args)
        except (ValueError, TypeError, self._tf.errors.InvalidArgumentError) as e:
            self.path, self.fallback_reason = ClipPath.PER_EXAMPLE, f"ghost norms fail: {e}"
            return reference
        ref_norms, norms = reference[1].numpy(), ghost[1].numpy()
        scale = max(self.clip, float(np.max(ref_norms)))
        same = np.allclose(norms, ref_norms, rtol=1e-3, atol=1e-5 * scale) and all(
            np.allclose(g.numpy(), r.numpy(), rtol=1e-3, atol=1e-5 * self.clip)
            for g, r in zip(ghost[0], reference[0], strict=True))
        if not same:
            self.path = ClipPath.PER_EXAMPLE
            self.fallback_reason = "ghost norms differ from per-example norms on this graph"
        return reference

    def private_step(self, x: npt.NDArray[Any], y: npt.NDArray[Any], seg: npt.NDArray[Any],
                     n_units: int, expected_batch_size: float) -> None:
        """Clipped sum + N(0, (clip z)^2) per coordinate, both float64, divided by the
        expected batch size, cast to the weights' dtype, applied by the optimizer."""
        tf = self._tf
        noise = tf.constant(self.rng.standard_normal(sum(self._sizes)), tf.float64)
        size = tf.constant(expected_batch_size, tf.float64)
        if n_units > 0:
            self._prepare(x)
        if n_units > 0 and (self._checked or self.path is ClipPath.PER_EXAMPLE):
            grads, terms, finite = self._steps[self.path](*self._args(x, y, seg, n_units),
                                                          noise, size)
            _check_margin(float(terms), n_units)  # before anything is applied
        else:
            summed, norms = self.clipped_sum(x, y, seg, n_units)
            grads, finite = self._noised(summed, noise, size), np.all(np.isfinite(norms))
        if not bool(finite):  # fail closed: a NaN or infinite gradient is not clipped
            raise GradientNotFinite("a gradient is not finite (NaN or infinity): lower "
                           "--learning-rate or --clip; nothing of this step was applied")
        self._optimizer.apply_gradients(zip(grads, self.variables, strict=True))

    def plain_step(self, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> None:
        """A non-private step (for the benchmark's baseline)."""
        grads = self._plain(x, y)
        self._optimizer.apply_gradients(zip(grads, self.variables, strict=True))


def _check_margin(terms: float, n_units: int) -> None:
    if (terms + 16) * (n_units + 1) > MAX_STEP_TERMS:
        raise BadInput(f"a step of {n_units} units is too large for the float64 rounding "
                       "margin: lower --batch-size")


def _factors(tf: Any, sq: Any, err_sq: Any, err_lin: Any, s: Any,
             clip: float) -> tuple[Any, Any]:
    """Clipping factors from squared norms ``sq`` (float64) with their rounding bounds
    (``sqrt(sq + err_sq) + err_lin`` is never below the exact norm), and the norms."""
    tiny = tf.constant(1e-300, tf.float64)
    upper = tf.sqrt(sq + err_sq) + err_lin
    factor = tf.minimum(tf.constant(1.0, tf.float64),
                        clip * (1 - CLIP_MARGIN) / tf.maximum(upper, tiny))
    factor = tf.minimum(factor, CANCELLATION_BOUND * clip / tf.maximum(s, tiny))
    return factor, tf.sqrt(sq)


class _NotPlanned(Exception):
    """The probe found a tensor the ghost-norm forms cannot split by stay."""


@dataclass(frozen=True)
class _Layout:
    """Shapes per stay of the tensors the ghost-norm forms read, measured by running the
    graph on 2 and on 3 copies of one stay (:func:`_probe_layout`)."""

    leads: dict[str, int]  # batched tensor -> length of its leading axis per stay
    tails: dict[str, tuple[int, ...]]  # batched tensor -> its shape after the leading axis
    shapes: dict[int, tuple[int, ...]]  # weight index -> shape of the tensor its uses read
    perms: dict[int, npt.NDArray[np.int64]]  # weight index (read through a view) ->
    #                                          for each weight entry, its index in the view

    def per_stay(self, name: str) -> int:
        return self.leads[name] * int(np.prod(self.tails[name]))


def _probe_layout(tf: Any, executor: Any, input_name: str, x: npt.NDArray[Any],
                  plan: Sequence[tuple[_Use, ...]], variables: Sequence[Any]) -> _Layout:
    """Every tensor a use reads must keep the stays of a batch apart along its leading
    axis (stay-major: ``rows * k`` long, ``k`` fixed, the rest of its shape fixed), or
    not depend on the batch at all (a constant operand); a view of a weight must be a
    permutation of its entries (checked: its pull-back of the indices ``0..size-1`` is a
    permutation). Anything else raises :class:`_NotPlanned` (the per-example path runs)."""
    names = sorted({t for uses in plan for u in uses
                    for t in (u.output, u.operand, *u.extra) if t})
    vias = {i: uses[0].via for i, uses in enumerate(plan) if uses[0].via}
    if any(len({u.via for u in uses}) != 1 for uses in plan):
        raise _NotPlanned("a weight is read both directly and through a view")
    shapes = []
    for copies in (2, 3):
        probe = np.repeat(np.asarray(x[:1]), copies, axis=0)
        env = executor.trace({input_name: probe}, names + sorted(set(vias.values())))
        shapes.append({k: tuple(int(d) for d in v.shape) for k, v in env.items()})
    leads: dict[str, int] = {}
    tails: dict[str, tuple[int, ...]] = {}
    for name in names:
        two, three = shapes[0][name], shapes[1][name]
        if two == three:
            continue  # does not depend on the batch
        lead = three[0] - two[0] if len(two) == len(three) and two else 0
        if lead < 1 or two[0] != 2 * lead or two[1:] != three[1:]:
            raise _NotPlanned(f"{name} does not keep a batch's stays apart on its leading "
                              f"axis (shapes {two} and {three} for 2 and 3 stays)")
        leads[name], tails[name] = lead, two[1:]
    for uses in plan:
        for u in uses:
            needed = [u.output] + ([u.operand] if u.kind in ("dense", "conv", "rows") else [])
            missing = [t for t in needed if t not in leads]
            if missing:
                raise _NotPlanned(f"{missing[0]} does not depend on the batch")
    out_shapes: dict[int, tuple[int, ...]] = {}
    perms: dict[int, npt.NDArray[np.int64]] = {}
    for i, v in enumerate(variables):
        out_shapes[i] = tuple(int(d) for d in v.shape)
        if i not in vias:
            continue
        view = vias[i]
        if shapes[0][view] != shapes[1][view]:
            raise _NotPlanned(f"the view {view} of a weight depends on the batch")
        size = int(np.prod(out_shapes[i]))
        if int(np.prod(shapes[0][view])) != size or size >= 2 ** 24:
            raise _NotPlanned(f"the view {view} is not a rearrangement of its weight")
        with tf.GradientTape() as tape:
            viewed = executor.trace({input_name: np.asarray(x[:1])}, [view])[view]
        index = tf.reshape(tf.range(size, dtype=viewed.dtype), tf.shape(viewed))
        pulled = tape.gradient(viewed, v, output_gradients=index)
        perm = np.rint(tf.convert_to_tensor(pulled).numpy().ravel()).astype(np.int64) \
            if pulled is not None else np.zeros(size, np.int64)
        if not np.array_equal(np.sort(perm), np.arange(size)):
            raise _NotPlanned(f"the view {view} is not a rearrangement of its weight")
        out_shapes[i], perms[i] = shapes[0][view], perm
    for i, uses in enumerate(plan):
        if uses[0].kind == "dense" and len(out_shapes[i]) != 2:
            raise _NotPlanned(f"a dense weight is read as shape {out_shapes[i]}")
        if uses[0].kind == "conv" and len(out_shapes[i]) < 3:
            raise _NotPlanned(f"a convolution kernel of shape {out_shapes[i]}")
    return _Layout(leads, tails, out_shapes, perms)


def _matrix_shape(kind: str, shape: tuple[int, ...]) -> list[int]:
    """A dense or conv weight as the matrix its per-stay gradient is: conv (M, C*K)."""
    return [shape[0], int(np.prod(shape[1:]))] if kind == "conv" else list(shape)


def _positions(layout: _Layout, u: _Use, matrix: list[int]) -> int:
    """Positions per stay of a dense or conv use (conv: filled at run time, so 0)."""
    if u.kind == "conv":
        return 0
    size = layout.per_stay(u.operand)
    width = matrix[u.transpose]
    if size % width:
        raise _NotPlanned(f"{u.operand} is not a whole number of rows per stay")
    return size // width


def _foldable(plan: Sequence[tuple[_Use, ...]], pairs: dict[int, int],
              layout: _Layout) -> dict[int, int]:
    """The dense/bias pairs whose layer has one position per stay (one outer product:
    the bias folds into the weight's Gram form), as measured by the probe."""
    out = {}
    for w, b in pairs.items():
        dense, bias = plan[w][0], plan[b][0]
        d_in, d_out = (layout.shapes[w][::-1] if dense.transpose else layout.shapes[w])
        if (layout.leads[dense.operand], layout.tails[dense.operand]) != (1, (d_in,)):
            continue
        if (layout.leads[bias.output], layout.tails[bias.output]) != (1, (d_out,)):
            continue
        if bias.operand and (layout.leads.get(bias.operand), layout.tails.get(bias.operand)) \
                != (1, (d_out,)):
            continue
        out[w] = b
    return out


def _broadcast_view(u: _Use, shape: tuple[int, ...], tail: tuple[int, ...]) -> list[int]:
    """How a scale use's weight (``shape``) broadcasts over its output's axes after the
    leading one (``tail``): its size on each, 1 where it is broadcast."""
    if u.node is not None and u.node.op_type in ("Conv", "BatchNormalization"):
        view = [int(np.prod(shape))] + [1] * (len(tail) - 1)  # channels: axis 1
    else:
        view = list(shape)
        if len(view) == len(tail) + 1:
            if view[0] != 1:
                raise ValueError(f"{u.output}: the weight spans the batch axis")
            view = view[1:]
        if len(view) > len(tail):
            raise ValueError(f"{u.output}: the weight has more axes than its output")
        view = [1] * (len(tail) - len(view)) + view
    for v, t in zip(view, tail, strict=True):
        if v not in (1, t):
            raise ValueError(f"{u.output}: weight shape {shape} does not broadcast to {tail}")
    return view


def _scale_terms(tf: Any, u: _Use, env: dict[str, Any], g: Any) -> Any:
    """The elementwise products whose sums over broadcast axes are a scale use's weight
    gradient: the output gradient times the other factor (float64)."""
    from onnx import helper

    f64 = tf.float64
    p = tf.cast(g, f64)
    if u.form == "mul":
        p = p * tf.cast(env[u.operand], f64)
    elif u.form in ("batchnorm", "layernorm"):
        attrs = {a.name: helper.get_attribute_value(a) for a in u.node.attribute}
        x = tf.cast(env[u.operand], f64)
        rank = int(x.shape.rank)
        eps = float(attrs.get("epsilon", 1e-5))
        if u.form == "batchnorm":
            view = [1, -1] + [1] * (rank - 2)
            mean, var = (tf.reshape(tf.cast(env[t], f64), view) for t in u.extra)
            p = p * (x - mean) * tf.math.rsqrt(var + eps)
        else:
            axis = int(attrs.get("axis", -1))
            axes = list(range(axis + rank if axis < 0 else axis, rank))
            mean, var = tf.nn.moments(x, axes, keepdims=True)
            p = p * (x - mean) * tf.math.rsqrt(var + eps)
    return p * u.scale if u.scale != 1.0 else p


def _ghost_clipped_sum(tf: Any, executor: Any, input_name: str, output_name: str,
                       variables: Sequence[Any], plan: Sequence[tuple[_Use, ...]],
                       layers: dict[int, int], layout: _Layout, clip: float, x: Any,
                       y: Any, seg: Any, n: Any) -> tuple[list[Any], Any, Any]:
    """Per-unit norms and the clipped sum from one forward and one backward pass.

    For a stay s and a weight W, W's gradient is a sum over positions p (rows of a
    sequence, a convolution's windows, reads of a tied weight) of outer products
    ``l_p (x) r_p`` (dense: the layer's input and its output gradient; conv: the window
    and the output gradient at that position), of output gradients (bias), of output
    gradients times the other factor summed over the axes the weight is broadcast on
    (scale: Add, Sub, Mul, normalisation), or of output gradients scattered to rows
    ``ids_p`` (embedding). A unit's squared norm is then, with p, q over the positions of
    all its stays: dense ``sum (l_p.l_q)(r_p.r_q)`` (Gram form: one position per stay;
    with several, the pairs of a unit's stays, or the per-stay gradients ``L_s^T R_s``
    summed per unit, whichever costs less: ``P (d_in + d_out)`` against ``d_in d_out``
    per stay and position, the "mixed ghost norm" rule of Bu et al. 2022), bias and
    scale ``||sum g_p||^2`` (per-stay sums, summed per unit), rows ``sum over rows of
    ||sum_{p: ids_p = row} g_p||^2``. The clipped sum is each form with its rows
    weighted by their unit's factor; a weight read through a view gets its view's sum
    rearranged back (the probe's permutation)."""
    from onnx import helper

    from adapters.onnx_layers import conv_patches
    from adapters.onnx_tf import NodeContext

    f64 = tf.float64
    rows = tf.shape(x)[0]
    rows64 = tf.cast(rows, f64)
    wanted = sorted({t for uses in plan for u in uses for t in (u.output, u.operand, *u.extra)
                     if t})
    with tf.GradientTape() as tape:
        env = executor.trace({input_name: x}, [output_name, *wanted])
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            y, env[output_name]))
    outputs = sorted({_grad_name(plan, layers, i, u) for i, uses in enumerate(plan)
                      for u in uses})
    grads = tape.gradient(loss, [env[o] for o in outputs])
    g_of = {o: tf.zeros_like(env[o]) if g is None else tf.convert_to_tensor(g)
            for o, g in zip(outputs, grads, strict=True)}
    gram: Any = None  # sum over weights of the stays' Gram terms (rows x rows), PSD
    gram_weights = 0
    sq: Any = tf.zeros([n], f64)  # squared norms not in Gram form, per unit
    err_pairs: Any = tf.zeros([n], f64)  # rounding bound of the pair forms, per unit
    bound: Any = None  # per stay, outside the Gram form: sum of norms
    terms: Any = rows64  # most terms summed into one coordinate
    widest = 16
    sums: dict[int, Callable[[Any], Any]] = {}  # clipped sums from per-stay weights
    by_unit: set[int] = set()  # ... or, these, from per-unit factors
    pairs: Any = None  # (i, j) of the stays of one unit, when a pair form needs them

    def add_gram(term: Any, weights: int) -> None:
        nonlocal gram, gram_weights
        gram = term if gram is None else gram + term
        gram_weights += weights

    def add_bound(stay_bound: Any) -> None:
        nonlocal bound
        bound = stay_bound if bound is None else bound + stay_bound

    def sides(u: _Use, i: int, matrix: list[int]) -> tuple[Any, Any]:
        """A dense or conv use's inputs and output gradients, (rows, positions, width)."""
        a, g = env[u.operand], g_of[_grad_name(plan, layers, i, u)]
        if u.kind == "conv":
            attrs = {at.name: helper.get_attribute_value(at) for at in u.node.attribute}
            ctx = NodeContext(u.node, 0, attrs, {}, {})
            tail = layout.tails[u.operand]
            cols = conv_patches(ctx, a, list(layout.shapes[i][2:]), list(tail[1:]))
            a = tf.transpose(cols, [0, 2, 1])  # N, positions, C*K
            g = tf.transpose(tf.reshape(g, tf.stack([tf.shape(g)[0], matrix[0], -1])),
                             [0, 2, 1])  # N, positions, M
        a = tf.reshape(tf.cast(a, f64), [rows, -1, matrix[u.transpose]])
        g = tf.reshape(tf.cast(g, f64), [rows, -1, matrix[1 - u.transpose]])
        return (a * u.scale if u.scale != 1.0 else a), g

    for i, uses in enumerate(plan):
        shape = [int(d) for d in layout.shapes[i]]
        widest = max(widest, sum(shape) + 1)
        kind = uses[0].kind
        if i in layers.values():
            continue  # a bias folded into its layer's dense weight
        if kind in ("dense", "conv"):
            matrix = _matrix_shape(kind, layout.shapes[i])
            widest = max(widest, sum(matrix) + 1)
            lefts, rights = [], []
            for u in uses:
                a, g = sides(u, i, matrix)
                lefts.append(g if u.transpose else a)
                rights.append(a if u.transpose else g)
            left = tf.concat(lefts, 1) if len(lefts) > 1 else lefts[0]
            right = tf.concat(rights, 1) if len(rights) > 1 else rights[0]
            positions = sum(_positions(layout, u, matrix) for u in uses)
            if kind == "conv":  # windows per stay, from the probe's input shape
                positions = -1
            if positions == 1:  # one position per stay: Gram form
                left, right = left[:, 0], right[:, 0]
                ll = tf.matmul(left, left, transpose_b=True)
                rr = tf.matmul(right, right, transpose_b=True)
                if i in layers:  # [W; b]: the input side gets a constant 1
                    grad = right if not uses[0].transpose else left
                    ll, rr = (ll, rr + 1.0) if uses[0].transpose else (ll + 1.0, rr)
                    bias_shape = [int(d) for d in variables[layers[i]].shape]

                    def folded_sum(w: Any, grad: Any = grad,
                                   bias_shape: list[int] = bias_shape) -> Any:
                        return tf.reshape(tf.linalg.matvec(grad, w, transpose_a=True),
                                          bias_shape)
                    sums[layers[i]] = folded_sum
                add_gram(ll * rr, 2 if i in layers else 1)

                def gram_sum(w: Any, left: Any = left, right: Any = right) -> Any:
                    return tf.linalg.matmul(left, right * w[:, None], transpose_a=True)
                sums[i] = gram_sum
            else:  # several positions per stay
                count = tf.shape(left)[1]
                terms = tf.maximum(terms, rows64 * tf.cast(count, f64))
                stay_bound = tf.reduce_sum(tf.norm(left, axis=-1) * tf.norm(right, axis=-1), 1)
                add_bound(stay_bound)
                if positions > 0 and positions * sum(matrix) < matrix[0] * matrix[1]:
                    # ghost: <G_s, G_t> = sum((L_s L_t^T) * (R_s R_t^T)) over the pairs
                    # (s, t) of one unit's stays
                    if pairs is None:
                        pairs = tf.where(tf.equal(seg[:, None], seg[None, :]))
                    s_i, s_j = pairs[:, 0], pairs[:, 1]
                    inner = tf.reduce_sum(
                        tf.matmul(tf.gather(left, s_i), tf.gather(left, s_j),
                                  transpose_b=True)
                        * tf.matmul(tf.gather(right, s_i), tf.gather(right, s_j),
                                    transpose_b=True), [1, 2])
                    sq += tf.math.unsorted_segment_sum(inner, tf.gather(seg, s_i), n)
                    # each pair: count^2 products of two dot products, at most
                    # b_s b_t in absolute value in all; rows^2 pairs summed at most
                    unit_bound = tf.math.unsorted_segment_sum(stay_bound, seg, n)
                    err_pairs += (sum(matrix) + float(positions) ** 2 + rows64 * rows64
                                  + 16) * _ULP * tf.square(unit_bound)
                    def dense_sum(w: Any, left: Any = left, right: Any = right,
                                  matrix: list[int] = matrix) -> Any:
                        weighted = tf.reshape(right * w[:, None, None], [-1, matrix[1]])
                        return tf.linalg.matmul(tf.reshape(left, [-1, matrix[0]]),
                                                weighted, transpose_a=True)
                    sums[i] = dense_sum
                else:  # direct: per-stay gradients (rows x d0 x d1), summed per unit;
                    # the clipped sum from those per-unit gradients (no second product)
                    per_unit = tf.math.unsorted_segment_sum(
                        tf.linalg.matmul(left, right, transpose_a=True), seg, n)
                    sq += tf.reduce_sum(tf.square(per_unit), [1, 2])

                    def unit_sum(factor: Any, per_unit: Any = per_unit) -> Any:
                        return tf.tensordot(factor, per_unit, axes=1)
                    sums[i] = unit_sum
                    by_unit.add(i)
        elif kind == "scale":
            size = int(np.prod(shape))
            per_stay: Any = None
            stay_bound = None
            for u in uses:
                lead, tail = layout.leads[u.output], layout.tails[u.output]
                view = _broadcast_view(u, layout.shapes[i], tail)
                p = tf.reshape(_scale_terms(tf, u, env, g_of[u.output]),
                               [rows, lead, *tail])
                axes = [1] + [2 + j for j, d in enumerate(view) if d == 1]
                part = tf.reshape(tf.reduce_sum(p, axes), [rows, size])
                part_bound = tf.reduce_sum(tf.reshape(tf.abs(p), [rows, -1]), 1)
                per_stay = part if per_stay is None else per_stay + part
                stay_bound = part_bound if stay_bound is None else stay_bound + part_bound
                terms = tf.maximum(terms, rows64 * float(lead * np.prod(tail) / size))
            per_unit = tf.math.unsorted_segment_sum(per_stay, seg, n)
            sq += tf.reduce_sum(tf.square(per_unit), 1)
            add_bound(stay_bound)

            def scale_sum(factor: Any, per_unit: Any = per_unit) -> Any:
                return tf.linalg.matvec(per_unit, factor, transpose_a=True)
            sums[i] = scale_sum
            by_unit.add(i)
        elif kind == "bias":
            per_stay = tf.add_n([tf.reduce_sum(tf.reshape(
                tf.cast(g_of[u.output], f64), [rows, -1, shape[-1]]), 1) * u.scale
                for u in uses])
            add_gram(tf.matmul(per_stay, per_stay, transpose_b=True), 1)

            def bias_sum(w: Any, per_stay: Any = per_stay, shape: list[int] = shape) -> Any:
                return tf.reshape(tf.linalg.matvec(per_stay, w, transpose_a=True), shape)
            sums[i] = bias_sum
        else:  # rows: an embedding read by Gather
            size, dim = shape
            ids = tf.concat([tf.reshape(tf.cast(env[u.operand], tf.int64), [rows, -1])
                             for u in uses], 1)
            ids = tf.reshape(tf.where(ids < 0, ids + size, ids), [-1])
            g = tf.reshape(tf.concat([tf.reshape(g_of[u.output], [rows, -1, dim])
                                      for u in uses], 1), [-1, dim])
            stay = tf.repeat(tf.range(rows), tf.size(ids) // rows)
            # positions whose gradient is exactly zero (masked padding) add nothing
            kept = tf.where(tf.reduce_any(tf.not_equal(g, 0), axis=1))[:, 0]
            g = tf.cast(tf.gather(g, kept), f64)
            ids, stay = tf.gather(ids, kept), tf.gather(stay, kept)
            # a unit's gradient rows, each summed over that unit's positions only (so a
            # deterministic function of the unit's data): (unit, row) keys
            keys, index = tf.unique(tf.cast(tf.gather(seg, stay), tf.int64) * size + ids)
            row_sums = tf.math.unsorted_segment_sum(g, index, tf.size(keys))
            key_unit, key_row = keys // size, keys % size
            sq += tf.math.unsorted_segment_sum(tf.reduce_sum(tf.square(row_sums), 1),
                                               key_unit, n)

            def rows_sum(factor: Any, row_sums: Any = row_sums, key_unit: Any = key_unit,
                         key_row: Any = key_row, size: int = size) -> Any:
                return tf.math.unsorted_segment_sum(
                    row_sums * tf.gather(factor, key_unit)[:, None], key_row, size)
            sums[i] = rows_sum
            by_unit.add(i)
    err_sq: Any = err_pairs
    if gram is not None:
        same = tf.cast(tf.equal(seg[:, None], seg[None, :]), f64)
        sq += tf.math.unsorted_segment_sum(tf.reduce_sum(gram * same, 1), seg, n)
        # the Gram matrix is PSD: |K_st| <= sqrt(K_ss K_tt), so a unit's sum of |terms| is
        # at most (sum of sqrt(K_ss))^2, and each weight's per-stay gradient norm at most
        # sqrt(K_ss): their sum over the weights at most sqrt(weights * K_ss)
        root = tf.math.unsorted_segment_sum(tf.sqrt(tf.maximum(
            tf.linalg.diag_part(gram), 0.0)), seg, n)
        err_sq += (widest + rows64 * rows64 + 16) * _ULP * tf.square(root)
        bound_units = math.sqrt(gram_weights) * root
    else:
        bound_units = tf.zeros([n], f64)
    s = bound_units if bound is None else \
        tf.math.unsorted_segment_sum(bound, seg, n) + bound_units
    factor, norms = _factors(tf, sq, err_sq, (terms + widest) * _ULP * s, s, clip)
    weight = tf.gather(factor, seg)
    out = []
    for i, v in enumerate(variables):
        summed = sums[i](factor if i in by_unit else weight)
        if i in layout.perms:  # read through a view: back to the weight's own order
            summed = tf.gather(tf.reshape(summed, [-1]), layout.perms[i])
        out.append(tf.reshape(summed, v.shape))
    return out, norms, terms


def _pair_biases(plan: Sequence[tuple[_Use, ...]], readers: dict[str, int]) -> dict[int, int]:
    """Dense weight index -> bias index, for a weight read once by a MatMul/Gemm whose
    output the bias (read once, scale 1) is added to and nothing else reads: their
    gradients are one outer product with a constant 1 on the input side, computed
    together from the Add's output gradient."""
    dense = {uses[0].output: i for i, uses in enumerate(plan)
             if len(uses) == 1 and uses[0].kind == "dense" and uses[0].scale == 1.0}
    pairs: dict[int, int] = {}
    for i, uses in enumerate(plan):
        if len(uses) != 1 or uses[0].kind != "bias" or uses[0].scale != 1.0:
            continue
        u = uses[0]
        w = dense.get(u.operand if u.operand else u.output)  # Add(h, b) or Gemm's C
        if w is not None and w not in pairs and (not u.operand or readers.get(u.operand) == 1):
            pairs[w] = i
    return pairs


def _grad_name(plan: Sequence[tuple[_Use, ...]], layers: dict[int, int], i: int,
               u: _Use) -> str:
    """Whose gradient a use needs: a folded layer's dense weight takes its bias's
    output (Add passes the gradient through unchanged)."""
    if i in layers:
        return plan[layers[i]][0].output
    return u.output


def train_dp_sgd(sgd: DpSgd, plan: DpSgdPlan, inputs: npt.NDArray[Any],
                 labels: npt.NDArray[Any], unit_of_stay: Sequence[int],
                 rng: RandomSource, progress: Progress | None = None) -> None:
    """Run ``plan.steps`` DP-SGD steps (steps 1-5 of the module docstring)."""
    groups = per_unit_groups(unit_of_stay, plan.units)
    every = max(1, plan.steps // 20)
    for step in range(plan.steps):
        chosen = poisson_sample(rng, plan.units, plan.sampling_rate)
        stays = [groups[u] for u in chosen]
        idx = np.concatenate(stays) if stays else np.zeros(0, np.int64)
        seg = np.concatenate([np.full(len(s), k, np.int32) for k, s in enumerate(stays)]) \
            if stays else np.zeros(0, np.int32)
        sgd.private_step(inputs[idx], labels[idx], seg, len(chosen), plan.expected_batch_size)
        if progress is not None and ((step + 1) % every == 0 or step + 1 == plan.steps):
            progress("DP-SGD steps", step + 1, plan.steps)
