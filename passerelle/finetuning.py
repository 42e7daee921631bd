"""``passerelle finetune``: DP-SGD fine-tuning of a received version on the site's own stays.

This module composes the site's registry (registry.store), budget (adapters.budget) and
ledger (transfer) with the training steps of :mod:`adapters.finetune`.

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
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapters.budget import (
    COUNT_NOISE_STD,
    BudgetPolicy,
    RunCost,
    Spent,
    group_epsilon,
    own_charges,
    reserve,
)
from adapters.budget_store import check_cap_file, check_store
from adapters.dp import DpSgdPlan, Progress
from adapters.finetune import (
    ACCURACY_SCOPE,
    FinetuneOptions,
    PreparedModel,
    SiteData,
    accuracy,
    check_executor_parity,
    check_seed,
    logits_of,
    plan_privacy,
    prepare_model,
    release_unit_count,
    run_dp_sgd,
    write_labels,
)
from adapters.onnx_tf import OnnxExecutor
from adapters.randomness import SecureRandom
from passerelle.contract import LABELS, ONNX_FILE, VOCABULARY, InputKind, PrivacyUnit
from passerelle.digests import sha256_file
from passerelle.errors import BadInput, PasserelleError
from passerelle.leftovers import (
    FINETUNE,
    check_recorded,
    clean_killed,
    home_lock,
    locked_workspace,
    site_fingerprint,
)
from registry.store import TAG, ModelStore, VersionInfo, VersionRef
from registry.tracking import finetune_metrics
from transfer.acts import subject
from transfer.deploy import sign_local_version
from transfer.pseudonym import site_key
from transfer.records import RecordKind

if TYPE_CHECKING:
    from transfer.acts import Recorder


FINETUNE_CARD = "finetune_card.json"
WORK_PREFIX = ".passerelle-finetune-"  # HOME/.passerelle-finetune-*: one run's work folder


# copied from the source version: where the model came from. Not its audit verdict: that
# was earned by other bytes (the fine-tuned version states its own audit status).
_LINEAGE = ("received_from", "sender_fingerprint", "bundle_digest", "source_model",
            "source_version", "transfer_sequence", "purpose", "legal_basis")


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


def finetune_version(store: ModelStore, ref: VersionRef, data: Path,
                     options: FinetuneOptions, rec: Recorder,
                     rng: np.random.Generator | None = None,
                     progress: Progress | None = None) -> FinetuneResult:
    """Steps 1-8 of the module docstring; every act recorded through ``rec``."""
    home = store.home
    if not rec.enabled:
        raise BadInput(f"{home}: fine-tuning needs the site's identity, so that the run is "
                       "charged and recorded in its ledger (run `passerelle site init NAME`)")
    seeded = check_seed(options, rng)  # (1)
    policy = BudgetPolicy.of_site(home)
    policy.check_unit(options.privacy_unit.value)
    check_cap_file(home)
    check_store(home, own_charges(home))  # a store that disagrees: refused before any work
    key = site_key(home)
    info = store.get(ref)
    check_recorded(store, ref)  # a version a killed receive/finetune left: not a source
    clean_killed(store, ref.name, FINETUNE)  # what a killed finetune into this name left
    with locked_workspace(home, home, WORK_PREFIX) as work:  # a killed run's: removed
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
            with home_lock(home):  # until recorded: no cleaner takes it
                version = store.register_received(out, ref.name, tags, on_registered,
                                                  metrics=finetune_metrics(result),
                                                  receiver=site_fingerprint(home),
                                                  derived_by=FINETUNE.run_tag)
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

