"""DP-SGD fine-tuning of a received ONNX model on the receiving site's own stays.

:func:`finetune_version` (``passerelle finetune``), its steps numbered:

1. the home must have a site identity (a ledger: every run is recorded); a seed is
   refused outside the test suite; the privacy unit must be one the site's policy
   allows (exit 2); fetch the version's ONNX directory and build the executor;
2. read the site's corpus: every stay needs a patient id and a code the model knows
   (else exit 2; ``drop_unknown_codes`` drops such stays); a patient is held out iff
   ``keyed_fraction(site key, patient id) < heldout_fraction`` (stable when other
   patients come or go); held-out patients never train and are not charged;
3. parity: the executor's logits match onnxruntime on the held-out inputs (<= 1e-4);
4. release the training unit count with Gaussian noise (std ``COUNT_NOISE_STD``); q and
   steps come from that count; delta defaults to, and may not exceed, the site's per-run
   limit for it (exit 2); the noise multiplier is calibrated so that count and DP-SGD
   together stay within (epsilon, delta) by PLD (add/remove-one neighbours);
5. charge the run to the budget of every training patient and record it
   (``finetune_started``) before training (refused, exit 1, beyond the cap);
6. train with DP-SGD (adapters.dp); accuracy before/after on the held-out patients
   (outside the budgeted dataset: exact, labelled as not DP);
7. write the weights back into the same graph, check it in onnxruntime (<= 1e-4);
8. register it as a new version with lineage tags; its ``finetune`` record (outcome
   ``finished``) is appended inside the registration. A run that fails or is
   interrupted after (5) gets a ``finetune`` record with outcome ``failed`` or
   ``interrupted`` and the reason; it stays charged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from adapters.budget import (
    COUNT_NOISE_STD,
    BudgetPolicy,
    Members,
    RunCost,
    Spent,
    group_epsilon,
    members_of,
    own_charges,
    reserve,
    run_epsilon,
)
from adapters.budget_store import check_cap_file, check_store
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
    epsilon_of,
    train_dp_sgd,
)
from adapters.errors import UnknownParameter
from adapters.model_kind import (
    default_trainable,
    encode,
    input_dtype_of,
    input_kind_of,
    refuse_untrainable,
    weight_names,
)
from adapters.new_codes import CodeAddition, check_old_columns, extend_output, read_code_list
from adapters.onnx_tf import OnnxExecutor, load_model
from adapters.randomness import RandomSource, SecureRandom
from passerelle.corpus import read_corpus
from passerelle.digests import sha256_file
from passerelle.errors import BadInput, ParityError, PasserelleError, Refused
from registry.export import PARITY_TOLERANCE, run_onnx
from registry.model_dir import LABELS, VOCABULARY, InputKind
from registry.store import TAG, ModelStore, PrivacyUnit, VersionInfo, VersionRef
from registry.tracking import finetune_metrics
from registry.vocabulary import Vocabulary, select_text
from transfer.acts import subject
from transfer.deploy import sign_local_version
from transfer.pseudonym import keyed_fraction_with, site_key
from transfer.records import RecordKind

if TYPE_CHECKING:
    from transfer.acts import Recorder

TESTING_ENV = "PASSERELLE_TESTING"
ONNX_FILE = "model.onnx"
FINETUNE_CARD = "finetune_card.json"
MODEL_CARD = "model_card.json"
# copied from the source version: where the model came from. Not its audit verdict: that
# was earned by other bytes (the fine-tuned version states its own audit status).
_LINEAGE = ("received_from", "sender_fingerprint", "bundle_digest", "source_model",
            "source_version", "transfer_sequence", "purpose", "legal_basis")


@dataclass(frozen=True)
class FinetuneOptions:
    epsilon: float
    delta: float | None = None  # None: the site's per-run limit for the released count
    privacy_unit: PrivacyUnit = PrivacyUnit.PATIENT
    # None: per model (adapters.model_kind.default_trainable): hidden,logits for the
    # built-in coder, a linear model's coefficients and intercepts, else every weight
    trainable: tuple[str, ...] | None = None
    epochs: int = 10
    expected_batch_size: int = 64
    clip: float = 1.0
    learning_rate: float = 5e-3
    heldout_fraction: float = 0.2
    drop_unknown_codes: bool = False
    add_codes: Path | None = None  # a public CIM-10 code list (adapters.new_codes)
    # Tests only (refused unless PASSERELLE_TESTING=1): seeds TensorFlow; sampling and the
    # Gaussian noise come from the run's ``rng`` (SecureRandom, the OS's CSPRNG, unless a
    # test passes a seeded one). Reproducible noise can be subtracted, which voids
    # the guarantee: such a run is recorded as seeded (not private). None (production):
    # the operating system's entropy.
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
    """The site's stays, encoded for the model, split by a keyed hash of the patient id."""

    inputs: npt.NDArray[Any]  # token ids (int32) or bag of words (float32)
    labels: npt.NDArray[np.int64]
    units: npt.NDArray[np.int64]  # privacy unit index of every training stay
    n_units: int  # exact: never released (the released count is noised)
    heldout_inputs: npt.NDArray[Any]
    heldout_labels: npt.NDArray[np.int64]
    heldout_units: npt.NDArray[np.int64]  # held-out patient index of every held-out stay
    patients: int  # training patients (exact: never released)
    dropped_unknown: int
    members: Members  # keyed tokens of the training patients (the budget's unit)
    max_stays_per_patient: int  # k of group privacy for stay-level runs
    heldout_patients: int


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
    units_released: int  # the noisy unit count that set q (Gaussian, std COUNT_NOISE_STD)
    heldout_stays: int
    heldout_patients: int
    parity_before: float
    parity_after: float
    budget: Spent
    budget_cap: float
    epsilon_patient: float  # this run alone at patient level, at the accounting delta
    group_size: int
    dataset: str
    seeded: bool
    started_record: str
    input_kind: str = InputKind.TOKEN_IDS.value
    codes_added: tuple[str, ...] = ()
    codes_file_digest: str | None = None
    codes_parity: float | None = None  # old columns, before/after the extension


