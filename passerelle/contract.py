"""What both sides agree on about a model: the input kinds, the privacy units and the names
of the files that ship beside the ONNX graph.

The source side (registry/) writes these, the receiving side (adapters/, transfer/) reads
them; neither imports the other for them.
"""

from __future__ import annotations

from enum import StrEnum

ONNX_FILE = "model.onnx"
VOCABULARY = "vocabulary.json"
LABELS = "labels.json"
CARD_FILE = "model_card.json"


class InputKind(StrEnum):
    """What the model takes: token ids (n, max_len) int32, or token frequencies (n, V)."""

    TOKEN_IDS = "token_ids"  # noqa: S105 - not a password
    BAG_OF_WORDS = "bag_of_words"


class PrivacyUnit(StrEnum):
    """What one person's data is: all stays of a patient, or one stay."""

    PATIENT = "patient"
    STAY = "stay"
