"""Acts append records, the two sites' ledgers are linked, digests are checked against
MLflow, and the compliance officer's report opens in headless Chromium.

One story (module fixture, one xdist group): sites X and Y pin each other; X registers,
audits and exports a real trained model and sends it to Y; Y receives it, then refuses a
replay. Then each test checks what the ledgers say, or breaks one thing.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from passerelle import steps
from passerelle.cli import main
from passerelle.errors import PasserelleError
from registry.audit.policy import load_policy
from registry.export import Override
from registry.store import TAG, ModelStore, VersionRef
from tests.audit_support import sealed
from tests.conftest import small_config
from transfer.bundle import read_envelope
from transfer.errors import Rollback
from transfer.exchange import CreatedBundle, ReceivedModel, create_bundle, receive_bundle
from transfer.identity import init_site, public_identity
from transfer.ledger import Ledger
from transfer.ledger_errors import ActNotRecorded, LedgerUnreachable
from transfer.ledger_site import open_ledger
from transfer.records import Record, RecordKind
from transfer.trust import TrustStore

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ledger_acts")]
MODEL = "pmsi-coder"


@dataclass(frozen=True)
class World:
    root: Path
    x: Path
    y: Path
    ref: VersionRef
    verdict: str
    created: CreatedBundle
    received: ReceivedModel


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, keras_model: steps.TrainReport,
          corpus_x: Path) -> World:
    root = tmp_path_factory.mktemp("acts")
    x, y = root / "x", root / "y"
    init_site(x, "X")
    init_site(y, "Y")
    TrustStore(x).add(public_identity(y))
    TrustStore(y).add(public_identity(x))
    store = ModelStore(x)
    train = sealed(x, corpus_x, root / "train")  # the audit's reserve, sealed before training
    steps.train_model(train, root / "model", small_config())
    info = steps.register_model(store, root / "model", MODEL, "aide au codage PMSI",
                                "RGPD art. 6(1)(e) et 9(2)(h)", data=train)
    policy = load_policy()
    policy = replace(policy, attacks=replace(policy.attacks, reference_models=4))
    audit = steps.audit_model(store, info.ref, train, corpus_x, policy, root / "audit")
    override = None if audit.verdict == "PASS" else \
        Override("Dr Claire Martin", "validated by the DPO after review of the audit")
    steps.export_model(store, info.ref, root / "export", override)
    created = create_bundle(x, store, info.ref, ["Y"], root / "coder.bundle")
    received = receive_bundle(created.path, y, ModelStore(y))
    again = receive_bundle(created.path, y, ModelStore(y))  # the very bundle: a no-op
    assert again.already and again.version.ref == received.version.ref
    replay = root / "replay.bundle"  # another copy of that transfer (its last byte changed)
    data = bytearray(created.path.read_bytes())
    data[-1] ^= 1
    replay.write_bytes(bytes(data))
    with pytest.raises(Rollback):  # a replay: refused, and recorded with its reason
        receive_bundle(replay, y, ModelStore(y))
    return World(root, x, y, info.ref, audit.verdict, created, received)


def tags_of(world: World) -> dict[str, str]:
    return dict(ModelStore(world.x).get(world.ref).tags)


def _records(home: Path) -> list[Record]:
    with open_ledger(home) as ledger:
        return ledger.records()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    code = main([*argv, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else {}), out.err


def test_every_act_at_the_source_is_recorded_with_its_digests(world: World) -> None:
    records = _records(world.x)
    export_kind = RecordKind.EXPORT if world.verdict == "PASS" else RecordKind.EXPORT_OVERRIDE
    assert [r.kind for r in records] == [
        RecordKind.TRUST_ADDED, RecordKind.PSEUDONYM_KEY_CREATED, RecordKind.RESERVE_SEALED,
        RecordKind.MODEL_REGISTERED, RecordKind.AUDIT_VERDICT, export_kind,
        RecordKind.BUNDLE_CREATED]
    trust, _, sealed_reserve, registered, audit, export, created = records
    assert sealed_reserve.fields["training_corpus"] == tags_of(world)[
        TAG + "dataset_fingerprint"]
    tags = ModelStore(world.x).get(world.ref).tags
    assert trust.fields["fingerprint"] == public_identity(world.y).fingerprint
    assert {s.digest for s in trust.subjects} == {public_identity(world.y).fingerprint}
    assert registered.fields["model_dir_digest"] == tags[TAG + "model_dir_digest"]
    assert registered.subjects[0].digest == tags[TAG + "model_dir_digest"]
    assert registered.fields["dataset_fingerprint"] == tags[TAG + "dataset_fingerprint"]
    assert audit.fields["verdict"] == world.verdict == tags[TAG + "audit.verdict"]
    assert audit.fields["policy_digest"] == tags[TAG + "audit.policy_digest"]
    assert {s.name.split(":")[0] for s in audit.subjects} == {"onnx", "audit-report", "policy"}
    assert export.fields["onnx_digest"] == tags[TAG + "onnx_digest"]
    if export_kind is RecordKind.EXPORT_OVERRIDE:
        assert export.fields["approver"] == "Dr Claire Martin"
        assert export.fields["justification"].startswith("validated by the DPO")
    header = read_envelope(world.created.path).header
    assert created.fields["bundle"] == header.payload_digest
    assert created.fields["to"] == ["Y"]
    assert header.ledger_record == created.id  # carried in the signed outer header


def test_receiver_names_the_senders_bundle_created_record(world: World) -> None:
    created = _records(world.x)[-1]
    records = _records(world.y)
    assert [r.kind for r in records] == [RecordKind.TRUST_ADDED, RecordKind.BUNDLE_RECEIVED,
                                         RecordKind.BUNDLE_REFUSED]
    _, received, refused = records
    assert received.fields["peer_record"] == refused.fields["peer_record"] == created.id
    assert received.fields["from"] == "X" and received.fields["bundle"] == created.fields["bundle"]
    assert received.fields["local_version"] == world.received.version.ref.version
    assert refused.fields["check"] == "Rollback" and "not newer" in refused.fields["reason"]


def test_peer_check_matches_the_transfer_at_both_ends(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for home, name in ((world.x, "x"), (world.y, "y")):
        assert _cli(capsys, "records", "export", "--out", str(tmp_path / f"{name}.jsonl"),
                    "--home", str(home))[0] == 0
    code, at_y, err = _cli(capsys, "records", "verify", "--peer", str(tmp_path / "x.jsonl"),
                           "--home", str(world.y))
    assert code == 0, err
    assert at_y["peer"] == {"peer": "X", "peer_records": 7, "transfers_in": 2,
                            "transfers_out": 0, "consistent": True}
    code, at_x, err = _cli(capsys, "records", "verify", "--peer", str(tmp_path / "y.jsonl"),
                           "--home", str(world.x))
    assert code == 0, err
    assert at_x["peer"]["transfers_out"] == 2  # type: ignore[index]


def test_sender_dropping_its_bundle_created_record_is_caught_by_the_receiver(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(capsys, "records", "export", "--out", str(tmp_path / "x.jsonl"),
                "--home", str(world.x))[0] == 0
    lines = (tmp_path / "x.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "x-truncated.jsonl").write_text("".join(lines[:-1]))  # still a valid chain
    code, _, err = _cli(capsys, "records", "verify", "--peer",
                        str(tmp_path / "x-truncated.jsonl"), "--home", str(world.y))
    assert code == 1
    assert err.startswith("error: Y seq 1 (bundle_received") and "which X's ledger lacks" in err


def test_changed_mlflow_digest_is_caught_by_records_verify_and_the_report(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ModelStore(world.x)
    info = store.get(world.ref)
    good = info.tags[TAG + "model_dir_digest"]
    store.set_tags(info, {TAG + "model_dir_digest": "sha256:" + "0" * 64})
    try:
        code, _, err = _cli(capsys, "records", "verify", "--home", str(world.x))
        assert code == 1
        assert err.startswith("error: ledger broken at record seq 3 ")
        assert "model_dir_digest" in err and f"MLflow now holds for {world.ref}" in err
        code, doc, err = _cli(capsys, "report", "--out", str(tmp_path / "r.html"),
                              "--home", str(world.x))
        assert code == 1 and doc["integrity"] == {"verified": False, "summary": err[7:].split(
            " (the report")[0]}
        assert "Ledger integrity: BROKEN" in (tmp_path / "r.html").read_text()
    finally:
        store.set_tags(info, {TAG + "model_dir_digest": good})
    assert _cli(capsys, "records", "verify", "--home", str(world.x))[0] == 0


def test_failed_append_leaves_no_unrecorded_registration_export_or_bundle(
        world: World, keras_model: steps.TrainReport, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(world.x)
    versions = store.versions(MODEL)
    trust_file = (world.x / "trust.json").read_bytes()
    with open_ledger(world.x) as ledger:
        count = ledger.count()

    def refuse(*_args: object, **_kwargs: object) -> Record:
        raise LedgerUnreachable("ledger database: disk I/O error")

    monkeypatch.setattr(Ledger, "append", refuse)
    with pytest.raises(ActNotRecorded, match="model_registered could not be recorded"):
        steps.register_model(store, keras_model.out_dir, MODEL, "p", "b")
    assert store.versions(MODEL) == versions  # the version was taken back
    with pytest.raises(ActNotRecorded, match="could not be recorded"):
        steps.export_model(store, world.ref, tmp_path / "export", Override("A", "B"))
    assert not (tmp_path / "export").exists()
    with pytest.raises(ActNotRecorded, match="bundle_created could not be recorded"):
        create_bundle(world.x, store, world.ref, ["Y"], tmp_path / "b.bundle")
    assert list(tmp_path.iterdir()) == []  # no bundle, no leftovers
    with pytest.raises(ActNotRecorded, match="trust_revoked"):
        TrustStore(world.x).revoke(public_identity(world.y).fingerprint)
    assert (world.x / "trust.json").read_bytes() == trust_file
    monkeypatch.undo()
    with open_ledger(world.x) as ledger:
        assert ledger.count() == count


def test_unreachable_ledger_stops_the_act_before_it_happens(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PASSERELLE_LEDGER_URL", "postgresql+psycopg2://nobody@127.0.0.1:9/x")
    code, _, err = _cli(capsys, "model", "export", str(world.ref), "--out",
                        str(tmp_path / "export"), "--override", "--approver", "A",
                        "--justification", "B", "--home", str(world.x))
    assert code == 2 and err.startswith("error: ledger database ") and err.count("\n") == 1
    assert not (tmp_path / "export").exists()


def test_home_without_identity_acts_and_records_nothing(
        home: Path, keras_model: steps.TrainReport) -> None:
    steps.register_model(ModelStore(home), keras_model.out_dir, MODEL, "p", "b")
    assert not (home / "ledger.db").exists()


# -- the report in a real browser ---------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get if missing; fails (never skips) if it
    cannot be had."""
    found = shutil.which("chromium")
    if found is None:
        install = subprocess.run(["apt-get", "install", "-y", "chromium"],
                                 capture_output=True, text=True, timeout=900, check=False)
        found = shutil.which("chromium")
        if found is None:
            pytest.fail(f"chromium is not installed and apt-get failed: "
                        f"{install.stderr.strip()[-500:]}", pytrace=False)
    return found


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("report-screenshots")


