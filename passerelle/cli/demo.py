"""``passerelle demo``: the whole story on one machine, at the demo's full sizes."""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

from rich.table import Table

from passerelle import steps
from passerelle.cli._common import (
    Subparsers,
    add_command,
    console,
    emit,
    positive_int,
    progress_bar,
)
from passerelle.errors import BadInput
from registry.coder import CoderConfig
from registry.store import ModelStore

MODEL_NAME = "pmsi-coder"
PURPOSE = "PMSI coding assistance: suggest the main CIM-10 diagnosis of a stay"
LEGAL_BASIS = ("GDPR art. 6(1)(e) public interest task; art. 9(2)(h) health care "
               "management (synthetic data in this demo)")


def add_to(sub: Subparsers) -> None:
    p = add_command(
        sub, "demo", demo, "run the whole story on one machine with two simulated sites",
        "Generate site X's and site Y's synthetic corpora, train the reference PMSI coder at X\n"
        "(accuracy on X's held-out patients and on Y), register it in X's MLflow registry\n"
        "(SQLite under WORKDIR/site-x) and export it to ONNX with a parity check.\n"
        "WORKDIR must not exist or be empty (default: a new passerelle-demo-<time> folder).",
    )
    p.add_argument("--workdir", type=Path, metavar="DIR")
    p.add_argument("--stays-x", type=positive_int, default=20000, metavar="N")
    p.add_argument("--stays-y", type=positive_int, default=6000, metavar="N")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--seed", type=int, default=2026)


def demo(args: argparse.Namespace) -> int:
    work: Path = args.workdir or Path(f"passerelle-demo-{datetime.now():%Y%m%d-%H%M%S}")
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise BadInput(f"{work}: exists and is not empty; choose a new --workdir")
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def say(message: str) -> None:
        if not args.json:
            console.print(message)

    t = time.perf_counter()
    data_x, data_y = work / "data" / "site-x", work / "data" / "site-y"
    steps.generate_corpus("X", args.stays_x, args.seed, 0, data_x)
    steps.generate_corpus("Y", args.stays_y, args.seed + 1, 0, data_y)
    timings["generate"] = time.perf_counter() - t
    say(f"[1/4] generated {args.stays_x} stays at site X and {args.stays_y} at site Y "
        f"in {work / 'data'}")

    t = time.perf_counter()
    with progress_bar(args) as progress:
        report = steps.train_model(data_x, work / "models" / "pmsi-coder",
                                   CoderConfig(epochs=args.epochs, seed=args.seed), [data_y],
                                   progress)
    timings["train"] = time.perf_counter() - t
    say(f"[2/4] trained the PMSI coder at site X ({report.classes} codes, vocabulary "
        f"{report.vocabulary_size} tokens)")
    if not args.json:
        _print_accuracy(report)

    t = time.perf_counter()
    store = ModelStore(work / "site-x")
    info = steps.register_model(store, report.out_dir, MODEL_NAME, PURPOSE, LEGAL_BASIS,
                                data_x, "CHU de site X (demo)")
    timings["register"] = time.perf_counter() - t
    say(f"[3/4] registered {info.ref} in site X's registry {store.display_uri}")

    t = time.perf_counter()
    out = work / "export" / f"{MODEL_NAME}-v{info.ref.version}"
    export = steps.export_model(store, info.ref, out)
    timings["export"] = time.perf_counter() - t
    p = export.parity
    say(f"[4/4] exported {info.ref} to ONNX in {export.directory}: parity on {p.inputs} "
        f"held-out inputs, max |logit diff| {p.max_abs_diff:.2e} (limit {p.tolerance:g}), "
        f"top-1 agreement {p.top1_agreement:.0%}")

    summary = {
        "workdir": str(work),
        "data": {"X": str(data_x), "Y": str(data_y)},
        "model_dir": str(report.out_dir),
        "registry": store.display_uri,
        "model": str(info.ref),
        "export": str(export.directory),
        "onnx_digest": export.onnx_digest,
        "accuracy": [a.__dict__ for a in report.accuracy],
        "parity": p.__dict__,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (work / "demo-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    emit(args, summary, lambda: console.print(
        f"done in {sum(timings.values()):.0f} s; summary in {work / 'demo-summary.json'}"))
    return 0


def _print_accuracy(report: steps.TrainReport) -> None:
    table = Table(title="PMSI coder accuracy (main diagnosis)")
    for col in ("site", "stays", "top-1", "top-5"):
        table.add_column(col)
    for a in report.accuracy:
        name = f"{a.site} ({'held-out patients' if a.split == 'held-out' else 'all stays'})"
        table.add_row(name, str(a.stays), f"{a.top1:.1%}", f"{a.top5:.1%}")
    console.print(table)
