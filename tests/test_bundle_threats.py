"""Each threat of DESIGN.md (Threats) is refused with its own reason, and a refused
bundle leaves no plaintext and nothing in the registry.

Sites X (sender), Y (recipient) and Z (a third site) are real identities with real
keys; bundles are real (model-signing, pyrage, cryptography); models are tiny ONNX
graphs made in transfer_support so that these tests need no training.
"""

from __future__ import annotations

import io
import random
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest

from passerelle.errors import Refused
from registry.store import ModelStore
from tests.transfer_support import (
    MODEL,
    NOW,
    Site,
    assert_no_plaintext,
    forge,
    make_site,
    make_transfer,
    ship_dir,
    trust,
)
from transfer.archive import Limits, pack
from transfer.bundle import read_envelope
from transfer.errors import (
    DigestMismatch,
    Expired,
    MalformedBundle,
    NotAddressedToUs,
    RevokedSigner,
    Rollback,
    SignatureInvalid,
    StatementMismatch,
    UnsafeArchive,
    UnsafeModel,
    UntrustedSigner,
)
from transfer.exchange import receive_bundle, verify_bundle
from transfer.trust import TrustStore


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Site, Site, Site]:
    x, y, z = (make_site(tmp_path, n) for n in ("X", "Y", "Z"))
    trust(x, y, z)
    trust(y, x, z)
    trust(z, x, y)
    return x, y, z


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """One receiving registry for the module (MLflow's SQLite set-up is slow)."""
    root = tmp_path_factory.mktemp("registry")
    return ModelStore(root, f"sqlite:///{root / 'mlflow.db'}")


def registered(store: ModelStore) -> list[str]:
    return [m.name for m in store.client.search_registered_models()]


def refused_receive(bundle: Path, site: Site, store: ModelStore, error: type[Exception],
                    match: str | None = None, **kw: object) -> None:
    before = registered(store)
    with pytest.raises(error, match=match):
        receive_bundle(bundle, site.home, store, now=kw.pop("now", NOW),  # type: ignore[arg-type]
                       identity=site.identity, **kw)  # type: ignore[arg-type]
    assert registered(store) == before, "a refused bundle was registered"
    assert_no_plaintext(site.home)


def test_good_bundle_is_received_and_registered_with_lineage(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y, _ = sites
    bundle = forge(tmp_path / "ok.bundle", x, [y], ship_dir(tmp_path))
    result = receive_bundle(bundle, y.home, registry, now=NOW, identity=y.identity)
    tags = result.version.tags
    assert tags["passerelle.received_from"] == "X"
    assert tags["passerelle.source_model"] == MODEL and tags["passerelle.source_version"] == "1"
    assert tags["passerelle.bundle_digest"] == result.bundle_digest
    assert tags["passerelle.audit_verdict"] == "pass"
    assert (result.directory / "model" / "model.onnx").is_file()
    assert list((y.home / ".receiving").iterdir()) == []


def test_flipped_byte_anywhere_is_refused(sites: tuple[Site, Site, Site],
                                          tmp_path: Path) -> None:
    x, y, _ = sites
    bundle = forge(tmp_path / "ok.bundle", x, [y], ship_dir(tmp_path))
    data = bundle.read_bytes()
    env = read_envelope(bundle)
    rng = random.Random(4)  # noqa: S311 - positions, not secrets
    positions = {0, 19, 20, 23, 24, env.payload_offset - 1, env.payload_offset,
                 env.payload_offset + 100, len(data) - 1}
    positions |= {rng.randrange(len(data)) for _ in range(60)}
    positions |= {rng.randrange(env.payload_offset) for _ in range(30)}  # the header
    for pos in sorted(positions):
        evil = tmp_path / f"flip-{pos}.bundle"
        evil.write_bytes(data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) +
                         data[pos + 1:])
        with pytest.raises(Refused):
            verify_bundle(evil, y.home, now=NOW)
        assert_no_plaintext(y.home)
    verify_bundle(bundle, y.home, now=NOW)  # the original still verifies


