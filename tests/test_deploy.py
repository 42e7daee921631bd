"""Deployment at the receiving site: predict, serve, signatures of own versions,
withdrawal notices and lineage, on a real transfer of the small reference coder.

One world per module (xdist group ``deploy``, so its tests run in order on one worker):
X registers and exports the coder, seals it for Y; Y receives it (``pmsi-coder/1``) and
fine-tunes it under DP for one epoch (``pmsi-coder/2``, signed by Y). Tests that tamper
restore what they changed; the irreversible acts (withdrawal, revocation) come last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from passerelle import steps
from passerelle.cli import main
from passerelle.corpus import manifest_digest
from registry.store import ModelStore, VersionRef
from tests.conftest import TEST_OVERRIDE
from transfer.exchange import create_bundle, receive_bundle
from transfer.identity import init_site, load_site
from transfer.ledger_site import open_ledger
from transfer.records import RecordKind
from transfer.scoring import parse_stay
from transfer.trust import TrustStore

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deploy")]

RECEIVED, OWN, SOURCE = "CHU-X.pmsi-coder/1", "CHU-X.pmsi-coder/2", "pmsi-coder/1"


@dataclass(frozen=True)
class World:
    root: Path
    x: Path
    y: Path
    z: Path  # a third site, trusted by nobody
    corpus_y: Path
    corpus_x: Path
    bundle: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, keras_model: steps.TrainReport,
          corpus_x: Path, corpus_y: Path) -> World:
    root = tmp_path_factory.mktemp("deploy")
    x, y, z = root / "x", root / "y", root / "z"
    for home, name in ((x, "CHU-X"), (y, "CH-Y"), (z, "CH-Z")):
        init_site(home, name)
    TrustStore(x).add(load_site(y).public)
    TrustStore(x).add(load_site(z).public)
    TrustStore(y).add(load_site(x).public)
    TrustStore(z).add(load_site(x).public)
    store_x = ModelStore(x)
    info = steps.register_model(store_x, keras_model.out_dir, "pmsi-coder", "PMSI coding",
                                "GDPR 6(1)(e)", corpus_x)
    steps.export_model(store_x, info.ref, root / "export", TEST_OVERRIDE)
    bundle = root / "coder-1.bundle"
    create_bundle(x, store_x, info.ref, ["CH-Y"], bundle)
    received = receive_bundle(bundle, y, ModelStore(y))
    assert str(received.version.ref) == RECEIVED
    options = steps.finetune_options(epsilon=3.0, epochs=1, expected_batch_size=16,
                                     drop_unknown_codes=True, noise_seed=1)
    tuned = steps.finetune_model(ModelStore(y), received.version.ref, corpus_y, options)
    assert str(tuned.version.ref) == OWN
    return World(root, x, y, z, corpus_y, corpus_x, bundle)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main([*argv, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 and out.out.strip() else None), out.err


def _records(home: Path, kind: RecordKind) -> list[Any]:
    with open_ledger(home) as ledger:
        return ledger.records(kind=kind)


def _artifact(home: Path, ref: str, path: str) -> Path:
    info = ModelStore(home).get(VersionRef.parse(ref))
    run_root = urllib.parse.urlparse(info.source).path.rsplit("/", 1)[0]
    return Path(run_root) / path


def _predict(capsys: pytest.CaptureFixture[str], w: World, ref: str, out: Path,
             data: Path | None = None, home: Path | None = None) -> tuple[int, Any, str]:
    return _run(capsys, "predict", ref, "--data", str(data or w.corpus_y), "--out", str(out),
                "--home", str(home or w.y))


# ------------------------------------------------------------------ predict


def test_received_version_codes_the_sites_stays(world: World, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "codes.jsonl"
    code, doc, err = _predict(capsys, world, RECEIVED, out)
    assert code == 0, err
    assert doc["origin"] == "received" and doc["signed_by"] == "CHU-X"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    stays = [json.loads(line) for line in (world.corpus_y / "stays.jsonl").read_text()
             .splitlines()]
    assert [r["stay_id"] for r in lines] == [s["stay_id"] for s in stays]
    first = lines[0]["codes"]
    assert len(first) == 5
    probs = [c["probability"] for c in first]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
    assert all(c["label"] for c in first)
    assert out.stat().st_mode & 0o077 == 0
    used = _records(world.y, RecordKind.MODEL_USED)[-1].fields
    assert (used["use"], used["stays"], used["version"]) == ("predict", len(stays), "1")
    assert not {"stay_id", "codes"} & set(used)  # counts only
    # the model is better than chance on Y's stays: it codes, it does not guess
    top5 = sum(s["main_diagnosis"] in {c["code"] for c in r["codes"]}
               for s, r in zip(stays, lines, strict=True)) / len(stays)
    assert top5 > 0.3


def test_finetuned_version_is_signed_by_y_with_its_lineage(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signed = _records(world.y, RecordKind.MODEL_SIGNED)
    assert len(signed) == 1 and signed[0].fields["version"] == "2"
    finetune = _records(world.y, RecordKind.FINETUNE)[0]
    assert signed[0].fields["finetune_record"] == finetune.id
    assert signed[0].fields["source"]["finetuned_from"] == RECEIVED
    lineage = json.loads(_artifact(world.y, OWN, "signed/lineage_statement.json").read_text())
    assert lineage["site"] == "CH-Y" and lineage["finetune_record"] == finetune.id
    assert lineage["source"]["received_from"] == "CHU-X"
    assert lineage["dataset"] == finetune.fields["dataset"]
    # anyone checks it with the standard model_signing tool and Y's public key
    model = tmp_path / "model"
    shutil.copytree(_artifact(world.y, OWN, "onnx"), model)
    (model / "MLmodel").unlink(missing_ok=True)  # MLflow's description, not signed
    shutil.copyfile(_artifact(world.y, OWN, "signed/lineage_statement.json"),
                    model / "lineage_statement.json")
    pub = tmp_path / "y.pub"
    pub.write_text(load_site(world.y).public.signing_key_pem)
    tool = subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", str(model), "--signature",
         str(_artifact(world.y, OWN, "signed/model.sig")), "--public_key", str(pub)],
        capture_output=True, text=True, timeout=120, check=False)
    assert tool.returncode == 0, tool.stderr
    out = tmp_path / "codes.jsonl"
    code, doc, err = _predict(capsys, world, OWN, out)
    assert code == 0, err
    assert doc["origin"] == "own" and doc["signed_by"] == "CH-Y"


def test_json_lines_say_exactly_what_the_coder_returns(world: World) -> None:
    from transfer.scoring import load_verified

    coder = load_verified(ModelStore(world.y), VersionRef.parse(OWN))
    stays = [parse_stay(json.loads(line), "t", coder.sections) for line in
             (world.corpus_y / "stays.jsonl").read_text().splitlines()[:40]]
    stays.append(parse_stay({"stay_id": 'quote " and é', "text": "douleur"}, "t",
                            coder.sections))
    texts = coder.code_json(stays, 7)
    assert [json.loads(t) for t in texts] == coder.code(stays, 7)
    # byte for byte the canonical dump (same batch: onnxruntime's last digits may depend
    # on the batch size)
    assert coder.code_json(stays[:1], 7)[0] == json.dumps(
        coder.code(stays[:1], 7)[0], ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def test_jsonl_stays_with_text_or_sections_are_coded(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stay = json.loads((world.corpus_y / "stays.jsonl").read_text().splitlines()[0])
    data = tmp_path / "stays.jsonl"
    data.write_text(json.dumps({"stay_id": "a", "sections": stay["sections"]}) + "\n"
                    + json.dumps({"text": stay["text"]}) + "\n")
    out = tmp_path / "codes.jsonl"
    code, doc, err = _predict(capsys, world, OWN, out, data)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stay_id"] for r in rows] == ["a", None] and doc["stays"] == 2


@pytest.mark.parametrize("line", ['{"stay_id": "a"}', "not json", '{"sections": "x"}',
                                  '["a list"]', '{"text": 3}'])
def test_malformed_stay_is_bad_input_and_writes_nothing(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str) -> None:
    data = tmp_path / "stays.jsonl"
    data.write_text('{"text": "douleur thoracique"}\n' + line + "\n")
    out = tmp_path / "codes.jsonl"
    code, _, err = _predict(capsys, world, RECEIVED, out, data)
    assert code == 2 and err.startswith("error:") and ("stay 2" in err or ":2:" in err), err
    assert not out.exists() and list(tmp_path.iterdir()) == [data]


def test_unknown_or_unsigned_versions_are_refused(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "codes.jsonl"
    code, _, err = _predict(capsys, world, "pmsi-coder/9", out)
    assert code == 2 and "no registered model version" in err
    # X's own Keras version: neither received nor signed by X as its own -> refused
    code, _, err = _predict(capsys, world, SOURCE, out, home=world.x)
    assert code == 1 and "nothing signed vouches for it" in err, err
    code, _, err = _predict(capsys, world, RECEIVED, world.root / "no" / "codes.jsonl")
    assert code == 2 and "no such directory" in err
    assert not out.exists()


def test_a_flag_cannot_lengthen_the_sites_check_interval(
        world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "serve", OWN, "--port", "0", "--check-interval", "31",
                        "--home", str(world.y))
    assert code == 2 and "deploy.check_interval_seconds (30 s)" in err, err


@pytest.mark.parametrize(("ref", "path"), [(RECEIVED, "onnx/model.onnx"),
                                           (OWN, "onnx/model.onnx"),
                                           (OWN, "onnx/labels.json"),
                                           (OWN, "signed/lineage_statement.json")])
def test_tampered_files_in_the_registry_are_refused_at_load(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], ref: str,
        path: str) -> None:
    target = _artifact(world.y, ref, path)
    original = target.read_bytes()
    uses = len(_records(world.y, RecordKind.MODEL_USED))
    try:
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        out = tmp_path / "codes.jsonl"
        code, _, err = _predict(capsys, world, ref, out)
        assert code == 1 and err.startswith("error:"), err
        # A received model's registry files are hard links to its verified install, so a
        # changed byte there is caught as "changed after it was received".
        assert ("signature does not verify" in err
                or "changed after it was received" in err), err
        assert not out.exists()
        assert list((world.y / ".receiving").iterdir()) == []
        assert not [p for p in world.y.iterdir() if p.name.startswith(".passerelle-")]
        assert len(_records(world.y, RecordKind.MODEL_USED)) == uses  # nothing coded
    finally:
        target.write_bytes(original)


def test_a_re_signed_model_whose_digest_differs_from_the_ledger_is_refused(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Whoever holds Y's key but not its ledger cannot swap the model: the digest in the
    ledger's finetune record decides."""
    from transfer.bundle import sign_model_dir

    onnx_dir = _artifact(world.y, OWN, "onnx")
    sig = _artifact(world.y, OWN, "signed/model.sig")
    saved = {p: p.read_bytes() for p in (*onnx_dir.iterdir(), sig)}
    try:
        received = _artifact(world.y, RECEIVED, "onnx/model.onnx")
        shutil.copyfile(received, onnx_dir / "model.onnx")  # another valid model
        work = tmp_path / "m"
        shutil.copytree(onnx_dir, work)
        (work / "MLmodel").unlink(missing_ok=True)  # not signed (transfer.deploy)
        lineage = json.loads(_artifact(world.y, OWN, "signed/lineage_statement.json")
                             .read_text())
        (work / "lineage_statement.json").write_bytes(
            _artifact(world.y, OWN, "signed/lineage_statement.json").read_bytes())
        sign_model_dir(load_site(world.y), work, sig)
        assert lineage["version"] == "2"
        out = tmp_path / "codes.jsonl"
        code, _, err = _predict(capsys, world, OWN, out)
        assert code == 1 and "differs from the digest recorded in the ledger" in err, err
        assert not out.exists()
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def test_received_version_is_refused_once_its_senders_key_is_revoked(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trust = world.y / "trust.json"
    saved = trust.read_bytes()
    try:
        TrustStore(world.y).revoke(load_site(world.x).fingerprint)
        out = tmp_path / "codes.jsonl"
        code, _, err = _predict(capsys, world, RECEIVED, out)
        assert code == 1 and "was revoked" in err and not out.exists(), err
        code, _, err = _predict(capsys, world, OWN, out)  # Y's own signature still holds
        assert code == 0, err
    finally:
        trust.write_bytes(saved)


# ------------------------------------------------------------------ serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(world: World, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "passerelle.cli", "serve", OWN, "--port", str(port),
             "--home", str(world.y), "--check-interval", "1", "--max-request-bytes", "65536",
             "--max-stays", "64", "--timeout", "1"],
            stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def test_server_speaks_mlflow_scoring_protocol_and_refuses_bad_requests(
        world: World, server: tuple[str, subprocess.Popen[str], Path]) -> None:
    import pandas as pd
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient
    from mlflow.version import VERSION

    url, proc, log = server
    port = int(url.rsplit(":", 1)[1])
    stays = [json.loads(line) for line in
             (world.corpus_y / "stays.jsonl").read_text().splitlines()[:3]]
    client = ScoringServerClient("127.0.0.1", port)  # MLflow's own client
    client.wait_server_ready(timeout=10)
    assert client.get_version() == VERSION
    frame = pd.DataFrame([{"stay_id": s["stay_id"], **s["sections"]} for s in stays])
    answer = client.invoke(frame)  # dataframe_split, as MLflow sends a DataFrame
    preds = answer["predictions"]
    assert [p["stay_id"] for p in preds] == [s["stay_id"] for s in stays]
    assert len(preds[0]["codes"]) == 5
    records = requests.post(f"{url}/invocations", json={"dataframe_records": [
        {"stay_id": s["stay_id"], "sections": s["sections"]} for s in stays]}, timeout=10)
    assert records.status_code == 200 and records.json()["predictions"] == preds
    instances = requests.post(f"{url}/invocations", json={"instances": [
        {"stay_id": s["stay_id"], "sections": s["sections"]} for s in stays]}, timeout=10)
    assert instances.json()["predictions"] == preds
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    served = _records(world.y, RecordKind.MODEL_USED)[-1].fields
    assert (served["use"], served["port"], served["version"]) == ("serve", port, "2")

    def refused(status: int, **kwargs: Any) -> dict[str, Any]:
        r = requests.post(f"{url}/invocations", timeout=10, **kwargs)
        assert r.status_code == status, r.text
        body: dict[str, Any] = r.json()
        assert set(body) == {"error_code", "message"}
        return body

    refused(400, json={"records": []})
    refused(400, json={"dataframe_records": [{"stay_id": "a"}]})
    refused(400, data=b"{not json", headers={"Content-Type": "application/json"})
    refused(415, data=b"a,b", headers={"Content-Type": "text/csv"})
    refused(413, data=b" " * 70000, headers={"Content-Type": "application/json"})
    refused(413, json={"instances": ["douleur"] * 65})
    assert requests.get(f"{url}/nowhere", timeout=5).status_code == 404
    # a client that announces a body and never sends it is cut off after --timeout (1 s),
    # and the server goes on serving the others
    with socket.create_connection(("127.0.0.1", port), timeout=15) as slow:
        slow.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000\r\n\r\n{")
        started = time.monotonic()
        assert requests.get(f"{url}/ping", timeout=5).status_code == 200
        assert slow.recv(1024) == b""  # closed by the server, no answer
        assert time.monotonic() - started < 10
    # one line per request: counts and latency, never the letters or the codes
    text = log.read_text()
    assert "POST /invocations 200 stays=3" in text and "POST /invocations 413" in text
    assert stays[0]["sections"]["motif"][:30] not in text
    assert preds[0]["codes"][0]["code"] not in text and stays[0]["stay_id"] not in text

    # a second server on the same port: exit 2, one line
    busy = subprocess.run(
        [sys.executable, "-m", "passerelle.cli", "serve", OWN, "--port", str(port),
         "--home", str(world.y)], capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert busy.returncode == 2 and busy.stderr.startswith("error: cannot listen"), busy.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


# ------------------------------------------------------------------ withdrawal


def test_withdrawal_at_x_reaches_y_and_a_running_server_stops_serving(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        server: tuple[str, subprocess.Popen[str], Path]) -> None:
    url, proc, _ = server
    notice = world.root / "withdraw-1.notice"
    code, _, err = _run(capsys, "model", "withdraw", SOURCE, "--reason", "x",
                        "--home", str(world.x))
    assert code == 2 and "--out FILE" in err  # it was sent: the notice is required
    assert ModelStore(world.x).get(VersionRef.parse(SOURCE)).tags.get(
        "passerelle.withdrawn") is None
    code, doc, err = _run(capsys, "model", "withdraw", SOURCE, "--reason",
                          "memorisation found after transfer", "--out", str(notice),
                          "--home", str(world.x))
    assert code == 0, err
    assert doc["recipients"] == ["CH-Y"] and doc["withdrawn"] == [SOURCE]
    assert ModelStore(world.x).get(VersionRef.parse(SOURCE)).tags["passerelle.withdrawn"]

    before = len(_records(world.y, RecordKind.NOTICE_RECEIVED))
    code, doc, err = _run(capsys, "notice", "receive", str(notice), "--home", str(world.y))
    assert code == 0, err
    assert doc["withdrawn"] == [RECEIVED, OWN] and doc["from"] == "CHU-X"
    assert len(_records(world.y, RecordKind.NOTICE_RECEIVED)) == before + 1
    store_y = ModelStore(world.y)
    assert all(store_y.get(VersionRef.parse(r)).tags["passerelle.withdrawn"] == "true"
               for r in (RECEIVED, OWN))
    for ref in (RECEIVED, OWN):
        out = tmp_path / f"{ref.replace('/', '-')}.jsonl"
        code, _, err = _predict(capsys, world, ref, out)
        assert code == 1 and "was withdrawn" in err and not out.exists(), err

    # the running server refuses it at its next check (interval 1 s)
    deadline = time.monotonic() + 15
    while requests.get(f"{url}/ping", timeout=5).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = requests.post(f"{url}/invocations", json={"instances": ["douleur"]}, timeout=10)
    assert r.status_code == 503 and "withdrawn" in r.json()["message"]
    assert proc.poll() is None


def test_tampered_replayed_and_untrusted_notices_are_refused(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notice = world.root / "withdraw-1.notice"
    refused_before = len(_records(world.y, RecordKind.NOTICE_REFUSED))
    received_before = len(_records(world.y, RecordKind.NOTICE_RECEIVED))
    # replay of the notice already applied
    code, _, err = _run(capsys, "notice", "receive", str(notice), "--home", str(world.y))
    assert code == 1 and "replay" in err, err
    # one byte of the reason changed (still canonical JSON): the signature fails
    tampered = tmp_path / "tampered.notice"
    tampered.write_bytes(notice.read_bytes().replace(b"memorisation", b"memorisatioN"))
    code, _, err = _run(capsys, "notice", "receive", str(tampered), "--home", str(world.y))
    assert code == 1 and "signature does not verify" in err, err
    # a notice by a site Y does not trust (Z signs one naming Y)
    code, _, err = _run(capsys, "notice", "receive", str(_notice_by(world.z, world.y)),
                        "--home", str(world.y))
    assert code == 1 and "not in the trust store" in err, err
    # a notice addressed to another site
    code, _, err = _run(capsys, "notice", "receive", str(notice), "--home", str(world.z))
    assert code == 1 and "not to this site" in err, err
    assert not (world.z / "mlflow.db").exists()  # a refused notice opens no registry
    refused = _records(world.y, RecordKind.NOTICE_REFUSED)
    assert len(refused) == refused_before + 3
    assert {r.fields["check"] for r in refused[-3:]} == {"Rollback", "SignatureInvalid",
                                                        "UntrustedSigner"}
    assert len(_records(world.y, RecordKind.NOTICE_RECEIVED)) == received_before


def _notice_by(signer: Path, to: Path) -> Path:
    """A well-formed notice signed by ``signer``'s key for site ``to``."""
    from passerelle.digests import canonical_json
    from transfer.identity import sign
    from transfer.statement import Party
    from transfer.withdrawal import Notice

    me, them = load_site(signer), load_site(to)
    body = Notice(Party(me.site, me.fingerprint), (Party(them.site, them.fingerprint),),
                  "pmsi-coder", "1", 99, "2026-01-01T00:00:00+00:00", "forged",
                  ()).to_json()
    path = signer / "forged.notice"
    path.write_bytes(canonical_json(
        {"notice": body, "signature": sign(me.signing_key, canonical_json(body))}))
    return path


def test_lineage_of_the_dataset_lists_every_site_and_status(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export_y = tmp_path / "y.jsonl"
    assert main(["records", "export", "--out", str(export_y), "--home", str(world.y)]) == 0
    capsys.readouterr()
    code, doc, err = _run(capsys, "records", "lineage", "--dataset",
                          manifest_digest(world.corpus_x), "--peer", str(export_y),
                          "--home", str(world.x))
    assert code == 0, err
    rows = {(v["site"], v["model"], v["version"]): v for v in doc["versions"]}
    assert rows[("CHU-X", "pmsi-coder", "1")]["status"] == "withdrawn"
    assert rows[("CH-Y", "CHU-X.pmsi-coder", "1")]["how"] == "received from CHU-X"
    assert rows[("CH-Y", "CHU-X.pmsi-coder", "2")]["status"] == "withdrawn"
    assert rows[("CH-Y", "CHU-X.pmsi-coder", "2")]["derived_from"] == "CH-Y:CHU-X.pmsi-coder/1"
    # Y's dataset: only the version fine-tuned on it
    y_dataset = next(r for r in _records(world.y, RecordKind.FINETUNE)
                     if r.fields.get("outcome") == "finished").fields["dataset"]
    code, doc, err = _run(capsys, "records", "lineage", "--dataset", y_dataset,
                          "--home", str(world.y))
    assert code == 0, err
    assert [(v["site"], v["version"]) for v in doc["versions"]] == [("CH-Y", "2")]
    # without Y's export, X knows only that it sent the version to CH-Y
    code, doc, err = _run(capsys, "records", "lineage", "--model", SOURCE,
                          "--home", str(world.x))
    assert code == 0, err
    assert [(v["site"], v["version"], v["status"]) for v in doc["versions"]] == [
        ("CHU-X", "1", "withdrawn"), ("CH-Y", "?", "unknown")]
    # a tampered peer export is refused
    lines = export_y.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:-2], lines[-1]]) + "\n")
    code, _, err = _run(capsys, "records", "lineage", "--model", SOURCE, "--peer", str(bad),
                        "--home", str(world.x))
    assert code != 0 and err.startswith("error:"), err


def test_notice_from_a_revoked_sender_is_refused(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = load_site(world.x)
    TrustStore(world.z).revoke(x.fingerprint)
    notice = tmp_path / "n.notice"
    shutil.copyfile(world.root / "withdraw-1.notice", notice)
    # Z was not a recipient either, but the revoked key is checked first
    code, _, err = _run(capsys, "notice", "receive", str(notice), "--home", str(world.z))
    assert code == 1 and "was revoked" in err, err
    assert _records(world.z, RecordKind.NOTICE_REFUSED)[-1].fields["check"] == "RevokedSigner"
