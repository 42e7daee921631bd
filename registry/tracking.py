"""What a user sees in MLflow: model signatures, figures as metrics, run names that say
what happened.

* Every version's source directory gets an ``MLmodel`` file whose signature gives the
  input and output schema (tensor name, dtype, shape), read from the ONNX graph or, for a
  source model directory, from its metadata and vocabulary. MLflow's UI shows it on the
  version page. It is written only into MLflow's copy; the model directory, its digest
  and everything shipped are unchanged.
* Figures (accuracy, parity, AUC and epsilon bound per attack, DP epsilon and delta) are
  logged as metrics of the version's run, so they can be charted and compared, beside
  the ``passerelle.*`` tags that the ledger's digests refer to.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

MLMODEL = "MLmodel"


def _spec(name: str, dtype: Any, shape: tuple[int, ...]) -> Any:
    import numpy as np
    from mlflow.types.schema import TensorSpec

    return TensorSpec(np.dtype(dtype), shape, name)


def _varint(f: BinaryIO) -> int:
    value = 0
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            raise ValueError("truncated ONNX file")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
    raise ValueError("varint too long")


def _fields(f: BinaryIO, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, offset of its bytes, length) of the length-delimited fields of the
    message that ends at ``end``; every other field is skipped unread."""
    while f.tell() < end:
        key = _varint(f)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _varint(f)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            length = _varint(f)
            start = f.tell()
            if start + length > end:
                raise ValueError("a field runs past its message")
            yield field, start, length
            f.seek(start + length)
        else:
            raise ValueError(f"wire type {wire}")


def _graph_io(path: Path) -> tuple[list[Any], list[Any], set[str]]:
    """The graph's inputs, outputs and initializer names, read from the protobuf wire
    format without decoding any weight: a 1 GiB model costs a few kB of memory (field
    numbers from onnx.proto: ModelProto.graph 7; GraphProto.initializer 5, input 11,
    output 12; TensorProto.name 8)."""
    import onnx

    inputs: list[Any] = []
    outputs: list[Any] = []
    initializers: set[str] = set()
    size = path.stat().st_size
    with path.open("rb") as f:
        graph = next(((s, n) for field, s, n in _fields(f, size) if field == 7), None)
        if graph is None:
            raise ValueError("no graph")
        f.seek(graph[0])
        for field, start, length in list(_fields(f, graph[0] + graph[1])):
            if field in (11, 12):
                f.seek(start)
                value = onnx.ValueInfoProto.FromString(f.read(length))
                (inputs if field == 11 else outputs).append(value)
            elif field == 5:
                f.seek(start)
                for sub, s, n in _fields(f, start + length):
                    if sub == 8:
                        f.seek(s)
                        initializers.add(f.read(n).decode("utf-8", "replace"))
    return inputs, outputs, initializers


def _onnx_signature(path: Path) -> Any:
    import onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema

    graph_inputs, graph_outputs, initializers = _graph_io(path)

    def specs(values: Any) -> Any:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(_spec(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), shape))
        return Schema(out)

    inputs = [i for i in graph_inputs if i.name not in initializers]
    if not inputs or not graph_outputs:
        return None  # MLflow's schema cannot say "no input"
    return ModelSignature(inputs=specs(inputs), outputs=specs(graph_outputs))


def _model_dir_signature(path: Path) -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema

    meta = json.loads((path / "passerelle-model.json").read_text(encoding="utf-8"))
    vocab = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
    if meta.get("input_kind") == "bag_of_words":
        first = _spec("bag_of_words", "float32", (-1, len(vocab["tokens"])))
    else:
        first = _spec("token_ids", "int32", (-1, int(vocab["config"]["max_len"])))
    return ModelSignature(inputs=Schema([first]),
                          outputs=Schema([_spec("logits", "float32",
                                                (-1, len(meta["codes"])))]))


