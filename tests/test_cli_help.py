"""``--help`` tells the truth: every option of every command has a help line that shows
its default (or says it is required), every positional argument says what it is, and
``passerelle --version`` prints the package's version. The parser is walked, so a new
command is covered without a new test."""

from __future__ import annotations

import argparse
import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from passerelle import __version__
from passerelle.cli import build_parser, main
from passerelle.cli._common import EXIT_CODES, option_help

ROOT = Path(__file__).resolve().parent.parent


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""
                 ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                full = f"{prefix} {name}".strip()
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    yield from _subcommands(child, full)
                else:
                    yield full, child


def leaf_commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command a user can run, by its words (``records verify``)."""
    return dict(_subcommands(parser))


COMMANDS = leaf_commands(build_parser())


def test_the_parser_has_the_commands_of_the_design() -> None:
    for name in ("data generate", "model train", "model register", "model audit",
                 "model export", "site init", "site show", "trust add", "bundle create",
                 "bundle receive", "finetune", "records verify", "report", "demo"):
        assert name in COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_a_help_line_with_its_default(name: str) -> None:
    missing = []
    for action in COMMANDS[name]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = option_help(action)
        label = "/".join(action.option_strings) or action.dest
        if not text.strip():
            missing.append(f"{label}: no help line")
        elif (action.option_strings and not action.required and "default" not in text
              and "required" not in text):  # required in effect (checked by the handler)
            missing.append(f"{label}: the help does not show the default ({text!r})")
    assert not missing, f"passerelle {name}: " + "; ".join(missing)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_of_every_command_prints(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main([*name.split(), "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"passerelle {name}" in out and "--home" in out


def test_version_is_the_packages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"passerelle {__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__


def test_the_exit_codes_are_in_the_help_and_the_readme(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    for code in ("0", "1", "2", "130", "141"):
        assert f"\n  {code} " in out
        assert f"| {code} |" in readme, f"exit code {code} is not in README's table"
    assert "--force" in EXIT_CODES and "--force" in readme


def _script_options(path: Path) -> Iterator[tuple[int, str, dict[str, ast.expr]]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "add_argument" and node.args and \
                isinstance(node.args[0], ast.Constant):
            yield node.lineno, str(node.args[0].value), {k.arg: k.value for k in node.keywords
                                                         if k.arg is not None}


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_option_of_a_script_has_a_help_line_with_its_default(script: str) -> None:
    """The benchmark and evidence scripts are read the same way (their source is read,
    not run: some of them import TensorFlow)."""
    bad = []
    for line, name, kw in _script_options(ROOT / "scripts" / script):
        text = ast.unparse(kw["help"]) if "help" in kw else ""
        if text == "argparse.SUPPRESS":
            continue
        flag = "action" in kw or not name.startswith("-")
        if not text or not (flag or kw.get("required") or "default" in text):
            bad.append(f"line {line}: {name}")
    assert not bad, bad
