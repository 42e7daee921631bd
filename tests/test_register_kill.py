"""A ``model register`` killed (SIGKILL) at any moment leaves a consistent state: a
killed intake leaves only its private staging folder, a register killed between its
version and its ledger record leaves a version that audit, export and bundle create
refuse, and the next register of the same name removes both, keeps a live concurrent
register's folder, and the ledger verifies.

The command runs as a real CLI subprocess; test hooks (registry.store.
SLEEP_BEFORE_RECORD_ENV, passerelle.steps.SLEEP_IN_STAGING_ENV) hold it at the point
where it is killed."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from passerelle.cli import main
from passerelle.leftovers import LOCK_FILE
from passerelle.steps import SLEEP_IN_STAGING_ENV, STAGING_DIR, STAGING_PREFIX
from registry.store import REGISTER_TAG, ModelStore, VersionRef, run_mark
from tests.intake_support import torch_onnx_files
from tests.transfer_support import make_site, received_home
from transfer.ledger_site import open_ledger
from transfer.records import RecordKind

pytestmark = [pytest.mark.xdist_group("intake")]

NAME = "pmsi-coder"


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The vendor's tiny ONNX, manifest, vocabulary and labels, and its corpus."""
    return torch_onnx_files(tmp_path_factory.mktemp("vendor"))


def _register_args(home: Path, vendor: tuple[Path, Path]) -> list[str]:
    folder, data = vendor
    return ["model", "register", str(folder / "model.onnx"), "--name", NAME,
            "--purpose", "PMSI coding", "--legal-basis", "GDPR 6(1)(e)",
            "--manifest", str(folder / "manifest.json"), "--data", str(data),
            "--home", str(home)]


