"""The recipe for an ONNX-only model without a recipe: re-initialised copies, retrained.

When a vendor hands over only an ONNX graph (any framework's exporter) and no recipe,
Passerelle trains each reference model itself: a copy of the target graph whose every
trainable float weight (adapters.onnx_tf: initializers of rank >= 1 that some node reads
for their values) is drawn afresh, then trained with the project's TensorFlow executor
(adapters.onnx_tf.OnnxExecutor) by plain (non-DP) Adam on the half's stays.

Re-initialisation (seeded with the reference model's seed; same names, shapes, dtypes):

- a normalisation's scale (input 1 of BatchNormalization, LayerNormalization,
  InstanceNormalization, GroupNormalization, or a weight named ``gamma``/``scale``
  in a ``norm`` group, as tf2onnx writes a decomposed LayerNormalization): ones;
- a bias or shift (rank 1, input 2 of Conv/ConvTranspose/Gemm, input 3 of
  LSTM/GRU/RNN, or read only by ``Add`` nodes, as tf2onnx folds a bias): zeros;
- every other weight of rank >= 2: Glorot-uniform, ``U(-l, l)`` with
  ``l = sqrt(6 / (fan_in + fan_out))`` (rank 2: the two dimensions; rank > 2: ONNX
  Conv layout ``(out, in, k...)``, receptive field ``prod(k)``).

Schedule: ``training.steps`` mini-batch steps when the target declared its steps, else
:data:`DEFAULT_EPOCHS` epochs; batches of :data:`BATCH_SIZE`, shuffled per epoch with the
seed; Adam at :data:`LEARNING_RATE`. These defaults are the recipe's, recorded as such:
they are not the vendor's recipe, only the same architecture trained as well as a
generic schedule trains it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnx

from passerelle.recipes import TrainingSet

if TYPE_CHECKING:  # TensorFlow loads with the executor: imported where retraining runs
    from adapters.onnx_tf import OnnxExecutor

DEFAULT_EPOCHS = 20
BATCH_SIZE = 32
LEARNING_RATE = 1e-2
_NORMS = frozenset({"BatchNormalization", "LayerNormalization", "InstanceNormalization",
                    "GroupNormalization"})
_BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "LSTM": 3, "GRU": 3, "RNN": 3}


def _role(name: str, group: str, shape: tuple[int, ...],
          uses: list[tuple[str, int]]) -> str:
    """"scale" | "bias" | "weight" of a float weight, from the nodes that read it."""
    if any(op in _NORMS and pos == 1 for op, pos in uses):
        return "scale"
    if any(op in _NORMS and pos == 2 for op, pos in uses):
        return "bias"
    last = name.rsplit("/", 2)[-2:] if "/" in name else [name]
    if "norm" in group.lower() and any(("gamma" in p.lower() or "scale" in p.lower())
                                       for p in last):
        return "scale"
    if len(shape) == 1 or any(_BIAS_INPUT.get(op) == pos for op, pos in uses):
        return "bias"
    if uses and all(op == "Add" for op, _ in uses):  # a bias folded to (1, ..., n)
        return "bias"
    return "weight"


def glorot_uniform(shape: tuple[int, ...], rng: np.random.Generator) -> npt.NDArray[np.float64]:
    if len(shape) == 2:
        fan_in, fan_out = shape
    else:
        receptive = math.prod(shape[2:])
        fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    limit = math.sqrt(6.0 / max(1, fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def reinitialised(target: onnx.ModelProto, seed: int) -> tuple[OnnxExecutor, dict[str, str]]:
    """An executor over ``target`` with every trainable weight re-drawn; and each weight's
    role (``scale``/``bias``/``weight``), for the record and the tests."""
    from adapters.onnx_tf import OnnxExecutor

    executor = OnnxExecutor.from_model(target)
    nodes = executor.nodes
    rng = np.random.default_rng(seed)
    roles: dict[str, str] = {}
    for p in executor.parameters:
        if not p.trainable:
            continue
        base = p.name.rsplit(".", 1)[0] if p.location == "attribute" else p.name
        uses = [(nodes[c].op_type, pos) for c in p.consumers
                for pos, inp in enumerate(nodes[c].input) if inp == base]
        role = _role(p.name, p.group, p.shape, uses)
        roles[p.name] = role
        if role == "scale":
            value = np.ones(p.shape)
        elif role == "bias":
            value = np.zeros(p.shape)
        else:
            value = glorot_uniform(p.shape, rng)
        variable = executor.variables_by_name[p.name]
        variable.assign(value.astype(variable.dtype.as_numpy_dtype))
    return executor, roles


def onnx_reinit_recipe(target: onnx.ModelProto) -> Callable[[TrainingSet], onnx.ModelProto]:
    """The recipe function (passerelle.recipes) that retrains re-initialised copies of
    ``target``; each call returns the trained graph (the same graph, new weights)."""

    def recipe(training: TrainingSet) -> onnx.ModelProto:
        return retrain(target, training)

    return recipe


def retrain(target: onnx.ModelProto, training: TrainingSet) -> onnx.ModelProto:
    import tensorflow as tf

    tf.random.set_seed(training.seed)
    executor, _ = reinitialised(target, training.seed)
    variables = executor.trainable_variables
    name, output = executor.input_names[0], _output(executor)
    optimizer = tf.keras.optimizers.Adam(LEARNING_RATE)
    x, y = training.inputs, training.labels
    n = len(y)
    if n == 0:
        return executor.to_model()
    per_epoch = max(1, math.ceil(n / BATCH_SIZE))
    steps = training.steps if training.steps is not None else DEFAULT_EPOCHS * per_epoch

    def plain_step(xb: Any, yb: Any) -> Any:
        with tf.GradientTape() as tape:
            logits = executor({name: xb}, [output])[output]
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                yb, logits, from_logits=True))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(
            [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None])
        return loss

    step = tf.function(plain_step, input_signature=[
        tf.TensorSpec([None, *x.shape[1:]], x.dtype), tf.TensorSpec([None], tf.int64)])
    rng = np.random.default_rng(training.seed + 1)
    done = 0
    while done < steps:
        order = rng.permutation(n)
        for start in range(0, n, BATCH_SIZE):
            if done >= steps:
                break
            idx = order[start:start + BATCH_SIZE]
            step(x[idx], y[idx])
            done += 1
    return executor.to_model()


def _output(executor: OnnxExecutor) -> str:
    names = executor.output_names
    return "logits" if "logits" in names else names[0]
