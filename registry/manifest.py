"""The vendor's manifest (v1): the declared input contract of a model brought from outside.

A JSON document validated against ``manifest.schema.json`` (JSON Schema draft 2020-12,
unknown keys refused)::

    {"format": "passerelle-manifest", "format_version": 1,
     "architecture": "conv1d",
     "input":  {"kind": "token_ids" | "bag_of_words", "vocabulary": "vocabulary.json",
                "dtype": "int32" | "int64" | "float32"},
     "output": {"labels": "labels.json", "multi_label": false,
                "scores": "logits" | "probabilities"},
     "training": {"heldout": {"fraction": 0.2, "seed": 0} | null,
                  "steps": 1234 | null, "recipe": "NAME" | "module:function" | null}}

Paths are relative to the manifest file and may not leave its folder. The vocabulary's
own config (sections read, ``max_len``) is the one source of truth for the encoding.
What the manifest declares is checked where it can be (registry.intake: output width
against the label table, the input's dtype and width against the model) and recorded
as declared otherwise (``training.steps``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from passerelle.errors import BadInput
from registry.model_dir import InputDtype, InputKind, read_label_file
from registry.vocabulary import Vocabulary

FORMAT = "passerelle-manifest"
FORMAT_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")
MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Heldout:
    fraction: float
    seed: int


@dataclass(frozen=True)
class Manifest:
    """A manifest that validated; paths resolved against its folder."""

    architecture: str
    input_kind: InputKind
    input_dtype: InputDtype
    vocabulary_path: Path
    labels_path: Path
    scores: str  # "logits" | "probabilities"
    heldout: Heldout | None
    steps: int | None
    recipe: str | None
    document: Mapping[str, Any]  # as validated (relative paths)

    def vocabulary(self) -> Vocabulary:
        try:
            return Vocabulary.load(self.vocabulary_path)
        except BadInput as e:
            raise BadInput(f"manifest input.vocabulary: {e}") from e

    def labels(self) -> dict[str, str]:
        try:
            return read_label_file(self.labels_path)
        except ValueError as e:
            raise BadInput(f"manifest output.labels: {e}") from e

    def training_block(self) -> dict[str, Any]:
        return dict(self.document["training"])


@cache
def schema() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return doc


def validate(doc: Any, where: str) -> None:
    """Validate against the JSON Schema; BadInput naming the first problem."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        at = "/".join(str(p) for p in first.absolute_path) or "(top)"
        message = first.message.splitlines()[0][:300]
        raise BadInput(f"{where}: the manifest does not validate "
                       f"(registry/manifest.schema.json): at {at}: {message}")


def load_manifest(path: Path) -> Manifest:
    """Read, validate and resolve a manifest file (BadInput if anything is off)."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise BadInput(f"{path}: a manifest is at most {MAX_BYTES} bytes")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BadInput(f"{path}: cannot read the manifest: {e.strerror}") from e
    except ValueError as e:
        raise BadInput(f"{path}: the manifest is not JSON: {e}") from e
    return from_document(doc, path.parent, str(path))


def from_document(doc: Any, folder: Path, where: str) -> Manifest:
    validate(doc, where)
    if doc["output"]["multi_label"]:
        raise BadInput(f"{where}: output.multi_label true is not supported (single-label "
                       "models only, one code per stay)")
    held = doc["training"]["heldout"]
    return Manifest(
        architecture=doc["architecture"],
        input_kind=InputKind(doc["input"]["kind"]),
        input_dtype=InputDtype(doc["input"]["dtype"]),
        vocabulary_path=_inside(folder, doc["input"]["vocabulary"], where),
        labels_path=_inside(folder, doc["output"]["labels"], where),
        scores=doc["output"]["scores"],
        heldout=None if held is None else Heldout(float(held["fraction"]), int(held["seed"])),
        steps=doc["training"]["steps"],
        recipe=doc["training"]["recipe"],
        document=doc,
    )


def _inside(folder: Path, name: str, where: str) -> Path:
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise BadInput(f"{where}: {name!r} leaves the manifest's folder")
    if not path.is_file():
        raise BadInput(f"{where}: {name} is missing (paths are relative to the manifest)")
    return path


def document(architecture: str, kind: InputKind, dtype: InputDtype, scores: str = "logits",
             heldout: Heldout | None = None, steps: int | None = None,
             recipe: str | None = None, vocabulary: str = "vocabulary.json",
             labels: str = "labels.json") -> dict[str, Any]:
    """A manifest document (validated)."""
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "input": {"kind": kind.value, "vocabulary": vocabulary, "dtype": dtype.value},
        "output": {"labels": labels, "multi_label": False, "scores": scores},
        "training": {"heldout": None if heldout is None else
                     {"fraction": heldout.fraction, "seed": heldout.seed},
                     "steps": steps, "recipe": recipe},
    }
    validate(doc, "manifest")
    return doc


@dataclass(frozen=True)
class StartingManifest:
    """What ``model init-manifest`` found and the manifest it proposes."""

    document: Mapping[str, Any]
    framework: str
    input_width: int | None
    output_width: int | None

    def notes(self) -> list[str]:
        """What the vendor must make true beside the manifest."""
        kind = self.document["input"]["kind"]
        width = "?" if self.input_width is None else str(self.input_width)
        what = ("the vocabulary's max_len" if kind == "token_ids"
                else "the vocabulary's size")
        labels = "?" if self.output_width is None else str(self.output_width)
        return [f"input: {kind} {self.document['input']['dtype']}, width {width} "
                f"({what} must be {width})",
                f"output: {self.document['output']['scores']}, width {labels} "
                f"(labels.json must list {labels} codes, in output order)",
                "training: set heldout to the split you kept out ({fraction, seed} of "
                "registry.coder.split_by_patient on --data) or leave null if the model saw "
                "all of --data; steps and recipe if you know them"]


def starting_manifest(path: Path, custom_objects: str | None = None) -> StartingManifest:
    """Inspect a source model (.keras, SavedModel, .skops, .onnx) and propose a manifest."""
    from registry.sources import framework_of, load_source, signature_of

    framework = framework_of(path)
    model = load_source(path, framework.value, custom_objects)
    sig = signature_of(model, framework.value)
    if sig.input_dtype in ("int32", "int64"):
        kind, dtype = InputKind.TOKEN_IDS, InputDtype(sig.input_dtype)
    elif sig.input_dtype in ("float32", "float64"):
        kind, dtype = InputKind.BAG_OF_WORDS, InputDtype.FLOAT32
    else:
        raise BadInput(f"{path.name}: input of dtype {sig.input_dtype}: neither token ids "
                       "(int32/int64) nor a bag of words (float32)")
    architecture = " ".join((sig.name or path.stem).split())[:200] or path.stem
    doc = document(architecture, kind, dtype,
                   scores="probabilities" if sig.probabilities else "logits")
    return StartingManifest(doc, framework.value, sig.input_width, sig.output_width)
