"""The site's privacy budget, per dataset.

A dataset is named by its corpus manifest digest (``passerelle.corpus.manifest_digest``).
Every DP run on it is recorded in ``HOME/privacy-budget.sqlite`` (one row per run: its
sampling rate, noise multiplier, steps, delta and epsilons) *before* training starts, in
one SQLite ``BEGIN IMMEDIATE`` transaction that also checks the cap, so two concurrent
runs cannot both slip under it. A run that would push the dataset beyond the cap is
refused (:class:`BudgetExceeded`, exit 1) and nothing is recorded. A run that fails
after it was recorded stays recorded (its noisy gradients may have been computed).

The cap (epsilon) comes from ``HOME/privacy-budget.toml`` (``epsilon_cap = 10.0``), or
:data:`DEFAULT_CAP` when the file is absent; a command-line ``--budget-cap`` overrides it.

Composition: the epsilon spent on a dataset is the smaller of two valid bounds, both at
``delta_total`` = the sum of the runs' deltas:

* basic composition: epsilons add up (``sum(epsilon_i)``, ``sum(delta_i)``);
* joint accounting: every run's DP-SGD event composed in one PLD accountant and
  evaluated at ``delta_total`` (tighter than the sum).
"""

from __future__ import annotations

import json
import sqlite3
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from adapters.dp import Accountant, DpSetting, epsilon_of
from passerelle.errors import BadInput, Refused

BUDGET_DB = "privacy-budget.sqlite"
BUDGET_CONFIG = "privacy-budget.toml"
DEFAULT_CAP = 10.0


class BudgetExceeded(Refused):
    """The run would push a dataset beyond the site's privacy budget."""


@dataclass(frozen=True)
class Spent:
    runs: int
    epsilon_basic: float  # sum of the runs' epsilons
    epsilon_joint: float  # all runs composed in one PLD accountant
    delta: float  # sum of the runs' deltas

    @property
    def epsilon(self) -> float:
        return min(self.epsilon_basic, self.epsilon_joint)


def site_cap(home: Path) -> float:
    """The cap from ``HOME/privacy-budget.toml``, else :data:`DEFAULT_CAP`."""
    path = home / BUDGET_CONFIG
    if not path.exists():
        return DEFAULT_CAP
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        cap = float(doc["epsilon_cap"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: needs a line 'epsilon_cap = <positive number>': {e}") from e
    if not cap > 0:
        raise BadInput(f"{path}: epsilon_cap must be positive")
    return cap


def spent_of(settings: list[DpSetting], epsilons: list[float]) -> Spent:
    if not settings:
        return Spent(0, 0.0, 0.0, 0.0)
    delta = sum(s.delta for s in settings)
    joint = epsilon_of([s.event() for s in settings], min(delta, 0.5), Accountant.PLD)
    return Spent(len(settings), sum(epsilons), joint, delta)


class PrivacyBudget:
    """The runs recorded at one site."""

    def __init__(self, home: Path) -> None:
        self.path = home / BUDGET_DB

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, "
                       "dataset TEXT NOT NULL, created TEXT NOT NULL, setting TEXT NOT NULL, "
                       "epsilon REAL NOT NULL, epsilon_rdp REAL NOT NULL, note TEXT)")
            yield db
        finally:
            db.close()

    @staticmethod
    def _rows(db: sqlite3.Connection, dataset: str) -> tuple[list[DpSetting], list[float]]:
        rows = db.execute("SELECT setting, epsilon FROM runs WHERE dataset = ? ORDER BY id",
                          (dataset,)).fetchall()
        return [DpSetting(**json.loads(s)) for s, _ in rows], [float(e) for _, e in rows]

    def spent(self, dataset: str) -> Spent:
        with self._db() as db:
            return spent_of(*self._rows(db, dataset))

    def reserve(self, dataset: str, setting: DpSetting, eps: float, eps_rdp: float,
                cap: float, note: str) -> Spent:
        """Record the run if the dataset stays within ``cap``, else BudgetExceeded.

        Returns what the dataset has spent with this run included.
        """
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                settings, epsilons = self._rows(db, dataset)
                after = spent_of([*settings, setting], [*epsilons, eps])
                if after.epsilon > cap:
                    before = spent_of(settings, epsilons)
                    raise BudgetExceeded(
                        f"privacy budget exceeded for dataset {dataset[:19]}…: spent "
                        f"{before.epsilon:.3f} in {before.runs} run(s), this run would bring "
                        f"it to {after.epsilon:.3f} > cap {cap:g}")
                db.execute(
                    "INSERT INTO runs (dataset, created, setting, epsilon, epsilon_rdp, note) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (dataset, datetime.now(UTC).isoformat(timespec="seconds"),
                     json.dumps(setting.__dict__, sort_keys=True), eps, eps_rdp, note))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return after
