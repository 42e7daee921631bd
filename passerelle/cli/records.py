"""``passerelle records list|show|verify|export|checkpoint``: the site's signed ledger."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from passerelle.cli._common import (
    Subparsers,
    add_command,
    add_out,
    check_out_file,
    console,
    emit,
    existing_file,
    home_of,
    output_file,
)
from transfer.ledger import URL_ENV
from transfer.ledger_site import (
    open_ledger,
    site_signer,
    verify_site,
)
from transfer.records import RecordKind


def _since(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def add_to(sub: Subparsers) -> None:
    group = sub.add_parser("records", help="the site's signed, chained ledger").add_subparsers(
        dest="records_command", metavar="COMMAND", required=True)

    def command(name: str, handler: Any, help_text: str, description: str | None = None
                ) -> argparse.ArgumentParser:
        p = add_command(group, name, handler, help_text, description)
        p.add_argument("--ledger-url", metavar="URL", help=f"the ledger database (default: "
                       f"${URL_ENV}, else sqlite:///HOME/ledger.db)")
        return p

    p = command("list", list_, "list the site's records, oldest first")
    p.add_argument("--model", metavar="NAME", help="only records about this model "
                   "(default: all)")
    p.add_argument("--since", type=_since, metavar="ISO", help="only records from this time "
                   "on, UTC unless a zone is given (default: all)")
    p.add_argument("--kind", type=RecordKind, choices=list(RecordKind), metavar="KIND",
                   help="only records of this kind (default: all): " + ", ".join(RecordKind))
    p = command("show", show, "print one record: its statement and envelope")
    p.add_argument("id", metavar="ID", help="record id (sha256:<hex>, or 8+ hex digits)")
    p = command(
        "verify", verify, "check signatures and the chain; exit 1 at the first bad record",
        "Check every record in order: canonical envelope, signature by this site's key\n"
        "(current or retired), seq contiguous from 0, prev = id of the previous record.\n"
        "Dropped newest records are caught only against something kept elsewhere:\n"
        "--checkpoint (a head signed earlier with `records checkpoint`) or --peer (another\n"
        "site's export: every transfer between the two sites must appear at both ends).")
    p.add_argument("--peer", type=existing_file, metavar="FILE",
                   help="a peer site's records export (default: none)")
    p.add_argument("--checkpoint", type=existing_file, metavar="FILE",
                   help="a checkpoint written by `records checkpoint` (default: none)")
    p = command("export", export, "write the signed envelopes as JSON Lines",
                "One DSSE envelope (in-toto statement v1) per line, in chain order; readable\n"
                "without Passerelle (base64-decode each payload).")
    add_out(p, "file", "the JSON Lines file to write")
    p = command("checkpoint", checkpoint, "sign the chain head into a file kept elsewhere",
                "Write a signed statement of the chain head (seq, id, time). Keep it outside\n"
                "the ledger (another machine, the peer, the DPO's mail); `records verify\n"
                "--checkpoint FILE` later refuses a ledger that no longer holds that head.")
    add_out(p, "file", "the checkpoint file to write")
    p = add_command(
        group, "verify-report", verify_report, "check a report's or dossier's signature",
        "Check that FILE (a report or dossier written by `passerelle report`) is signed by\n"
        "this site's key (current or retired) or a trusted site's, and that not one byte\n"
        "of it changed since (its digest is in the signed statement). An HTML page carries\n"
        "its DSSE envelope inside; a PDF carries it beside it, in FILE.pdf.dsse.json.\n"
        "Exit 1 if it does not verify.")
    p.add_argument("file", type=existing_file, metavar="FILE",
                   help="the report (.html or .pdf)")
    p = command(
        "lineage", lineage, "versions derived from a dataset or a model, at every site",
        "From this site's ledger and its peers' exports (--peer, signatures checked with\n"
        "their pinned keys): every model version derived from the dataset (a corpus\n"
        "fingerprint, as model provenance records it) or from this site's NAME/VERSION\n"
        "(trained, received, fine-tuned from), at which site, active or withdrawn.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--dataset", metavar="DIGEST",
                       help="a dataset fingerprint sha256:<hex> (this or --model is required)")
    which.add_argument("--model", metavar="NAME/VERSION",
                       help="a version of this site (this or --dataset is required)")
    p.add_argument("--peer", type=existing_file, action="append", default=[], metavar="FILE",
                   help="a peer site's `records export` (repeatable; default none)")


def list_(args: argparse.Namespace) -> int:
    with open_ledger(home_of(args), args.ledger_url) as ledger:
        found = ledger.records(kind=args.kind, since=args.since, model=args.model)
    doc = {"records": [r.summary() for r in found]}

    def human() -> None:
        table = Table(title=f"ledger of {ledger.site}")
        for col in ("seq", "time", "kind", "model", "id"):
            table.add_column(col)
        for r in found:
            model = f"{r.model}/{r.fields.get('version', '')}" if r.model else ""
            table.add_row(str(r.seq), r.time[:19], r.kind.value, model, r.id[:23])
        console.print(table)

    emit(args, doc, human)
    return 0


def show(args: argparse.Namespace) -> int:
    with open_ledger(home_of(args), args.ledger_url) as ledger:
        record = ledger.get(args.id)
    doc = {**record.summary(), "statement": record.statement(), "envelope": record.envelope}
    emit(args, doc, lambda: console.print_json(data=doc))
    return 0


def verify(args: argparse.Namespace) -> int:
    checked = verify_site(home_of(args), args.ledger_url, args.checkpoint, args.peer)
    result = checked.ledger
    doc: dict[str, Any] = result.to_json()
    lines = [f"{result.site}: {result.count} records verified (signatures, chain, and "
             "digests against MLflow where the versions still exist)"]
    if checked.checkpoint is not None:
        cp = checked.checkpoint
        doc["checkpoint"] = cp.to_json()
        lines.append(f"checkpoint of {cp.time}: seq {cp.seq} {cp.head} is still there")
    if checked.peer is not None:
        peer = checked.peer
        doc["peer"] = peer.to_json()
        lines.append(f"peer {peer.peer}: {peer.received} transfers in, {peer.sent} out, "
                     "recorded at both ends")
    emit(args, doc, lambda: console.print("\n".join(lines)))
    return 0


def verify_report(args: argparse.Namespace) -> int:
    from transfer.report_signature import known_keys
    from transfer.report_signature import verify_report as check

    ring, sites = known_keys(home_of(args))
    result = check(args.file, ring, sites)
    emit(args, result.to_json(), lambda: console.print(
        f"{args.file}: signed by site {result.site} ({result.keyid}), unchanged since "
        f"(digest {result.digest}); {result.predicate.get('scope')}, generated "
        f"{result.predicate.get('generated')}"))
    return 0


def export(args: argparse.Namespace) -> int:
    check_out_file(args.out, args.force)
    with open_ledger(home_of(args), args.ledger_url) as ledger, \
            output_file(args.out, args.force) as tmp:
        count = ledger.export(tmp)
    doc = {"out": str(args.out), "records": count}
    emit(args, doc, lambda: console.print(f"{count} records written to {args.out}"))
    return 0


def lineage(args: argparse.Namespace) -> int:
    from registry.store import VersionRef
    from transfer.lineage import lineage as find_lineage

    model = VersionRef.parse(args.model) if args.model else None
    found = find_lineage(home_of(args), args.dataset, model, args.peer, args.ledger_url)
    doc = {"dataset": args.dataset, "model": args.model,
           "versions": [d.to_json() for d in found]}

    def human() -> None:
        table = Table(title=f"derived from {args.dataset or args.model}")
        for col in ("site", "model", "version", "status", "how", "from"):
            table.add_column(col)
        for d in found:
            table.add_row(d.site, d.model, d.version, d.status, d.how, d.derived_from or "")
        console.print(table)

    emit(args, doc, human)
    return 0


def checkpoint(args: argparse.Namespace) -> int:
    check_out_file(args.out, args.force)
    home = home_of(args)
    with open_ledger(home, args.ledger_url) as ledger, \
            output_file(args.out, args.force) as tmp:
        cp = ledger.checkpoint(site_signer(home), tmp)
    doc = {"out": str(args.out), **cp.to_json()}
    emit(args, doc, lambda: console.print(
        f"checkpoint of {cp.site} at seq {cp.seq} ({cp.head}) written to {args.out}; keep "
        "it outside this site"))
    return 0
