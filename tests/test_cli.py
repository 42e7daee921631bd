"""The command-line contract: exit codes, one-line errors, --json, --help texts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from passerelle import steps
from passerelle.cli import main
from tests.conftest import OVERRIDE_ARGS


def run(*argv: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point in a new process, as a user would run it."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if home is not None:
        env["PASSERELLE_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "passerelle.cli", *argv], capture_output=True,
                          text=True, env=env, timeout=600, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and text in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_help_lists_the_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("data", "model", "demo"):
        assert command in proc.stdout


def test_usage_error_is_one_line_and_exit_2() -> None:
    assert_one_line_error(run("model", "export"), 2, "required")
    assert_one_line_error(run("data", "generate", "--site", "Z", "--stays", "3", "--seed", "1",
                              "--out", "x"), 2, "invalid choice")


def test_data_generate_under_a_file_is_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    proc = run("data", "generate", "--site", "X", "--stays", "5", "--seed", "1",
               "--out", str(tmp_path / "a-file" / "corpus"))
    assert_one_line_error(proc, 2, "a-file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_data_generate_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("mine")
    proc = run("data", "generate", "--site", "Y", "--stays", "5", "--seed", "1",
               "--out", str(tmp_path))
    assert_one_line_error(proc, 2, "not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_train_on_a_missing_corpus_is_bad_input(tmp_path: Path) -> None:
    assert_one_line_error(run("model", "train", "--data", str(tmp_path / "missing"), "--out",
                              str(tmp_path / "m")), 2, "missing")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_register_corrupt_model_dir_is_one_line_exit_2(
    keras_model: steps.TrainReport, tmp_path: Path, home: Path
) -> None:
    copy = tmp_path / "m"
    shutil.copytree(keras_model.out_dir, copy)
    (copy / "vocabulary.json").write_text("{}")
    proc = run("model", "register", str(copy), "--name", "c", "--purpose", "p",
               "--legal-basis", "b", home=home)
    assert_one_line_error(proc, 2, "vocabulary.json does not match its digest")
    proc = run("model", "register", str(tmp_path / "nope"), "--name", "c", "--purpose", "p",
               "--legal-basis", "b", home=home)
    assert_one_line_error(proc, 2, "no such folder")


@pytest.mark.slow
def test_export_unknown_model_is_one_line_exit_2(home: Path, tmp_path: Path) -> None:
    proc = run("model", "export", "ghost/3", "--out", str(tmp_path / "o"), home=home)
    assert_one_line_error(proc, 2, "no registered model version ghost/3")
    proc = run("model", "export", "ghost", "--out", str(tmp_path / "o"), home=home)
    assert_one_line_error(proc, 2, "is not NAME/VERSION")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_source_side_story_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "site-x"
    home.mkdir()  # a home without a site identity: acts there leave no record
    data = tmp_path / "data"
    assert main(["data", "generate", "--site", "X", "--stays", "600", "--seed", "5", "--out",
                 str(data), "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["stays"] == 600 and gen["site"] == "X"

    assert main(["model", "train", "--data", str(data), "--out", str(tmp_path / "m"),
                 "--epochs", "2", "--max-len", "64", "--min-patients", "3", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["accuracy"][0]["split"] == "held-out"

    assert main(["model", "register", str(tmp_path / "m"), "--name", "coder", "--purpose",
                 "PMSI coding", "--legal-basis", "GDPR 6(1)(e)", "--data", str(data),
                 "--home", str(home), "--json"]) == 0
    reg = json.loads(capsys.readouterr().out)
    assert reg["version"] == "1"
    assert reg["tags"]["passerelle.training_site"] == "X"

    assert main(["model", "export", "coder/1", "--out", str(tmp_path / "e"), "--home",
                 str(home), "--json", *OVERRIDE_ARGS]) == 0
    exp = json.loads(capsys.readouterr().out)
    assert exp["parity"]["top1_agreement"] == 1.0
    assert (tmp_path / "e" / "model.onnx").is_file()