HELDOUT_PURPOSE = "finetune/heldout"
MIN_HELDOUT_PATIENTS = 10
ACCURACY_SCOPE = ("held-out patients (keyed split): never trained on and not charged to "
                  "the budget; exact figures about them, outside the DP guarantee")


def heldout_patients(key: bytes, patient_ids: Collection[str],
                     fraction: float) -> frozenset[str]:
    """The patients held out: keyed_fraction(key, id) < fraction, each on its own."""
    return frozenset(p for p in set(patient_ids)
                     if keyed_fraction_with(key, HELDOUT_PURPOSE, p) < fraction)


def load_site_data(data: Path, vocab: Vocabulary, codes: list[str], unit: PrivacyUnit,
                   heldout_fraction: float, key: bytes, drop_unknown: bool,
                   kind: InputKind = InputKind.TOKEN_IDS,
                   dtype: str | None = None) -> SiteData:
    """Step 2 (``kind``: what the model reads, encoded by the vocabulary's encoders). A
    patient is held out iff keyed_fraction(key, patient id) < fraction: its side never
    moves when other patients are added or removed."""
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
    x = encode(kind, vocab, texts, dtype)
    y = np.asarray([index[s.main_diagnosis] for s in stays], dtype=np.int64)
    pids = [s.patient_id for s in stays]
    held = heldout_patients(key, pids, heldout_fraction)
    train = [i for i, p in enumerate(pids) if p not in held]
    test = [i for i, p in enumerate(pids) if p in held]
    train_patients = sorted({pids[i] for i in train})
    if len(held) < MIN_HELDOUT_PATIENTS or len(train_patients) < 4:
        raise BadInput(f"{data}: {len(held)} held-out and {len(train_patients)} training "
                       f"patients; at least {MIN_HELDOUT_PATIENTS} held-out (accuracy is "
                       "released about them) and 4 training patients are needed "
                       "(--heldout-fraction)")
    if unit is PrivacyUnit.PATIENT:
        ids = {p: k for k, p in enumerate(train_patients)}
        units = np.asarray([ids[pids[i]] for i in train], dtype=np.int64)
    else:
        units = np.arange(len(train), dtype=np.int64)
    held_ids = {p: k for k, p in enumerate(sorted(held))}
    heldout_units = np.asarray([held_ids[pids[i]] for i in test], dtype=np.int64)
    members = members_of(key, [(stays[i].patient_id, stays[i].stay_id,
                                stays[i].identifiers.nir) for i in train])
    per_patient = Counter(pids[i] for i in train)
    return SiteData(x[train], y[train], units, int(units.max()) + 1, x[test], y[test],
                    heldout_units, len(train_patients), len(unknown), members,
                    max(per_patient.values()), len(held))


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


