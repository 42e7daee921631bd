"""A scan of everything shipped beside the weights for direct identifiers.

What is scanned, in an export directory (registry.export.SHIPPED_FILES):

* ``vocabulary.json``: every token (identifier-shaped tokens: NIR, long digit runs,
  years, e-mails, known first and last names) and, when the training corpus is given,
  every token seen for fewer than ``k`` distinct patients;
* ``model_card.json`` and ``labels.json``: every string value;
* ``model.onnx`` (parsed with ``load_external_data=False``, never executed): metadata
  properties, producer, model/graph/node doc strings, and the names of the graph,
  its inputs, outputs, nodes and initializers.

Findings name the file, the place and the kind; the value itself is redacted (two
characters and a length), so the report does not spread what it found.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import onnx

from passerelle.errors import BadInput
from registry.identifiers import find_identifiers, identifier_kind_of_token


class FindingKind(StrEnum):
    NIR = "nir"
    PHONE = "phone"
    EMAIL = "email"
    DATE = "date"
    IPP = "ipp"
    PERSON_NAME = "person_name"
    RARE_TOKEN = "rare_token"  # noqa: S105 - a finding kind, not a password


@dataclass(frozen=True)
class ScanFinding:
    kind: FindingKind
    file: str
    where: str
    redacted: str


@dataclass(frozen=True)
class ScanReport:
    findings: tuple[ScanFinding, ...]
    scanned: Mapping[str, int]  # file -> number of strings looked at
    min_patients: int | None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.kind.value] = out.get(f.kind.value, 0) + 1
        return out


def redact(value: str) -> str:
    return f"{value[:2]}…({len(value)} chars)"


def scan_export_dir(
    directory: Path,
    patients_per_token: Mapping[str, int] | None = None,
    min_patients: int = 5,
) -> ScanReport:
    """Scan the shippable directory; ``patients_per_token`` enables the rare-token check."""
    findings: list[ScanFinding] = []
    scanned: dict[str, int] = {}
    tokens = _vocabulary_tokens(directory / "vocabulary.json")
    scanned["vocabulary.json"] = len(tokens)
    for index, token in enumerate(tokens):
        kind = identifier_kind_of_token(token)
        if kind is not None:
            findings.append(ScanFinding(FindingKind(kind.value), "vocabulary.json",
                                        f"token #{index}", redact(token)))
        elif patients_per_token is not None and index >= 2 and \
                patients_per_token.get(token, 0) < min_patients:
            findings.append(ScanFinding(FindingKind.RARE_TOKEN, "vocabulary.json",
                                        f"token #{index}", redact(token)))
    for name in ("model_card.json", "labels.json"):
        strings = list(_json_strings(_read_json(directory / name)))
        scanned[name] = len(strings)
        findings += _scan_strings(name, strings)
    strings = list(_onnx_strings(directory / "model.onnx"))
    scanned["model.onnx"] = len(strings)
    findings += _scan_strings("model.onnx", strings)
    return ScanReport(findings=tuple(findings), scanned=scanned,
                      min_patients=min_patients if patients_per_token is not None else None)


def _scan_strings(file: str, strings: Iterable[tuple[str, str]]) -> list[ScanFinding]:
    out = []
    for where, text in strings:
        for hit in find_identifiers(text):
            out.append(ScanFinding(FindingKind(hit.kind.value), file, where, redact(hit.value)))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot be scanned: {e}") from e


def _vocabulary_tokens(path: Path) -> list[str]:
    doc = _read_json(path)
    tokens = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise BadInput(f"{path}: no token list to scan")
    return tokens


def _json_strings(doc: Any, where: str = "$") -> Iterator[tuple[str, str]]:
    if isinstance(doc, str):
        yield where, doc
    elif isinstance(doc, dict):
        for key, value in doc.items():
            yield f"{where}.{key} (key)", str(key)
            yield from _json_strings(value, f"{where}.{key}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _json_strings(value, f"{where}[{i}]")


def _onnx_strings(path: Path) -> Iterator[tuple[str, str]]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError...
        raise BadInput(f"{path}: not a readable ONNX model: {e}") from e
    yield "producer_name", model.producer_name
    yield "doc_string", model.doc_string
    for prop in model.metadata_props:
        yield f"metadata[{prop.key}] (key)", prop.key
        yield f"metadata[{prop.key}]", prop.value
    graph = model.graph
    yield "graph.name", graph.name
    yield "graph.doc_string", graph.doc_string
    for kind, items in (("input", graph.input), ("output", graph.output),
                        ("initializer", graph.initializer)):
        for i, item in enumerate(items):
            yield f"graph.{kind}[{i}].name", item.name
    for i, node in enumerate(graph.node):
        yield f"graph.node[{i}].name", node.name
        yield f"graph.node[{i}].doc_string", node.doc_string
