"""``passerelle notice receive``: apply a signed withdrawal notice from a trusted site."""

from __future__ import annotations

import argparse
from pathlib import Path

from passerelle.cli._common import Subparsers, add_command, console, emit, home_of
from transfer.withdrawal import receive_notice


def add_to(sub: Subparsers) -> None:
    group = sub.add_parser("notice", help="withdrawal notices from the sites models came from"
                           ).add_subparsers(dest="notice_command", metavar="COMMAND",
                                            required=True)
    p = add_command(
        group, "receive", receive, "verify a withdrawal notice and withdraw what it names",
        "Check a withdrawal notice written by `passerelle model withdraw` at the sending\n"
        "site: its signer is pinned in the trust store and not revoked, its signature\n"
        "verifies, it names this site, it is not dated in the future, and it is newer than\n"
        "every notice accepted from that site (no replay). Then every version this site\n"
        "received as that model and version, and every version derived from them, is\n"
        "marked withdrawn (MLflow tags passerelle.withdrawn*, a notice_received record):\n"
        "`predict` and `serve` refuse them. A refused notice: exit 1, a notice_refused\n"
        "record, nothing marked.")
    p.add_argument("file", type=Path, metavar="FILE", help="the withdrawal notice")


def receive(args: argparse.Namespace) -> int:
    applied = receive_notice(home_of(args), args.file)
    n = applied.notice
    doc = {"from": n.sender.site, "model": n.model, "version": n.version,
           "sequence": n.sequence, "reason": n.reason, "notice_digest": applied.digest,
           "withdrawn": [str(v) for v in applied.withdrawn]}
    emit(args, doc, lambda: console.print(
        f"{n.sender.site} withdrew {n.model}/{n.version} ({n.reason}); withdrawn here: "
        f"{', '.join(str(v) for v in applied.withdrawn) or 'nothing (never received)'}"))
    return 0
