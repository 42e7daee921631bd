"""New output codes at the receiving site (``finetune --add-codes FILE``).

The codes come from a public list, never from the site's data (which codes a site has is
data about its patients): FILE names CIM-10 codes (a JSON list of strings, or one code a
line; blank lines and ``#`` comments are skipped), each checked against the public
CIM-10 table that ships with the corpus package (:mod:`passerelle.corpus.codes`).

:func:`extend_output` adds one output column per new code to the layer that produces
``logits``:

* an ``ai.onnx.ml`` ``LinearClassifier`` (scikit-learn linear models): zero coefficient
  rows, intercept = the smallest existing intercept, class labels ``n .. n+k-1``;
* ``Add(MatMul(h, W), b)`` or ``Gemm(h, W, b)`` with W and b initializers (Keras
  Dense through tf2onnx): zero columns of W, bias = the smallest existing bias.

Zero weights and the smallest bias make a new code's logit, before training, the smallest
old bias on every stay (improbable), and leave the old columns as they were;
:func:`check_old_columns` checks that in onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from passerelle.corpus.codes import ASSOCIATED_BY_CODE, DIAGNOSIS_BY_CODE
from passerelle.errors import BadInput, ParityError

MAX_NEW_CODES = 500
MAX_FILE_BYTES = 1 << 20
OUTPUT = "logits"


def public_cim10() -> dict[str, str]:
    """The public CIM-10 table shipped with the corpus package: code -> French label."""
    table = {c: d.label for c, d in DIAGNOSIS_BY_CODE.items()}
    table.update({c: a.label for c, a in ASSOCIATED_BY_CODE.items() if c not in table})
    return table


@dataclass(frozen=True)
class CodeAddition:
    """Codes added to the output layer, in column order, and the digest of their file."""

    codes: tuple[str, ...]
    labels: tuple[str, ...]
    file_digest: str  # sha256 of FILE's bytes

    def __post_init__(self) -> None:
        if not self.codes or len(self.codes) != len(self.labels):
            raise BadInput("an addition needs at least one code, each with its label")


def read_code_list(path: Path, known: tuple[str, ...]) -> CodeAddition:
    """FILE's codes, each a public CIM-10 code the model does not have yet (else exit 2)."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise BadInput(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read the code list: {e}") from e
    codes = _parse(path, text)
    table = public_cim10()
    unknown = [c for c in codes if c not in table]
    if unknown:
        raise BadInput(f"{path}: not in the public CIM-10 table: {', '.join(unknown[:5])}"
                       + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    dupes = sorted({c for c in codes if codes.count(c) > 1})
    if dupes:
        raise BadInput(f"{path}: listed twice: {', '.join(dupes)}")
    present = [c for c in codes if c in set(known)]
    if present:
        raise BadInput(f"{path}: already in the model's label table: {', '.join(present)}")
    if len(codes) > MAX_NEW_CODES:
        raise BadInput(f"{path}: {len(codes)} codes, at most {MAX_NEW_CODES}")
    return CodeAddition(tuple(codes), tuple(table[c] for c in codes),
                        "sha256:" + hashlib.sha256(raw).hexdigest())


def _parse(path: Path, text: str) -> list[str]:
    if text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise BadInput(f"{path}: not a JSON list: {e}") from e
        if not isinstance(doc, list) or not all(isinstance(c, str) for c in doc):
            raise BadInput(f"{path}: a JSON code list is a list of strings")
        codes = [c.strip() for c in doc]
    else:
        codes = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        codes = [c for c in codes if c]
    if not codes:
        raise BadInput(f"{path}: no code listed")
    return codes


def extend_output(proto: onnx.ModelProto, n_old: int, n_new: int) -> onnx.ModelProto:
    """A copy of ``proto`` whose ``logits`` have ``n_new`` more columns (see the module
    docstring); refused (exit 2) for an output layer of another shape."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    producer = _producer(graph, OUTPUT)
    if producer.domain == "ai.onnx.ml" and producer.op_type == "LinearClassifier":
        _extend_linear_classifier(producer, n_old, n_new)
    elif producer.op_type in ("Add", "Gemm") and not producer.domain:
        _extend_dense(graph, producer, n_old, n_new)
    else:
        raise BadInput(f"--add-codes: the output layer is a {producer.op_type} node; only a "
                       "LinearClassifier, Gemm or MatMul+Add output layer can be extended")
    for out in graph.output:
        if out.name == OUTPUT:
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 2:
                dims[1].Clear()
                dims[1].dim_value = n_old + n_new
    touched = {OUTPUT, *producer.input}
    kept = [v for v in graph.value_info if v.name not in touched]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BadInput(f"--add-codes: the extended graph is invalid: {e}") from e
    return model


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    """The node writing ``name``, looking through Identity nodes."""
    by_output = {o: n for n in graph.node for o in n.output}
    node = by_output.get(name)
    while node is not None and node.op_type == "Identity" and not node.domain:
        node = by_output.get(node.input[0])
    if node is None:
        raise BadInput(f"--add-codes: no node produces {name!r}")
    found: onnx.NodeProto = node
    return found


def _extend_linear_classifier(node: onnx.NodeProto, n_old: int, n_new: int) -> None:
    attrs = {a.name: a for a in node.attribute}
    if "classlabels_ints" not in attrs or list(attrs["classlabels_ints"].ints) != list(
            range(n_old)):
        raise BadInput("--add-codes: the LinearClassifier's class labels are not 0..n-1")
    coef = list(attrs["coefficients"].floats)
    if n_old < 3 or len(coef) % n_old:
        raise BadInput("--add-codes: a binary or malformed LinearClassifier cannot be "
                       "extended")
    features = len(coef) // n_old
    attrs["coefficients"].floats.extend([0.0] * (features * n_new))
    if "intercepts" in attrs:
        low = min(attrs["intercepts"].floats)
        attrs["intercepts"].floats.extend([low] * n_new)
    attrs["classlabels_ints"].ints.extend(range(n_old, n_old + n_new))


def _extend_dense(graph: onnx.GraphProto, node: onnx.NodeProto, n_old: int,
                  n_new: int) -> None:
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w_name = node.input[1]
        b_name = node.input[2] if len(node.input) > 2 else ""
        w_axis = 0 if attrs.get("transB", 0) else 1
    else:
        b_name = next((i for i in node.input if i in inits), "")
        other = next((i for i in node.input if i != b_name), "")
        matmul = _producer(graph, other) if other else None
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in inits:
            raise BadInput("--add-codes: the output Add does not follow a MatMul by a weight")
        w_name, w_axis = matmul.input[1], 1
    if w_name not in inits or not b_name:
        raise BadInput("--add-codes: the output layer's weight and bias must be initializers")
    for name in (w_name, b_name):
        if users.get(name, 0) != 1:
            raise BadInput(f"--add-codes: {name!r} is used by several nodes (tied weights)")
    w = numpy_helper.to_array(inits[w_name])
    b = numpy_helper.to_array(inits[b_name])
    if w.ndim != 2 or w.shape[w_axis] != n_old or b.shape[-1:] != (n_old,):
        raise BadInput(f"--add-codes: output weight {w.shape} / bias {b.shape} do not have "
                       f"{n_old} columns")
    pad = [(0, 0), (0, 0)]
    pad[w_axis] = (0, n_new)
    _replace(inits[w_name], np.pad(w, pad))
    low = b.min()
    b_pad = [(0, 0)] * (b.ndim - 1) + [(0, n_new)]
    _replace(inits[b_name], np.pad(b, b_pad, constant_values=low))


def _replace(tensor: onnx.TensorProto, value: npt.NDArray[Any]) -> None:
    new = numpy_helper.from_array(value.astype(numpy_helper.to_array(tensor).dtype),
                                  tensor.name)
    tensor.CopyFrom(new)


def check_old_columns(old: npt.NDArray[np.float32], new: npt.NDArray[np.float32],
                      n_new: int, tolerance: float) -> float:
    """Max |difference| of the old columns before/after the extension (ParityError above
    ``tolerance``); the new logits have exactly ``n_new`` more columns."""
    if new.shape != (old.shape[0], old.shape[1] + n_new):
        raise ParityError(f"extended logits have shape {new.shape}, expected "
                          f"{(old.shape[0], old.shape[1] + n_new)}")
    diff = float(np.max(np.abs(old.astype(np.float64) - new[:, :old.shape[1]])))
    if not diff <= tolerance:
        raise ParityError(f"--add-codes changed the old codes' logits by {diff:.2e}")
    return diff