def release_unit_count(units: int, rng: np.random.Generator | None) -> int:
    """The unit count that sets q, released with Gaussian noise (std COUNT_NOISE_STD,
    sensitivity 1 under add/remove-one: the neighbour relation of the whole accounting);
    its cost is composed into the run's epsilon. ``rng`` None: the OS's CSPRNG."""
    noise = (secrets.SystemRandom().gauss(0.0, COUNT_NOISE_STD) if rng is None
             else float(rng.normal(0.0, COUNT_NOISE_STD)))
    return max(2, round(units + noise))


def plan_privacy(site: SiteData, options: FinetuneOptions, released: int | None = None,
                 rng: np.random.Generator | None = None, delta: float | None = None,
                 ) -> tuple[DpSgdPlan, DpSetting, float, float]:
    """q = batch / released count, steps = epochs / q, the noise calibrated so that the
    count and DP-SGD together stay within (epsilon, delta) by PLD; returns the plan, the
    DP-SGD setting and epsilon (count included) by PLD and RDP."""
    released = released if released is not None else release_unit_count(site.n_units, rng)
    delta = delta if delta is not None else (
        options.delta if options.delta is not None else default_delta(released))
    q = min(1.0, options.expected_batch_size / released)
    steps = max(1, math.ceil(options.epochs / q))
    z = calibrate_noise(options.epsilon, delta, q, steps)

    def cost(zz: float) -> RunCost:
        return RunCost("patient", 1, q, zz, steps, delta, COUNT_NOISE_STD)

    z = _with_count(z, lambda zz: run_epsilon(cost(zz), delta), options.epsilon)
    setting = DpSetting(q, z, steps, delta)
    plan = DpSgdPlan(site.n_units, q * released, q, steps, z, options.clip)
    event = cost(z).event()
    return (plan, setting, epsilon_of([event], delta, Accountant.PLD),
            epsilon_of([event], delta, Accountant.RDP))


def _with_count(z: float, eps: Callable[[float], float], target: float) -> float:
    """The smallest noise (to 0.1 %) >= ``z`` at which DP-SGD and the noisy count together
    are within ``target`` (a valid upper end is always returned, never a lower one)."""
    if eps(z) <= target:
        return z
    lo, hi = z, z * 1.01
    for _ in range(60):
        if eps(hi) <= target:
            break
        lo, hi = hi, hi * 1.1
    else:
        raise BadInput(f"cannot reach epsilon {target} with the noisy count")
    while hi - lo > 1e-3 * lo:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


