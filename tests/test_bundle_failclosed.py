"""Every path from untrusted bytes ends in the project's own refusal (recorded, nothing
left), every shipped file is signed, the outer header has one byte form, the site caps
validity, received models are never merged into local ones, keys keep their protection.

Bundles are real (model-signing, pyrage, cryptography) and forged by
tests.transfer_support, changing one thing; the malicious archives are made here by
deterministic code.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from passerelle.cli import main
from passerelle.digests import canonical_json
from passerelle.errors import BadInput
from registry.store import ModelStore, NameTaken, VersionRef
from tests.transfer_support import (
    NOW,
    Site,
    assert_no_plaintext,
    forge,
    make_site,
    payload_of,
    ship_dir,
    trust,
)
from transfer.acts import recorder
from transfer.bundle import MAGIC, read_envelope
from transfer.errors import (
    BadIdentityFile,
    DecryptionFailed,
    IdentityError,
    MalformedBundle,
    SignatureInvalid,
    UnsafeArchive,
    ValidityTooLong,
)
from transfer.exchange import create_bundle, receive_bundle
from transfer.identity import (
    AGE_PLAIN_FILE,
    AGE_SEALED_FILE,
    PBKDF2_ITERATIONS,
    SIGNING_KEY_FILE,
    PublicIdentity,
    identity_dir,
    load_site,
    rotate_site,
)
from transfer.ledger import Ledger, ledger_url
from transfer.records import RecordKind

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Site, Site]:
    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    trust(y, x)
    return x, y


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("registry")
    return ModelStore(root, f"sqlite:///{root / 'mlflow.db'}")


def refusals(home: Path) -> list[dict[str, object]]:
    with Ledger(ledger_url(home), "Y") as ledger:
        return [dict(r.fields) for r in ledger.records(kind=RecordKind.BUNDLE_REFUSED)]


def refused(bundle: Path, y: Site, store: ModelStore, error: type[Exception],
            match: str) -> dict[str, object]:
    """Receive ``bundle``: refused with ``error``, recorded, nothing left."""
    models = [m.name for m in store.client.search_registered_models()]
    before = len(refusals(y.home))
    with pytest.raises(error, match=match):
        receive_bundle(bundle, y.home, store, now=NOW, identity=y.identity)
    assert_no_plaintext(y.home)
    assert [m.name for m in store.client.search_registered_models()] == models
    records = refusals(y.home)
    assert len(records) == before + 1
    assert records[-1]["check"] == error.__name__
    return records[-1]


def _tar(*members: tuple[str, bytes, bytes]) -> bytes:
    """A ustar stream of (name, type, data) members, as tarfile writes them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def _raw_header(name: bytes, kind: bytes, size: int) -> bytes:
    """One 512-byte header block of ``kind`` (any type letter), with a valid checksum."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\x00"
    block[124:136] = b"%011o\x00" % size
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


# ------------------------------------------------------------------ untrusted bytes

def test_deeply_nested_json_header_is_refused_not_a_recursion_error(
        sites: tuple[Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    _, y = sites
    nested = b"[" * 30_000 + b"]" * 30_000  # 60 KB, within the header size limit
    bundle = tmp_path / "nested.bundle"
    bundle.write_bytes(MAGIC + len(nested).to_bytes(4, "big") + nested)
    with pytest.raises(MalformedBundle, match="nested deeper"):
        read_envelope(bundle)
    refused(bundle, y, registry, MalformedBundle, "nested deeper")


def test_deeply_nested_identity_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.identity.json"
    path.write_bytes(b"{\"a\":" * 10_000 + b"1" + b"}" * 10_000)  # 60 KB
    with pytest.raises(BadIdentityFile, match="nested deeper"):
        PublicIdentity.from_file(path)


def test_corrupted_age_chunk_is_a_decryption_refusal(
        sites: tuple[Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y = sites
    ship = ship_dir(tmp_path)
    (ship / "model.onnx").write_bytes((ship / "model.onnx").read_bytes() + bytes(300_000))
    good = forge(tmp_path / "good.bundle", x, [y], ship)
    cipher = bytearray(payload_of(good, tmp_path / "p.age").read_bytes())
    cipher[len(cipher) // 2] ^= 0x01  # inside a middle STREAM chunk
    (tmp_path / "bad.age").write_bytes(bytes(cipher))
    bundle = forge(tmp_path / "bad.bundle", x, [y], ship, payload_of=tmp_path / "bad.age")
    refused(bundle, y, registry, DecryptionFailed, "cannot decrypt")


@pytest.mark.parametrize(("name", "payload", "reason"), [
    ("file then a member below it",
     lambda: _tar(("model", tarfile.REGTYPE, b"x"), ("model/x", tarfile.REGTYPE, b"y")),
     "below a file"),
    ("3,000 GNU long-name headers",
     lambda: b"".join(_raw_header(b"././@LongLink", b"L", 512) + bytes(512)
                      for _ in range(3000)) + bytes(1024),
     "GNU long names"),
    ("PAX sparse map",
     lambda: _raw_header(b"PaxHeaders/x", b"x", 40) + b"40 GNU.sparse.map=0,1,zz,2,3,4,5,6,7\n"
     .ljust(512, b"\x00") + bytes(1024),
     "PAX extended headers"),
    ("150 kB PAX header (CVE-2024-6232)",
     lambda: _raw_header(b"PaxHeaders/x", b"x", 150_000)
     + (b"%d path=" % 150_000).ljust(150_000, b"a") + bytes(-150_000 % 512) + bytes(1024),
     "PAX extended headers"),
    ("GNU tar magic", lambda: _tar(("model", tarfile.DIRTYPE, b""))[:257] + b"ustar  \x00"
     + bytes(512 - 265) + bytes(1024), "not a POSIX ustar header"),
])
def test_archive_outside_the_subset_we_write_is_refused(
        sites: tuple[Site, Site], tmp_path: Path, registry: ModelStore, name: str,
        payload: object, reason: str) -> None:
    x, y = sites
    data = payload()  # type: ignore[operator]

    def replace(tar: Path) -> None:
        tar.write_bytes(data)

    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path), replace_tar=replace)
    refused(bundle, y, registry, UnsafeArchive, reason)


# ------------------------------------------------------------------ every file signed

@pytest.mark.parametrize("smuggled", ["model/.git/config", "model/.github/payload.onnx",
                                      "model/.gitattributes", "model/notes.txt"])
def test_file_outside_the_signature_or_layout_is_refused(
        sites: tuple[Site, Site], tmp_path: Path, registry: ModelStore,
        smuggled: str) -> None:
    x, y = sites

    def add(staged: Path) -> None:
        (staged / smuggled).parent.mkdir(parents=True, exist_ok=True)
        (staged / smuggled).write_bytes(b"[core]\n")

    after = forge(tmp_path / "after", x, [y], ship_dir(tmp_path, name="a"),
                  tamper_unsigned=add)  # added after signing
    refused(after, y, registry, UnsafeArchive, "unexpected")
    signed = forge(tmp_path / "signed", x, [y], ship_dir(tmp_path, name="b"),
                   tamper_stage=add)  # added, then signed: still not a shipped file
    refused(signed, y, registry, UnsafeArchive, "unexpected")


def test_model_signature_covers_git_paths(sites: tuple[Site, Site], tmp_path: Path) -> None:
    from model_signing import verifying

    from transfer.bundle import _hashing_config, sign_model_dir

    x, _ = sites
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"onnx")
    (model / ".gitignore").write_text("*\n")
    sign_model_dir(x.identity, model, tmp_path / "model.sig")
    (model / ".gitignore").write_text("changed\n")
    pub = tmp_path / "x.pub"
    pub.write_text(x.public.signing_key_pem)
    config = verifying.Config().set_hashing_config(_hashing_config())  # type: ignore[no-untyped-call]
    with pytest.raises(ValueError, match="mismatch"):
        config.use_elliptic_key_verifier(public_key=pub).verify(model, tmp_path / "model.sig")


# ------------------------------------------------------------------ canonical header

def _resigned(bundle: Path, out: Path, change: object) -> Path:
    env = read_envelope(bundle)
    signature = change(env.signature)  # type: ignore[operator]
    raw = canonical_json({"header": env.header_doc, "signature": signature})
    with bundle.open("rb") as f:
        f.seek(env.payload_offset)
        out.write_bytes(MAGIC + len(raw).to_bytes(4, "big") + raw + f.read())
    return out


def _high_s(signature: str) -> str:
    r, s = decode_dss_signature(base64.b64decode(signature))
    return base64.b64encode(encode_dss_signature(r, P256_N - s)).decode()


def _loose_base64(signature: str) -> str:
    body = signature.rstrip("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(body[-1]) ^ 1  # an unused low bit: the same bytes decode
    return body[:-1] + alphabet[last] + signature[len(body):]


@pytest.mark.parametrize(("change", "reason"), [(_high_s, "high-s"),
                                                (_loose_base64, "not canonical")])
def test_rewritten_header_signature_is_refused(
        sites: tuple[Site, Site], tmp_path: Path, registry: ModelStore, change: object,
        reason: str) -> None:
    x, y = sites
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path))
    rewritten = _resigned(bundle, tmp_path / "rewritten", change)
    assert rewritten.read_bytes() != bundle.read_bytes()
    refused(rewritten, y, registry, SignatureInvalid, reason)


# ------------------------------------------------------------------ site policy, names

def test_validity_longer_than_the_site_allows_is_refused(
        sites: tuple[Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y = sites
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path), validity=timedelta(days=91))
    refused(bundle, y, registry, ValidityTooLong, "longer than this site accepts")
    with pytest.raises(BadInput, match="longer than this site allows"):
        create_bundle(x.home, ModelStore(x.home), VersionRef("m", "1"), ["Y"],
                      tmp_path / "out.bundle", validity=timedelta(days=1000))
    assert not (tmp_path / "out.bundle").exists()


def test_received_model_is_never_merged_into_a_local_model(
        sites: tuple[Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y = sites
    registry.client.create_registered_model("X.pmsi-coder")  # a local model of that name
    try:
        bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path))
        refused(bundle, y, registry, NameTaken, "not merged")
        assert registry.versions("X.pmsi-coder") == []
    finally:
        registry.client.delete_registered_model("X.pmsi-coder")


# ------------------------------------------------------------------ keys

def _iterations(pem: bytes) -> int:
    from asn1crypto import pem as asn1pem  # type: ignore[import-untyped]
    from asn1crypto.keys import EncryptedPrivateKeyInfo  # type: ignore[import-untyped]

    _, _, der = asn1pem.unarmor(pem)
    algorithm = EncryptedPrivateKeyInfo.load(der)["encryption_algorithm"]
    return int(algorithm["parameters"]["key_derivation_func"]["parameters"]
               ["iteration_count"].native)


def test_rotation_of_a_passphrase_site_keeps_its_keys_encrypted(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    site = make_site(tmp_path, "P", passphrase="correct horse")  # noqa: S106
    monkeypatch.setenv("PASSERELLE_PASSPHRASE", "correct horse")
    assert main(["site", "rotate", "--home", str(site.home)]) == 0
    folder = identity_dir(site.home)
    pem = (folder / SIGNING_KEY_FILE).read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert _iterations(pem) == PBKDF2_ITERATIONS == 600_000
    assert (folder / AGE_SEALED_FILE).is_file() and not (folder / AGE_PLAIN_FILE).exists()
    for retired in (folder / "retired").iterdir():
        assert (retired / SIGNING_KEY_FILE).read_bytes().startswith(b"-----BEGIN ENCRYPTED")
        assert not (retired / AGE_PLAIN_FILE).exists()
    monkeypatch.delenv("PASSERELLE_PASSPHRASE")
    with pytest.raises(IdentityError, match="passphrase"):
        load_site(site.home)
    rotated = load_site(site.home, "correct horse")
    assert rotated.fingerprint != site.identity.fingerprint
    with pytest.raises(IdentityError, match="wrong passphrase"):
        load_site(site.home, "wrong")


def test_keys_written_with_the_old_kdf_still_load(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    site = make_site(tmp_path, "O")
    path = identity_dir(site.home) / SIGNING_KEY_FILE
    old = site.identity.signing_key.private_bytes(  # PBKDF2, 2,048 iterations
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    path.write_bytes(old)
    assert load_site(site.home, "pw").fingerprint == site.identity.fingerprint


def test_failed_rotation_leaves_the_old_identity_whole_and_no_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site(tmp_path, "R")
    folder = identity_dir(site.home)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with recorder(site.home, site.identity):
        pass
    with Ledger(ledger_url(site.home), "R") as ledger:
        count = ledger.count()
    blocker = site.home / f".identity-old-{os.getpid()}"  # the swap's rename fails
    (blocker / "busy").mkdir(parents=True)
    with pytest.raises(IdentityError, match="cannot rotate"):
        rotate_site(site.home)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert not (folder / "retired").exists()
    assert load_site(site.home).fingerprint == site.identity.fingerprint
    assert [p.name for p in site.home.iterdir() if p.name.startswith(".identity-")] == \
        [blocker.name]
    with Ledger(ledger_url(site.home), "R") as ledger:
        assert ledger.count() == count
        assert ledger.records(kind=RecordKind.TRUST_ROTATED) == []
    assert main(["site", "rotate", "--home", str(site.home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_ask_passphrase_without_a_terminal_is_bad_input(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PASSERELLE_PASSPHRASE"}
    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "passerelle.cli", "site", "init", "A",
                           "--ask-passphrase", "--home", str(home)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and "no terminal" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (home / "identity").exists()


def test_two_concurrent_senders_never_share_a_sequence_number(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    code = ("import sys; from pathlib import Path; from transfer.bundle import "
            "reserve_sequence; print(' '.join(str(reserve_sequence(Path(sys.argv[1]), "
            "'m')) for _ in range(25)))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    numbers = [int(n) for p in procs for n in p.communicate(timeout=120)[0].split()]
    assert sorted(numbers) == list(range(1, 76))
    assert json.loads((home / "transfer" / "sent.json").read_text()) == {"m": 75}
