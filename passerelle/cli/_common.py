"""What every command shares: the parser, --home and --json, output and progress."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from passerelle.errors import BadInput

Handler = Callable[[argparse.Namespace], int]
Subparsers = Any  # argparse._SubParsersAction, private in typeshed


EXIT_CODES = """\
exit codes (one per kind of fault, the same on every command):
  0    done
  1    refused: a check said no (signature, trust, gate, audit FAIL, parity, budget,
       broken ledger)
  2    could not run as asked: usage, a bad or missing input file, an unknown model
       or record, a bad --home, an existing or unwritable --out, an unreachable MLflow
       server or ledger database
  130  interrupted (Ctrl-C); nothing half-done is left
  141  standard output closed early (e.g. `| head`)
An error is one line on stderr starting with `error:`.

--out never replaces anything unless you add --force: a FILE must not exist (with
--force it is replaced atomically); a DIR must not exist or be empty (there is no
--force for folders). Outputs are written beside their final place and moved there
(os.replace) only when complete; missing parent folders are created, and removed
again if the command fails.
Only `site init` creates a home: every other command refuses a --home that does not
exist, and creates nothing."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {one_line(message)} (see --help)", file=sys.stderr)
        raise SystemExit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help line ends with its default (unless it already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or action.required or "default" in text
                or action.default is argparse.SUPPRESS):
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None:
            return text  # the help must say what happens without it (tests/test_cli_help.py)
        if action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: {action.default})"


def option_help(action: argparse.Action) -> str:
    """The help line of ``action`` as ``--help`` prints it (for the help test)."""
    return HelpFormatter("x")._get_help_string(action) or ""


def common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--home", type=Path, default=None, metavar="DIR",
        help="the site's folder, made by `site init` (default: $PASSERELLE_HOME, else "
        "~/.passerelle)",
    )
    parent.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    return parent


def add_command(sub: Subparsers, name: str, handler: Handler, help_text: str,
                description: str | None = None) -> Parser:
    parser: Parser = sub.add_parser(
        name, help=help_text, description=description or help_text,
        parents=[common_options()], formatter_class=HelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def add_out(parser: argparse.ArgumentParser, kind: Literal["file", "dir"], help_text: str,
            *, required: bool = True, metavar: str | None = None) -> None:
    """``--out`` (and ``--force`` for a file), under the one overwrite rule."""
    parser.add_argument("--out", type=Path, required=required,
                        metavar=metavar or kind.upper(), help=help_text)
    if kind == "file":
        parser.add_argument("--force", action="store_true",
                            help="replace an existing --out file (atomically)")


# -- the site's home ------------------------------------------------------------------


def home_path(args: argparse.Namespace) -> Path:
    """The home the command names (--home, $PASSERELLE_HOME, ~/.passerelle), unchecked."""
    home: Path = args.home or Path(os.environ.get("PASSERELLE_HOME") or
                                   Path.home() / ".passerelle")
    return home


def home_of(args: argparse.Namespace, *, writes: bool = False) -> Path:
    """The site's home, which must exist (only ``site init`` creates one).

    ``writes``: the command changes the home, so it must be writable.
    """
    home = home_path(args)
    if not home.exists():
        raise BadInput(f"{home}: no site home here (a mistyped --home? `passerelle site "
                       "init NAME` creates one)")
    if not home.is_dir():
        raise BadInput(f"{home}: the site home is not a directory")
    if writes and not writable(home):
        raise BadInput(f"{home}: the site home is read-only")
    return home


def writable(folder: Path) -> bool:
    """Whether this process may create files in ``folder`` (with its effective ids)."""
    effective = os.access in os.supports_effective_ids
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=effective)


# -- outputs --------------------------------------------------------------------------


def check_out_file(path: Path, force: bool) -> None:
    """The overwrite rule for a FILE output, checked before any work."""
    if path.is_dir():
        raise BadInput(f"{path}: is a folder; --out names a file here")
    if (path.exists() or path.is_symlink()) and not force:
        raise BadInput(f"{path}: already exists (add --force to replace it)")
    check_parent(path)


def check_out_dir(path: Path) -> None:
    """The overwrite rule for a DIR output, checked before any work."""
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise BadInput(f"{path}: exists and is not a folder")
        if any(path.iterdir()):
            raise BadInput(f"{path}: the folder is not empty (choose a new one)")
    check_parent(path)