def run_dp_sgd(executor: OnnxExecutor, output: str, site: SiteData, plan: DpSgdPlan,
               learning_rate: float, rng: RandomSource,
               progress: Progress | None = None, noise_seed: int | None = None) -> DpSgd:
    """Train the executor's trainable weights with DP-SGD (Adam on the noisy gradient).

    ``rng`` draws the Poisson sampling and the Gaussian noise (SecureRandom outside
    tests); ``noise_seed`` only seeds TensorFlow (see FinetuneOptions.noise_seed).
    Weights that stop being finite (overflow, NaN loss) end the run with
    :class:`TrainingFailed`."""
    import tensorflow as tf

    if noise_seed is not None:
        tf.random.set_seed(noise_seed)
    try:
        sgd = DpSgd(executor, executor.input_names[0], output, plan.clip,
                    plan.noise_multiplier, tf.keras.optimizers.Adam(learning_rate), rng=rng)

        def watched(phase: str, done: int, total: int) -> None:
            _check_finite(sgd, done)
            if progress is not None:
                progress(phase, done, total)

        train_dp_sgd(sgd, plan, site.inputs, site.labels, site.units.tolist(), rng, watched)
    except (tf.errors.OpError, ValueError, ArithmeticError) as e:
        raise TrainingFailed(f"DP-SGD failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
    _check_finite(sgd, plan.steps)
    return sgd


class TrainingFailed(Refused):
    """Training diverged or raised: the run stays charged and is recorded as failed."""


def _check_finite(sgd: DpSgd, step: int) -> None:
    for v in sgd.variables:
        if not np.all(np.isfinite(v.numpy())):
            raise TrainingFailed(f"DP-SGD diverged: weight {v.name} is not finite after "
                                 f"step {step} (check --clip and --learning-rate)")


def _check_seed(options: FinetuneOptions, rng: np.random.Generator | None) -> bool:
    seeded = options.noise_seed is not None or rng is not None
    if seeded and os.environ.get(TESTING_ENV) != "1":
        raise BadInput("a seed makes the noise reproducible, which voids the privacy "
                       f"guarantee: --seed is for the test suite only ({TESTING_ENV}=1)")
    return seeded


@dataclass(frozen=True)
class PreparedModel:
    """Steps 1-3: the model as it will train, and the site's stays encoded for it."""

    src: Path  # the received version's ONNX directory
    executor: OnnxExecutor
    output: str
    site: SiteData
    model_bytes: bytes  # the graph that trains (with the added codes' columns, if any)
    parity_before: float
    trainable: tuple[str, ...]
    kind: InputKind
    codes: tuple[str, ...]  # the label table, added codes last
    addition: CodeAddition | None
    codes_parity: float | None

    def facts(self) -> dict[str, Any]:
        """What the ledger records about the model's preparation."""
        doc: dict[str, Any] = {"trainable": list(self.trainable),
                               "input_kind": self.kind.value}
        if self.addition is not None:
            doc |= {"codes_added": list(self.addition.codes),
                    "codes_file_digest": self.addition.file_digest,
                    "codes_source": CODES_SOURCE, "labels_count": len(self.codes)}
        return doc


CODES_SOURCE = "public CIM-10 table (passerelle.corpus.codes), not the site's data"


def prepare_model(src: Path, data: Path, options: FinetuneOptions,
                  key: bytes) -> PreparedModel:
    """(1) refuse tree ensembles and weightless graphs, extend the output layer with
    ``--add-codes``, build the executor on the per-model trainable weights; (2) read the
    site's stays in the model's input kind; (3) parity: old columns unchanged by the
    extension, executor against onnxruntime. Every refusal here is before any charge."""
    original = load_model(src / ONNX_FILE)
    refuse_untrainable(original)
    vocab = Vocabulary.load(src / VOCABULARY)
    kind = input_kind_of(original, vocab, src / MODEL_CARD)
    dtype = input_dtype_of(original, src / MODEL_CARD)
    codes = tuple(_codes(src / LABELS))
    addition = (read_code_list(options.add_codes, codes)
                if options.add_codes is not None else None)
    proto = (extend_output(original, len(codes), len(addition.codes))
             if addition is not None else original)
    codes = codes + (addition.codes if addition is not None else ())
    trainable = tuple(_names(options.trainable)) if options.trainable is not None \
        else default_trainable(proto)
    try:
        executor = OnnxExecutor.from_model(proto, trainable=list(trainable))
    except UnknownParameter as e:
        raise UnknownParameter(f"--trainable: {e}; its weights are "
                               f"{', '.join(weight_names(proto))}") from e
    if addition is not None:
        _check_output_trains(executor, len(codes))
    output = "logits" if "logits" in executor.output_names else executor.output_names[0]
    site = load_site_data(data, vocab, list(codes), options.privacy_unit,
                          options.heldout_fraction, key, options.drop_unknown_codes, kind,
                          dtype)
    model_bytes = proto.SerializeToString()
    codes_parity = None
    if addition is not None:
        codes_parity = check_old_columns(run_onnx(original.SerializeToString(),
                                                  site.heldout_inputs),
                                         run_onnx(model_bytes, site.heldout_inputs),
                                         len(addition.codes), PARITY_TOLERANCE)
    parity = check_executor_parity(executor, model_bytes, site.heldout_inputs, output)
    return PreparedModel(src, executor, output, site, model_bytes, parity, trainable, kind,
                         codes, addition, codes_parity)


def _check_output_trains(executor: OnnxExecutor, n_codes: int) -> None:
    """New codes start at zero weights: the output layer's weights (those with a dimension
    of the new code count) must train."""
    frozen = [p.name for p in executor.parameters
              if not p.trainable and n_codes in p.shape]
    if frozen:
        raise BadInput(f"--add-codes: the new codes' weights ({', '.join(frozen)}) would "
                       "not train; name the output layer in --trainable")


def write_labels(src: Path, dst: Path, addition: CodeAddition | None) -> None:
    """The label table shipped with the new version: the old one, added codes last."""
    if addition is None:
        shutil.copyfile(src, dst)
        return
    try:
        doc = json.loads(src.read_text(encoding="utf-8"))
        codes, labels = list(doc["codes"]), dict(doc["labels"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{src}: unreadable labels: {e}") from e
    codes += list(addition.codes)
    labels |= dict(zip(addition.codes, addition.labels, strict=True))
    dst.write_text(json.dumps({**doc, "codes": codes, "labels": labels},
                              ensure_ascii=False, indent=1) + "\n")


def finetune_version(store: ModelStore, ref: VersionRef, data: Path,
                     options: FinetuneOptions, rec: Recorder,
                     rng: np.random.Generator | None = None,
                     progress: Progress | None = None) -> FinetuneResult:
    """Steps 1-8 of the module docstring; every act recorded through ``rec``."""
    home = store.home
    if not rec.enabled:
        raise BadInput(f"{home}: fine-tuning needs the site's identity, so that the run is "
                       "charged and recorded in its ledger (run `passerelle site init NAME`)")
    seeded = _check_seed(options, rng)  # (1)
    policy = BudgetPolicy.of_site(home)
    policy.check_unit(options.privacy_unit.value)
    check_cap_file(home)
    check_store(home, own_charges(home))  # a store that disagrees: refused before any work
    key = site_key(home)
    info = store.get(ref)
    with tempfile.TemporaryDirectory(prefix=".passerelle-finetune-", dir=home) as tmp:
        work = Path(tmp)
        src = store.download(info, "onnx", work / "src")
        model = prepare_model(src, data, options, key)  # (1), (2), (3)
        executor, output, site = model.executor, model.output, model.site
        parity_before = model.parity_before
        released = release_unit_count(site.n_units, rng)  # (4)
        delta = options.delta if options.delta is not None else policy.delta_max(released)
        policy.check_delta(delta, released)
        plan, _, eps_pld, eps_rdp = plan_privacy(site, options, released, delta=delta)
        k = 1 if options.privacy_unit is PrivacyUnit.PATIENT else site.max_stays_per_patient
        cost = RunCost(options.privacy_unit.value, k, plan.sampling_rate,
                       plan.noise_multiplier, plan.steps, delta, COUNT_NOISE_STD)
        eps_patient = group_epsilon(cost, policy.accounting_delta)
        started, spent = reserve(home, policy, cost, site.members,  # (5)
                                 lambda charge, sp: rec.record(
                                     RecordKind.FINETUNE_STARTED,
                                     subject("onnx", str(ref),
                                             info.tags.get(TAG + "onnx_digest")),
                                     _started_fields(ref, options, model, charge, sp,
                                                     policy, eps_pld, eps_rdp,
                                                     eps_patient, released, seeded)))
        base = {"model": ref.name, "source_version": ref.version,
                "started_record": str(started.id), "dataset": site.members.dataset,
                "privacy_unit": options.privacy_unit.value, "epsilon": eps_pld,
                "accountant": "PLD", "epsilon_rdp": eps_rdp, "delta": delta,
                "epsilon_patient": eps_patient, "group_size": k,
                "accounting_delta": policy.accounting_delta,
                "noise_multiplier": plan.noise_multiplier,
                "sampling_rate": plan.sampling_rate, "steps": plan.steps,
                "clip": options.clip, "units_released": released,
                "budget_spent": spent.epsilon, "budget_cap": policy.epsilon_cap,
                "seeded": seeded, "private": not seeded, **model.facts()}
        try:
            result, out = _train_and_write(  # (6), (7)
                executor, output, site, plan, options, rng, progress, model, work,
                info, ref, FinetuneFacts(eps_pld, eps_rdp, delta, released, spent,
                                              policy.epsilon_cap, eps_patient, k,
                                              parity_before, seeded, str(started.id)))
            tags = _tags(info, result, sha256_file(out / ONNX_FILE))

            def on_registered(version: VersionInfo) -> None:  # (8) the finished record
                onnx_digest = version.tags.get(TAG + "onnx_digest")
                finished = rec.record(RecordKind.FINETUNE,
                           subject("onnx", str(version.ref), onnx_digest)
                           + subject("dataset", str(data.name), None),
                           {**base, "outcome": "finished", "version": version.ref.version,
                            "onnx_digest": onnx_digest, "trainable": list(model.trainable),
                            "accuracy_before": result.accuracy_before,
                            "accuracy_after": result.accuracy_after,
                            "accuracy_scope": ACCURACY_SCOPE})
                sign_local_version(store, version, rec, finished)  # Y signs what it makes

            # registration of the fine-tuned version
            version = store.register_received(out, ref.name, tags, on_registered,
                                              metrics=finetune_metrics(result))
        except KeyboardInterrupt:
            _record_end(rec, base, "interrupted", "interrupted (Ctrl-C)")
            raise
        except BaseException as e:
            _record_end(rec, base, "failed", f"{type(e).__name__}: {e}")
            raise
    return FinetuneResult(**{**result.__dict__, "version": version})


@dataclass(frozen=True)
class FinetuneFacts:
    """What is known about a run before it trains."""

    epsilon_pld: float
    epsilon_rdp: float
    delta: float
    released: int
    spent: Spent
    cap: float
    epsilon_patient: float
    group_size: int
    parity_before: float
    seeded: bool
    started_record: str


def _train_and_write(executor: OnnxExecutor, output: str, site: SiteData, plan: DpSgdPlan,
                     options: FinetuneOptions, rng: np.random.Generator | None,
                     progress: Progress | None, model: PreparedModel, work: Path,
                     info: VersionInfo, ref: VersionRef, facts: FinetuneFacts,
                     ) -> tuple[FinetuneResult, Path]:
    before = accuracy(logits_of(executor, site.heldout_inputs, output), site.heldout_labels)
    run_dp_sgd(executor, output, site, plan, options.learning_rate,
               rng if rng is not None else SecureRandom(), progress, options.noise_seed)
    after = accuracy(logits_of(executor, site.heldout_inputs, output), site.heldout_labels)
    out = work / "out"
    out.mkdir()
    new_bytes = executor.to_model().SerializeToString()
    (out / ONNX_FILE).write_bytes(new_bytes)
    parity_after = check_executor_parity(executor, new_bytes, site.heldout_inputs, output)
    shutil.copyfile(model.src / VOCABULARY, out / VOCABULARY)
    write_labels(model.src / LABELS, out / LABELS, model.addition)
    result = FinetuneResult(
        version=info, source=ref, epsilon_pld=facts.epsilon_pld,
        epsilon_rdp=facts.epsilon_rdp, delta=facts.delta,
        noise_multiplier=plan.noise_multiplier, sampling_rate=plan.sampling_rate,
        steps=plan.steps, clip=options.clip, privacy_unit=options.privacy_unit.value,
        trainable=model.trainable, accuracy_before=before, accuracy_after=after,
        units_released=facts.released, heldout_stays=len(site.heldout_labels),
        heldout_patients=site.heldout_patients, parity_before=facts.parity_before,
        parity_after=parity_after, budget=facts.spent, budget_cap=facts.cap,
        epsilon_patient=facts.epsilon_patient, group_size=facts.group_size,
        dataset=site.members.dataset, seeded=facts.seeded,
        started_record=facts.started_record, input_kind=model.kind.value,
        codes_added=model.addition.codes if model.addition else (),
        codes_file_digest=model.addition.file_digest if model.addition else None,
        codes_parity=model.codes_parity)
    (out / FINETUNE_CARD).write_text(json.dumps(card(result), indent=1, sort_keys=True,
                                                default=str) + "\n")
    return result, out


def _started_fields(ref: VersionRef, options: FinetuneOptions, model: PreparedModel,
                    charge: dict[str, Any], spent: Spent, policy: BudgetPolicy,
                    eps_pld: float, eps_rdp: float, eps_patient: float, released: int,
                    seeded: bool) -> dict[str, Any]:
    return {"model": ref.name, "source_version": ref.version, "charge": charge,
            "dataset": charge["dataset"], "privacy_unit": options.privacy_unit.value,
            "epsilon": eps_pld, "accountant": "PLD", "epsilon_rdp": eps_rdp,
            "delta": charge["delta"], "epsilon_patient": eps_patient,
            "accounting_delta": policy.accounting_delta,
            "noise_multiplier": charge["noise_multiplier"],
            "sampling_rate": charge["sampling_rate"], "steps": charge["steps"],
            "clip": options.clip, "learning_rate": options.learning_rate,
            "epochs": options.epochs, "expected_batch_size": options.expected_batch_size,
            "units_released": released,
            "count_noise_std": COUNT_NOISE_STD, "budget_spent": spent.epsilon,
            "budget_delta_sum": spent.delta_sum, "budget_runs": spent.runs,
            "budget_cap": policy.epsilon_cap, "shared_runs": list(spent.shared),
            "seeded": seeded, "private": not seeded, **model.facts()}


def _record_end(rec: Recorder, base: dict[str, Any], outcome: str, reason: str) -> None:
    """The end of a run that did not finish; a ledger that fails now does not hide the
    original error (the charge is recorded already)."""
    with contextlib.suppress(PasserelleError):
        rec.record(RecordKind.FINETUNE, [],
                   {**base, "outcome": outcome, "reason": " ".join(reason.split())[:2000]})


def card(result: FinetuneResult) -> dict[str, Any]:
    doc = {k: v for k, v in asdict(result).items() if k not in ("version", "budget")}
    doc["source"] = str(result.source)
    doc["budget"] = {"epsilon_spent": result.budget.epsilon, "runs": result.budget.runs,
                     "delta_sum": result.budget.delta_sum,
                     "accounting_delta": result.budget.accounting_delta,
                     "shared_runs": list(result.budget.shared)}
    doc["accuracy_scope"] = ACCURACY_SCOPE
    doc["units_released_noise"] = (f"Gaussian, std {COUNT_NOISE_STD:g}, composed into "
                                   "epsilon (add/remove-one neighbours)")
    doc["composition"] = ("budget per patient: every run sharing a keyed patient token is "
                          "composed (PLD, patient level; stay-level runs by group privacy) "
                          "at the site's accounting delta")
    return doc


def _tags(info: VersionInfo, r: FinetuneResult, onnx_digest: str) -> dict[str, str]:
    tags = {TAG + k: info.tags[TAG + k] for k in _LINEAGE if TAG + k in info.tags}
    f = TAG + "finetune."
    tags |= {
        TAG + "finetuned_from": str(r.source),
        TAG + "source_audit_verdict": info.tags.get(TAG + "audit_verdict", "none"),
        TAG + "audit.status": "not-audited",
        TAG + "source_onnx_digest": info.tags.get(TAG + "onnx_digest", ""),
        TAG + "onnx_digest": onnx_digest,
        TAG + "privacy_unit": r.privacy_unit,
        TAG + "dataset_fingerprint": r.dataset,
        f + "epsilon_pld": f"{_up(r.epsilon_pld)}",
        f + "epsilon_rdp": f"{_up(r.epsilon_rdp)}",
        f + "epsilon_patient": f"{_up(r.epsilon_patient)}",
        f + "delta": f"{r.delta:.6g}",
        f + "noise_multiplier": f"{r.noise_multiplier:.6g}",
        f + "clip": f"{r.clip:g}",
        f + "sampling_rate": f"{r.sampling_rate:.6g}",
        f + "steps": str(r.steps),
        f + "privacy_unit": r.privacy_unit,
        f + "group_size": str(r.group_size),
        f + "trainable": ",".join(r.trainable),
        f + "accuracy_before": f"{r.accuracy_before:.4f}",
        f + "accuracy_after": f"{r.accuracy_after:.4f}",
        f + "accuracy_scope": "heldout-outside-budget-not-dp",
        f + "heldout_stays": str(r.heldout_stays),
        f + "units_released": str(r.units_released),
        f + "units_released_noise_std": f"{COUNT_NOISE_STD:g}",
        f + "budget_spent_epsilon": f"{_up(r.budget.epsilon)}",
        f + "budget_cap": f"{r.budget_cap:g}",
        f + "seeded": "true" if r.seeded else "false",
        f + "private": "false" if r.seeded else "true",
        f + "started_record": r.started_record,
        f + "parity_max_abs_diff": f"{r.parity_after:.3g}",
        f + "input_kind": r.input_kind,
    }
    if r.codes_added:  # the label table grew: the lineage says by which public codes
        tags |= {f + "codes_added": ",".join(r.codes_added),
                 f + "codes_file_digest": r.codes_file_digest or "",
                 f + "codes_source": "cim10-public-table",
                 f + "codes_parity_old_columns": f"{r.codes_parity:.3g}"}
    return tags


def _up(value: float) -> str:
    """A privacy figure to 6 significant digits, rounded up (never in the user's favour)."""
    if not math.isfinite(value) or value <= 0:
        return f"{value:g}"
    step = 10.0 ** (math.floor(math.log10(value)) - 5)
    return f"{math.ceil(value / step) * step:.6g}"


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
