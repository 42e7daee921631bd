"""The steps of the story, composed from the three parts; the CLI and the demo call these.

Each step validates its input, does its work in a temporary place and moves the result
into place only when everything succeeded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from passerelle.corpus import (
    Corpus,
    generate,
    label_table,
    manifest_digest,
    read_corpus,
    write_corpus,
)
from passerelle.digests import sha256_file
from passerelle.errors import BadInput
from registry.audit.policy import Policy, pinned_policy_digest
from registry.audit.reserve import Seal, seal_corpus
from registry.audit.runner import (
    REPORT_FILE,
    ROC_FILE,
    AuditResult,
    audit_version,
    log_audit,
    reference_model_count,
)
from registry.coder import (
    Accuracy,
    CoderConfig,
    Examples,
    Progress,
    evaluate,
    save_coder,
    train_coder,
)
from registry.export import OnnxExport, Override, export_version
from registry.model_dir import open_model_dir
from registry.store import TAG, ModelStore, PrivacyUnit, Provenance, VersionInfo, VersionRef
from transfer.acts import Recorder, recorder, subject
from transfer.records import RecordKind

if TYPE_CHECKING:  # TensorFlow loads with these: imported where fine-tuning runs
    from adapters.finetune import FinetuneOptions
    from passerelle.finetuning import FinetuneResult


@dataclass(frozen=True)
class TrainReport:
    out_dir: Path
    accuracy: tuple[Accuracy, ...]
    vocabulary_size: int
    classes: int
    train_stays: int
    train_patients: int


def generate_corpus(site: str, stays: int, seed: int, canaries: int, out: Path) -> Corpus:
    """Generate a site's synthetic corpus and write it to ``out`` (atomically)."""
    corpus = generate(site, stays, seed, canaries=canaries)
    write_corpus(corpus, out)
    return corpus


def examples_of(corpus: Corpus) -> Examples:
    return Examples(
        sections=tuple(s.sections.as_dict() for s in corpus.stays),
        codes=tuple(s.main_diagnosis for s in corpus.stays),
        patient_ids=tuple(s.patient_id for s in corpus.stays),
        site=corpus.site,
    )


def train_model(
    data: Path,
    out: Path,
    config: CoderConfig,
    eval_data: Sequence[Path] = (),
    progress: Progress | None = None,
) -> TrainReport:
    """Train the reference coder on ``data``, evaluate it, write the model directory."""
    _check_new_dir(out)
    corpus = read_corpus(data)
    evals = [read_corpus(p) for p in eval_data]  # read everything before the long part
    coder = train_coder(examples_of(corpus), config, progress)
    accuracy = [evaluate(coder, coder.heldout, "held-out")]
    accuracy += [evaluate(coder, examples_of(c), "all") for c in evals]
    training = {"site": corpus.site, "dataset_fingerprint": manifest_digest(data),
                "corpus_seed": corpus.seed}
    with _new_dir(out) as tmp:
        save_coder(coder, tmp, label_table(), training, accuracy)
    return TrainReport(
        out_dir=out, accuracy=tuple(accuracy), vocabulary_size=len(coder.vocabulary),
        classes=len(coder.codes), train_stays=coder.train_size,
        train_patients=coder.train_patients,
    )


def register_model(
    store: ModelStore,
    model_path: Path,
    name: str,
    purpose: str,
    legal_basis: str,
    data: Path | None = None,
    controller: str | None = None,
    privacy_unit: PrivacyUnit = PrivacyUnit.PATIENT,
) -> VersionInfo:
    """Verify a model directory and register it with its provenance."""
    model_dir = open_model_dir(model_path)
    training = model_dir.metadata.training
    recorded = str(training.get("dataset_fingerprint", ""))
    if data is not None and manifest_digest(data) != recorded:
        raise BadInput(f"{model_path} was not trained on {data} (dataset fingerprints differ)")
    site = str(training.get("site", "")) or "unknown"
    provenance = Provenance(
        purpose=purpose,
        legal_basis=legal_basis,
        data_controller=controller or f"site {site}",
        training_site=site,
        privacy_unit=privacy_unit,
        dataset_fingerprint=recorded,
    )
    with recorder(store.home) as rec:
        def record(info: VersionInfo) -> None:
            rec.record(RecordKind.MODEL_REGISTERED,
                       subject("model", str(info.ref), model_dir.digest)
                       + subject("dataset", site, recorded or None),
                       {"model": name, "version": info.ref.version, "purpose": purpose,
                        "legal_basis": legal_basis,
                        "data_controller": provenance.data_controller,
                        "training_site": site, "privacy_unit": privacy_unit.value,
                        "dataset_fingerprint": recorded,
                        "model_dir_digest": model_dir.digest})

        return store.register(model_dir, name, provenance, record)


