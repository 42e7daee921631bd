"""The scan of what ships beside the weights: clean for the default coder, loud for a
leaky one, and it looks into the model card and the ONNX file too."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from passerelle import steps
from passerelle.corpus import read_corpus
from registry.audit.scan import FindingKind, scan_export_dir
from registry.store import ModelStore
from registry.vocabulary import ALL_SECTIONS, CLINICAL_SECTIONS, count_tokens, select_text
from tests.conftest import TEST_OVERRIDE, small_config

pytestmark = pytest.mark.slow


def _export(home: Path, model: Path, out: Path) -> Path:
    store = ModelStore(home)
    info = steps.register_model(store, model, "coder", "PMSI coding", "GDPR 6(1)(e)")
    steps.export_model(store, info.ref, out, TEST_OVERRIDE)
    return out


def _patients_per_token(corpus_dir: Path, sections: tuple[str, ...]) -> dict[str, int]:
    corpus = read_corpus(corpus_dir)
    texts = [select_text(s.sections.as_dict(), sections) for s in corpus.stays]
    return count_tokens(texts, [s.patient_id for s in corpus.stays])[1]


def test_default_coder_ships_no_identifier_and_no_rare_token(
    keras_model: steps.TrainReport, corpus_x: Path, home: Path, tmp_path: Path
) -> None:
    out = _export(home, keras_model.out_dir, tmp_path / "e")
    report = scan_export_dir(out, _patients_per_token(corpus_x, CLINICAL_SECTIONS), 5)
    assert report.findings == (), report.counts()
    assert report.scanned["vocabulary.json"] > 100 and report.scanned["model.onnx"] > 10


def test_leaky_coder_is_caught_with_the_identifiers_in_its_vocabulary(
    corpus_x: Path, home: Path, tmp_path: Path
) -> None:
    leaky = small_config(min_patients=1, drop_identifiers=False, sections=ALL_SECTIONS)
    steps.train_model(corpus_x, tmp_path / "leaky", leaky)
    out = _export(home, tmp_path / "leaky", tmp_path / "e")
    report = scan_export_dir(out, _patients_per_token(corpus_x, ALL_SECTIONS), 5)
    counts = report.counts()
    # Site X writes the NIR spaced ("2 57 03 ..."), so its pieces are short tokens; the
    # IPP (10 digits), birth years and names come through whole.
    for kind in (FindingKind.IPP, FindingKind.PERSON_NAME, FindingKind.DATE,
                 FindingKind.RARE_TOKEN):
        assert counts.get(kind.value, 0) > 0, counts
    assert all(f.file == "vocabulary.json" for f in report.findings)
    # the report shows where and what kind, never the identifier itself
    ipps = [f for f in report.findings if f.kind is FindingKind.IPP]
    assert all("chars" in f.redacted and len(f.redacted) < 16 for f in ipps)


def test_identifiers_in_the_card_or_the_onnx_metadata_are_found(
    keras_model: steps.TrainReport, home: Path, tmp_path: Path
) -> None:
    out = _export(home, keras_model.out_dir, tmp_path / "e")
    card = json.loads((out / "model_card.json").read_text())
    card["contact"] = "jean.dupont@chu-montaigu.fr, 02 41 35 27 18"
    (out / "model_card.json").write_text(json.dumps(card))
    model = onnx.load(str(out / "model.onnx"))
    onnx.helper.set_model_props(model, {"trained_on": "patient 1 84 12 76 451 089 46"})
    onnx.save(model, str(out / "model.onnx"))
    found = {(f.file, f.kind) for f in scan_export_dir(out).findings}
    assert ("model_card.json", FindingKind.EMAIL) in found
    assert ("model_card.json", FindingKind.PHONE) in found
    assert ("model.onnx", FindingKind.NIR) in found


def test_identifiers_planted_in_every_shipped_place_are_found(
    keras_model: steps.TrainReport, home: Path, tmp_path: Path
) -> None:
    from registry.identifiers import _name_forms, name_lists, strip_accents
    from tests.scan_support import PLANTED, plant

    out = _export(home, keras_model.out_dir, tmp_path / "e")
    assert scan_export_dir(out).findings == ()  # clean before planting
    plant(out)
    report = scan_export_dir(out)
    for file, what, kind, place in PLANTED:  # each one found, of its kind, at its place
        assert any(f.file == file and f.kind.value == kind and place in f.where
                   for f in report.findings), (file, what, kind, report.counts())
    # the names are not the generator's: none is in faker's fr_FR lists
    lists = name_lists()
    generator = _name_forms(lists.male_first + lists.female_first + lists.last)
    for name in ("archambault", "amyot", "arsenault", "algernon", "asselin", "aubut",
                 "anctil", "achille", "ambroise", "alban"):
        assert strip_accents(name) not in generator, name


def test_a_tfidf_vocabulary_kept_in_onnx_string_attributes_is_scanned(tmp_path: Path) -> None:
    """skl2onnx's TfIdfVectorizer keeps its vocabulary in the node's pool_strings."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer().fit(["douleur thoracique anctil", "fracture du col"])
    model = to_onnx(vectorizer, initial_types=[("text", StringTensorType([None, 1]))])
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "vocabulary.json").write_text('{"tokens": ["<pad>", "<unk>"]}')
    findings = scan_export_dir(tmp_path).findings
    assert any(f.file == "model.onnx" and f.kind is FindingKind.PERSON_NAME
               and "pool_strings" in f.where for f in findings), findings


def test_standard_operator_names_are_not_read_as_first_names_but_custom_ones_are(
        tmp_path: Path) -> None:
    """``Max`` is both a first name and an ONNX operator: the standard's own operators
    (a node's op_type, the card's operator list, the op's name inside a node name as
    tf2onnx writes it) are its vocabulary, not data, so they are not findings; a
    custom-domain operator, a card entry no schema knows and a last name beside it in a
    node name are scanned as any other string."""
    from onnx import TensorProto, helper

    def ship(op_type: str, domain: str, node_name: str, card_ops: list[str]) -> Path:
        out = tmp_path / f"{op_type}-{domain or 'std'}-{node_name.replace('/', '_')}"
        out.mkdir()
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])
        node = helper.make_node(op_type, ["x", "x"], ["logits"], name=node_name,
                                domain=domain)
        opsets = [helper.make_opsetid("", 17)] + (
            [helper.make_opsetid(domain, 1)] if domain else [])
        model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                                  opset_imports=opsets)
        onnx.save(model, str(out / "model.onnx"))
        (out / "vocabulary.json").write_text(json.dumps({"tokens": ["<pad>", "<oov>"]}))
        (out / "model_card.json").write_text(json.dumps({"onnx": {"operators": card_ops}}))
        return out

    clean = scan_export_dir(ship("Max", "", "node0", ["Max", "ai.onnx:Max"]))
    assert clean.findings == ()
    custom = scan_export_dir(ship("Max", "com.vendor", "node0", []))
    assert [f.where for f in custom.findings] == ["graph.node[0].op_type"]
    # tf2onnx names nodes after their op: that part of a node name is not a person
    exporter = scan_export_dir(ship("Max", "", "model/global_max/Max", []))
    assert exporter.findings == ()
    named = scan_export_dir(ship("Max", "", "Max Dupont", ["Marie", "com.vendor:Max"]))
    assert sorted(f.where for f in named.findings) == [
        "$.onnx.operators[0]", "$.onnx.operators[1]", "graph.node[0].name"]
    assert [f.redacted for f in named.findings if f.where.startswith("graph")] == [
        "Du…(6 chars)"]
