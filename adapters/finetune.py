"""DP-SGD fine-tuning of an ONNX model on a site's stays: the parts that need no registry.

The steps of a run (read the site's stays, parity, the noisy unit count, the plan, DP-SGD,
the label table) live here; :mod:`passerelle.finetuning` composes them with the site's
registry, budget and ledger into ``passerelle finetune`` (its steps numbered there).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from adapters.budget import (
    COUNT_NOISE_STD,
    Members,
    RunCost,
    members_of,
    run_epsilon,
)
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
from adapters.onnx_run import PARITY_TOLERANCE, run_onnx
from adapters.onnx_tf import OnnxExecutor, load_model
from adapters.randomness import RandomSource
from passerelle.contract import CARD_FILE, LABELS, ONNX_FILE, VOCABULARY, InputKind, PrivacyUnit
from passerelle.corpus import read_corpus
from passerelle.errors import BadInput, ParityError, Refused
from passerelle.vocabulary import Vocabulary, select_text
from transfer.pseudonym import keyed_fraction_with

TESTING_ENV = "PASSERELLE_TESTING"


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


def check_seed(options: FinetuneOptions, rng: np.random.Generator | None) -> bool:
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
    kind = input_kind_of(original, vocab, src / CARD_FILE)
    dtype = input_dtype_of(original, src / CARD_FILE)
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
