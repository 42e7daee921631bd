"""``passerelle data generate``: the synthetic PMSI corpus."""

from __future__ import annotations

import argparse

from passerelle import steps
from passerelle.cli._common import (
    SEED,
    Subparsers,
    add_command,
    add_out,
    console,
    emit,
    int_range,
    output_dir,
)
from passerelle.corpus import SITES

MAX_STAYS = 1_000_000  # about 3 GB of letters, held in memory while written
MAX_CANARIES = 10_000


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
    p.add_argument("--stays", required=True, type=int_range(1, MAX_STAYS), metavar="N",
                   help=f"number of stays, 1 to {MAX_STAYS:,} (canaries come on top)")
    p.add_argument("--seed", required=True, type=SEED, metavar="S",
                   help="generation seed, 0 to 2^32-1")
    add_out(p, "dir", "the new corpus folder (must not exist, or be empty)")
    p.add_argument("--canaries", type=int_range(0, MAX_CANARIES), default=0, metavar="K",
                   help=f"plant K canary patients carrying a random secret, 0 to "
                   f"{MAX_CANARIES:,} (default 0)")


def generate(args: argparse.Namespace) -> int:
    with output_dir(args.out):
        corpus = steps.generate_corpus(args.site, args.stays, args.seed, args.canaries,
                                       args.out)
    patients = len({s.patient_id for s in corpus.stays})
    doc = {"out": str(args.out), "site": corpus.site, "seed": corpus.seed,
           "stays": len(corpus.stays), "patients": patients,
           "canaries": len(corpus.canaries)}
    emit(args, doc, lambda: console.print(
        f"wrote {len(corpus.stays)} stays of {patients} patients for site {corpus.site} "
        f"({len(corpus.canaries)} canaries) to {args.out}"))
    return 0