def _killed(argv: list[str], hook: str, reached: Callable[[], bool]) -> None:
    """Run the CLI with the sleep ``hook``, wait until ``reached()``, SIGKILL it."""
    env = {**os.environ, hook: "60"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "passerelle.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not reached():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never reached the hook"
            time.sleep(0.1)
        time.sleep(1.0)  # now sleeping in the hook
        assert proc.poll() is None, proc.communicate()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _staged(home: Path) -> list[Path]:
    return sorted((home / STAGING_DIR).glob(STAGING_PREFIX + "*"))


def _versions_in_db(home: Path) -> int:
    try:
        with sqlite3.connect(home / "mlflow.db", timeout=5) as db:
            return int(db.execute("select count(*) from model_versions").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # not created yet


def _registered_records(home: Path) -> list[tuple[str, str]]:
    with open_ledger(home) as ledger:
        return [(str(r.fields["model"]), str(r.fields["version"]))
                for r in ledger.records(kind=RecordKind.MODEL_REGISTERED)]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def test_register_killed_while_staging_registers_nothing_and_the_next_cleans(
        tmp_path: Path, vendor: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    home = make_site(tmp_path, "X").home
    _killed(_register_args(home, vendor), SLEEP_IN_STAGING_ENV,
            lambda: any((p / "model").is_dir() and any((p / "model").iterdir())
                        for p in _staged(home)))
    [stale] = _staged(home)
    assert stat.S_IMODE(stale.stat().st_mode) == 0o700
    assert _versions_in_db(home) == 0
    assert _registered_records(home) == []

    # A live register's staging folder (its lock held) is kept by the next one.
    live = home / STAGING_DIR / f"{STAGING_PREFIX}live"
    live.mkdir(mode=0o700)
    with (live / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        code, err = _run(_register_args(home, vendor), capsys)
        assert code == 0, err
        assert _staged(home) == [live]
    assert ModelStore(home).versions(NAME) == ["1"]
    assert _registered_records(home) == [(NAME, "1")]
    code, err = _run(["records", "verify", "--home", str(home)], capsys)
    assert code == 0, err


def test_register_killed_before_its_record_is_refused_then_removed(
        tmp_path: Path, vendor: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    from registry.store import SLEEP_BEFORE_RECORD_ENV

    home = make_site(tmp_path, "X").home
    _killed(_register_args(home, vendor), SLEEP_BEFORE_RECORD_ENV,
            lambda: _versions_in_db(home) > 0)
    store = ModelStore(home)
    assert store.versions(NAME) == ["1"]  # a version the ledger never recorded
    assert _registered_records(home) == []
    leftover = store.get(VersionRef(NAME, "1"))
    artifacts = Path(leftover.source.removeprefix("file://")).parent
    assert artifacts.is_dir()
    assert len(_staged(home)) == 1

    # Nothing uses it until it is removed: one error line, exit 2, before any work.
    data = vendor[1]
    refused = [
        ["model", "export", f"{NAME}/1", "--out", str(tmp_path / "export"), "--override",
         "--approver", "A", "--justification", "J"],
        ["model", "audit", f"{NAME}/1", "--members", str(data), "--nonmembers", str(data),
         "--out", str(tmp_path / "audit")],
        ["bundle", "create", f"{NAME}/1", "--to", "Y", "--out", str(tmp_path / "b.bundle")],
    ]
    for argv in refused:
        code, err = _run([*argv, "--home", str(home)], capsys)
        assert code == 2, (argv, err)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
        assert "killed `passerelle model register`" in err, err
    assert not (tmp_path / "export").exists() and not (tmp_path / "audit").exists()
    assert not (tmp_path / "b.bundle").exists()
    # A key rotation changes the fingerprint in the run's tag, not the refusal.
    code, err = _run(["site", "rotate", "--home", str(home)], capsys)
    assert code == 0, err
    code, err = _run([*refused[0], "--home", str(home)], capsys)
    assert code == 2 and "killed `passerelle model register`" in err, err
    assert not (tmp_path / "export").exists()

    code, err = _run(_register_args(home, vendor), capsys)
    assert code == 0, err
    assert f"removed version {NAME}/1" in err
    assert store.versions(NAME) == ["2"]  # MLflow does not reuse the number
    assert not artifacts.exists()  # the leftover's run and artifacts went with it
    assert _staged(home) == []
    assert not (home / STAGING_DIR).exists()
    assert _registered_records(home) == [(NAME, "2")]
    code, err = _run(["records", "verify", "--home", str(home)], capsys)
    assert code == 0, err


def test_cleaning_keeps_recorded_versions_and_other_sites_runs(tmp_path: Path) -> None:
    """In a shared registry only this site's marked runs are judged: a run of another
    site (or a receive) is never removed, a recorded version is kept."""
    store = ModelStore(tmp_path / "home", f"sqlite:///{tmp_path / 'shared.db'}")
    (tmp_path / "home").mkdir()
    client = store.client
    experiment = store._experiment()
    ours = client.create_run(experiment, tags={REGISTER_TAG: run_mark("sha256:a", NAME)})
    theirs = client.create_run(experiment, tags={REGISTER_TAG: run_mark("sha256:b", NAME)})
    kept = client.create_run(experiment, tags={REGISTER_TAG: run_mark("sha256:a", NAME)})
    client.create_registered_model(NAME)
    client.create_model_version(NAME, source="file:///nowhere", run_id=kept.info.run_id)
    removed = store.clean_unrecorded(NAME, REGISTER_TAG, run_mark("sha256:a", NAME),
                                     lambda info: True)
    assert removed == [f"run {ours.info.run_id}"]
    assert store.versions(NAME) == ["1"]
    assert client.get_run(theirs.info.run_id).info.lifecycle_stage == "active"
    removed = store.clean_unrecorded(NAME, REGISTER_TAG, run_mark("sha256:a", NAME),
                                     lambda info: False)
    assert removed == [f"version {NAME}/1"]
    assert store.versions(NAME) == []
    assert client.get_run(theirs.info.run_id).info.lifecycle_stage == "active"


# ------------------------------------------------------------------ finetune


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory,
             keras_model: Any) -> tuple[Path, VersionRef]:
    """Site Y's home with the reference coder exported at X registered as received (as
    tests/test_finetune.py sets it up: no bundle)."""
    return received_home(tmp_path_factory.mktemp("finetune-kill"), keras_model.out_dir, NAME)


def test_finetune_killed_before_its_record_is_refused_then_removed(
        received: tuple[Path, VersionRef], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from passerelle import steps
    from passerelle.finetuning import WORK_PREFIX
    from registry.store import SLEEP_BEFORE_RECORD_ENV

    corpus_y = tmp_path / "corpus-y"  # smaller than conftest's: a shorter training
    steps.generate_corpus("Y", 250, 12, 0, corpus_y)
    home = tmp_path / "home-y"
    shutil.copytree(received[0], home)
    argv = ["finetune", str(received[1]), "--data", str(corpus_y), "--epsilon", "2",
            "--delta", "1e-5", "--epochs", "1", "--batch-size", "32", "--home", str(home),
            "--drop-unknown-codes", "--seed", "1"]
    _killed(argv, SLEEP_BEFORE_RECORD_ENV, lambda: _versions_in_db(home) > 1)
    store = ModelStore(home)
    assert store.versions(NAME) == ["1", "2"]  # the fine-tuned version, never recorded
    with open_ledger(home) as ledger:
        assert ledger.records(kind=RecordKind.FINETUNE) == []
        assert len(ledger.records(kind=RecordKind.FINETUNE_STARTED)) == 1
    [stale] = home.glob(WORK_PREFIX + "*")  # with the model trained on Y's stays
    assert stat.S_IMODE(stale.stat().st_mode) == 0o700

    code, err = _run(["model", "export", f"{NAME}/2", "--out", str(tmp_path / "export"),
                      "--override", "--approver", "A", "--justification", "J",
                      "--home", str(home)], capsys)
    assert code == 2 and "killed `passerelle finetune`" in err, err
    assert len(err.strip().splitlines()) == 1

    code, err = _run(argv, capsys)
    assert code == 0, err
    assert f"removed version {NAME}/2" in err
    assert store.versions(NAME) == ["1", "3"]
    assert list(home.glob(WORK_PREFIX + "*")) == []
    with open_ledger(home) as ledger:
        assert [(r.fields["outcome"], r.fields["version"])
                for r in ledger.records(kind=RecordKind.FINETUNE)] == [("finished", "3")]
    code, err = _run(["records", "verify", "--home", str(home)], capsys)
    assert code == 0, err


def test_stale_folders_are_removed_and_a_live_or_foreign_one_kept(tmp_path: Path) -> None:
    """clean_stale: a folder whose lock is free (or missing, or a link) is a killed
    command's; one whose lock is held is a live one's; other names are not its own."""
    from passerelle.leftovers import clean_stale

    prefix = ".passerelle-finetune-"
    dead, bare, link, live = (tmp_path / f"{prefix}{n}" for n in ("dead", "bare", "link",
                                                                   "live"))
    for folder in (dead, bare, link, live):
        folder.mkdir(mode=0o700)
    (dead / LOCK_FILE).touch()
    target = tmp_path / "not-a-lock"
    target.write_text("kept")
    (link / LOCK_FILE).symlink_to(target)
    (tmp_path / "register-other").mkdir()
    with (live / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        assert clean_stale(tmp_path, prefix) == sorted([bare, dead, link])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{prefix}live", "not-a-lock", "register-other"]
    assert target.read_text() == "kept"


def test_receive_killed_before_its_record_is_no_source_and_is_removed_after_a_rotation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A receive killed once its version exists, before its bundle_received record: the
    version is no fine-tuning source (nor shipped on); the site rotates its keys; the
    next receive of the bundle still finds it (the retired fingerprint's mark), removes
    it and registers the bundle anew, and the ledger verifies."""
    from datetime import UTC, datetime

    from registry.store import SLEEP_BEFORE_RECORD_ENV
    from tests.transfer_support import Site, forge, ship_dir, trust
    from transfer.identity import load_site

    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    trust(y, x)
    bundle = forge(tmp_path / "b.bundle", x, [y], ship_dir(tmp_path), now=datetime.now(UTC))
    _killed(["bundle", "receive", str(bundle), "--home", str(y.home)],
            SLEEP_BEFORE_RECORD_ENV, lambda: _versions_in_db(y.home) > 0)
    store = ModelStore(y.home)
    [name] = [m.name for m in store.client.search_registered_models()]
    assert store.versions(name) == ["1"]
    with open_ledger(y.home) as ledger:
        assert ledger.records(kind=RecordKind.BUNDLE_RECEIVED) == []

    data = tmp_path / "corpus-y"
    from passerelle import steps

    steps.generate_corpus("Y", 60, 12, 0, data)
    for argv in (["finetune", f"{name}/1", "--data", str(data), "--epsilon", "2", "--delta",
                  "1e-5", "--epochs", "1", "--home", str(y.home)],
                 ["bundle", "create", f"{name}/1", "--to", "X", "--out",
                  str(tmp_path / "on.bundle"), "--home", str(y.home)]):
        code, err = _run(argv, capsys)
        assert code == 2 and "killed `passerelle bundle receive`" in err, (argv, err)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    with open_ledger(y.home) as ledger:  # refused before any charge
        assert ledger.records(kind=RecordKind.FINETUNE_STARTED) == []

    code, err = _run(["site", "rotate", "--home", str(y.home)], capsys)
    assert code == 0, err
    code, err = _run(["bundle", "receive", str(bundle), "--home", str(y.home)], capsys)
    assert code != 0 and "sealed for Y's key sha256:" in err, err  # for the retired key
    assert "the sender seals it again for the current key" in err
    y = Site(y.home, load_site(y.home))  # X pins Y's new key and sends the next version
    trust(x, y)
    again = forge(tmp_path / "b2.bundle", x, [y], ship_dir(tmp_path, name="ship2"),
                  now=datetime.now(UTC), version="2", sequence=2)
    code, err = _run(["bundle", "receive", str(again), "--home", str(y.home)], capsys)
    assert code == 0, err
    assert store.versions(name) == ["2"]  # the leftover went, the new bundle came
    with open_ledger(y.home) as ledger:
        [record] = ledger.records(kind=RecordKind.BUNDLE_RECEIVED)
    assert record.fields["local_version"] == "2"
    code, err = _run(["records", "verify", "--home", str(y.home)], capsys)
    assert code == 0, err
