"""Identifiers planted in every place an export directory ships (for the scan's tests and
scripts/scan_planted.py). Every name is from mimesis' French lists and none from faker's
fr_FR lists, which the corpus generator draws from: the scan is not tuned to the
generator's own names."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

# (file, where the value is planted, kind the scan must report, part of the place it names)
PLANTED: tuple[tuple[str, str, str, str], ...] = (
    ("vocabulary.json", "key beside tokens: 'Archambault'", "person_name", "$.Archambault (key)"),
    ("vocabulary.json", "value beside tokens: '06 12 34 56 78'", "phone", "$.contact"),
    ("model_card.json", "nested key 'rédigé par Amyot'", "person_name", "Amyot (key)"),
    ("model_card.json", "value, lower case: 'algernon arsenault'", "person_name",
     "notes.reviewed[0]"),
    ("model_card.json", "value, mis-accented: 'Dr Àsselin'", "person_name", "notes.reviewed[1]"),
    ("model_card.json", "value, date 1957/03/12", "date", "notes.born"),
    ("labels.json", "value, dotted NIR 1.84.12.76.451.089.46", "nir", "$.comment"),
    ("labels.json", "value, date 12-3-57", "date", "$.comment"),
    ("model.onnx", "producer_version 1957/03/12", "date", "producer_version"),
    ("model.onnx", "domain 'fr.chu.aubut'", "person_name", "domain"),
    ("model.onnx", "metadata key 'Anctil'", "person_name", "metadata[Anctil] (key)"),
    ("model.onnx", "string initializer token '06 12 34 56 78'", "phone", "string_data[0]"),
    ("model.onnx", "value_info name 'Achille_Asselin'", "person_name", "value_info[0].name"),
    ("model.onnx", "edge name 'out_Ambroise'", "person_name", ".output[0]"),
    ("model.onnx", "string attribute of a node: 'alban'", "person_name",
     "attribute[labels].strings[0]"),
    ("model.onnx", "node doc_string in a subgraph: 'IPP 4501238896'", "ipp",
     "attribute[then_branch].g.node[0].doc_string"),
)


def plant(export: Path) -> None:
    """Write every :data:`PLANTED` value into the export directory ``export``."""
    vocab = json.loads((export / "vocabulary.json").read_text())
    vocab["Archambault"] = "reviewer"
    vocab["contact"] = "06 12 34 56 78"
    (export / "vocabulary.json").write_text(json.dumps(vocab))
    card = json.loads((export / "model_card.json").read_text())
    card["provenance"]["notes"] = {"rédigé par Amyot": "ok",
                                   "reviewed": ["algernon arsenault", "Dr Àsselin"],
                                   "born": "1957/03/12"}
    (export / "model_card.json").write_text(json.dumps(card, ensure_ascii=False))
    labels = json.loads((export / "labels.json").read_text())
    labels["comment"] = "1.84.12.76.451.089.46 vu le 12-3-57"
    (export / "labels.json").write_text(json.dumps(labels))
    model = onnx.load(str(export / "model.onnx"))
    model.producer_version = "1957/03/12"
    model.domain = "fr.chu.aubut"
    helper.set_model_props(model, {"Anctil": "x"})
    graph = model.graph
    graph.initializer.append(helper.make_tensor("names", TensorProto.STRING, [1],
                                                [b"06 12 34 56 78"]))
    graph.value_info.append(helper.make_tensor_value_info("Achille_Asselin",
                                                          TensorProto.FLOAT, [1]))
    graph.node[-1].output[0] = "out_Ambroise"
    sub = helper.make_graph([helper.make_node("Identity", ["a"], ["b"],
                                              doc_string="IPP 4501238896")], "branch",
                            [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    graph.node.append(helper.make_node("If", ["c"], ["d"], then_branch=sub, else_branch=sub,
                                       labels=["alban"]))
    onnx.save(model, str(export / "model.onnx"))
