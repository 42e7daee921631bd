"""The transfer ledger: each attack on the stored chain is caught by `records verify`,
naming the first bad record; truncation is caught against a checkpoint or a peer's
export; concurrent appenders never fork the chain; a SIGKILL mid-append leaves the
record whole or absent. SQLite here; tests/test_ledger_postgres.py does PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from passerelle.cli import main
from passerelle.digests import canonical_json
from tests.ledger_support import kill_mid_append, run_concurrently, subject, write_key
from transfer.identity import init_site, load_site
from transfer.ledger import Ledger, cross_check, ledger_url, read_export
from transfer.ledger_errors import LedgerBroken, NotALedgerExport
from transfer.ledger_site import open_ledger, own_keys
from transfer.records import (
    EcdsaSigner,
    KeyRing,
    Record,
    RecordKind,
    bundle_arrived_fields,
    bundle_created_fields,
    seal,
    statement_of,
)
from transfer.trust import TrustStore

RECORDS = 6


def cli(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, str, str]:
    try:
        code = main(["records", *args, "--home", str(home)])
    except SystemExit as e:  # a usage error (e.g. a missing file), as argparse exits
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def make_site(root: Path, name: str) -> Path:
    home = root / name
    init_site(home, name)
    return home


def append(home: Path, kind: RecordKind, fields: dict[str, object], i: int = 0) -> Record:
    with open_ledger(home) as ledger:
        return ledger.append(kind, [subject(i)], fields, EcdsaSigner(load_site(home).signing_key))


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, list[Record]]:
    """Site X with six records, seq 0..5."""
    home = make_site(tmp_path, "X")
    records = [append(home, RecordKind.MODEL_REGISTERED, {"model": "m", "version": str(i)}, i)
               for i in range(RECORDS)]
    return home, records


@contextmanager
def stored(home: Path) -> Iterator[sqlite3.Connection]:
    """The ledger's SQLite file opened behind Passerelle's back (what an attacker does)."""
    with closing(sqlite3.connect(home / "ledger.db")) as db:
        yield db
        db.commit()


def envelope_at(home: Path, seq: int) -> str:
    with stored(home) as db:
        return str(db.execute("SELECT envelope FROM ledger_records WHERE seq = ?",
                              (seq,)).fetchone()[0])


def replace_at(home: Path, seq: int, record: Record) -> None:
    with stored(home) as db:
        db.execute("UPDATE ledger_records SET envelope = ?, record_id = ?, kind = ?, time = ? "
                   "WHERE seq = ?", (record.envelope, record.id, record.kind.value,
                                     record.time, seq))


def assert_broken_at(capsys: pytest.CaptureFixture[str], home: Path, seq: int, record_id: str,
                     why: str) -> None:
    code, out, err = cli(capsys, home, "verify")
    assert code == 1, (out, err)
    assert err.startswith("error: ledger broken at record seq ") and err.count("\n") == 1, err
    assert f"seq {seq} ({record_id})" in err, err
    assert why in err, err


# -- the untouched ledger -------------------------------------------------------------


def test_untouched_ledger_lists_shows_exports_and_verifies(
        site: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    home, records = site
    code, out, _ = cli(capsys, home, "verify", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["records"] == RECORDS and doc["head"]["id"] == records[-1].id
    code, out, _ = cli(capsys, home, "list", "--json", "--kind", "model_registered",
                       "--since", "2000-01-01")
    assert [r["id"] for r in json.loads(out)["records"]] == [r.id for r in records]
    code, out, _ = cli(capsys, home, "list", "--json", "--kind", "export")
    assert json.loads(out)["records"] == []
    code, out, _ = cli(capsys, home, "list", "--json", "--model", "other")
    assert json.loads(out)["records"] == []
    code, out, _ = cli(capsys, home, "list", "--json", "--model", "m", "--since", "2999-01-01")
    assert json.loads(out)["records"] == []
    code, out, _ = cli(capsys, home, "show", records[2].id[7:19], "--json")
    assert code == 0 and json.loads(out)["statement"]["predicate"]["seq"] == 2
    code, _, _ = cli(capsys, home, "export", "--out", str(tmp_path / "x.jsonl"))
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert code == 0 and lines == [r.envelope for r in records]
    # Readable without Passerelle: DSSE envelopes of in-toto statements.
    statement = json.loads(base64.b64decode(json.loads(lines[1])["payload"]))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicate"]["prev"] == records[0].id


# -- tampering with the stored chain ----------------------------------------------------


@pytest.mark.parametrize("where", ["payload", "keyid", "signature"])
def test_one_changed_byte_in_a_stored_record_is_detected(
        site: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str], where: str) -> None:
    home, records = site
    text = envelope_at(home, 3)
    field = {"payload": '"payload":"', "keyid": '"keyid":"sha256:', "signature": '"sig":"'}
    at = text.index(field[where]) + len(field[where]) + 20
    flipped = text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1:]
    with stored(home) as db:
        db.execute("UPDATE ledger_records SET envelope = ? WHERE seq = 3", (flipped,))
    assert_broken_at(capsys, home, 3, records[3].id, "")


def test_edited_statement_with_a_matching_id_fails_its_signature(
        site: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str]) -> None:
    """Change one field, keep every encoding canonical and the stored id consistent:
    only the signature can catch it."""
    home, _records = site
    env = json.loads(envelope_at(home, 3))
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicate"]["version"] = "3-edited"
    env["payload"] = base64.b64encode(canonical_json(statement)).decode()
    forged = canonical_json(env).decode()
    with stored(home) as db:
        db.execute("UPDATE ledger_records SET envelope = ?, record_id = ? WHERE seq = 3",
                   (forged, "sha256:" + hashlib.sha256(forged.encode()).hexdigest()))
    code, _, err = cli(capsys, home, "verify")
    assert code == 1 and "seq 3 (" in err and "does not verify" in err, err


def test_deleted_record_is_detected(site: tuple[Path, list[Record]],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    home, records = site
    with stored(home) as db:
        db.execute("DELETE FROM ledger_records WHERE seq = 3")
    assert_broken_at(capsys, home, 4, records[4].id, "records missing")


def test_two_swapped_records_are_detected(site: tuple[Path, list[Record]],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    home, records = site
    with stored(home) as db:
        db.execute("UPDATE ledger_records SET seq = -1 WHERE seq = 2")
        db.execute("UPDATE ledger_records SET seq = 2 WHERE seq = 3")
        db.execute("UPDATE ledger_records SET seq = 3 WHERE seq = -1")
    assert_broken_at(capsys, home, 2, records[3].id, "reordered")


class Impostor:
    """Signs with a stranger's key but claims another keyid."""

    def __init__(self, keyid: str, signer: EcdsaSigner) -> None:
        self.keyid = keyid
        self._signer = signer

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign(data)


