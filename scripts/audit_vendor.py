#!/usr/bin/env python3
"""Audit figures of a vendor architecture (a Keras Conv1D) with its own recipe.

One site X corpus is generated and sealed (the audit's reserve); the vendor's Conv1D
(``--recipe``, default tests/vendor_recipes.py ``keras_conv1d_wide``: Embedding 64,
Conv1D 128x5, global max, Dense; Adam, 8 epochs of 32) is trained by the vendor on the
training patients it declares, registered as a Keras file with its manifest (model
directory v2), and audited three times, each time with other reference models:

- ``own``: the vendor's function, named by its manifest's ``training.recipe``, for the
  target's declared steps: what the audit uses by default;
- ``builtin``: the built-in embedding-mean coder (``--recipe passerelle-coder``; what a
  vendor model disguised as the built-in one was audited with before recipes existed);
- ``onnx-reinit``: re-initialised copies of the shipped ONNX, retrained by the executor
  (what an ONNX-only model without a recipe gets).

Each row: train / held-out / reserve top-1, LiRA online and offline, RMIA and the loss
attack (AUC, TPR at 1 % FPR, epsilon lower bound; patient level), the reference models'
fit shift (members / non-members, in their spread; the policy's max_reference_shift),
the verdict, seconds.

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
from passerelle.corpus import label_table, read_corpus
from passerelle.recipes import TrainingSet, load_recipe
from registry.audit.policy import default_policy_path, load_policy
from registry.coder import split_by_patient
from registry.store import ModelStore
from registry.vocabulary import VocabularyConfig, build_vocabulary
from transfer.identity import init_site

BATCH = 32  # the vendor recipe's batch size (tests/vendor_recipes.py), for its step count
HELDOUT = 0.2
BUILTIN = "registry.audit.recipe:coder_recipe"  # the entry point passerelle-coder's function


def vendor_model(train_dir: Path, out: Path, spec: str, seed: int) -> dict[str, Any]:
    """The vendor's side: its model trained with its recipe on the training patients it
    declares (held-out fraction 0.2, ``seed``), encoded with its own vocabulary; written as
    model.keras, vocabulary.json, labels.json and manifest.json (its recipe and steps)."""
    corpus = read_corpus(train_dir)
    examples = steps.examples_of(corpus)
    train_idx, held_idx = split_by_patient(examples, HELDOUT, seed)
    train, held = examples.subset(train_idx), examples.subset(held_idx)
    config = VocabularyConfig()
    vocab = build_vocabulary(train.texts(config), train.patient_ids, config)
    codes = tuple(sorted(set(train.codes)))
    index = {c: i for i, c in enumerate(codes)}
    texts = tuple(train.texts(config))
    training = TrainingSet(vocab.encode(list(texts)),
                           np.array([index[c] for c in train.codes], np.int64), texts, codes,
                           seed, None, len(vocab))
    t0 = time.perf_counter()
    model = load_recipe(spec).function(training)
    seconds = time.perf_counter() - t0
    steps_taken = int(model.optimizer.iterations.numpy())
    logits = np.asarray(model(vocab.encode(held.texts(config)), training=False))
    truth = np.array([index.get(c, -1) for c in held.codes])
    out.mkdir(parents=True)
    model.save(out / "model.keras")
    vocab.save(out / "vocabulary.json")
    table = label_table()
    (out / "labels.json").write_text(json.dumps(
        {"codes": list(codes), "labels": {c: table[c] for c in codes}}, ensure_ascii=False))
    (out / "manifest.json").write_text(json.dumps({
        "format": "passerelle-manifest", "format_version": 1, "architecture": "conv1d",
        "input": {"kind": "token_ids", "vocabulary": "vocabulary.json", "dtype": "int32"},
        "output": {"labels": "labels.json", "multi_label": False, "scores": "logits"},
        "training": {"heldout": {"fraction": HELDOUT, "seed": seed}, "steps": steps_taken,
                     "recipe": spec}}))
    return {"train_s": round(seconds, 1), "steps": steps_taken,
            "heldout_top1": float(np.mean(logits.argmax(axis=1) == truth)),
            "epochs": steps_taken / math.ceil(len(train) / BATCH)}


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
    ref = steps.register_model(store, work / "conv1d" / "model.keras", "vendor-conv1d",
                               "figures", "figures", work / "train",
                               manifest=work / "conv1d" / "manifest.json").ref
    rows = []
    for label, spec in (("own", None), ("builtin", BUILTIN),
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
            "fit_shift": {"members": r.fit_shift.members,
                          "nonmembers": r.fit_shift.nonmembers},
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
                "loss AUC", "fit shift m / n", "verdict", "s"):
        table.add_column(col)
    for r in rows:
        on, off, rmia = r["lira-online"], r["lira-offline"], r["rmia-offline"]
        table.add_row(r["reference_models_by"], f"{r['train_top1']:.1%}",
                      f"{r['heldout_top1']:.1%}", f"{r['reserve_top1']:.1%}",
                      f"{on['auc']:.3f}", f"{on['tpr_at_1%']:.3f}", f"{on['epsilon_lower']:.2f}",
                      f"{off['auc']:.3f}", f"{off['epsilon_lower']:.2f}", f"{rmia['auc']:.3f}",
                      f"{rmia['epsilon_lower']:.2f}", f"{r['loss-threshold']['auc']:.3f}",
                      f"{r['fit_shift']['members']:+.2f} / {r['fit_shift']['nonmembers']:+.2f}",
                      r["verdict"], f"{r['audit_s']:.0f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
