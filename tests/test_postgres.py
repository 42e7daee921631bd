"""The same registry story through a real MLflow tracking server whose backend store is
PostgreSQL (127.0.0.1:5432). These tests fail, never skip, when PostgreSQL is down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy

from passerelle import steps
from passerelle.cli import main
from tests.conftest import OVERRIDE_ARGS

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.xdist_group("mlflow_server")]


def test_register_and_export_through_an_mlflow_server_on_postgres(
    mlflow_server: str, postgres_db: str, keras_model: steps.TrainReport, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    home = tmp_path / "home"
    home.mkdir()
    assert main(["model", "register", str(keras_model.out_dir), "--name", "pg-coder",
                 "--purpose", "PMSI coding", "--legal-basis", "GDPR 6(1)(e)", "--home",
                 str(home), "--json"]) == 0
    reg = json.loads(capsys.readouterr().out)
    assert reg["tracking_uri"] == mlflow_server
    assert main(["model", "export", f"pg-coder/{reg['version']}", "--out",
                 str(tmp_path / "e"), "--home", str(home), "--json", *OVERRIDE_ARGS]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert not (home / "mlflow.db").exists(), "the SQLite default must not be used"

    # The version and its provenance really are rows in PostgreSQL.
    engine = sqlalchemy.create_engine(postgres_db)
    with engine.connect() as conn:
        rows = dict(conn.execute(sqlalchemy.text(
            "SELECT key, value FROM model_version_tags WHERE name = 'pg-coder' "
            "AND version = :v"), {"v": int(reg["version"])}).all())
    engine.dispose()
    assert rows["passerelle.purpose"] == "PMSI coding"
    assert rows["passerelle.training_site"] == "X"
    assert rows["passerelle.onnx_digest"] == exported["onnx_digest"]