def model_signature(local_dir: Path) -> Any | None:
    """The input/output schema of the model in ``local_dir`` (ONNX or a source model
    directory), or None when it cannot be read."""
    try:
        if (local_dir / "model.onnx").is_file():
            return _onnx_signature(local_dir / "model.onnx")
        if (local_dir / "passerelle-model.json").is_file():
            return _model_dir_signature(local_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def log_signature(client: Any, run_id: str, local_dir: Path, artifact_path: str,
                  description: str) -> None:
    """Log an ``MLmodel`` file with the model's signature beside its files in MLflow."""
    from mlflow.models import Model

    signature = model_signature(local_dir)
    if signature is None or (local_dir / MLMODEL).exists():
        return
    with tempfile.TemporaryDirectory(prefix=".mlmodel-") as tmp:
        Model(artifact_path=artifact_path, run_id=run_id, signature=signature,
              metadata={"passerelle": description}).save(str(Path(tmp) / MLMODEL))
        client.log_artifact(run_id, str(Path(tmp) / MLMODEL), artifact_path)


def accuracy_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``accuracy.<split>.<site>.top1`` etc. from a model directory's metrics."""
    out: dict[str, float] = {}
    for row in metrics.get("accuracy") or []:
        if not isinstance(row, dict):
            continue
        prefix = f"accuracy.{row.get('split')}.{row.get('site')}"
        for key in ("top1", "top5", "label_coverage"):
            if isinstance(row.get(key), int | float):
                out[f"{prefix}.{key}"] = float(row[key])
    return out


def audit_metrics(result: Any) -> dict[str, float]:
    """Per attack: AUC, TPR at 0.1 % and 1 % FPR, the epsilon lower bound; the worst
    canary exposure; the verdict as 1 (PASS) or 0."""
    out: dict[str, float] = {"audit.pass": 1.0 if result.verdict == "PASS" else 0.0}
    for name, m in result.attacks.items():
        out[f"audit.{name}.auc"] = float(m.auc)
        for fpr, tpr in m.tpr_at_fpr.items():
            out[f"audit.{name}.tpr_at_fpr_{fpr:g}"] = float(tpr)
        out[f"audit.{name}.epsilon_lower_bound"] = float(m.epsilon.epsilon_lower)
    if result.canaries:
        out["audit.canaries.max_exposure_bits"] = max(float(c.exposure_bits)
                                                      for c in result.canaries)
    return out


def finetune_metrics(result: Any) -> dict[str, float]:
    """A DP fine-tuning run's privacy and accuracy figures."""
    return {"dp.epsilon_pld": float(result.epsilon_pld),
            "dp.epsilon_rdp": float(result.epsilon_rdp), "dp.delta": float(result.delta),
            "dp.noise_multiplier": float(result.noise_multiplier),
            "dp.sampling_rate": float(result.sampling_rate), "dp.steps": float(result.steps),
            "dp.budget_spent_epsilon": float(result.budget.epsilon),
            "accuracy.heldout.before": float(result.accuracy_before),
            "accuracy.heldout.after": float(result.accuracy_after)}


def export_metrics(parity: Any) -> dict[str, float]:
    return {"onnx.parity_max_abs_diff": float(parity.max_abs_diff),
            "onnx.parity_top1_agreement": float(parity.top1_agreement),
            "onnx.parity_inputs": float(parity.inputs)}


def run_name(name: str, tags: Mapping[str, str], prefix: str) -> str:
    """A run name that says what happened (received from whom, fine-tuned under DP)."""
    source = tags.get(prefix + "finetuned_from")
    if source:
        try:  # rounded up: a name never shows a smaller epsilon than was spent
            eps = f"{math.ceil(float(tags[prefix + 'finetune.epsilon_pld']) * 1000) / 1000:g}"
        except (KeyError, ValueError):
            eps = "?"
        unit = tags.get(prefix + "finetune.privacy_unit", "?")
        return f"finetune {source} under DP (epsilon {eps}, per {unit})"
    sender = tags.get(prefix + "received_from")
    if sender:
        return (f"receive {tags.get(prefix + 'source_model', name)}/"
                f"{tags.get(prefix + 'source_version', '?')} from {sender}")
    return f"register {name}"