def test_flipped_payload_byte_is_refused_before_decryption(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y, _ = sites
    bundle = forge(tmp_path / "ok.bundle", x, [y], ship_dir(tmp_path))
    data = bytearray(bundle.read_bytes())
    data[-10] ^= 0x01
    bundle.write_bytes(bytes(data))
    refused_receive(bundle, y, registry, DigestMismatch)


def test_truncated_bundle_is_refused(sites: tuple[Site, Site, Site], tmp_path: Path,
                                     registry: ModelStore) -> None:
    x, y, _ = sites
    bundle = forge(tmp_path / "ok.bundle", x, [y], ship_dir(tmp_path))
    data = bundle.read_bytes()
    for cut in (10, 30, read_envelope(bundle).payload_offset, len(data) - 1):
        bundle.write_bytes(data[:cut])
        refused_receive(bundle, y, registry, MalformedBundle)


def test_untrusted_signer_is_refused(sites: tuple[Site, Site, Site], tmp_path: Path,
                                     registry: ModelStore) -> None:
    _, y, _ = sites
    stranger = make_site(tmp_path / "elsewhere", "X")  # a trusted name, another key
    bundle = forge(tmp_path / "b", stranger, [y], ship_dir(tmp_path))
    refused_receive(bundle, y, registry, UntrustedSigner, "not in the trust store")


def test_revoked_signer_is_refused(sites: tuple[Site, Site, Site], tmp_path: Path,
                                   registry: ModelStore) -> None:
    x, y, _ = sites
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path))
    TrustStore(y.home).revoke(x.public.fingerprint)
    refused_receive(bundle, y, registry, RevokedSigner, "revoked")


def test_header_signed_by_another_trusted_key_is_refused(
        sites: tuple[Site, Site, Site], tmp_path: Path) -> None:
    x, y, z = sites
    # Z (trusted by Y) signs a header that claims to come from X.
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path), signer=z)
    with pytest.raises(SignatureInvalid, match="outer header"):
        verify_bundle(bundle, y.home, now=NOW)
    assert_no_plaintext(y.home)


def test_bundle_addressed_to_another_site_is_refused(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y, z = sites
    bundle = forge(tmp_path / "b", x, [z], ship_dir(tmp_path))
    refused_receive(bundle, y, registry, NotAddressedToUs, "addressed to Z")


def test_rollback_is_refused(sites: tuple[Site, Site, Site], tmp_path: Path,
                             registry: ModelStore) -> None:
    x, y, _ = sites
    ship = ship_dir(tmp_path)
    old = forge(tmp_path / "v1", x, [y], ship, version="1", sequence=1)
    new = forge(tmp_path / "v2", x, [y], ship, version="2", sequence=2)
    older_version = forge(tmp_path / "v1s3", x, [y], ship, version="1", sequence=3)
    other_copy = forge(tmp_path / "v2b", x, [y], ship, version="2", sequence=2)
    received = receive_bundle(new, y.home, registry, now=NOW, identity=y.identity)
    assert_no_plaintext(y.home, registry_empty=False)
    before = registered(registry)
    # older sequence, another bundle with the same sequence, older version
    for bundle in (old, other_copy, older_version):
        with pytest.raises(Rollback, match="not newer"):
            receive_bundle(bundle, y.home, registry, now=NOW, identity=y.identity)
        assert registered(registry) == before
        assert list((y.home / ".receiving").iterdir()) == []
    # the very bundle again: a no-op that says so, nothing registered twice
    again = receive_bundle(new, y.home, registry, now=NOW, identity=y.identity)
    assert again.already and again.version.ref == received.version.ref
    assert registered(registry) == before
    assert [p.name for p in received.directory.parent.iterdir()] == ["2-2"]


def test_expired_bundle_is_refused(sites: tuple[Site, Site, Site], tmp_path: Path,
                                   registry: ModelStore) -> None:
    x, y, _ = sites
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path), validity=timedelta(hours=1))
    refused_receive(bundle, y, registry, Expired, "expired", now=NOW + timedelta(hours=2))
    refused_receive(bundle, y, registry, Expired, "future", now=NOW - timedelta(hours=1))


