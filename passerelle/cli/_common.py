"""What every command shares: the parser, --home and --json, output and progress."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from passerelle.errors import BadInput

Handler = Callable[[argparse.Namespace], int]
Subparsers = Any  # argparse._SubParsersAction, private in typeshed


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--home", type=Path, default=None, metavar="DIR",
        help="the site's folder (default: $PASSERELLE_HOME, else ~/.passerelle)",
    )
    parent.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    return parent


def add_command(sub: Subparsers, name: str, handler: Handler, help_text: str,
                description: str | None = None) -> Parser:
    parser: Parser = sub.add_parser(
        name, help=help_text, description=description or help_text,
        parents=[common_options()], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def home_of(args: argparse.Namespace) -> Path:
    """The site's home, created (0700) if missing."""
    home: Path = args.home or Path(os.environ.get("PASSERELLE_HOME") or
                                   Path.home() / ".passerelle")
    if home.exists() and not home.is_dir():
        raise BadInput(f"{home}: the site home is not a directory")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home


def _parse(text: str, kind: type[int] | type[float], what: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _refuse(text: str, rule: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"{text!r} {rule}")


def positive_int(text: str) -> int:
    value = int(_parse(text, int, "a whole number"))
    return value if value >= 1 else _refuse(text, "must be at least 1")


def non_negative_int(text: str) -> int:
    value = int(_parse(text, int, "a whole number"))
    return value if value >= 0 else _refuse(text, "must not be negative")


def positive_float(text: str) -> float:
    value = _parse(text, float, "a number")
    return value if value > 0 else _refuse(text, "must be positive")


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
