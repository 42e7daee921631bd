"""Helpers for the bundle tests: sites, tiny ONNX models, and a tamper helper.

The tamper helper (``forge``) builds a bundle exactly as ``bundle create`` does, except
for the ONE thing a test changes, and re-signs everything with the right keys, so that
exactly one check can fail (python-tuf's ``modify_metadata`` pattern). The malicious
ONNX models and archives are made by deterministic code here, not by hand.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from passerelle.digests import sha256_file
from registry.store import TAG, ModelStore, VersionRef
from transfer.archive import pack
from transfer.bundle import (
    encrypt,
    make_transfer,
    private_workspace,
    sign_model_dir,
    stage,
    write_bundle,
)
from transfer.identity import PublicIdentity, SiteIdentity, init_site, load_site
from transfer.statement import Header, Transfer, TransferStatement
from transfer.trust import TrustStore

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
MODEL = "pmsi-coder"


@dataclass(frozen=True)
class Site:
    home: Path
    identity: SiteIdentity

    @property
    def public(self) -> PublicIdentity:
        return self.identity.public


def make_site(root: Path, name: str, passphrase: str | None = None) -> Site:
    home = root / f"home-{name}"
    init_site(home, name, passphrase)
    return Site(home, load_site(home, passphrase))


def trust(site: Site, *others: Site) -> None:
    store = TrustStore(site.home)
    for other in others:
        store.add(other.public)


# ------------------------------------------------------------------ tiny ONNX models

def tiny_onnx(kind: str = "ok") -> onnx.ModelProto:
    """A two-input Add model; ``kind`` makes it unsafe in one way."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 4], [0.5, -1.0, 2.0, 0.0])
    node = helper.make_node("Add", ["x", "w"], ["logits"])
    opsets = [helper.make_opsetid("", 17)]
    functions = []
    if kind == "external":
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 4])
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "../../../etc/passwd"), ("offset", "0"),
                           ("length", "16")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    elif kind == "nested-external":  # external data hidden in a subgraph attribute
        inner_w = TensorProto(name="v", data_type=TensorProto.FLOAT, dims=[1])
        inner_w.data_location = TensorProto.EXTERNAL
        entry = inner_w.external_data.add()
        entry.key, entry.value = "location", "/etc/shadow"
        out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])
        branch = helper.make_graph([helper.make_node("Identity", ["v"], ["o"])], "b", [],
                                   [out], [inner_w])
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        node = helper.make_node("If", ["c"], ["logits"], then_branch=branch,
                                else_branch=branch)
        w = cond
    elif kind == "domain":
        node = helper.make_node("Add", ["x", "w"], ["logits"], domain="com.evil")
        opsets.append(helper.make_opsetid("com.evil", 1))
    elif kind == "function":
        # A model-local function, even in the default domain, is refused.
        fn = helper.make_function("", "AddW", ["a", "b"], ["c"],
                                  [helper.make_node("Add", ["a", "b"], ["c"])],
                                  [helper.make_opsetid("", 17)])
        functions.append(fn)
        node = helper.make_node("AddW", ["x", "w"], ["logits"])
    graph = helper.make_graph([node], "tiny", [x], [y], [w])
    return helper.make_model(graph, opset_imports=opsets, functions=functions,
                             producer_name="passerelle-tests")


def ship_dir(root: Path, kind: str = "ok", name: str = "ship") -> Path:
    """A shippable folder as ``model export`` writes it, with a tiny model."""
    ship = root / f"{name}-{kind}"
    ship.mkdir(parents=True)
    (ship / "model.onnx").write_bytes(tiny_onnx(kind).SerializeToString())
    (ship / "vocabulary.json").write_text(json.dumps({"tokens": ["a", "b"]}))
    (ship / "labels.json").write_text(json.dumps({"I10": "Hypertension essentielle"}))
    (ship / "model_card.json").write_text(json.dumps({"format": "passerelle-model-card"}))
    return ship


# ------------------------------------------------------------------ tamper helper

ExtraMembers = Callable[[tarfile.TarFile], None]


