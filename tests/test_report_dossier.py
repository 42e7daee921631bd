"""What a compliance officer reads: the summary that tells the truth first, the audit and DP
evidence, the signed page, the model dossier in French and English (HTML and PDF), and
MLflow's own UI — each opened in headless Chromium.

One story (module fixture, one xdist group): X registers a real model, audits it under a
policy it fails, exports it under a named override and sends it to Y; Y receives it,
refuses a replay, fine-tunes it under DP-SGD.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from passerelle import steps
from passerelle.cli import main
from passerelle.digests import sha256_bytes
from registry.audit.policy import load_policy
from registry.export import Override
from registry.store import TAG, ModelStore, VersionRef
from tests.audit_support import sealed
from tests.conftest import running_mlflow_server, small_config
from transfer.exchange import create_bundle, receive_bundle
from transfer.i18n import STRINGS, up
from transfer.identity import init_site, public_identity
from transfer.ledger_site import append_record, open_ledger
from transfer.records import Record, RecordKind
from transfer.report_signature import BEGIN, END, envelope_of, unsigned_bytes
from transfer.trust import TrustStore

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("report_dossier")]
MODEL = "pmsi-coder"
APPROVER = "Dr Claire Martin"
JUSTIFICATION = "validated by the DPO after review of the audit"


@dataclass(frozen=True)
class World:
    root: Path
    x: Path
    y: Path
    ref: VersionRef
    received: VersionRef
    tuned: VersionRef


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, keras_model: steps.TrainReport,
          corpus_x: Path, corpus_y: Path) -> World:
    root = tmp_path_factory.mktemp("dossier")
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
    policy = load_policy()  # an AUC limit no trained model meets: the verdict is FAIL
    policy = replace(policy, attacks=replace(policy.attacks, reference_models=4),
                     membership=replace(policy.membership, max_auc=0.5))
    audit = steps.audit_model(store, info.ref, train, corpus_x, policy, root / "audit")
    assert audit.verdict == "FAIL"
    steps.export_model(store, info.ref, root / "export", Override(APPROVER, JUSTIFICATION))
    created = create_bundle(x, store, info.ref, ["Y"], root / "coder.bundle")
    received = receive_bundle(created.path, y, ModelStore(y))
    assert main(["bundle", "receive", str(created.path), "--home", str(y)]) == 0  # a no-op
    replay = root / "replay.bundle"  # another copy of that transfer (its last byte changed)
    data = bytearray(created.path.read_bytes())
    data[-1] ^= 1
    replay.write_bytes(bytes(data))
    assert main(["bundle", "receive", str(replay), "--home", str(y)]) == 1  # replay
    options = steps.finetune_options(epsilon=3.0, delta=1e-5, epochs=2, expected_batch_size=32,
                                     drop_unknown_codes=True, noise_seed=1)
    tuned = steps.finetune_model(ModelStore(y), received.version.ref, corpus_y, options,
                                 rng=np.random.default_rng(1))
    return World(root, x, y, info.ref, received.version.ref, tuned.version.ref)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    code = main([*argv, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else {}), out.err


def _records(home: Path) -> list[Record]:
    with open_ledger(home) as ledger:
        return ledger.records()


def _section(page: str, section: str) -> str:
    match = re.search(rf'<section id="{section}".*?</section>', page, re.S)
    assert match, section
    return match.group(0)


def _report(capsys: pytest.CaptureFixture[str], home: Path, out: Path, *more: str) -> str:
    code, _, err = _cli(capsys, "report", "--out", str(out), "--home", str(home), *more)
    assert code == 0, err
    return out.read_text(encoding="utf-8") if out.suffix == ".html" else ""


# -- the summary -------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "fr"])
def test_summary_puts_the_override_in_red_with_approver_and_justification(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], lang: str) -> None:
    page = _report(capsys, world.x, tmp_path / "x.html", "--lang", lang)
    summary = _section(page, "summary")
    for key in ("q_integrity", "q_sent", "q_received", "q_refused", "q_budget",
                "q_withdrawn", "q_expiring", "q_trust"):
        assert STRINGS[key][lang].replace("'", "&#x27;") in summary, key
    sent = re.search(r'<tr class="bad"><td><b>[^<]*</b></td><td>(.*?)</td></tr>', summary, re.S)
    assert sent and f"{MODEL}/1 → Y" in sent.group(1)
    assert APPROVER in sent.group(1) and JUSTIFICATION in sent.group(1)
    assert ("OVERRIDE" if lang == "en" else "DÉROGATION") in sent.group(1)
    assert f"<html lang='{lang}'>" in page


def test_summary_at_the_receiver_names_the_refusal_the_budget_and_the_run(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = _report(capsys, world.y, tmp_path / "y.html")
    summary = _section(page, "summary")
    run = next(r for r in _records(world.y) if r.kind is RecordKind.FINETUNE)
    f = run.fields
    assert "1 refused: " in summary and "Rollback" in summary
    remaining = f["budget_cap"] - f["budget_spent"]
    budget = (f"spent ε = {up(f['budget_spent'])} of cap {f['budget_cap']:g}, remaining ")
    assert budget in summary and "privacy unit patient" in summary
    shown = float(re.search(r"remaining ([0-9.]+)", summary).group(1))  # type: ignore[union-attr]
    assert shown <= remaining < shown + 0.001  # rounded down, never up
    assert f"{MODEL}/1 from X (registered here as {world.received})" in summary


def test_peer_export_tells_whether_the_bundle_was_received_and_a_truncated_one_says_not(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "y.jsonl"
    assert _cli(capsys, "records", "export", "--out", str(export), "--home", str(world.y))[0] == 0
    page = _report(capsys, world.x, tmp_path / "x.html", "--peer", str(export))
    received = next(r for r in _records(world.y) if r.kind is RecordKind.BUNDLE_RECEIVED)
    assert "received by Y on " in _section(page, "transfers-out")
    assert f"(its record #{received.seq})" in _section(page, "summary")
    truncated = tmp_path / "y-truncated.jsonl"  # Y's chain without its receipt: still valid
    truncated.write_text(export.read_text().splitlines(keepends=True)[0])
    page = _report(capsys, world.x, tmp_path / "x2.html", "--peer", str(truncated))
    assert "<span class='bad'>NOT recorded by Y" in _section(page, "summary")
    forged = tmp_path / "forged.jsonl"  # a byte changed in Y's export: refused, no page
    forged.write_text(export.read_text().replace('"sig":"', '"sig":"A', 1))
    code, _, err = _cli(capsys, "report", "--out", str(tmp_path / "x3.html"), "--peer",
                        str(forged), "--home", str(world.x))
    assert code in (1, 2) and err.startswith("error: ") and not (tmp_path / "x3.html").exists()


def test_a_kind_without_a_summary_line_is_counted_not_hidden(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "y"
    shutil.copytree(world.y, home)
    before = sum(r.kind is RecordKind.PSEUDONYM_KEY_CREATED for r in _records(home))
    append_record(home, RecordKind.PSEUDONYM_KEY_CREATED, [], {"note": "a new kind"})
    page = _report(capsys, home, tmp_path / "y.html")
    assert f"{before + 1} × pseudonym_key_created" in _section(page, "summary")
    assert 'data-kind="pseudonym_key_created"' in page


# -- the evidence --------------------------------------------------------------------------


def _audit_doc(world: World) -> dict[str, object]:
    store = ModelStore(world.x)
    path = store.download(store.get(world.ref), "audit/audit-report.json",
                          world.root / "check-audit")
    doc: dict[str, object] = json.loads(path.read_text())
    return doc


def test_audit_figures_are_those_of_the_signed_report_rounded_against_the_model(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _audit_doc(world)
    page = _report(capsys, world.x, tmp_path / "x.html")
    out = _section(page, "transfers-out")
    assert "the audit report in MLflow matches the digest in the signed record" in out
    assert "the site&#x27;s pinned policy" in out  # the shipped default, nothing pinned
    attacks = doc["attacks"]
    assert isinstance(attacks, dict)
    for name, m in attacks.items():
        row = re.search(rf"<tr[^>]*><td>{name}</td>(.*?)</tr>", out, re.S)
        assert row, name
        cells = re.findall(r"<span class='num'>([^<]*)</span>", row.group(1))
        auc, tpr01, tpr1, eps, eps_max, members, nonmembers = cells
        assert float(auc) >= m["auc"] and float(auc) - m["auc"] < 1e-3
        assert float(tpr01) >= m["tpr_at_fpr"]["0.001"]
        assert float(tpr1) >= m["tpr_at_fpr"]["0.01"]
        assert float(eps) >= m["epsilon_lower_bound"]["epsilon_lower"]
        assert float(eps_max) <= m["epsilon_lower_bound"]["epsilon_max_detectable"]
        assert (int(members), int(nonmembers)) == (m["members"], m["nonmembers"])
    assert f"<td>{doc['reference_models']}</td>" in out
    assert "≤ 0.5" in out  # the policy's AUC limit under the figures


def test_an_audit_report_changed_in_mlflow_is_flagged_and_not_shown(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = (world.x / "mlartifacts").rglob("audit/audit-report.json")
    good = path.read_bytes()
    try:
        path.write_bytes(good.replace(b'"auc": 0.', b'"auc": 0.0', 1))
        page = _report(capsys, world.x, tmp_path / "x.html")
    finally:
        path.write_bytes(good)
    out = _section(page, "transfers-out")
    assert "does NOT match the signed record" in out
    assert "<td>lira-online</td>" not in out


def test_dp_runs_show_pld_and_rdp_rounded_up_with_delta_unit_noise_q_steps_accuracy(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = next(r for r in _records(world.y) if r.kind is RecordKind.FINETUNE).fields
    dp = _section(_report(capsys, world.y, tmp_path / "y.html"), "dp-budget")
    cells = re.findall(r"<span class='num'>([^<]*)</span>", dp)
    assert up(f["epsilon"]) in cells and up(f["epsilon_rdp"]) in cells
    assert float(up(f["epsilon"])) >= f["epsilon"]
    assert "0.00001" in cells and str(f["steps"]) in cells
    assert f"{world.tuned} ← {world.received}" in dp  # received as X.pmsi-coder
    assert "→" in dp and "completed" in dp
    assert dp.count('<img class="curve"') == 1


# -- the page in a browser, its signature ----------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed (scripts/test.sh installs it)", pytrace=False)
    return found


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180, check=False)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (Debian's poppler-utils; scripts/test.sh "
                    "installs it)", pytrace=False)
    return found


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("report-shots")


def test_records_open_and_filter_in_chromium_under_the_pages_csp(
        world: World, chromium: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.html"
    _report(capsys, world.x, out)
    uri = out.resolve().as_uri()
    opened = _browser(chromium, tmp_path / "p1", "--dump-dom", uri + "#rec-4").stdout
    assert re.search(r'<details class="rec" id="rec-4" data-kind="audit_verdict" open="">',
                     opened)  # the inline script ran: the CSP allows it by its hash
    assert not re.search(r'id="rec-5"[^>]*open=', opened)
    filtered = _browser(chromium, tmp_path / "p2", "--dump-dom",
                        uri + "#filter=export_override").stdout
    assert '<b id="rec-count">1</b>' in filtered
    assert len(re.findall(r'<details class="rec"[^>]*hidden=""', filtered)) == \
        len(_records(world.x)) - 1


def test_report_signature_verifies_by_cli_and_dsse_and_a_changed_byte_is_refused(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    out = tmp_path / "x.html"
    page = _report(capsys, world.x, out)
    code, doc, err = _cli(capsys, "records", "verify-report", str(out), "--home", str(world.x))
    assert code == 0, err
    assert doc["site"] == "X" and doc["digest"] == sha256_bytes(unsigned_bytes(page))
    assert doc["digest"] in page  # shown on the page itself
    # the standard DSSE verifier, with the site's public key
    me = public_identity(world.x)
    key = SSlibKey.from_crypto(me.public_key, keyid=me.fingerprint,
                               scheme="ecdsa-sha2-nistp256")
    envelope = Envelope.from_dict(envelope_of(page))
    assert me.fingerprint in envelope.verify([key], 1)
    statement = json.loads(envelope.pae().split(b" ", 4)[4])
    assert statement["subject"][0]["digest"]["sha256"] == doc["digest"].removeprefix("sha256:")
    # Y trusts X: it verifies X's report too
    code, doc, err = _cli(capsys, "records", "verify-report", str(out), "--home", str(world.y))
    assert code == 0 and doc["site"] == "X", err
    # one byte changed outside the signature section
    changed = tmp_path / "changed.html"
    changed.write_text(page.replace(f"{MODEL}/1 → Y", f"{MODEL}/2 → Y", 1), encoding="utf-8")
    code, _, err = _cli(capsys, "records", "verify-report", str(changed), "--home", str(world.x))
    assert code == 1 and err.startswith("error: ") and "changed after it was signed" in err
    # the signature section removed
    stripped = tmp_path / "stripped.html"
    stripped.write_text(page.replace(BEGIN, "").replace(END, ""), encoding="utf-8")
    code, _, err = _cli(capsys, "records", "verify-report", str(stripped), "--home",
                        str(world.x))
    assert code == 2 and "not a signed Passerelle report" in err
    # a site that trusts nobody does not know X's key
    lonely = tmp_path / "z"
    init_site(lonely, "Z")
    code, _, err = _cli(capsys, "records", "verify-report", str(out), "--home", str(lonely))
    assert code == 1 and "not a trusted key" in err


def test_site_reports_in_french_and_english_render_in_chromium(
        world: World, chromium: str, shots: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None]
) -> None:
    for home, name in ((world.x, "x"), (world.y, "y")):
        for lang in ("en", "fr"):
            out = shots / f"report-{name}-{lang}.html"
            _report(capsys, home, out, "--lang", lang)
            page = out.read_text(encoding="utf-8")
            assert STRINGS["summary"][lang].replace("'", "&#x27;") in page
            assert "Paris)" in page and " UTC " in page  # local time beside UTC
            shot = shots / f"report-{name}-{lang}.png"
            run = _browser(chromium, tmp_path / f"s-{name}-{lang}", f"--screenshot={shot}",
                           "--window-size=1280,1500", "--hide-scrollbars",
                           out.resolve().as_uri())
            assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
            record_property("screenshot", str(shot))


# -- the model dossier -------------------------------------------------------------------------


def test_dossier_in_french_as_pdf_answers_the_regulators_questions(
        world: World, chromium: str, shots: Path, capsys: pytest.CaptureFixture[str],
        record_property: Callable[[str, object], None]) -> None:
    pdf = shots / "dossier-x-fr.pdf"
    _report(capsys, world.x, pdf, "--model", f"{MODEL}/1", "--lang", "fr")
    text = subprocess.run([_tool("pdftotext"), "-layout", str(pdf), "-"], capture_output=True,
                          text=True, check=True).stdout
    flat = " ".join(text.split())
    for heading in ("Dossier de statut du modèle : pmsi-coder/1",
                    "2. Données d'entraînement et base légale",
                    "3. Attaques menées et résultats au regard de la politique",
                    "4. Recherche d'identifiants", "5. Mesures prises",
                    "6. Conclusion et limites"):
        assert heading in flat, heading
    assert "RGPD art. 6(1)(e) et 9(2)(h)" in flat and "L'audit a ÉCHOUÉ" in flat
    assert APPROVER in flat and "ne peut pas être regardé comme anonyme" in flat
    assert "aucun ε supérieur à" in flat  # the audit's limit, stated
    assert re.search(r"AUC \S* ?0,\d{2,3}|\b0,\d{3}\b", flat), "French decimal comma"
    code, doc, err = _cli(capsys, "records", "verify-report", str(pdf), "--home", str(world.x))
    assert code == 0 and doc["statement"]["scope"] == f"model {MODEL}/1", err  # type: ignore[index]
    first = shots / "dossier-x-fr-page1"
    subprocess.run([_tool("pdftoppm"), "-png", "-r", "60", "-f", "1", "-l", "1",
                    "-singlefile", str(pdf), str(first)], check=True)
    assert Path(f"{first}.png").stat().st_size > 10_000
    record_property("screenshot", f"{first}.png")
    pdf.write_bytes(pdf.read_bytes() + b"%")  # one byte more: refused
    code, _, err = _cli(capsys, "records", "verify-report", str(pdf), "--home", str(world.x))
    assert code == 1 and "changed after it was signed" in err


def test_dossier_of_the_fine_tuned_version_states_its_dp_guarantee(
        world: World, chromium: str, shots: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None]
) -> None:
    f = next(r for r in _records(world.y) if r.kind is RecordKind.FINETUNE).fields
    out = shots / "dossier-y-en.html"
    page = _report(capsys, world.y, out, "--model", str(world.tuned), "--lang", "en")
    conclusion = _section(page, "d-conclusion")
    assert f"differential privacy (ε = {up(f['epsilon'])}, δ = 0.00001, per patient)" in \
        conclusion
    assert "The audit FAILED under policy passerelle-default" in conclusion  # the sender's
    assert "received from X" in _section(page, "d-model") or \
        f"fine-tuned here from {world.received}" in _section(page, "d-model")
    assert "vocabulary floor: a token enters the vocabulary only if at least" in page
    shot = shots / "dossier-y-en.png"
    run = _browser(chromium, tmp_path / "s", f"--screenshot={shot}", "--window-size=1280,1500",
                   "--hide-scrollbars", out.resolve().as_uri())
    assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
    record_property("screenshot", str(shot))


def test_dossier_of_a_version_the_ledger_never_saw_is_bad_input_and_writes_nothing(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "report", "--model", f"{MODEL}/9", "--out",
                        str(tmp_path / "d.html"), "--home", str(world.x))
    assert code == 2 and err.startswith("error: no record about pmsi-coder/9")
    assert list(tmp_path.iterdir()) == []


# -- MLflow's own UI ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_ui(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over site X's own SQLite store."""
    with running_mlflow_server(f"sqlite:///{world.x / 'mlflow.db'}",
                               tmp_path_factory.mktemp("mlflow-ui"), start_seconds=120,
                               stop_seconds=5) as url:
        yield url