@pytest.mark.parametrize("claimed", ["its own keyid", "the site's keyid"])
def test_record_signed_by_another_key_is_detected(
        site: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str],
        claimed: str) -> None:
    """A well-formed record at the right seq with the right prev, signed by a stranger."""
    home, records = site
    stranger = EcdsaSigner(ec.generate_private_key(ec.SECP256R1()))
    signer = stranger if claimed == "its own keyid" else Impostor(records[0].keyid, stranger)
    forged = seal(statement_of(RecordKind.EXPORT_OVERRIDE, (subject(3),),
                               {"model": "m", "approver": "nobody"}, seq=3,
                               prev=records[2].id, site="X", when=datetime.now(UTC)), signer)
    replace_at(home, 3, forged)
    why = "not a trusted key" if claimed == "its own keyid" else "does not verify"
    assert_broken_at(capsys, home, 3, forged.id, why)


def test_edited_filter_column_is_detected(site: tuple[Path, list[Record]],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Hiding a record from `records list --kind` by editing its stored kind."""
    home, records = site
    with stored(home) as db:
        db.execute("UPDATE ledger_records SET kind = 'finetune' WHERE seq = 1")
    assert_broken_at(capsys, home, 1, records[1].id, "stored kind, prev or time")


# -- truncation: only caught against something kept outside ------------------------


def test_truncation_passes_plain_verify_but_not_a_checkpoint(
        site: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    home, _records = site
    checkpoint = tmp_path / "elsewhere" / "x-checkpoint.json"
    assert cli(capsys, home, "checkpoint", "--out", str(checkpoint))[0] == 0
    assert cli(capsys, home, "verify", "--checkpoint", str(checkpoint))[0] == 0
    with stored(home) as db:
        db.execute("DELETE FROM ledger_records WHERE seq >= 4")
    assert cli(capsys, home, "verify")[0] == 0  # still a valid chain in itself
    code, _, err = cli(capsys, home, "verify", "--checkpoint", str(checkpoint))
    assert code == 1, err
    assert "ends at seq 3" in err and f"seq {RECORDS - 1}" in err and "truncation" in err


def test_checkpoint_signed_by_another_key_is_refused(
        site: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    home, _ = site
    with Ledger(ledger_url(home), "X") as ledger:
        ledger.checkpoint(EcdsaSigner(write_key(tmp_path / "k.pem")), tmp_path / "cp.json")
    code, _, err = cli(capsys, home, "verify", "--checkpoint", str(tmp_path / "cp.json"))
    assert code == 1 and "not a trusted key" in err, err


def _two_sites(root: Path) -> tuple[Path, Path, Record, Record]:
    """X sends a bundle to Y; Y receives it, naming X's record. Both trust each other."""
    x, y = make_site(root, "X"), make_site(root, "Y")
    for home, other in ((x, y), (y, x)):
        TrustStore(home).add(load_site(other).public)  # appends trust_added (seq 0)
    append(x, RecordKind.MODEL_REGISTERED, {"model": "m", "version": "1"})
    created = append(x, RecordKind.BUNDLE_CREATED, bundle_created_fields(
        to=["Y"], model="m", version="1", bundle="sha256:" + "c" * 64))
    append(y, RecordKind.TRUST_ADDED, {"peer": "X"})
    received = append(y, RecordKind.BUNDLE_RECEIVED, bundle_arrived_fields(
        sender="X", peer_record=created.id, model="m", version="1",
        bundle="sha256:" + "c" * 64))
    return x, y, created, received


def test_truncation_is_detected_against_a_peer_export(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y, created, received = _two_sites(tmp_path)
    x_export, y_export = tmp_path / "x.jsonl", tmp_path / "y.jsonl"
    for home, target in ((x, x_export), (y, y_export)):
        assert cli(capsys, home, "export", "--out", str(target))[0] == 0
    code, out, _ = cli(capsys, x, "verify", "--peer", str(y_export), "--json")
    assert code == 0 and json.loads(out)["peer"]["transfers_out"] == 1
    code, out, _ = cli(capsys, y, "verify", "--peer", str(x_export), "--json")
    assert code == 0 and json.loads(out)["peer"]["transfers_in"] == 1

    # Y drops its newest record (the receipt): still a valid chain, but X's export
    # shows a bundle addressed to Y that Y has no record of.
    with stored(y) as db:
        db.execute("DELETE FROM ledger_records WHERE seq = ?", (received.seq,))
    assert cli(capsys, y, "verify")[0] == 0
    code, _, err = cli(capsys, y, "verify", "--peer", str(x_export))
    assert code == 1 and created.id in err and "no bundle_received" in err, err
    # X, checking Y's fresh export, sees it too.
    assert cli(capsys, y, "export", "--out", str(y_export), "--force")[0] == 0
    code, _, err = cli(capsys, x, "verify", "--peer", str(y_export))
    assert code == 1 and created.id in err, err

    # X drops its bundle_created: Y's receipt names a record X's export lacks.
    with stored(x) as db:
        db.execute("DELETE FROM ledger_records WHERE seq = ?", (created.seq,))
    assert cli(capsys, x, "export", "--out", str(x_export), "--force")[0] == 0
    with stored(y) as db:  # put Y's receipt back
        db.execute("INSERT INTO ledger_records VALUES ('Y', ?, ?, ?, ?, ?, ?)",
                   (received.seq, received.id, received.prev, received.kind.value,
                    received.time, received.envelope))
    code, _, err = cli(capsys, y, "verify", "--peer", str(x_export))
    assert code == 1 and "X's ledger lacks" in err, err


def test_peer_export_with_a_broken_chain_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y, _, _ = _two_sites(tmp_path)
    assert cli(capsys, y, "export", "--out", str(tmp_path / "y.jsonl"))[0] == 0
    lines = (tmp_path / "y.jsonl").read_text().splitlines()
    (tmp_path / "y.jsonl").write_text(lines[1] + "\n")  # first record dropped
    code, _, err = cli(capsys, x, "verify", "--peer", str(tmp_path / "y.jsonl"))
    assert code == 1 and "seq 1" in err, err


# -- bad input ------------------------------------------------------------------------


def test_unknown_record_id_is_bad_input(site: tuple[Path, list[Record]],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = site
    for wrong in ("sha256:" + "0" * 64, "deadbeef", "not-an-id"):
        code, out, err = cli(capsys, home, "show", wrong)
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("content", [b"", b'{"a": 1}\n', b"\x00\xff\n",
                                     b'{"payloadType":"x","payload":"","signatures":[]}\n'])
def test_peer_file_that_is_not_a_ledger_export_is_bad_input(
        site: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str], tmp_path: Path,
        content: bytes) -> None:
    home, _ = site
    (tmp_path / "peer.jsonl").write_bytes(content)
    for flag in ("--peer", "--checkpoint"):
        code, _, err = cli(capsys, home, "verify", flag, str(tmp_path / "peer.jsonl"))
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    code, _, err = cli(capsys, home, "verify", "--peer", str(tmp_path / "missing.jsonl"))
    assert code == 2 and err.startswith("error: ")


def test_own_export_as_peer_is_bad_input(site: tuple[Path, list[Record]],
                                         capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    home, _ = site
    assert cli(capsys, home, "export", "--out", str(tmp_path / "x.jsonl"))[0] == 0
    code, _, err = cli(capsys, home, "verify", "--peer", str(tmp_path / "x.jsonl"))
    assert code == 2 and "this site (X) itself" in err, err


def test_peer_export_signed_by_an_untrusted_key_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y, _, _ = _two_sites(tmp_path)
    z = make_site(tmp_path, "Z")  # trusts nobody
    assert cli(capsys, y, "export", "--out", str(tmp_path / "y.jsonl"))[0] == 0
    code, _, err = cli(capsys, z, "verify", "--peer", str(tmp_path / "y.jsonl"))
    assert code == 1 and "the export of site Y" in err and "not a trusted key" in err, err
    with pytest.raises(NotALedgerExport), open_ledger(x) as ledger:
        cross_check(ledger.records(), read_export(tmp_path / "y.jsonl")[:0], "X")


@pytest.mark.parametrize("url", ["postgresql+psycopg2://postgres@127.0.0.1:1/x",
                                 "postgresql+psycopg://postgres@127.0.0.1/x",
                                 "mysql://root@127.0.0.1/x", "sqlite:////nonexistent/dir/l.db",
                                 "::not a url::"])
def test_unreachable_database_is_bad_input(site: tuple[Path, list[Record]],
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    home, _ = site
    for command in (["list"], ["verify"], ["show", "deadbeef00"]):
        code, out, err = cli(capsys, home, *command, "--ledger-url", url)
        assert code == 2 and out == "", (url, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
    monkeypatch.setenv("PASSERELLE_LEDGER_URL", url)
    code, _, err = cli(capsys, home, "export", "--out", str(home / "x.jsonl"))
    assert code == 2 and err.startswith("error: ") and not (home / "x.jsonl").exists()


def test_checkpoint_without_a_site_identity_is_bad_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, tmp_path / "nobody", "checkpoint", "--out",
                       str(tmp_path / "cp.json"))
    assert code == 2 and "site init" in err, err


# -- concurrency and crashes ------------------------------------------------------------


def test_concurrent_appenders_on_sqlite_never_fork_the_chain(tmp_path: Path) -> None:
    key = write_key(tmp_path / "key.pem")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    processes, each = 4, 100
    seconds, _outputs = run_concurrently(url, "X", tmp_path / "key.pem", processes, each)
    with Ledger(url, "X") as ledger:
        result = ledger.verify(KeyRing.of(key.public_key()))
        seqs = [r.seq for r in ledger.records()]
    assert result.count == processes * each and seqs == list(range(processes * each))
    workers = {r.fields["worker"] for r in ledger.records()}
    assert len(workers) == processes
    print(f"\nsqlite: {processes} processes x {each} appends in {seconds:.1f} s; "
          f"{result.count} records, chain verifies")


def test_sigkill_mid_append_leaves_a_verifiable_sqlite_ledger(tmp_path: Path) -> None:
    key = write_key(tmp_path / "key.pem")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    signer, ring = EcdsaSigner(key), KeyRing.of(key.public_key())
    with Ledger(url, "X") as ledger:
        for i in range(3):
            ledger.append(RecordKind.FINETUNE, [subject(i)], {"model": "m"}, signer)
    seq, killed_id = kill_mid_append(url, "X", tmp_path / "key.pem")
    assert seq == 3
    with Ledger(url, "X") as ledger:
        assert ledger.verify(ring).count == 3  # the uncommitted record is absent, whole
        assert killed_id not in {r.id for r in ledger.records()}
        after = ledger.append(RecordKind.FINETUNE, [subject(4)], {"model": "m"}, signer)
        assert after.seq == 3 and ledger.verify(ring).count == 4


def _rows(path: Path) -> int:
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            return int(db.execute("SELECT count(*) FROM ledger_records").fetchone()[0])
    except sqlite3.OperationalError:  # the first appender has not created the table yet
        return 0


def test_sigkill_at_random_moments_never_leaves_a_partial_record(tmp_path: Path) -> None:
    key = write_key(tmp_path / "key.pem")
    path = tmp_path / "ledger.db"
    ring, count = KeyRing.of(key.public_key()), 0
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-m", "tests.ledger_support", "append",
                                 f"sqlite:///{path}", "X", str(tmp_path / "key.pem"),
                                 "100000", "0"], cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 60
        while _rows(path) <= count and time.monotonic() < deadline:  # appending now
            time.sleep(0.02)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with Ledger(f"sqlite:///{path}", "X") as ledger:
            verified = ledger.verify(ring).count
        assert verified == _rows(path) > count
        count = verified


def test_verify_uses_retired_keys_after_a_rotation(
        site: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str]) -> None:
    from transfer.identity import rotate_site

    home, _ = site
    rotate_site(home)
    append(home, RecordKind.TRUST_ROTATED, {"note": "rotated"}, 99)
    assert len(own_keys(home).keys) == 2
    code, out, _ = cli(capsys, home, "verify", "--json")
    assert code == 0 and len(json.loads(out)["keyids"]) == 2


def test_library_verify_names_the_first_bad_record(site: tuple[Path, list[Record]]) -> None:
    home, records = site
    with stored(home) as db:
        db.execute("DELETE FROM ledger_records WHERE seq IN (2, 4)")
    with open_ledger(home) as ledger, pytest.raises(LedgerBroken) as caught:
        ledger.verify(own_keys(home))
    assert (caught.value.seq, caught.value.record_id) == (3, records[3].id)


def test_digest_checker_names_the_first_record_whose_artefact_changed(
        site: tuple[Path, list[Record]]) -> None:
    """The hook through which `records verify` compares digests with MLflow."""
    home, records = site

    def mlflow_says(record: Record) -> str | None:
        changed = record.fields.get("version") in ("2", "4")
        return f"model m/{record.fields['version']}: digest differs in MLflow" if changed else None

    with open_ledger(home) as ledger, pytest.raises(LedgerBroken) as caught:
        ledger.verify(own_keys(home), digest_checker=mlflow_says)
    assert (caught.value.seq, caught.value.record_id) == (2, records[2].id)
    assert "digest differs in MLflow" in str(caught.value)


def test_exported_record_verifies_without_passerelle(
        site: tuple[Path, list[Record]], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """A DPO with only `cryptography`, the export and the site's public identity file."""
    from cryptography.hazmat.primitives import hashes, serialization

    home, records = site
    assert cli(capsys, home, "export", "--out", str(tmp_path / "x.jsonl"))[0] == 0
    assert main(["site", "show", "--home", str(home), "--out", str(tmp_path / "x.id.json")]) == 0
    identity = json.loads((tmp_path / "x.id.json").read_text())
    key = serialization.load_pem_public_key(identity["signing_key"].encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    previous = None
    for line in (tmp_path / "x.jsonl").read_text().splitlines():
        env = json.loads(line)
        body, kind = base64.b64decode(env["payload"]), env["payloadType"].encode()
        pae = b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)
        assert env["signatures"][0]["keyid"] == identity["fingerprint"]
        key.verify(base64.b64decode(env["signatures"][0]["sig"]), pae,
                   ec.ECDSA(hashes.SHA256()))
        assert json.loads(body)["predicate"]["prev"] == previous
        previous = "sha256:" + hashlib.sha256(
            json.dumps(env, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert previous == records[-1].id


def test_unreachable_database_through_the_real_command_is_one_line_exit_2(
        site: tuple[Path, list[Record]]) -> None:
    home, _ = site
    proc = subprocess.run(
        [sys.executable, "-m", "passerelle.cli", "records", "verify", "--home", str(home),
         "--ledger-url", "postgresql+psycopg2://postgres@127.0.0.1:1/x"],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ledger database ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
