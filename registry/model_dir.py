"""The source-side model directory: what is registered (v2) and what ``model train`` writes (v1).

Version 2 is produced only by :mod:`registry.intake`, at registration (all files listed with
their digests in ``passerelle-model.json``)::

    passerelle-model.json   metadata: framework, architecture, input kind and dtype, codes,
                            training, metrics, files, source, onnx_digest
    manifest.json           the vendor's manifest (synthesised for ``model train`` folders)
    model.keras | model.skops | source.onnx | savedmodel/...   the source model as given
    model.onnx              the shippable ONNX, converted once at registration
    vocabulary.json         tokenizer and vocabulary (registry.vocabulary)
    labels.json             output index -> CIM-10 code and label
    parity_inputs.npy       stays Passerelle encoded itself (the model's input)
    parity_reference.npy    the source model's logits on them, computed at registration

Version 1 (``model train``'s output) has the source model, vocabulary, labels and
``parity_inputs.npy`` (token ids); :mod:`registry.intake` turns it into version 2.

This directory stays at the source site: the parity files are derived from held-out
patients' stays and never go into an export. Only ONNX leaves (registry.export).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from passerelle.contract import LABELS as LABELS
from passerelle.contract import VOCABULARY as VOCABULARY
from passerelle.contract import InputKind as InputKind
from passerelle.digests import canonical_json, sha256_bytes, sha256_file
from passerelle.errors import ModelDirError

FORMAT = "passerelle-model-dir"
FORMAT_VERSION = 2
V1 = 1
METADATA = "passerelle-model.json"
MANIFEST = "manifest.json"
PARITY_INPUTS = "parity_inputs.npy"
PARITY_REFERENCE = "parity_reference.npy"
ONNX_MODEL = "model.onnx"
SAVEDMODEL = "savedmodel"


class Framework(StrEnum):
    KERAS = "keras"
    SKLEARN = "sklearn"
    ONNX = "onnx"

    @property
    def model_file(self) -> str:
        return {"keras": "model.keras", "sklearn": "model.skops",
                "onnx": "source.onnx"}[self.value]


class InputDtype(StrEnum):
    INT32 = "int32"
    INT64 = "int64"
    FLOAT32 = "float32"


def default_dtype(kind: InputKind) -> InputDtype:
    return InputDtype.FLOAT32 if kind is InputKind.BAG_OF_WORDS else InputDtype.INT32


@dataclass(frozen=True)
class ModelMetadata:
    """The parsed, validated ``passerelle-model.json`` (v2; v1 read with defaults)."""

    framework: Framework
    architecture: str
    input_kind: InputKind
    codes: tuple[str, ...]
    training: Mapping[str, Any]
    metrics: Mapping[str, Any]
    files: Mapping[str, str]
    input_dtype: InputDtype | None = None  # None: the kind's default (v1)
    source: Mapping[str, Any] = field(default_factory=dict)
    onnx_digest: str | None = None
    format_version: int = V1

    @property
    def dtype(self) -> InputDtype:
        return self.input_dtype or default_dtype(self.input_kind)

    def to_json(self) -> dict[str, Any]:
        doc = {
            "format": FORMAT,
            "format_version": self.format_version,
            "framework": self.framework.value,
            "architecture": self.architecture,
            "input_kind": self.input_kind.value,
            "codes": list(self.codes),
            "training": dict(self.training),
            "metrics": dict(self.metrics),
            "files": dict(self.files),
        }
        if self.format_version >= FORMAT_VERSION:
            doc |= {"input_dtype": self.dtype.value, "source": dict(self.source),
                    "onnx_digest": self.onnx_digest}
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelMetadata:
        version = doc.get("format_version")
        if doc.get("format") != FORMAT or version not in (V1, FORMAT_VERSION):
            raise ValueError(f"not a {FORMAT} version {V1} or {FORMAT_VERSION}")
        codes = doc["codes"]
        files = doc["files"]
        if not isinstance(codes, list) or not codes or not all(isinstance(c, str) for c in codes):
            raise ValueError("codes must be a non-empty list of strings")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.startswith("sha256:")
            for k, v in files.items()
        ):
            raise ValueError("files must map names to sha256 digests")
        extra: dict[str, Any] = {}
        if version == FORMAT_VERSION:
            source = doc["source"]
            onnx_digest = doc["onnx_digest"]
            if not isinstance(source, dict) or not isinstance(onnx_digest, str):
                raise ValueError("source must be an object and onnx_digest a digest")
            extra = {"input_dtype": InputDtype(doc["input_dtype"]), "source": dict(source),
                     "onnx_digest": onnx_digest}
        framework = Framework(doc["framework"])
        if version == V1 and framework is Framework.ONNX:
            raise ValueError("framework onnx needs format_version 2 (registry.intake)")
        return cls(
            framework=framework,
            architecture=str(doc["architecture"]),
            input_kind=InputKind(doc["input_kind"]),
            codes=tuple(codes),
            training=dict(doc["training"]),
            metrics=dict(doc["metrics"]),
            files=dict(files),
            format_version=int(version),
            **extra,
        )


@dataclass(frozen=True)
class ModelDir:
    """A model directory whose metadata parsed and whose every file matched its digest."""

    path: Path
    metadata: ModelMetadata
    digest: str  # sha256 of the canonical metadata, which lists every file's digest

    @property
    def model_file(self) -> Path:
        """The source model as given (a file, or the SavedModel folder)."""
        if any(n.startswith(SAVEDMODEL + "/") for n in self.metadata.files):
            return self.path / SAVEDMODEL
        return self.path / self.metadata.framework.model_file

    @property
    def version(self) -> int:
        return self.metadata.format_version


def write_metadata(path: Path, metadata: ModelMetadata) -> None:
    (path / METADATA).write_text(json.dumps(metadata.to_json(), indent=1, sort_keys=True) + "\n")


def file_digests(path: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(path / name) for name in sorted(names)}


def tree_names(path: Path) -> list[str]:
    """Every regular file under ``path`` as a relative POSIX name (a SavedModel folder)."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def _plain(name: str) -> bool:
    """A plain file name, or a name under ``savedmodel/`` without ``..`` or hidden parts."""
    parts = PurePosixPath(name).parts
    if len(parts) > 1 and parts[0] != SAVEDMODEL:
        return False
    return bool(parts) and all(p not in ("", ".", "..") and not p.startswith(".")
                               for p in parts) and "\\" not in name


