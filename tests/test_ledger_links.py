"""Receipts and refusals name the sender's record only when the header is authentic;
trust decisions and key rotations are recorded; tiny models, no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from passerelle.cli import main
from registry.store import ModelStore
from tests.transfer_support import NOW, forge, make_site, ship_dir, trust
from transfer.errors import UntrustedSigner
from transfer.exchange import receive_bundle
from transfer.identity import public_identity, rotate_site
from transfer.ledger_site import open_ledger
from transfer.records import Record, RecordKind
from transfer.trust import TrustStore


def _records(home: Path) -> list[Record]:
    with open_ledger(home) as ledger:
        return ledger.records()


def test_refusal_of_an_untrusted_sender_keeps_its_claims_apart(tmp_path: Path) -> None:
    x, y, z = (make_site(tmp_path, n) for n in ("X", "Y", "Z"))
    trust(y, x)
    trust(z, y)  # Z is unknown to Y, yet signs a bundle "to Y"
    bundle = forge(tmp_path / "b", z, [y], ship_dir(tmp_path))
    with pytest.raises(UntrustedSigner):
        receive_bundle(bundle, y.home, ModelStore(y.home), now=NOW)
    refused = _records(y.home)[-1]
    assert refused.kind is RecordKind.BUNDLE_REFUSED
    assert refused.fields["check"] == "UntrustedSigner"
    assert refused.fields["claimed_from"] == "Z" and "from" not in refused.fields
    assert "peer_record" not in refused.fields and "model" not in refused.fields
    assert refused.fields["bundle_file"].startswith("sha256:")


def test_bundle_without_a_sender_record_is_reported_by_the_peer_check(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    trust(y, x)
    # forge() writes a header without ledger_record, as a site without a ledger would.
    bundle = forge(tmp_path / "b", x, [y], ship_dir(tmp_path))
    receive_bundle(bundle, y.home, ModelStore(y.home), now=NOW)
    received = _records(y.home)[-1]
    assert received.kind is RecordKind.BUNDLE_RECEIVED
    assert received.fields["peer_record"] is None and received.fields["from"] == "X"
    assert main(["records", "export", "--out", str(tmp_path / "x.jsonl"),
                 "--home", str(x.home)]) == 0
    capsys.readouterr()
    assert main(["records", "verify", "--peer", str(tmp_path / "x.jsonl"),
                 "--home", str(y.home)]) == 1
    assert "which X's ledger lacks" in capsys.readouterr().err


def test_trust_add_revoke_and_rotations_are_recorded_and_verify(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    trust(y, x)  # Y pins X's first key
    old = public_identity(x.home).fingerprint
    new = rotate_site(x.home)  # X's own rotation, signed by the key it retires
    TrustStore(y.home).add(new)  # Y accepts X's signed rotation
    TrustStore(y.home).revoke(new.fingerprint)
    kinds_x = [(r.kind, r.fields.get("fingerprint")) for r in _records(x.home)]
    assert kinds_x == [(RecordKind.TRUST_ADDED, y.public.fingerprint),
                       (RecordKind.TRUST_ROTATED, new.fingerprint)]
    rotation = _records(x.home)[1]
    assert rotation.keyid == old and rotation.fields["previous_fingerprint"] == old
    assert [r.kind for r in _records(y.home)] == [
        RecordKind.TRUST_ADDED, RecordKind.TRUST_ROTATED, RecordKind.TRUST_REVOKED]
    for home in (x.home, y.home):
        assert main(["records", "verify", "--home", str(home), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["verified"] is True
