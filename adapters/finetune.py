"""DP-SGD fine-tuning of a received ONNX model on the receiving site's own stays.

:func:`finetune_version` (``passerelle finetune``), its steps numbered:

1. check epsilon and delta; fetch the version's ONNX directory from the registry and
   build the executor (unsupported graphs refused, exit 2) with the trainable layers;
2. read the site's corpus: every stay needs a patient id and a code the model knows
   (else refused, exit 2; ``drop_unknown_codes`` drops such stays and counts them);
   held-out patients (``heldout_fraction``) are split off by patient and never train;
3. parity: the executor's logits match onnxruntime on the held-out inputs (≤ 1e-4);
4. calibrate the noise multiplier to (epsilon, delta) for (q, steps) with the PLD
   accountant, report epsilon by PLD and RDP;
5. reserve the run in the site's privacy budget (refused, exit 1, before training);
6. train with DP-SGD (adapters.dp), accuracy before/after on the held-out patients;
7. write the weights back into the same graph, check the new file in onnxruntime
   against the executor (≤ 1e-4), register it as a new version with lineage tags.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from adapters.budget import PrivacyBudget, Spent, site_cap
from adapters.dp import (
    Accountant,
    DpSetting,
    DpSgd,
    DpSgdPlan,
    Progress,
    calibrate_noise,
    check_delta,
    check_epsilon,
    default_delta,
    epsilon,
    train_dp_sgd,
)
from adapters.onnx_tf import OnnxExecutor, load_model
from passerelle.corpus import manifest_digest, read_corpus
from passerelle.digests import sha256_file
from passerelle.errors import BadInput, ParityError
from registry.export import PARITY_TOLERANCE, run_onnx
from registry.model_dir import LABELS, VOCABULARY
from registry.store import TAG, ModelStore, PrivacyUnit, VersionInfo, VersionRef
from registry.tracking import finetune_metrics
from registry.vocabulary import Vocabulary, select_text

ONNX_FILE = "model.onnx"
FINETUNE_CARD = "finetune_card.json"
DEFAULT_TRAINABLE = ("hidden", "logits")
# copied from the source version: where the model came from
_LINEAGE = ("received_from", "sender_fingerprint", "bundle_digest", "source_model",
            "source_version", "transfer_sequence", "audit_verdict", "purpose", "legal_basis")


@dataclass(frozen=True)
class FinetuneOptions:
    epsilon: float
    delta: float | None = None  # None: default_delta(units)
    privacy_unit: PrivacyUnit = PrivacyUnit.PATIENT
    trainable: tuple[str, ...] = DEFAULT_TRAINABLE
    epochs: int = 10
    expected_batch_size: int = 64
    clip: float = 1.0
    learning_rate: float = 5e-3
    heldout_fraction: float = 0.2
    split_seed: int = 0
    budget_cap: float | None = None  # None: the site's configured cap
    drop_unknown_codes: bool = False
    # Tests only. None (production): TensorFlow draws the Gaussian noise with op seeds
    # from the operating system's entropy; a fixed seed makes the noise reproducible,
    # and reproducible noise can be subtracted, which voids the privacy guarantee.
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon)
        if self.delta is not None:
            check_delta(self.delta)
        if not self.clip > 0 or not self.learning_rate > 0:
            raise BadInput("clip and learning rate must be positive")
        if not 0 < self.heldout_fraction < 1:
            raise BadInput("held-out fraction must be in (0, 1)")


@dataclass(frozen=True)
class SiteData:
    """The site's stays, encoded for the model, split by patient."""

    inputs: npt.NDArray[np.int32]
    labels: npt.NDArray[np.int64]
    units: npt.NDArray[np.int64]  # privacy unit index of every training stay
    n_units: int
    heldout_inputs: npt.NDArray[np.int32]
    heldout_labels: npt.NDArray[np.int64]
    heldout_units: npt.NDArray[np.int64]  # held-out patient index of every held-out stay
    patients: int  # training patients
    dropped_unknown: int


