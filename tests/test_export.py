"""ONNX export: checker, parity with the source framework, model card, logged on the version,
and refusals that leave nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from passerelle import steps
from passerelle.cli import main
from passerelle.errors import BadInput, ModelDirError, ModelNotFound, ParityError
from registry.coder import load_source_model
from registry.export import PARITY_TOLERANCE, check_parity
from registry.model_dir import Framework, file_digests, open_model_dir, write_metadata
from registry.store import TAG, ModelStore, VersionRef
from tests.conftest import TEST_OVERRIDE

pytestmark = pytest.mark.slow


def _registered(home: Path, model: Path) -> tuple[ModelStore, VersionRef]:
    store = ModelStore(home)
    info = steps.register_model(store, model, "coder", "PMSI coding", "GDPR 6(1)(e)")
    return store, info.ref


@pytest.mark.parametrize("which", ["keras_model", "logreg_model"])
def test_export_passes_checker_and_parity_and_is_logged(
    which: str, request: pytest.FixtureRequest, home: Path, tmp_path: Path
) -> None:
    report: steps.TrainReport = request.getfixturevalue(which)
    store, ref = _registered(home, report.out_dir)
    out = tmp_path / "export"
    result = steps.export_model(store, ref, out, TEST_OVERRIDE)

    assert sorted(p.name for p in out.iterdir()) == [
        "labels.json", "model.onnx", "model_card.json", "vocabulary.json"]
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx", "ai.onnx.ml"}
    assert result.parity.max_abs_diff <= PARITY_TOLERANCE
    assert result.parity.top1_agreement == 1.0
    assert result.parity.inputs >= 100

    # Independent check: onnxruntime on the exported file against the source model.
    model_dir = open_model_dir(report.out_dir)
    ids = np.load(report.out_dir / "parity_inputs.npy")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    if model_dir.metadata.framework is Framework.KERAS:
        keras = load_source_model(model_dir.model_file, Framework.KERAS)
        expected = keras(ids, training=False).numpy()
        got = session.run(["logits"], {"token_ids": ids})[0]
    else:
        from registry.coder import bag_of_words
        from registry.vocabulary import Vocabulary

        vocab = Vocabulary.load(report.out_dir / "vocabulary.json")
        sk = load_source_model(model_dir.model_file, Framework.SKLEARN)
        bow = bag_of_words(ids, len(vocab))
        expected = sk.decision_function(bow)
        got = session.run(["logits"], {"bag_of_words": bow})[0]
    assert np.abs(expected - got).max() <= PARITY_TOLERANCE
    assert (expected.argmax(1) == got.argmax(1)).all()

    card = json.loads((out / "model_card.json").read_text())
    assert card["model"] == {"name": "coder", "version": "1", "architecture":
                             model_dir.metadata.architecture,
                             "source_framework": model_dir.metadata.framework.value,
                             "source": "model-train"}
    assert card["preprocessing"]["input_kind"] == model_dir.metadata.input_kind.value
    assert card["preprocessing"]["input_dtype"] == model_dir.metadata.dtype.value
    assert card["onnx"]["digest"] == result.onnx_digest
    assert card["provenance"]["dataset_fingerprint"].startswith("sha256:")
    assert card["files"]["model.onnx"] == result.onnx_digest

    info = store.get(ref)
    assert info.tags[TAG + "onnx_digest"] == result.onnx_digest
    assert float(info.tags[TAG + "parity_max_abs_diff"]) <= PARITY_TOLERANCE
    logged = {f.path for f in store.client.list_artifacts(info.run_id, "onnx")}
    assert logged == {f"onnx/{n}" for n in ("labels.json", "model.onnx", "model_card.json",
                                            "vocabulary.json")}
    assert not list(tmp_path.glob(".passerelle-export-*")), "temporary folder left behind"


def test_export_never_ships_held_out_inputs(keras_model: steps.TrainReport, home: Path,
                                            tmp_path: Path) -> None:
    store, ref = _registered(home, keras_model.out_dir)
    steps.export_model(store, ref, tmp_path / "e", TEST_OVERRIDE)
    assert not (tmp_path / "e" / "parity_inputs.npy").exists()
    card = (tmp_path / "e" / "model_card.json").read_text()
    assert "parity_inputs" not in card


def _amplified_copy(src: Path, dst: Path, factor: float) -> Path:
    """The same Keras model with its output layer scaled: the logits reach ~1e6, where
    float32 summation order alone (TensorFlow vs onnxruntime) moves them by more than 1e-4."""
    shutil.copytree(src, dst)
    model_dir = open_model_dir(dst)
    keras = load_source_model(model_dir.model_file, Framework.KERAS)
    layer = keras.get_layer("logits")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * factor, bias * factor])
    keras.save(dst / "model.keras")
    meta = model_dir.metadata
    write_metadata(dst, type(meta)(
        framework=meta.framework, architecture=meta.architecture, input_kind=meta.input_kind,
        codes=meta.codes, training=meta.training, metrics=meta.metrics,
        files=file_digests(dst, list(meta.files))))
    return dst


def test_a_model_that_fails_parity_is_refused_at_registration_and_leaves_nothing(
    keras_model: steps.TrainReport, home: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = _amplified_copy(keras_model.out_dir, tmp_path / "amplified", 1e6)
    store = ModelStore(home)
    with pytest.raises(ParityError, match="parity failed"):
        steps.register_model(store, model, "coder", "PMSI coding", "GDPR 6(1)(e)")
    # Through the command line: exit 1 (refused) and one line.
    code = main(["model", "register", str(model), "--name", "coder", "--purpose", "p",
                 "--legal-basis", "b", "--home", str(home)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: ONNX parity failed"), err
    assert store.versions("coder") == []
    assert not (home / ".intake").exists()
    assert not (home / "mlartifacts").exists() or not any((home / "mlartifacts").rglob("*.onnx"))


def test_check_parity_flags_a_single_flipped_top1() -> None:
    a = np.array([[1.0, 0.0], [0.5, 0.50001]], dtype=np.float32)
    b = a.copy()
    assert check_parity(a, b).passed
    b[1] = [0.50001, 0.5]
    p = check_parity(a, b)
    assert p.max_abs_diff <= PARITY_TOLERANCE and p.top1_agreement == 0.5 and not p.passed


def test_export_refuses_a_non_empty_destination(keras_model: steps.TrainReport, home: Path,
                                                tmp_path: Path) -> None:
    store, ref = _registered(home, keras_model.out_dir)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(BadInput, match="not an empty directory"):
        steps.export_model(store, ref, out, TEST_OVERRIDE)
    assert [p.name for p in out.iterdir()] == ["x"]
    assert TAG + "onnx_digest" not in store.get(ref).tags


def test_export_of_an_unknown_version_is_bad_input(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        steps.export_model(ModelStore(home), VersionRef("coder", "9"), tmp_path / "o",
                           TEST_OVERRIDE)
    assert not (tmp_path / "o").exists()


def test_export_refuses_a_model_changed_in_the_store_after_registration(
    keras_model: steps.TrainReport, home: Path, tmp_path: Path
) -> None:
    store, ref = _registered(home, keras_model.out_dir)
    stored = next((home / "mlartifacts").rglob("model/labels.json"))
    stored.write_text(stored.read_text().replace('"codes"', '"codes" ', 1))
    with pytest.raises(ModelDirError, match=r"labels\.json does not match its digest"):
        steps.export_model(store, ref, tmp_path / "e", TEST_OVERRIDE)
    assert not (tmp_path / "e").exists()
    assert TAG + "onnx_digest" not in store.get(ref).tags
