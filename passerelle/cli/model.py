"""``passerelle model train|register|export``: the source site's model and its registry."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from rich.table import Table

from passerelle import steps
from passerelle.cli._common import (
    SEED,
    Subparsers,
    add_command,
    add_out,
    check_out_dir,
    check_out_file,
    console,
    emit,
    existing_dir,
    existing_file,
    float_range,
    fraction,
    home_of,
    int_range,
    output_dir,
    output_file,
    progress_bar,
)
from passerelle.errors import BadInput
from registry.audit.policy import Policy, load_policy
from registry.audit.runner import report_json
from registry.coder import Architecture, CoderConfig
from registry.export import Override
from registry.store import ModelStore, PrivacyUnit, VersionRef
from registry.vocabulary import ALL_SECTIONS, CLINICAL_SECTIONS, VocabularyConfig
from transfer.i18n import down, up


def add_to(sub: Subparsers) -> None:
    group = sub.add_parser("model", help="train, register and export models").add_subparsers(
        dest="model_command", metavar="COMMAND", required=True)
    _add_train(group)
    _add_init_manifest(group)
    _add_register(group)
    _add_audit(group)
    _add_export(group)
    _add_withdraw(group)


def _add_train(group: Subparsers) -> None:
    p = add_command(
        group, "train", train, "train the reference PMSI coder on a site's corpus",
        "Train the reference PMSI coder (stay text -> main CIM-10 diagnosis) and write a\n"
        "model directory. Held-out stays are chosen by patient. Privacy-conscious vocabulary\n"
        "defaults: the header is not read, a token needs --min-patients distinct patients,\n"
        "identifier-shaped tokens are dropped.",
    )
    p.add_argument("--data", required=True, type=existing_dir, metavar="DIR",
                   help="training corpus")
    add_out(p, "dir", "the new model folder (must not exist, or be empty)")
    p.add_argument("--eval", dest="eval_data", action="append", type=existing_dir, default=[],
                   metavar="DIR", help="also report accuracy on this corpus (repeatable)")
    p.add_argument("--arch", choices=[a.value for a in Architecture],
                   default=Architecture.EMBEDDING_MEAN.value,
                   help="embedding-mean (Keras) or logreg (scikit-learn)")
    p.add_argument("--epochs", type=int_range(1, 1000), default=4, help="1 to 1,000")
    p.add_argument("--batch-size", type=int_range(1, 65536), default=128, help="1 to 65,536")
    p.add_argument("--learning-rate", type=float_range(0.0, 10.0), default=5e-3,
                   help="in (0, 10]")
    p.add_argument("--embedding-dim", type=int_range(1, 4096), default=64, help="1 to 4,096")
    p.add_argument("--hidden-units", type=int_range(1, 65536), default=128,
                   help="1 to 65,536")
    p.add_argument("--seed", type=SEED, default=0, help="0 to 2^32-1")
    p.add_argument("--heldout-fraction", type=fraction, default=0.2,
                   help="share of patients held out, in (0, 1)")
    v = p.add_argument_group("vocabulary (privacy-conscious defaults)")
    v.add_argument("--min-patients", type=int_range(1, 10**6), default=5, metavar="K",
                   help="a token needs K distinct patients to enter (default 5; 1 turns it off)")
    v.add_argument("--keep-identifiers", action="store_true",
                   help="keep identifier-shaped tokens (unsafe: for audit tests)")
    v.add_argument("--include-header", action="store_true",
                   help="also read the header with the patient's identifiers (unsafe)")
    v.add_argument("--max-vocab", type=int_range(1, 10**6), default=5000,
                   help="largest vocabulary, 1 to 1,000,000")
    v.add_argument("--max-len", type=int_range(1, 65536), default=256,
                   help="tokens read per stay, 1 to 65,536")


def _add_init_manifest(group: Subparsers) -> None:
    p = add_command(
        group, "init-manifest", init_manifest, "write a starting manifest for a vendor's model",
        "Inspect a vendor's model (.keras, SavedModel folder, .skops, .onnx): its input\n"
        "dtype and width give the input kind (token ids: max_len; bag of words: vocabulary\n"
        "size), its output width the number of labels. Writes a starting manifest (format\n"
        "passerelle-manifest 1, registry/manifest.schema.json) naming vocabulary.json and\n"
        "labels.json beside it; training.heldout, steps and recipe are left null for you to\n"
        "fill in. Nothing is registered.",
    )
    p.add_argument("model", metavar="MODEL", help="a .keras file, SavedModel folder, .skops "
                   "or .onnx file")
    add_out(p, "file", "the manifest to write (refused if it exists, unless --force)")
    p.add_argument("--custom-objects", metavar="SPEC",
                   help="module:Name[,Name...] for a Keras model's custom layers (default: "
                   "none)")


def init_manifest(args: argparse.Namespace) -> int:
    from registry.manifest import starting_manifest

    check_out_file(args.out, args.force)
    path = Path(args.model)
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder")
    found = starting_manifest(path, args.custom_objects)
    with output_file(args.out, args.force) as tmp:
        tmp.write_text(json.dumps(found.document, indent=1) + "\n", encoding="utf-8")
    doc = {"out": str(args.out), "framework": found.framework,
           "input_width": found.input_width, "output_width": found.output_width,
           "manifest": found.document, "notes": found.notes()}

    def human() -> None:
        console.print(f"wrote {args.out} ({found.framework} model)")
        for note in found.notes():
            console.print(f"- {note}")

    emit(args, doc, human)
    return 0


def _add_register(group: Subparsers) -> None:
    p = add_command(
        group, "register", register, "register a model (yours or a vendor's) as a new version",
        "Turn a model source into a model directory (v2) and log it to the site's MLflow\n"
        "store as a new version of NAME. SOURCE: a folder written by `model train`; a Keras\n"
        "2 model (.keras file or SavedModel folder); a scikit-learn model saved with skops\n"
        "(.skops; never pickle); an .onnx file from any framework; or models:/NAME/VERSION,\n"
        "models:/NAME@ALIAS, models:/m-ID, runs:/RUN_ID/PATH of the vendor's own MLflow.\n"
        "A vendor's model needs --manifest (its input contract: `model init-manifest`\n"
        "writes a starting one) and --data (its training corpus). Passerelle encodes stays\n"
        "of --data itself (the declared held-out patients, else a keyed sample), runs the\n"
        "source model on them, converts it to ONNX once and refuses it (exit 1) unless the\n"
        "ONNX gives the same logits (max |diff| <= 1e-4, identical top-1). Provenance\n"
        "becomes version tags (passerelle.*): purpose, legal basis, data controller, training\n"
        "site (this site's identity for a vendor's model), privacy unit and the dataset\n"
        "fingerprint computed from --data. Store: $MLFLOW_TRACKING_URI, else SQLite in the\n"
        "home. Bad input (unknown framework, a manifest that does not validate, outputs that\n"
        "do not match the label table, ...) registers and records nothing (exit 2).",
    )
    p.add_argument("source", metavar="SOURCE",
                   help="a `model train` folder, .keras, SavedModel folder, .skops, .onnx, "
                   "models:/... or runs:/...")
    p.add_argument("--name", required=True, help="the registered model's name")
    p.add_argument("--purpose", required=True, metavar="TEXT", help="why it is processed")
    p.add_argument("--legal-basis", required=True, metavar="TEXT",
                   help="the GDPR legal basis")
    p.add_argument("--manifest", type=existing_file, metavar="FILE",
                   help="the vendor's manifest (required for a vendor's model; default: "
                   "synthesised for a `model train` folder)")
    p.add_argument("--data", type=existing_dir, metavar="DIR",
                   help="the training corpus (required for a vendor's model; for a `model "
                   "train` folder refused unless it is the one it was trained on; default: "
                   "not checked)")
    p.add_argument("--custom-objects", metavar="SPEC",
                   help="module:Name[,Name...] to import for a Keras model's custom layers "
                   "(safe_mode stays on; default: none)")
    p.add_argument("--from-tracking-uri", metavar="URI",
                   help="the vendor's MLflow for models:/ and runs:/ sources (default: "
                   "$MLFLOW_TRACKING_URI)")
    p.add_argument("--controller", metavar="TEXT", help="data controller (default: the "
                   "training site)")
    p.add_argument("--privacy-unit", choices=[u.value for u in PrivacyUnit],
                   default=PrivacyUnit.PATIENT.value, help="what one person's data is "
                   "(default: patient)")


def _add_audit(group: Subparsers) -> None:
    p = add_command(
        group, "audit", audit, "memorisation audit of a version before export",
        "Audit the ONNX form of a version (converted and logged first if needed):\n"
        "membership inference (loss threshold, LiRA online/offline, RMIA offline) with\n"
        "reference models trained by the model's own recipe (they must fit like the target:\n"
        "policy max_reference_shift), canary exposure, and a scan of everything shipped\n"
        "beside the weights for identifiers. The verdict (PASS/FAIL)\n"
        "under the policy, the metrics, the ROC plot and the policy digest are logged on\n"
        "the version. Exit 0 on PASS, 1 on FAIL.\n"
        "--members is the training corpus (TRAIN_DIR of `data seal`); --nonmembers is the\n"
        "corpus the site sealed it from (DIR of `data seal`): the non-members are the\n"
        "sealed reserve, drawn again with the site's key and checked against the ledger,\n"
        "and the declared held-out patients, whose split must reproduce (exit 2 if not).\n"
        "The gate and `bundle create` take only a PASS under the site's pinned policy\n"
        "(site setting audit.policy_sha256; empty: the packaged default).",
    )
    p.add_argument("ref", metavar="NAME/VERSION", help="a version of this site's registry")
    p.add_argument("--members", required=True, type=existing_dir, metavar="DIR",
                   help="the training corpus (the --out of `data seal`)")
    p.add_argument("--nonmembers", required=True, type=existing_dir, metavar="DIR",
                   help="the corpus whose reserve the site sealed (the DIR of `data seal`)")
    p.add_argument("--policy", type=existing_file, metavar="FILE",
                   help="policy TOML (default: the packaged passerelle-default)")
    p.add_argument("--reference-models", type=int_range(1, 256), metavar="N",
                   help="raise the policy's number of reference models (default: the "
                   "policy's; never fewer; at most 64; recorded with the verdict)")
    p.add_argument("--recipe", metavar="SPEC",
                   help="the reference models' recipe: an entry point of the group "
                   "passerelle.recipes (passerelle-coder is the built-in coder), "
                   "module:function, or onnx-reinit (re-initialised copies of the ONNX "
                   "retrained by the executor); recorded with the verdict (default: the "
                   "manifest's training.recipe, else the built-in coder for `model train` "
                   "models, onnx-reinit for ONNX-only models)")
    p.add_argument("--draw-halves", type=Path, metavar="DIR",
                   help="do not audit: write the K half-corpora (DIR/k/corpus, the stays "
                   "reference model k is trained on; K = the policy's count) and "
                   "DIR/halves.json, and record the draw, for reference models the vendor "
                   "trains itself (default: none)")
    p.add_argument("--reference-dir", type=existing_dir, metavar="DIR",
                   help="score the vendor's reference models DIR/k/model.{keras,skops,onnx}, "
                   "trained on the halves --draw-halves recorded, instead of training them "
                   "(default: trained here by the recipe)")
    add_out(p, "dir", "where the JSON report and ROC plot go (default: "
            "HOME/audits/NAME-vVERSION-<time>)", required=False)
    p.add_argument("--seed", type=SEED, default=0, help="0 to 2^32-1 (default 0)")


def _add_export(group: Subparsers) -> None:
    p = add_command(
        group, "export", export, "convert a model version to ONNX and check parity",
        "Convert a registered version to ONNX (tf2onnx or skl2onnx, opset 17), run\n"
        "onnx.checker with full checks, check parity with the source framework on held-out\n"
        "inputs (max |logit diff| <= 1e-4, identical top-1), write model.onnx, vocabulary.json,\n"
        "labels.json and model_card.json to DIR and log them on the same version.\n"
        "The export gate: refused (exit 1) unless the version has a PASS audit verdict for\n"
        "these exact ONNX bytes, or --override with a named approver and a justification,\n"
        "recorded on the version. Exit 1 if parity fails. Nothing is written to DIR then.",
    )
    p.add_argument("ref", metavar="NAME/VERSION", help="a version of this site's registry")
    add_out(p, "dir", "the new export folder (must not exist, or be empty)")
    p.add_argument("--override", action="store_true",
                   help="export without a PASS verdict (needs --approver and --justification)")
    p.add_argument("--approver", metavar="NAME",
                   help="who takes responsibility for --override (default: none)")
    p.add_argument("--justification", metavar="TEXT",
                   help="why, recorded with --override (default: none)")


def _add_withdraw(group: Subparsers) -> None:
    p = add_command(
        group, "withdraw", withdraw, "withdraw a version here and at the sites it was sent to",
        "Mark NAME/VERSION and every version of this site derived from it withdrawn (MLflow\n"
        "tags passerelle.withdrawn*, a model_withdrawn record): `predict` and `serve` refuse\n"
        "them, and a running server stops serving them at its next check. If the version\n"
        "was sent (bundle create), --out FILE is required: a withdrawal notice signed with\n"
        "this site's key for its recipients, who apply it with `passerelle notice receive`.")
    p.add_argument("ref", metavar="NAME/VERSION", help="the version to withdraw")
    p.add_argument("--reason", required=True, metavar="TEXT",
                   help="why (one line, at most 500 characters; it travels in the notice)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="the withdrawal notice to write (required when the version was "
                   "sent; must not exist)")


def withdraw(args: argparse.Namespace) -> int:
    from transfer.withdrawal import withdraw_version

    result = withdraw_version(ModelStore(home_of(args)), VersionRef.parse(args.ref),
                              args.reason, args.out)
    doc = {"withdrawn": [str(v) for v in result.withdrawn],
           "notice": None if result.notice is None else str(result.notice),
           "recipients": list(result.recipients), "record": result.record}
    emit(args, doc, lambda: console.print(
        f"withdrawn: {', '.join(str(v) for v in result.withdrawn)}"
        + (f"; notice for {', '.join(result.recipients)} in {result.notice}"
           if result.notice else "")))
    return 0


def train(args: argparse.Namespace) -> int:
    try:
        vocab = VocabularyConfig(
            min_patients=args.min_patients, drop_identifiers=not args.keep_identifiers,
            max_size=args.max_vocab, max_len=args.max_len,
            sections=ALL_SECTIONS if args.include_header else CLINICAL_SECTIONS)
        config = CoderConfig(
            architecture=Architecture(args.arch), vocabulary=vocab,
            embedding_dim=args.embedding_dim,
            hidden_units=args.hidden_units, epochs=args.epochs, batch_size=args.batch_size,
            learning_rate=args.learning_rate, heldout_fraction=args.heldout_fraction,
            seed=args.seed)
    except ValueError as e:
        raise BadInput(str(e)) from e
    with output_dir(args.out), progress_bar(args) as progress:
        report = steps.train_model(args.data, args.out, config, args.eval_data, progress)
    doc = {"out": str(report.out_dir), "classes": report.classes,
           "vocabulary_size": report.vocabulary_size, "train_stays": report.train_stays,
           "train_patients": report.train_patients,
           "accuracy": [asdict(a) for a in report.accuracy]}

    def human() -> None:
        table = Table(title=f"PMSI coder ({args.arch}) written to {report.out_dir}")
        for col in ("site", "split", "stays", "top-1", "top-5", "codes known"):
            table.add_column(col)
        for a in report.accuracy:
            table.add_row(a.site, a.split, str(a.stays), f"{a.top1:.1%}", f"{a.top5:.1%}",
                          f"{a.label_coverage:.1%}")
        console.print(table)
        console.print(f"{report.classes} codes, vocabulary of {report.vocabulary_size} tokens, "
                      f"{report.train_stays} training stays of {report.train_patients} patients")

    emit(args, doc, human)
    return 0


def register(args: argparse.Namespace) -> int:
    store = ModelStore(home_of(args, writes=True))
    info = steps.register_model(store, args.source, args.name, args.purpose,
                                args.legal_basis, args.data, args.controller,
                                PrivacyUnit(args.privacy_unit), manifest=args.manifest,
                                custom_objects=args.custom_objects,
                                tracking_uri=args.from_tracking_uri)
    doc = {"model": info.ref.name, "version": info.ref.version, "run_id": info.run_id,
           "tracking_uri": store.display_uri, "tags": dict(info.tags)}
    emit(args, doc, lambda: console.print(
        f"registered {info.ref} in {store.display_uri} (run {info.run_id})"))
    return 0


def audit(args: argparse.Namespace) -> int:
    ref = VersionRef.parse(args.ref)
    policy = load_policy(args.policy)
    if args.draw_halves is not None:
        return _draw_halves(args, ref, policy)
    if args.out is not None:
        check_out_dir(args.out)
    home = home_of(args, writes=True)
    out = args.out or home / "audits" / f"{ref.name}-v{ref.version}-{datetime.now():%Y%m%d-%H%M%S}"
    with output_dir(out), progress_bar(args) as progress:
        result = steps.audit_model(ModelStore(home), ref, args.members, args.nonmembers, policy,
                                   out, progress, args.seed, args.reference_models,
                                   args.recipe, args.reference_dir)
    doc = report_json(result) | {"report_dir": str(out)}

    def human() -> None:
        table = Table(title=f"Memorisation audit of {ref} ({result.privacy_unit} level, "
                      f"{result.members} members / {result.nonmembers} non-members, "
                      f"{result.reference_models} reference models)")
        for col in ("attack", "AUC", "TPR@0.1%FPR", "TPR@1%FPR", "ε lower bound (95%)",
                    "ε max detectable"):
            table.add_column(col)
        # what could favour the model is rounded against it (up), the reach down
        for name, m in result.attacks.items():
            table.add_row(name, up(m.auc), up(m.tpr_at_fpr[0.001]), up(m.tpr_at_fpr[0.01]),
                          up(m.epsilon.epsilon_lower), down(m.epsilon.epsilon_max_detectable))
        console.print(table)
        for e in result.canaries:
            console.print(f"canary {e.canary_id}: exposure {up(e.exposure_bits, 2)} bits "
                          f"(max {down(e.max_bits, 2)}, rank {e.rank:g} of "
                          f"{e.candidates + 1})")
        r = result.recipe
        console.print(f"reference models: {result.reference_models}, recipe {r.name} "
                      f"({r.kind.value}, {r.digest})")
        f = result.fit_shift
        def signed(v: float) -> str:  # its size rounded away from 0
            return ("+" if v >= 0 else "-") + up(abs(v), 2)

        console.print(f"reference models' fit: the target's members {signed(f.members)}, "
                      f"its non-members {signed(f.nonmembers)} of the models' spread from "
                      f"them (limit ±{policy.attacks.max_reference_shift:g})")
        console.print(f"scan: {result.scan.counts() or 'no findings'}")
        for c in result.failed:
            console.print(f"FAILED {c.name}: {c.measured:.4g} > {c.limit:.4g}")
        s = result.split
        console.print(f"top-1: training {s.train_top1:.1%}, declared held-out "
                      f"{s.heldout_top1:.1%}, sealed reserve {s.reserve_top1:.1%}")
        pinned = "" if result.policy_pinned else (
            " - NOT the site's pinned policy: this verdict opens no gate")
        console.print(f"verdict: {result.verdict} under policy {result.policy_name} "
                      f"({result.policy_digest}){pinned}; report in {out}")

    emit(args, doc, human)
    return 0 if result.verdict == "PASS" else 1


def _draw_halves(args: argparse.Namespace, ref: VersionRef, policy: Policy) -> int:
    if args.recipe or args.reference_dir or args.out:
        raise BadInput("--draw-halves writes halves and audits nothing: without --recipe, "
                       "--reference-dir or --out")
    check_out_dir(args.draw_halves)
    store = ModelStore(home_of(args, writes=True))
    with output_dir(args.draw_halves):
        halves = steps.draw_audit_halves(store, ref, args.members, args.nonmembers, policy,
                                         args.draw_halves, args.seed, args.reference_models)
    doc = halves.to_json() | {"out": str(args.draw_halves)}
    emit(args, doc, lambda: console.print(
        f"drew {halves.count} halves of the audit pool of {ref} into {args.draw_halves} "
        f"(assignment {halves.digest}, recorded); train DIR/k/model.keras|.skops|.onnx on "
        f"DIR/k/corpus, then audit with --reference-dir {args.draw_halves}"))
    return 0


def export(args: argparse.Namespace) -> int:
    ref = VersionRef.parse(args.ref)
    override = None
    if args.override:
        if not args.approver or not args.justification:
            raise BadInput("--override needs --approver NAME and --justification TEXT")
        override = Override(args.approver, args.justification)
    elif args.approver or args.justification:
        raise BadInput("--approver and --justification go with --override")
    check_out_dir(args.out)
    store = ModelStore(home_of(args, writes=True))
    with output_dir(args.out):
        result = steps.export_model(store, ref, args.out, override)
    p = result.parity
    doc = {"model": ref.name, "version": ref.version, "out": str(result.directory),
           "onnx_digest": result.onnx_digest, "parity": asdict(p)}
    emit(args, doc, lambda: console.print(
        f"exported {ref} to {result.directory}: parity on {p.inputs} held-out inputs, "
        f"max |logit diff| {p.max_abs_diff:.2e} (limit {p.tolerance:g}), top-1 agreement "
        f"{p.top1_agreement:.0%}; {result.onnx_digest}"))
    return 0
