"""The README's commands run as written: every fenced ``sh`` block, in order, in one
empty folder, each line through the real command line (in this process, to spare the
start-up of ~20 interpreters), and each must exit 0. Blocks fenced otherwise (``bash``
for the setup scripts, which install a venv and run the whole suite) are not run."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from passerelle.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.DOTALL | re.MULTILINE)


def allowed_codes(line: str) -> set[int]:
    """0, or the codes a trailing ``# exit 0 (PASS) or 1 (FAIL)`` comment names."""
    found = re.search(r"#\s*exit ((?:\d+(?: \([^)]*\))?(?: or )?)+)", line)
    return {int(c) for c in re.findall(r"\d+", found.group(1))} if found else {0}


def readme_commands(text: str) -> list[str]:
    """The command lines of the ``sh`` blocks, continuation lines joined."""
    lines: list[str] = []
    for block in _BLOCK.findall(text):
        pending = ""
        for raw in block.splitlines():
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_the_readme_has_a_walkthrough_that_names_its_homes() -> None:
    commands = readme_commands(README.read_text())
    assert len(commands) >= 20
    assert commands[0].startswith("passerelle site init")
    for line in commands:
        words = shlex.split(line, comments=True)
        assert words[0] == "passerelle", line
        uses_home = words[1] not in ("data", "demo") and words[1:3] not in (
            ["model", "train"], ["model", "init-manifest"])
        assert not uses_home or "--home" in words, f"no --home in: {line}"


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    saved = dict(os.environ)
    for key in ("PASSERELLE_HOME", "MLFLOW_TRACKING_URI", "PASSERELLE_LEDGER_URL",
                "PASSERELLE_PASSPHRASE"):
        os.environ.pop(key, None)
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        for line in readme_commands(README.read_text()):
            argv = shlex.split(line, comments=True)
            code = main(argv[1:])
            err = capsys.readouterr().err
            assert code in allowed_codes(line), \
                f"README command failed with exit {code}: {line}\n{err}"
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved)
    assert (tmp_path / "report-x.html").is_file()
