"""``passerelle finetune``: DP-SGD fine-tuning of a received model on the site's stays."""

from __future__ import annotations

import argparse

import numpy as np

from passerelle import steps
from passerelle.cli._common import (
    SEED,
    Subparsers,
    add_command,
    console,
    emit,
    existing_dir,
    existing_file,
    float_range,
    fraction,
    home_of,
    int_range,
    progress_bar,
)
from passerelle.errors import BadInput
from registry.store import ModelStore, PrivacyUnit, VersionRef


def add_to(sub: Subparsers) -> None:
    p = add_command(
        sub, "finetune", finetune, "fine-tune a received model under differential privacy",
        "Fine-tune a registered (received) ONNX model on this site's corpus with DP-SGD:\n"
        "Poisson sampling of privacy units (the patient by default: all its stays give one\n"
        "clipped contribution), Gaussian noise calibrated to (--epsilon, --delta) with\n"
        "dp-accounting's PLD accountant (add/remove-one neighbours; the unit count that\n"
        "sets q is released with Gaussian noise, its cost included), normalisation by the\n"
        "expected batch size. Needs the site's identity: the run is charged to the budget\n"
        "of every training patient and recorded in the ledger (finetune_started) before\n"
        "training; its end (finished, failed, interrupted) is recorded too. The cap, the\n"
        "delta rules and the allowed units are the site's policy (privacy.*, `passerelle\n"
        "site policy set`), never a flag; beyond the cap: exit 1. Held-out patients (a\n"
        "keyed hash of the patient id) measure accuracy before/after: they never train and\n"
        "are not charged, so those figures are exact and outside the DP guarantee.\n"
        "The stays are encoded as the model reads them (token ids or bag of words, from the\n"
        "graph and its model card), so linear models (logreg, LinearSVC, SGDClassifier)\n"
        "fine-tune too; tree ensembles are refused (gradient-based DP-SGD does not apply to\n"
        "them). --add-codes adds public CIM-10 codes to the output layer.",
    )
    p.add_argument("ref", metavar="NAME/VERSION", nargs="?",
                   help="a version of this site's registry (required unless "
                   "--rebuild-budget-store)")
    p.add_argument("--data", type=existing_dir, metavar="DIR",
                   help="the site's corpus (required)")
    p.add_argument("--epsilon", type=float_range(0.0, 100.0), metavar="E",
                   help="target epsilon of this run (PLD, at --delta), in (0, 100]; required")
    p.add_argument("--delta", type=float_range(0.0, 1.0, high_open=True), metavar="D",
                   help="default and maximum: the site's per-run limit, min(1e-5, 1 / (10 x "
                   "released units)) unless privacy.delta_per_run_max says otherwise")
    p.add_argument("--privacy-unit", choices=[u.value for u in PrivacyUnit],
                   default=PrivacyUnit.PATIENT.value,
                   help="default patient; stay only if the site's privacy.units allows it "
                   "(charged at patient level by group privacy)")
    p.add_argument("--trainable", default=None, metavar="LAYERS",
                   help="comma-separated layers (groups) or weights that train (default: per "
                   "model: hidden,logits for the built-in coder, the coefficients and "
                   "intercepts of a linear model, else every float weight; the embedding "
                   "trains only if named, slowly)")
    p.add_argument("--epochs", type=int_range(1, 1000), default=10,
                   help="expected passes over the units (steps = epochs / q), 1 to 1,000 "
                   "(default 10)")
    p.add_argument("--batch-size", type=int_range(1, 65536), default=64, metavar="EXPECTED",
                   help="expected number of units per step (q = this / released units; "
                   "default 64)")
    p.add_argument("--clip", type=float_range(0.0, 1e4), default=1.0,
                   help="L2 clipping norm, in (0, 10,000] (default 1.0)")
    p.add_argument("--learning-rate", type=float_range(0.0, 10.0), default=5e-3,
                   help="Adam learning rate, in (0, 10] (default 5e-3)")
    p.add_argument("--heldout-fraction", type=fraction, default=0.2,
                   help="share of patients held out by keyed hash (default 0.2; at least "
                   "10 held-out patients)")
    p.add_argument("--drop-unknown-codes", action="store_true",
                   help="drop stays whose code the model does not know (default: refuse)")
    p.add_argument("--add-codes", type=existing_file, metavar="FILE", default=None,
                   help="extend the output layer with these public CIM-10 codes (a JSON list "
                   "or one code a line, each checked against the CIM-10 table shipped with "
                   "Passerelle; never drawn from the site's data): zero weights, the "
                   "smallest existing bias, added last to the label table; recorded in the "
                   "lineage and the ledger (default: none)")
    p.add_argument("--seed", type=SEED,
                   help="seed for sampling and noise: refused unless PASSERELLE_TESTING=1 "
                   "(the test suite); such a run is recorded as seeded, not private "
                   "(default: the operating system's entropy)")
    p.add_argument("--rebuild-budget-store", action="store_true",
                   help="rebuild HOME/privacy-budget.sqlite from the ledger's charges and "
                   "stop (after `records verify` reported a store that disagrees)")


