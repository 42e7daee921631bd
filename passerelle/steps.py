"""The steps of the story, composed from the three parts; the CLI and the demo call these.

Each step validates its input, does its work in a temporary place and moves the result
into place only when everything succeeded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
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
from passerelle.errors import BadInput, PasserelleError
from passerelle.leftovers import (
    REGISTER,
    check_recorded,
    clean_killed,
    home_lock,
    locked_workspace,
    site_fingerprint,
)
from passerelle.recipes import BUILTIN, ONNX_REINIT, load_recipe
from registry.audit.halves import Halves
from registry.audit.policy import Policy, pinned_policy_digest
from registry.audit.reserve import Seal, seal_corpus
from registry.audit.runner import (
    REPORT_FILE,
    ROC_FILE,
    AuditResult,
    audit_version,
    draw_halves,
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
from registry.intake import Source, build_model_dir, is_model_train_folder
from registry.model_dir import Framework, ModelDir
from registry.sources import framework_of
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
    model_path: Path | str,
    name: str,
    purpose: str,
    legal_basis: str,
    data: Path | None = None,
    controller: str | None = None,
    privacy_unit: PrivacyUnit = PrivacyUnit.PATIENT,
    *,
    manifest: Path | None = None,
    custom_objects: str | None = None,
    tracking_uri: str | None = None,
) -> VersionInfo:
    """Turn a model source into a model directory v2 (registry.intake) in a private
    staging folder of the home, then register it with its provenance and record it.

    ``model_path``: a ``model train`` folder, a .keras file or SavedModel folder, a
    .skops or .onnx file, or a ``models:/`` / ``runs:/`` URI of the vendor's MLflow
    (``tracking_uri``). Nothing is logged or recorded unless every check passed."""
    Provenance(purpose=purpose, legal_basis=legal_basis, data_controller=controller or "-",
               training_site="-", privacy_unit=privacy_unit,
               dataset_fingerprint="sha256:" + "0" * 64)  # bad text: before any work
    text = str(model_path)
    if not text.startswith(("models:/", "runs:/")) and not Path(text).exists():
        raise BadInput(f"{text}: no such folder or file")
    _preflight(store)
    clean_killed(store, name, REGISTER)  # what a killed register of this name left
    with _staging(store.home) as staging:
        source = _source_of(text, staging, tracking_uri)
        site = None
        if source.framework is not None:
            site = _site_name(store.home)
        model_dir = build_model_dir(source, _mkdir(staging / "model"), site, manifest,
                                    data, custom_objects)
        pause = os.environ.get(SLEEP_IN_STAGING_ENV)
        if pause:
            time.sleep(float(pause))
        return _register_dir(store, model_dir, name, purpose, legal_basis, controller,
                             privacy_unit)


def _preflight(store: ModelStore) -> None:
    """The MLflow store and the ledger answer, before the intake's long work (which
    loads and runs the model); nothing is created for it."""
    from transfer.acts import has_ledger
    from transfer.ledger import LEDGER_FILE, URL_ENV

    store.check_reachable()
    if has_ledger(store.home) and (os.environ.get(URL_ENV)
                                   or (store.home / LEDGER_FILE).exists()):
        with recorder(store.home):
            pass


def _source_of(text: str, staging: Path, tracking_uri: str | None) -> Source:
    if text.startswith(("models:/", "runs:/")):
        from registry.mlflow_source import resolve_mlflow_source

        resolved = resolve_mlflow_source(
            text, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), staging / "download")
        return Source(path=resolved.path, framework=Framework(resolved.framework),
                      uri=resolved.uri, flavor=resolved.flavor, digest=resolved.digest)
    path = Path(text)
    if is_model_train_folder(path):
        return Source(path=path, framework=None)
    return Source(path=path, framework=framework_of(path))


def _site_name(home: Path) -> str | None:
    from transfer.identity import public_identity

    try:
        return str(public_identity(home).site)
    except PasserelleError:
        return None


def _register_dir(store: ModelStore, model_dir: ModelDir, name: str, purpose: str,
                  legal_basis: str, controller: str | None,
                  privacy_unit: PrivacyUnit) -> VersionInfo:
    training = model_dir.metadata.training
    recorded = str(training.get("dataset_fingerprint", ""))
    site = str(training.get("site", "")) or "unknown"
    provenance = Provenance(
        purpose=purpose,
        legal_basis=legal_basis,
        data_controller=controller or f"site {site}",
        training_site=site,
        privacy_unit=privacy_unit,
        dataset_fingerprint=recorded,
    )
    meta = model_dir.metadata
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
                        "model_dir_digest": model_dir.digest,
                        "framework": meta.framework.value,
                        "source": dict(meta.source),
                        "onnx_digest": meta.onnx_digest})

        with home_lock(store.home):  # until recorded: no cleaner takes it
            return store.register(model_dir, name, provenance, record,
                                  site_fingerprint(store.home))


STAGING_DIR = ".intake"
STAGING_PREFIX = "register-"
# Test hook for the kill tests: seconds to sleep once the intake built the model directory
# in its staging folder, before anything is registered.
SLEEP_IN_STAGING_ENV = "PASSERELLE_TEST_SLEEP_IN_STAGING"


@contextmanager
def _staging(home: Path) -> Iterator[Path]:
    """A private folder inside the home for the intake, removed on every path; the
    folders of killed registers are removed first (passerelle.leftovers)."""
    with ExitStack() as stack:
        try:
            path = stack.enter_context(locked_workspace(
                home, home / STAGING_DIR, STAGING_PREFIX, remove_parent=True))
        except OSError as e:
            raise BadInput(f"{home}: cannot create the intake staging folder: "
                           f"{e.strerror}") from e
        yield path


def _mkdir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def export_model(store: ModelStore, ref: VersionRef, out: Path,
                 override: Override | None = None) -> OnnxExport:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out}: exists and is not an empty directory")
    check_recorded(store, ref)  # a killed register's unrecorded version: before any work
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
    reference_models: int | None = None, recipe: str | None = None,
    reference_dir: Path | None = None,
) -> AuditResult:
    """Run the audit in a private workspace, log it on the version, keep the report in
    ``out``. ``members`` is the training corpus, ``sealed`` the corpus its reserve was
    sealed from; ``recipe`` the reference models' recipe (passerelle.recipes spec, or
    ``onnx-reinit``; default: the model's own). Bad input is found before anything is
    logged. ``reference_dir``: reference models the vendor trained on halves drawn by
    :func:`draw_audit_halves` (instead of a recipe)."""
    reference_model_count(policy, reference_models)  # bad input before any work
    if recipe is not None and reference_dir is not None:
        raise BadInput("--recipe and --reference-dir exclude each other: the reference "
                       "models are either trained here by a recipe or handed over")
    if recipe is not None and recipe not in (BUILTIN, ONNX_REINIT):
        load_recipe(recipe)  # an unknown or unimportable recipe: before any work
    check_recorded(store, ref)
    pinned = pinned_policy_digest(store.home)
    _check_new_dir(out)
    with recorder(store.home) as rec, _new_dir(out) as tmp:
        result = audit_version(store, ref, members, sealed, policy, tmp / "work",
                               progress, seed, reference_models, pinned, recipe,
                               reference_dir)
        report = tmp / "work" / "audit"
        _record_audit(rec, result, report)  # first: an unrecorded verdict is not logged
        log_audit(store, result)
        for item in report.iterdir():
            item.rename(tmp / item.name)
        shutil.rmtree(tmp / "work")
    return replace(result, report_dir=out)


def draw_audit_halves(store: ModelStore, ref: VersionRef, members: Path, sealed: Path,
                      policy: Policy, out: Path, seed: int = 0,
                      reference_models: int | None = None) -> Halves:
    """Write the halves of the audit pool on which the vendor trains its reference models
    (registry.audit.halves) to ``out``; keep a copy of halves.json in the home and record
    the draw (``audit_halves_drawn``), so that the assignment cannot be swapped later."""
    from registry.audit.halves import HALVES_FILE, home_copy

    reference_model_count(policy, reference_models)
    check_recorded(store, ref)
    _check_new_dir(out)
    with recorder(store.home) as rec, _new_dir(out) as tmp:
        if not rec.enabled:
            raise BadInput(f"{store.home}: no site identity here; drawing the audit's halves "
                           "is a recorded act (run `passerelle site init NAME` first)")
        work = tmp / ".work"
        try:
            halves = draw_halves(store, ref, members, sealed, policy, work, tmp, seed,
                                 reference_models)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        copy = home_copy(store.home, halves)
        copy.parent.mkdir(parents=True, exist_ok=True)
        staged = copy.with_name(f".{copy.name}.tmp")
        shutil.copyfile(tmp / HALVES_FILE, staged)
        os.replace(staged, copy)
        rec.record(RecordKind.AUDIT_HALVES_DRAWN,
                   subject("model", str(ref), None)
                   + subject("audit-halves", str(ref), halves.digest),
                   {"model": ref.name, "version": ref.version, "seed": halves.seed,
                    "reference_models": halves.count, "assignment_digest": halves.digest,
                    "halves_json_digest": sha256_file(copy),
                    "corpus_digests": list(halves.corpus_digests)})
    return halves


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
                "reference_models": result.reference_models,
                "recipe": result.recipe.name, "recipe_kind": result.recipe.kind.value,
                "recipe_digest": result.recipe.digest})


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
