"""A scan of everything shipped beside the weights for direct identifiers.

What is scanned: every file of the export directory (registry.export.SHIPPED_FILES and
anything else found there):

* every ``.json`` file: every key and every string value, at any depth; in
  ``vocabulary.json`` the ``tokens`` list is read token by token (identifier-shaped
  tokens: NIR, long digit runs spaced or not, dates, years, e-mails, first and last
  names of two independent lists, case and accents ignored) and, when the training
  corpus is given, every token seen for fewer than ``k`` distinct patients;
* ``model.onnx`` (parsed with ``load_external_data=False``, never executed): producer
  name and version, domain, doc strings, metadata keys and values, opset domains; in
  the graph and every subgraph (and model-local functions): the names of the graph,
  its inputs, outputs, value_info, initializers and nodes, every edge name, every
  attribute's name and string values, and every string tensor (initializers and
  attribute tensors: skl2onnx's TfIdfVectorizer and Keras StringLookup keep their
  vocabularies there), the latter read token by token like ``vocabulary.json``;
* any other file, as UTF-8 text.

Findings name the file, the place and the kind; the value itself is redacted (two
characters and a length), so the report does not spread what it found.
"""

from __future__ import annotations

import json
import re
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
    for index, token in enumerate(tokens):
        finding = _token_finding("vocabulary.json", f"tokens[{index}]", token)
        if finding is not None:
            findings.append(finding)
        elif patients_per_token is not None and index >= 2 and \
                patients_per_token.get(token, 0) < min_patients:
            findings.append(ScanFinding(FindingKind.RARE_TOKEN, "vocabulary.json",
                                        f"tokens[{index}]", redact(token)))
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = str(path.relative_to(directory))
        if path.suffix == ".onnx":
            texts, token_like = _onnx_strings(path)
            findings += _scan_strings(name, texts, exporter_names=True)
            findings += [f for where, t in token_like
                         if (f := _token_finding(name, where, t)) is not None]
            scanned[name] = len(texts) + len(token_like)
        elif path.suffix == ".json":
            doc = _read_json(path)
            if name == "vocabulary.json" and isinstance(doc, dict):
                doc = {k: v for k, v in doc.items() if k != "tokens"}  # read above
            strings = [(w, t) for w, t in _json_strings(doc)
                       if not (name == "model_card.json" and _CARD_OPERATOR.match(w)
                               and _card_operator(t))]
            findings += _scan_strings(name, strings)
            findings += [f for where, t in strings if where.endswith("(key)")
                         and (f := _token_finding(name, where, t)) is not None
                         and not _scan_strings(name, [(where, t)])]
            scanned[name] = len(strings) + (len(tokens) if name == "vocabulary.json" else 0)
        else:
            text = path.read_bytes().decode("utf-8", errors="replace")
            findings += _scan_strings(name, [("text", text)])
            scanned[name] = 1
    return ScanReport(findings=tuple(findings), scanned=scanned,
                      min_patients=min_patients if patients_per_token is not None else None)


_CARD_OPERATOR = re.compile(r"^\$\.onnx\.operators\[\d+\]$")


def standard_operator(op_type: str, domain: str = "") -> bool:
    """Whether ``op_type`` is an operator of ONNX's own schemas (ai.onnx, ai.onnx.ml): a
    name like ``Max`` is the standard's vocabulary, not data about a person, so the scan
    does not read it as a first name. Anything else is scanned."""
    domain = "" if domain in ("", "ai.onnx") else domain
    return domain in ("", "ai.onnx.ml") and bool(onnx.defs.has(op_type, domain))


_STRUCTURAL = re.compile(r"\.(name|input\[\d+\]|output\[\d+\])$")


def _exporter_op_name(where: str, kind: str, value: str) -> bool:
    """A first name that is an ONNX operator's name inside a node, edge or tensor name
    (tf2onnx names nodes after their op: ``model/global_max/Max``): the exporter's
    naming, not a person. Only in those names, only a whole standard operator name
    (``Max``, ``Min``); doc strings, metadata and every other kind of finding are kept."""
    return (kind == FindingKind.PERSON_NAME.value and _STRUCTURAL.search(where) is not None
            and standard_operator(value.strip()))


def _card_operator(entry: str) -> bool:
    """A model card's operator entry (``Max`` or ``ai.onnx.ml:Scaler``) of a standard op."""
    domain, _, op_type = entry.rpartition(":")
    return standard_operator(op_type, domain)


def _token_finding(file: str, where: str, token: str) -> ScanFinding | None:
    kind = identifier_kind_of_token(token)
    if kind is None:
        return None
    return ScanFinding(FindingKind(kind.value), file, where, redact(token))


def _scan_strings(file: str, strings: Iterable[tuple[str, str]],
                  exporter_names: bool = False) -> list[ScanFinding]:
    out = []
    for where, text in strings:
        for hit in find_identifiers(text):
            if exporter_names and _exporter_op_name(where, hit.kind.value, hit.value):
                continue
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


