"""Interoperability with the standard tools: the inner signature verifies with the
``model_signing verify key`` command, the payload decrypts with the ``age`` tool.

Both tools are real. ``age`` comes from Debian (package ``age``): installed here when
missing and the tests run as root; the tests fail, never skip, when it cannot be had.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyrage  # type: ignore[import-untyped]
import pytest

from tests.transfer_support import Site, forge, make_site, payload_of, ship_dir, trust
from transfer.archive import pack, unpack
from transfer.bundle import read_envelope


@pytest.fixture(scope="session")
def age_tool() -> str:
    found = shutil.which("age")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and \
            shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "age"], check=False, env=env,
                       timeout=600)
        found = shutil.which("age")
    if found is None:
        pytest.fail("the `age` tool is not installed and could not be installed "
                    "(apt-get install age)", pytrace=False)
    return found


@pytest.fixture
def sent(tmp_path: Path) -> tuple[Site, Site, Path]:
    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    trust(y, x)
    return x, y, forge(tmp_path / "x-to-y.bundle", x, [y], ship_dir(tmp_path))


def _model_signing() -> str:
    return str(Path(sys.executable).parent / "model_signing")


def test_payload_decrypts_with_the_age_tool(age_tool: str, sent: tuple[Site, Site, Path],
                                            tmp_path: Path) -> None:
    _, y, bundle = sent
    payload = payload_of(bundle, tmp_path / "payload.age")
    out = tmp_path / "payload.tar"
    subprocess.run([age_tool, "--decrypt", "-i",
                    str(y.home / "identity" / "age_identity.txt"), "-o", str(out),
                    str(payload)], check=True, capture_output=True, timeout=120)
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "model.sig" in names and "model/model.onnx" in names
    assert "model/transfer_statement.json" in names
    with payload.open("rb") as src:
        mine = io.BytesIO()
        pyrage.decrypt_io(src, mine, [y.identity.age_identity])
    assert mine.getvalue() == out.read_bytes()


def test_payload_for_another_site_does_not_decrypt_with_the_age_tool(
        age_tool: str, sent: tuple[Site, Site, Path], tmp_path: Path) -> None:
    _, _, bundle = sent
    z = make_site(tmp_path, "Z")
    payload = payload_of(bundle, tmp_path / "payload.age")
    run = subprocess.run([age_tool, "--decrypt", "-i",
                          str(z.home / "identity" / "age_identity.txt"), str(payload)],
                         capture_output=True, timeout=120, check=False)
    assert run.returncode != 0 and run.stdout == b""


def test_inner_signature_verifies_with_the_model_signing_cli(
        age_tool: str, sent: tuple[Site, Site, Path], tmp_path: Path) -> None:
    x, y, bundle = sent
    payload = payload_of(bundle, tmp_path / "payload.age")
    tar = tmp_path / "payload.tar"
    subprocess.run([age_tool, "-d", "-i", str(y.home / "identity" / "age_identity.txt"),
                    "-o", str(tar), str(payload)], check=True, timeout=120)
    root = tmp_path / "unpacked"
    root.mkdir()
    unpack(tar, root)
    pub = tmp_path / "x.pub"
    pub.write_text(x.public.signing_key_pem)
    cmd = [_model_signing(), "verify", "key", str(root / "model"), "--signature",
           str(root / "model.sig"), "--public_key", str(pub)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    # The same command refuses another site's key and a changed file.
    other = tmp_path / "y.pub"
    other.write_text(y.public.signing_key_pem)
    wrong_key = subprocess.run([*cmd[:-1], str(other)], capture_output=True, timeout=300,
                               check=False)
    assert wrong_key.returncode != 0
    (root / "model" / "labels.json").write_text("{}")
    changed = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
    assert changed.returncode != 0


def test_packing_is_deterministic(tmp_path: Path) -> None:
    ship = ship_dir(tmp_path)
    first = io.BytesIO()
    pack(ship, first)
    os.utime(ship / "model.onnx", (1, 1))
    (ship / "labels.json").chmod(0o600)
    second = io.BytesIO()
    pack(ship, second)
    assert first.getvalue() == second.getvalue()
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {
        (0, 0, 0, "", 0o644)}


def test_bundle_layout_is_magic_header_then_age_payload(
        sent: tuple[Site, Site, Path]) -> None:
    _, _, bundle = sent
    env = read_envelope(bundle)
    with bundle.open("rb") as f:
        assert f.read(20) == b"PASSERELLE-BUNDLE/1\n"
        f.seek(env.payload_offset)
        assert f.read(len(b"age-encryption.org/v1\n")) == b"age-encryption.org/v1\n"
