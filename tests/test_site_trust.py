"""Site identities and the trust store: key files, passphrases, pinning, rotation,
revocation; through the library and the command line."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from passerelle.cli import main
from tests.transfer_support import make_site
from transfer.errors import BadIdentityFile, IdentityError, RevokedSigner, TrustError
from transfer.identity import (
    PASSPHRASE_ENV,
    PublicIdentity,
    init_site,
    load_site,
    public_identity,
    rotate_site,
)
from transfer.trust import AddOutcome, Status, TrustStore


def test_site_init_creates_private_keys_readable_only_by_the_owner(tmp_path: Path) -> None:
    home = tmp_path / "x"
    public = init_site(home, "X")
    folder = home / "identity"
    for name in ("signing_key.pem", "age_identity.txt"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert public.fingerprint.startswith("sha256:") and public.age_recipient.startswith("age1")
    with pytest.raises(IdentityError, match="already exists"):
        init_site(home, "X")


def test_passphrase_encrypts_both_private_keys(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "x"
    secret = "correct horse battery staple"  # noqa: S105 - a test passphrase
    init_site(home, "X", passphrase=secret)
    folder = home / "identity"
    assert b"ENCRYPTED" in (folder / "signing_key.pem").read_bytes()
    assert not (folder / "age_identity.txt").exists()
    sealed = (folder / "age_identity.age").read_bytes()
    assert b"AGE-SECRET-KEY" not in sealed and stat.S_IMODE(
        (folder / "age_identity.age").stat().st_mode) == 0o600
    for path in folder.rglob("*"):
        assert secret.encode() not in path.read_bytes()
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(IdentityError, match="wrong passphrase"):
        load_site(home)
    monkeypatch.setenv(PASSPHRASE_ENV, secret)
    assert load_site(home).site == "X"
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(IdentityError, match="passphrase-protected"):
        load_site(home)  # no terminal under pytest, no variable: refused, not prompted


def test_forged_identity_file_is_refused(tmp_path: Path) -> None:
    x = make_site(tmp_path, "X")
    doc = x.public.to_json()
    doc["site"] = "Y"  # rename the site without re-signing
    with pytest.raises(BadIdentityFile, match="self-signature"):
        PublicIdentity.from_json(doc)
    doc = x.public.to_json()
    doc["fingerprint"] = "sha256:" + "0" * 64
    with pytest.raises(BadIdentityFile, match="fingerprint"):
        PublicIdentity.from_json(doc)


def test_second_key_for_a_trusted_site_without_rotation_is_refused(tmp_path: Path) -> None:
    y = make_site(tmp_path, "Y")
    x = make_site(tmp_path, "X")
    impostor = make_site(tmp_path / "elsewhere", "X")
    store = TrustStore(y.home)
    assert store.add(x.public) is AddOutcome.PINNED
    assert store.add(x.public) is AddOutcome.UNCHANGED
    with pytest.raises(TrustError, match="already trusted"):
        store.add(impostor.public)
    assert [e.identity.fingerprint for e in TrustStore(y.home).entries()] == [
        x.public.fingerprint]


def test_rotation_signed_by_the_trusted_key_replaces_it(tmp_path: Path) -> None:
    y = make_site(tmp_path, "Y")
    x = make_site(tmp_path, "X")
    store = TrustStore(y.home)
    store.add(x.public)
    rotated = rotate_site(x.home)
    assert rotated.previous_fingerprint == x.public.fingerprint
    assert public_identity(x.home) == rotated
    assert (x.home / "identity" / "retired").is_dir()
    assert TrustStore(y.home).add(rotated) is AddOutcome.ROTATED
    status = {e.identity.fingerprint: e.status for e in TrustStore(y.home).entries()}
    assert status == {x.public.fingerprint: Status.SUPERSEDED,
                      rotated.fingerprint: Status.TRUSTED}
    assert TrustStore(y.home).recipient("X") == rotated


def test_rotation_vouched_for_by_a_revoked_key_is_refused(tmp_path: Path) -> None:
    y = make_site(tmp_path, "Y")
    x = make_site(tmp_path, "X")
    store = TrustStore(y.home)
    store.add(x.public)
    store.revoke(x.public.fingerprint)
    rotated = rotate_site(x.home)  # e.g. by a thief holding the compromised key
    with pytest.raises(RevokedSigner, match="revoked"):
        TrustStore(y.home).add(rotated)
    with pytest.raises(RevokedSigner, match="cannot be trusted again"):
        TrustStore(y.home).add(x.public)


def test_cli_site_and_trust_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hx, hy = tmp_path / "x", tmp_path / "y"
    assert main(["site", "init", "X", "--home", str(hx), "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert main(["site", "init", "Y", "--home", str(hy)]) == 0
    capsys.readouterr()
    ident = tmp_path / "x.identity.json"
    assert main(["site", "show", "--home", str(hx), "--out", str(ident)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["fingerprint"] == created["fingerprint"] == \
        json.loads(ident.read_text())["fingerprint"]
    assert main(["trust", "add", str(ident), "--home", str(hy), "--fingerprint",
                 "sha256:" + "1" * 64]) == 2
    assert "not the expected" in capsys.readouterr().err
    assert main(["trust", "add", str(ident), "--home", str(hy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "pinned"
    assert main(["trust", "list", "--home", str(hy), "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)["keys"]
    assert [(k["site"], k["status"]) for k in keys] == [("X", "trusted")]
    assert main(["trust", "revoke", created["fingerprint"], "--home", str(hy)]) == 0
    capsys.readouterr()
    assert main(["trust", "add", str(ident), "--home", str(hy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "revoked" in err and len(err.splitlines()) == 1
    assert main(["trust", "revoke", "nonsense", "--home", str(hy)]) == 2
    capsys.readouterr()
    ident.write_text("{not json")
    assert main(["trust", "add", str(ident), "--home", str(hy)]) == 1
    assert "not a JSON identity file" in capsys.readouterr().err


def test_cli_init_takes_the_passphrase_from_the_environment_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "s3cret-phrase")
    assert main(["site", "init", "X", "--home", str(tmp_path / "x")]) == 0
    out = capsys.readouterr()
    assert "s3cret-phrase" not in out.out + out.err
    assert b"ENCRYPTED" in (tmp_path / "x" / "identity" / "signing_key.pem").read_bytes()
    with pytest.raises(SystemExit):
        main(["site", "init", "Y", "--home", str(tmp_path / "y"), "--passphrase", "x"])


def test_after_rotation_bundles_signed_by_the_old_key_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.transfer_support import NOW, Site, forge, ship_dir, trust
    from transfer.errors import UntrustedSigner
    from transfer.exchange import verify_bundle

    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    trust(y, x)
    old = forge(tmp_path / "old.bundle", x, [y], ship_dir(tmp_path))
    assert main(["site", "rotate", "--home", str(x.home), "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["previous_fingerprint"] == x.public.fingerprint
    ident = tmp_path / "x2.json"
    assert main(["site", "show", "--home", str(x.home), "--out", str(ident)]) == 0
    capsys.readouterr()
    assert main(["trust", "add", str(ident), "--home", str(y.home), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "rotated"
    with pytest.raises(UntrustedSigner, match="replaced by a newer key"):
        verify_bundle(old, y.home, now=NOW)
    x2 = Site(x.home, load_site(x.home))
    new = forge(tmp_path / "new.bundle", x2, [y], ship_dir(tmp_path, name="ship2"))
    assert verify_bundle(new, y.home, now=NOW).decrypted


_KILLED_BEFORE_RECORD = """
import os, signal, sys
from pathlib import Path
import transfer.identity as identity
# SIGKILL at the exact point: keys swapped in, trust_rotated not yet appended
identity.record_rotation = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
identity.rotate_site(Path(sys.argv[1]))
"""


def _rotations(home: Path, site: str) -> list[tuple[str, str]]:
    from transfer.ledger import Ledger, ledger_url
    from transfer.records import RecordKind

    with Ledger(ledger_url(home), site) as ledger:
        return [(r.fields["previous_fingerprint"], r.fields["fingerprint"])
                for r in ledger.records(kind=RecordKind.TRUST_ROTATED)]


def _rotate_killed_before_record(home: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_RECORD, str(home)],
                          capture_output=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_rotation_killed_before_its_record_is_recorded_by_the_next_act(
        tmp_path: Path) -> None:
    """A ``site rotate`` SIGKILLed between the key swap and ``trust_rotated``: the new
    key is in place and no record names it; the next recorded act first appends the
    rotation, signed by the retired key, and the ledger verifies."""
    from transfer.ledger_site import verify_site

    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    _rotate_killed_before_record(x.home)
    current = public_identity(x.home)
    assert current.previous_fingerprint == x.public.fingerprint  # swapped in
    assert _rotations(x.home, "X") == []  # the detectable state: unrecorded
    assert (x.home / "identity" / "retired" / x.public.fingerprint[7:]).is_dir()

    assert TrustStore(x.home).add(y.public) is AddOutcome.PINNED  # the next act
    assert _rotations(x.home, "X") == [(x.public.fingerprint, current.fingerprint)]
    assert list(x.home.glob(".identity-old-*")) == []
    verify_site(x.home)
    TrustStore(x.home).add(y.public)  # and only once
    assert len(_rotations(x.home, "X")) == 1
    rotate_site(x.home)  # rotating again continues the chain
    assert len(_rotations(x.home, "X")) == 2
    verify_site(x.home)


def test_rotation_killed_before_its_record_without_the_retired_key_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from transfer.ledger import Ledger, ledger_url

    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    _rotate_killed_before_record(x.home)
    shutil.rmtree(x.home / "identity" / "retired")
    (tmp_path / "y.json").write_text(json.dumps(y.public.to_json()))
    with Ledger(ledger_url(x.home), "X") as ledger:
        before = ledger.count()
    assert main(["trust", "add", str(tmp_path / "y.json"), "--home", str(x.home)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "trust_rotated" in err[0]
    assert "restore" in err[0]
    with Ledger(ledger_url(x.home), "X") as ledger:
        assert ledger.count() == before  # nothing recorded, nothing trusted
    assert TrustStore(x.home).entries() == []


_KILLED_AT_RENAME = """
import os, signal, sys
from pathlib import Path
import transfer.identity as identity
# SIGKILL just before the N-th rename of the rotation's key swap
real, calls = os.rename, []
def rename(src, dst):
    calls.append(src)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
