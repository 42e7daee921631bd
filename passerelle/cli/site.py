"""``passerelle site init|show|rotate``: this site's identity."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from passerelle.cli._common import Subparsers, add_command, console, emit, err_console, home_of
from transfer.identity import (
    PASSPHRASE_ENV,
    init_site,
    public_identity,
    read_passphrase,
    rotate_site,
)


def add_to(sub: Subparsers) -> None:
    group = sub.add_parser("site", help="this site's identity (keys)").add_subparsers(
        dest="site_command", metavar="COMMAND", required=True)
    p = add_command(
        group, "init", init, "create this site's signing key and age identity",
        "Create an ECDSA P-256 signing key and an age X25519 identity under the home\n"
        "(private files mode 0600). With a passphrase (from $" + PASSPHRASE_ENV + ", or asked\n"
        "for with --ask-passphrase) both private keys are encrypted; it is never an argument.")
    p.add_argument("name", metavar="NAME", help="the site's name (letters, digits, . _ -)")
    p.add_argument("--ask-passphrase", action="store_true",
                   help="ask for a passphrase on the terminal if $" + PASSPHRASE_ENV +
                   " is not set")
    p = add_command(
        group, "show", show, "print this site's public identity file",
        "Print the public identity (site name, signing key and its fingerprint, age\n"
        "recipient; self-signed) as the JSON file another site imports with `trust add`.")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write it to FILE")
    add_command(
        group, "rotate", rotate, "replace this site's keys, vouched for by the current key",
        "Create new keys; the new public identity is signed by the current key too, so a\n"
        "site that trusts the current key accepts the new one with `trust add` alone.\n"
        "Old keys are kept under identity/retired/.")


def _passphrase(args: argparse.Namespace) -> str | None:
    if getattr(args, "ask_passphrase", False):
        return read_passphrase("new passphrase: ", confirm=True)
    return os.environ.get(PASSPHRASE_ENV) or None


def init(args: argparse.Namespace) -> int:
    public = init_site(home_of(args), args.name, _passphrase(args))
    doc = {"site": public.site, "fingerprint": public.fingerprint,
           "age_recipient": public.age_recipient}
    emit(args, doc, lambda: console.print(
        f"site {public.site} created: signing key {public.fingerprint}, age recipient "
        f"{public.age_recipient}"))
    return 0


def show(args: argparse.Namespace) -> int:
    public = public_identity(home_of(args))
    text = json.dumps(public.to_json(), indent=1) + "\n"
    if args.out is not None:
        args.out.write_text(text)
    sys.stdout.write(text)
    if not args.json:
        err_console.print(f"site {public.site}, fingerprint {public.fingerprint}")
    return 0


def rotate(args: argparse.Namespace) -> int:
    public = rotate_site(home_of(args))
    doc = {"site": public.site, "fingerprint": public.fingerprint,
           "previous_fingerprint": public.previous_fingerprint,
           "age_recipient": public.age_recipient}
    emit(args, doc, lambda: console.print(
        f"site {public.site}: new key {public.fingerprint} (vouched for by "
        f"{public.previous_fingerprint}); publish `passerelle site show`"))
    return 0