def test_mix_and_match_header_and_payload_is_refused(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y, _ = sites
    ship = ship_dir(tmp_path)
    a = make_transfer(x.identity, [y.public], MODEL, "1", 1, NOW)
    # The header of bundle A (version 1), re-signed over the payload of bundle B (v2).
    bundle = forge(tmp_path / "mixed", x, [y], ship, version="2", sequence=2,
                   header_transfer=a)
    refused_receive(bundle, y, registry, StatementMismatch, "does not match the outer header")


def test_recipient_reencrypting_to_a_third_site_is_refused(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y, z = sites
    ship = ship_dir(tmp_path)
    to_y = make_transfer(x.identity, [y.public], MODEL, "1", 1, NOW)
    # Y forwards X's signed model directory (statement: X -> Y) under its own header to Z.
    forwarded = forge(tmp_path / "fwd", y, [z], ship, statement_transfer=to_y,
                      inner_signer=x)
    refused_receive(forwarded, z, registry, SignatureInvalid, "model signature")
    # Y re-signs it with its own key: the signed statement still names X -> Y.
    resigned = forge(tmp_path / "fwd2", y, [z], ship, statement_transfer=to_y)
    refused_receive(resigned, z, registry, StatementMismatch, "re-encrypted")


def test_model_changed_after_signing_is_refused(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y, _ = sites

    def edit_card(staged: Path) -> None:
        (staged / "model" / "model_card.json").write_text('{"format": "evil"}')

    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path), tamper_unsigned=edit_card)
    refused_receive(bundle, y, registry, SignatureInvalid, "model signature")


def test_statement_naming_another_site_is_refused(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y, z = sites
    to_z = make_transfer(x.identity, [z.public], MODEL, "1", 1, NOW)
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path), statement_transfer=to_z)
    refused_receive(bundle, y, registry, StatementMismatch)


def _add(t: tarfile.TarFile, name: str, data: bytes = b"x", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    t.addfile(info, io.BytesIO(data) if info.isreg() else None)


@pytest.mark.parametrize(("name", "members", "reason"), [
    ("absolute path", lambda t: _add(t, "/tmp/evil"), "absolute path"),
    ("dot-dot", lambda t: _add(t, "model/../../evil"), r"'\.\.'"),
    ("symlink", lambda t: _add(t, "model/link", b"", type=tarfile.SYMTYPE,
                              linkname="/etc/passwd"), "links"),
    ("hard link", lambda t: _add(t, "model/hard", b"", type=tarfile.LNKTYPE,
                                linkname="model/model.onnx"), "links"),
    ("device", lambda t: _add(t, "model/dev", b"", type=tarfile.CHRTYPE, devmajor=1,
                             devminor=3), "devices"),
    ("fifo", lambda t: _add(t, "model/fifo", b"", type=tarfile.FIFOTYPE), "FIFO"),
    ("duplicate", lambda t: _add(t, "model/model.onnx", b"\x00"), "duplicate"),
    ("too many members", lambda t: [_add(t, f"model/f{i}") for i in range(70)],
     "more than 64"),
])
def test_unsafe_archive_member_is_refused(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore, name: str,
        members: object, reason: str) -> None:
    x, y, _ = sites
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path),
                   extra_members=members)  # type: ignore[arg-type]
    refused_receive(bundle, y, registry, UnsafeArchive, reason)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_archive_size_bomb_is_refused(sites: tuple[Site, Site, Site], tmp_path: Path,
                                      registry: ModelStore) -> None:
    x, y, _ = sites
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path),
                   extra_members=lambda t: _add(t, "model/big.bin", bytes(200_000)))
    refused_receive(bundle, y, registry, UnsafeArchive, "exceeds",
                    limits=Limits(max_total_bytes=100_000))


@pytest.mark.parametrize(("kind", "reason"), [
    ("external", "external data"),
    ("nested-external", "external data"),
    ("function", "model-local functions"),
    ("domain", "operator domain 'com.evil'"),
])
def test_unsafe_onnx_model_is_refused(sites: tuple[Site, Site, Site], tmp_path: Path,
                                      registry: ModelStore, kind: str, reason: str) -> None:
    x, y, _ = sites
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path, kind))
    refused_receive(bundle, y, registry, UnsafeModel, reason)


