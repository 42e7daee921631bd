"""``passerelle demo``: the whole story on one machine, at the demo's full sizes."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from passerelle import steps
from passerelle.cli._common import (
    Subparsers,
    add_command,
    check_out_dir,
    console,
    emit,
    int_range,
    output_dir,
    progress_bar,
)
from passerelle.corpus import manifest_digest
from passerelle.errors import Refused
from registry.audit.policy import load_policy
from registry.audit.runner import AuditResult
from registry.coder import CoderConfig
from registry.store import ModelStore, VersionRef
from transfer.coding import code_file
from transfer.dossier import write_dossier
from transfer.exchange import create_bundle, receive_bundle
from transfer.identity import PublicIdentity, init_site
from transfer.ledger_site import open_ledger, verify_site
from transfer.lineage import lineage
from transfer.report import write_report
from transfer.trust import TrustStore
from transfer.withdrawal import receive_notice, withdraw_version

MODEL_NAME = "pmsi-coder"
SITE_X, SITE_Y = "CHU-X", "CH-Y"
CANARIES = 10
RESERVE_FRACTION = 0.2  # share of X's patients sealed as the audit's reserve
EPSILON, DELTA = 3.0, 1e-5  # site Y's fine-tuning target, patient level
PURPOSE = "PMSI coding assistance: suggest the main CIM-10 diagnosis of a stay"
LEGAL_BASIS = ("GDPR art. 6(1)(e) public interest task; art. 9(2)(h) health care "
               "management (synthetic data in this demo)")


def add_to(sub: Subparsers) -> None:
    p = add_command(
        sub, "demo", demo, "run the whole story on one machine with two simulated sites",
        "Generate site X's and site Y's synthetic corpora; create both sites' identities\n"
        "and pin each other's key; seal a fifth of X's patients as the audit's reserve\n"
        "(data seal); train the reference PMSI coder at X on the rest (accuracy on X's\n"
        "held-out patients and on Y); register it in X's MLflow registry (SQLite under\n"
        "WORKDIR/site-x); audit it for memorised patient data (membership inference,\n"
        "canaries, identifier scan); export it to ONNX through the gate; sign and encrypt\n"
        "it for site Y, which verifies and registers it (WORKDIR/site-y); fine-tune it at Y\n"
        "on Y's stays under DP-SGD (patient level, epsilon 3, delta 1e-5); Y codes a\n"
        "sample of its stays with the fine-tuned version; X withdraws version 1 and Y's\n"
        "derived version is refused; then check both sites' ledgers against each other,\n"
        "write each site's report and list the lineage of X's dataset.\n"
        "WORKDIR must not exist or be empty (default: a new passerelle-demo-<time> folder).\n"
        "--home is not used: each simulated site has its home under WORKDIR.",
    )
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="where everything goes; must not exist or be empty (default: a new "
                   "passerelle-demo-<time> folder here)")
    p.add_argument("--stays-x", type=int_range(1000, 1_000_000), default=20000, metavar="N",
                   help="site X's stays, 1,000 to 1,000,000")
    p.add_argument("--stays-y", type=int_range(500, 1_000_000), default=6000, metavar="N",
                   help="site Y's stays, 500 to 1,000,000")
    p.add_argument("--epochs", type=int_range(1, 1000), default=4,
                   help="training epochs at X, 1 to 1,000")
    p.add_argument("--seed", type=int_range(0, 2**32 - 2), default=2026,
                   help="0 to 2^32-2")


@dataclass
class _Run:
    args: argparse.Namespace
    work: Path
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def data_x(self) -> Path:
        return self.work / "data" / "site-x"

    @property
    def data_y(self) -> Path:
        return self.work / "data" / "site-y"

    @property
    def train_x(self) -> Path:
        """X's corpus without the audit's sealed reserve: what the vendor trains on."""
        return self.work / "data" / "site-x-training"

    @property
    def home_x(self) -> Path:
        return self.work / "site-x"

    @property
    def home_y(self) -> Path:
        return self.work / "site-y"

    def say(self, message: str) -> None:
        if not self.args.json:
            console.print(message)


def demo(args: argparse.Namespace) -> int:
    work: Path = args.workdir or Path(f"passerelle-demo-{datetime.now():%Y%m%d-%H%M%S}")
    check_out_dir(work)
    with output_dir(work):  # a demo that fails or is interrupted leaves no folder
        work.mkdir(exist_ok=True)
        return _play(args, work)


def _play(args: argparse.Namespace, work: Path) -> int:
    run = _Run(args, work)
    plan: list[tuple[str, Callable[[_Run], str]]] = [
        ("generate", _generate), ("sites", _sites), ("seal", _seal), ("train", _train),
        ("register", _register), ("audit", _audit), ("export", _export),
        ("transfer", _transfer), ("finetune", _finetune), ("predict", _predict),
        ("withdraw", _withdraw), ("ledgers", _ledgers), ("lineage", _lineage),
    ]
    for number, (name, step) in enumerate(plan, start=1):
        t = time.perf_counter()
        message = step(run)
        run.seconds[name] = round(time.perf_counter() - t, 1)
        run.say(f"[{number}/{len(plan)}] {message}")
    run.summary["workdir"] = str(work)
    run.summary["seconds"] = run.seconds
    (work / "demo-summary.json").write_text(json.dumps(run.summary, indent=1) + "\n")
    emit(args, run.summary, lambda: console.print(
        f"done in {sum(run.seconds.values()):.0f} s; reports: {run.summary['reports']['X']} "
        f"and {run.summary['reports']['Y']}; summary in {work / 'demo-summary.json'}"))
    return 0


def _generate(run: _Run) -> str:
    a = run.args
    steps.generate_corpus("X", a.stays_x, a.seed, CANARIES, run.data_x)
    steps.generate_corpus("Y", a.stays_y, a.seed + 1, 0, run.data_y)
    run.summary["data"] = {"X": str(run.data_x), "Y": str(run.data_y)}
    return (f"generated {a.stays_x} stays at site X (+{CANARIES} canary patients) and "
            f"{a.stays_y} at site Y in {run.work / 'data'}")


def _sites(run: _Run) -> str:
    identities = run.work / "identities"
    identities.mkdir()
    for home, name in ((run.home_x, SITE_X), (run.home_y, SITE_Y)):
        public = init_site(home, name)
        (identities / f"{name}.json").write_text(json.dumps(public.to_json(), indent=1) + "\n")
    TrustStore(run.home_x).add(PublicIdentity.from_file(identities / f"{SITE_Y}.json"))
    TrustStore(run.home_y).add(PublicIdentity.from_file(identities / f"{SITE_X}.json"))
    return (f"created the identities of {SITE_X} and {SITE_Y} (private keys 0600 in each "
            f"home) and pinned each other's key; public identity files in {identities}")


def _seal(run: _Run) -> str:
    seal = steps.seal_data(run.home_x, run.data_x, RESERVE_FRACTION, run.train_x)
    run.summary["reserve"] = seal.fields()
    return (f"{SITE_X}'s administrator sealed the audit's reserve before any training: "
            f"{seal.reserve_patients} patients ({seal.reserve_stays} stays) drawn by the "
            f"site's keyed hash, committed in the ledger; the vendor trains on the other "
            f"{seal.training_patients} patients in {run.train_x}")


def _train(run: _Run) -> str:
    with progress_bar(run.args) as progress:
        report = steps.train_model(run.train_x, run.work / "models" / MODEL_NAME,
                                   CoderConfig(epochs=run.args.epochs, seed=run.args.seed),
                                   [run.data_y], progress)
    run.summary["model_dir"] = str(report.out_dir)
    run.summary["accuracy"] = [a.__dict__ for a in report.accuracy]
    if not run.args.json:
        table = Table(title="PMSI coder accuracy (main diagnosis)")
        for col in ("site", "stays", "top-1", "top-5"):
            table.add_column(col)
        for a in report.accuracy:
            name = f"{a.site} ({'held-out patients' if a.split == 'held-out' else 'all stays'})"
            table.add_row(name, str(a.stays), f"{a.top1:.1%}", f"{a.top5:.1%}")
        console.print(table)
    return (f"trained the PMSI coder at site X ({report.classes} codes, vocabulary "
            f"{report.vocabulary_size} tokens)")


def _register(run: _Run) -> str:
    store = ModelStore(run.home_x)
    info = steps.register_model(store, Path(run.summary["model_dir"]), MODEL_NAME, PURPOSE,
                                LEGAL_BASIS, run.train_x, "CHU de site X (demo)")
    run.summary["model"] = str(info.ref)
    run.summary["registry"] = store.display_uri
    return f"registered {info.ref} in {SITE_X}'s registry {store.display_uri}"


def _ref(run: _Run) -> VersionRef:
    return VersionRef.parse(run.summary["model"])


def _audit(run: _Run) -> str:
    with progress_bar(run.args) as progress:
        audit = steps.audit_model(ModelStore(run.home_x), _ref(run), run.train_x, run.data_x,
                                  load_policy(), run.work / "audit", progress, run.args.seed)
    run.summary["audit"] = {"verdict": audit.verdict, "report": str(audit.report_dir),
                            "failed": [c.name for c in audit.failed]}
    if not run.args.json:
        _print_audit(audit)
    return (f"audited {audit.ref}: verdict {audit.verdict} under policy {audit.policy_name} "
            f"({audit.members} member / {audit.nonmembers} non-member patients, "
            f"{audit.reference_models} reference models); report in {audit.report_dir}")


def _export(run: _Run) -> str:
    ref = _ref(run)
    export = steps.export_model(ModelStore(run.home_x), ref,
                                run.work / "export" / f"{MODEL_NAME}-v{ref.version}")
    p = export.parity
    run.summary["export"] = str(export.directory)
    run.summary["onnx_digest"] = export.onnx_digest
    run.summary["parity"] = p.__dict__
    return (f"exported {ref} to ONNX in {export.directory}: parity on {p.inputs} held-out "
            f"inputs, max |logit diff| {p.max_abs_diff:.2e} (limit {p.tolerance:g}), top-1 "
            f"agreement {p.top1_agreement:.0%}")


def _transfer(run: _Run) -> str:
    ref = _ref(run)
    path = run.work / "transfer" / f"{MODEL_NAME}-v{ref.version}.bundle"
    path.parent.mkdir()
    created = create_bundle(run.home_x, ModelStore(run.home_x), ref, [SITE_Y], path)
    received = receive_bundle(path, run.home_y, ModelStore(run.home_y))
    run.summary["bundle"] = {"path": str(path), "digest": created.digest,
                             "received_as": str(received.version.ref),
                             "installed": str(received.directory)}
    return (f"{SITE_X} signed and encrypted {ref} for {SITE_Y} ({path}, {created.size} bytes); "
            f"{SITE_Y} verified it and registered it as {received.version.ref} in its own "
            f"registry, installed in {received.directory}")


def _finetune(run: _Run) -> str:
    received = VersionRef.parse(run.summary["bundle"]["received_as"])
    options = steps.finetune_options(epsilon=EPSILON, delta=DELTA, drop_unknown_codes=True)
    with progress_bar(run.args) as progress:
        r = steps.finetune_model(ModelStore(run.home_y), received, run.data_y, options,
                                 progress=progress)
    run.summary["finetune"] = {
        "version": str(r.version.ref), "epsilon_pld": r.epsilon_pld,
        "epsilon_rdp": r.epsilon_rdp, "delta": r.delta, "privacy_unit": r.privacy_unit,
        "noise_multiplier": r.noise_multiplier, "sampling_rate": r.sampling_rate,
        "steps": r.steps, "accuracy_before": r.accuracy_before,
        "accuracy_after": r.accuracy_after, "budget_spent": r.budget.epsilon,
        "budget_cap": r.budget_cap}
    return (f"{SITE_Y} fine-tuned {received} on its own stays under DP-SGD ({r.privacy_unit} "
            f"level, ε = {r.epsilon_pld:.3f} by PLD, {r.epsilon_rdp:.3f} by RDP, δ = "
            f"{r.delta:g}, noise {r.noise_multiplier:.3f}, q = {r.sampling_rate:.4f}, "
            f"{r.steps} steps): accuracy on its held-out patients (not trained on, not "
            f"charged; exact, outside the DP guarantee) {r.accuracy_before:.1%} → "
            f"{r.accuracy_after:.1%}; registered as {r.version.ref}; budget spent by its most "
            f"charged patient {r.budget.epsilon:.3f} of {r.budget_cap:g}")


PREDICT_SAMPLE = 500


def _predict(run: _Run) -> str:
    """Y codes new stays with the fine-tuned version (checked before loading)."""
    ref = VersionRef.parse(run.summary["finetune"]["version"])
    new_stays = run.work / "data" / "site-y-new"  # stays that came after the fine-tuning
    steps.generate_corpus("Y", PREDICT_SAMPLE, run.args.seed + 2, 0, new_stays)
    out = run.work / "coding" / "codes.jsonl"
    out.parent.mkdir()
    coded = code_file(ModelStore(run.home_y), ref, new_stays, out, 5)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    docs = [json.loads(line) for line in
            (new_stays / "stays.jsonl").read_text(encoding="utf-8").splitlines()]
    truth = [d["main_diagnosis"] for d in docs]
    top1 = sum(r["codes"][0]["code"] == t for r, t in zip(rows, truth, strict=True))
    top5 = sum(t in {c["code"] for c in r["codes"]} for r, t in zip(rows, truth, strict=True))
    first = rows[0]["codes"][0]
    run.summary["predict"] = {"version": str(ref), "stays": coded.stays, "out": str(out),
                              "data": str(new_stays),
                              "top1": top1 / len(rows), "top5": top5 / len(rows),
                              "signed_by": coded.signer}
    return (f"{SITE_Y} coded {coded.stays} new stays ({new_stays}) with {ref} (signature "
            f"by {coded.signer}, ONNX digest and withdrawal status checked before loading) "
            f"into {out}: the coded main diagnosis is the top suggestion for "
            f"{top1 / len(rows):.1%} and in the top 5 for {top5 / len(rows):.1%}; first "
            f"stay: {first['code']} {first['label'][:40]} (p = {first['probability']:.2f})")


def _withdraw(run: _Run) -> str:
    """X withdraws version 1; Y applies the notice; Y's derived version is refused."""
    source = _ref(run)
    notice = run.work / "transfer" / f"{MODEL_NAME}-v{source.version}.withdrawal"
    withdrawal = withdraw_version(ModelStore(run.home_x), source,
                                  "demo: memorisation found after transfer", notice)
    applied = receive_notice(run.home_y, notice)
    derived = VersionRef.parse(run.summary["finetune"]["version"])
    try:
        code_file(ModelStore(run.home_y), derived, Path(run.summary["predict"]["data"]),
                  run.work / "coding" / "after-withdrawal.jsonl", 5)
    except Refused as e:
        refusal = str(e)
    else:  # pragma: no cover - the demo would be lying
        raise RuntimeError(f"{derived} was still usable after its withdrawal")
    run.summary["withdrawal"] = {"notice": str(notice),
                                 "withdrawn_at_x": [str(v) for v in withdrawal.withdrawn],
                                 "withdrawn_at_y": [str(v) for v in applied.withdrawn],
                                 "predict_refused": refusal}
    return (f"{SITE_X} withdrew {source} and sent a signed notice ({notice}); {SITE_Y} "
            f"verified it and withdrew {', '.join(str(v) for v in applied.withdrawn)}; "
            f"`predict {derived}` at {SITE_Y} is now refused: error: {refusal}")


