"""``passerelle predict``: code a file of stays with a verified model (ONNX Runtime)."""

from __future__ import annotations

import argparse
from pathlib import Path

from passerelle.cli._common import (
    Subparsers,
    add_command,
    console,
    emit,
    home_of,
    positive_int,
    progress_bar,
)
from registry.store import ModelStore, VersionRef
from transfer.coding import code_file
from transfer.scoring import DEFAULT_TOP_K


def add_to(sub: Subparsers) -> None:
    p = add_command(
        sub, "predict", predict, "code stays with a verified model version (JSON Lines out)",
        "Code every stay of --data with NAME/VERSION in ONNX Runtime: for each stay, the\n"
        "top-k CIM-10 codes with their probabilities and labels, one JSON object per line\n"
        "in --out ({\"stay_id\", \"codes\": [{\"code\", \"label\", \"probability\"}]}).\n"
        "Before the model is loaded: its signature verifies (the sender's pinned key for a\n"
        "received version, this site's key for a fine-tuned one), its ONNX digest equals\n"
        "the one this site's ledger recorded, and it is not withdrawn (nor any version it\n"
        "derives from). Any failure: exit 1 with the reason, nothing written.\n"
        "--data is a corpus directory (as `data generate` writes it) or a JSON Lines file\n"
        "of stays, each {\"stay_id\"?, \"sections\": {...}} or {\"stay_id\"?, \"text\"};\n"
        "a malformed stay: exit 2, nothing written.")
    p.add_argument("ref", metavar="NAME/VERSION", help="a version of this site's registry")
    p.add_argument("--data", required=True, type=Path, metavar="DIR|FILE.jsonl",
                   help="the stays to code (a corpus directory or a JSON Lines file)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE",
                   help="the JSON Lines file to write (must not exist; mode 0600)")
    p.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K, metavar="K",
                   help=f"codes per stay, 1 to 50 (default {DEFAULT_TOP_K})")


def predict(args: argparse.Namespace) -> int:
    ref = VersionRef.parse(args.ref)
    with progress_bar(args) as progress:
        result = code_file(ModelStore(home_of(args)), ref, args.data, args.out, args.top_k,
                           progress)
    doc = {"model": str(ref), "out": str(result.out), "stays": result.stays,
           "onnx_digest": result.onnx_digest, "signed_by": result.signer,
           "origin": result.origin}
    emit(args, doc, lambda: console.print(
        f"coded {result.stays} stays with {ref} ({result.origin}, signed by {result.signer}, "
        f"{result.onnx_digest}) into {result.out}"))
    return 0
