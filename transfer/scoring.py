"""Coding stays with a verified model: the stay as input, the top-k codes as output.

:func:`load_verified` runs every check of :func:`transfer.deploy.verify_version` and
hands the very bytes that were hashed to onnxruntime; :class:`Coder` turns stays
(:func:`parse_stay`) into the top-k CIM-10 codes with their probabilities and labels, as
Python objects (:meth:`Coder.code`) or as compact JSON texts (:meth:`Coder.code_json`,
what ``predict`` writes and ``serve`` answers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from adapters.onnx_run import feed_of
from passerelle.errors import BadInput
from registry.store import ModelStore, VersionRef
from registry.vocabulary import ALL_SECTIONS
from transfer.deploy import NotVerified, VerifiedModel, verify_version

DEFAULT_TOP_K = 5
MAX_TOP_K = 50
MAX_TEXT_CHARS = 200_000  # one discharge letter; far above any real one


class MalformedStay(BadInput):
    """A stay to code is not an object with ``sections`` or ``text``."""


@dataclass(frozen=True)
class Stay:
    """A stay to code: an optional id and the text the model reads."""

    stay_id: str | None
    text: str


def parse_stay(doc: Any, where: str, sections: Sequence[str]) -> Stay:
    """A stay from JSON: ``{"stay_id"?, "sections": {...}}`` or ``{"stay_id"?, "text"}``
    (or the section keys at the top level, as dataframe columns); else MalformedStay."""
    if isinstance(doc, str):
        doc = {"text": doc}
    if not isinstance(doc, dict):
        raise MalformedStay(f"{where}: a stay must be a JSON object")
    stay_id = doc.get("stay_id")
    if stay_id is not None and not isinstance(stay_id, str):
        raise MalformedStay(f"{where}: stay_id must be a string")
    raw = doc.get("sections")
    if raw is None and not isinstance(doc.get("text"), str):
        raw = {k: doc[k] for k in ALL_SECTIONS if k in doc} or None
    if raw is not None:
        if not isinstance(raw, dict):
            raise MalformedStay(f"{where}: sections must map section names to text")
        parts = [raw.get(name, "") for name in ALL_SECTIONS if name in sections]
        if not all(isinstance(v, str) for v in parts):
            raise MalformedStay(f"{where}: sections must map section names to text")
        text = "\n".join(parts)  # registry.vocabulary.select_text, with the types checked
    elif isinstance(doc.get("text"), str):
        text = doc["text"]
    else:
        raise MalformedStay(f"{where}: a stay needs 'sections' (an object) or 'text'")
    if len(text) > MAX_TEXT_CHARS:
        raise MalformedStay(f"{where}: text longer than {MAX_TEXT_CHARS} characters")
    return Stay(stay_id, text)


def session_options() -> Any:
    """onnxruntime's options for coding: quiet, and its worker threads sleep between runs
    instead of spinning (a hospital's server runs other things)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass(frozen=True)
class Coder:
    """A verified version loaded in onnxruntime: stays -> top-k codes."""

    model: VerifiedModel
    session: Any
    input: Any  # onnxruntime NodeArg of the graph's first input
    output_name: str

    @classmethod
    def load(cls, model: VerifiedModel) -> Coder:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(model.onnx_bytes, session_options(),
                                           providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own classes; nothing was coded
            raise NotVerified(f"{model.info.ref}: onnxruntime cannot load it: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from e
        outputs = [o.name for o in session.get_outputs()]
        output = "logits" if "logits" in outputs else outputs[0]
        return cls(model, session, session.get_inputs()[0], output)

    @property
    def sections(self) -> tuple[str, ...]:
        return tuple(self.model.vocabulary.config.sections)

    def probabilities(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        try:
            feed = feed_of(self.input, self.model.vocabulary, texts)
        except BadInput as refused:
            raise NotVerified(f"{self.model.info.ref}: {refused}") from refused
        logits = np.asarray(self.session.run([self.output_name], {self.input.name: feed})[0],
                            dtype=np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        out: npt.NDArray[np.float32] = e / e.sum(axis=1, keepdims=True)
        if not np.isfinite(out).all():
            raise NotVerified(f"{self.model.info.ref}: the model gave non-finite outputs")
        return out

    def top(self, stays: Sequence[Stay], top_k: int) -> tuple[list[list[int]],
                                                              list[list[float]]]:
        """For each stay, the indices of its top-k codes and their probabilities (6 d.p.)."""
        probs = self.probabilities([s.text for s in stays])
        k = min(top_k, probs.shape[1])
        part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(probs, part, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)
        values = np.round(np.take_along_axis(probs, idx, axis=1).astype(np.float64), 6)
        return idx.tolist(), values.tolist()

    def code(self, stays: Sequence[Stay], top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
        """For each stay: its id and the top-k codes with probability and label."""
        if not stays:
            return []
        idx, values = self.top(stays, top_k)
        codes, labels = self.model.codes, self.model.labels
        return [{"codes": [{"code": codes[j], "label": labels.get(codes[j], ""),
                            "probability": p} for j, p in zip(row, ps, strict=True)],
                 "stay_id": stay.stay_id}
                for stay, row, ps in zip(stays, idx, values, strict=True)]

    def code_json(self, stays: Sequence[Stay], top_k: int = DEFAULT_TOP_K) -> list[str]:
        """:meth:`code` as compact JSON texts (sorted keys), built from per-code fragments."""
        if not stays:
            return []
        idx, values = self.top(stays, top_k)
        frag = self._fragments
        return ['{"codes":[' + ",".join(f"{frag[j]}{p!r}}}" for j, p in zip(row, ps, strict=True))
                + '],"stay_id":' + json.dumps(stay.stay_id, ensure_ascii=False) + "}"
                for stay, row, ps in zip(stays, idx, values, strict=True)]

    @property
    def _fragments(self) -> list[str]:
        cached = self.__dict__.get("_frag")
        if cached is None:
            cached = ['{"code":' + json.dumps(c, ensure_ascii=False) + ',"label":'
                      + json.dumps(self.model.labels.get(c, ""), ensure_ascii=False)
                      + ',"probability":' for c in self.model.codes]
            object.__setattr__(self, "_frag", cached)
        return cached


def check_top_k(k: int) -> int:
    if not 1 <= k <= MAX_TOP_K:
        raise BadInput(f"top-k must be between 1 and {MAX_TOP_K}")
    return k


def load_verified(store: ModelStore, ref: VersionRef) -> Coder:
    """Verify ``ref`` (:func:`verify_version`) and load it in onnxruntime."""
    return Coder.load(verify_version(store, ref))
