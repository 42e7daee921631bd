"""The framework bridge: load a vendor's source model, score it, convert it to ONNX.

Three frameworks, found from the source itself (:func:`framework_of`):

* ``keras``: a ``.keras`` file or a Keras 2 SavedModel folder (``saved_model.pb``),
  loaded with ``safe_mode`` on; ``custom_objects`` ("module:Name[,Name...]") imports the
  custom layers it needs;
* ``sklearn``: a ``.skops`` file (never pickle); a file holding untrusted types is refused;
* ``onnx``: an ``.onnx`` file from any framework; self-contained (no external data, no
  model-local functions, standard domains: transfer.onnx_safety) and accepted by
  ``onnx.checker`` with full checks.

:func:`source_logits` gives the model's logits ``(n, C)`` float32 (probabilities are
turned into log-probabilities, which softmax gives back); :func:`to_onnx` converts the
model into the shippable ONNX, whose single output ``logits`` computes the same thing.
After registration no source framework is loaded again (registry.export).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from adapters.onnx_export import rename_output
from passerelle.errors import BadInput, ConversionError
from registry.model_dir import Framework

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".bin", ".cloudpickle")
LOG_FLOOR = 1e-30  # probabilities below this are floored before the log (no -inf logits)
_BATCH = 256
_CUSTOM = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_]\w*(?:,[A-Za-z_]\w*)*)$")


def framework_of(path: Path) -> Framework:
    """The framework of a source model, from what it is on disk (BadInput if unknown)."""
    name = path.name.lower()
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return Framework.KERAS
        raise BadInput(f"{path}: a folder that is neither a `model train` folder nor a "
                       "SavedModel (saved_model.pb)")
    if name.endswith(".keras"):
        return Framework.KERAS
    if name.endswith(".skops"):
        return Framework.SKLEARN
    if name.endswith(".onnx"):
        return Framework.ONNX
    if name.endswith(PICKLE_SUFFIXES):
        raise BadInput(f"{path}: pickle files are refused (they run code when loaded); save "
                       "a scikit-learn model with skops, or export the model to ONNX")
    raise BadInput(f"{path}: unknown model framework (expected .keras, a SavedModel folder, "
                   ".skops or .onnx)")


def custom_objects_of(spec: str | None) -> dict[str, Any]:
    """``module:Name[,Name...]`` (several separated by ';') -> {Name: object}."""
    found: dict[str, Any] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        match = _CUSTOM.match(part.strip())
        if match is None:
            raise BadInput(f"--custom-objects {part.strip()!r} is not module:Name[,Name...]")
        module_name, names = match.group(1), match.group(2).split(",")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # an import runs the module: anything may come out
            raise BadInput(f"--custom-objects: module {module_name!r} cannot be imported: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                           ) from e
        for name in names:
            if not hasattr(module, name):
                raise BadInput(f"--custom-objects: {module_name} has no {name!r}")
            found[name] = getattr(module, name)
    return found


def load_source(path: Path, framework: str, custom_objects: str | None = None) -> Any:
    """The source model, loaded safely (BadInput if it cannot be)."""
    kind = Framework(framework)
    if kind is Framework.KERAS:
        return _load_keras(path, custom_objects_of(custom_objects))
    if custom_objects:
        raise BadInput("--custom-objects applies to Keras models only")
    if kind is Framework.SKLEARN:
        return _load_skops(path)
    return load_onnx_source(path)


def _load_keras(path: Path, custom: dict[str, Any]) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    try:
        return tf.keras.models.load_model(path, compile=False, safe_mode=True,
                                          custom_objects=custom or None)
    except Exception as e:  # Keras raises anything from ValueError to TypeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "" if custom else " (a custom layer needs --custom-objects module:Name)"
        raise BadInput(f"{path.name}: the Keras model cannot be loaded: {first[:300]}{hint}"
                       ) from e


# skops does not trust sklearn's Tree by default: it is rebuilt from arrays (no code of the
# file runs), but scikit-learn indexes its node arrays without bounds checks, so a crafted
# file could crash the process at the first prediction. Every tree ensemble holds Trees:
# they are trusted here only after :func:`_check_trees` has bounds-checked every array.
SKOPS_TRUSTED = ("sklearn.tree._tree.Tree",)


def _load_skops(path: Path) -> Any:
    import skops.io

    try:
        untrusted = [t for t in skops.io.get_untrusted_types(file=path)
                     if t not in SKOPS_TRUSTED]
    except Exception as e:  # not a skops file: zip or JSON errors
        raise BadInput(f"{path.name}: not a skops file: {e}") from e
    if untrusted:
        raise BadInput(f"{path.name}: holds types that are not trusted: {untrusted}")
    try:
        model = skops.io.load(path, trusted=list(SKOPS_TRUSTED))
    except Exception as e:
        raise BadInput(f"{path.name}: the skops model cannot be loaded: {e}") from e
    _check_trees(model, path.name)
    return model


def _trees(obj: Any, depth: int = 0) -> Iterator[tuple[Any, int]]:
    """(sklearn Tree, its estimator's n_features_in_) of every tree under ``obj``
    (pipelines, forests, boosting)."""
    if depth > 8:
        return
    if hasattr(obj, "tree_"):
        yield obj.tree_, int(getattr(obj, "n_features_in_", -1))
    for part in getattr(obj, "steps", ()):
        yield from _trees(part[1], depth + 1)
    estimators = getattr(obj, "estimators_", None)
    if estimators is not None:
        for est in np.asarray(estimators, dtype=object).ravel():
            yield from _trees(est, depth + 1)


def _check_trees(model: Any, what: str) -> None:
    """Every node array of every tree in bounds (children after their parent, so no
    cycle; features of split nodes below the estimator's input width), else BadInput."""
    from sklearn.tree._tree import Tree

    found = list(_trees(model))
    if not found and _holds(model, Tree):
        raise BadInput(f"{what}: holds a decision tree this check cannot reach: refused")
    for tree, width in found:
        n = int(tree.node_count)
        left, right = np.asarray(tree.children_left), np.asarray(tree.children_right)
        feature, ids = np.asarray(tree.feature), np.arange(n)
        leaf = left == -1
        ok = (n >= 1 and left.shape == right.shape == feature.shape == (n,)
              and np.array_equal(leaf, right == -1)
              and bool(np.all((left[~leaf] > ids[~leaf]) & (left[~leaf] < n)))
              and bool(np.all((right[~leaf] > ids[~leaf]) & (right[~leaf] < n)))
              and bool(np.all((feature[~leaf] >= 0) & (feature[~leaf] < max(width, 0))))
              and np.asarray(tree.value).shape[0] == n
              and bool(np.all(np.isfinite(np.asarray(tree.threshold)[~leaf]))))
        if not ok:
            raise BadInput(f"{what}: a decision tree's node arrays are out of bounds "
                           "(a crafted or corrupt file): refused")


def _holds(obj: Any, kind: type, depth: int = 0) -> bool:
    if isinstance(obj, kind):
        return True
    if depth > 8 or not hasattr(obj, "__dict__"):
        return False
    return any(_holds(v, kind, depth + 1) for v in vars(obj).values()
               if hasattr(v, "__dict__") or isinstance(v, kind))


def load_onnx_source(path: Path) -> onnx.ModelProto:
    """An ONNX file, checked as a received model is, then by onnx.checker (full)."""
    from transfer.errors import UnsafeModel
    from transfer.onnx_safety import check_model

    try:
        check_model(path)
    except UnsafeModel as e:
        raise BadInput(f"refused ONNX source: {e}") from e
    proto = onnx.load(str(path), load_external_data=False)
    check_onnx(proto, path.name)
    return proto


def check_onnx(proto: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"{what}: onnx.checker refused the model: {first}") from e


def _log(p: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = np.log(np.maximum(np.asarray(p, np.float32),
                                                     np.float32(LOG_FLOOR)))
    return out


def source_logits(model: Any, framework: str, inputs: npt.NDArray[Any],
                  texts: Sequence[str] | None = None,
                  scores: str = "logits") -> npt.NDArray[np.float32]:
    """Logits ``(n, C)`` float32 of the source model on ``inputs`` (encoded as its
    manifest says); ``scores="probabilities"``: the log of what the model outputs.
    ``texts`` is for models that read text (not used by these three frameworks)."""
    kind = Framework(framework)
    if kind is Framework.KERAS:
        parts = [np.asarray(model(inputs[i:i + _BATCH], training=False), np.float32)
                 for i in range(0, len(inputs), _BATCH)]
        out = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    elif kind is Framework.SKLEARN:
        from adapters.onnx_export import sklearn_logits

        # a text pipeline reads the raw texts, as the vendor runs it; anything else the bag
        # of words; both with the logits convention of sklearn_to_onnx (docs/decisions/0005)
        reads_text = texts is not None and reads_raw_text(model)
        out = sklearn_logits(model, list(texts) if reads_text and texts is not None
                             else np.asarray(inputs, np.float32))
        scores = "logits"
    else:
        from registry.export import run_onnx

        out = run_onnx(_one_output(model).SerializeToString(), inputs, None)
    if out.ndim != 2:
        raise BadInput(f"the model outputs shape {out.shape}; (n, number of labels) expected")
    return _log(out) if scores == "probabilities" else out.astype(np.float32)


def reads_raw_text(model: Any) -> bool:
    """Whether a scikit-learn model is a Pipeline that starts with a text vectorizer."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.pipeline import Pipeline

    return isinstance(model, Pipeline) and bool(model.steps) and \
        isinstance(model.steps[0][1], CountVectorizer)


def to_onnx(model: Any, framework: str, inputs_example: npt.NDArray[Any],
            scores: str = "logits") -> onnx.ModelProto:
    """The shippable ONNX of ``model``: one input, one output ``logits`` (n, C)."""
    from adapters.onnx_export import keras_to_onnx, sklearn_to_onnx

    kind = Framework(framework)
    width = int(inputs_example.shape[1])
    if kind is Framework.KERAS:
        proto = keras_to_onnx(model, width, str(inputs_example.dtype))
    elif kind is Framework.SKLEARN:
        from adapters.sklearn_text import prepare_sklearn

        proto = sklearn_to_onnx(prepare_sklearn(model).estimator, width)
        scores = "logits"  # sklearn_to_onnx's output is logits already
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(_one_output(model))
        _rename_output(proto, proto.graph.output[0].name, "logits")
    if scores == "probabilities":
        _append_log(proto)
    return proto


def _one_output(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its one output (or the one named ``logits``/``probabilities``)."""
    names = [o.name for o in proto.graph.output]
    if len(names) == 1:
        return proto
    chosen = next((n for n in ("logits", "probabilities") if n in names), None)
    if chosen is None:
        raise BadInput(f"the ONNX model has outputs {names}; one output (logits or "
                       "probabilities, (n, number of labels)) is expected")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    keep = [o for o in out.graph.output if o.name == chosen]
    del out.graph.output[:]
    out.graph.output.extend(keep)
    return out


def _rename_output(proto: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    if any(new in (*n.input, *n.output) for n in proto.graph.node) or \
            any(t.name == new for t in proto.graph.initializer):
        raise ConversionError(f"the model already has a tensor named {new!r} that is not "
                              "its output")
    rename_output(proto, old, new)


def _append_log(proto: onnx.ModelProto) -> None:
    """``logits = Log(Max(probabilities, LOG_FLOOR))`` after the output."""
    out = proto.graph.output[0]
    raw = "passerelle/probabilities"
    for node in proto.graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
        node.input[:] = [raw if i == out.name else i for i in node.input]
    floor = "passerelle/log_floor"
    proto.graph.initializer.append(
        numpy_helper.from_array(np.array(LOG_FLOOR, np.float32), floor))
    proto.graph.node.extend([
        helper.make_node("Max", [raw, floor], ["passerelle/floored"], name="passerelle/Max"),
        helper.make_node("Log", ["passerelle/floored"], [out.name], name="passerelle/Log"),
    ])


def output_width(proto: onnx.ModelProto) -> int | None:
    """The second dimension of the one output, if the graph states it."""
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value"):
        return int(dims[1].dim_value)
    return None


@dataclass(frozen=True)
class Signature:
    """What a source model takes and gives, read from the model itself."""

    input_dtype: str  # numpy dtype name of the input
    input_width: int | None  # max_len (token ids) or vocabulary size (bag of words)
    output_width: int | None  # number of labels
    probabilities: bool  # the last operation is a softmax (scores are probabilities)
    name: str  # the model's own name, for the architecture line


def signature_of(model: Any, framework: str) -> Signature:
    """Input dtype and width, output width of a loaded source model (BadInput if it has
    not exactly one input and one output)."""
    kind = Framework(framework)
    if kind is Framework.KERAS:
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise BadInput("the Keras model must have one input and one output")
        shape_in, shape_out = model.inputs[0].shape, model.outputs[0].shape
        activation = getattr(model.layers[-1], "activation", None)
        return Signature(str(model.inputs[0].dtype.name), _dim(shape_in), _dim(shape_out),
                         getattr(activation, "__name__", "") == "softmax",
                         str(getattr(model, "name", "")))
    if kind is Framework.SKLEARN:
        classes = getattr(model, "classes_", None)
        return Signature("float32", getattr(model, "n_features_in_", None),
                         None if classes is None else len(classes),
                         not hasattr(model, "decision_function"), type(model).__name__)
    proto = _one_output(model)
    init = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in init]
    if len(inputs) != 1:
        raise BadInput(f"the ONNX model has {len(inputs)} inputs; one is expected")
    tensor = inputs[0].type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    dims = tensor.shape.dim
    width = int(dims[1].dim_value) if len(dims) == 2 and dims[1].HasField("dim_value") \
        else None
    out = proto.graph.output[0].name
    last = next((n for n in proto.graph.node if out in n.output), None)
    return Signature(dtype, width, output_width(proto),
                     last is not None and last.op_type == "Softmax", proto.graph.name)


def _dim(shape: Any) -> int | None:
    dims = list(shape)
    return int(dims[1]) if len(dims) == 2 and dims[1] is not None else None
