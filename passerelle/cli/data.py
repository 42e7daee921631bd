"""``passerelle data generate`` (the synthetic PMSI corpus) and ``data seal`` (the audit's
reserve of non-members)."""

from __future__ import annotations

import argparse
from pathlib import Path

from passerelle import steps
from passerelle.cli._common import (
    Subparsers,
    add_command,
    console,
    emit,
    home_of,
    non_negative_int,
    positive_float,
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
    p.add_argument("data", type=Path, metavar="DIR", help="the site's corpus")
    p.add_argument("--fraction", required=True, type=positive_float, metavar="F",
                   help="share of patients sealed in the reserve, in [0.05, 0.5]")
    p.add_argument("--out", required=True, type=Path, metavar="TRAIN_DIR",
                   help="where the training corpus (DIR without the reserve) is written")


def seal(args: argparse.Namespace) -> int:
    sealed = steps.seal_data(home_of(args), args.data, args.fraction, args.out)
    doc = {"out": str(args.out)} | sealed.fields()
    emit(args, doc, lambda: console.print(
        f"sealed {sealed.reserve_patients} patients ({sealed.reserve_stays} stays) of "
        f"{args.data} in the audit's reserve; the training corpus ({sealed.training_patients} "
        f"patients, {sealed.training_stays} stays) is in {args.out}"))
    return 0


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