def export_model(store: ModelStore, ref: VersionRef, out: Path,
                 override: Override | None = None) -> OnnxExport:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out}: exists and is not an empty directory")
    make_parent(out)
    with recorder(store.home) as rec:
        def record(export: OnnxExport, gate: str) -> None:
            subjects = subject("onnx", str(export.ref), export.onnx_digest)
            fields: dict[str, object] = {
                "model": export.ref.name, "version": export.ref.version,
                "onnx_digest": export.onnx_digest, "gate": gate}
            if override is not None and not gate.startswith("audit PASS"):
                info = store.get(export.ref)
                fields.update(approver=override.approver,
                              justification=override.justification,
                              audit_verdict=info.tags.get(TAG + "audit.verdict", "none"))
                rec.record(RecordKind.EXPORT_OVERRIDE, subjects, fields)
            else:
                rec.record(RecordKind.EXPORT, subjects, fields)

        return export_version(store, ref, out, override, record)


def seal_data(home: Path, data: Path, fraction: float, out: Path) -> Seal:
    """Seal the audit's reserve of ``data`` and write the training corpus to ``out``."""
    _check_new_dir(out)
    return seal_corpus(home, data, fraction, out)


def audit_model(
    store: ModelStore, ref: VersionRef, members: Path, sealed: Path, policy: Policy,
    out: Path, progress: Progress | None = None, seed: int = 0,
    reference_models: int | None = None,
) -> AuditResult:
    """Run the audit in a private workspace, log it on the version, keep the report in
    ``out``. ``members`` is the training corpus, ``sealed`` the corpus its reserve was
    sealed from. Bad input is found before anything is logged."""
    reference_model_count(policy, reference_models)  # bad input before any work
    pinned = pinned_policy_digest(store.home)
    _check_new_dir(out)
    with recorder(store.home) as rec, _new_dir(out) as tmp:
        result = audit_version(store, ref, members, sealed, policy, tmp / "work",
                               progress, seed, reference_models, pinned)
        report = tmp / "work" / "audit"
        _record_audit(rec, result, report)  # first: an unrecorded verdict is not logged
        log_audit(store, result)
        for item in report.iterdir():
            item.rename(tmp / item.name)
        shutil.rmtree(tmp / "work")
    return replace(result, report_dir=out)


def _record_audit(rec: Recorder, result: AuditResult, report: Path) -> None:
    """The ``audit_verdict`` record: verdict, failed criteria, and what it speaks of."""
    files = {name: sha256_file(report / name) for name in (REPORT_FILE, ROC_FILE)
             if (report / name).is_file()}
    rec.record(RecordKind.AUDIT_VERDICT,
               subject("onnx", str(result.ref), result.onnx_digest)
               + subject("audit-report", str(result.ref), files.get(REPORT_FILE))
               + subject("policy", result.policy_name, result.policy_digest),
               {"model": result.ref.name, "version": result.ref.version,
                "verdict": result.verdict,
                "failed": [c.name for c in result.failed],
                "onnx_digest": result.onnx_digest, "policy": result.policy_name,
                "policy_digest": result.policy_digest,
                "report_digest": files.get(REPORT_FILE),
                "roc_digest": files.get(ROC_FILE),
                "privacy_unit": result.privacy_unit,
                "policy_pinned": result.policy_pinned,
                "pinned_policy_digest": result.pinned_digest,
                "reference_models": result.reference_models})


def finetune_options(**kwargs: Any) -> FinetuneOptions:
    """The fine-tuning options; bad values are BadInput."""
    from adapters.finetune import FinetuneOptions

    return FinetuneOptions(**kwargs)


def finetune_model(store: ModelStore, ref: VersionRef, data: Path, options: FinetuneOptions,
                   rng: np.random.Generator | None = None,
                   progress: Progress | None = None) -> FinetuneResult:
    """DP-SGD fine-tuning of a received version on the site's corpus (passerelle.finetuning):
    charged and recorded (``finetune_started``) before training, its end recorded
    (``finetune``: finished, failed or interrupted). Needs the site's identity."""
    from passerelle.finetuning import finetune_version

    with recorder(store.home) as rec:
        return finetune_version(store, ref, data, options, rec, rng, progress)


def rebuild_budget_store(home: Path) -> int:
    """Rebuild ``HOME/privacy-budget.sqlite`` from the ledger's charges."""
    from adapters.budget import rebuild

    return rebuild(home)


def _check_new_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out}: exists and is not an empty directory")
    make_parent(out)


def make_parent(out: Path) -> None:
    """Create the parent folders of an output path (BadInput if that is impossible)."""
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{out}: cannot create its parent folder: {e.strerror}") from e


@contextmanager
def _new_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it becomes ``out``."""
    _check_new_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.resolve().parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