def _onnx_strings(path: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(text strings, token-like strings) of every place in the ONNX file."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError...
        raise BadInput(f"{path}: not a readable ONNX model: {e}") from e
    texts: list[tuple[str, str]] = []
    tokens: list[tuple[str, str]] = []
    for where, value in (("producer_name", model.producer_name),
                         ("producer_version", model.producer_version),
                         ("domain", model.domain), ("doc_string", model.doc_string)):
        texts.append((where, value))
    tokens.append(("domain", model.domain))  # a dotted name: read part by part too
    for prop in model.metadata_props:
        texts += [(f"metadata[{prop.key}] (key)", prop.key), (f"metadata[{prop.key}]",
                                                              prop.value)]
    for i, opset in enumerate(model.opset_import):
        texts.append((f"opset_import[{i}].domain", opset.domain))
        tokens.append((f"opset_import[{i}].domain", opset.domain))
    _graph_strings(model.graph, "graph", texts, tokens)
    for i, function in enumerate(model.functions):
        where = f"functions[{i}]"
        texts += [(f"{where}.name", function.name), (f"{where}.domain", function.domain),
                  (f"{where}.doc_string", function.doc_string)]
        texts += [(f"{where}.input", n) for n in function.input]
        texts += [(f"{where}.output", n) for n in function.output]
        for j, node in enumerate(function.node):
            _node_strings(node, f"{where}.node[{j}]", texts, tokens)
    return [(w, t) for w, t in texts if t], [(w, t) for w, t in tokens if t]


def _tensor_strings(tensor: onnx.TensorProto, where: str, texts: list[tuple[str, str]],
                    tokens: list[tuple[str, str]]) -> None:
    texts += [(f"{where}.name", tensor.name), (f"{where}.doc_string", tensor.doc_string)]
    for i, raw in enumerate(tensor.string_data):
        tokens.append((f"{where}.string_data[{i}]", raw.decode("utf-8", errors="replace")))


def _node_strings(node: onnx.NodeProto, where: str, texts: list[tuple[str, str]],
                  tokens: list[tuple[str, str]]) -> None:
    texts += [(f"{where}.name", node.name), (f"{where}.doc_string", node.doc_string),
              (f"{where}.domain", node.domain)]
    if not standard_operator(node.op_type, node.domain):  # else a schema's name, not data
        texts.append((f"{where}.op_type", node.op_type))
    tokens.append((f"{where}.domain", node.domain))
    texts += [(f"{where}.input[{i}]", n) for i, n in enumerate(node.input)]
    texts += [(f"{where}.output[{i}]", n) for i, n in enumerate(node.output)]
    for attr in node.attribute:
        at = f"{where}.attribute[{attr.name}]"
        texts += [(f"{at} (name)", attr.name), (f"{at}.doc_string", attr.doc_string),
                  (f"{at}.ref_attr_name", attr.ref_attr_name)]
        if attr.s:
            tokens.append((f"{at}.s", attr.s.decode("utf-8", errors="replace")))
        for i, raw in enumerate(attr.strings):
            tokens.append((f"{at}.strings[{i}]", raw.decode("utf-8", errors="replace")))
        if attr.HasField("t"):
            _tensor_strings(attr.t, f"{at}.t", texts, tokens)
        for i, t in enumerate(attr.tensors):
            _tensor_strings(t, f"{at}.tensors[{i}]", texts, tokens)
        if attr.HasField("g"):
            _graph_strings(attr.g, f"{at}.g", texts, tokens)
        for i, g in enumerate(attr.graphs):
            _graph_strings(g, f"{at}.graphs[{i}]", texts, tokens)


def _graph_strings(graph: onnx.GraphProto, where: str, texts: list[tuple[str, str]],
                   tokens: list[tuple[str, str]]) -> None:
    texts += [(f"{where}.name", graph.name), (f"{where}.doc_string", graph.doc_string)]
    for kind, items in (("input", graph.input), ("output", graph.output),
                        ("value_info", graph.value_info)):
        for i, item in enumerate(items):
            texts += [(f"{where}.{kind}[{i}].name", item.name),
                      (f"{where}.{kind}[{i}].doc_string", item.doc_string)]
            denotation = item.type.denotation
            texts.append((f"{where}.{kind}[{i}].type.denotation", denotation))
    for i, tensor in enumerate(graph.initializer):
        _tensor_strings(tensor, f"{where}.initializer[{i}]", texts, tokens)
    for i, sparse in enumerate(graph.sparse_initializer):
        _tensor_strings(sparse.values, f"{where}.sparse_initializer[{i}]", texts, tokens)
    for i, node in enumerate(graph.node):
        _node_strings(node, f"{where}.node[{i}]", texts, tokens)
