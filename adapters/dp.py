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
       layer's output; norms from layer inputs and output gradients (Gram form for
       MatMul/Gemm weights, segment sums for biases and for embedding rows: only the
       rows a unit's tokens touch), no per-stay gradient is materialised;
       per-example (any graph the executor runs): per-stay gradients with
       ``tf.vectorized_map``, summed per unit (``unsorted_segment_sum``).
       The ghost-norm path runs when every trained weight is read by a layer it knows,
       and only after its norms and clipped sum matched the per-example path's on the
       first step with two units (else the run falls back; :attr:`DpSgd.path` says
       which ran). Tensorflow-privacy's own fast clipping is not used: it knows only
       Keras layers, under-clips tied weights and divides by the realised batch size
       (DESIGN.md).
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
from dataclasses import dataclass
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
    """One read of a trainable weight by a node the ghost-norm path knows."""

    kind: Literal["dense", "bias", "rows"]
    output: str  # the node's output (its gradient is taken)
    operand: str  # dense: the activation; rows: the indices; bias: Add's other input
    transpose: bool  # dense: the weight's layout is (out, in) (Gemm transB)
    scale: float  # Gemm alpha (dense) or beta (bias)


def _use_of(node: Any, weight: str, shape: tuple[int, ...]) -> _Use | None:
    """The ghost-norm form of ``node`` reading ``weight``, or None (unknown layer)."""
    from onnx import helper

    ins = list(node.input)
    if node.domain not in ("", "ai.onnx") or ins.count(weight) != 1 or not node.output:
        return None
    pos, out = ins.index(weight), node.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias_shape = len(shape) >= 1 and all(d == 1 for d in shape[:-1])
    if node.op_type == "MatMul" and pos == 1 and len(shape) == 2:
        return _Use("dense", out, ins[0], False, 1.0)
    if node.op_type == "Gemm" and not attrs.get("transA", 0):
        if pos == 1 and len(shape) == 2:
            return _Use("dense", out, ins[0], bool(attrs.get("transB", 0)),
                        float(attrs.get("alpha", 1.0)))
        if pos == 2 and bias_shape:
            return _Use("bias", out, "", False, float(attrs.get("beta", 1.0)))
    if node.op_type == "Add" and bias_shape:
        return _Use("bias", out, ins[1 - pos], False, 1.0)
    if node.op_type == "Gather" and pos == 0 and len(shape) == 2 \
            and int(attrs.get("axis", 0)) == 0:
        return _Use("rows", out, ins[1], False, 1.0)
    return None


