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
from registry.audit.policy import load_policy
from registry.audit.runner import AuditResult
from registry.coder import CoderConfig
from registry.store import ModelStore
from transfer.exchange import create_bundle, receive_bundle
from transfer.identity import PublicIdentity, init_site
from transfer.trust import TrustStore

MODEL_NAME = "pmsi-coder"
SITE_X, SITE_Y = "CHU-X", "CH-Y"
CANARIES = 10
PURPOSE = "PMSI coding assistance: suggest the main CIM-10 diagnosis of a stay"
LEGAL_BASIS = ("GDPR art. 6(1)(e) public interest task; art. 9(2)(h) health care "
               "management (synthetic data in this demo)")


def add_to(sub: Subparsers) -> None:
    p = add_command(
        sub, "demo", demo, "run the whole story on one machine with two simulated sites",
        "Generate site X's and site Y's synthetic corpora, train the reference PMSI coder at X\n"
        "(accuracy on X's held-out patients and on Y), register it in X's MLflow registry\n"
        "(SQLite under WORKDIR/site-x), audit it for memorised patient data (membership\n"
        "inference, canaries, identifier scan) and export it to ONNX through the gate;\n"
        "then create both sites' identities, pin each other's key, sign and encrypt the\n"
        "model for site Y and receive it there (SQLite registry under WORKDIR/site-y).\n"
        "WORKDIR must not exist or be empty (default: a new passerelle-demo-<time> folder).",
    )
    p.add_argument("--workdir", type=Path, metavar="DIR")
    p.add_argument("--stays-x", type=positive_int, default=20000, metavar="N")
    p.add_argument("--stays-y", type=positive_int, default=6000, metavar="N")
    p.add_argument("--epochs", type=positive_int, default=4)
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
    steps.generate_corpus("X", args.stays_x, args.seed, CANARIES, data_x)
    steps.generate_corpus("Y", args.stays_y, args.seed + 1, 0, data_y)
    timings["generate"] = time.perf_counter() - t
    say(f"[1/7] generated {args.stays_x} stays at site X (+{CANARIES} canary patients) and "
        f"{args.stays_y} at site Y in {work / 'data'}")

    t = time.perf_counter()
    with progress_bar(args) as progress:
        report = steps.train_model(data_x, work / "models" / "pmsi-coder",
                                   CoderConfig(epochs=args.epochs, seed=args.seed), [data_y],
                                   progress)
    timings["train"] = time.perf_counter() - t
    say(f"[2/7] trained the PMSI coder at site X ({report.classes} codes, vocabulary "
        f"{report.vocabulary_size} tokens)")
    if not args.json:
        _print_accuracy(report)

    t = time.perf_counter()
    store = ModelStore(work / "site-x")
    info = steps.register_model(store, report.out_dir, MODEL_NAME, PURPOSE, LEGAL_BASIS,
                                data_x, "CHU de site X (demo)")
    timings["register"] = time.perf_counter() - t
    say(f"[3/7] registered {info.ref} in site X's registry {store.display_uri}")

    t = time.perf_counter()
    with progress_bar(args) as progress:
        audit = steps.audit_model(store, info.ref, data_x, data_x, load_policy(),
                                  work / "audit", progress, args.seed)
    timings["audit"] = time.perf_counter() - t
    say(f"[4/7] audited {info.ref}: verdict {audit.verdict} under policy "
        f"{audit.policy_name} ({audit.members} member / {audit.nonmembers} non-member "
        f"patients, {audit.reference_models} reference models); report in {audit.report_dir}")
    if not args.json:
        _print_audit(audit)

    t = time.perf_counter()
    out = work / "export" / f"{MODEL_NAME}-v{info.ref.version}"
    export = steps.export_model(store, info.ref, out)
    timings["export"] = time.perf_counter() - t
    p = export.parity
    say(f"[5/7] exported {info.ref} to ONNX in {export.directory}: parity on {p.inputs} "
        f"held-out inputs, max |logit diff| {p.max_abs_diff:.2e} (limit {p.tolerance:g}), "
        f"top-1 agreement {p.top1_agreement:.0%}")

    t = time.perf_counter()
    home_y = work / "site-y"
    identities = work / "identities"
    identities.mkdir()
    for home, name in ((store.home, SITE_X), (home_y, SITE_Y)):
        public = init_site(home, name)
        (identities / f"{name}.json").write_text(json.dumps(public.to_json(), indent=1) + "\n")
    TrustStore(store.home).add(PublicIdentity.from_file(identities / f"{SITE_Y}.json"))
    TrustStore(home_y).add(PublicIdentity.from_file(identities / f"{SITE_X}.json"))
    timings["sites"] = time.perf_counter() - t
    say(f"[6/7] created the identities of {SITE_X} and {SITE_Y} (keys 0600 under each home) "
        f"and pinned each other's key; public identity files in {identities}")

    t = time.perf_counter()
    bundle_path = work / "transfer" / f"{MODEL_NAME}-v{info.ref.version}.bundle"
    bundle_path.parent.mkdir()
    created = create_bundle(store.home, store, info.ref, [SITE_Y], bundle_path)
    received = receive_bundle(bundle_path, home_y, ModelStore(home_y))
    timings["transfer"] = time.perf_counter() - t
    say(f"[7/7] {SITE_X} signed and encrypted {info.ref} for {SITE_Y} ({bundle_path}, "
        f"{created.size} bytes, {created.digest}); {SITE_Y} verified and received it as "
        f"{received.version.ref} in its own registry, installed in {received.directory}")

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
        "audit": {"verdict": audit.verdict, "report": str(audit.report_dir),
                  "failed": [c.name for c in audit.failed]},
        "bundle": {"path": str(bundle_path), "digest": created.digest,
                   "received_as": str(received.version.ref),
                   "installed": str(received.directory)},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (work / "demo-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    emit(args, summary, lambda: console.print(
        f"done in {sum(timings.values()):.0f} s; summary in {work / 'demo-summary.json'}"))
    return 0


def _print_audit(audit: AuditResult) -> None:
    table = Table(title="Memorisation audit (patient level; epsilon bounds at 95 %)")
    for col in ("attack", "AUC", "TPR@0.1%FPR", "TPR@1%FPR", "ε lower bound",
                "ε max detectable"):
        table.add_column(col)
    for name, m in audit.attacks.items():
        table.add_row(name, f"{m.auc:.3f}", f"{m.tpr_at_fpr[0.001]:.3f}",
                      f"{m.tpr_at_fpr[0.01]:.3f}", f"{m.epsilon.epsilon_lower:.3f}",
                      f"{m.epsilon.epsilon_max_detectable:.3f}")
    console.print(table)
    worst = max((e.exposure_bits for e in audit.canaries), default=0.0)
    console.print(f"canaries: {len(audit.canaries)} in training, worst exposure {worst:.2f} "
                  f"bits; identifier scan: {audit.scan.counts() or 'no findings'}")
    for c in audit.failed:
        console.print(f"FAILED {c.name}: {c.measured:.4g} > {c.limit:.4g}")


def _print_accuracy(report: steps.TrainReport) -> None:
    table = Table(title="PMSI coder accuracy (main diagnosis)")
    for col in ("site", "stays", "top-1", "top-5"):
        table.add_column(col)
    for a in report.accuracy:
        name = f"{a.site} ({'held-out patients' if a.split == 'held-out' else 'all stays'})"
        table.add_row(name, str(a.stays), f"{a.top1:.1%}", f"{a.top5:.1%}")
    console.print(table)