def test_mlflow_ui_shows_the_signature_metrics_and_a_run_name_that_says_what_happened(
        world: World, mlflow_ui: str, chromium: str, tmp_path: Path) -> None:
    store = ModelStore(world.x)
    info = store.get(world.ref)
    run = store.client.get_run(info.run_id)
    assert run.info.run_name == f"register {MODEL} (trained at X)"
    assert {"audit.lira-online.auc", "audit.rmia-offline.epsilon_lower_bound",
            "onnx.parity_max_abs_diff"} <= set(run.data.metrics)
    assert run.data.metrics["audit.lira-online.auc"] == pytest.approx(
        float(info.tags[TAG + "audit.lira-online.auc"]), abs=1e-5)
    y = ModelStore(world.y)
    assert y.client.get_run(y.get(world.received).run_id).info.run_name == \
        f"receive {MODEL}/1 from X"
    tuned = y.client.get_run(y.get(world.tuned).run_id)
    assert tuned.info.run_name.startswith(f"finetune {world.received} under DP (epsilon ")
    assert {"dp.epsilon_pld", "accuracy.heldout.after"} <= set(tuned.data.metrics)
    for ref in (world.received, world.tuned):  # signatures read from the ONNX graph
        mlmodel = y.download(y.get(ref), "onnx/MLmodel", tmp_path / f"mlmodel-{ref.version}")
        text = mlmodel.read_text()
        assert '"name": "logits"' in text and '"dtype": "float32"' in text, text

    version_url = f"{mlflow_ui}/#/models/{MODEL}/versions/1"
    version_page = _browser(chromium, tmp_path / "v", "--virtual-time-budget=10000",
                            "--dump-dom", version_url).stdout
    # the signature (its schema rows), the run's name, the tags
    assert "Schema" in version_page and "Inputs (1)" in version_page and \
        "Outputs (1)" in version_page
    assert f"register {MODEL} (trained at X)" in version_page
    assert "passerelle.audit.failed" in version_page
    # (the run page lists the metrics too: docs/mlflow-run.png; checked above via the API to
    # keep this test to one page load)
