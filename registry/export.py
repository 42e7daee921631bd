"""ONNX export of a registered model version, with a numerical parity check.

Steps (``convert_version``):

1. fetch the version's model directory from the registry and verify every file's
   digest and the directory digest recorded on the version at registration;
2. load the source-framework model and convert it (adapters.onnx_export);
3. ``onnx.checker.check_model(full_check=True)``;
4. parity: source framework and onnxruntime on held-out inputs must agree to
   ``max |logit difference| <= PARITY_TOLERANCE`` with identical top-1 on every input;
5. write the shippable directory (model.onnx, vocabulary.json, labels.json,
   model_card.json) and log it, with tags, on the same model version.

``export_version`` then moves that directory into place atomically. Any failure
leaves neither a partial output directory nor anything new on the model version.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from adapters.onnx_export import OPSET, keras_to_onnx, sklearn_to_onnx
from adapters.onnx_run import PARITY_TOLERANCE as PARITY_TOLERANCE
from adapters.onnx_run import run_onnx as run_onnx
from passerelle import __version__
from passerelle.digests import sha256_file
from passerelle.errors import BadInput, ConversionError, GateRefused, ModelDirError, ParityError
from registry.coder import Architecture, bag_of_words, load_source_model, source_logits
from registry.model_dir import (
    LABELS,
    PARITY_INPUTS,
    VOCABULARY,
    Framework,
    InputKind,
    ModelDir,
    open_model_dir,
    read_labels,
)
from registry.store import TAG, ModelStore, VersionInfo, VersionRef
from registry.tracking import export_metrics
from registry.vocabulary import Vocabulary

ONNX_FILE = "model.onnx"
CARD_FILE = "model_card.json"
SHIPPED_FILES = (ONNX_FILE, VOCABULARY, LABELS, CARD_FILE)


@dataclass(frozen=True)
class Parity:
    inputs: int
    max_abs_diff: float
    top1_agreement: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agreement == 1.0


@dataclass(frozen=True)
class OnnxExport:
    ref: VersionRef
    directory: Path  # the shippable directory (a temporary one until moved)
    onnx_digest: str
    parity: Parity
    card: dict[str, Any]


def check_parity(
    source: npt.NDArray[np.float32], onnx_out: npt.NDArray[np.float32],
    tolerance: float = PARITY_TOLERANCE,
) -> Parity:
    """Compare two logit matrices of the same shape."""
    if source.shape != onnx_out.shape:
        raise ParityError(f"output shapes differ: source {source.shape}, onnx {onnx_out.shape}")
    return Parity(
        inputs=int(source.shape[0]),
        max_abs_diff=float(np.max(np.abs(source.astype(np.float64) - onnx_out))),
        top1_agreement=float(np.mean(source.argmax(axis=1) == onnx_out.argmax(axis=1))),
        tolerance=tolerance,
    )


def convert_version(store: ModelStore, ref: VersionRef, workdir: Path) -> OnnxExport:
    """Steps 1-5 above, in ``workdir``; returns the logged export."""
    info = store.get(ref)
    model_dir = fetch_model_dir(store, info, workdir / "source")
    architecture = Architecture(model_dir.metadata.architecture)
    vocab = Vocabulary.load(model_dir.path / VOCABULARY)
    labels = read_labels(model_dir)
    try:
        model = load_source_model(model_dir.model_file, model_dir.metadata.framework)
    except (OSError, ValueError, TypeError) as e:
        raise ModelDirError(f"{ref}: the source model cannot be loaded: {e}") from e
    proto = _convert(model, model_dir, vocab)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ConversionError(f"{ref}: onnx.checker refused the converted model: {e}") from e

    token_ids = np.load(model_dir.path / PARITY_INPUTS, allow_pickle=False)
    onnx_in = (bag_of_words(token_ids, len(vocab))
               if model_dir.metadata.input_kind is InputKind.BAG_OF_WORDS else token_ids)
    model_bytes = proto.SerializeToString()
    parity = check_parity(source_logits(model, architecture, vocab, token_ids),
                          run_onnx(model_bytes, onnx_in))
    if not parity.passed:
        raise ParityError(
            f"{ref}: ONNX parity failed on {parity.inputs} held-out inputs: max |logit diff| "
            f"{parity.max_abs_diff:.3g} (limit {parity.tolerance:g}), top-1 agreement "
            f"{parity.top1_agreement:.2%} (must be 100%)"
        )

    ship = workdir / "ship"
    ship.mkdir()
    (ship / ONNX_FILE).write_bytes(model_bytes)
    shutil.copyfile(model_dir.path / VOCABULARY, ship / VOCABULARY)
    shutil.copyfile(model_dir.path / LABELS, ship / LABELS)
    onnx_digest = sha256_file(ship / ONNX_FILE)
    card = model_card(info, model_dir, proto, parity, onnx_digest, labels, ship)
    (ship / CARD_FILE).write_text(json.dumps(card, ensure_ascii=False, indent=1) + "\n")
    store.attach(info, ship, "onnx", {
        TAG + "onnx_digest": onnx_digest,
        TAG + "onnx_opset": str(OPSET),
        TAG + "parity_max_abs_diff": f"{parity.max_abs_diff:.6g}",
        TAG + "parity_top1_agreement": f"{parity.top1_agreement:.6g}",
        TAG + "parity_inputs": str(parity.inputs),
    })
    store.log_metrics(ref, export_metrics(parity))
    return OnnxExport(ref=ref, directory=ship, onnx_digest=onnx_digest, parity=parity, card=card)


@dataclass(frozen=True)
class Override:
    """An export without a PASS verdict, on a named person's recorded responsibility."""

    approver: str
    justification: str

    def __post_init__(self) -> None:
        for name in ("approver", "justification"):
            value = getattr(self, name)
            if not value.strip() or "\n" in value or len(value) > 2000:
                raise BadInput(f"override {name} must be one non-empty line")


