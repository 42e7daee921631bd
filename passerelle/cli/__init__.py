"""``passerelle``: the command line. A thin layer: parse, call a step, print, exit.

Exit codes (``passerelle --help`` prints them): 0 done; 1 refused (a check said no);
2 could not run as asked (usage, bad input, unreachable store); 130 interrupted;
141 standard output closed early. Errors are one line on stderr starting with
``error:``; only :class:`~passerelle.errors.PasserelleError` is caught, anything else is
a bug and keeps its traceback.

Nothing heavy is imported before :func:`main` runs, so that Ctrl-C during start-up is
caught like Ctrl-C anywhere else.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from passerelle.cli._common import Parser

INTERRUPTED = 130
BROKEN_PIPE = 141


def build_parser() -> Parser:
    from passerelle import __version__
    from passerelle.cli import (
        _common,
        bundle,
        data,
        demo,
        finetune,
        model,
        notice,
        predict,
        records,
        report,
        serve,
        site,
        trust,
    )

    groups = (data, model, site, trust, bundle, notice, finetune, predict, serve, demo,
              records, report)
    parser = _common.Parser(
        prog="passerelle",
        description="Move machine-learning models between hospitals without moving patients.",
        epilog=_common.EXIT_CODES + "\nEvery command takes --home DIR (or PASSERELLE_HOME) "
        "and --json.", formatter_class=_common.HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"passerelle {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in groups:
        group.add_to(sub)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    from passerelle.cli import _common
    from passerelle.errors import PasserelleError

    _common.quiet_dependencies()
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except PasserelleError as e:
        _error(_common.one_line(str(e)))
        return e.exit_code
    sys.stdout.flush()  # a closed pipe shows here, inside the handler's reach
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        _error("interrupted")
        return INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        _error("standard output was closed before everything was written")
        return BROKEN_PIPE


def _error(message: str) -> None:
    with contextlib.suppress(OSError):
        print(f"error: {message}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush
    does not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def entry() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
