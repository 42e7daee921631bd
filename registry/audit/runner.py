"""The memorisation audit of one model version, on the ONNX bytes that would ship.

Steps (``audit_version``):

1. the policy, the members corpus (must be the training corpus: same fingerprint as
   the version's provenance) and the non-members (the training corpus's held-out
   patients when ``--nonmembers`` is that same corpus, else another corpus of the same
   site sharing no patient or stay with the members);
2. the shippable ONNX directory (registry.export.shippable: converted and logged with
   a parity check if that has not been done yet);
3. reference models: the model's own recipe trained on random halves, by patient, of
   the audit pool (members and non-members), so each example is IN for about half;
4. p(true code) of every pool stay under the ONNX model and every reference model;
5. the four attacks, per patient when the privacy unit is the patient; metrics;
6. canary exposure for canaries whose patient was in the training split;
7. the identifier scan of the shippable directory;
8. the verdict under the policy: PASS only if every criterion holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from passerelle.corpus import Corpus, manifest_digest, read_corpus
from passerelle.errors import BadInput
from registry.audit.attacks import (
    aggregate_by_unit,
    lira_offline,
    lira_online,
    loss_threshold_scores,
    rmia_offline,
)
from registry.audit.canary import Exposure, canary_exposure
from registry.audit.metrics import AttackMetrics, evaluate_attack, roc_curve
from registry.audit.plots import plot_roc
from registry.audit.policy import Policy
from registry.audit.scan import ScanReport, scan_export_dir
from registry.audit.scoring import OnnxScorer, coder_probabilities, true_label_probability
from registry.coder import CoderConfig, Examples, fit_coder, split_by_patient
from registry.export import fetch_model_dir, shippable
from registry.store import TAG, ModelStore, VersionRef
from registry.tracking import audit_metrics
from registry.vocabulary import count_tokens, select_text

Progress = Callable[[str, int, int], None]
REPORT_FILE = "audit-report.json"
ROC_FILE = "roc.png"

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Criterion:
    name: str
    measured: float
    limit: float
    passed: bool


@dataclass(frozen=True)
class AuditResult:
    ref: VersionRef
    verdict: str  # "PASS" or "FAIL"
    criteria: tuple[Criterion, ...]
    onnx_digest: str
    policy_name: str
    policy_digest: str
    privacy_unit: str
    members: int
    nonmembers: int
    reference_models: int
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


def _concat(a: Examples, b: Examples) -> Examples:
    return Examples(sections=a.sections + b.sections, codes=a.codes + b.codes,
                    patient_ids=a.patient_ids + b.patient_ids, site=a.site)


def audit_version(
    store: ModelStore, ref: VersionRef, members_dir: Path, nonmembers_dir: Path,
    policy: Policy, workdir: Path, progress: Progress | None = None, seed: int = 0,
) -> AuditResult:
    info = store.get(ref)
    fingerprint = info.tags.get(TAG + "dataset_fingerprint")
    if manifest_digest(members_dir) != fingerprint:
        raise BadInput(f"{members_dir} is not the corpus {ref} was trained on "
                       "(dataset fingerprints differ)")
    members_corpus = read_corpus(members_dir)
    model_dir = fetch_model_dir(store, info, workdir / "source")
    try:
        config = CoderConfig.from_json(model_dir.metadata.training["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{ref}: the training recipe cannot be read: {e}") from e
    everything = _examples(members_corpus)
    train_idx, held_idx = split_by_patient(everything, config.heldout_fraction, config.seed)
    members = everything.subset(train_idx)
    member_stays = [members_corpus.stays[i] for i in train_idx]
    if manifest_digest(nonmembers_dir) == fingerprint:
        nonmembers = everything.subset(held_idx)
    else:
        other = read_corpus(nonmembers_dir)
        _check_disjoint(members_corpus, train_idx, other)
        nonmembers = _examples(other)
    if len(members) == 0 or len(nonmembers) == 0:
        raise BadInput("the member and non-member sets must both be non-empty")

    export = shippable(store, ref, workdir / "onnx")
    pool = _concat(members, nonmembers)
    is_member = np.array([True] * len(members) + [False] * len(nonmembers))
    target = OnnxScorer(export.directory)
    target_p = true_label_probability(target.probabilities(list(pool.sections)), target.codes,
                                      pool.codes)
    ref_p, in_mask = _reference_models(pool, config, policy.attacks.reference_models, seed,
                                       progress)
    population = np.flatnonzero(~is_member)
    scores = {
        "loss-threshold": loss_threshold_scores(target_p),
        "lira-online": lira_online(target_p, ref_p, in_mask),
        "lira-offline": lira_offline(target_p, ref_p, in_mask),
        "rmia-offline": rmia_offline(target_p, ref_p, in_mask, target_p[population],
                                     ref_p[:, population], policy.attacks.rmia_a,
                                     policy.attacks.rmia_gamma),
    }
    privacy_unit = info.tags.get(TAG + "privacy_unit", "patient")
    metrics, rocs = {}, {}
    for name, s in scores.items():
        m_scores, n_scores = _by_unit(s, pool.patient_ids, is_member, privacy_unit)
        rocs[name] = roc_curve(m_scores, n_scores)
        metrics[name] = evaluate_attack(m_scores, n_scores, policy.membership.epsilon_delta,
                                        policy.membership.confidence)
    units_m, units_n = (metrics["loss-threshold"].members, metrics["loss-threshold"].nonmembers)

    exposures, held_out_canaries = _canaries(members_corpus, member_stays, target, policy, seed)
    train_texts = [select_text(s, target.vocabulary.config.sections) for s in members.sections]
    per_token = count_tokens(train_texts, list(members.patient_ids))[1]
    scan = scan_export_dir(export.directory, per_token, policy.scan.min_patients)
    criteria = _criteria(policy, metrics, exposures, scan)
    report_dir = workdir / "audit"
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(rocs, report_dir / ROC_FILE, title=f"Membership inference on {ref} "
             f"({privacy_unit} level)")
    result = AuditResult(
        ref=ref, verdict="PASS" if all(c.passed for c in criteria) else "FAIL",
        criteria=tuple(criteria), onnx_digest=export.onnx_digest, policy_name=policy.name,
        policy_digest=policy.digest, privacy_unit=privacy_unit, members=units_m,
        nonmembers=units_n, reference_models=policy.attacks.reference_models,
        attacks=metrics, canaries=tuple(exposures), canaries_held_out=held_out_canaries,
        scan=scan, report_dir=report_dir,
    )
    (report_dir / REPORT_FILE).write_text(json.dumps(report_json(result), indent=1,
                                                     ensure_ascii=False) + "\n")
    (report_dir / "policy.toml").write_text(policy.text)
    return result


def _check_disjoint(members_corpus: Corpus, train_idx: Sequence[int], other: Corpus) -> None:
    if other.site != members_corpus.site:
        raise BadInput(f"non-members come from site {other.site}, members from site "
                       f"{members_corpus.site}: both must come from the training site")
    member_patients = {members_corpus.stays[i].patient_id for i in train_idx}
    member_stays = {members_corpus.stays[i].stay_id for i in train_idx}
    shared_p = member_patients & {s.patient_id for s in other.stays}
    shared_s = member_stays & {s.stay_id for s in other.stays}
    if shared_p or shared_s:
        raise BadInput(f"members and non-members overlap: {len(shared_p)} patients, "
                       f"{len(shared_s)} stays in common")


def _reference_models(
    pool: Examples, config: CoderConfig, count: int, seed: int, progress: Progress | None
) -> tuple[FloatArray, FloatArray]:
    patients = sorted(set(pool.patient_ids))
    rng = np.random.default_rng(seed + 7919)
    ref_p = np.zeros((count, len(pool)))
    in_mask = np.zeros((count, len(pool)), dtype=bool)
    # Balanced halves: each patient is IN for exactly half of the models (count even)
    # or half +- 1 (count odd).
    assignment = np.zeros((count, len(patients)), dtype=bool)
    for j in range(len(patients)):
        assignment[rng.permutation(count)[: count // 2 + (j % 2) * (count % 2)], j] = True
    index = {p: j for j, p in enumerate(patients)}
    column = np.array([index[p] for p in pool.patient_ids])
    for k in range(count):
        in_mask[k] = assignment[k, column]
        half = pool.subset(np.flatnonzero(in_mask[k]).tolist())
        coder = fit_coder(half, replace(config, seed=config.seed + k + 1))
        probs = coder_probabilities(coder, list(pool.sections))
        ref_p[k] = true_label_probability(probs, coder.codes, pool.codes)
        if progress:
            progress("reference models", k + 1, count)
    return ref_p, in_mask


def _by_unit(scores: FloatArray, units: Sequence[str], is_member: FloatArray,
             privacy_unit: str) -> tuple[FloatArray, FloatArray]:
    if privacy_unit != "patient":
        return scores[is_member], scores[~is_member]
    m_units, m_scores = aggregate_by_unit(scores[is_member],
                                          [u for u, m in zip(units, is_member, strict=True) if m])
    n_units, n_scores = aggregate_by_unit(scores[~is_member],
                                          [u for u, m in zip(units, is_member, strict=True)
                                           if not m])
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
              scan: ScanReport) -> list[Criterion]:
    lim = policy.membership
    out = []
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
        "policy": {"name": result.policy_name, "digest": result.policy_digest},
        "privacy_unit": result.privacy_unit,
        "membership_question": ("was this patient in the training set" if
                                result.privacy_unit == "patient" else
                                "was this stay in the training set"),
        "members": result.members, "nonmembers": result.nonmembers,
        "reference_models": result.reference_models,
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
    info = store.get(result.ref)
    tags = {
        TAG + "audit.verdict": result.verdict,
        TAG + "audit.onnx_digest": result.onnx_digest,
        TAG + "audit.policy": result.policy_name,
        TAG + "audit.policy_digest": result.policy_digest,
        TAG + "audit.time": result.created,
        TAG + "audit.failed": ",".join(c.name for c in result.failed)[:4000] or "none",
    }
    for name, m in result.attacks.items():
        tags[TAG + f"audit.{name}.auc"] = f"{m.auc:.6g}"
        tags[TAG + f"audit.{name}.epsilon_lower_bound"] = f"{m.epsilon.epsilon_lower:.6g}"
    store.attach(info, result.report_dir, "audit", tags)
    store.log_metrics(result.ref, audit_metrics(result))
