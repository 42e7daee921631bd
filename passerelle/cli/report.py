"""``passerelle report --out FILE.html``: the compliance officer's self-contained page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from passerelle.cli._common import Subparsers, add_command, console, emit, home_of, one_line
from transfer.ledger import URL_ENV
from transfer.report import write_report


def add_to(sub: Subparsers) -> None:
    p = add_command(
        sub, "report", report, "write the compliance officer's report (one HTML file)",
        "Check the ledger (signatures, chain, digests against MLflow) and write one\n"
        "self-contained HTML page: the integrity verdict, the site's identity, the trust\n"
        "store, every transfer in and out with its evidence (audit verdict, ROC plot,\n"
        "override), refusals, the DP budget and every record. Exit 1 if the ledger does\n"
        "not verify (the page is written all the same, and says where it broke).")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.html")
    p.add_argument("--ledger-url", metavar="URL", help=f"the ledger database (default: "
                   f"${URL_ENV}, else sqlite:///HOME/ledger.db)")


def report(args: argparse.Namespace) -> int:
    result = write_report(home_of(args), args.out, args.ledger_url)
    i = result.integrity
    doc = {"out": str(args.out), "site": result.site, "records": len(result.records),
           "integrity": {"verified": i.ok, "summary": i.summary}}
    emit(args, doc, lambda: console.print(
        f"report of {result.site} written to {args.out} (ledger "
        f"{'verified' if i.ok else 'BROKEN'}: {i.summary})"))
    if not i.ok:
        print(f"error: {one_line(i.summary)} (the report at {args.out} shows it)",
              file=sys.stderr)
        return 1
    return 0
