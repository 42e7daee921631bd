"""``passerelle bundle create|verify|receive``: signed, encrypted model transfers."""

from __future__ import annotations

import argparse

from passerelle.cli._common import (
    Subparsers,
    add_command,
    add_out,
    check_out_file,
    console,
    emit,
    existing_file,
    home_of,
    parents_of,
    writable,
)
from passerelle.errors import BadInput
from passerelle.leftovers import check_recorded
from registry.store import ModelStore, VersionRef
from transfer.exchange import create_bundle, describe, receive_bundle, verify_bundle


def add_to(sub: Subparsers) -> None:
    group = sub.add_parser("bundle", help="send and receive signed, encrypted models"
                           ).add_subparsers(dest="bundle_command", metavar="COMMAND",
                                            required=True)
    p = add_command(
        group, "create", create, "seal a model version for one or more trusted sites",
        "Take the version's exported ONNX folder, add a transfer statement (sender,\n"
        "recipients, model, version, sequence number, created/expires, purpose, legal\n"
        "basis), sign it with OpenSSF Model Signing, pack it deterministically, encrypt it\n"
        "with age to the recipients and write a signed outer header.")
    p.add_argument("ref", metavar="NAME/VERSION", help="a version of this site's registry")
    p.add_argument("--to", action="append", required=True, metavar="SITE",
                   help="a trusted recipient site (repeatable)")
    add_out(p, "file", "the bundle file to write")
    p = add_command(
        group, "verify", verify, "check a bundle (decrypting in a private place)",
        "Check the outer header against the trust store without decrypting; with this\n"
        "site's identity, also decrypt into a private temporary folder and check the\n"
        "archive, the model signature, the statement and the ONNX model, then delete it.\n"
        "Exit 1 with the reason if any check fails.")
    p.add_argument("file", type=existing_file, metavar="FILE", help="the bundle")
    p = add_command(
        group, "receive", receive, "verify a bundle, install and register its model",
        "Everything `bundle verify` checks; then install the model atomically under\n"
        "received/ in the home and register it in this site's MLflow registry with lineage\n"
        "tags, as SENDER.MODEL (e.g. CHU-X.pmsi-coder; never merged into a local model).\n"
        "A refused bundle leaves no plaintext and no registry entry. Receiving a bundle\n"
        "already registered here does nothing and says so (exit 0); a receive killed\n"
        "half-way is completed or undone by the next one.")
    p.add_argument("file", type=existing_file, metavar="FILE", help="the bundle")


def create(args: argparse.Namespace) -> int:
    ref = VersionRef.parse(args.ref)
    check_out_file(args.out, args.force)
    home = home_of(args, writes=True)
    store = ModelStore(home)
    check_recorded(store, ref)  # a killed register's unrecorded version: before any work
    with parents_of(args.out):  # the library writes beside --out and renames it at the end
        result = create_bundle(home, store, ref, args.to, args.out, overwrite=args.force)
    t = result.statement.transfer
    doc = {"out": str(args.out), "bundle_digest": result.digest, "size": result.size,
           "model": t.model, "version": t.version, "sequence": t.sequence,
           "recipients": [r.site for r in t.recipients], "expires": t.expires,
           "finished": [str(p) for p in result.finished]}
    for path in [] if args.json else result.finished:
        console.print(f"finished {path}, left by a bundle create interrupted after its "
                      "ledger record")
    emit(args, doc, lambda: console.print(
        f"sealed {t.model}/{t.version} (sequence {t.sequence}) for "
        f"{', '.join(r.site for r in t.recipients)} in {args.out} ({result.size} bytes, "
        f"{result.digest}); expires {t.expires}"))
    return 0


def verify(args: argparse.Namespace) -> int:
    home = home_of(args)
    if (home / "identity").is_dir() and not writable(home):  # it decrypts in HOME/.receiving
        raise BadInput(f"{home}: the site home is read-only (bundle verify decrypts the "
                       "payload in a private folder there)")
    result = verify_bundle(args.file, home)
    doc = {"verified": True, **describe(result)}
    what = "every check passed" if result.decrypted else \
        "outer header verified (no site identity here: payload not checked)"
    h = result.header.transfer
    emit(args, doc, lambda: console.print(
        f"{args.file}: {h.model}/{h.version} from {h.sender.site} (sequence {h.sequence}): "
        f"{what}"))
    return 0


def receive(args: argparse.Namespace) -> int:
    home = home_of(args, writes=True)
    result = receive_bundle(args.file, home, ModelStore(home))
    t = result.statement.transfer
    doc = {"model": result.version.ref.name, "version": result.version.ref.version,
           "directory": str(result.directory), "bundle_digest": result.bundle_digest,
           "sender": t.sender.site, "source_version": t.version, "sequence": t.sequence,
           "tags": dict(result.version.tags), "already_received": result.already}
    emit(args, doc, lambda: console.print(
        f"{t.model}/{t.version} from {t.sender.site} was already received: registered as "
        f"{result.version.ref} (nothing done)" if result.already else
        f"received {t.model}/{t.version} from {t.sender.site}: registered as "
        f"{result.version.ref} in {result.directory}"))
    return 0
