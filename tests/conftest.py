"""Shared fixtures: small corpora, small trained models, site homes, and a real MLflow
tracking server backed by PostgreSQL.

Sizes are small on purpose (the demo and the benchmarks use the full ones); every test
still runs the real thing: real TensorFlow training, real tf2onnx/skl2onnx, real
onnxruntime, real MLflow stores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["PASSERELLE_TESTING"] = "1"  # --seed is refused outside the test suite

from passerelle import steps
from registry.coder import Architecture, CoderConfig
from registry.export import Override
from registry.vocabulary import VocabularyConfig

PG_DSN = "postgresql+psycopg2://postgres@127.0.0.1:5432"
# Tests that are about conversion, not about the gate, export on a recorded override.
TEST_OVERRIDE = Override("Test Suite", "conversion test without an audit")
OVERRIDE_ARGS = ["--override", "--approver", "Test Suite", "--justification",
                 "conversion test without an audit"]
SMALL_X, SMALL_Y = 1500, 500

_postgres_tests_run = 0


@pytest.fixture(scope="session")
def corpus_x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpora") / "site-x"
    steps.generate_corpus("X", SMALL_X, 11, 0, out)
    return out


@pytest.fixture(scope="session")
def corpus_y(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpora") / "site-y"
    steps.generate_corpus("Y", SMALL_Y, 12, 0, out)
    return out


def small_config(arch: Architecture = Architecture.EMBEDDING_MEAN, **vocab: object) -> CoderConfig:
    return CoderConfig(architecture=arch, epochs=6, batch_size=64, learning_rate=1e-2, seed=3,
                       vocabulary=VocabularyConfig(max_len=128, **vocab))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def keras_model(tmp_path_factory: pytest.TempPathFactory, corpus_x: Path,
                corpus_y: Path) -> steps.TrainReport:
    out = tmp_path_factory.mktemp("models") / "keras"
    return steps.train_model(corpus_x, out, small_config(), [corpus_y])


@pytest.fixture(scope="session")
def logreg_model(tmp_path_factory: pytest.TempPathFactory, corpus_x: Path) -> steps.TrainReport:
    out = tmp_path_factory.mktemp("models") / "logreg"
    return steps.train_model(corpus_x, out, small_config(Architecture.LOGREG))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[str]:
    """A fresh PostgreSQL database; fails (never skips) when the server is unreachable."""
    import psycopg2

    name = f"passerelle_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres",
                                 dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as e:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is unreachable: {e}", pytrace=False)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_DSN}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextmanager
def running_mlflow_server(backend_uri: str, logs: Path, *extra: str,
                          start_seconds: float = 180, stop_seconds: float = 20) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 over ``backend_uri``, until the block ends."""
    port = _free_port()
    log = (logs / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         *extra, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start in {start_seconds:g} s; "
                            f"see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()  # our own server, by its process id
        try:
            proc.wait(timeout=stop_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(postgres_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` process with the PostgreSQL backend store."""
    artifacts = tmp_path_factory.mktemp("mlflow-server-artifacts")
    with running_mlflow_server(postgres_db, tmp_path_factory.mktemp("mlflow-server"),
                               "--artifacts-destination", str(artifacts)) as url:
        yield url


_screenshots: list[str] = []  # record_property("screenshot", path), also from xdist workers


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _postgres_tests_run
    if report.when == "call" and report.passed and "postgres" in report.keywords:
        _postgres_tests_run += 1
    if report.when == "call":
        _screenshots.extend(str(v) for k, v in report.user_properties if k == "screenshot")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"postgres-marked tests passed in this process: "
                                f"{_postgres_tests_run}")
    for path in _screenshots:
        terminalreporter.write_line(f"report screenshot: {path}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, a run in which no PostgreSQL test passed is a failed run."""
    if hasattr(session.config, "workerinput"):  # an xdist worker; the controller decides
        return
    if os.environ.get("CI") == "true" and _postgres_tests_run == 0 and exitstatus == 0:
        session.config.get_terminal_writer().line(
            "error: CI ran no passing PostgreSQL test", red=True)
        session.exitstatus = 1
