"""``passerelle``: the command line. A thin layer: parse, call a step, print, exit.

Exit codes: 0 done; 1 refused (a check said no); 2 bad input or usage. Errors are one
line on stderr starting with ``error:``; only :class:`~passerelle.errors.PasserelleError`
is caught, anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

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
from passerelle.errors import PasserelleError

_GROUPS = (data, model, site, trust, bundle, notice, finetune, predict, serve, demo, records,
           report)


def build_parser() -> _common.Parser:
    parser = _common.Parser(
        prog="passerelle",
        description="Move machine-learning models between hospitals without moving patients.",
        epilog="Exit codes: 0 done, 1 refused, 2 bad input. Every command takes --home DIR "
        "(or PASSERELLE_HOME) and --json.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in _GROUPS:
        group.add_to(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _common.quiet_dependencies()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except PasserelleError as e:
        print(f"error: {_common.one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return code


def entry() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
