"""Class probabilities from the shipped ONNX model and from reference models.

The audit scores the ONNX file exactly as it would ship (onnxruntime, the shipped
vocabulary and labels), never the source-framework model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from adapters.onnx_run import feed_of
from registry.coder import TrainedCoder
from registry.vocabulary import Vocabulary, select_text

FloatArray = npt.NDArray[np.float64]
_FLOOR = 1e-12


def softmax(logits: npt.NDArray[Any]) -> FloatArray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)


class OnnxScorer:
    """The shippable directory as a classifier: texts (sections) -> probabilities."""

    def __init__(self, ship_dir: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(ship_dir / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.vocabulary = Vocabulary.load(ship_dir / "vocabulary.json")
        self.codes = tuple(json.loads((ship_dir / "labels.json").read_text())["codes"])

    def probabilities(self, sections: Sequence[Mapping[str, str]], batch: int = 512) -> FloatArray:
        texts = [select_text(s, self.vocabulary.config.sections) for s in sections]
        out = []
        for start in range(0, len(texts), batch):
            feed = feed_of(self.input, self.vocabulary, texts[start:start + batch])
            out.append(softmax(self.session.run(["logits"], {self.input.name: feed})[0]))
        return np.concatenate(out) if out else np.zeros((0, len(self.codes)))


def coder_probabilities(coder: TrainedCoder, sections: Sequence[Mapping[str, str]]) -> FloatArray:
    texts = [select_text(s, coder.config.vocabulary.sections) for s in sections]
    return softmax(coder.logits(coder.vocabulary.encode(texts)))


def true_label_probability(probs: FloatArray, codes: Sequence[str],
                           truth: Sequence[str]) -> FloatArray:
    """p(true code) per example; a code outside the model's labels gets the floor."""
    index = {c: i for i, c in enumerate(codes)}
    out = np.full(len(truth), _FLOOR)
    for row, code in enumerate(truth):
        if code in index:
            out[row] = max(_FLOOR, float(probs[row, index[code]]))
    return out