def finetune(args: argparse.Namespace) -> int:
    if args.rebuild_budget_store:
        home = home_of(args, writes=True)
        n = steps.rebuild_budget_store(home)
        emit(args, {"rebuilt": True, "charges": n},
             lambda: console.print(f"budget store rebuilt from the ledger: {n} charge(s)"))
        return 0
    if args.ref is None or args.data is None or args.epsilon is None:
        raise BadInput("finetune needs NAME/VERSION, --data and --epsilon")
    ref = VersionRef.parse(args.ref)
    store = ModelStore(home_of(args, writes=True))
    store.get(ref)  # an unknown version or an unreachable store, before TensorFlow loads
    from adapters.budget import COUNT_NOISE_STD
    from adapters.finetune import ACCURACY_SCOPE

    options = steps.finetune_options(
        epsilon=args.epsilon, delta=args.delta, privacy_unit=PrivacyUnit(args.privacy_unit),
        trainable=(None if args.trainable is None
                   else tuple(t.strip() for t in args.trainable.split(","))),
        epochs=args.epochs, add_codes=args.add_codes,
        expected_batch_size=args.batch_size, clip=args.clip,
        learning_rate=args.learning_rate, heldout_fraction=args.heldout_fraction,
        drop_unknown_codes=args.drop_unknown_codes, noise_seed=args.seed)
    rng = None if args.seed is None else np.random.default_rng(args.seed)
    with progress_bar(args) as progress:
        r = steps.finetune_model(store, ref, args.data, options, rng, progress)
    doc = {"model": r.version.ref.name, "version": r.version.ref.version,
           "source": str(r.source), "epsilon_pld": r.epsilon_pld, "epsilon_rdp": r.epsilon_rdp,
           "delta": r.delta, "epsilon_patient": r.epsilon_patient,
           "group_size": r.group_size, "noise_multiplier": r.noise_multiplier,
           "clip": r.clip, "sampling_rate": r.sampling_rate, "steps": r.steps,
           "privacy_unit": r.privacy_unit, "trainable": list(r.trainable),
           "accuracy_before": r.accuracy_before, "accuracy_after": r.accuracy_after,
           "accuracy_scope": ACCURACY_SCOPE, "heldout_stays": r.heldout_stays,
           "heldout_patients": r.heldout_patients, "units_released": r.units_released,
           "units_released_noise_std": COUNT_NOISE_STD, "seeded": r.seeded,
           "private": not r.seeded, "started_record": r.started_record,
           "input_kind": r.input_kind, "codes_added": list(r.codes_added),
           "codes_file_digest": r.codes_file_digest,
           "budget": {"dataset": r.dataset, "unit": "patient", "runs": r.budget.runs,
                      "epsilon_spent": r.budget.epsilon, "delta_sum": r.budget.delta_sum,
                      "accounting_delta": r.budget.accounting_delta,
                      "shared_runs": list(r.budget.shared), "cap": r.budget_cap}}

    def human() -> None:
        console.print(
            f"fine-tuned {r.source} -> {r.version.ref} at {r.privacy_unit} level: "
            f"epsilon {r.epsilon_pld:.4f} (PLD; RDP {r.epsilon_rdp:.4f}), delta {r.delta:.3g}, "
            f"noise {r.noise_multiplier:.4f}, clip {r.clip:g}, q {r.sampling_rate:.4f}, "
            f"{r.steps} steps, units released {r.units_released} (noise std "
            f"{COUNT_NOISE_STD:g})" + ("; SEEDED: not private" if r.seeded else ""))
        if r.group_size > 1:
            console.print(f"patient level (group privacy, up to {r.group_size} stays per "
                          f"patient): epsilon {r.epsilon_patient:.4f} at delta "
                          f"{r.budget.accounting_delta:g}")
        if r.codes_added:
            console.print(f"codes added (public CIM-10 table): {', '.join(r.codes_added)}")
        console.print(f"held-out accuracy ({r.heldout_patients} patients outside the budget, "
                      f"exact, not DP): {r.accuracy_before:.1%} -> {r.accuracy_after:.1%}")
        console.print(f"budget (patient level, at delta {r.budget.accounting_delta:g}): the "
                      f"most charged patient has spent {r.budget.epsilon:.4f} of "
                      f"{r.budget_cap:g} in {r.budget.runs} run(s)")

    emit(args, doc, human)
    return 0
