"""The reference PMSI coder: held-out by patient, accuracy measured, directory verified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from passerelle import steps
from passerelle.errors import BadInput, ModelDirError
from registry.coder import Examples, split_by_patient
from registry.model_dir import METADATA, open_model_dir

pytestmark = pytest.mark.slow


def test_heldout_split_never_shares_a_patient() -> None:
    ex = Examples(sections=tuple({} for _ in range(40)), codes=("A00",) * 40,
                  patient_ids=tuple(f"P{i // 3}" for i in range(40)), site="X")
    train, held = split_by_patient(ex, 0.25, seed=1)
    assert {ex.patient_ids[i] for i in train}.isdisjoint({ex.patient_ids[i] for i in held})
    assert sorted(train + held) == list(range(40))


def test_keras_coder_learns_and_reports_both_sites(keras_model: steps.TrainReport) -> None:
    by_site = {a.site: a for a in keras_model.accuracy}
    assert set(by_site) == {"X", "Y"}
    x, y = by_site["X"], by_site["Y"]
    assert x.split == "held-out" and x.stays > 100
    chance = 1 / keras_model.classes
    assert x.top1 > 10 * chance, "the coder did not learn"
    assert x.top1 < 0.995, "held-out accuracy this high means the task is trivial or leaks"
    assert x.top5 >= x.top1
    assert y.top1 < x.top1, "site Y's writing and case mix should cost accuracy"


def test_logreg_coder_learns(logreg_model: steps.TrainReport) -> None:
    (x,) = logreg_model.accuracy
    assert x.top1 > 10 / logreg_model.classes


def test_model_dir_lists_every_file_with_its_digest(keras_model: steps.TrainReport) -> None:
    model_dir = open_model_dir(keras_model.out_dir)
    assert set(model_dir.metadata.files) == {"model.keras", "vocabulary.json", "labels.json",
                                             "parity_inputs.npy"}
    training = model_dir.metadata.training
    assert training["site"] == "X"
    assert training["dataset_fingerprint"].startswith("sha256:")
    ids = np.load(keras_model.out_dir / "parity_inputs.npy")
    assert ids.dtype == np.int32 and ids.shape[1] == 128


def test_corrupt_model_dir_is_refused(keras_model: steps.TrainReport, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(keras_model.out_dir, copy)
    with (copy / "labels.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ModelDirError, match=r"labels\.json does not match its digest"):
        open_model_dir(copy)
    (copy / METADATA).write_text("{not json")
    with pytest.raises(ModelDirError, match="unreadable model metadata"):
        open_model_dir(copy)
    with pytest.raises(ModelDirError, match="no such model directory"):
        open_model_dir(tmp_path / "nowhere")


def test_training_refuses_a_non_empty_out_dir_and_leaves_it(corpus_x: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    from tests.conftest import small_config

    with pytest.raises(BadInput, match="not an empty directory"):
        steps.train_model(corpus_x, out, small_config())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]


def test_metrics_are_recorded_in_the_model_dir(keras_model: steps.TrainReport) -> None:
    doc = json.loads((keras_model.out_dir / METADATA).read_text())
    sites = [m["site"] for m in doc["metrics"]["accuracy"]]
    assert sites == ["X", "Y"]