def test_bundle_encrypted_for_another_key_is_refused(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    from transfer.errors import DecryptionFailed

    x, y, z = sites
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path), encrypt_to=[z])
    refused_receive(bundle, y, registry, DecryptionFailed, "cannot decrypt")


def test_bundle_from_a_passphrase_protected_site_is_received(
        tmp_path: Path, registry: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "phrase for X"  # noqa: S105 - a test passphrase
    x = make_site(tmp_path, "X", passphrase=secret)
    y = make_site(tmp_path, "Y")
    monkeypatch.setenv("PASSERELLE_PASSPHRASE", secret)  # X signs its trust record
    trust(x, y)
    monkeypatch.delenv("PASSERELLE_PASSPHRASE")
    trust(y, x)
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path))
    assert secret.encode() not in bundle.read_bytes()
    result = verify_bundle(bundle, y.home, now=NOW)
    assert result.decrypted and result.statement is not None


def test_model_name_that_would_escape_the_install_folder_is_refused() -> None:
    from transfer.statement import Header

    doc = {"format": "passerelle-bundle-header", "format_version": 1,
           "payload": {"digest": "sha256:" + "a" * 64, "size": 10},
           "transfer": {"sender": {"site": "X", "fingerprint": "sha256:" + "b" * 64},
                        "recipients": [{"site": "Y", "fingerprint": "sha256:" + "c" * 64}],
                        "model": "../../evil", "version": "1", "sequence": 1,
                        "created": "2026-06-01T12:00:00+00:00",
                        "expires": "2026-06-08T12:00:00+00:00"}}
    with pytest.raises(MalformedBundle, match="not a valid model name"):
        Header.from_json(doc)
    doc["transfer"]["model"] = "ok"  # type: ignore[index]
    doc["transfer"]["sequence"] = True  # type: ignore[index]
    with pytest.raises(MalformedBundle, match="whole numbers"):
        Header.from_json(doc)


def test_garbage_onnx_is_refused(tmp_path: Path) -> None:
    from transfer.onnx_safety import check_model

    path = tmp_path / "model.onnx"
    noise = random.Random(1).randbytes(4096)  # noqa: S311 - test data, not a secret
    for data in (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", noise):
        path.write_bytes(data)
        with pytest.raises(UnsafeModel):
            check_model(path)


def test_cli_refusal_is_one_line_with_exit_code_1(
        sites: tuple[Site, Site, Site], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    from passerelle.cli import main

    x, y, _ = sites
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path), now=datetime.now(UTC))
    assert main(["bundle", "verify", str(bundle), "--home", str(y.home), "--json"]) == 0
    assert '"decrypted": true' in capsys.readouterr().out
    data = bytearray(bundle.read_bytes())
    data[-1] ^= 0x80
    bundle.write_bytes(bytes(data))
    for command in ("verify", "receive"):
        assert main(["bundle", command, str(bundle), "--home", str(y.home)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and "digest differs" in err
        assert len(err.strip().splitlines()) == 1
    assert_no_plaintext(y.home)


def test_data_smuggled_after_the_end_of_the_archive_is_refused(
        sites: tuple[Site, Site, Site], tmp_path: Path, registry: ModelStore) -> None:
    x, y, _ = sites
    ship = ship_dir(tmp_path)
    kept: dict[str, bytes] = {}

    def remember(staged: Path) -> None:
        buf = io.BytesIO()
        pack(staged, buf)
        kept["tar"] = buf.getvalue()

    def smuggle(tar: Path) -> None:
        tar.write_bytes(kept["tar"] + b"\x00" * 1024 + b"hidden")

    bundle = forge(tmp_path / "b", x, [y], ship, tamper_unsigned=remember, replace_tar=smuggle)
    refused_receive(bundle, y, registry, UnsafeArchive, "after the end of the archive")
