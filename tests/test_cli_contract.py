"""The command-line contract, on every command: bad input gives the documented exit code,
exactly one ``error:`` line on stderr, no traceback, and leaves nothing behind: no file,
no folder, no home, no ledger record (a typo is not a refusal of a bundle).

The cases are tables. A new command is one row of ``COMMANDS`` (what it writes, whether
it reaches MLflow or the ledger); the generic faults (a mistyped or read-only home, a
bad --out, an unreachable MLflow server or ledger database) are derived from it. Faults
particular to one command are rows of ``SPECIFIC``.

Each case runs in a fresh copy of a workspace holding site CHU-X (trusting CH-Y), the
peer CH-Y, both public identity files, a tiny corpus and a tiny model folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from passerelle import steps
from registry.coder import Architecture, CoderConfig
from registry.vocabulary import VocabularyConfig
from tests.cli_contract_support import (
    LEDGER,
    Outcome,
    assert_one_error,
    closed_port,
    copy_workspace,
    ledger_rows,
    make_read_only,
    make_writable,
    run_inprocess,
    silent_server,
    snapshot,
    without_root,
)
from transfer.identity import init_site, public_identity
from transfer.trust import TrustStore

# -- the workspace --------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # What the commands import lazily is imported here, as root: the read-only cases run
    # as `nobody`, who cannot read this interpreter's standard library under /root.
    import mlflow  # noqa: F401

    import transfer.exchange
    import transfer.report  # noqa: F401
    from passerelle.cli import build_parser

    build_parser()
    ws = tmp_path_factory.mktemp("contract-template")
    init_site(ws / "site", "CHU-X")
    init_site(ws / "peer", "CH-Y")
    for name, home in (("CHU-X", ws / "site"), ("CH-Y", ws / "peer")):
        (ws / f"{name}.json").write_text(json.dumps(public_identity(home).to_json()))
    TrustStore(ws / "site").add(public_identity(ws / "peer"))
    steps.generate_corpus("Y", 60, 7, 0, ws / "corpus")
    config = CoderConfig(architecture=Architecture.LOGREG, epochs=1, seed=1,
                         vocabulary=VocabularyConfig(min_patients=1, max_len=32))
    steps.train_model(ws / "corpus", ws / "model", config)
    from tests.vendor_models import torch_conv_classifier

    (ws / "vendor.onnx").write_bytes(torch_conv_classifier().SerializeToString())
    (ws / "bad-manifest.json").write_text('{"format": "passerelle-manifest"}\n')
    (ws / "model.pkl").write_bytes(b"\x80\x04N.")
    (ws / "file.txt").write_text("not what the command wants\n")
    (ws / "existing.out").write_text("keep me\n")
    (ws / "a-folder").mkdir()
    (ws / "a-folder.html").mkdir()
    (ws / "existing.out.html").write_text("keep me\n")
    (ws / "full").mkdir()
    (ws / "full" / "mine.txt").write_text("keep me\n")
    (ws / "ro").mkdir()
    return ws


@dataclass(frozen=True)
class Values:
    """What a case's arguments may name, as ``{name}`` placeholders."""

    ws: Path
    peer_fp: str
    record: str

    def fill(self, text: str) -> str:
        return text.format(ws=self.ws, site=self.ws / "site", peer_fp=self.peer_fp,
                           record=self.record, closed=CLOSED_PORT)


CLOSED_PORT = closed_port()


