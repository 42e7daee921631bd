"""``passerelle serve``: a scoring server speaking MLflow's protocol over a verified model."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from passerelle.cli._common import (
    Subparsers,
    add_command,
    err_console,
    home_of,
    non_negative_int,
    positive_float,
    positive_int,
)
from registry.store import ModelStore, VersionRef
from transfer.scoring import DEFAULT_TOP_K
from transfer.serve import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_STAYS,
    DEFAULT_TIMEOUT,
    ScoringServer,
    ServeOptions,
    check_interval,
)


def add_to(sub: Subparsers) -> None:
    p = add_command(
        sub, "serve", serve, "serve a verified model version over HTTP (MLflow scoring protocol)",
        "Serve NAME/VERSION on --host:--port with MLflow's scoring protocol: POST\n"
        "/invocations (application/json with dataframe_records, dataframe_split, instances\n"
        "or inputs; each row a stay: sections, the section names as columns, or text; an\n"
        "optional stay_id) answers {\"predictions\": [{\"stay_id\", \"codes\": [...]}]};\n"
        "GET /ping and /health (200 while served, 503 once a check refused the model) and\n"
        "/version (the MLflow version). Errors are MLflow's JSON {error_code, message}\n"
        "with a 4xx status.\n"
        "The checks of `passerelle predict` (signature, ONNX digest against the ledger, not\n"
        "withdrawn) run before the port opens (exit 1 if they refuse, exit 2 if the port is\n"
        "in use) and again every --check-interval seconds (the site policy's\n"
        "deploy.check_interval_seconds, default 30; a flag may only shorten it) and on\n"
        "SIGHUP: a version withdrawn while the server runs stops being served within\n"
        "that interval.\n"
        "One log line per request on stderr: status, number of stays, bytes, latency;\n"
        "never the letters. Stops on SIGINT or SIGTERM (exit 0).")
    p.add_argument("ref", metavar="NAME/VERSION", help="a version of this site's registry")
    p.add_argument("--port", required=True, type=non_negative_int, metavar="P",
                   help="TCP port (0: any free port, printed at start)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--max-request-bytes", type=positive_int, default=DEFAULT_MAX_REQUEST_BYTES,
                   metavar="N", help="largest request body accepted, 413 above (default "
                   f"{DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--max-stays", type=positive_int, default=DEFAULT_MAX_STAYS, metavar="N",
                   help=f"most stays in one request, 413 above (default {DEFAULT_MAX_STAYS})")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"socket read/write timeout per request (default {DEFAULT_TIMEOUT:g} s)")
    p.add_argument("--check-interval", type=positive_float, metavar="S",
                   help="seconds between two checks of the version (withdrawal, signature, "
                   "digest), at least 0.5, at most the site's deploy.check_interval_seconds "
                   "(default: that setting, 30 unless the site changed it)")
    p.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K, metavar="K",
                   help=f"codes per stay, 1 to 50 (default {DEFAULT_TOP_K})")


def serve(args: argparse.Namespace) -> int:
    ref = VersionRef.parse(args.ref)
    home = home_of(args)
    options = ServeOptions(port=args.port, host=args.host,
                           max_request_bytes=args.max_request_bytes, max_stays=args.max_stays,
                           timeout=args.timeout,
                           check_interval=check_interval(home, args.check_interval),
                           top_k=args.top_k)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log = logging.getLogger("passerelle.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    server = ScoringServer(lambda: ModelStore(home), ref, options)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        server.stop()

    def hup(_signum: int, _frame: FrameType | None) -> None:
        server.check_soon()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, hup)
    server.start()
    coder = server.state[0]
    digest = coder.model.onnx_digest if coder else "?"
    err_console.print(f"serving {ref} ({digest}) on http://{options.host}:{server.port} "
                      f"(checks every {options.check_interval:g} s)")
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0
