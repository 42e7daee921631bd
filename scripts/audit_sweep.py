#!/usr/bin/env python3
"""Sweep: the audit's attacks against the coder trained for more and more epochs.

One site X corpus is sealed (the audit's reserve), then the built-in coder is trained on
the rest for each number of epochs (default 2, 4, 6, 10, 20, 40), registered and audited
with the default policy's limits. Each row gives the train / held-out / reserve top-1,
the train-reserve gap, LiRA online and offline (AUC, TPR at 1 % FPR, epsilon lower
bound, patient level), RMIA and the loss attack's AUC, and the verdict. Printed as a
table, written as JSON and as a PNG (AUC over epochs).

Small by default so that it runs in minutes on two cores; the number of reference
models (default 4, the default policy has 8) is stated in the output.

Usage: python scripts/audit_sweep.py [--stays 3000] [--epochs 2,4,6,10,20,40]
       [--reference-models 4] [--workdir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from passerelle import steps
from registry.audit.policy import default_policy_path, load_policy
from registry.coder import CoderConfig
from registry.store import ModelStore
from transfer.identity import init_site


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stays", type=int, default=3000, help="default 3000")
    parser.add_argument("--canaries", type=int, default=4, help="default 4")
    parser.add_argument("--epochs", default="2,4,6,10,20,40", help="default 2,4,6,10,20,40")
    parser.add_argument("--reference-models", type=int, default=4, help="default 4")
    parser.add_argument("--fraction", type=float, default=0.25, help="reserve, default 0.25")
    parser.add_argument("--seed", type=int, default=2026, help="default 2026")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--out", type=Path, default=Path("audit-sweep.json"),
                        help="default audit-sweep.json (and .png beside it)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="audit-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    init_site(home, "CHU-X")
    steps.generate_corpus("X", args.stays, args.seed, args.canaries, work / "x")
    steps.seal_data(home, work / "x", args.fraction, work / "train")
    policy_file = work / "policy.toml"
    policy_file.write_text(default_policy_path().read_text().replace(
        "reference_models = 8", f"reference_models = {args.reference_models}"))
    policy = load_policy(policy_file)
    store = ModelStore(home)
    rows = []
    epochs = [int(e) for e in args.epochs.split(",")]
    with Progress(transient=True) as bar:
        task = bar.add_task("epochs", total=len(epochs))
        for e in epochs:
            t0 = time.perf_counter()
            steps.train_model(work / "train", work / f"m{e}", CoderConfig(epochs=e,
                                                                          seed=args.seed))
            train_s = time.perf_counter() - t0
            ref = steps.register_model(store, work / f"m{e}", f"coder-e{e}", "sweep",
                                       "sweep", work / "train").ref
            t0 = time.perf_counter()
            r = steps.audit_model(store, ref, work / "train", work / "x", policy,
                                  work / f"audit{e}", seed=args.seed)
            audit_s = time.perf_counter() - t0
            row = {"epochs": e, "verdict": r.verdict, "failed": [c.name for c in r.failed],
                   "train_top1": r.split.train_top1, "heldout_top1": r.split.heldout_top1,
                   "reserve_top1": r.split.reserve_top1,
                   "gap_train_reserve": r.split.train_top1 - r.split.reserve_top1,
                   "train_s": round(train_s, 1), "audit_s": round(audit_s, 1),
                   "rmia_a": r.rmia_a, "members": r.members, "nonmembers": r.nonmembers,
                   "canary_bits": [round(c.exposure_bits, 2) for c in r.canaries]}
            for name, m in r.attacks.items():
                row[name] = {"auc": m.auc, "tpr_at_1%": m.tpr_at_fpr[0.01],
                             "tpr_at_0.1%": m.tpr_at_fpr[0.001],
                             "epsilon_lower": m.epsilon.epsilon_lower}
            rows.append(row)
            bar.advance(task)
    doc = {"stays": args.stays, "reference_models": args.reference_models,
           "reserve_fraction": args.fraction, "policy_limits": "passerelle-default, "
           f"{args.reference_models} reference models", "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    _table(rows, args)
    _plot(rows, args.out.with_suffix(".png"))
    return 0


def _table(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    table = Table(title=f"Audit sweep: {args.stays} stays, {args.reference_models} reference "
                  "models, patient level")
    for col in ("epochs", "train", "held-out", "reserve", "gap", "LiRA on AUC", "LiRA off AUC",
                "on ε", "off ε", "RMIA AUC", "loss AUC", "verdict"):
        table.add_column(col)
    for r in rows:
        on, off = r["lira-online"], r["lira-offline"]
        assert isinstance(on, dict) and isinstance(off, dict)  # noqa: S101
        rmia, loss = r["rmia-offline"], r["loss-threshold"]
        assert isinstance(rmia, dict) and isinstance(loss, dict)  # noqa: S101
        table.add_row(str(r["epochs"]), f"{r['train_top1']:.1%}", f"{r['heldout_top1']:.1%}",
                      f"{r['reserve_top1']:.1%}", f"{r['gap_train_reserve']:+.1%}",
                      f"{on['auc']:.3f}", f"{off['auc']:.3f}", f"{on['epsilon_lower']:.2f}",
                      f"{off['epsilon_lower']:.2f}", f"{rmia['auc']:.3f}",
                      f"{loss['auc']:.3f}", str(r["verdict"]))
    Console().print(table)


def _plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [int(str(r["epochs"])) for r in rows]
    for name in ("lira-online", "lira-offline", "rmia-offline", "loss-threshold"):
        ax.plot(xs, [r[name]["auc"] for r in rows], marker="o", label=name)  # type: ignore[index]
    ax.axhline(0.6, color="grey", linestyle="--", label="policy max AUC")
    ax.set(xscale="log", xlabel="epochs", ylabel="AUC (patient level)",
           title="Membership inference over training epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
