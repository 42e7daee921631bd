"""The site's privacy budget: per patient, kept in the site's policy and the ledger.

Who is charged
    A run is charged to the *patients* whose stays train (held-out patients are not
    trained on and are not charged). Each training patient is named by keyed tokens
    (HMAC-SHA256 under the site's pseudonymisation key, ``transfer.pseudonym``; the first
    48 bits, which reveal nothing without the key): its patient id, each of its stay
    ids and each NIR its stays carry. A renamed corpus, a re-seeded manifest, an edited
    stay, a subset or a copy merged into another corpus keep these tokens, so they are
    the same patients. The ``dataset`` label is the keyed digest of the sorted patient
    tokens (informative only: the budget is per patient, not per label).

The exact rule (:func:`spend_of`)
    For each training patient *p* of the new run, the runs that concern *p* are every
    earlier run sharing at least one token with *p*, plus the new run. Their joint spend
    is evaluated at the site's one ``privacy.accounting_delta`` (default 1e-5). The run
    is refused (:class:`BudgetExceeded`, exit 1) if, for any of its patients, that joint
    epsilon exceeds ``privacy.epsilon_cap`` or the sum of those runs' deltas exceeds
    ``privacy.delta_total_max``. A collision of two 48-bit tokens can only make two runs
    share patients they do not share: it over-charges, never under-charges.

Joint spend at the accounting delta (:func:`joint_epsilon`), always at the patient level
    * patient-level runs: each run is ``Composed(Gaussian(count_noise),
      SelfComposed(PoissonSampled(q, Gaussian(z)), steps))`` (the released noisy unit count
      and DP-SGD), all composed in one PLD accountant (dp-accounting, pessimistic);
    * stay-level runs (allowed only if ``privacy.units`` contains ``stay``): group privacy
      over ``k`` = the largest number of training stays of one patient in that run. A run
      that is (e, d)-DP per stay is (k e, k exp((k-1) e) d)-DP per patient; the stay-level
      e is the smallest one, found by fixed-point iteration on the run's PLD curve, with
      d = delta_share / (k exp((k-1) e)), so the patient-level delta is exactly
      ``delta_share`` (:func:`group_epsilon`);
    * with m stay-level runs among them, the accounting delta is split in equal shares
      (m shares, plus one for all patient-level runs together) and the epsilons add
      (basic composition across the shares).
    Adding a run never lowers the spend: PLD composition only grows, shares only shrink.

Where it is kept
    The charge is appended to the ledger (``finetune_started``, before training) inside
    the budget store's write lock, then copied to ``HOME/privacy-budget.sqlite``
    (:mod:`adapters.budget_store`). Before charging, the store must agree with the
    ledger, record by record; ``records verify`` checks the same.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting

from adapters.budget_store import (
    BudgetStoreMismatch,
    charge_text,
    compare,
    ledger_charges,
    open_store,
    stored_charges,
)
from adapters.dp import Accountant, dp_sgd_event, make_accountant
from passerelle.errors import BadInput, Refused
from transfer.pseudonym import keyed_id_with

COUNT_NOISE_STD = 20.0  # std of the Gaussian noise on the released unit count (sensitivity 1)
TOKEN_HEX = 12  # 48 bits of each keyed token
_DATASET = "privacy-budget/dataset"
_MEMBER_PURPOSE = "privacy-budget/member"


class BudgetExceeded(Refused):
    """The run would push one of its patients beyond the site's privacy budget."""


# -- the site's policy -----------------------------------------------------------------