@dataclass(frozen=True)
class FinetuneResult:
    version: VersionInfo
    source: VersionRef
    epsilon_pld: float
    epsilon_rdp: float
    delta: float
    noise_multiplier: float
    sampling_rate: float
    steps: int
    clip: float
    privacy_unit: str
    trainable: tuple[str, ...]
    accuracy_before: float
    accuracy_after: float
    train_stays: int
    train_units: int
    heldout_stays: int
    dropped_unknown: int
    parity_before: float
    parity_after: float
    budget: Spent
    budget_cap: float
    dataset: str


def load_site_data(data: Path, vocab: Vocabulary, codes: list[str], unit: PrivacyUnit,
                   heldout_fraction: float, seed: int, drop_unknown: bool) -> SiteData:
    """Step 2."""
    corpus = read_corpus(data)
    stays = list(corpus.stays)
    if any(not s.patient_id or not s.patient_id.strip() for s in stays):
        raise BadInput(f"{data}: some stays have no patient id (the privacy unit)")
    index = {c: i for i, c in enumerate(codes)}
    unknown = [s for s in stays if s.main_diagnosis not in index]
    if unknown and not drop_unknown:
        raise BadInput(f"{data}: {len(unknown)} of {len(stays)} stays have codes the model "
                       "does not know (e.g. "
                       f"{sorted({s.main_diagnosis for s in unknown})[:3]}); "
                       "--drop-unknown-codes drops them")
    stays = [s for s in stays if s.main_diagnosis in index]
    if not stays:
        raise BadInput(f"{data}: no stay left to train on")
    texts = [select_text(s.sections.as_dict(), vocab.config.sections) for s in stays]
    x = vocab.encode(texts)
    y = np.asarray([index[s.main_diagnosis] for s in stays], dtype=np.int64)
    pids = [s.patient_id for s in stays]
    patients = sorted(set(pids))
    if len(patients) < 4:
        raise BadInput(f"{data}: too few patients for a held-out split and DP-SGD")
    rng = np.random.default_rng(seed)
    held = {patients[i] for i in rng.permutation(len(patients))[
        :max(1, round(len(patients) * heldout_fraction))]}
    train = [i for i, p in enumerate(pids) if p not in held]
    test = [i for i, p in enumerate(pids) if p in held]
    if unit is PrivacyUnit.PATIENT:
        ids = {p: k for k, p in enumerate(sorted({pids[i] for i in train}))}
        units = np.asarray([ids[pids[i]] for i in train], dtype=np.int64)
    else:
        units = np.arange(len(train), dtype=np.int64)
    held_ids = {p: k for k, p in enumerate(sorted(held))}
    heldout_units = np.asarray([held_ids[pids[i]] for i in test], dtype=np.int64)
    return SiteData(x[train], y[train], units, int(units.max()) + 1, x[test], y[test],
                    heldout_units, len({pids[i] for i in train}), len(unknown))


def logits_of(executor: OnnxExecutor, x: npt.NDArray[Any], output: str,
              batch: int = 512) -> npt.NDArray[np.float32]:
    name = executor.input_names[0]
    parts = [np.asarray(executor({name: x[i:i + batch]}, [output])[output])
             for i in range(0, len(x), batch)]
    out: npt.NDArray[np.float32] = np.concatenate(parts).astype(np.float32)
    return out


