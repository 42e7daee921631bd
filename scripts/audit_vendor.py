#!/usr/bin/env python3
"""Audit figures of a vendor architecture (a Keras Conv1D) with its own recipe.

One site X corpus is generated and sealed (the audit's reserve); the vendor's Conv1D
(``--recipe``, default tests/vendor_recipes.py ``keras_conv1d_wide``: Embedding 64,
Conv1D 128x5, global max, Dense; Adam, 8 epochs of 32) is trained on the training
patients with Passerelle's vocabulary and split, registered, and audited three times,
each time with other reference models:

- ``own recipe``: the vendor's function (``--recipe module:function``), for the target's
  declared steps: what the audit must use;
- ``built-in coder``: the embedding-mean coder (what a vendor model disguised as the
  built-in one was audited with before recipes existed);
- ``onnx-reinit``: re-initialised copies of the shipped ONNX, retrained by the executor
  (what an ONNX-only model without a recipe gets).

Each row: train / held-out / reserve top-1, LiRA online and offline, RMIA and the loss
attack (AUC, TPR at 1 % FPR, epsilon lower bound; patient level), the verdict, seconds.

Usage: python scripts/audit_vendor.py [--stays 2000] [--reference-models 4]
       [--recipe tests.vendor_recipes:keras_conv1d_wide] [--skip onnx-reinit]
       [--workdir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from rich.console import Console
from rich.table import Table

from passerelle import steps
from passerelle.corpus import label_table, manifest_digest, read_corpus
from passerelle.recipes import TrainingSet, load_recipe
from registry.audit.policy import default_policy_path, load_policy
from registry.coder import CoderConfig, TrainedCoder, evaluate, save_coder, split_by_patient
from registry.store import ModelStore
from registry.vocabulary import build_vocabulary
from transfer.identity import init_site

BATCH = 32  # the vendor recipe's batch size (tests/vendor_recipes.py), for its step count


def vendor_model(train_dir: Path, out: Path, spec: str, seed: int) -> dict[str, Any]:
    """Train the vendor's model with its recipe on the training patients and write it as
    a model directory (the built-in split and vocabulary, its declared steps)."""
    corpus = read_corpus(train_dir)
    examples = steps.examples_of(corpus)
    config = CoderConfig(seed=seed)
    train_idx, held_idx = split_by_patient(examples, config.heldout_fraction, config.seed)
    train, held = examples.subset(train_idx), examples.subset(held_idx)
    vocab = build_vocabulary(train.texts(config.vocabulary), train.patient_ids,
                             config.vocabulary)
    codes = tuple(sorted(set(train.codes)))
    index = {c: i for i, c in enumerate(codes)}
    texts = tuple(train.texts(config.vocabulary))
    training = TrainingSet(vocab.encode(list(texts)),
                           np.array([index[c] for c in train.codes], np.int64), texts, codes,
                           seed, None, len(vocab))
    t0 = time.perf_counter()
    model = load_recipe(spec).function(training)
    seconds = time.perf_counter() - t0
    coder = TrainedCoder(config, vocab, codes, model, held, len(train),
                         len(set(train.patient_ids)))
    accuracy = evaluate(coder, held, "held-out")
    steps_taken = int(model.optimizer.iterations.numpy())
    out.mkdir(parents=True)
    save_coder(coder, out, label_table(), {
        "site": corpus.site, "dataset_fingerprint": manifest_digest(train_dir),
        "steps": steps_taken, "recipe": spec}, [accuracy])
    return {"train_s": round(seconds, 1), "heldout_top1": accuracy.top1,
            "steps": steps_taken, "epochs": steps_taken / math.ceil(len(train) / BATCH)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stays", type=int, default=2000, help="default 2000")
    parser.add_argument("--reference-models", type=int, default=4, help="default 4")
    parser.add_argument("--fraction", type=float, default=0.25, help="reserve, default 0.25")
    parser.add_argument("--recipe", default="tests.vendor_recipes:keras_conv1d_wide",
                        help="the vendor's recipe (default tests.vendor_recipes:"
                        "keras_conv1d_wide)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["own", "builtin", "onnx-reinit"],
                        help="leave out a row (repeatable; default: none)")
    parser.add_argument("--seed", type=int, default=2026, help="default 2026")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--out", type=Path, default=Path("audit-vendor.json"),
                        help="default audit-vendor.json")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="audit-vendor-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    init_site(home, "CHU-X")
    steps.generate_corpus("X", args.stays, args.seed, 0, work / "x")
    steps.seal_data(home, work / "x", args.fraction, work / "train")
    policy_file = work / "policy.toml"
    policy_file.write_text(default_policy_path().read_text().replace(
        "reference_models = 8", f"reference_models = {args.reference_models}"))
    policy = load_policy(policy_file)
    target = vendor_model(work / "train", work / "conv1d", args.recipe, args.seed)
    store = ModelStore(home)
    ref = steps.register_model(store, work / "conv1d", "vendor-conv1d", "figures", "figures",
                               work / "train").ref
    rows = []
    for label, spec in (("own", args.recipe), ("builtin", None),
                        ("onnx-reinit", "onnx-reinit")):
        if label in args.skip:
            continue
        t0 = time.perf_counter()
        r = steps.audit_model(store, ref, work / "train", work / "x", policy,
                              work / f"audit-{label}", seed=args.seed, recipe=spec)
        row: dict[str, Any] = {
            "reference_models_by": label, "recipe": r.recipe.to_json(),
            "verdict": r.verdict, "failed": [c.name for c in r.failed],
            "train_top1": r.split.train_top1, "heldout_top1": r.split.heldout_top1,
            "reserve_top1": r.split.reserve_top1, "target_steps": r.target_steps,
            "members": r.members, "nonmembers": r.nonmembers,
            "audit_s": round(time.perf_counter() - t0, 1)}
        for name, m in r.attacks.items():
            row[name] = {"auc": m.auc, "tpr_at_1%": m.tpr_at_fpr[0.01],
                         "tpr_at_0.1%": m.tpr_at_fpr[0.001],
                         "epsilon_lower": m.epsilon.epsilon_lower}
        rows.append(row)
        _table(rows, args, target)
    doc = {"stays": args.stays, "reference_models": args.reference_models,
           "reserve_fraction": args.fraction, "target": target, "recipe": args.recipe,
           "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def _table(rows: list[dict[str, Any]], args: argparse.Namespace,
           target: dict[str, Any]) -> None:
    table = Table(title=f"Audit of a vendor Conv1D ({args.recipe}; {target['steps']} steps, "
                  f"held-out top-1 {target['heldout_top1']:.1%}): {args.stays} stays, "
                  f"{args.reference_models} reference models, patient level")
    for col in ("reference models", "train", "held-out", "reserve", "LiRA on AUC",
                "on TPR@1%", "on ε", "LiRA off AUC", "off ε", "RMIA AUC", "RMIA ε",
                "loss AUC", "verdict", "s"):
        table.add_column(col)
    for r in rows:
        on, off, rmia = r["lira-online"], r["lira-offline"], r["rmia-offline"]
        table.add_row(r["reference_models_by"], f"{r['train_top1']:.1%}",
                      f"{r['heldout_top1']:.1%}", f"{r['reserve_top1']:.1%}",
                      f"{on['auc']:.3f}", f"{on['tpr_at_1%']:.3f}", f"{on['epsilon_lower']:.2f}",
                      f"{off['auc']:.3f}", f"{off['epsilon_lower']:.2f}", f"{rmia['auc']:.3f}",
                      f"{rmia['epsilon_lower']:.2f}", f"{r['loss-threshold']['auc']:.3f}",
                      r["verdict"], f"{r['audit_s']:.0f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
