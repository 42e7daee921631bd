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
       is taken independently with probability ``q`` (``rng`` is a parameter).
    2. Per-stay gradients of the trainable weights with ``tf.vectorized_map`` over the
       executor, differentiated with respect to the *variables*, so that a weight read
       by several nodes (tied weights) gets the sum of its uses before clipping.
    3. A unit's contribution is the sum of its stays' gradients (``unsorted_segment_sum``),
       clipped as one record to L2 norm ``clip`` (over all trainable weights together).
    4. The clipped contributions are summed and noised by tensorflow-privacy's
       ``GaussianSumQuery`` (stddev ``clip * z``). Clipping itself is done here,
       vectorised, with the same rule as the query's ``preprocess_record``
       (``tf.clip_by_global_norm``); tensorflow-privacy's own fast clipping is not
       used because it knows only Keras Dense/Embedding layers and under-clips tied
       weights (DESIGN.md).
    5. The noisy sum is divided by the *expected* batch size ``q * units`` (not the
       realised one) and applied by an optimizer (post-processing). A step with no
       sampled unit still adds the noise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import dp_accounting
import numpy as np
import numpy.typing as npt

from passerelle.errors import BadInput

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


def poisson_sample(rng: np.random.Generator, units: int, q: float) -> npt.NDArray[np.int64]:
    """Every unit independently with probability ``q``: the indices of the chosen ones."""
    return np.flatnonzero(rng.random(units) < q).astype(np.int64)


class DpSgd:
    """One clipped, noised step at a time over an executor's trainable variables."""

    def __init__(self, executor: Any, input_name: str, output_name: str, clip: float,
                 noise_multiplier: float, optimizer: Any) -> None:
        import tensorflow as tf
        from tensorflow_privacy import GaussianSumQuery

        self._tf = tf
        self.variables = list(executor.trainable_variables)
        if not self.variables:
            raise BadInput("no weight trains: choose --trainable layers")
        self.clip = clip
        self.query = GaussianSumQuery(l2_norm_clip=clip, stddev=clip * noise_multiplier)
        self._global_state = self.query.initial_global_state()
        self._optimizer = optimizer
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

        def clipped_sum(x: Any, y: Any, seg: Any, n: Any) -> tuple[list[Any], Any]:
            grads = per_stay(x, y)
            per_unit = [tf.math.unsorted_segment_sum(g, seg, n) for g in grads]
            sq = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [n, -1]), axis=1)
                           for g in per_unit])
            norms = tf.sqrt(sq)
            factor = tf.minimum(1.0, clip / tf.maximum(norms, 1e-12))  # clip_by_global_norm
            summed = [tf.tensordot(factor, g, axes=1) for g in per_unit]
            return summed, norms

        def plain(x: Any, y: Any) -> list[Any]:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_of(x, y))
            return list(tape.gradient(loss, variables))

        self.per_stay_gradients = tf.function(per_stay, reduce_retracing=True)
        self._clipped_sum = tf.function(clipped_sum, reduce_retracing=True)
        self._plain = tf.function(plain, reduce_retracing=True)

    def clipped_sum(self, x: npt.NDArray[Any], y: npt.NDArray[Any],
                    seg: npt.NDArray[Any], n_units: int) -> tuple[list[Any], Any]:
        """Sum over units of each unit's clipped (summed-over-stays) gradient, and the
        units' gradient norms before clipping."""
        tf = self._tf
        if n_units == 0:
            return [tf.zeros_like(v) for v in self.variables], tf.zeros([0])
        summed, norms = self._clipped_sum(x, y, tf.constant(seg, tf.int32),
                                          tf.constant(n_units, tf.int32))
        return summed, norms

    def private_step(self, x: npt.NDArray[Any], y: npt.NDArray[Any], seg: npt.NDArray[Any],
                     n_units: int, expected_batch_size: float) -> None:
        summed, _ = self.clipped_sum(x, y, seg, n_units)
        noised, self._global_state, _ = self.query.get_noised_result(
            summed, self._global_state)
        grads = [g / expected_batch_size for g in noised]
        self._optimizer.apply_gradients(zip(grads, self.variables, strict=True))

    def plain_step(self, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> None:
        """A non-private step (for the benchmark's baseline)."""
        grads = self._plain(x, y)
        self._optimizer.apply_gradients(zip(grads, self.variables, strict=True))


def train_dp_sgd(sgd: DpSgd, plan: DpSgdPlan, inputs: npt.NDArray[Any],
                 labels: npt.NDArray[Any], unit_of_stay: Sequence[int],
                 rng: np.random.Generator, progress: Progress | None = None) -> None:
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
