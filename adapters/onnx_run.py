"""ONNX models run in onnxruntime on the CPU: the reference every other runner (the
source framework at export, the TensorFlow executor at fine-tuning) is compared with."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

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
