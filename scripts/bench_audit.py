#!/usr/bin/env python3
"""Benchmark: the memorisation audit's runtime at the demo's sizes, against a baseline.

It generates site X's corpus (default 20,000 stays and 10 canaries, as the demo), seals
the audit's reserve (a fifth of the patients, as the demo), trains and registers the
reference coder on the rest, then times ``model audit`` (the default policy: 8 reference
models, each trained for as many gradient steps as the target) in the same run. The
baseline is the training of the target model itself, also timed in this run: the
audit's cost is reported as a multiple of it (these machines are noisy; ratios travel,
seconds do not).

Usage: python scripts/bench_audit.py [--stays 20000] [--canaries 10]
       [--reference-models 8] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from passerelle import steps
from registry.audit.policy import load_policy
from registry.coder import CoderConfig
from registry.store import ModelStore
from transfer.identity import init_site


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stays", type=int, default=20000,
                        help="stays of X's corpus (default 20000, as the demo)")
    parser.add_argument("--canaries", type=int, default=10,
                        help="canaries planted in the corpus (default 10)")
    parser.add_argument("--reference-models", type=int, default=None,
                        help="raise the default policy's number (8); default: 8")
    parser.add_argument("--seed", type=int, default=2026,
                        help="corpus and training seed (default 2026)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="work folder, kept (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here (default: none)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    work.mkdir(parents=True, exist_ok=True)
    policy = load_policy()
    data, train = work / "x", work / "x-training"
    home = work / "home"
    init_site(home, "CHU-X")
    steps.generate_corpus("X", args.stays, args.seed, args.canaries, data)
    steps.seal_data(home, data, 0.2, train)
    t0 = time.perf_counter()
    report = steps.train_model(train, work / "model", CoderConfig(seed=args.seed))
    train_s = time.perf_counter() - t0
    store = ModelStore(home)
    info = steps.register_model(store, report.out_dir, "pmsi-coder", "bench", "bench", train)
    t0 = time.perf_counter()
    audit = steps.audit_model(store, info.ref, train, data, policy, work / "audit", None,
                              args.seed, args.reference_models)
    audit_s = time.perf_counter() - t0
    result = {
        "stays": args.stays, "canaries": args.canaries,
        "reference_models": audit.reference_models, "target_steps": audit.target_steps,
        "reference_epochs": audit.reference_epochs,
        "members": audit.members, "nonmembers": audit.nonmembers,
        "verdict": audit.verdict, "failed": [c.name for c in audit.failed],
        "train_target_s": round(train_s, 1),
        "audit_s": round(audit_s, 1),
        "audit_over_train": round(audit_s / train_s, 2),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