# -- the commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command as a user would type it (with --home added when it uses a home);
    ``{out}`` marks its --out value."""

    argv: str
    home: bool = True  # the command works in the site's home
    writes_home: bool = False  # ... and changes it
    out: Literal["file", "dir"] | None = None
    mlflow: bool = False  # with these arguments it reaches the MLflow store
    ledger: bool = False  # ... it opens the ledger
    suffix: str = ""  # what its --out must end with

    @property
    def name(self) -> str:
        words = self.argv.split()
        depth = 3 if " ".join(words[:2]) in GROUPS else 2 if words[0] in GROUPS else 1
        return " ".join(words[:depth])


GROUPS = {"data", "model", "site", "trust", "bundle", "records", "notice", "site policy"}


COMMANDS = [
    Command("data generate --site Y --stays 30 --seed 1 --out {out}", home=False, out="dir"),
    Command("data seal {ws}/corpus --fraction 0.2 --out {out}", writes_home=True, out="dir",
            ledger=True),
    Command("model train --data {ws}/corpus --arch logreg --out {out}", home=False, out="dir"),
    Command("model register {ws}/model --name coder --purpose p --legal-basis b",
            writes_home=True, mlflow=True, ledger=True),
    Command("model init-manifest {ws}/vendor.onnx --out {out}", home=False, out="file"),
    Command("model audit coder/1 --members {ws}/corpus --nonmembers {ws}/corpus --out {out}",
            writes_home=True, out="dir", mlflow=True),
    Command("model export coder/1 --out {out}", writes_home=True, out="dir", mlflow=True),
    Command("site show --out {out}", out="file"),
    Command("site rotate", writes_home=True, ledger=True),
    Command("site policy show"),
    Command("site policy set privacy.epsilon_cap 6 --approver A --justification J",
            writes_home=True, ledger=True),
    Command("trust add {ws}/CH-Y.json", writes_home=True),
    Command("trust list"),
    Command("trust revoke {peer_fp}", writes_home=True, ledger=True),
    Command("bundle create coder/1 --to CH-Y --out {out}", writes_home=True, out="file",
            mlflow=True),
    Command("bundle verify {ws}/file.txt", writes_home=True),  # decrypts in HOME/.receiving
    Command("bundle receive {ws}/file.txt", writes_home=True),
    Command("finetune coder/1 --data {ws}/corpus --epsilon 1", writes_home=True, mlflow=True),
    Command("demo --workdir {out}", home=False, out="dir"),
    Command("records list", ledger=True),
    Command("records show {record}", ledger=True),
    Command("records verify", ledger=True),
    Command("records export --out {out}", out="file", ledger=True),
    Command("records checkpoint --out {out}", out="file", ledger=True),
    Command("report --out {out}", out="file", ledger=True, suffix=".html"),
    Command("records verify-report {ws}/file.txt"),
    # added by other branches: their home rows (their --out rows are still to write)
    Command("predict ghost/1 --data {ws}/corpus --out {ws}/p.jsonl"),
    Command("serve ghost/1 --port 8765"),
    Command("notice receive {ws}/file.txt"),
    Command("model withdraw ghost/1 --reason r"),
    Command("records lineage --model ghost/1"),
]


@dataclass(frozen=True)
class Case:
    id: str
    argv: str
    code: int
    says: str
    env: dict[str, str] = field(default_factory=dict)
    read_only: tuple[str, ...] = ()  # workspace paths made read-only first
    max_seconds: float = 60.0


def _default_out(command: Command, value: str = "{ws}/new-out") -> str:
    return command.argv.replace("{out}", value + command.suffix)


def _with_home(command: Command, argv: str, home: str = "{site}") -> str:
    return f"{argv} --home {home}" if command.home else argv


def generic_cases() -> Iterator[Case]:
    for c in COMMANDS:
        argv = _default_out(c)
        if c.home:
            yield Case(f"{c.name}: mistyped --home", _with_home(c, argv, "{ws}/sitee"), 2,
                       "no site home here")
            yield Case(f"{c.name}: --home is a file", _with_home(c, argv, "{ws}/file.txt"), 2,
                       "not a directory")
            yield Case(f"{c.name}: no --home, no ~/.passerelle", argv, 2, "no site home here")
        if c.writes_home:
            yield Case(f"{c.name}: read-only home", _with_home(c, argv), 2, "read-only",
                       read_only=("site",))
        if c.out == "file":
            for what, value, says in (
                    ("--out is a folder", "{ws}/a-folder", "is a folder"),
                    ("--out exists", "{ws}/existing.out", "add --force"),
                    ("--out under a file", "{ws}/file.txt/x", "not a folder"),
                    ("--out in a read-only folder", "{ws}/ro/x", "read-only")):
                yield Case(f"{c.name}: {what}", _with_home(c, _default_out(c, value)), 2, says,
                           read_only=("ro",) if "read-only" in what else ())
        if c.out == "dir":
            for what, value, says in (
                    ("--out is a file", "{ws}/file.txt", "not a folder"),
                    ("--out is a non-empty folder", "{ws}/full", "not empty"),
                    ("--out under a file", "{ws}/file.txt/x", "not a folder"),
                    ("--out in a read-only folder", "{ws}/ro/x", "read-only")):
                yield Case(f"{c.name}: {what}", _with_home(c, _default_out(c, value)), 2, says,
                           read_only=("ro",) if "read-only" in what else ())
        if c.mlflow:
            yield Case(f"{c.name}: bogus MLFLOW_TRACKING_URI", _with_home(c, argv), 2,
                       "model registry at", env={"MLFLOW_TRACKING_URI": "bogus-scheme://x"})
            yield Case(f"{c.name}: MLflow server down", _with_home(c, argv), 2,
                       "model registry at http://127.0.0.1:{closed}",
                       env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed}",
                            # our retries, without the pauses between them (time)
                            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"},
                       max_seconds=20)
        if c.ledger:
            yield Case(f"{c.name}: ledger database down", _with_home(c, argv), 2,
                       "ledger database",
                       env={"PASSERELLE_LEDGER_URL":
                            "postgresql+psycopg2://postgres@127.0.0.1:{closed}/ledger"},
                       max_seconds=20)


H = "--home {site}"
SPECIFIC = [
    # missing inputs: exit 2 on every command, before anything is touched
    Case("trust add: missing identity file", f"trust add {{ws}}/nope.json {H}", 2, "no such file"),
    Case("bundle verify: missing bundle", f"bundle verify {{ws}}/nope.bundle {H}", 2,
         "no such file"),
    Case("bundle receive: typo'd path is bad input, not a refusal",
         f"bundle receive {{ws}}/coder-1.bundel {H}", 2, "no such file"),
    Case("bundle receive: a folder", f"bundle receive {{ws}}/a-folder {H}", 2, "not a file"),
    Case("model train: missing corpus", "model train --data {ws}/nope --out {ws}/m", 2,
         "no such folder"),
    Case("model train: missing eval corpus",
         "model train --data {ws}/corpus --eval {ws}/nope --out {ws}/m", 2, "no such folder"),
    Case("model register: missing model folder",
         f"model register {{ws}}/nope --name c --purpose p --legal-basis b {H}", 2,
         "no such folder"),
    Case("model register: missing corpus",
         f"model register {{ws}}/model --name c --purpose p --legal-basis b --data {{ws}}/nope "
         f"{H}", 2, "no such folder"),
    Case("model register: unknown framework",
         f"model register {{ws}}/file.txt --name c --purpose p --legal-basis b {H}", 2,
         "unknown model framework"),
    Case("model register: a pickle file",
         f"model register {{ws}}/model.pkl --name c --purpose p --legal-basis b {H}", 2,
         "pickle files are refused"),
    Case("model register: a vendor's model without its manifest",
         f"model register {{ws}}/vendor.onnx --name c --purpose p --legal-basis b "
         f"--data {{ws}}/corpus {H}", 2, "needs --manifest"),
    Case("model register: a manifest that does not validate",
         f"model register {{ws}}/vendor.onnx --name c --purpose p --legal-basis b "
         f"--manifest {{ws}}/bad-manifest.json --data {{ws}}/corpus {H}", 2,
         "does not validate"),
    Case("model register: a manifest for a `model train` folder",
         f"model register {{ws}}/model --name c --purpose p --legal-basis b "
         f"--manifest {{ws}}/bad-manifest.json {H}", 2, "its manifest is synthesised"),
    Case("model register: a models:/ URI without a tracking server",
         f"model register models:/ghost/1 --name c --purpose p --legal-basis b "
         f"--manifest {{ws}}/bad-manifest.json --data {{ws}}/corpus "
         f"--from-tracking-uri http://127.0.0.1:{{closed}} {H}", 2, "models:/ghost/1",
         env={"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}, max_seconds=30),
    Case("model init-manifest: missing model",
         "model init-manifest {ws}/nope.onnx --out {ws}/m.json", 2, "no such"),
    Case("model init-manifest: a pickle file",
         "model init-manifest {ws}/model.pkl --out {ws}/m.json", 2, "pickle files are refused"),
    Case("model audit: missing members",
         f"model audit c/1 --members {{ws}}/nope --nonmembers {{ws}}/corpus {H}", 2,
         "no such folder"),
    Case("model audit: missing policy",
         f"model audit c/1 --members {{ws}}/corpus --nonmembers {{ws}}/corpus --policy "
         f"{{ws}}/nope.toml {H}", 2, "no such file"),
    Case("model audit: recipe module missing",
         f"model audit c/1 --members {{ws}}/corpus --nonmembers {{ws}}/corpus --recipe "
         f"no_such_vendor.recipes:fit {H}", 2, "no module named 'no_such_vendor'"),
    Case("finetune: missing corpus", f"finetune c/1 --data {{ws}}/nope --epsilon 1 {H}", 2,
         "no such folder"),
    Case("records verify: missing peer export", f"records verify --peer {{ws}}/nope {H}", 2,
         "no such file"),
    Case("records verify: missing checkpoint", f"records verify --checkpoint {{ws}}/nope {H}",
         2, "no such file"),
    Case("records verify-report: missing report",
         f"records verify-report {{ws}}/nope.html {H}", 2, "no such file"),
    Case("report: missing peer export", f"report --out {{ws}}/r.html --peer {{ws}}/nope {H}", 2,
         "no such file"),
    Case("report: not .html or .pdf", f"report --out {{ws}}/r.txt {H}", 2, "FILE.html"),
    Case("records show: unknown record", f"records show {'ab' * 8} {H}", 2, "no record"),
    # unknown models: bad input, and no MLflow store is created to say so
    Case("model export: unknown model", f"model export ghost/1 --out {{ws}}/e {H}", 2,
         "no registered model version ghost/1"),
    Case("model audit: unknown model",
         f"model audit ghost/1 --members {{ws}}/corpus --nonmembers {{ws}}/corpus {H}", 2,
         "no registered model version ghost/1"),
    Case("bundle create: unknown model",
         f"bundle create ghost/1 --to CH-Y --out {{ws}}/b {H}", 2,
         "no registered model version ghost/1"),
    Case("bundle create: untrusted recipient",
         f"bundle create ghost/1 --to NOWHERE --out {{ws}}/b {H}", 2, "no trusted site"),
    Case("finetune: unknown model", f"finetune ghost/1 --data {{ws}}/corpus --epsilon 1 {H}",
         2, "no registered model version ghost/1"),
    # bounded numbers
    *[Case(f"model train --{opt} {value}",
           f"model train --data {{ws}}/corpus --out {{ws}}/m --{opt} {value}", 2, says)
      for opt, value, says in (
          ("learning-rate", "inf", "not a finite number"),
          ("learning-rate", "nan", "not a finite number"),
          ("learning-rate", "-1", "must be in"),
          ("learning-rate", "0", "must be in"),
          ("learning-rate", "1e400", "not a finite number"),
          ("epochs", "0", "must be a whole number"),
          ("epochs", "99999999999999", "must be a whole number"),
          ("batch-size", "1e3", "not a whole number"),
          ("heldout-fraction", "1", "must be in"),
          ("heldout-fraction", "1.5", "must be in"),
          ("seed", "-1", "must be a whole number"),
          ("max-len", "10000000", "must be a whole number"),
          ("min-patients", "0", "must be a whole number"))],
    *[Case(f"finetune --{opt} {value}",
           f"finetune c/1 --data {{ws}}/corpus --epsilon 1 --{opt} {value} {H}", 2, says)
      for opt, value, says in (
          ("epsilon", "inf", "not a finite number"),
          ("epsilon", "nan", "not a finite number"),
          ("epsilon", "0", "must be in"),
          ("delta", "0", "must be in"),
          ("delta", "1", "must be in"),
          ("delta", "nan", "not a finite number"),
          ("clip", "inf", "not a finite number"),
          ("learning-rate", "inf", "not a finite number"),
          ("heldout-fraction", "0", "must be in"),
          ("epochs", "0", "must be a whole number"),
          ("batch-size", "99999999999", "must be a whole number"))],
    Case("data generate --stays 99999999999999",
         "data generate --site X --stays 99999999999999 --seed 1 --out {ws}/d", 2,
         "must be a whole number"),
    Case("data generate --stays 0", "data generate --site X --stays 0 --seed 1 --out {ws}/d",
         2, "must be a whole number"),
    Case("data generate --canaries 10**9",
         "data generate --site X --stays 5 --seed 1 --canaries 1000000000 --out {ws}/d", 2,
         "must be a whole number"),
    Case("data generate --seed 2**64",
         "data generate --site X --stays 5 --seed 18446744073709551616 --out {ws}/d", 2,
         "must be a whole number"),
    Case("model audit --reference-models 10**6",
         f"model audit c/1 --members {{ws}}/corpus --nonmembers {{ws}}/corpus "
         f"--reference-models 1000000 {H}", 2, "must be a whole number"),
    Case("demo --stays-x 10**12", "demo --workdir {ws}/d --stays-x 1000000000000", 2,
         "must be a whole number"),
    # trust
    Case("trust add: this site's own identity", f"trust add {{ws}}/CHU-X.json {H}", 1,
         "a site does not trust itself"),
    Case("trust add: a mistyped home gets no pinned key",
         "trust add {ws}/CH-Y.json --home {ws}/typo", 2, "no site home here"),
    Case("trust revoke: not a fingerprint", f"trust revoke nope {H}", 2, "not a fingerprint"),
    # site init: the one command that creates a home, and only when it succeeds
    Case("site init: bad name creates no home", "site init 'bad name' --home {ws}/new", 2,
         "not a valid site name"),
    Case("site init: home is a file", "site init CHU-Z --home {ws}/file.txt", 2,
         "not a folder"),
    Case("site init: already a site", f"site init CHU-Z {H}", 2, "already exists"),
    Case("site init: under a read-only folder", "site init CHU-Z --home {ws}/ro/new", 2,
         "", read_only=("ro",)),
    # site policy
    Case("site policy set: unknown key",
         f"site policy set no.such 1 --approver A --justification J {H}", 2, "no.such"),
    Case("site policy set: a value out of bounds",
         f"site policy set privacy.epsilon_cap inf --approver A --justification J {H}", 2,
         "epsilon_cap"),
    # usage
    Case("model export: not NAME/VERSION", f"model export coder --out {{ws}}/e {H}", 2,
         "is not NAME/VERSION"),
    Case("bundle create: no recipient given", f"bundle create c/1 --out {{ws}}/b {H}", 2,
         "required"),
    Case("records list: bad --since", f"records list --since yesterday {H}", 2,
         "not an ISO 8601"),
    Case("model export: --approver without --override",
         f"model export c/1 --out {{ws}}/e --approver A {H}", 2, "go with --override"),
]

CASES = [*generic_cases(), *SPECIFIC]


@pytest.fixture
def values(template: Path, tmp_path: Path) -> Values:
    ws = copy_workspace(template, tmp_path / "ws")
    peer = public_identity(ws / "peer")
    rows = ledger_rows(ws / LEDGER)
    return Values(ws, peer.fingerprint, str(rows[-1][2]))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_leaves_nothing(
        case: Case, values: Values, capsys: pytest.CaptureFixture[str]) -> None:
    import shlex

    ws = values.ws
    argv = [values.fill(a) for a in shlex.split(case.argv)]
    env = {"HOME": str(ws / "user"), **{k: values.fill(v) for k, v in case.env.items()}}
    env.pop("PASSERELLE_HOME", None)
    os.environ.pop("PASSERELLE_HOME", None)
    for path in case.read_only:
        make_read_only(ws / path)
    before, records = snapshot(ws), ledger_rows(ws / LEDGER)
    started = time.monotonic()
    try:
        with without_root(ws) if case.read_only else _nothing():
            outcome = run_inprocess(argv, env, ws, capsys)
    finally:
        for path in case.read_only:
            make_writable(ws / path)
    elapsed = time.monotonic() - started
    assert_one_error(outcome, case.code, values.fill(case.says))
    assert elapsed < case.max_seconds, f"took {elapsed:.0f} s"
    assert snapshot(ws) == before, "the command left something behind"
    assert ledger_rows(ws / LEDGER) == records, "the ledger changed"


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


# -- faults that need a real process or a server that never answers --------------------


def test_an_mlflow_server_that_never_answers_times_out_and_names_itself(
        values: Values, capsys: pytest.CaptureFixture[str]) -> None:
    ws = values.ws
    before = snapshot(ws)
    with silent_server() as port:
        env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"}  # our retries and pauses, a shorter wait
        started = time.monotonic()
        outcome = run_inprocess(["model", "export", "coder/1", "--out", str(ws / "e"),
                                 "--home", str(ws / "site")], env, ws, capsys)
        elapsed = time.monotonic() - started
    assert_one_error(outcome, 2, f"model registry at http://127.0.0.1:{port}")
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert snapshot(ws) == before


def test_mlflow_http_timeouts_are_bounded_by_default_and_the_users_win() -> None:
    from registry.store import HTTP_DEFAULTS, ModelStore

    saved = dict(os.environ)
    try:
        for key in HTTP_DEFAULTS:
            os.environ.pop(key, None)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        ModelStore(Path("/nonexistent"), "http://127.0.0.1:1")
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert int(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_a_ledger_database_that_never_answers_times_out(
        values: Values, capsys: pytest.CaptureFixture[str]) -> None:
    ws = values.ws
    before = snapshot(ws)
    with silent_server() as port:
        env = {"PASSERELLE_LEDGER_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/l"}
        started = time.monotonic()
        outcome = run_inprocess(["records", "list", "--home", str(ws / "site")], env, ws,
                                capsys)
        elapsed = time.monotonic() - started
    assert_one_error(outcome, 2, f"ledger database postgresql+psycopg2://postgres@127.0.0.1:"
                     f"{port}/l")
    assert elapsed < 20, f"took {elapsed:.0f} s"
    assert snapshot(ws) == before


def _interrupted(argv: list[str], cwd: Path, delay: float) -> Outcome:
    """Run ``passerelle ARGV`` and press Ctrl-C ``delay`` seconds after :func:`main` began
    (``-X importtime`` shows when it has imported ``passerelle.cli._common``, its first
    import; a SIGINT while the interpreter itself starts, before ``main``, is CPython's)."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "passerelle.cli",
                             *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PASSERELLE_PASSPHRASE": ""})
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.rstrip().endswith("| passerelle.cli._common"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = "".join(line for line in [*seen, *err.splitlines(keepends=True)]
                  if not line.startswith("import time:"))
    return Outcome(proc.returncode, out, err)


@pytest.mark.parametrize("delay", [round(0.03 * step, 2) for step in range(10)] + [0.3, 2.5])
def test_ctrl_c_is_exit_130_one_line_and_nothing_half_done(values: Values,
                                                           delay: float) -> None:
    """Up to 0.27 s the commands' modules are still importing: 9 of 60 such presses ended
    by SIGINT (returncode -2, see ``_end_interrupted``) before."""
    ws = values.ws
    before = snapshot(ws)
    outcome = _interrupted(["data", "generate", "--site", "X", "--stays", "400000", "--seed",
                            "1", "--out", str(ws / "big" / "corpus")], ws, delay)
    assert_one_error(outcome, 130, "error: interrupted")
    assert snapshot(ws) == before, "an interrupted command left something"


def _entry_with(run: str, cwd: Path) -> Outcome:
    """``passerelle.cli.entry()`` in a new interpreter whose command is ``run`` (the body of
    a function of ``argv``) instead of the parsed one; started with ``-m`` like the console
    script's ``python -m passerelle.cli`` (``-c`` exits on another path)."""
    program = ("import os, signal, time\nimport passerelle.cli as cli\n"
               "def run(argv):\n" + "".join(f"    {line}\n" for line in run.splitlines())
               + "cli._run = run\ncli.entry()\n")
    (cwd / "entry_with.py").write_text(program)
    proc = subprocess.run([sys.executable, "-m", "entry_with"], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def test_a_ctrl_c_that_went_through_exec_of_a_string_is_still_exit_130(
        tmp_path: Path) -> None:
    """dataclasses and namedtuple build their methods with ``exec``; CPython 3.11 then takes
    the KeyboardInterrupt for one nobody handled and ends the process by SIGINT."""
    outcome = _entry_with("exec('os.kill(os.getpid(), signal.SIGINT)\\ntime.sleep(30)')",
                          tmp_path)
    assert_one_error(outcome, 130, "error: interrupted")


def test_a_ctrl_c_that_c_code_turned_into_another_error_is_still_interrupted(
        tmp_path: Path) -> None:
    """numpy's import turns a KeyboardInterrupt into ImportError ('PyCapsule_Import could
    not import module "datetime"'): a traceback and exit 1 before."""
    outcome = _entry_with("try:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\n"
                          "except KeyboardInterrupt:\n"
                          "    raise ImportError('PyCapsule_Import could not import module')",
                          tmp_path)
    assert_one_error(outcome, 130, "error: interrupted")


def test_a_bug_without_ctrl_c_keeps_its_traceback(tmp_path: Path) -> None:
    outcome = _entry_with("raise ImportError('a real bug')", tmp_path)
    assert outcome.code == 1 and "Traceback" in outcome.err and "a real bug" in outcome.err


def test_ctrl_c_during_site_init_leaves_no_home(values: Values) -> None:
    ws = values.ws
    outcome = _interrupted(["site", "init", "CHU-Z", "--home", str(ws / "new-home")], ws, 0.0)
    assert_one_error(outcome, 130, "error: interrupted")
    assert not (ws / "new-home").exists()


def test_a_closed_stdout_is_one_error_line_not_a_traceback(values: Values) -> None:
    ws = values.ws
    read, write = os.pipe()
    os.close(read)  # whoever reads our output is gone before we write
    proc = subprocess.run(
        [sys.executable, "-m", "passerelle.cli", "records", "show", "--json", values.record,
         "--home", str(ws / "site")], cwd=ws, stdout=write, stderr=subprocess.PIPE,
        text=True, timeout=60, check=False)
    os.close(write)
    assert_one_error(Outcome(proc.returncode, "", proc.stderr), 141, "standard output")


def test_records_show_into_head_is_not_a_traceback(values: Values) -> None:
    ws = values.ws
    command = (f"{sys.executable} -m passerelle.cli records show --json {values.record} "
               f"--home {ws / 'site'} | head -c1")
    proc = subprocess.run(["sh", "-c", command], cwd=ws, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.stdout == "{"
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 1


def test_a_bundle_that_is_not_one_is_refused_and_recorded_but_a_typo_is_not(
        values: Values, capsys: pytest.CaptureFixture[str]) -> None:
    """Only real files can be refused bundles: garbage is recorded, a typo is bad input."""
    ws = values.ws
    records = ledger_rows(ws / LEDGER)
    outcome = run_inprocess(["bundle", "receive", str(ws / "file.txt"), "--home",
                             str(ws / "site")], {}, ws, capsys)
    assert outcome.code == 1 and outcome.err.startswith("error: ")
    assert len(ledger_rows(ws / LEDGER)) == len(records) + 1
    outcome = run_inprocess(["bundle", "receive", str(ws / "file.txtt"), "--home",
                             str(ws / "site")], {}, ws, capsys)
    assert_one_error(outcome, 2, "no such file")
    assert len(ledger_rows(ws / LEDGER)) == len(records) + 1


def test_out_force_replaces_a_file_atomically_and_only_then(
        values: Values, capsys: pytest.CaptureFixture[str]) -> None:
    ws = values.ws
    home = ["--home", str(ws / "site")]
    target = ws / "existing.out"
    outcome = run_inprocess(["records", "export", "--out", str(target), "--force", *home], {},
                            ws, capsys)
    assert outcome.code == 0, outcome.err
    assert target.read_text().count("\n") == len(ledger_rows(ws / LEDGER))
    assert sorted(p.name for p in ws.iterdir() if p.name.startswith(".")) == []
    new = ws / "reports" / "nested" / "x.html"
    outcome = run_inprocess(["report", "--out", str(new), *home], {}, ws, capsys)
    assert outcome.code == 0, outcome.err
    assert new.is_file()


def test_contract_size(capsys: pytest.CaptureFixture[str]) -> None:
    """The suite's size, printed for the record (and a floor, so it cannot shrink)."""
    with capsys.disabled():
        print(f"\ncontract cases: {len(CASES)} table rows (plus the process and server tests)")
    assert len(CASES) >= 150
    names = {c.name for c in COMMANDS} | {"site init"}
    from passerelle.cli import build_parser
    from tests.test_cli_help import leaf_commands

    assert set(leaf_commands(build_parser())) <= names, "a command has no contract row"
