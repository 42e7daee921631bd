"""The source-side model directory: what ``model train`` writes and ``model register`` reads.

Layout (all files listed with their digests in ``passerelle-model.json``)::

    passerelle-model.json   metadata: framework, input, labels, training, metrics, files
    model.keras | model.skops   the source-framework model (Keras 2 / scikit-learn via skops)
    vocabulary.json         tokenizer and vocabulary (registry.vocabulary)
    labels.json             output index -> CIM-10 code and label
    parity_inputs.npy       token ids of held-out stays, for the export parity check

This directory stays at the source site: ``parity_inputs.npy`` is derived from held-out
patients' stays and never goes into an export. Only ONNX leaves (registry.export).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from passerelle.contract import LABELS as LABELS
from passerelle.contract import VOCABULARY as VOCABULARY
from passerelle.contract import InputKind as InputKind
from passerelle.digests import canonical_json, sha256_bytes, sha256_file
from passerelle.errors import ModelDirError

FORMAT = "passerelle-model-dir"
FORMAT_VERSION = 1
METADATA = "passerelle-model.json"
PARITY_INPUTS = "parity_inputs.npy"


class Framework(StrEnum):
    KERAS = "keras"
    SKLEARN = "sklearn"

    @property
    def model_file(self) -> str:
        return {"keras": "model.keras", "sklearn": "model.skops"}[self.value]


@dataclass(frozen=True)
class ModelMetadata:
    """The parsed, validated ``passerelle-model.json``."""

    framework: Framework
    architecture: str
    input_kind: InputKind
    codes: tuple[str, ...]
    training: Mapping[str, Any]
    metrics: Mapping[str, Any]
    files: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "framework": self.framework.value,
            "architecture": self.architecture,
            "input_kind": self.input_kind.value,
            "codes": list(self.codes),
            "training": dict(self.training),
            "metrics": dict(self.metrics),
            "files": dict(self.files),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelMetadata:
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} version {FORMAT_VERSION}")
        codes = doc["codes"]
        files = doc["files"]
        if not isinstance(codes, list) or not codes or not all(isinstance(c, str) for c in codes):
            raise ValueError("codes must be a non-empty list of strings")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.startswith("sha256:")
            for k, v in files.items()
        ):
            raise ValueError("files must map names to sha256 digests")
        return cls(
            framework=Framework(doc["framework"]),
            architecture=str(doc["architecture"]),
            input_kind=InputKind(doc["input_kind"]),
            codes=tuple(codes),
            training=dict(doc["training"]),
            metrics=dict(doc["metrics"]),
            files=dict(files),
        )


@dataclass(frozen=True)
class ModelDir:
    """A model directory whose metadata parsed and whose every file matched its digest."""

    path: Path
    metadata: ModelMetadata
    digest: str  # sha256 of the canonical metadata, which lists every file's digest

    @property
    def model_file(self) -> Path:
        return self.path / self.metadata.framework.model_file


def write_metadata(path: Path, metadata: ModelMetadata) -> None:
    (path / METADATA).write_text(json.dumps(metadata.to_json(), indent=1, sort_keys=True) + "\n")


def file_digests(path: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(path / name) for name in sorted(names)}


def open_model_dir(path: Path) -> ModelDir:
    """Parse and verify a model directory; :class:`ModelDirError` if anything is off."""
    if not path.is_dir():
        raise ModelDirError(f"{path}: no such model directory")
    meta_path = path / METADATA
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
        metadata = ModelMetadata.from_json(doc)
    except FileNotFoundError as e:
        raise ModelDirError(f"{path}: not a model directory ({METADATA} is missing)") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelDirError(f"{meta_path}: unreadable model metadata: {e}") from e
    required = {metadata.framework.model_file, VOCABULARY, LABELS, PARITY_INPUTS}
    missing = sorted(required - set(metadata.files))
    if missing:
        raise ModelDirError(f"{meta_path}: metadata does not list {', '.join(missing)}")
    for name, expected in sorted(metadata.files.items()):
        if "/" in name or name.startswith("."):
            raise ModelDirError(f"{meta_path}: file name {name!r} is not a plain name")
        file = path / name
        if not file.is_file():
            raise ModelDirError(f"{path}: {name} is missing")
        if sha256_file(file) != expected:
            raise ModelDirError(f"{path}: {name} does not match its digest (corrupt model)")
    return ModelDir(path=path, metadata=metadata, digest=sha256_bytes(canonical_json(doc)))


def read_labels(model_dir: ModelDir) -> dict[str, str]:
    """Code -> label, in output order; checked against the metadata's code list."""
    try:
        doc = json.loads((model_dir.path / LABELS).read_text(encoding="utf-8"))
        labels = {str(c): str(doc["labels"][c]) for c in doc["codes"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelDirError(f"{model_dir.path / LABELS}: unreadable labels: {e}") from e
    if tuple(labels) != model_dir.metadata.codes:
        raise ModelDirError(f"{model_dir.path / LABELS}: codes differ from the metadata")
    return labels
