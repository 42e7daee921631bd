"""``passerelle report``: the compliance officer's signed, self-contained page about the
site's ledger, or the model-status dossier of one version (``--model NAME/VERSION``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from passerelle.cli._common import (
    Subparsers,
    add_command,
    check_out_file,
    console,
    emit,
    existing_file,
    home_of,
    one_line,
    parents_of,
)
from registry.store import VersionRef
from transfer.i18n import LANGS, Lang
from transfer.ledger import URL_ENV


def _out(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".html", ".htm", ".pdf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the report is FILE.html or FILE.pdf")
    return path


def add_to(sub: Subparsers) -> None:
    p = add_command(
        sub, "report", report, "write the compliance officer's report or a model's dossier",
        "Check the ledger (signatures, chain, digests against MLflow) and write one\n"
        "self-contained page, signed by the site's key (DSSE; check it with\n"
        "`passerelle records verify-report FILE`).\n\n"
        "Without --model: the site's report. A summary first, one line per question a\n"
        "data protection officer asks (integrity, models sent with their verdict and any\n"
        "override, models received, refusals, privacy budget per dataset, failed runs,\n"
        "withdrawals, expiries, configuration and trust changes); then every transfer with\n"
        "its evidence (the audit's figures per attack, ROC plot, canaries, scan, policy),\n"
        "the DP runs and budgets, and every record, filterable and expandable to its\n"
        "signed statement.\n\n"
        "With --model NAME/VERSION: that version's status dossier (CNIL method of July\n"
        "2025, EDPB opinion 28/2024): training data and legal basis, attacks and results\n"
        "against the policy, identifier scan, measures taken, conclusion and its limits.\n\n"
        "FILE.pdf is printed by headless Chromium; its signature goes beside it in\n"
        "FILE.pdf.dsse.json. Exit 1 if the ledger does not verify (the page is written all\n"
        "the same, and says where it broke).")
    p.add_argument("--out", type=_out, required=True, metavar="FILE.html|FILE.pdf",
                   help="where to write the page (.html, or .pdf through Chromium)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out file (atomically)")
    p.add_argument("--model", type=VersionRef.parse, metavar="NAME/VERSION",
                   help="write this version's status dossier instead of the site's report "
                        "(default: the site's report)")
    p.add_argument("--peer", type=existing_file, action="append", default=[], metavar="FILE",
                   help="a peer site's `records export`, verified with its pinned key, to show "
                        "whether each bundle sent to it was received (repeatable; default: "
                        "none, receipt unknown)")
    p.add_argument("--lang", choices=LANGS, default="en",
                   help="language of the page: fr or en (default: en)")
    p.add_argument("--ledger-url", metavar="URL", help=f"the ledger database (default: "
                   f"${URL_ENV}, else sqlite:///HOME/ledger.db)")


def report(args: argparse.Namespace) -> int:
    check_out_file(args.out, args.force)  # the page itself is written atomically
    home = home_of(args)
    lang: Lang = args.lang
    with parents_of(args.out):
        if args.model is not None:
            from transfer.dossier import write_dossier

            built = write_dossier(home, args.model, args.out, lang, args.ledger_url).report
            what = f"dossier of {args.model}"
        else:
            from transfer.report import write_report

            built = write_report(home, args.out, args.ledger_url, lang=lang, peers=args.peer)
            what = "report"
    i = built.integrity
    doc = {"out": str(args.out), "site": built.site, "records": len(built.records),
           "lang": lang, "model": None if args.model is None else str(args.model),
           "integrity": {"verified": i.ok, "summary": i.summary}}
    emit(args, doc, lambda: console.print(
        f"{what} of {built.site} written to {args.out} (ledger "
        f"{'verified' if i.ok else 'BROKEN'}: {i.summary})"))
    if not i.ok:
        print(f"error: {one_line(i.summary)} (the report at {args.out} shows it)",
              file=sys.stderr)
        return 1
    return 0
