"""The ledger on a real PostgreSQL server (127.0.0.1:5432, a fresh database per run, see
conftest's ``postgres_db``): eight processes appending at once never fork the chain, a
SIGKILL mid-append leaves the record whole or absent, and tampering is caught there too.
These tests fail, never skip, when PostgreSQL is down."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy

from passerelle.cli import main
from tests.ledger_support import kill_mid_append, run_concurrently, subject, write_key
from transfer.identity import init_site, load_site
from transfer.ledger import Ledger
from transfer.records import EcdsaSigner, KeyRing, RecordKind

pytestmark = pytest.mark.postgres


def _site() -> str:
    return f"pg-{uuid.uuid4().hex[:10]}"  # the database is shared by this run's tests


def test_eight_concurrent_appenders_on_postgres_never_fork_the_chain(
        postgres_db: str, tmp_path: Path) -> None:
    key = write_key(tmp_path / "key.pem")
    site, processes, each = _site(), 8, 200
    seconds, _ = run_concurrently(postgres_db, site, tmp_path / "key.pem", processes, each)
    with Ledger(postgres_db, site) as ledger:
        result = ledger.verify(KeyRing.of(key.public_key()))
        records = ledger.records()
    assert result.count == processes * each == 1600
    assert [r.seq for r in records] == list(range(1600))
    assert len({r.fields["worker"] for r in records}) == processes
    print(f"\npostgresql: {processes} processes x {each} appends in {seconds:.1f} s; "
          f"{result.count} records, seqs 0..{records[-1].seq}, chain verifies")


def test_sigkill_mid_append_leaves_a_verifiable_postgres_ledger(
        postgres_db: str, tmp_path: Path) -> None:
    key = write_key(tmp_path / "key.pem")
    site, signer, ring = _site(), EcdsaSigner(key), KeyRing.of(key.public_key())
    with Ledger(postgres_db, site) as ledger:
        for i in range(3):
            ledger.append(RecordKind.FINETUNE, [subject(i)], {"model": "m"}, signer)
    seq, killed_id = kill_mid_append(postgres_db, site, tmp_path / "key.pem")
    assert seq == 3
    with Ledger(postgres_db, site) as ledger:
        # The server rolled the killed transaction back and released its lock.
        assert ledger.verify(ring).count == 3
        assert killed_id not in {r.id for r in ledger.records()}
        after = ledger.append(RecordKind.FINETUNE, [subject(4)], {"model": "m"}, signer)
        assert after.seq == 3 and ledger.verify(ring).count == 4


def test_deleted_record_on_postgres_is_detected(
        postgres_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, site = tmp_path / "home", _site()
    init_site(home, site)
    signer = EcdsaSigner(load_site(home).signing_key)
    with Ledger(postgres_db, site) as ledger:
        records = [ledger.append(RecordKind.EXPORT, [subject(i)], {"model": "m"}, signer)
                   for i in range(4)]
    args = ["records", "verify", "--home", str(home), "--ledger-url", postgres_db]
    assert main(args) == 0
    engine = sqlalchemy.create_engine(postgres_db)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DELETE FROM ledger_records WHERE site = :s AND seq = 1"),
                     {"s": site})
    engine.dispose()
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"seq 2 ({records[2].id})" in err and "records missing" in err, err