identity.os.rename = rename
identity.rotate_site(Path(sys.argv[1]))
"""


@pytest.mark.parametrize("rename", [1, 2])
def test_rotation_killed_during_its_key_swap_is_settled_by_the_next_command(
        tmp_path: Path, rename: int) -> None:
    """``site rotate`` SIGKILLed before its first rename (nothing swapped yet) or between
    its two renames (no ``identity/`` folder on disk): the next command finds a whole
    identity, the old one (the rotation did not happen) or the new one (rolled forward,
    then recorded by the next recorded act, signed by the retired key); the ledger
    verifies and nothing of the swap is left in the home."""
    import os
    import signal
    import subprocess
    import sys

    from transfer.identity import ROTATION_JOURNAL
    from transfer.ledger_site import verify_site

    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    TrustStore(x.home).add(y.public)  # a ledger with a record before the rotation
    proc = subprocess.run([sys.executable, "-c", _KILLED_AT_RENAME, str(x.home),
                           str(rename)], capture_output=True, timeout=120,
                          env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (x.home / ROTATION_JOURNAL).is_file()
    assert (x.home / "identity").is_dir() is (rename == 1)  # the state the kill left

    current = public_identity(x.home)  # the next command settles the swap
    assert not (x.home / ROTATION_JOURNAL).exists()
    assert load_site(x.home).fingerprint == current.fingerprint
    if rename == 1:
        assert current.fingerprint == x.public.fingerprint  # unchanged
        assert not (x.home / "identity" / "retired").exists()
        expected = []
    else:
        assert current.previous_fingerprint == x.public.fingerprint  # rolled forward
        assert (x.home / "identity" / "retired" / x.public.fingerprint[7:]).is_dir()
        expected = [(x.public.fingerprint, current.fingerprint)]
    z = make_site(tmp_path, "Z")
    assert TrustStore(x.home).add(z.public) is AddOutcome.PINNED  # the next recorded act
    assert _rotations(x.home, "X") == expected
    assert [p.name for p in x.home.iterdir() if p.name.startswith(".identity-")] == []
    verify_site(x.home)
    rotate_site(x.home)  # and the site can rotate again
    assert len(_rotations(x.home, "X")) == len(expected) + 1
    verify_site(x.home)


def test_records_verify_alone_detects_an_unrecorded_rotation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``records verify`` (which records nothing) refuses a home whose signing key is not
    the last one its ledger records, naming both keys; once the next act has recorded
    the rotation it verifies again."""
    from transfer.ledger import Ledger, ledger_url

    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    assert TrustStore(x.home).add(y.public) is AddOutcome.PINNED
    assert main(["records", "verify", "--home", str(x.home)]) == 0
    capsys.readouterr()
    _rotate_killed_before_record(x.home)
    current = public_identity(x.home).fingerprint
    with Ledger(ledger_url(x.home), "X") as ledger:
        before = ledger.count()
    assert main(["records", "verify", "--home", str(x.home)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "rotation was not recorded" in err[0]
    assert current in err[0] and x.public.fingerprint in err[0]
    with Ledger(ledger_url(x.home), "X") as ledger:
        assert ledger.count() == before  # verifying recorded nothing
    z = make_site(tmp_path, "Z")
    TrustStore(x.home).add(z.public)  # the next recorded act records the rotation
    assert main(["records", "verify", "--home", str(x.home)]) == 0