@dataclass(frozen=True)
class BudgetPolicy:
    """The budget settings in force (``transfer.site_policy``, keys ``privacy.*``)."""

    epsilon_cap: float
    accounting_delta: float
    delta_per_run_max: float  # 0: min(1e-5, 1 / (10 x units))
    delta_total_max: float
    units: tuple[str, ...]

    @classmethod
    def of_site(cls, home: Path) -> BudgetPolicy:
        from transfer.site_policy import load_policy

        p = load_policy(home)
        units = p.get("privacy.units")
        return cls(p.real("privacy.epsilon_cap"), p.real("privacy.accounting_delta"),
                   p.real("privacy.delta_per_run_max"), p.real("privacy.delta_total_max"),
                   tuple(units) if isinstance(units, tuple) else (str(units),))

    def delta_max(self, units: int) -> float:
        """The largest delta a run over ``units`` (the released count) may use."""
        if self.delta_per_run_max > 0:
            return min(self.delta_per_run_max, 1.0 / (10 * max(units, 1)))
        return min(1e-5, 1.0 / (10 * max(units, 1)))

    def check_unit(self, unit: str) -> None:
        """BadInput (exit 2) for a privacy unit the site does not allow."""
        if unit not in self.units:
            raise BadInput(f"privacy unit {unit!r} is not allowed at this site (site policy "
                           f"privacy.units = {','.join(self.units)})")

    def check_delta(self, delta: float, units: int) -> None:
        """BadInput (exit 2) for a delta above the per-run rule (``units``: released)."""
        limit = self.delta_max(units)
        if not 0 < delta <= limit:
            rule = (f"privacy.delta_per_run_max {self.delta_per_run_max:g}"
                    if self.delta_per_run_max > 0 else "min(1e-5, 1 / (10 x units))")
            raise BadInput(f"delta {delta:g} is above this site's per-run limit {limit:.3g} "
                           f"({rule}, {units} units released)")


# -- who is in the data ----------------------------------------------------------------


@dataclass(frozen=True)
class Members:
    """The training patients of a run, as keyed tokens (patient id, stay ids, NIRs)."""

    dataset: str  # hmac:<hex> of the sorted patient tokens
    patients: tuple[frozenset[str], ...]

    def tokens(self) -> frozenset[str]:
        return frozenset().union(*self.patients)

    def encoded(self) -> str:
        return " ".join(sorted(self.tokens()))


def _token(key: bytes, kind: str, value: str) -> str:
    return kind + ":" + keyed_id_with(key, f"{_MEMBER_PURPOSE}/{kind}", value)[5:5 + TOKEN_HEX]


def members_of(key: bytes, stays: Iterable[tuple[str, str, str]]) -> Members:
    """``stays`` as (patient id, stay id, NIR or ""), training stays only."""
    by_patient: dict[str, set[str]] = {}
    for pid, sid, nir in stays:
        tokens = by_patient.setdefault(pid, {_token(key, "p", pid)})
        tokens.add(_token(key, "s", sid))
        if nir:
            tokens.add(_token(key, "n", "".join(nir.split())))
    patient_tokens = sorted(_token(key, "p", pid) for pid in by_patient)
    dataset = keyed_id_with(key, _DATASET, "\n".join(patient_tokens))
    return Members(dataset, tuple(frozenset(t) for _, t in sorted(by_patient.items())))


