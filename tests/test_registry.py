"""Registration in a real MLflow store (SQLite here; PostgreSQL in test_postgres.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from passerelle import steps
from passerelle.cli import main
from passerelle.errors import BadInput, ModelDirError, ModelNotFound
from registry.store import TAG, ModelStore, VersionRef

pytestmark = pytest.mark.slow


def _register(store: ModelStore, model: Path, data: Path | None = None) -> str:
    info = steps.register_model(store, model, "pmsi-coder", "PMSI coding assistance",
                                "GDPR 6(1)(e)", data, "CHU X")
    return info.ref.version


def test_register_records_provenance_as_version_tags(
    home: Path, keras_model: steps.TrainReport, corpus_x: Path
) -> None:
    store = ModelStore(home)
    assert store.uri == f"sqlite:///{home.resolve() / 'mlflow.db'}"
    assert _register(store, keras_model.out_dir, corpus_x) == "1"
    assert _register(store, keras_model.out_dir) == "2"
    tags = store.get(VersionRef("pmsi-coder", "1")).tags
    from passerelle.corpus import manifest_digest

    assert tags[TAG + "dataset_fingerprint"] == manifest_digest(corpus_x)
    assert tags[TAG + "purpose"] == "PMSI coding assistance"
    assert tags[TAG + "legal_basis"] == "GDPR 6(1)(e)"
    assert tags[TAG + "data_controller"] == "CHU X"
    assert tags[TAG + "training_site"] == "X"
    assert tags[TAG + "privacy_unit"] == "patient"
    assert tags[TAG + "model_dir_digest"].startswith("sha256:")
    assert (home / "mlartifacts").is_dir()
    assert store.versions("pmsi-coder") == ["1", "2"]


def test_register_with_the_wrong_corpus_is_refused_and_registers_nothing(
    home: Path, keras_model: steps.TrainReport, corpus_y: Path
) -> None:
    store = ModelStore(home)
    with pytest.raises(BadInput, match="was not trained on"):
        _register(store, keras_model.out_dir, corpus_y)
    assert store.versions("pmsi-coder") == []


def test_corrupt_model_dir_registers_nothing(
    home: Path, keras_model: steps.TrainReport, tmp_path: Path
) -> None:
    copy = tmp_path / "m"
    shutil.copytree(keras_model.out_dir, copy)
    (copy / "model.keras").write_bytes(b"not a model")
    store = ModelStore(home)
    with pytest.raises(ModelDirError):
        _register(store, copy)
    assert store.versions("pmsi-coder") == []
    assert store.client.search_runs([store._experiment()]) == []


def test_unknown_model_or_version_is_reported(home: Path) -> None:
    store = ModelStore(home)
    with pytest.raises(ModelNotFound, match="no registered model version nope/1"):
        store.get(VersionRef("nope", "1"))
    with pytest.raises(BadInput, match="is not NAME/VERSION"):
        VersionRef.parse("no-version")


def test_unreachable_tracking_server_is_one_line_error(
    monkeypatch: pytest.MonkeyPatch, keras_model: steps.TrainReport, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    (tmp_path / "h").mkdir()
    code = main(["model", "register", str(keras_model.out_dir), "--name", "c", "--purpose",
                 "p", "--legal-basis", "b", "--home", str(tmp_path / "h")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: model registry at http://127.0.0.1:9")


def test_the_registry_keeps_its_own_copy_of_a_registered_model_directory(
        home: Path, keras_model: steps.TrainReport, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(keras_model.out_dir, model)
    store = ModelStore(home)
    _register(store, model)
    stored = sorted((home / "mlartifacts").rglob("model/labels.json"))
    assert len(stored) == 1
    before = stored[0].read_bytes()
    (model / "labels.json").write_bytes(b"edited by hand after registration")
    assert stored[0].read_bytes() == before  # a copy, not a hard link to the vendor's file
    assert stored[0].stat().st_ino != (model / "labels.json").stat().st_ino


def test_a_password_that_mlflow_quotes_in_its_own_error_is_redacted() -> None:
    """MLflow's errors quote the whole tracking URL, password included: the one-line
    error keeps the user name and the host, never the password."""
    from mlflow.exceptions import MlflowException

    from passerelle.errors import RegistryError
    from registry.store import _store_errors

    uri = "http://vendor:s3cret@127.0.0.1:9"
    with pytest.raises(RegistryError) as caught, _store_errors(uri):
        raise MlflowException(f"API request to {uri}/api/2.0/mlflow/runs/get failed")
    assert "s3cret" not in str(caught.value)
    assert "vendor:***@127.0.0.1:9/api" in str(caught.value)


@pytest.mark.parametrize(("uri", "shown"), [
    ("postgresql://mlflow@db/mlflow?password=s3cret&sslmode=require",
     "postgresql://mlflow@db/mlflow?password=***&sslmode=require"),
    ("postgresql://mlflow@db/mlflow?sslmode=require&PASSWORD=s3cret",
     "postgresql://mlflow@db/mlflow?sslmode=require&PASSWORD=***"),
    ("http://vendor:s3cret@host:5000/?token=s3cret", "http://vendor:***@host:5000/?token=***"),
    ("https://host/api?api_key=s3cret;x=1", "https://host/api?api_key=***;x=1"),
    ("sqlite:///home/mlflow.db", "sqlite:///home/mlflow.db"),
])
def test_a_password_in_a_query_string_is_redacted_too(uri: str, shown: str) -> None:
    from registry.store import _redact

    assert _redact(uri) == shown
    assert _redact(f"API request to {uri} failed") == f"API request to {shown} failed"
