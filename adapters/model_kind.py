"""What a received ONNX model takes and what of it can train (read from the graph itself).

* :func:`refuse_untrainable`: tree ensembles (ai.onnx.ml ``TreeEnsemble*``) and graphs
  without any float weight are refused: gradient-based DP-SGD does not apply to them.
* :func:`input_kind_of`: token ids or bag of words, from the graph's input type (int or
  float) and width; the model card's ``preprocessing.input_kind``, when the card ships,
  must agree (a card that says otherwise is refused, never believed).
* :func:`encode`: the stays' texts as the model reads them, with the vocabulary's own
  encoders (:meth:`Vocabulary.encode`, :meth:`Vocabulary.bag_of_words`).
* :func:`default_trainable`: the built-in coder's ``hidden`` and ``logits`` layers when
  the graph has them, else every float weight (for a linear model: its coefficients and
  intercepts).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnx

from adapters.onnx_tf import parameter_groups
from passerelle.contract import InputKind
from passerelle.errors import BadInput
from passerelle.vocabulary import Vocabulary

DEFAULT_LAYERS = ("hidden", "logits")
_INT_TYPES = frozenset({onnx.TensorProto.INT32, onnx.TensorProto.INT64})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE})


class NotGradientTrainable(BadInput):
    """The model has no weight a gradient can move (tree ensembles, constant graphs)."""


def refuse_untrainable(proto: onnx.ModelProto) -> None:
    """Tree ensembles and graphs with no float weight: refused (exit 2)."""
    trees = sorted({n.op_type for n in proto.graph.node if n.op_type.startswith("TreeEnsemble")})
    if trees:
        raise NotGradientTrainable(
            f"the model is a tree ensemble (ai.onnx.ml {', '.join(trees)}): gradient-based "
            "DP-SGD does not apply to tree ensembles; it cannot be fine-tuned")
    if not parameter_groups(proto):
        raise NotGradientTrainable(
            "the model has no trainable float weight: gradient-based DP-SGD does not apply "
            "to it (tree ensembles and constant graphs cannot be fine-tuned)")


def _graph_input(proto: onnx.ModelProto) -> onnx.ValueInfoProto:
    init = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in init]
    if len(inputs) != 1:
        raise BadInput(f"the model has {len(inputs)} inputs; fine-tuning feeds one "
                       "(token ids or bag of words)")
    value: onnx.ValueInfoProto = inputs[0]
    return value


def input_kind_of(proto: onnx.ModelProto, vocab: Vocabulary,
                  card: Path | None = None) -> InputKind:
    """Token ids (int input of width max_len) or bag of words (float input of width
    len(vocab)), from the graph; a shipped model card must say the same."""
    value = _graph_input(proto)
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type in _INT_TYPES:
        kind, width = InputKind.TOKEN_IDS, vocab.config.max_len
    elif tensor.elem_type in _FLOAT_TYPES:
        kind, width = InputKind.BAG_OF_WORDS, len(vocab)
    else:
        raise BadInput(f"input {value.name!r} of type "
                       f"{onnx.helper.tensor_dtype_to_string(tensor.elem_type)}: neither "
                       "token ids (int) nor a bag of words (float)")
    if len(dims) != 2 or dims[1] not in (None, width):
        raise BadInput(f"input {value.name!r} has shape {dims}; {kind.value} of this "
                       f"vocabulary is (batch, {width})")
    declared = _card_input_kind(card)
    if declared is not None and declared != kind.value:
        raise BadInput(f"the model card says input_kind {declared!r} but the graph takes "
                       f"{kind.value}")
    return kind


def _card_input_kind(card: Path | None, key: str = "input_kind") -> str | None:
    if card is None or not card.is_file():
        return None
    try:
        doc = json.loads(card.read_text(encoding="utf-8"))
        value = doc.get("preprocessing", {}).get(key)
    except (OSError, ValueError, AttributeError) as e:
        raise BadInput(f"{card.name}: unreadable model card: {e}") from e
    return None if value is None else str(value)


_DTYPES: dict[int, str] = {onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64",
           onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}


def input_dtype_of(proto: onnx.ModelProto, card: Path | None = None) -> str:
    """The numpy dtype of the graph's input (int64 for a PyTorch export's token ids); a
    shipped model card's ``preprocessing.input_dtype`` must say the same."""
    value = _graph_input(proto)
    dtype = _DTYPES.get(int(value.type.tensor_type.elem_type))
    if dtype is None:
        raise BadInput(f"input {value.name!r}: unsupported element type")
    declared = _card_input_kind(card, "input_dtype")
    if declared is not None and declared != dtype:
        raise BadInput(f"the model card says input_dtype {declared!r} but the graph takes "
                       f"{dtype}")
    return dtype


def encode(kind: InputKind, vocab: Vocabulary, texts: Sequence[str],
           dtype: str | None = None) -> npt.NDArray[Any]:
    """Texts as the model was trained on them (the vocabulary's encoders), in the graph's
    input dtype (``dtype``; default int32 ids, float32 frequencies)."""
    out = vocab.bag_of_words(texts) if kind is InputKind.BAG_OF_WORDS else vocab.encode(texts)
    return out if dtype is None else out.astype(dtype)


def default_trainable(proto: onnx.ModelProto) -> tuple[str, ...]:
    """``hidden``/``logits`` layers when present (the built-in coder), else every group."""
    groups = parameter_groups(proto)
    short = {g.rsplit("/", 1)[-1] for g in groups}
    present = tuple(n for n in DEFAULT_LAYERS if n in short or n in groups)
    return present or tuple(groups)


def weight_names(proto: onnx.ModelProto) -> list[str]:
    """Every float weight of the graph (what ``--trainable`` may name, with groups)."""
    return [w for names in parameter_groups(proto).values() for w in names]

