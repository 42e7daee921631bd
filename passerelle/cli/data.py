"""``passerelle data generate``: the synthetic PMSI corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from passerelle import steps
from passerelle.cli._common import (
    Subparsers,
    add_command,
    console,
    emit,
    non_negative_int,
    positive_int,
)
from passerelle.corpus import SITES


def add_to(sub: Subparsers) -> None:
    group = sub.add_parser("data", help="synthetic PMSI corpora").add_subparsers(
        dest="data_command", metavar="COMMAND", required=True)
    p = add_command(
        group, "generate", generate,
        "write a synthetic PMSI corpus (JSON Lines) for one site",
        "Write a synthetic PMSI corpus for site X (university hospital) or Y (smaller "
        "hospital):\nstays.jsonl, canaries.jsonl, codes.json, manifest.json. Fully "
        "determined by the seed.\nThe folder must not exist or be empty.",
    )
    p.add_argument("--site", required=True, choices=SITES, help="site profile")
    p.add_argument("--stays", required=True, type=positive_int, metavar="N",
                   help="number of stays (canaries come on top)")
    p.add_argument("--seed", required=True, type=int, metavar="S")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--canaries", type=non_negative_int, default=0, metavar="K",
                   help="plant K canary stays carrying a random secret (default 0)")


def generate(args: argparse.Namespace) -> int:
    corpus = steps.generate_corpus(args.site, args.stays, args.seed, args.canaries, args.out)
    patients = len({s.patient_id for s in corpus.stays})
    doc = {"out": str(args.out), "site": corpus.site, "seed": corpus.seed,
           "stays": len(corpus.stays), "patients": patients,
           "canaries": len(corpus.canaries)}
    emit(args, doc, lambda: console.print(
        f"wrote {len(corpus.stays)} stays of {patients} patients for site {corpus.site} "
        f"({len(corpus.canaries)} canaries) to {args.out}"))
    return 0
