"""``passerelle``: the command line. A thin layer: parse, call a step, print, exit.

Exit codes (``passerelle --help`` prints them): 0 done; 1 refused (a check said no);
2 could not run as asked (usage, bad input, unreachable store); 130 interrupted;
141 standard output closed early. Errors are one line on stderr starting with
``error:``; only :class:`~passerelle.errors.PasserelleError` is caught, anything else is
a bug and keeps its traceback.

Nothing heavy is imported before :func:`main` runs, so that Ctrl-C during start-up is
caught like Ctrl-C anywhere else. A Ctrl-C is remembered as well as raised: C code
sometimes turns the KeyboardInterrupt into another exception (numpy's import makes it an
ImportError), and the command still ends as interrupted (130, one line). The process then
ends through :func:`entry`, which keeps that 130 (see :func:`_end_interrupted`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from passerelle.cli._common import Parser

INTERRUPTED = 130
BROKEN_PIPE = 141


class _Sigint:
    """Whether SIGINT arrived while :func:`main` ran (its handler sets ``seen``)."""

    seen = False


def _on_sigint(_signum: int, _frame: FrameType | None) -> None:
    _Sigint.seen = True
    raise KeyboardInterrupt  # what Python's own handler does


@contextlib.contextmanager
def _sigint_remembered() -> Iterator[None]:
    """Remember a Ctrl-C while the block runs, then put the previous handler back. Only
    where Python's default handler is in place (a SIGINT the parent set to be ignored stays
    ignored) and only in the main thread (the only one that may set handlers)."""
    _Sigint.seen = False
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
        if _Sigint.seen:
            raise  # a Ctrl-C that became a refusal on its way up: interrupted
        _error(_common.one_line(str(e)))
        return e.exit_code
    sys.stdout.flush()  # a closed pipe shows here, inside the handler's reach
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``passerelle ARGV``; the exit code. It never ends the process (tests call it)."""
    with _sigint_remembered():
        try:
            return _run(argv)
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:
            if not _Sigint.seen:
                _silence_stdout()
                _error("standard output was closed before everything was written")
                return BROKEN_PIPE
        except Exception:
            if not _Sigint.seen:
                raise  # a bug: its traceback is kept
    _error("interrupted")
    return INTERRUPTED


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


def _end_interrupted(code: int) -> NoReturn:
    """End the process with ``code`` after a Ctrl-C, doing first what the interpreter's own
    exit does (wait for the threads that are not daemons, run the atexit functions, flush
    the streams) but not its last step. CPython 3.11 marks a KeyboardInterrupt that went
    through ``exec`` of a string (dataclasses and namedtuple build their methods so, while
    modules import) as never handled, even after :func:`main` caught it, and then ends the
    process by SIGINT (returncode -2) instead of exit 130: 9 of 60 Ctrl-C shortly after
    start-up did so here. ``os._exit`` is how the process still ends with 130. A second
    Ctrl-C meanwhile is ignored: the command is already ending."""
    with contextlib.suppress(ValueError):  # not the main thread: nothing to ignore from
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def entry() -> None:
    """The console script and ``python -m passerelle.cli``: run :func:`main`, end the
    process with its code."""
    code = main()
    if _Sigint.seen:
        _end_interrupted(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
