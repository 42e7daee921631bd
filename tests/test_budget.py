"""The privacy budget against the people who run it: the site's policy, not flags; a
budget per patient (keyed), kept in the ledger; stay-level runs at patient level; runs
that fail still count."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.budget import RunCost, group_epsilon, joint_epsilon, members_of, run_epsilon
from adapters.finetune import heldout_patients
from passerelle import steps
from passerelle.cli import main
from passerelle.corpus import read_corpus, write_corpus
from registry.store import ModelStore, VersionRef
from tests.test_finetune import received  # noqa: F401  (the module-scoped fixture)
from transfer.ledger_site import open_ledger
from transfer.pseudonym import site_key
from transfer.records import RecordKind
from transfer.site_policy import set_value


def _records(home: Path, kind: RecordKind) -> list[Any]:
    with open_ledger(home) as ledger:
        return ledger.records(kind=kind)


def _home(site: tuple[Path, VersionRef], tmp_path: Path) -> Path:
    dst = tmp_path / "home-y"
    shutil.copytree(site[0], dst)
    return dst


def _run(home: Path, ref: VersionRef, data: Path, capsys: pytest.CaptureFixture[str],
         *extra: str) -> tuple[int, str, str]:
    code = main(["finetune", str(ref), "--data", str(data), "--drop-unknown-codes",
                 "--epochs", "1", "--batch-size", "32", "--home", str(home), "--json",
                 *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _spent(home: Path) -> float:
    return max((float(r.fields["budget_spent"])
                for r in _records(home, RecordKind.FINETUNE_STARTED)), default=0.0)


def _edited_copy(src: Path, out: Path) -> Path:
    """The same patients: another seed in the manifest, one field of one stay changed
    (its age), another directory name."""
    corpus = read_corpus(src)
    stays = list(corpus.stays)
    stays[0] = dataclasses.replace(stays[0], age=stays[0].age + 1)
    write_corpus(dataclasses.replace(corpus, seed=corpus.seed + 1000, stays=tuple(stays)),
                 out)
    return out


# -- the attack of the issue ------------------------------------------------------------


def test_large_delta_after_an_exhausted_budget_is_refused_and_the_spend_never_falls(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    home, ref = _home(received, tmp_path), received[1]
    set_value(home, "privacy.epsilon_cap", "2", "DPO Y", "test: a small cap")
    code, _, err = _run(home, ref, corpus_y, capsys, "--epsilon", "1.9", "--seed", "1")
    assert code == 0, err
    first = _spent(home)
    assert 1.8 < first <= 2.0
    spends = [first]
    for argv, want in ((["--epsilon", "1"], 1),  # over the cap (PLD: 1.9 (+) 1 > 2)
                       (["--epsilon", "0.5", "--delta", "0.5"], 2),  # the reset attack
                       (["--epsilon", "0.5", "--delta", "1e-4"], 2)):  # above the rule
        code, _, err = _run(home, ref, corpus_y, capsys, *argv, "--seed", "2")
        assert code == want, (argv, err)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1
        spends.append(_spent(home))
    # the same patients, renamed, re-seeded and edited: the same budget, refused too
    copy = _edited_copy(corpus_y, tmp_path / "renamed-copy")
    code, _, err = _run(home, ref, copy, capsys, "--epsilon", "1", "--seed", "3")
    assert code == 1 and "privacy budget exceeded" in err
    spends.append(_spent(home))
    assert spends == sorted(spends) and spends[-1] == first  # nothing else was charged
    assert len(_records(home, RecordKind.FINETUNE_STARTED)) == 1
    assert main(["records", "verify", "--home", str(home)]) == 0


def test_budget_cap_flag_is_gone_and_the_legacy_cap_file_is_refused(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    home, ref = _home(received, tmp_path), received[1]
    with pytest.raises(SystemExit) as usage:
        _run(home, ref, corpus_y, capsys, "--epsilon", "1", "--budget-cap", "1000")
    assert usage.value.code == 2 and capsys.readouterr().err.startswith("error:")
    (home / "privacy-budget.toml").write_text("epsilon_cap = 1000\n")
    code, _, err = _run(home, ref, corpus_y, capsys, "--epsilon", "1")
    assert code == 2 and "privacy.epsilon_cap" in err
    assert _records(home, RecordKind.FINETUNE_STARTED) == []
    assert not (home / "privacy-budget.sqlite").exists()


def test_a_cap_change_without_an_approver_is_refused(
        received: tuple[Path, VersionRef], tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    home = _home(received, tmp_path)
    code = main(["site", "policy", "set", "privacy.epsilon_cap", "1000", "--approver", " ",
                 "--justification", "x", "--home", str(home)])
    assert code == 2 and capsys.readouterr().err.startswith("error:")
    assert not (home / "site-policy.toml").exists()


def test_seed_outside_the_test_suite_and_a_disallowed_unit_are_refused(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    home, ref = _home(received, tmp_path), received[1]
    code, _, err = _run(home, ref, corpus_y, capsys, "--epsilon", "1", "--privacy-unit",
                        "stay")
    assert code == 2 and "privacy.units" in err
    monkeypatch.delenv("PASSERELLE_TESTING")
    code, _, err = _run(home, ref, corpus_y, capsys, "--epsilon", "1", "--seed", "1")
    assert code == 2 and "test suite" in err
    assert _records(home, RecordKind.FINETUNE_STARTED) == []


# -- who is in the data -------------------------------------------------------------------


def test_a_renamed_reseeded_edited_copy_has_the_same_members(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path) -> None:  # noqa: F811
    key = site_key(received[0])
    copy = _edited_copy(corpus_y, tmp_path / "copy")

    def members(path: Path) -> Any:
        return members_of(key, [(s.patient_id, s.stay_id, s.identifiers.nir)
                                for s in read_corpus(path).stays])

    a, b = members(corpus_y), members(copy)
    assert a == b and a.dataset.startswith("hmac:")
    assert not any(s.patient_id in a.encoded() for s in read_corpus(corpus_y).stays)
    # half the patients with new ids but their stays kept: still recognised by stay id
    stays = read_corpus(corpus_y).stays
    renamed = members_of(key, [("other-" + s.patient_id, s.stay_id, "") for s in stays])
    assert all(p & a.tokens() for p in renamed.patients)


def test_removing_one_patient_moves_no_other_patient_between_training_and_heldout(
        received: tuple[Path, VersionRef], corpus_y: Path) -> None:  # noqa: F811
    key = site_key(received[0])
    pids = sorted({s.patient_id for s in read_corpus(corpus_y).stays})
    held = heldout_patients(key, pids, 0.2)
    for gone in pids[:25]:
        rest = [p for p in pids if p != gone]
        assert heldout_patients(key, rest, 0.2) == held - {gone}
    assert 0.1 < len(held) / len(pids) < 0.3


# -- units that compose -------------------------------------------------------------------


def test_stay_level_runs_are_charged_at_patient_level_by_group_privacy() -> None:
    one = RunCost("stay", 1, 0.1, 1.2, 100, 1e-5, 20.0)
    six = dataclasses.replace(one, group_size=6)
    eps1, eps6 = run_epsilon(one, 1e-5), group_epsilon(six, 1e-5)
    print(f"stay level {eps1:.3f}; patient level with 6 stays {eps6:.3f}")
    assert eps6 > 6 * eps1  # k e at a smaller per-stay delta
    e = eps6 / 6  # the run is (e, 1e-5 / (6 exp(5 e)))-DP per stay
    assert run_epsilon(six, 1e-5 / (6 * 2.718281828459045 ** (5 * e))) <= e


def run_costs() -> st.SearchStrategy[RunCost]:
    return st.builds(RunCost, st.sampled_from(["patient", "patient", "stay"]),
                     st.integers(1, 3), st.floats(0.02, 0.1), st.floats(1.5, 3.0),
                     st.integers(1, 8), st.just(1e-6), st.just(20.0))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(costs=st.lists(run_costs(), min_size=1, max_size=3))
def test_joint_spend_never_decreases_when_a_run_is_added(costs: list[RunCost]) -> None:
    spends = [joint_epsilon(costs[:i], 1e-5) for i in range(len(costs) + 1)]
    assert all(a <= b for a, b in itertools.pairwise(spends)), spends


# -- the store and the ledger -------------------------------------------------------------


def test_a_deleted_or_edited_budget_store_is_detected_and_refused_until_rebuilt(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    home, ref = _home(received, tmp_path), received[1]
    code, _, err = _run(home, ref, corpus_y, capsys, "--epsilon", "1", "--seed", "1")
    assert code == 0, err
    store = home / "privacy-budget.sqlite"
    original = store.read_bytes()
    with sqlite3.connect(store) as db:
        db.execute("UPDATE charges SET charge = replace(charge, '\"steps\":', '\"steps\":1')")
    assert main(["records", "verify", "--home", str(home)]) == 1
    assert "differs from the ledger" in capsys.readouterr().err
    store.unlink()
    assert main(["records", "verify", "--home", str(home)]) == 1
    assert "missing from the budget store" in capsys.readouterr().err
    code, _, err = _run(home, ref, corpus_y, capsys, "--epsilon", "1", "--seed", "2")
    assert code == 1 and "missing from the budget store" in err
    assert len(_records(home, RecordKind.FINETUNE_STARTED)) == 1  # nothing charged
    assert main(["finetune", "--rebuild-budget-store", "--home", str(home)]) == 0
    assert main(["records", "verify", "--home", str(home)]) == 0
    with sqlite3.connect(store) as db:
        rebuilt = db.execute("SELECT charge FROM charges").fetchall()
    with sqlite3.connect(tmp_path / "orig.sqlite") as db:
        pass
    (tmp_path / "orig.sqlite").write_bytes(original)
    with sqlite3.connect(tmp_path / "orig.sqlite") as db:
        assert db.execute("SELECT charge FROM charges").fetchall() == rebuilt


# -- runs that fail still count -----------------------------------------------------------


def test_a_diverging_run_is_charged_and_recorded_as_failed(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    home, ref = _home(received, tmp_path), received[1]
    before = ModelStore(home).versions("pmsi-coder")
    # The largest clip and learning rate the options allow (non-finite or absurd values
    # are bad input, refused before any run): the noisy updates blow the weights up.
    code, out, err = _run(home, ref, corpus_y, capsys, "--epsilon", "1", "--seed", "1",
                          "--clip", "10000", "--learning-rate", "10")
    assert code == 1 and out == ""
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    started = _records(home, RecordKind.FINETUNE_STARTED)
    ended = _records(home, RecordKind.FINETUNE)
    assert len(started) == 1 and [e.fields["outcome"] for e in ended] == ["failed"]
    assert ended[0].fields["started_record"] == started[0].id and ended[0].fields["reason"]
    assert ModelStore(home).versions("pmsi-coder") == before
    report = tmp_path / "report.html"
    assert main(["report", "--out", str(report), "--home", str(home)]) == 0
    page = report.read_text()
    dp = page[page.index('<section id="dp-budget"'):]
    dp = dp[:dp.index("</section>")]
    assert f"#{ended[0].seq}" in dp and "FAILED" in dp  # the report lists the failed run


def test_an_interrupted_run_is_recorded_as_interrupted(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path) -> None:  # noqa: F811
    home, ref = _home(received, tmp_path), received[1]

    def ctrl_c(phase: str, done: int, total: int) -> None:
        raise KeyboardInterrupt

    options = steps.finetune_options(epsilon=1.0, epochs=1, expected_batch_size=32,
                                     drop_unknown_codes=True, noise_seed=1)
    with pytest.raises(KeyboardInterrupt):
        steps.finetune_model(ModelStore(home), ref, corpus_y, options, None, ctrl_c)
    ended = _records(home, RecordKind.FINETUNE)
    assert [e.fields["outcome"] for e in ended] == ["interrupted"]
    assert json.loads(json.dumps(ended[0].fields))["seeded"] is True
    assert len(_records(home, RecordKind.FINETUNE_STARTED)) == 1
