"""ONNX models run in onnxruntime on the CPU: the reference every other runner (the
source framework at export, the TensorFlow executor at fine-tuning) is compared with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from passerelle.errors import BadInput
from passerelle.vocabulary import Vocabulary

PARITY_TOLERANCE = 1e-4
"""Largest |logit difference| allowed between two runners of the same model."""


def run_onnx(model_bytes: bytes, inputs: npt.NDArray[Any],
             output: str | None = "logits") -> npt.NDArray[np.float32]:
    """Logits from onnxruntime on the CPU (``output``: None for the graph's first)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    wanted = output or session.get_outputs()[0].name
    return np.asarray(session.run([wanted], {name: inputs})[0], dtype=np.float32)


_FEED_DTYPES: dict[str, Any] = {"tensor(int32)": np.int32, "tensor(int64)": np.int64,
                                "tensor(float)": np.float32}


def feed_of(session_input: Any, vocabulary: Vocabulary,
            texts: Sequence[str]) -> npt.NDArray[Any]:
    """The texts as an onnxruntime session's first input takes them, read from the graph
    itself: token ids in the input's integer type (int32 or int64: a PyTorch export takes
    int64), or the vocabulary's bag of words for a float input, whose width must be the
    vocabulary's size. Anything else is refused (BadInput), never guessed."""
    dtype = _FEED_DTYPES.get(str(session_input.type))
    if dtype is None:
        raise BadInput(f"the model's input {session_input.name!r} is {session_input.type}; "
                       "token ids (int32/int64) or a bag of words (float) expected")
    if dtype is np.float32:
        width = session_input.shape[-1] if session_input.shape else None
        if isinstance(width, int) and width != len(vocabulary):
            raise BadInput(f"the model reads a bag of {width} words, the vocabulary has "
                           f"{len(vocabulary)} tokens")
        return vocabulary.bag_of_words(texts)
    return vocabulary.encode(texts).astype(dtype)