def forge(out: Path, sender: Site, recipients: list[Site], ship: Path, *,
          version: str = "1", sequence: int = 1, now: datetime = NOW,
          validity: timedelta = timedelta(days=7),
          statement_transfer: Transfer | None = None,
          header_transfer: Transfer | None = None,
          tamper_stage: Callable[[Path], None] | None = None,
          tamper_unsigned: Callable[[Path], None] | None = None,
          inner_signer: Site | None = None,
          extra_members: ExtraMembers | None = None,
          replace_tar: Callable[[Path], None] | None = None,
          encrypt_to: list[Site] | None = None,
          payload_of: Path | None = None,
          signer: Site | None = None) -> Path:
    """Build a bundle like ``bundle create`` would, changing one thing; re-sign all."""
    signer = signer or sender
    transfer = make_transfer(sender.identity, [r.public for r in recipients], MODEL, version,
                             sequence, now, validity)
    statement = TransferStatement(
        transfer=statement_transfer or transfer, purpose="codage PMSI",
        legal_basis="RGPD art. 6(1)(e), 9(2)(h)", audit_verdict="pass",
        onnx_digest=sha256_file(ship / "model.onnx"))
    with private_workspace(out.parent, ".forge-") as work:
        inner = inner_signer or signer
        staged = stage(inner.identity, ship, statement, work)
        if tamper_stage is not None:  # change one thing, then re-sign with the right key
            tamper_stage(staged)
            sign_model_dir(inner.identity, staged / "model", staged / "model.sig")
        if tamper_unsigned is not None:  # change one thing after signing
            tamper_unsigned(staged)
        tar = work / "payload.tar"
        if replace_tar is not None:
            replace_tar(tar)
        else:
            buf = io.BytesIO()
            pack(staged, buf)
            data = buf.getvalue()
            if extra_members is not None:
                data = data[: _end_of_members(data)]
                extra = io.BytesIO()
                with tarfile.open(fileobj=extra, mode="w") as t:
                    extra_members(t)
                data = data + extra.getvalue()
            tar.write_bytes(data)
        cipher = work / "payload.age"
        if payload_of is not None:
            cipher = payload_of
        targets = encrypt_to if encrypt_to is not None else recipients
        if payload_of is None:
            digest, size = encrypt(tar, [s.public.age_recipient for s in targets], cipher)
        else:
            digest, size = sha256_file(cipher), cipher.stat().st_size
        header = Header(header_transfer or transfer, digest, size)
        write_bundle(out, header, signer.identity.signing_key, cipher)
    return out


def _end_of_members(tar_bytes: bytes) -> int:
    """Offset of the end-of-archive marker of a tar stream (to append members)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r") as t:
        members = t.getmembers()
        last = members[-1]
        end: int = last.offset_data + ((last.size + 511) // 512) * 512
    return end


def payload_of(bundle: Path, out: Path) -> Path:
    """Copy the age payload of ``bundle`` to ``out`` (for the age tool and mixing)."""
    from transfer.bundle import read_envelope

    env = read_envelope(bundle)
    with bundle.open("rb") as f:
        f.seek(env.payload_offset)
        out.write_bytes(f.read())
    return out


LEDGER_FILES = {"ledger.db", "ledger.db-wal", "ledger.db-shm"}  # the site's ledger
ALLOWED_AT_HOME = {"identity", "trust.json", "transfer", ".receiving", ".receiving.lock",
                   ".sending", ".sending.lock", ".mlflow.lock",
                   "mlflow.db", "mlartifacts", "received", *LEDGER_FILES}


def assert_no_plaintext(home: Path, registry_empty: bool = True) -> None:
    """After a refusal: nothing decrypted is left in the home, nothing was installed."""
    for child in home.iterdir():
        assert child.name in ALLOWED_AT_HOME, f"unexpected {child} left in the home"
    receiving = home / ".receiving"
    if receiving.exists():
        assert list(receiving.iterdir()) == [], f"plaintext left in {receiving}"
    received = home / "received"
    if received.exists():
        leftovers = [p for p in received.rglob("*") if p.is_file()]
        assert not leftovers or not registry_empty, f"installed despite refusal: {leftovers}"
    for root, _dirs, files in os.walk(home):
        for name in files:
            assert name not in {"payload.tar", "model.onnx", "transfer_statement.json"} or \
                not registry_empty, f"plaintext {root}/{name} left behind"


def received_home(root: Path, model_dir: Path, name: str = "pmsi-coder"
                  ) -> tuple[Path, VersionRef]:
    """Site Y's home (``root/home-y``) with ``model_dir`` registered and exported at X
    (``root/home-x``) and registered at Y as received from CHU-X, without a bundle: the
    short way the fine-tuning tests set up a received model."""
    from passerelle import steps
    from tests.conftest import TEST_OVERRIDE

    x_store = ModelStore(root / "home-x")
    info = steps.register_model(x_store, model_dir, name, "PMSI coding", "GDPR 6(1)(e)")
    steps.export_model(x_store, info.ref, root / "export", TEST_OVERRIDE)
    home_y = root / "home-y"
    home_y.mkdir()
    init_site(home_y, "CHU-Y")
    version = ModelStore(home_y).register_received(
        root / "export", name,
        {TAG + "source_model": name, TAG + "source_version": "1",
         TAG + "bundle_digest": "sha256:" + "ab" * 32, TAG + "received_from": "CHU-X"})
    return home_y, version.ref