# -- accounting ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunCost:
    """One run as the budget composes it (what a ``charge`` records, minus members)."""

    run_unit: str  # "patient" | "stay"
    group_size: int  # k: largest number of training stays of one patient (1 per patient)
    sampling_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    count_noise_std: float

    @classmethod
    def of(cls, charge: Mapping[str, Any]) -> RunCost:
        try:
            return cls(str(charge["run_unit"]), int(charge["group_size"]),
                       float(charge["sampling_rate"]), float(charge["noise_multiplier"]),
                       int(charge["steps"]), float(charge["delta"]),
                       float(charge["count_noise_std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BudgetStoreMismatch(f"a recorded charge is malformed: {e}") from e

    def event(self) -> dp_accounting.DpEvent:
        """The run at its own unit: the noisy count, then DP-SGD."""
        return dp_accounting.ComposedDpEvent([
            dp_accounting.GaussianDpEvent(self.count_noise_std),
            dp_sgd_event(self.sampling_rate, self.noise_multiplier, self.steps)])


@functools.lru_cache(maxsize=512)
def _pld_epsilon(costs: tuple[RunCost, ...], delta: float) -> float:
    accountant = make_accountant(Accountant.PLD)
    for c in costs:
        accountant.compose(c.event())
    return float(accountant.get_epsilon(delta))


def run_epsilon(cost: RunCost, delta: float) -> float:
    """The run's epsilon at ``delta`` at its own unit (count and DP-SGD, PLD)."""
    return _pld_epsilon((cost,), delta)


@functools.lru_cache(maxsize=512)
def group_epsilon(cost: RunCost, delta: float) -> float:
    """Patient-level epsilon at patient-level ``delta`` of a stay-level run with at most
    ``k`` stays per patient (group privacy for (e, d)-DP: k e, k exp((k-1) e) d); inf
    when no stay-level epsilon closes the fixed point."""
    k = cost.group_size
    if k == 1:
        return run_epsilon(cost, delta)
    accountant = make_accountant(Accountant.PLD)
    accountant.compose(cost.event())

    def at(e1: float) -> float:  # stay-level epsilon at the delta e1 leaves per stay
        log_d = math.log(delta / k) - (k - 1) * e1
        if log_d < -700:
            return math.inf
        return float(accountant.get_epsilon(math.exp(log_d)))

    e1 = at(0.0)
    for _ in range(500):
        nxt = at(e1)
        if not math.isfinite(nxt) or nxt > 1e3:
            return math.inf
        if nxt <= e1 + 1e-9:
            break
        e1 = nxt
    else:
        return math.inf
    e1 += 1e-6  # verified below: the run is (e1, delta / (k exp((k-1) e1)))-DP per stay
    if at(e1) > e1:
        return math.inf
    return k * e1


def joint_epsilon(costs: Sequence[RunCost], delta: float) -> float:
    """Patient-level epsilon at ``delta`` of all ``costs`` together (module docstring)."""
    patient = tuple(sorted((c for c in costs if c.run_unit == "patient"), key=repr))
    stay = [c for c in costs if c.run_unit != "patient"]
    if not stay:
        return _pld_epsilon(patient, delta) if patient else 0.0
    share = delta / (len(stay) + (1 if patient else 0))
    total = _pld_epsilon(patient, share) if patient else 0.0
    return total + sum(group_epsilon(c, share) for c in stay)


@dataclass(frozen=True)
class Spent:
    """What the most charged patient of a run has spent, this run included."""

    runs: int  # runs concerning that patient, this one included
    epsilon: float  # joint, patient level, at accounting_delta
    delta_sum: float  # sum of those runs' deltas
    accounting_delta: float
    shared: tuple[str, ...]  # ledger ids of every earlier run sharing patients with this one


def spend_of(earlier: Sequence[tuple[str, Mapping[str, Any]]], cost: RunCost,
             members: Members, accounting_delta: float) -> Spent:
    """The exact rule of the module docstring, for the new run ``cost`` over ``members``."""
    tokens = [(rid, frozenset(str(c.get("members", "")).split()), RunCost.of(c))
              for rid, c in earlier]
    groups = {frozenset(rid for rid, t, _ in tokens if t & p) for p in members.patients}
    costs = {rid: c for rid, _, c in tokens}
    worst = Spent(1, 0.0, 0.0, accounting_delta, ())
    for group in groups or {frozenset()}:
        runs = [costs[r] for r in sorted(group)] + [cost]
        eps = joint_epsilon(runs, accounting_delta)
        d = sum(r.delta for r in runs)
        if (eps, d) > (worst.epsilon, worst.delta_sum):
            worst = Spent(len(runs), eps, d, accounting_delta, ())
    shared = tuple(sorted(set().union(*groups))) if groups else ()
    return Spent(worst.runs, worst.epsilon, worst.delta_sum, accounting_delta, shared)


# -- charging --------------------------------------------------------------------------


def own_charges(home: Path) -> list[Any]:
    """The site's ``finetune_started`` records, signatures checked."""
    from transfer.ledger_site import open_ledger, own_keys
    from transfer.records import RecordKind, check_signature

    with open_ledger(home) as ledger:
        found = ledger.records(kind=RecordKind.FINETUNE_STARTED)
    keys = own_keys(home)
    for r in found:
        check_signature(r, keys)
    return found


def charge_of(cost: RunCost, members: Members) -> dict[str, Any]:
    """The ``charge`` field of a ``finetune_started`` record (canonical JSON values)."""
    return {"dataset": members.dataset, "members": members.encoded(),
            "run_unit": cost.run_unit, "group_size": cost.group_size,
            "sampling_rate": cost.sampling_rate, "noise_multiplier": cost.noise_multiplier,
            "steps": cost.steps, "delta": cost.delta,
            "count_noise_std": cost.count_noise_std, "budget_unit": "patient"}


def reserve(home: Path, policy: BudgetPolicy, cost: RunCost, members: Members,
            record: Callable[[dict[str, Any], Spent], Any]) -> tuple[Any, Spent]:
    """Check the cap and charge the run, atomically.

    Inside the store's write lock: (1) the store must agree with the ledger's charges;
    (2) the spend of every patient of the run, this run included, must stay within the
    cap and the delta total (else BudgetExceeded, nothing recorded); (3) ``record(charge,
    spent)`` appends the ``finetune_started`` record and returns it; (4) the charge is
    copied into the store under that record's id. A kill between (3) and (4) leaves a
    charge the store lacks: the next run refuses until the store is rebuilt.
    """
    charge = charge_of(cost, members)
    with open_store(home) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            recorded = ledger_charges(own_charges(home))
            compare(stored_charges(db), recorded, home / "privacy-budget.sqlite")
            spent = spend_of([(rid, c) for rid, _, c in recorded], cost, members,
                             policy.accounting_delta)
            if spent.epsilon > policy.epsilon_cap:
                raise BudgetExceeded(
                    f"privacy budget exceeded: with this run, a patient of dataset "
                    f"{members.dataset[:17]}… would have spent epsilon {spent.epsilon:.3f} "
                    f"(PLD, patient level, at delta {policy.accounting_delta:g}, "
                    f"{spent.runs} run(s){_group_note(cost)}) > cap {policy.epsilon_cap:g}")
            if spent.delta_sum > policy.delta_total_max:
                raise BudgetExceeded(
                    f"privacy budget exceeded: the deltas of the {spent.runs} run(s) "
                    f"concerning a patient would sum to {spent.delta_sum:.3g} > "
                    f"privacy.delta_total_max {policy.delta_total_max:g}")
            rec = record(charge, spent)
            if rec is None:
                raise BadInput(f"{home}: no ledger to record the charge in")
            db.execute("INSERT INTO charges (record_id, seq, charge) VALUES (?, ?, ?)",
                       (str(rec.id), int(rec.seq), charge_text(charge)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return rec, spent


def _group_note(cost: RunCost) -> str:
    if cost.run_unit == "patient":
        return ""
    return (f"; this stay-level run by group privacy over up to {cost.group_size} stays "
            "per patient")


def rebuild(home: Path) -> int:
    """Rebuild the budget store from the ledger's charges (signatures checked)."""
    from adapters.budget_store import rebuild_store

    return rebuild_store(home, own_charges(home))


def current_spend(home: Path, members: Members, accounting_delta: float) -> float:
    """What the most charged of ``members`` has spent so far (0 if never charged)."""
    recorded = ledger_charges(own_charges(home))
    tokens = [(frozenset(str(c.get("members", "")).split()), RunCost.of(c))
              for _, _, c in recorded]
    groups = {frozenset(i for i, (t, _) in enumerate(tokens) if t & p)
              for p in members.patients}
    return max((joint_epsilon([tokens[i][1] for i in sorted(g)], accounting_delta)
                for g in groups if g), default=0.0)
