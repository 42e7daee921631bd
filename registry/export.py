"""The one path from a registered version to its shippable ONNX, and the export gate.

The ONNX was converted once, at registration (registry.intake), from the source model,
and checked there against the source model's own logits on stays Passerelle encoded.
:func:`shippable` (used by export, audit and bundle) checks the registered model
directory and re-runs that parity with onnxruntime; it never loads a source framework.

``export_version`` then passes the gate and moves the shippable directory into place
atomically. Any failure leaves neither a partial output directory nor anything new on
the model version.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from adapters.onnx_export import OPSET
from adapters.onnx_run import PARITY_TOLERANCE as PARITY_TOLERANCE
from adapters.onnx_run import run_onnx as run_onnx
from passerelle import __version__
from passerelle.digests import sha256_bytes, sha256_file
from passerelle.errors import BadInput, GateRefused, ModelDirError, ParityError
from registry.model_dir import (
    FORMAT_VERSION,
    LABELS,
    ONNX_MODEL,
    PARITY_INPUTS,
    PARITY_REFERENCE,
    VOCABULARY,
    ModelDir,
    open_model_dir,
    read_labels,
)
from registry.store import TAG, ModelStore, VersionInfo, VersionRef
from registry.tracking import export_metrics
from registry.vocabulary import Vocabulary

ONNX_FILE = ONNX_MODEL
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
    model_dir: ModelDir | None = None  # the registered model directory it was checked against


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


@dataclass(frozen=True)
class Registered:
    """Steps 1-3 of :func:`shippable`: the version, its checked model directory, its ONNX
    bytes and their parity with the registered reference."""

    info: VersionInfo
    model_dir: ModelDir
    model_bytes: bytes
    parity: Parity


def registered_model(store: ModelStore, ref: VersionRef, workdir: Path) -> Registered:
    """Steps 1-3 of :func:`shippable`, which change nothing in the registry (the audit
    checks its inputs against the model directory before anything is logged)."""
    info = store.get(ref)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = fetch_model_dir(store, info, workdir / "source")                   # (1)
    model_bytes = (model_dir.path / ONNX_FILE).read_bytes()
    if sha256_bytes(model_bytes) != model_dir.metadata.onnx_digest:                 # (2)
        raise ModelDirError(f"{ref}: model.onnx does not match the registered onnx_digest")
    parity = registered_parity(ref, model_dir, model_bytes)                         # (3)
    return Registered(info, model_dir, model_bytes, parity)


def shippable(store: ModelStore, ref: VersionRef, workdir: Path,
              registered: Registered | None = None) -> OnnxExport:
    """The one path from a registered version to its shippable ONNX directory.

    1. the version's model directory: its digest is the one recorded at registration
       and every file matches the digest its metadata lists (:func:`fetch_model_dir`);
    2. its ``model.onnx`` is the ONNX converted at registration (the metadata's
       ``onnx_digest``);
    3. onnxruntime on the registered parity inputs gives the registered parity
       reference (the source model's logits): max |diff| <= 1e-4, identical top-1;
    4. the first time, the shippable directory (model.onnx, vocabulary, labels, model
       card) is written and logged on the version as ``onnx``; later, the logged one is
       used only if its model.onnx, vocabulary and labels are byte for byte the model
       directory's: bytes written into the registry by hand are refused.

    No source framework is loaded: the conversion happened once, at registration.
    ``registered``: steps 1-3 already done by :func:`registered_model` (not repeated)."""
    r = registered if registered is not None else registered_model(store, ref, workdir)
    info, model_dir, model_bytes, parity = r.info, r.model_dir, r.model_bytes, r.parity
    onnx_digest = sha256_bytes(model_bytes)
    logged = info.tags.get(TAG + "onnx_digest")                                     # (4)
    if logged is None:
        return replace(_ship(store, info, model_dir, model_bytes, parity, workdir / "ship"),
                       model_dir=model_dir)
    directory = store.download(info, "onnx", workdir)
    missing = [n for n in SHIPPED_FILES if not (directory / n).is_file()]
    if missing:
        raise ModelDirError(f"{ref}: the logged ONNX export is incomplete (no "
                            f"{', '.join(missing)})")
    if logged != onnx_digest or sha256_file(directory / ONNX_FILE) != onnx_digest:
        raise ModelDirError(f"{ref}: the logged ONNX export is not the model registered "
                            "(its model.onnx differs from the model directory's): bytes "
                            "written into the registry by hand are refused")
    for name in (VOCABULARY, LABELS):
        if sha256_file(directory / name) != model_dir.metadata.files[name]:
            raise ModelDirError(f"{ref}: the logged export's {name} differs from the "
                                "registered model directory's: refused")
    try:
        card = json.loads((directory / CARD_FILE).read_text(encoding="utf-8"))
        card_digest = card["onnx"]["digest"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelDirError(f"{ref}: the logged model card is unreadable: {e}") from e
    if card_digest != onnx_digest:
        raise ModelDirError(f"{ref}: the logged model card speaks of other ONNX bytes")
    return OnnxExport(ref=ref, directory=directory, onnx_digest=onnx_digest, parity=parity,
                      card=card, model_dir=model_dir)


def registered_parity(ref: VersionRef, model_dir: ModelDir, model_bytes: bytes) -> Parity:
    """onnxruntime on the registered parity inputs against the registered reference."""
    try:
        inputs = np.load(model_dir.path / PARITY_INPUTS, allow_pickle=False)
        reference = np.load(model_dir.path / PARITY_REFERENCE, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{ref}: the registered parity files cannot be read: {e}") from e
    parity = check_parity(np.asarray(reference, np.float32), run_onnx(model_bytes, inputs))
    if not parity.passed:
        raise ParityError(
            f"{ref}: ONNX parity failed on {parity.inputs} held-out inputs: max |logit diff| "
            f"{parity.max_abs_diff:.3g} (limit {parity.tolerance:g}), top-1 agreement "
            f"{parity.top1_agreement:.2%} (must be 100%)"
        )
    return parity


def _ship(store: ModelStore, info: VersionInfo, model_dir: ModelDir, model_bytes: bytes,
          parity: Parity, ship: Path) -> OnnxExport:
    """Write the shippable directory and log it, with tags, on the version."""
    proto = onnx.load_from_string(model_bytes)
    labels = read_labels(model_dir)
    ship.mkdir()
    (ship / ONNX_FILE).write_bytes(model_bytes)
    shutil.copyfile(model_dir.path / VOCABULARY, ship / VOCABULARY)
    shutil.copyfile(model_dir.path / LABELS, ship / LABELS)
    onnx_digest = sha256_file(ship / ONNX_FILE)
    card = model_card(info, model_dir, proto, parity, onnx_digest, labels, ship)
    (ship / CARD_FILE).write_text(json.dumps(card, ensure_ascii=False, indent=1) + "\n")
    store.attach(info, ship, "onnx", {
        TAG + "onnx_digest": onnx_digest,
        TAG + "onnx_opset": str(_opset(proto)),
        TAG + "parity_max_abs_diff": f"{parity.max_abs_diff:.6g}",
        TAG + "parity_top1_agreement": f"{parity.top1_agreement:.6g}",
        TAG + "parity_inputs": str(parity.inputs),
    })
    store.log_metrics(info.ref, export_metrics(parity))
    return OnnxExport(ref=info.ref, directory=ship, onnx_digest=onnx_digest, parity=parity,
                      card=card)


def _opset(proto: onnx.ModelProto) -> int:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                OPSET)


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
    try:
        model_dir = open_model_dir(path, version=FORMAT_VERSION)
    except ModelDirError as e:
        raise ModelDirError(f"{info.ref}: {e} (a version registered before model "
                            "directory v2: register it again)") from e
    expected = info.tags.get(TAG + "model_dir_digest")
    if expected != model_dir.digest:
        raise ModelDirError(
            f"{info.ref}: the stored model directory does not match the digest recorded at "
            "registration"
        )
    return model_dir


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
    vocab = Vocabulary.load(ship / VOCABULARY)
    return {
        "format": "passerelle-model-card",
        "format_version": 1,
        "model": {"name": info.ref.name, "version": info.ref.version,
                  "architecture": meta.architecture, "source_framework": meta.framework.value,
                  "source": meta.source.get("kind", "")},
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
            "sections_read": list(vocab.config.sections),
            "vocabulary": {k: v for k, v in asdict(vocab.config).items() if k != "sections"},
            "input_kind": meta.input_kind.value,
            "input_dtype": meta.dtype.value,
        },
        "onnx": {
            "file": ONNX_FILE, "digest": onnx_digest, "opset": _opset(proto),
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