def _lineage(run: _Run) -> str:
    dataset = manifest_digest(run.train_x)  # the corpus the model was trained on
    exports = run.summary["ledgers"]["exports"]
    found = lineage(run.home_x, dataset=dataset, peers=[Path(exports[run.home_y.name])])
    run.summary["lineage"] = {"dataset": dataset, "versions": [d.to_json() for d in found]}
    if not run.args.json:
        table = Table(title=f"records lineage --dataset {dataset[:23]}… (at {SITE_X}, with "
                      f"{SITE_Y}'s export)")
        for col in ("site", "model", "version", "status", "how"):
            table.add_column(col)
        for d in found:
            table.add_row(d.site, d.model, d.version, d.status, d.how)
        console.print(table)
    return (f"{len(found)} model versions derive from {SITE_X}'s dataset: "
            + "; ".join(f"{d.site} {d.model}/{d.version} ({d.status})" for d in found))


def _ledgers(run: _Run) -> str:
    exports = {home: run.work / "ledgers" / f"{home.name}.jsonl"
               for home in (run.home_x, run.home_y)}
    exports[run.home_x].parent.mkdir()
    for home, out in exports.items():
        with open_ledger(home) as ledger:
            ledger.export(out)
    counts = {}
    for home, peer in ((run.home_x, run.home_y), (run.home_y, run.home_x)):
        checked = verify_site(home, peer=exports[peer])
        counts[checked.ledger.site] = checked.ledger.count
    reports = {"X": run.work / "report-site-x.html", "Y": run.work / "report-site-y.html"}
    write_report(run.home_x, reports["X"], peers=[exports[run.home_y]])
    write_report(run.home_y, reports["Y"], peers=[exports[run.home_x]])
    tuned = VersionRef.parse(run.summary["finetune"]["version"])
    dossier = run.work / f"dossier-{tuned.name}-{tuned.version}-fr.html"
    write_dossier(run.home_y, tuned, dossier, "fr")
    run.summary["ledgers"] = {"exports": {h.name: str(p) for h, p in exports.items()},
                              "records": counts}
    run.summary["reports"] = {k: str(v) for k, v in reports.items()}
    run.summary["dossier"] = str(dossier)
    return (f"verified both ledgers ({', '.join(f'{s}: {n} records' for s, n in counts.items())}"
            f") and each against the other's export: every transfer is recorded at both "
            f"ends; reports: {reports['X']} and {reports['Y']}; the dossier of {tuned} (in "
            f"French): {dossier}")


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
