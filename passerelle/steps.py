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

from passerelle.corpus import (
    Corpus,
    generate,
    label_table,
    manifest_digest,
    read_corpus,
    write_corpus,
)
from passerelle.errors import BadInput
from registry.audit.policy import Policy
from registry.audit.runner import AuditResult, audit_version, log_audit
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
from registry.store import ModelStore, PrivacyUnit, Provenance, VersionInfo, VersionRef


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
    return store.register(model_dir, name, provenance)


def export_model(store: ModelStore, ref: VersionRef, out: Path,
                 override: Override | None = None) -> OnnxExport:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out}: exists and is not an empty directory")
    make_parent(out)
    return export_version(store, ref, out, override)


def audit_model(
    store: ModelStore, ref: VersionRef, members: Path, nonmembers: Path, policy: Policy,
    out: Path, progress: Progress | None = None, seed: int = 0,
) -> AuditResult:
    """Run the audit in a private workspace, log it on the version, keep the report in
    ``out``. Bad input is found before anything is logged."""
    _check_new_dir(out)
    with _new_dir(out) as tmp:
        result = audit_version(store, ref, members, nonmembers, policy, tmp / "work",
                               progress, seed)
        report = tmp / "work" / "audit"
        log_audit(store, result)
        for item in report.iterdir():
            item.rename(tmp / item.name)
        shutil.rmtree(tmp / "work")
    return replace(result, report_dir=out)


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