def accuracy(logits: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> float:
    return float(np.mean(logits.argmax(axis=1) == labels))


def check_executor_parity(executor: OnnxExecutor, model_bytes: bytes,
                          x: npt.NDArray[Any], output: str) -> float:
    """Max |logit difference| executor vs onnxruntime, or ParityError above 1e-4."""
    ours = logits_of(executor, x, output)
    ort = run_onnx(model_bytes, x)
    diff = float(np.max(np.abs(ours.astype(np.float64) - ort)))
    if not diff <= PARITY_TOLERANCE:
        raise ParityError(f"executor and onnxruntime differ by {diff:.2e} "
                          f"(limit {PARITY_TOLERANCE:g})")
    return diff


def plan_privacy(site: SiteData, options: FinetuneOptions
                 ) -> tuple[DpSgdPlan, DpSetting, float, float]:
    """Sampling rate and steps from the options, noise calibrated to (epsilon, delta) by
    PLD; returns the plan, the accountant's setting and epsilon by PLD and RDP."""
    delta = options.delta if options.delta is not None else default_delta(site.n_units)
    plan0 = DpSgdPlan.make(site.n_units, options.expected_batch_size, options.epochs,
                           options.clip, 1.0)
    z = calibrate_noise(options.epsilon, delta, plan0.sampling_rate, plan0.steps)
    setting = DpSetting(plan0.sampling_rate, z, plan0.steps, delta)
    plan = DpSgdPlan(plan0.units, plan0.expected_batch_size, plan0.sampling_rate,
                     plan0.steps, z, options.clip)
    return plan, setting, epsilon(setting, Accountant.PLD), epsilon(setting, Accountant.RDP)


def run_dp_sgd(executor: OnnxExecutor, output: str, site: SiteData, plan: DpSgdPlan,
               learning_rate: float, rng: np.random.Generator,
               progress: Progress | None = None, noise_seed: int | None = None) -> DpSgd:
    """Train the executor's trainable weights with DP-SGD (Adam on the noisy gradient).

    ``noise_seed`` None leaves TensorFlow's seeds to the operating system's entropy (the
    only safe choice outside tests: see FinetuneOptions.noise_seed)."""
    import tensorflow as tf

    if noise_seed is not None:
        tf.random.set_seed(noise_seed)
    sgd = DpSgd(executor, executor.input_names[0], output, plan.clip, plan.noise_multiplier,
                tf.keras.optimizers.Adam(learning_rate))
    train_dp_sgd(sgd, plan, site.inputs, site.labels, site.units.tolist(), rng, progress)
    return sgd


def finetune_version(store: ModelStore, ref: VersionRef, data: Path,
                     options: FinetuneOptions, rng: np.random.Generator | None = None,
                     progress: Progress | None = None,
                     on_registered: Callable[[VersionInfo, FinetuneResult], None] | None = None,
                     ) -> FinetuneResult:
    """Steps 1-7 of the module docstring. ``on_registered(version, result)`` runs inside
    the registration (the ledger records the run there); if it fails, the new version is
    taken back."""
    rng = rng or np.random.default_rng()
    home = store.home
    info = store.get(ref)  # (1)
    with tempfile.TemporaryDirectory(prefix=".passerelle-finetune-", dir=home) as tmp:
        work = Path(tmp)
        src = store.download(info, "onnx", work / "src")
        proto = load_model(src / ONNX_FILE)
        executor = OnnxExecutor.from_model(proto, trainable=_names(options.trainable))
        output = "logits" if "logits" in executor.output_names else executor.output_names[0]
        vocab = Vocabulary.load(src / VOCABULARY)
        codes = _codes(src / LABELS)
        site = load_site_data(data, vocab, codes, options.privacy_unit,  # (2)
                              options.heldout_fraction, options.split_seed,
                              options.drop_unknown_codes)
        model_bytes = (src / ONNX_FILE).read_bytes()
        parity_before = check_executor_parity(executor, model_bytes,  # (3)
                                              site.heldout_inputs, output)
        plan, setting, eps_pld, eps_rdp = plan_privacy(site, options)  # (4)
        z, delta = plan.noise_multiplier, setting.delta
        dataset = manifest_digest(data)
        cap = options.budget_cap if options.budget_cap is not None else site_cap(home)
        spent = PrivacyBudget(home).reserve(dataset, setting, eps_pld, eps_rdp, cap,  # (5)
                                            f"finetune {ref}")
        before = accuracy(logits_of(executor, site.heldout_inputs, output),
                          site.heldout_labels)  # (6)
        run_dp_sgd(executor, output, site, plan, options.learning_rate, rng, progress,
                   options.noise_seed)
        after = accuracy(logits_of(executor, site.heldout_inputs, output),
                         site.heldout_labels)
        out = work / "out"  # (7)
        out.mkdir()
        new_bytes = executor.to_model().SerializeToString()
        (out / ONNX_FILE).write_bytes(new_bytes)
        parity_after = check_executor_parity(executor, new_bytes, site.heldout_inputs, output)
        for name in (VOCABULARY, LABELS):
            shutil.copyfile(src / name, out / name)
        result = FinetuneResult(
            version=info, source=ref, epsilon_pld=eps_pld, epsilon_rdp=eps_rdp, delta=delta,
            noise_multiplier=z, sampling_rate=plan.sampling_rate, steps=plan.steps,
            clip=options.clip, privacy_unit=options.privacy_unit.value,
            trainable=options.trainable, accuracy_before=before, accuracy_after=after,
            train_stays=len(site.labels), train_units=site.n_units,
            heldout_stays=len(site.heldout_labels), dropped_unknown=site.dropped_unknown,
            parity_before=parity_before, parity_after=parity_after, budget=spent,
            budget_cap=cap, dataset=dataset)
        (out / FINETUNE_CARD).write_text(json.dumps(card(result), indent=1, sort_keys=True,
                                                    default=str) + "\n")
        tags = _tags(info, result, sha256_file(out / ONNX_FILE))
        version = store.register_received(
            out, ref.name, tags,
            None if on_registered is None else (lambda v: on_registered(v, result)),
            metrics=finetune_metrics(result))
    return FinetuneResult(**{**result.__dict__, "version": version})


def card(result: FinetuneResult) -> dict[str, Any]:
    doc = {k: v for k, v in asdict(result).items() if k != "version"}
    doc["source"] = str(result.source)
    doc["composition"] = ("epsilons of runs on one dataset compose: spent = min(sum of "
                          "epsilons, PLD accountant over all runs) at the sum of deltas")
    return doc


def _tags(info: VersionInfo, r: FinetuneResult, onnx_digest: str) -> dict[str, str]:
    tags = {TAG + k: info.tags[TAG + k] for k in _LINEAGE if TAG + k in info.tags}
    f = TAG + "finetune."
    tags |= {
        TAG + "finetuned_from": str(r.source),
        TAG + "source_onnx_digest": info.tags.get(TAG + "onnx_digest", ""),
        TAG + "onnx_digest": onnx_digest,
        TAG + "privacy_unit": r.privacy_unit,
        TAG + "dataset_fingerprint": r.dataset,
        f + "epsilon_pld": f"{r.epsilon_pld:.6g}",
        f + "epsilon_rdp": f"{r.epsilon_rdp:.6g}",
        f + "delta": f"{r.delta:.6g}",
        f + "noise_multiplier": f"{r.noise_multiplier:.6g}",
        f + "clip": f"{r.clip:g}",
        f + "sampling_rate": f"{r.sampling_rate:.6g}",
        f + "steps": str(r.steps),
        f + "privacy_unit": r.privacy_unit,
        f + "trainable": ",".join(r.trainable),
        f + "accuracy_before": f"{r.accuracy_before:.4f}",
        f + "accuracy_after": f"{r.accuracy_after:.4f}",
        f + "heldout_stays": str(r.heldout_stays),
        f + "train_units": str(r.train_units),
        f + "dropped_unknown_codes": str(r.dropped_unknown),
        f + "budget_spent_epsilon": f"{r.budget.epsilon:.6g}",
        f + "budget_cap": f"{r.budget_cap:g}",
        f + "parity_max_abs_diff": f"{r.parity_after:.3g}",
    }
    return tags


def _codes(path: Path) -> list[str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return [str(c) for c in doc["codes"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: unreadable labels: {e}") from e


def _names(trainable: Collection[str]) -> list[str]:
    names = [t for t in trainable if t]
    if not names:
        raise BadInput("--trainable names no layer")
    return names
