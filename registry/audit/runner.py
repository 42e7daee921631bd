"""The memorisation audit of one model version, on the ONNX bytes that would ship.

Steps (``audit_version``):

1. the policy and the corpora: ``members_dir`` must be the training corpus (same
   fingerprint as the version's provenance) and ``sealed_dir`` the corpus the site
   sealed it from (registry.audit.reserve): the reserve is drawn again with the site's
   key and checked against its commitment in the ledger;
2. the declared split must reproduce: the training and held-out patients rebuilt from
   the recipe's seed and fraction have the counts the model directory records, and its
   parity inputs are the encoding of the first rebuilt held-out stays;
3. non-members: the sealed reserve and the declared held-out patients; a share of the
   reserve (``population_share``) is set aside as RMIA's population, scored by no
   attack and trained on by no reference model;
4. the shippable ONNX directory (registry.export.shippable);
5. reference models: the model's recipe (registry.audit.recipe) on random halves, by
   patient, of the audit pool, each for as many gradient steps as the target took;
6. p(true code) of every pool and population stay under the ONNX model and every
   reference model; top-1 accuracy on training, held-out and reserve patients;
   the reference models must reproduce the target's fit (attacks.reference_fit_shift:
   the target's members against the models IN on them, its non-members against the
   models OUT, within the policy's ``max_reference_shift``), else the attacks are blunt;
7. the four attacks, per patient when the privacy unit is the patient (LiRA summed over
   the patient's stays, the others averaged); metrics;
8. canary exposure for canaries whose patient was in the training split;
9. the identifier scan of the shippable directory;
10. the verdict under the policy: PASS only if every criterion holds, including that
    the declared held-out patients are fitted no better than the sealed reserve (a
    model trained on them is refused), the reserve no better than them, and the
    reference models fit like the target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from passerelle.corpus import Corpus, manifest_digest, read_corpus, write_corpus
from passerelle.errors import BadInput
from passerelle.recipes import (
    BUILTIN,
    ONNX_REINIT,
    LoadedRecipe,
    RecipeInfo,
    RecipeKind,
    load_recipe,
    source_digest,
)
from registry.audit.attacks import (
    FitShift,
    aggregate_by_unit,
    lira_offline,
    lira_online,
    loss_threshold_scores,
    reference_fit_shift,
    rmia_offline,
    tune_rmia_a,
)
from registry.audit.canary import Exposure, canary_exposure
from registry.audit.halves import (
    CORPUS as HALF_CORPUS,
)
from registry.audit.halves import (
    HALVES_FILE,
    Halves,
    assign_halves,
    assignment_digest,
    halves_recorded,
    patients_digest,
    provided_references,
    read_halves,
)
from registry.audit.metrics import AttackMetrics, evaluate_attack, roc_curve
from registry.audit.plots import plot_roc
from registry.audit.policy import MAX_REFERENCE_MODELS, Policy
from registry.audit.recipe import CoderRecipe, Encoding, FunctionRecipe, Recipe
from registry.audit.reserve import Reserve, open_reserve
from registry.audit.scan import ScanReport, scan_export_dir
from registry.audit.scoring import OnnxScorer, true_label_probability
from registry.coder import N_PARITY_INPUTS, CoderConfig, Examples, split_by_patient
from registry.export import Registered, registered_model, shippable
from registry.intake import encode_stays
from registry.model_dir import MANIFEST, PARITY_INPUTS, VOCABULARY, ModelDir
from registry.store import TAG, ModelStore, VersionRef
from registry.tracking import audit_metrics
from registry.vocabulary import Vocabulary, count_tokens, select_text

Progress = Callable[[str, int, int], None]
REPORT_FILE = "audit-report.json"
ROC_FILE = "roc.png"
_SUMMED = ("lira-online", "lira-offline")  # log-likelihood ratios: the joint test sums them

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Criterion:
    name: str
    measured: float
    limit: float
    passed: bool


@dataclass(frozen=True)
class SplitCheck:
    """Top-1 accuracy of the shipped model on each side of the split, in patients' stays,
    and the z statistics comparing the two non-member sides (held-out and reserve)."""

    train_top1: float
    train_stays: int
    heldout_top1: float
    heldout_stays: int
    reserve_top1: float
    reserve_stays: int
    reserve_patients: int
    population_patients: int
    heldout_above_reserve_z: float
    reserve_above_heldout_z: float


def _cluster_variance(hits: FloatArray, patients: Sequence[str]) -> tuple[float, float]:
    """(mean, variance of the mean) of stay hits, robust to correlation within a patient
    (a patient's stays share a case mix: they are one sample, not independent ones)."""
    if len(hits) == 0:
        return 0.0, 0.0
    mean = float(hits.mean())
    _, inverse = np.unique(np.asarray(patients), return_inverse=True)
    residual = np.bincount(inverse, weights=hits - mean)
    return mean, float((residual**2).sum()) / len(hits) ** 2


def _z(a: tuple[float, float], b: tuple[float, float]) -> float:
    """z statistic of mean a > mean b (independent samples, cluster-robust variances)."""
    se = math.sqrt(a[1] + b[1])
    if se == 0:
        return 0.0 if a[0] == b[0] else math.copysign(1e6, a[0] - b[0])
    return (a[0] - b[0]) / se


@dataclass(frozen=True)
class AuditResult:
    ref: VersionRef
    verdict: str  # "PASS" or "FAIL"
    criteria: tuple[Criterion, ...]
    onnx_digest: str
    policy_name: str
    policy_digest: str
    policy_pinned: bool  # the site's pinned policy (audit.policy_sha256): the gate's only
    pinned_digest: str
    privacy_unit: str
    members: int
    nonmembers: int
    reference_models: int
    recipe: RecipeInfo
    target_steps: int | None
    reference_epochs: int | None
    rmia_a: float
    fit_shift: FitShift
    split: SplitCheck
    attacks: dict[str, AttackMetrics]
    canaries: tuple[Exposure, ...]
    canaries_held_out: int
    scan: ScanReport
    report_dir: Path
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def failed(self) -> list[Criterion]:
        return [c for c in self.criteria if not c.passed]


def _examples(corpus: Corpus, idx: Sequence[int] | None = None) -> Examples:
    stays = corpus.stays if idx is None else [corpus.stays[i] for i in idx]
    return Examples(sections=tuple(s.sections.as_dict() for s in stays),
                    codes=tuple(s.main_diagnosis for s in stays),
                    patient_ids=tuple(s.patient_id for s in stays), site=corpus.site)


def _concat(*parts: Examples) -> Examples:
    return Examples(sections=sum((p.sections for p in parts), ()),
                    codes=sum((p.codes for p in parts), ()),
                    patient_ids=sum((p.patient_ids for p in parts), ()), site=parts[0].site)


def reference_model_count(policy: Policy, requested: int | None) -> int:
    """The policy's number of reference models; a request may only raise it."""
    count = policy.attacks.reference_models
    if requested is None:
        return count
    if requested < count:
        raise BadInput(f"--reference-models {requested} is below the policy's {count}: it "
                       "can only raise the number of reference models")
    if requested > MAX_REFERENCE_MODELS:
        raise BadInput(f"--reference-models {requested} is above {MAX_REFERENCE_MODELS}")
    return requested


def check_declared_split(model_dir: ModelDir, train: Examples, held: Examples) -> None:
    """The split recorded in the model directory must be the one rebuilt (else BadInput)."""
    training = model_dir.metadata.training
    rebuilt = {"train_stays": len(train), "train_patients": len(set(train.patient_ids)),
               "heldout_stays": len(held), "heldout_patients": len(set(held.patient_ids))}
    for key, value in rebuilt.items():
        declared = training.get(key)
        if declared != value:
            raise BadInput(f"the declared split does not reproduce: the model directory "
                           f"records {key} = {declared}, the recipe's seed and held-out "
                           f"fraction give {value}")
    if not len(held):  # trained on all: the parity inputs are a keyed sample of training
        return
    vocab = Vocabulary.load(model_dir.path / VOCABULARY)
    meta = model_dir.metadata
    expected = encode_stays(meta.input_kind, meta.dtype, vocab,
                            [select_text(s, vocab.config.sections)
                             for s in held.sections[:N_PARITY_INPUTS]])
    try:
        parity = np.load(model_dir.path / PARITY_INPUTS, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadInput(f"the model directory's parity inputs cannot be read: {e}") from e
    if parity.shape != expected.shape or not np.array_equal(parity, expected):
        raise BadInput("the declared split does not reproduce: the parity inputs are not the "
                       "encoding of the declared held-out stays")


@dataclass(frozen=True)
class _Pool:
    """The audit's inputs, checked: the model directory, the split, the pool."""

    model_dir: ModelDir
    registered: Registered  # the version's model directory and ONNX, checked once
    config: CoderConfig | None  # the built-in coder's config (None: a vendor's model)
    split_seed: int  # the declared split's seed (the reference models' base seed)
    members_corpus: Corpus
    reserve: Reserve
    members: Examples
    held: Examples
    reserve_ex: Examples
    population: Examples
    pool: Examples  # members, then reserve, then held-out
    member_stays: list[Any]


def _prepare(store: ModelStore, ref: VersionRef, members_dir: Path, sealed_dir: Path,
             policy: Policy, workdir: Path, seed: int) -> _Pool:
    """Steps 1-3: corpora, declared split, non-members and the pool."""
    info = store.get(ref)
    fingerprint = info.tags.get(TAG + "dataset_fingerprint")
    if not fingerprint or manifest_digest(members_dir) != fingerprint:
        raise BadInput(f"{members_dir} is not the corpus {ref} was trained on "
                       "(dataset fingerprints differ)")
    reserve = open_reserve(store.home, fingerprint, sealed_dir)
    members_corpus = read_corpus(members_dir)
    if {s.patient_id for s in members_corpus.stays} & reserve.patients:
        raise BadInput(f"{members_dir} holds patients of the sealed reserve")
    registered = registered_model(store, ref, workdir / "onnx")  # the one visit of it
    model_dir = registered.model_dir
    config, heldout = declared_split(ref, model_dir)
    everything = _examples(members_corpus)
    if heldout is None:  # declared trained on all of the corpus: no held-out patients
        train_idx, held_idx = list(range(len(everything))), list[int]()
    else:
        try:
            train_idx, held_idx = split_by_patient(everything, *heldout)
        except ValueError as e:
            raise BadInput(f"{ref}: the declared held-out split: {e}") from e
    members, held = everything.subset(train_idx), everything.subset(held_idx)
    check_declared_split(model_dir, members, held)
    member_stays = [members_corpus.stays[i] for i in train_idx]
    reserve_ex, population = _reserve_parts(reserve, policy, seed)
    if len(set(reserve_ex.patient_ids)) < policy.reserve.min_patients:
        raise BadInput(f"the sealed reserve has {len(set(reserve_ex.patient_ids))} patients to "
                       f"score (after the population share), below the policy's minimum "
                       f"{policy.reserve.min_patients}: seal a larger fraction")
    pool = _concat(members, reserve_ex, held)
    return _Pool(model_dir, registered, config, 0 if heldout is None else heldout[1],
                 members_corpus,
                 reserve, members, held, reserve_ex, population, pool, member_stays)


def declared_split(ref: VersionRef, model_dir: ModelDir) -> tuple[CoderConfig | None,
                                                                   tuple[float, int] | None]:
    """(the built-in coder's config or None, the declared held-out (fraction, seed) or
    None when the model was declared trained on all of its corpus)."""
    training = model_dir.metadata.training
    if "config" in training:
        try:
            config = CoderConfig.from_json(training["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(f"{ref}: the training recipe cannot be read: {e}") from e
        return config, (config.heldout_fraction, config.seed)
    if "heldout" not in training:
        raise BadInput(f"{ref}: the training recipe cannot be read: the model directory "
                       "records neither the built-in coder's config nor training.heldout")
    heldout = training["heldout"]
    if heldout is None:
        return None, None
    try:
        fraction, seed = float(heldout["fraction"]), int(heldout["seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{ref}: training.heldout is malformed: {e}") from e
    return None, (fraction, seed)


def audit_version(
    store: ModelStore, ref: VersionRef, members_dir: Path, sealed_dir: Path,
    policy: Policy, workdir: Path, progress: Progress | None = None, seed: int = 0,
    reference_models: int | None = None, pinned_digest: str | None = None,
    recipe: str | None = None, reference_dir: Path | None = None,
) -> AuditResult:
    count = reference_model_count(policy, reference_models)
    info = store.get(ref)
    p = _prepare(store, ref, members_dir, sealed_dir, policy, workdir, seed)
    model_dir, config, members_corpus = p.model_dir, p.config, p.members_corpus
    members, held, reserve_ex, population = p.members, p.held, p.reserve_ex, p.population
    member_stays = p.member_stays
    nonmembers = _concat(reserve_ex, held)
    halves = None if reference_dir is None else _recorded_halves(store, ref, reference_dir,
                                                                 count, seed)

    export = shippable(store, ref, workdir / "onnx", p.registered)  # (4) only, no re-check
    pool = p.pool
    is_member = np.array([True] * len(members) + [False] * len(nonmembers))
    target = OnnxScorer(export.directory)

    target_p, correct = _target_scores(target, pool)
    target_z = _target_scores(target, population)[0]
    if reference_dir is not None and halves is not None:
        provided = provided_references(reference_dir, halves, count,
                                       target_encoding(model_dir))
        choice = RecipeChoice(provided, provided.info)
    else:
        choice = select_recipe(model_dir, recipe, config, export.directory, len(members))
    maker = choice.recipe
    steps = maker.steps(len(members))
    ref_p, ref_z, in_mask = _reference_models(pool, population, maker, steps, count,
                                              p.split_seed, seed, progress)
    rmia_a = tune_rmia_a(ref_p, in_mask, ref_z)
    fit_shift = reference_fit_shift(target_p, ref_p, in_mask, is_member)
    scores = {
        "loss-threshold": loss_threshold_scores(target_p),
        "lira-online": lira_online(target_p, ref_p, in_mask),
        "lira-offline": lira_offline(target_p, ref_p, in_mask),
        "rmia-offline": rmia_offline(target_p, ref_p, in_mask, target_z, ref_z, rmia_a,
                                     policy.attacks.rmia_gamma),
    }
    n_m, n_h = len(members), len(held)
    held_stat = _cluster_variance(correct[len(pool) - n_h:], held.patient_ids)
    reserve_stat = _cluster_variance(correct[n_m:len(pool) - n_h], reserve_ex.patient_ids)
    split = SplitCheck(
        train_top1=float(correct[:n_m].mean()), train_stays=n_m,
        heldout_top1=held_stat[0], heldout_stays=n_h, reserve_top1=reserve_stat[0],
        reserve_stays=len(reserve_ex), reserve_patients=len(set(reserve_ex.patient_ids)),
        population_patients=len(set(population.patient_ids)),
        # no declared held-out patients (trained on all): nothing to compare the reserve to
        heldout_above_reserve_z=_z(held_stat, reserve_stat) if n_h else 0.0,
        reserve_above_heldout_z=_z(reserve_stat, held_stat) if n_h else 0.0)
    privacy_unit = info.tags.get(TAG + "privacy_unit", "patient")
    metrics, rocs = {}, {}
    for name, s in scores.items():
        m_scores, n_scores = _by_unit(s, pool.patient_ids, is_member, privacy_unit,
                                      "sum" if name in _SUMMED else "mean")
        rocs[name] = roc_curve(m_scores, n_scores)
        metrics[name] = evaluate_attack(m_scores, n_scores, policy.membership.epsilon_delta,
                                        policy.membership.confidence)
    units_m, units_n = (metrics["loss-threshold"].members, metrics["loss-threshold"].nonmembers)

    exposures, held_out_canaries = _canaries(members_corpus, member_stays, target, policy, seed)
    train_texts = [select_text(s, target.vocabulary.config.sections) for s in members.sections]
    per_token = count_tokens(train_texts, list(members.patient_ids))[1]
    scan = scan_export_dir(export.directory, per_token, policy.scan.min_patients)
    criteria = _criteria(policy, metrics, exposures, scan, split, fit_shift)
    report_dir = workdir / "audit"
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(rocs, report_dir / ROC_FILE, title=f"Membership inference on {ref} "
             f"({privacy_unit} level)")
    pinned = pinned_digest or policy.digest
    result = AuditResult(
        ref=ref, verdict="PASS" if all(c.passed for c in criteria) else "FAIL",
        criteria=tuple(criteria), onnx_digest=export.onnx_digest, policy_name=policy.name,
        policy_digest=policy.digest, policy_pinned=policy.digest == pinned,
        pinned_digest=pinned, privacy_unit=privacy_unit, members=units_m,
        nonmembers=units_n, reference_models=count, recipe=choice.info, target_steps=steps,
        reference_epochs=(maker.epochs_for(len(pool) // 2, steps)
                          if isinstance(maker, CoderRecipe) else None),
        rmia_a=rmia_a, fit_shift=fit_shift, split=split,
        attacks=metrics, canaries=tuple(exposures), canaries_held_out=held_out_canaries,
        scan=scan, report_dir=report_dir,
    )
    (report_dir / REPORT_FILE).write_text(json.dumps(report_json(result), indent=1,
                                                     ensure_ascii=False) + "\n")
    (report_dir / "policy.toml").write_text(policy.text)
    return result


@dataclass(frozen=True)
class RecipeChoice:
    recipe: Recipe
    info: RecipeInfo


def select_recipe(model_dir: ModelDir, spec: str | None, config: CoderConfig | None,
                  ship_dir: Path, train_stays: int) -> RecipeChoice:
    """The recipe that trains the reference models, and what the audit records of it.

    - no ``spec`` (or ``passerelle-coder``) on a built-in model (its training config is
      recorded): the built-in coder on that config (:class:`CoderRecipe`);
    - ``onnx-reinit``: re-initialised copies of the shipped ONNX graph, retrained by the
      executor (registry.audit.onnx_reinit);
    - any other spec: an entry point or ``module:function`` (passerelle.recipes), adapted
      by :class:`FunctionRecipe` to the target's vocabulary, input kind and dtype.
    A public recipe is given the target's steps: declared in the model directory
    (``training.steps``), else the built-in schedule's count when the config is known."""
    declared = model_dir.metadata.training.get("recipe")
    if spec is None and isinstance(declared, str) and declared:
        spec = declared  # the manifest's training.recipe (recorded as the spec it names)
    if config is not None and spec in (None, BUILTIN):
        from registry.coder import fit_coder

        return RecipeChoice(CoderRecipe(config),
                            RecipeInfo(BUILTIN, RecipeKind.BUILTIN, source_digest(fit_coder)))
    if spec is None and model_dir.metadata.framework.value == "onnx":
        spec = ONNX_REINIT  # an ONNX-only model without a recipe: retrained copies
    if spec is None:
        raise BadInput(f"{model_dir.path.name}: no recipe is recorded for this model: give "
                       "--recipe NAME|module:function, or onnx-reinit")
    if spec == ONNX_REINIT:
        import onnx

        from registry.audit.onnx_reinit import onnx_reinit_recipe

        target = onnx.load(str(ship_dir / "model.onnx"), load_external_data=False)
        loaded = LoadedRecipe(onnx_reinit_recipe(target), RecipeInfo(
            ONNX_REINIT, RecipeKind.ONNX_REINIT, source_digest(onnx_reinit_recipe)))
    else:
        loaded = load_recipe(spec)
    declared_steps = model_dir.metadata.training.get("steps")
    steps = declared_steps if isinstance(declared_steps, int) and declared_steps > 0 else (
        CoderRecipe(config).steps(train_stays) if config is not None else None)
    recipe = FunctionRecipe(loaded.function, loaded.info, target_encoding(model_dir), steps)
    return RecipeChoice(recipe, loaded.info)


def target_encoding(model_dir: ModelDir) -> Encoding:
    """How the target reads stays: its vocabulary, input kind and dtype, label table, and
    what its outputs are (the manifest's output.scores; logits without a manifest)."""
    meta = model_dir.metadata
    scores = "logits"
    if (model_dir.path / MANIFEST).is_file():
        try:
            doc = json.loads((model_dir.path / MANIFEST).read_text(encoding="utf-8"))
            scores = str(doc["output"]["scores"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{model_dir.path / MANIFEST}: unreadable manifest: {e}") from e
    return Encoding(Vocabulary.load(model_dir.path / VOCABULARY), meta.input_kind,
                    meta.dtype.value, meta.codes, scores)


def draw_halves(store: ModelStore, ref: VersionRef, members_dir: Path, sealed_dir: Path,
                policy: Policy, workdir: Path, out: Path, seed: int = 0,
                reference_models: int | None = None) -> Halves:
    """Write the K half-corpora the audit's reference models would be trained on
    (registry.audit.halves) into ``out``, and their halves.json; the caller records it."""
    count = reference_model_count(policy, reference_models)
    p = _prepare(store, ref, members_dir, sealed_dir, policy, workdir, seed)
    patients = sorted(set(p.pool.patient_ids))
    assignment = assign_halves(patients, count, seed)
    pool_patients = set(patients)
    stays = [s for s in p.members_corpus.stays if s.patient_id in pool_patients] + \
        [s for s in p.reserve.corpus.stays if s.patient_id in pool_patients
         and s.patient_id in p.reserve.patients]
    half_digests, corpus_digests = [], []
    for k in range(count):
        inside = {patients[j] for j in np.flatnonzero(assignment[k])}
        half = Corpus(site=p.members_corpus.site, seed=p.members_corpus.seed,
                      stays=tuple(s for s in stays if s.patient_id in inside), canaries=())
        write_corpus(half, out / str(k) / HALF_CORPUS)
        half_digests.append(patients_digest(sorted(inside)))
        corpus_digests.append(manifest_digest(out / str(k) / HALF_CORPUS))
    halves = Halves(model=ref.name, version=ref.version, seed=seed, count=count,
                    half_digests=tuple(half_digests), corpus_digests=tuple(corpus_digests),
                    digest=assignment_digest(half_digests))
    (out / HALVES_FILE).write_text(json.dumps(halves.to_json(), indent=1) + "\n")
    return halves


def _recorded_halves(store: ModelStore, ref: VersionRef, directory: Path, count: int,
                     seed: int) -> Halves:
    """halves.json of ``directory``, which must be a draw recorded for ``ref`` with this
    audit's seed and reference-model count."""
    halves = read_halves(directory)
    if (halves.model, halves.version) != (ref.name, ref.version):
        raise BadInput(f"{directory / HALVES_FILE} was drawn for {halves.model}/"
                       f"{halves.version}, not {ref}")
    if halves.seed != seed:
        raise BadInput(f"{directory / HALVES_FILE} was drawn with --seed {halves.seed}; this "
                       f"audit runs with --seed {seed}")
    if not halves_recorded(store.home, halves):
        raise BadInput(f"{directory / HALVES_FILE}: no audit_halves_drawn record of this site "
                       f"has its digest {halves.digest}: the halves were not drawn here (or "
                       "were changed since)")
    for k, digest in enumerate(halves.corpus_digests):
        corpus = directory / str(k) / HALF_CORPUS
        if corpus.is_dir() and manifest_digest(corpus) != digest:
            raise BadInput(f"{corpus} is not the half-corpus drawn (its digest changed)")
    return halves


def _reserve_parts(reserve: Reserve, policy: Policy, seed: int) -> tuple[Examples, Examples]:
    """(reserve patients scored as non-members, RMIA population), disjoint by patient."""
    corpus = reserve.corpus
    patients = sorted(reserve.patients)
    rng = np.random.default_rng(seed + 31337)
    n_pop = max(1, round(len(patients) * policy.reserve.population_share))
    population = {patients[i] for i in rng.permutation(len(patients))[:n_pop]}
    scored = [i for i, s in enumerate(corpus.stays) if s.patient_id in reserve.patients
              and s.patient_id not in population]
    pop = [i for i, s in enumerate(corpus.stays) if s.patient_id in population]
    return _examples(corpus, scored), _examples(corpus, pop)


def _target_scores(target: OnnxScorer, stays: Examples) -> tuple[FloatArray, FloatArray]:
    """p(true code) and top-1 hit (1.0 / 0.0) of the shipped model on each stay."""
    probs = target.probabilities(list(stays.sections))
    index = {c: i for i, c in enumerate(target.codes)}
    truth = np.array([index.get(c, -1) for c in stays.codes])
    hit = (probs.argmax(axis=1) == truth).astype(np.float64) if len(stays) else np.zeros(0)
    return true_label_probability(probs, target.codes, stays.codes), hit


def _reference_models(
    pool: Examples, population: Examples, recipe: Recipe, steps: int | None, count: int,
    base_seed: int, seed: int, progress: Progress | None,
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """p(true code) of pool and population stays under ``count`` reference models.

    Each pool patient is IN for half of the models (count even) or half +- 1 (count odd);
    population patients are IN for none. Every model gets ``steps`` gradient steps."""
    patients = sorted(set(pool.patient_ids))
    ref_p = np.zeros((count, len(pool)))
    ref_z = np.zeros((count, len(population)))
    in_mask = np.zeros((count, len(pool)), dtype=bool)
    assignment = assign_halves(patients, count, seed)
    index = {p: j for j, p in enumerate(patients)}
    column = np.array([index[p] for p in pool.patient_ids])
    for k in range(count):
        in_mask[k] = assignment[k, column]
        half = pool.subset(np.flatnonzero(in_mask[k]).tolist())
        scorer = recipe.fit(half, base_seed + k + 1, steps)
        ref_p[k] = scorer(pool)
        ref_z[k] = scorer(population)
        if progress:
            progress("reference models", k + 1, count)
    return ref_p, ref_z, in_mask


def _by_unit(scores: FloatArray, units: Sequence[str], is_member: npt.NDArray[np.bool_],
             privacy_unit: str, how: str = "mean") -> tuple[FloatArray, FloatArray]:
    if privacy_unit != "patient":
        return scores[is_member], scores[~is_member]
    m_units, m_scores = aggregate_by_unit(
        scores[is_member], [u for u, m in zip(units, is_member, strict=True) if m], how)
    n_units, n_scores = aggregate_by_unit(
        scores[~is_member], [u for u, m in zip(units, is_member, strict=True) if not m], how)
    if set(m_units) & set(n_units):
        raise BadInput("a patient is both member and non-member")
    return m_scores, n_scores


def _canaries(corpus: Corpus, member_stays: Sequence[Any], target: OnnxScorer,
              policy: Policy, seed: int) -> tuple[list[Exposure], int]:
    member_ids = {s.stay_id for s in member_stays}
    stays = {s.stay_id: s for s in corpus.stays}
    rng = np.random.default_rng(seed + 104729)

    def scorer(sections: Sequence[Mapping[str, str]], codes: Sequence[str]) -> FloatArray:
        return true_label_probability(target.probabilities(sections), target.codes, codes)

    exposures, held_out = [], 0
    for canary in corpus.canaries:
        if not set(canary.stay_ids) <= member_ids:
            held_out += 1
            continue
        exposures.append(canary_exposure(canary, stays, scorer, policy.canaries.candidates, rng))
    return exposures, held_out


def _criteria(policy: Policy, metrics: dict[str, AttackMetrics], exposures: Sequence[Exposure],
              scan: ScanReport, split: SplitCheck, fit_shift: FitShift) -> list[Criterion]:
    lim = policy.membership
    z = policy.reserve.max_fit_z
    shift = policy.attacks.max_reference_shift
    out = [Criterion("split.heldout_fits_better_than_reserve_z", split.heldout_above_reserve_z,
                     z, split.heldout_above_reserve_z <= z),
           Criterion("split.reserve_fits_better_than_heldout_z", split.reserve_above_heldout_z,
                     z, split.reserve_above_heldout_z <= z),
           # |shift|: reference models that fit more than the target blunt LiRA too
           Criterion("recipe.members_fit_shift", abs(fit_shift.members), shift,
                     abs(fit_shift.members) <= shift),
           Criterion("recipe.nonmembers_fit_shift", abs(fit_shift.nonmembers), shift,
                     abs(fit_shift.nonmembers) <= shift)]
    for name, m in metrics.items():
        for label, measured, limit in (
            ("auc", m.auc, lim.max_auc),
            ("tpr_at_0.1%_fpr", m.tpr_at_fpr[0.001], lim.max_tpr_at_0_1pct_fpr),
            ("tpr_at_1%_fpr", m.tpr_at_fpr[0.01], lim.max_tpr_at_1pct_fpr),
            ("epsilon_lower_bound", m.epsilon.epsilon_lower, lim.max_epsilon_lower_bound),
        ):
            out.append(Criterion(f"{name}.{label}", measured, limit, measured <= limit))
    worst = max((e.exposure_bits for e in exposures), default=0.0)
    out.append(Criterion("canaries.max_exposure_bits", worst, policy.canaries.max_exposure_bits,
                         worst <= policy.canaries.max_exposure_bits))
    counts = scan.counts()
    rare = counts.get("rare_token", 0)
    identifiers = sum(v for k, v in counts.items() if k != "rare_token")
    out.append(Criterion("scan.identifier_findings", identifiers,
                         policy.scan.max_identifier_findings,
                         identifiers <= policy.scan.max_identifier_findings))
    out.append(Criterion("scan.rare_tokens", rare, policy.scan.max_rare_tokens,
                         rare <= policy.scan.max_rare_tokens))
    return out


def report_json(result: AuditResult) -> dict[str, Any]:
    """The JSON report: verdict, every criterion, metrics, canaries, scan, policy."""
    def attack(m: AttackMetrics) -> dict[str, Any]:
        return {"auc": m.auc, "balanced_accuracy": m.balanced_accuracy,
                "tpr_at_fpr": {f"{k:g}": v for k, v in m.tpr_at_fpr.items()},
                "members": m.members, "nonmembers": m.nonmembers,
                "epsilon_lower_bound": asdict(m.epsilon)}

    return {
        "format": "passerelle-audit-report", "format_version": 1,
        "model": {"name": result.ref.name, "version": result.ref.version},
        "onnx_digest": result.onnx_digest,
        "verdict": result.verdict,
        "failed": [asdict(c) for c in result.failed],
        "criteria": [asdict(c) for c in result.criteria],
        "policy": {"name": result.policy_name, "digest": result.policy_digest,
                   "pinned": result.policy_pinned, "site_pinned_digest": result.pinned_digest},
        "privacy_unit": result.privacy_unit,
        "membership_question": ("was this patient in the training set" if
                                result.privacy_unit == "patient" else
                                "was this stay in the training set"),
        "members": result.members, "nonmembers": result.nonmembers,
        "reference_models": result.reference_models,
        "recipe": result.recipe.to_json(),
        "target_steps": result.target_steps, "reference_epochs": result.reference_epochs,
        "rmia_a": result.rmia_a,
        "reference_fit_shift": asdict(result.fit_shift) | {
            "unit": "reference models' standard deviation of logit-scaled p(true code)",
            "members_against": "reference models trained on the example (IN)",
            "nonmembers_against": "reference models not trained on it (OUT)"},
        "split": asdict(result.split) | {
            "heldout_fits_better_than_reserve_z": result.split.heldout_above_reserve_z,
            "reserve_fits_better_than_heldout_z": result.split.reserve_above_heldout_z,
            "z_variance": "cluster-robust by patient (a patient's stays are not "
                          "independent)"},
        "nonmember_sources": "the sealed reserve (data seal) and the declared held-out "
                             "patients; RMIA's population is a share of the reserve that no "
                             "attack scores and no reference model trains on",
        "patient_statistic": "LiRA: sum of the stays' log-likelihood ratios (joint test); "
                             "loss and RMIA: mean over the patient's stays",
        "attacks": {k: attack(v) for k, v in result.attacks.items()},
        "lira_offline_variant": "one-sided test of the paper (section 5.2), not the "
                                "density ratio of the authors' code",
        "canaries": [asdict(e) for e in result.canaries],
        "canaries_held_out": result.canaries_held_out,
        "scan": {"counts": result.scan.counts(), "scanned": dict(result.scan.scanned),
                 "findings": [asdict(f) for f in result.scan.findings[:200]]},
        "created": result.created,
        "epsilon_note": "epsilon_lower_bound is a one-sided Clopper-Pearson lower confidence "
                        "bound at the stated confidence; epsilon_max_detectable is the largest "
                        "bound these sample sizes could show: a small audit cannot prove a "
                        "large epsilon, nor safety.",
    }



def log_audit(store: ModelStore, result: AuditResult) -> None:
    """Verdict, figures and policy digest as version tags; report, plot, policy as artifacts."""
    from transfer.acts import has_ledger
    from transfer.identity import public_identity

    info = store.get(result.ref)
    site = public_identity(store.home).site if has_ledger(store.home) else "this site"
    tags = {
        TAG + "audit.status": f"audited at {site}",
        TAG + "audit.verdict": result.verdict,
        TAG + "audit.onnx_digest": result.onnx_digest,
        TAG + "audit.policy": result.policy_name,
        TAG + "audit.policy_digest": result.policy_digest,
        TAG + "audit.policy_pinned": "true" if result.policy_pinned else "false",
        TAG + "audit.reference_models": str(result.reference_models),
        TAG + "audit.recipe": result.recipe.name,
        TAG + "audit.recipe_kind": result.recipe.kind.value,
        TAG + "audit.recipe_digest": result.recipe.digest,
        TAG + "audit.time": result.created,
        TAG + "audit.failed": ",".join(c.name for c in result.failed)[:4000] or "none",
    }
    for name, m in result.attacks.items():
        tags[TAG + f"audit.{name}.auc"] = f"{m.auc:.6g}"
        tags[TAG + f"audit.{name}.epsilon_lower_bound"] = f"{m.epsilon.epsilon_lower:.6g}"
    store.attach(info, result.report_dir, "audit", tags)
    store.log_metrics(result.ref, audit_metrics(result))
