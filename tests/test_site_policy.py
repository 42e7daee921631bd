"""The site policy (settings no flag changes) and the site's pseudonymisation key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from passerelle.cli import main
from tests.transfer_support import make_site
from transfer import pseudonym
from transfer.ledger_site import open_ledger
from transfer.pseudonym import PseudonymKeyError, keyed_fraction, keyed_id, site_key
from transfer.records import RecordKind
from transfer.site_policy import (
    POLICY_FILE,
    SitePolicyError,
    SitePolicyTampered,
    load_policy,
    set_value,
)


def _records(home: Path, kind: RecordKind) -> list[object]:
    with open_ledger(home) as ledger:
        return list(ledger.records(kind=kind))


def test_defaults_without_a_file(tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    policy = load_policy(site.home)
    assert policy.digest is None
    assert policy.real("privacy.epsilon_cap") == 10.0
    assert not (site.home / POLICY_FILE).exists()


def test_a_change_is_recorded_and_read_back(tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    after = set_value(site.home, "privacy.epsilon_cap", "4", "Dr DPO", "board decision 12")
    assert load_policy(site.home).real("privacy.epsilon_cap") == 4.0
    (record,) = _records(site.home, RecordKind.SITE_POLICY_CHANGED)
    assert record.fields["old"] == 10.0 and record.fields["new"] == 4.0  # type: ignore[attr-defined]
    assert record.fields["approver"] == "Dr DPO"  # type: ignore[attr-defined]
    assert record.fields["policy_digest"] == after.digest  # type: ignore[attr-defined]
    assert not list(site.home.glob(".site-policy-*"))


def test_a_hand_edited_policy_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    set_value(site.home, "privacy.epsilon_cap", "4", "Dr DPO", "board decision 12")
    path = site.home / POLICY_FILE
    path.write_text(path.read_text().replace("4.0", "1000.0"))
    with pytest.raises(SitePolicyTampered, match="edited outside"):
        load_policy(site.home)


def test_a_deleted_policy_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    set_value(site.home, "privacy.epsilon_cap", "4", "Dr DPO", "board decision 12")
    (site.home / POLICY_FILE).unlink()
    with pytest.raises(SitePolicyTampered, match="missing"):
        load_policy(site.home)


def test_a_policy_file_nobody_recorded_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    (site.home / POLICY_FILE).write_text("[privacy]\nepsilon_cap = 1000.0\n")
    with pytest.raises(SitePolicyTampered):
        load_policy(site.home)


@pytest.mark.parametrize(("key", "value"), [
    ("privacy.epsilon_cap", "1e308"), ("privacy.epsilon_cap", "nan"),
    ("privacy.epsilon_cap", "-1"), ("transfer.max_validity_days", "365000"),
    ("audit.policy_sha256", "md5:abc"), ("privacy.no_such_key", "1"),
])
def test_values_outside_the_bounds_are_refused_and_nothing_recorded(
        tmp_path: Path, key: str, value: str) -> None:
    site = make_site(tmp_path, "CHU-X")
    with pytest.raises(SitePolicyError):
        set_value(site.home, key, value, "Dr DPO", "why")
    assert not (site.home / POLICY_FILE).exists()
    assert _records(site.home, RecordKind.SITE_POLICY_CHANGED) == []


def test_a_change_without_approver_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    with pytest.raises(SitePolicyError, match="approver"):
        set_value(site.home, "privacy.epsilon_cap", "4", " ", "why")


def test_a_change_interrupted_before_its_rename_is_rolled_forward(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_site(tmp_path, "CHU-X")
    real_replace = os.replace
    calls = []

    def interrupted_once(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C between the record and the rename
        real_replace(src, dst)

    monkeypatch.setattr("transfer.site_policy.os.replace", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        set_value(site.home, "privacy.epsilon_cap", "4", "Dr DPO", "why")
    assert load_policy(site.home).real("privacy.epsilon_cap") == 4.0
    assert not list(site.home.glob(".site-policy-*"))


def test_a_change_killed_before_its_rename_is_finished_on_the_next_read(
        tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    set_value(site.home, "privacy.epsilon_cap", "4", "Dr DPO", "why")
    path = site.home / POLICY_FILE
    staged = site.home / ".site-policy-killed"
    path.rename(staged)  # what SIGKILL between the record and the rename leaves
    assert load_policy(site.home).real("privacy.epsilon_cap") == 4.0
    assert path.is_file() and not staged.exists()


def test_policy_cli_show_and_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site(tmp_path, "CHU-X")
    home = ["--home", str(site.home)]
    assert main(["site", "policy", "set", "privacy.epsilon_cap", "3", "--approver", "Dr DPO",
                 "--justification", "board", *home]) == 0
    assert main(["site", "policy", "show", "--json", *home]) == 0
    assert '"value": 3.0' in capsys.readouterr().out
    assert main(["site", "policy", "set", "privacy.epsilon_cap", "inf", "--approver", "A",
                 "--justification", "B", *home]) == 2
    assert capsys.readouterr().err.startswith("error:")


# -- the pseudonymisation key --------------------------------------------------------


def test_keyed_values_are_stable_and_purpose_separated(tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    a = keyed_id(site.home, "budget", "X-P000001")
    assert a == keyed_id(site.home, "budget", "X-P000001")
    assert a != keyed_id(site.home, "reserve", "X-P000001")
    assert a.startswith("hmac:") and "X-P000001" not in a
    fractions = [keyed_fraction(site.home, "split", f"X-P{i:06d}") for i in range(2000)]
    assert all(0.0 <= f < 1.0 for f in fractions)
    assert 0.45 < sum(fractions) / len(fractions) < 0.55
    key = site.home / pseudonym.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(_records(site.home, RecordKind.PSEUDONYM_KEY_CREATED)) == 1


def test_another_site_gets_other_values(tmp_path: Path) -> None:
    x, y = make_site(tmp_path, "CHU-X"), make_site(tmp_path, "CH-Y")
    assert keyed_id(x.home, "budget", "P1") != keyed_id(y.home, "budget", "P1")


def test_a_deleted_key_is_refused_not_recreated(tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    site_key(site.home)
    (site.home / pseudonym.KEY_FILE).unlink()
    with pytest.raises(PseudonymKeyError, match="missing"):
        site_key(site.home)
    assert not (site.home / pseudonym.KEY_FILE).exists()


def test_a_replaced_key_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path, "CHU-X")
    site_key(site.home)
    (site.home / pseudonym.KEY_FILE).write_bytes(os.urandom(32))
    with pytest.raises(PseudonymKeyError, match="not the one"):
        site_key(site.home)


def test_key_is_encrypted_when_the_site_has_a_passphrase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSERELLE_PASSPHRASE", "correct horse battery staple")
    site = make_site(tmp_path, "CHU-X", passphrase="correct horse battery staple")  # noqa: S106
    first = keyed_id(site.home, "budget", "P1")
    assert not (site.home / pseudonym.KEY_FILE).exists()
    sealed = site.home / pseudonym.SEALED_FILE
    assert sealed.is_file() and stat.S_IMODE(sealed.stat().st_mode) == 0o600
    assert keyed_id(site.home, "budget", "P1") == first


def test_key_survives_rotation(tmp_path: Path) -> None:
    from transfer.identity import rotate_site

    site = make_site(tmp_path, "CHU-X")
    before = keyed_id(site.home, "budget", "P1")
    rotate_site(site.home)
    assert keyed_id(site.home, "budget", "P1") == before


def test_no_identity_no_key(tmp_path: Path) -> None:
    from passerelle.errors import BadInput

    home = tmp_path / "bare"
    home.mkdir()
    with pytest.raises(BadInput):
        site_key(home)
    assert list(home.iterdir()) == []
