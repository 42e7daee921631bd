"""``passerelle finetune``: DP-SGD fine-tuning of a received model on the site's stays."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from passerelle import steps
from passerelle.cli._common import (
    Subparsers,
    add_command,
    console,
    emit,
    home_of,
    positive_float,
    positive_int,
    progress_bar,
)
from registry.store import ModelStore, PrivacyUnit, VersionRef


def add_to(sub: Subparsers) -> None:
    p = add_command(
        sub, "finetune", finetune, "fine-tune a received model under differential privacy",
        "Fine-tune a registered (received) ONNX model on this site's corpus with DP-SGD:\n"
        "Poisson sampling of privacy units (the patient by default: all its stays give one\n"
        "clipped contribution), Gaussian noise calibrated to (--epsilon, --delta) with\n"
        "dp-accounting (epsilon reported by PLD and RDP), normalisation by the expected\n"
        "batch size. The run is charged to the dataset's privacy budget before training\n"
        "(cap: HOME/privacy-budget.toml 'epsilon_cap', default 10, or --budget-cap; refused\n"
        "with exit 1 beyond it). The result is a new version of the same model with lineage\n"
        "and privacy tags (passerelle.finetune.*). Held-out patients measure accuracy\n"
        "before/after and never train.",
    )
    p.add_argument("ref", metavar="NAME/VERSION")
    p.add_argument("--data", required=True, type=Path, metavar="DIR", help="the site's corpus")
    p.add_argument("--epsilon", required=True, type=float, metavar="E")
    p.add_argument("--delta", type=float, metavar="D",
                   help="default: min(1e-5, 1 / (10 x training patients))")
    p.add_argument("--privacy-unit", choices=[u.value for u in PrivacyUnit],
                   default=PrivacyUnit.PATIENT.value)
    p.add_argument("--trainable", default="hidden,logits", metavar="LAYERS",
                   help="comma-separated layers (groups) that train (default hidden,logits; "
                   "the embedding trains only if named, slowly)")
    p.add_argument("--epochs", type=positive_int, default=10,
                   help="expected passes over the units (steps = epochs / q)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="EXPECTED",
                   help="expected number of units per step (q = this / units)")
    p.add_argument("--clip", type=positive_float, default=1.0, help="L2 clipping norm")
    p.add_argument("--learning-rate", type=positive_float, default=5e-3)
    p.add_argument("--heldout-fraction", type=positive_float, default=0.2)
    p.add_argument("--budget-cap", type=positive_float, metavar="E",
                   help="the dataset's epsilon cap (overrides HOME/privacy-budget.toml)")
    p.add_argument("--drop-unknown-codes", action="store_true",
                   help="drop stays whose code the model does not know (default: refuse)")
    p.add_argument("--seed", type=int,
                   help="seed for sampling and noise: reproducible noise voids the privacy "
                   "guarantee (tests only; default: the operating system's entropy)")


def finetune(args: argparse.Namespace) -> int:
    ref = VersionRef.parse(args.ref)
    options = steps.finetune_options(
        epsilon=args.epsilon, delta=args.delta, privacy_unit=PrivacyUnit(args.privacy_unit),
        trainable=tuple(t.strip() for t in args.trainable.split(",")), epochs=args.epochs,
        expected_batch_size=args.batch_size, clip=args.clip,
        learning_rate=args.learning_rate, heldout_fraction=args.heldout_fraction,
        budget_cap=args.budget_cap, drop_unknown_codes=args.drop_unknown_codes,
        noise_seed=args.seed)
    rng = np.random.default_rng(args.seed)
    with progress_bar(args) as progress:
        r = steps.finetune_model(ModelStore(home_of(args)), ref, args.data, options, rng,
                                 progress)
    doc = {"model": r.version.ref.name, "version": r.version.ref.version,
           "source": str(r.source), "epsilon_pld": r.epsilon_pld, "epsilon_rdp": r.epsilon_rdp,
           "delta": r.delta, "noise_multiplier": r.noise_multiplier, "clip": r.clip,
           "sampling_rate": r.sampling_rate, "steps": r.steps, "privacy_unit": r.privacy_unit,
           "trainable": list(r.trainable), "accuracy_before": r.accuracy_before,
           "accuracy_after": r.accuracy_after, "train_stays": r.train_stays,
           "train_units": r.train_units, "heldout_stays": r.heldout_stays,
           "dropped_unknown_codes": r.dropped_unknown,
           "budget": {"dataset": r.dataset, "runs": r.budget.runs,
                      "epsilon_spent": r.budget.epsilon, "epsilon_basic": r.budget.epsilon_basic,
                      "epsilon_joint_pld": r.budget.epsilon_joint, "delta": r.budget.delta,
                      "cap": r.budget_cap}}

    def human() -> None:
        console.print(
            f"fine-tuned {r.source} -> {r.version.ref} at {r.privacy_unit} level: "
            f"epsilon {r.epsilon_pld:.3f} (PLD; RDP {r.epsilon_rdp:.3f}), delta {r.delta:.2g}, "
            f"noise {r.noise_multiplier:.3f}, clip {r.clip:g}, q {r.sampling_rate:.4f}, "
            f"{r.steps} steps")
        console.print(f"held-out accuracy ({r.heldout_stays} stays): "
                      f"{r.accuracy_before:.1%} -> {r.accuracy_after:.1%}")
        console.print(f"dataset budget: {r.budget.epsilon:.3f} of {r.budget_cap:g} spent "
                      f"in {r.budget.runs} run(s)")

    emit(args, doc, human)
    return 0
