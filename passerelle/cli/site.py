"""``passerelle site init|show|rotate``: this site's identity."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from passerelle.cli._common import (
    Subparsers,
    add_command,
    add_out,
    check_out_file,
    check_parent,
    console,
    emit,
    err_console,
    home_of,
    home_path,
    output_file,
    parents_of,
    writable,
)
from passerelle.errors import BadInput
from transfer.identity import (
    PASSPHRASE_ENV,
    init_site,
    public_identity,
    read_passphrase,
    rotate_site,
    site_name,
)
from transfer.site_policy import KEYS, load_policy, set_value


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
    add_out(p, "file", "also write it to FILE (default: stdout only)", required=False)
    add_command(
        group, "rotate", rotate, "replace this site's keys, vouched for by the current key",
        "Create new keys; the new public identity is signed by the current key too, so a\n"
        "site that trusts the current key accepts the new one with `trust add` alone.\n"
        "The new private keys are encrypted with the current passphrase when the current\n"
        "ones are (from $" + PASSPHRASE_ENV + " or asked on the terminal). Atomic: on any\n"
        "failure the current keys stay and nothing is recorded. Old keys are kept under\n"
        "identity/retired/.")
    policy = group.add_parser(
        "policy", help="the site's own settings (budget cap, pinned audit policy, ...)"
    ).add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    add_command(
        policy, "show", policy_show, "print the site's settings and their defaults",
        "Print every setting of the site policy (HOME/site-policy.toml): its value, its\n"
        "default and what it is for. The file is checked against the ledger first.")
    p = add_command(
        policy, "set", policy_set, "change one setting of the site policy (recorded)",
        "Change one setting. The change is a signed `site_policy_changed` record in the\n"
        "ledger (old and new value, approver, justification, digest of the new file);\n"
        "a file the ledger did not record is refused by every command that reads it.\n"
        "Settings:\n" + "\n".join(f"  {k.name} (default {k.default!r}): {k.help}"
                                   for k in KEYS.values()))
    p.add_argument("key", metavar="KEY", help="the setting, e.g. privacy.epsilon_cap")
    p.add_argument("value", metavar="VALUE", help="its new value")
    p.add_argument("--approver", required=True, metavar="NAME",
                   help="who approves the change (recorded; required)")
    p.add_argument("--justification", required=True, metavar="TEXT",
                   help="why (recorded; required)")


def _passphrase(args: argparse.Namespace) -> str | None:
    if getattr(args, "ask_passphrase", False):
        return read_passphrase("new passphrase: ", confirm=True, required=True)
    return os.environ.get(PASSPHRASE_ENV) or None


def init(args: argparse.Namespace) -> int:
    """The one command that creates a home; a failed init leaves no home behind."""
    site_name(args.name)  # a bad name is refused before anything is created
    home = home_path(args)
    existed = home.exists()
    if existed and not home.is_dir():
        raise BadInput(f"{home}: exists and is not a folder")
    if existed and not writable(home):
        raise BadInput(f"{home}: the folder is read-only")
    if not existed:
        check_parent(home)
    passphrase = _passphrase(args)
    with parents_of(home):
        try:
            public = init_site(home, args.name, passphrase)
        except BaseException:
            if not existed:
                shutil.rmtree(home, ignore_errors=True)
            raise
    doc = {"site": public.site, "fingerprint": public.fingerprint,
           "age_recipient": public.age_recipient}
    emit(args, doc, lambda: console.print(
        f"site {public.site} created: signing key {public.fingerprint}, age recipient "
        f"{public.age_recipient}"))
    return 0


def show(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_out_file(args.out, args.force)
    public = public_identity(home_of(args))
    text = json.dumps(public.to_json(), indent=1) + "\n"
    if args.out is not None:
        with output_file(args.out, args.force) as tmp:
            tmp.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    if not args.json:
        err_console.print(f"site {public.site}, fingerprint {public.fingerprint}")
    return 0


def rotate(args: argparse.Namespace) -> int:
    public = rotate_site(home_of(args, writes=True))
    doc = {"site": public.site, "fingerprint": public.fingerprint,
           "previous_fingerprint": public.previous_fingerprint,
           "age_recipient": public.age_recipient}
    emit(args, doc, lambda: console.print(
        f"site {public.site}: new key {public.fingerprint} (vouched for by "
        f"{public.previous_fingerprint}); publish `passerelle site show`"))
    return 0


def _policy_doc(home: Path) -> dict[str, object]:
    policy = load_policy(home)
    return {"digest": policy.digest,
            "settings": {name: {"value": _plain(policy.values[name]),
                                "default": _plain(key.default), "help": key.help}
                         for name, key in KEYS.items()}}


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def policy_show(args: argparse.Namespace) -> int:
    doc = _policy_doc(home_of(args))

    def human() -> None:
        console.print(f"site policy: {doc['digest'] or 'defaults (no change recorded)'}")
        settings = doc["settings"]
        assert isinstance(settings, dict)  # noqa: S101
        for name, item in settings.items():
            mark = "" if item["value"] == item["default"] else " (changed)"
            console.print(f"  {name} = {item['value']!r}{mark}: {item['help']}")

    emit(args, doc, human)
    return 0


def policy_set(args: argparse.Namespace) -> int:
    home = home_of(args, writes=True)
    before = load_policy(home)
    after = set_value(home, args.key, args.value, args.approver, args.justification)
    doc = {"setting": args.key, "old": _plain(before.get(args.key)),
           "new": _plain(after.get(args.key)), "digest": after.digest}
    emit(args, doc, lambda: console.print(
        f"{args.key}: {doc['old']!r} -> {doc['new']!r} (recorded; policy {after.digest})"))
    return 0
