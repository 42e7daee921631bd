"""The site's budget store, ``HOME/privacy-budget.sqlite``: a copy of the ledger's charges.

The ledger is the truth: every charge is the ``charge`` field of a signed
``finetune_started`` record. The store holds the same charges (one row per record:
its id, seq and the charge's canonical JSON) and is the lock that makes check-and-charge
atomic (SQLite ``BEGIN IMMEDIATE``). :func:`check_store` compares the two, so a deleted,
emptied, edited or copied store is detected by ``records verify`` and refused by
``finetune`` (:class:`BudgetStoreMismatch`, exit 1) until it is rebuilt from the ledger
(:func:`rebuild_store`). This module imports no accountant (``records verify`` uses it).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from passerelle.digests import canonical_json
from passerelle.errors import BadInput, Refused

BUDGET_DB = "privacy-budget.sqlite"
LEGACY_CONFIG = "privacy-budget.toml"


class BudgetStoreMismatch(Refused):
    """The budget store does not hold exactly the charges the ledger records."""


def charge_text(charge: Mapping[str, Any]) -> str:
    return canonical_json(dict(charge)).decode("utf-8")


def check_cap_file(home: Path) -> None:
    """BadInput if the old ``privacy-budget.toml`` is still there (a migration error)."""
    if (home / LEGACY_CONFIG).exists():
        raise BadInput(f"{home / LEGACY_CONFIG}: the privacy budget's cap is now the site "
                       "policy setting privacy.epsilon_cap (`passerelle site policy set "
                       "privacy.epsilon_cap VALUE --approver NAME --justification TEXT`); "
                       "remove this file")


@contextmanager
def open_store(home: Path, cap_file_check: bool = True) -> Iterator[sqlite3.Connection]:
    """The store, created if missing; an old per-manifest store is refused, and so is
    the old cap file (unless ``cap_file_check`` is False: ``records verify``)."""
    if cap_file_check:
        check_cap_file(home)
    db = sqlite3.connect(home / BUDGET_DB, timeout=60, isolation_level=None)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "runs" in tables:
            raise BudgetStoreMismatch(
                f"{home / BUDGET_DB} is an old budget store keyed by corpus manifests, whose "
                "runs were never recorded in the ledger: keep it as evidence, move it away "
                "and charge its runs again under the site's policy")
        db.execute("CREATE TABLE IF NOT EXISTS charges (record_id TEXT PRIMARY KEY, "
                   "seq INTEGER NOT NULL, charge TEXT NOT NULL)")
        yield db
    finally:
        db.close()


def stored_charges(db: sqlite3.Connection) -> list[tuple[str, int, dict[str, Any]]]:
    rows = db.execute("SELECT record_id, seq, charge FROM charges ORDER BY seq").fetchall()
    out = []
    for rid, seq, text in rows:
        try:
            out.append((str(rid), int(seq), dict(json.loads(text))))
        except (ValueError, TypeError) as e:
            raise BudgetStoreMismatch(f"budget store row {rid} is unreadable: {e}") from e
    return out


def ledger_charges(records: Sequence[Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """``(record id, seq, charge)`` of every ``finetune_started`` record, in seq order."""
    out = []
    for r in records:
        charge = r.fields.get("charge")
        if not isinstance(charge, dict):
            raise BudgetStoreMismatch(f"finetune_started record seq {r.seq} has no charge")
        out.append((str(r.id), int(r.seq), dict(charge)))
    return sorted(out, key=lambda t: t[1])


def compare(stored: Sequence[tuple[str, int, dict[str, Any]]],
            recorded: Sequence[tuple[str, int, dict[str, Any]]], where: Path) -> None:
    """BudgetStoreMismatch naming the first difference, if any."""
    ours = {rid: (seq, charge_text(c)) for rid, seq, c in stored}
    theirs = {rid: (seq, charge_text(c)) for rid, seq, c in recorded}
    missing = [theirs[r][0] for r in theirs if r not in ours]
    extra = [r for r in ours if r not in theirs]
    edited = [theirs[r][0] for r in theirs if r in ours and ours[r] != theirs[r]]
    fix = ("the charges recorded in the ledger are the truth: rebuild the store with "
           "`passerelle finetune --rebuild-budget-store` after finding out what happened")
    if missing:
        raise BudgetStoreMismatch(
            f"{where}: {len(missing)} charge(s) recorded in the ledger are missing from the "
            f"budget store (first: finetune_started seq {min(missing)}); it was deleted, "
            f"emptied or replaced; {fix}")
    if extra:
        raise BudgetStoreMismatch(f"{where}: the budget store holds {len(extra)} charge(s) "
                                  f"the ledger does not record; {fix}")
    if edited:
        raise BudgetStoreMismatch(f"{where}: the charge of finetune_started seq {min(edited)} "
                                  f"differs from the ledger's; {fix}")


def check_store(home: Path, records: Sequence[Any]) -> int:
    """The store agrees with the ledger's ``finetune_started`` records (else
    BudgetStoreMismatch); returns the number of charges. A home with no charge and no
    store passes."""
    recorded = ledger_charges(records)
    if not recorded and not (home / BUDGET_DB).exists():
        return 0
    with open_store(home, cap_file_check=False) as db:
        compare(stored_charges(db), recorded, home / BUDGET_DB)
    return len(recorded)


def rebuild_store(home: Path, records: Sequence[Any]) -> int:
    """Replace the store's rows by the ledger's charges; returns their number."""
    check_cap_file(home)
    path = home / BUDGET_DB
    if path.exists():
        with sqlite3.connect(path) as db:
            tables = {r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
        if "runs" in tables:
            path.rename(path.with_name(BUDGET_DB + ".old"))
    recorded = ledger_charges(records)
    with open_store(home) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM charges")
            db.executemany("INSERT INTO charges (record_id, seq, charge) VALUES (?, ?, ?)",
                           [(rid, seq, charge_text(c)) for rid, seq, c in recorded])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return len(recorded)
