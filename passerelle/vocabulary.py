"""The tokenizer and vocabulary: how a stay becomes a model's input, on both sides.

Both sites encode alike from this module (the source site builds the vocabulary with
:func:`registry.vocabulary.build_vocabulary`; the receiving site only loads and encodes).

How the vocabulary is built, and its privacy-conscious defaults: registry.vocabulary.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from passerelle.errors import ModelDirError

FORMAT = "passerelle-vocabulary"
FORMAT_VERSION = 1
PAD, OOV = 0, 1
RESERVED = ("<pad>", "<oov>")
_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)

ALL_SECTIONS = ("header", "motif", "antecedents", "examen", "conclusion", "actes")
CLINICAL_SECTIONS = ("motif", "antecedents", "examen", "conclusion", "actes")


@dataclass(frozen=True)
class VocabularyConfig:
    """How the vocabulary is built; stored with it so a receiving site encodes alike."""

    min_patients: int = 5
    drop_identifiers: bool = True
    max_size: int = 5000
    max_len: int = 256
    sections: tuple[str, ...] = CLINICAL_SECTIONS

    def __post_init__(self) -> None:
        if self.min_patients < 1:
            raise ValueError("min_patients must be at least 1")
        if self.max_size < len(RESERVED) + 1:
            raise ValueError("max_size is too small")
        if self.max_len < 1:
            raise ValueError("max_len must be positive")
        unknown = set(self.sections) - set(ALL_SECTIONS)
        if unknown or not self.sections:
            raise ValueError(f"sections must be a non-empty subset of {ALL_SECTIONS}")


@dataclass(frozen=True)
class VocabularyStats:
    """Counts of what the filters removed (never the tokens themselves)."""

    candidate_tokens: int
    dropped_rare: int
    dropped_identifier: int
    dropped_over_size: int


@dataclass(frozen=True)
class Vocabulary:
    """An ordered token list; index 0 is padding, 1 is out-of-vocabulary."""

    tokens: tuple[str, ...]
    config: VocabularyConfig
    stats: VocabularyStats
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tokens[: len(RESERVED)] != RESERVED:
            raise ValueError("vocabulary must start with the reserved tokens")
        index = {t: i for i, t in enumerate(self.tokens)}
        if len(index) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.int32]:
        """Token ids, shape (len(texts), max_len), zero-padded, truncated at max_len."""
        out = np.zeros((len(texts), self.config.max_len), dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self._index.get(t, OOV) for t in tokenize(text)][: self.config.max_len]
            out[row, : len(ids)] = ids
        return out

    def bag_of_words(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Token frequencies (each row sums to 1 over known tokens), shape (n, len(self))."""
        ids = self.encode(texts)
        out = np.zeros((len(texts), len(self)), dtype=np.float32)
        for row in range(ids.shape[0]):
            known = ids[row][ids[row] > OOV]
            if known.size:
                np.add.at(out[row], known, 1.0 / known.size)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": {**asdict(self.config), "sections": list(self.config.sections)},
            "stats": asdict(self.stats),
            "tokens": list(self.tokens),
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
                raise ValueError("not a passerelle vocabulary (format or version)")
            cfg = dict(doc["config"])
            cfg["sections"] = tuple(cfg["sections"])
            tokens = doc["tokens"]
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise ValueError("tokens must be a list of strings")
            return cls(
                tokens=tuple(tokens),
                config=VocabularyConfig(**cfg),
                stats=VocabularyStats(**doc["stats"]),
            )
        except FileNotFoundError as e:
            raise ModelDirError(f"{path}: vocabulary file is missing") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelDirError(f"{path}: unreadable vocabulary: {e}") from e


def normalise(text: str) -> str:
    """NFC, lower case: the only normalisation, so a receiving site reproduces it."""
    return unicodedata.normalize("NFC", text).lower()


def tokenize(text: str) -> list[str]:
    """Split on anything that is not a letter or digit (accents kept)."""
    return _TOKEN.findall(normalise(text))


def select_text(sections: Mapping[str, str], wanted: Iterable[str]) -> str:
    """The text the model reads: the wanted sections, in document order."""
    return "\n".join(sections.get(name, "") for name in ALL_SECTIONS if name in set(wanted))