def _required(metadata: ModelMetadata, names: set[str]) -> set[str]:
    savedmodel = any(n.startswith(SAVEDMODEL + "/") for n in names)
    model = {f"{SAVEDMODEL}/saved_model.pb"} if savedmodel else {metadata.framework.model_file}
    base = model | {VOCABULARY, LABELS, PARITY_INPUTS}
    if metadata.format_version >= FORMAT_VERSION:
        base |= {MANIFEST, ONNX_MODEL, PARITY_REFERENCE}
    return base


def open_model_dir(path: Path, version: int | None = None) -> ModelDir:
    """Parse and verify a model directory; :class:`ModelDirError` if anything is off.

    ``version``: the format version it must have (``None``: v1 or v2)."""
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
    if version is not None and metadata.format_version != version:
        raise ModelDirError(f"{meta_path}: format_version {metadata.format_version}, "
                            f"expected {version}")
    missing = sorted(_required(metadata, set(metadata.files)) - set(metadata.files))
    if missing:
        raise ModelDirError(f"{meta_path}: metadata does not list {', '.join(missing)}")
    for name, expected in sorted(metadata.files.items()):
        if not _plain(name):
            raise ModelDirError(f"{meta_path}: file name {name!r} is not a plain name")
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise ModelDirError(f"{path}: {name} is missing")
        if sha256_file(file) != expected:
            raise ModelDirError(f"{path}: {name} does not match its digest (corrupt model)")
    if metadata.onnx_digest is not None and metadata.files.get(ONNX_MODEL) != \
            metadata.onnx_digest:
        raise ModelDirError(f"{path}: {ONNX_MODEL} does not match the metadata's onnx_digest")
    return ModelDir(path=path, metadata=metadata, digest=sha256_bytes(canonical_json(doc)))


def read_labels(model_dir: ModelDir) -> dict[str, str]:
    """Code -> label, in output order; checked against the metadata's code list."""
    try:
        labels = read_label_file(model_dir.path / LABELS)
    except ValueError as e:
        raise ModelDirError(str(e)) from e
    if tuple(labels) != model_dir.metadata.codes:
        raise ModelDirError(f"{model_dir.path / LABELS}: codes differ from the metadata")
    return labels


def read_label_file(path: Path) -> dict[str, str]:
    """Code -> label, in output order, from a ``labels.json`` (ValueError if malformed)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        codes = doc["codes"]
        if not isinstance(codes, list) or not codes or \
                not all(isinstance(c, str) and c for c in codes):
            raise ValueError("codes must be a non-empty list of strings")
        labels = {c: str(doc["labels"][c]) for c in codes}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable labels: {e}") from e
    if len(labels) != len(codes):
        raise ValueError(f"{path}: unreadable labels: duplicate codes")
    return labels
