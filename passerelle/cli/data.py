"""``passerelle data generate`` (the synthetic PMSI corpus) and ``data seal`` (the audit's
reserve of non-members)."""

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
    existing_dir,
    float_range,
    home_of,
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
    p = add_command(
        group, "seal", seal,
        "seal the audit's reserve of patients before any training (site administrator)",
        "Draw the audit's reserve: every patient of DIR whose keyed hash (the site's\n"
        "pseudonymisation key) falls below F. Write DIR without them to TRAIN_DIR, the\n"
        "corpus handed to training, and record a reserve_sealed commitment in the ledger\n"
        "(both corpus digests, F, counts, a keyed digest of the reserve's patients).\n"
        "`model audit --members TRAIN_DIR --nonmembers DIR` then scores the reserve as\n"
        "non-members the model's owner never had. Needs the site's identity (site init).",
    )
    p.add_argument("data", type=existing_dir, metavar="DIR", help="the site's corpus")
    p.add_argument("--fraction", required=True, type=float_range(0.05, 0.5, low_open=False),
                   metavar="F", help="share of patients sealed in the reserve, in [0.05, 0.5] "
                   "(required)")
    add_out(p, "dir", "where the training corpus (DIR without the reserve) is written "
            "(must not exist, or be empty)", metavar="TRAIN_DIR")


def seal(args: argparse.Namespace) -> int:
    home = home_of(args, writes=True)
    with output_dir(args.out):
        sealed = steps.seal_data(home, args.data, args.fraction, args.out)
    doc = {"out": str(args.out)} | sealed.fields()
    emit(args, doc, lambda: console.print(
        f"sealed {sealed.reserve_patients} patients ({sealed.reserve_stays} stays) of "
        f"{args.data} in the audit's reserve; the training corpus ({sealed.training_patients} "
        f"patients, {sealed.training_stays} stays) is in {args.out}"))
    return 0


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