def shippable(store: ModelStore, ref: VersionRef, workdir: Path) -> OnnxExport:
    """The version's logged ONNX directory (digest re-checked), converting it first if needed."""
    info = store.get(ref)
    logged = info.tags.get(TAG + "onnx_digest")
    if logged is None:
        return convert_version(store, ref, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    directory = store.download(info, "onnx", workdir)
    missing = [n for n in SHIPPED_FILES if not (directory / n).is_file()]
    if missing or sha256_file(directory / ONNX_FILE) != logged:
        raise ModelDirError(f"{ref}: the logged ONNX export is incomplete or does not match "
                            f"its recorded digest")
    try:
        card = json.loads((directory / CARD_FILE).read_text(encoding="utf-8"))
        parity = Parity(**card["parity"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelDirError(f"{ref}: the logged model card is unreadable: {e}") from e
    return OnnxExport(ref=ref, directory=directory, onnx_digest=logged, parity=parity,
                      card=card)


def audit_passed(tags: Mapping[str, str], onnx_digest: str, pinned_policy: str) -> bool:
    """Whether the version's audit verdict is PASS for exactly these ONNX bytes, under the
    policy the site pins (registry.audit.policy.pinned_policy_digest)."""
    return (tags.get(TAG + "audit.verdict") == "PASS"
            and tags.get(TAG + "audit.onnx_digest") == onnx_digest
            and tags.get(TAG + "audit.policy_digest") == pinned_policy)


def gate_refusal(tags: Mapping[str, str], onnx_digest: str, pinned_policy: str) -> str:
    """Why the version's audit does not open the gate (for the error message)."""
    verdict = tags.get(TAG + "audit.verdict")
    if verdict is None:
        return "no audit"
    if tags.get(TAG + "audit.onnx_digest") != onnx_digest:
        return "its audit speaks of other ONNX bytes"
    if verdict != "PASS":
        return f"audit verdict {verdict}"
    return (f"its audit PASS is under policy {tags.get(TAG + 'audit.policy_digest')}, not "
            f"the site's pinned policy {pinned_policy} (audit.policy_sha256)")


def check_gate(store: ModelStore, export: OnnxExport, override: Override | None) -> str:
    """PASS verdict under the pinned policy for these exact ONNX bytes, or a recorded
    override; else Refused."""
    from registry.audit.policy import pinned_policy_digest

    info = store.get(export.ref)
    verdict = info.tags.get(TAG + "audit.verdict")
    pinned = pinned_policy_digest(store.home)
    if audit_passed(info.tags, export.onnx_digest, pinned):
        return "audit PASS"
    if override is None:
        why = gate_refusal(info.tags, export.onnx_digest, pinned)
        raise GateRefused(f"{export.ref} may not be exported: {why}; run 'passerelle model "
                          "audit' or give --override --approver NAME --justification TEXT")
    store.set_tags(info, {
        TAG + "export.override.approver": override.approver,
        TAG + "export.override.justification": override.justification,
        TAG + "export.override.time": datetime.now(UTC).isoformat(timespec="seconds"),
        TAG + "export.override.onnx_digest": export.onnx_digest,
        TAG + "export.override.verdict": verdict or "none",
    })
    return f"override by {override.approver}"


def export_version(store: ModelStore, ref: VersionRef, out_dir: Path,
                   override: Override | None = None,
                   before_publish: Callable[[OnnxExport, str], None] | None = None
                   ) -> OnnxExport:
    """Convert (or reuse the logged conversion), pass the gate, then move the shippable
    directory to ``out_dir`` atomically.

    ``before_publish(export, gate)`` runs after the gate passed and before the directory
    is moved into place (the ledger records the export there); if it raises, nothing is
    written."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadInput(f"{out_dir}: exists and is not an empty directory")
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise BadInput(f"{parent}: no such directory")
    with _workspace(parent) as work:
        export = shippable(store, ref, work / "onnx")
        gate = check_gate(store, export, override)
        if before_publish is not None:
            before_publish(export, gate)
        if out_dir.exists():
            out_dir.rmdir()
        export.directory.rename(out_dir)
    return OnnxExport(ref=export.ref, directory=out_dir, onnx_digest=export.onnx_digest,
                      parity=export.parity, card=export.card)


@contextmanager
def _workspace(parent: Path) -> Iterator[Path]:
    """A private temporary folder beside the destination, removed on every path."""
    path = Path(tempfile.mkdtemp(prefix=".passerelle-export-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fetch_model_dir(store: ModelStore, info: VersionInfo, dst: Path) -> ModelDir:
    dst.mkdir(parents=True)
    path = store.download(info, "model", dst)
    model_dir = open_model_dir(path)
    expected = info.tags.get(TAG + "model_dir_digest")
    if expected != model_dir.digest:
        raise ModelDirError(
            f"{info.ref}: the stored model directory does not match the digest recorded at "
            "registration"
        )
    return model_dir


def _convert(model: Any, model_dir: ModelDir, vocab: Vocabulary) -> onnx.ModelProto:
    if model_dir.metadata.framework is Framework.KERAS:
        return keras_to_onnx(model, vocab.config.max_len)
    return sklearn_to_onnx(model, len(vocab))


def model_card(
    info: VersionInfo,
    model_dir: ModelDir,
    proto: onnx.ModelProto,
    parity: Parity,
    onnx_digest: str,
    labels: dict[str, str],
    ship: Path,
) -> dict[str, Any]:
    """The model card shipped beside the ONNX file (JSON; no data, no identifiers)."""
    meta = model_dir.metadata
    tags = info.tags
    training = dict(meta.training)
    graph = proto.graph
    return {
        "format": "passerelle-model-card",
        "format_version": 1,
        "model": {"name": info.ref.name, "version": info.ref.version,
                  "architecture": meta.architecture, "source_framework": meta.framework.value},
        "task": "Main diagnosis (CIM-10) of a hospital stay from its discharge summary, "
                "for PMSI coding assistance. A coder reviews every suggestion.",
        "intended_use": tags.get(TAG + "purpose", ""),
        "provenance": {
            "legal_basis": tags.get(TAG + "legal_basis", ""),
            "data_controller": tags.get(TAG + "data_controller", ""),
            "training_site": tags.get(TAG + "training_site", ""),
            "privacy_unit": tags.get(TAG + "privacy_unit", ""),
            "dataset_fingerprint": tags.get(TAG + "dataset_fingerprint", ""),
            "train_stays": training.get("train_stays"),
            "train_patients": training.get("train_patients"),
        },
        "preprocessing": {
            "sections_read": list(Vocabulary.load(ship / VOCABULARY).config.sections),
            "vocabulary": {k: v for k, v in training.get("config", {})
                           .get("vocabulary", {}).items() if k != "sections"},
            "input_kind": meta.input_kind.value,
        },
        "onnx": {
            "file": ONNX_FILE, "digest": onnx_digest, "opset": OPSET,
            "inputs": [i.name for i in graph.input],
            "outputs": [o.name for o in graph.output],
            "operators": sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in graph.node}),
        },
        "labels": {"count": len(labels), "file": LABELS},
        "metrics": meta.metrics,
        "parity": asdict(parity),
        "files": {name: sha256_file(ship / name) for name in (ONNX_FILE, VOCABULARY, LABELS)},
        "created": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "passerelle_version": __version__,
        "limitations": [
            "Trained and evaluated on synthetic data in this demonstration.",
            "Accuracy drops at a site whose case mix and writing differ (see metrics).",
        ],
    }