def test_report_opens_in_chromium_with_verdict_identity_trust_transfers_and_roc(
        world: World, chromium: str, screenshots: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None]
) -> None:
    for home, name in ((world.x, "x"), (world.y, "y")):
        out = screenshots / f"report-{name}.html"
        code, doc, err = _cli(capsys, "report", "--out", str(out), "--home", str(home))
        assert code == 0, err
        assert doc["integrity"]["verified"] is True  # type: ignore[index]
        page = out.read_text(encoding="utf-8")
        # Self-contained: nothing to fetch, and a CSP that forbids fetching anyway.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
        assert "default-src 'none'" in page
        dom = _browser(chromium, tmp_path / f"profile-{name}-dom", "--dump-dom",
                       out.resolve().as_uri())
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert re.search(r'id="verdict" class="ok"', html)
        assert "Ledger integrity: VERIFIED" in html
        for section in ("identity", "trust", "transfers-out", "transfers-in", "dp-budget",
                        "records"):
            assert f'id="{section}"' in html, section
        assert "no fine-tuning run recorded" in html.lower()
        peer = "Y" if name == "x" else "X"
        assert public_identity(home).fingerprint in html
        assert public_identity(world.y if name == "x" else world.x).fingerprint in html
        assert f"from {peer}" in html if name == "y" else f"→ {peer}" in html
        if name == "x":
            assert re.search(r'<img class="roc"[^>]*src="data:image/png;base64,', html)
        else:
            assert "not newer than the last received" in html  # the refused replay
        shot = screenshots / f"report-{name}.png"
        run = _browser(chromium, tmp_path / f"profile-{name}-shot", f"--screenshot={shot}",
                       "--window-size=1280,2000", "--hide-scrollbars", out.resolve().as_uri())
        assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
        record_property("screenshot", str(shot))  # printed in the terminal summary


def test_report_refuses_a_home_without_identity(
        home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "report", "--out", str(home / "r.html"), "--home", str(home))
    assert code == 2 and err.startswith("error: ") and not (home / "r.html").exists()


def test_tampered_record_makes_the_report_say_broken(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "y"
    shutil.copytree(world.y, copy)
    with sqlite3.connect(copy / "ledger.db") as db:
        (envelope,) = db.execute("SELECT envelope FROM ledger_records WHERE seq = 2").fetchone()
        db.execute("UPDATE ledger_records SET envelope = ? WHERE seq = 2",
                   (envelope.replace('"sig":"', '"sig":"A', 1),))
    code, _, err = _cli(capsys, "report", "--out", str(tmp_path / "r.html"), "--home",
                        str(copy))
    assert code == 1 and "ledger broken at record seq 2" in err
    page = (tmp_path / "r.html").read_text()
    assert 'id="verdict" class="broken"' in page and "seq 2" in page


def test_passerelle_error_is_the_root_of_act_not_recorded() -> None:
    assert issubclass(ActNotRecorded, PasserelleError) and ActNotRecorded.exit_code == 2
