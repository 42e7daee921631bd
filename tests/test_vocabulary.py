"""The vocabulary's privacy-conscious defaults, and that each can be turned off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from passerelle.errors import ModelDirError
from registry.vocabulary import (
    OOV,
    PAD,
    Vocabulary,
    VocabularyConfig,
    build_vocabulary,
    select_text,
    tokenize,
)


def test_tokenize_keeps_accents_and_splits_on_punctuation() -> None:
    assert tokenize("Douleur thoracique, fièvre à 39°C; IDM-ST+") == [
        "douleur", "thoracique", "fièvre", "à", "39", "c", "idm", "st"]


def _corpus() -> tuple[list[str], list[str]]:
    texts, patients = [], []
    for i in range(10):  # "toux" is seen for 10 patients, "rare" for 1
        texts.append("toux fébrile dupont" + (" rare" if i == 0 else ""))
        patients.append(f"P{i}")
    texts.append("toux 1840512345678 jean.dupont@example.fr 1957")  # identifiers, 1 patient
    patients.append("P0")
    for i in range(10):
        texts.append("nir 1840512345678 né en 1957")  # identifiers seen for 10 patients
        patients.append(f"P{i}")
    return texts, patients


def test_rare_tokens_need_k_distinct_patients() -> None:
    texts, patients = _corpus()
    vocab = build_vocabulary(texts, patients, VocabularyConfig(min_patients=5))
    assert "toux" in vocab.tokens
    assert "rare" not in vocab.tokens
    assert vocab.stats.dropped_rare >= 1
    # one patient with many stays counts once
    many = build_vocabulary(["souffle"] * 20, ["P1"] * 20, VocabularyConfig(min_patients=2))
    assert "souffle" not in many.tokens


def test_identifier_shaped_tokens_are_dropped_by_default() -> None:
    texts, patients = _corpus()
    vocab = build_vocabulary(texts, patients, VocabularyConfig(min_patients=5))
    assert "1840512345678" not in vocab.tokens
    assert "1957" not in vocab.tokens
    assert "dupont" not in vocab.tokens  # a last name from the maintained list
    assert vocab.stats.dropped_identifier >= 3


def test_defaults_can_be_turned_off_for_a_leaky_model() -> None:
    texts, patients = _corpus()
    leaky = build_vocabulary(texts, patients,
                             VocabularyConfig(min_patients=1, drop_identifiers=False))
    for token in ("rare", "1840512345678", "1957", "dupont"):
        assert token in leaky.tokens


def test_header_is_not_read_by_default() -> None:
    sections = {"header": "Nom : DURAND Paul", "motif": "dyspnée", "conclusion": "OAP"}
    assert "DURAND" not in select_text(sections, VocabularyConfig().sections)
    assert "DURAND" in select_text(sections, ("header", "motif"))


def test_encode_pads_truncates_and_marks_unknown() -> None:
    vocab = build_vocabulary(["a b c"] * 3, ["P1", "P2", "P3"],
                             VocabularyConfig(min_patients=1, max_len=4))
    ids = vocab.encode(["a b zz", "a b c a b c"])
    assert ids.shape == (2, 4) and ids.dtype == np.int32
    assert ids[0, 2] == OOV and ids[0, 3] == PAD
    assert (ids[1] > OOV).all()


def test_vocabulary_round_trips_and_refuses_garbage(tmp_path: Path) -> None:
    vocab = build_vocabulary(["a b c"] * 3, ["P1", "P2", "P3"], VocabularyConfig(min_patients=1))
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == vocab
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ModelDirError):
        Vocabulary.load(tmp_path / "bad.json")
    with pytest.raises(ModelDirError):
        Vocabulary.load(tmp_path / "missing.json")