def check_parent(path: Path) -> None:
    """The nearest existing ancestor of ``path`` is a folder this process may write."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"{path}: {parent} is not a folder")
    if not writable(parent):
        raise BadInput(f"{path}: cannot write in {parent} (read-only)")


@contextmanager
def parents_of(path: Path) -> Iterator[Path]:
    """Create the missing parent folders of ``path``; remove them again on failure."""
    parent = path.absolute().parent
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        for folder in reversed(missing):
            folder.mkdir()
    except OSError as e:
        _remove_folders(missing)
        raise BadInput(f"{path}: cannot create the folder {e.filename}: {e.strerror}") from e
    try:
        yield parent
    except BaseException:
        _remove_folders(missing)
        raise


def _remove_folders(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with suppress(OSError):
            folder.rmdir()


@contextmanager
def output_file(path: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh path beside ``path`` for the library to write; when the block
    succeeds, move it to ``path`` (``os.replace``). Nothing is left on failure."""
    check_out_file(path, force)
    with parents_of(path) as parent:
        tmp = parent / f".{path.name}.{secrets.token_hex(6)}.partial"
        try:
            yield tmp
            if not force and (path.exists() or path.is_symlink()):
                raise BadInput(f"{path}: appeared while the command ran; nothing written")
            os.replace(tmp, path)
        finally:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with suppress(OSError):
                    tmp.unlink()


@contextmanager
def output_dir(path: Path) -> Iterator[Path]:
    """Check a DIR output and create its missing parents (removed again on failure);
    the library writes ``path`` itself, atomically."""
    check_out_dir(path)
    existed = path.exists()
    with parents_of(path):
        try:
            yield path
        except BaseException:
            if not existed:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and not path.is_symlink():  # it was empty: empty it again
                for child in path.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
            raise


# -- bounded numbers ------------------------------------------------------------------


def _parse(text: str, kind: type[int] | type[float], what: str) -> float:
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _refuse(text: str, rule: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"{text!r} {rule}")


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An option type: a whole number in [low, high]."""
    def parse(text: str) -> int:
        value = int(_parse(text.strip(), int, "a whole number"))
        if not low <= value <= high:
            _refuse(text, f"must be a whole number from {low:,} to {high:,}")
        return value

    parse.__name__ = f"whole number in [{low}, {high}]"
    return parse


def float_range(low: float, high: float, *, low_open: bool = True,
                high_open: bool = False) -> Callable[[str], float]:
    """An option type: a finite number between low and high (open or closed ends)."""
    def parse(text: str) -> float:
        value = _parse(text, float, "a number")
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            _refuse(text, f"must be in {'(' if low_open else '['}{low:g}, {high:g}"
                    f"{')' if high_open else ']'}")
        return value

    parse.__name__ = "number"
    return parse


SEED = int_range(0, 2**32 - 1)
positive_int = int_range(1, 10**6)
non_negative_int = int_range(0, 10**6)
positive_float = float_range(0.0, 1e6)
fraction = float_range(0.0, 1.0, high_open=True)  # (0, 1)


# -- input paths ----------------------------------------------------------------------


def existing_file(text: str) -> Path:
    """An option type: a file that exists (a missing file is exit 2 on every command)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    return path


def existing_dir(text: str) -> Path:
    """An option type: a folder that exists."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a folder")
    return path


def one_line(text: str) -> str:
    return " ".join(text.split())


console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def emit(args: argparse.Namespace, doc: dict[str, Any], human: Callable[[], None]) -> None:
    """Print ``doc`` as JSON with --json, else call ``human`` to print for people."""
    if args.json:
        print(json.dumps(doc, ensure_ascii=False, indent=1, default=str))
    else:
        human()


@contextmanager
def progress_bar(args: argparse.Namespace) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on stderr; the callback is (phase, done, total)."""
    show = not args.json and err_console.is_terminal
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err_console, disable=not show, transient=False)
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total)
        if not show and not args.json:
            err_console.print(f"{phase}: {done}/{total}")

    with bar:
        yield update


def quiet_dependencies() -> None:
    """Keep TensorFlow, tf2onnx and MLflow chatter off the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("tensorflow", "tf2onnx", "mlflow", "alembic", "absl", "skl2onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
