"""``passerelle trust add|list|revoke``: the sites this site trusts."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from passerelle.cli._common import Subparsers, add_command, console, emit, existing_file, home_of
from passerelle.errors import Refused
from transfer.identity import PublicIdentity, identity_dir, parse_fingerprint, public_identity
from transfer.trust import TrustStore


def add_to(sub: Subparsers) -> None:
    group = sub.add_parser("trust", help="the sites this site trusts").add_subparsers(
        dest="trust_command", metavar="COMMAND", required=True)
    p = add_command(
        group, "add", add, "trust a site's identity file (pin its key)",
        "Pin the signing key of the site in IDENTITY_FILE (check its fingerprint with the\n"
        "site out of band, or pass it with --fingerprint). A new key for a site already\n"
        "trusted is accepted only when the identity is signed by the trusted key (rotation).")
    p.add_argument("identity_file", type=existing_file, metavar="IDENTITY_FILE",
                   help="the other site's public identity (its `site show --out FILE`)")
    p.add_argument("--fingerprint", metavar="FP", help="refuse unless the key has this "
                   "fingerprint (default: none; then check it out of band)")
    add_command(group, "list", list_, "list trusted, superseded and revoked keys")
    p = add_command(group, "revoke", revoke, "revoke a key: bundles it signed are refused")
    p.add_argument("fingerprint", metavar="FINGERPRINT", help="the key's fingerprint "
                   "(sha256:<hex>, as `trust list` shows it)")


def add(args: argparse.Namespace) -> int:
    home = home_of(args, writes=True)
    identity = PublicIdentity.from_file(args.identity_file)
    expect = parse_fingerprint(args.fingerprint) if args.fingerprint else None
    _refuse_own(home, identity)
    outcome = TrustStore(home).add(identity, expect)
    doc = {"site": identity.site, "fingerprint": identity.fingerprint,
           "outcome": outcome.value, "previous_fingerprint": identity.previous_fingerprint}
    emit(args, doc, lambda: console.print(
        f"{identity.site} {identity.fingerprint}: {outcome.value}"))
    return 0


def _refuse_own(home: Path, identity: PublicIdentity) -> None:
    """A site never trusts its own name: its own key needs no pin, and another key under
    its name is an impersonation."""
    if not (identity_dir(home)).is_dir():
        return
    own = public_identity(home)
    if identity.site == own.site or identity.fingerprint == own.fingerprint:
        raise Refused(f"{identity.site} {identity.fingerprint}: this is this site's own "
                      f"name or key ({own.site}); a site does not trust itself")


def list_(args: argparse.Namespace) -> int:
    entries = TrustStore(home_of(args)).entries()
    doc = {"keys": [{"site": e.identity.site, "fingerprint": e.identity.fingerprint,
                     "age_recipient": e.identity.age_recipient, "status": e.status.value,
                     "added": e.added, "changed": e.changed} for e in entries]}

    def human() -> None:
        table = Table(title="trust store")
        for col in ("site", "fingerprint", "status", "added", "changed"):
            table.add_column(col)
        for e in entries:
            table.add_row(e.identity.site, e.identity.fingerprint, e.status.value, e.added,
                          e.changed or "")
        console.print(table)

    emit(args, doc, human)
    return 0


def revoke(args: argparse.Namespace) -> int:
    entry = TrustStore(home_of(args, writes=True)).revoke(parse_fingerprint(args.fingerprint))
    doc = {"site": entry.identity.site, "fingerprint": entry.identity.fingerprint,
           "status": entry.status.value}
    emit(args, doc, lambda: console.print(
        f"revoked {entry.identity.site} {entry.identity.fingerprint}"))
    return 0