def ghost_plan(executor: Any) -> tuple[list[tuple[_Use, ...]] | None, str]:
    """For every trainable weight (in ``trainable_variables`` order) the reads the
    ghost-norm path knows: MatMul/Gemm weights (dense), biases of Add/Gemm, and Gather
    rows (embeddings); a weight read several times (tied) is one weight, all its reads
    of one kind. ``(None, reason)`` when some weight is read any other way."""
    nodes = executor.nodes
    plan: list[tuple[_Use, ...]] = []
    for p in executor.parameters:
        if not p.trainable:
            continue
        uses = [_use_of(nodes[c], p.name, p.shape) for c in p.consumers]
        known = [u for u in uses if u is not None]
        if len(known) != len(uses):
            bad = sorted({nodes[c].op_type for c, u in zip(p.consumers, uses, strict=True)
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
        pairs = _pair_biases(plan, readers) if plan is not None else {}

        def ghost_sum(x: Any, y: Any, seg: Any, n: Any) -> tuple[list[Any], Any, Any]:
            assert plan is not None  # noqa: S101  (only traced when the plan exists)
            return _ghost_clipped_sum(tf, executor, input_name, output_name, variables,
                                      plan, pairs, clip, x, y, seg, n)

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


def _ghost_clipped_sum(tf: Any, executor: Any, input_name: str, output_name: str,
                       variables: Sequence[Any], plan: Sequence[tuple[_Use, ...]],
                       pairs: dict[int, int], clip: float, x: Any, y: Any, seg: Any,
                       n: Any) -> tuple[list[Any], Any, Any]:
    """Per-unit norms and the clipped sum from one forward and one backward pass.

    For a stay s and a weight W, W's gradient is a sum over positions p (rows of a
    sequence, reads of a tied weight) of outer products ``l_p (x) r_p`` (dense: the
    layer's input and its output gradient), of output gradients (bias), or of output
    gradients scattered to rows ``ids_p`` (embedding). A unit's squared norm is then, with
    p, q over the positions of all its stays: dense ``sum (l_p.l_q)(r_p.r_q)`` (the Gram
    form; per-stay outer products summed per unit when a stay has several positions),
    bias ``||sum g_p||^2``, rows ``sum over rows of ||sum_{p: ids_p = row} g_p||^2``. The
    clipped sum is each form with its rows weighted by their unit's factor."""
    f64 = tf.float64
    rows = tf.shape(x)[0]
    wanted = sorted({u.output for uses in plan for u in uses}
                    | {u.operand for uses in plan for u in uses if u.operand})
    with tf.GradientTape() as tape:
        env = executor.trace({input_name: x}, [output_name, *wanted])
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            y, env[output_name]))
    layers = {w: b for w, b in pairs.items()  # Add(h, b): h not broadcast
              if env[plan[w][0].operand].shape.rank == 2
              and env[plan[b][0].output].shape.rank == 2
              and (not plan[b][0].operand or env[plan[b][0].operand].shape.as_list()
                   == env[plan[b][0].output].shape.as_list())}
    outputs = sorted({_grad_name(plan, layers, i, u) for i, uses in enumerate(plan)
                      for u in uses})
    grads = tape.gradient(loss, [env[o] for o in outputs])
    g_of = {o: tf.zeros_like(env[o]) if g is None else tf.convert_to_tensor(g)
            for o, g in zip(outputs, grads, strict=True)}
    gram: Any = None  # sum over weights of the stays' Gram terms (rows x rows), PSD
    gram_weights = 0
    sq: Any = tf.zeros([n], f64)  # squared norms not in Gram form, per unit
    bound: Any = None  # per stay, outside the Gram form: sum of norms
    terms: Any = tf.cast(rows, f64)  # most terms summed into one coordinate
    widest = 16
    sums: dict[int, Callable[[Any], Any]] = {}  # clipped sums from per-stay weights
    by_unit: set[int] = set()  # ... or, these, from per-unit factors

    def add_gram(term: Any, weights: int) -> None:
        nonlocal gram, gram_weights
        gram = term if gram is None else gram + term
        gram_weights += weights

    for i, (v, uses) in enumerate(zip(variables, plan, strict=True)):
        shape = [int(d) for d in v.shape]
        widest = max(widest, sum(shape) + 1)
        kind = uses[0].kind
        if i in layers.values():
            continue  # a bias folded into its layer's dense weight
        if kind == "dense":
            lefts, rights = [], []
            single = len(uses) == 1 and env[uses[0].operand].shape.rank == 2 \
                and g_of[_grad_name(plan, layers, i, uses[0])].shape.rank == 2
            for u in uses:
                a, g = env[u.operand], g_of[_grad_name(plan, layers, i, u)]
                a, g = tf.cast(a, f64), tf.cast(g, f64)
                if not single:
                    a = tf.reshape(a, [rows, -1, shape[u.transpose]])
                    g = tf.reshape(g, [rows, -1, shape[1 - u.transpose]])
                a = a * u.scale if u.scale != 1.0 else a
                lefts.append(g if u.transpose else a)
                rights.append(a if u.transpose else g)
            left = tf.concat(lefts, 1) if len(lefts) > 1 else lefts[0]
            right = tf.concat(rights, 1) if len(rights) > 1 else rights[0]
            if single:  # one position per stay: Gram form
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
            else:  # several positions: per-stay gradients (rows x d0 x d1), per unit
                terms = tf.maximum(terms, tf.cast(rows * tf.shape(left)[1], f64))
                sq += tf.reduce_sum(tf.square(tf.math.unsorted_segment_sum(
                    tf.linalg.matmul(left, right, transpose_a=True), seg, n)), [1, 2])
                stay_bound = tf.reduce_sum(tf.norm(left, axis=-1) * tf.norm(right, axis=-1), 1)
                bound = stay_bound if bound is None else bound + stay_bound

                def dense_sum(w: Any, left: Any = left, right: Any = right,
                              shape: list[int] = shape) -> Any:
                    weighted = tf.reshape(right * w[:, None, None], [-1, shape[1]])
                    return tf.linalg.matmul(tf.reshape(left, [-1, shape[0]]), weighted,
                                            transpose_a=True)
                sums[i] = dense_sum
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
    rows64 = tf.cast(rows, f64)
    err_sq: Any = tf.zeros([n], f64)
    if gram is not None:
        same = tf.cast(tf.equal(seg[:, None], seg[None, :]), f64)
        sq += tf.math.unsorted_segment_sum(tf.reduce_sum(gram * same, 1), seg, n)
        # the Gram matrix is PSD: |K_st| <= sqrt(K_ss K_tt), so a unit's sum of |terms| is
        # at most (sum of sqrt(K_ss))^2, and each weight's per-stay gradient norm at most
        # sqrt(K_ss): their sum over the weights at most sqrt(weights * K_ss)
        root = tf.math.unsorted_segment_sum(tf.sqrt(tf.maximum(
            tf.linalg.diag_part(gram), 0.0)), seg, n)
        err_sq = (widest + rows64 * rows64 + 16) * _ULP * tf.square(root)
        bound_units = math.sqrt(gram_weights) * root
    else:
        bound_units = tf.zeros([n], f64)
    s = bound_units if bound is None else \
        tf.math.unsorted_segment_sum(bound, seg, n) + bound_units
    factor, norms = _factors(tf, sq, err_sq, (terms + widest) * _ULP * s, s, clip)
    weight = tf.gather(factor, seg)
    return [sums[i](factor if i in by_unit else weight) for i in range(len(variables))], \
        norms, terms


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
