"""The memorisation audit end to end, and the export gate it feeds.

A deliberately leaky model (no patient floor, identifiers and header kept, overfit on a
small set with planted canaries) must FAIL for the right reasons; the export gate must
refuse anything without a PASS verdict for the exact ONNX bytes, unless a named approver
records a justification. Refusals and bad input leave nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from passerelle import steps
from passerelle.cli import main
from passerelle.errors import BadInput, GateRefused
from registry.audit.policy import default_policy_path, load_policy
from registry.coder import CoderConfig
from registry.export import Override
from registry.store import TAG, ModelStore, VersionRef
from registry.vocabulary import ALL_SECTIONS, VocabularyConfig

pytestmark = pytest.mark.slow
REFS = "4"  # reference models: few, to keep the suite short; the benchmark uses the default


@pytest.fixture(scope="module")
def canary_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("canary") / "x"
    steps.generate_corpus("X", 700, 21, 6, out)
    return out


@pytest.fixture(scope="module")
def leaky_model(tmp_path_factory: pytest.TempPathFactory, canary_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("leaky") / "m"
    config = CoderConfig(epochs=40, batch_size=32, learning_rate=1e-2, seed=2,
                         vocabulary=VocabularyConfig(min_patients=1, drop_identifiers=False,
                                                     sections=ALL_SECTIONS, max_len=160))
    steps.train_model(canary_corpus, out, config)
    return out


def _register(home: Path, model: Path, name: str) -> VersionRef:
    store = ModelStore(home)
    return steps.register_model(store, model, name, "PMSI coding", "GDPR 6(1)(e)").ref


def _audit(home: Path, ref: VersionRef, data: Path, out: Path,
           capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, object]]:
    code = main(["model", "audit", str(ref), "--members", str(data), "--nonmembers",
                 str(data), "--home", str(home), "--reference-models", REFS, "--out",
                 str(out), "--json", *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out else {}


def test_leaky_model_fails_with_identifiers_low_fpr_tpr_and_canary_exposure(
    leaky_model: Path, canary_corpus: Path, home: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = _register(home, leaky_model, "leaky")
    code, report = _audit(home, ref, canary_corpus, tmp_path / "report", capsys)
    assert code == 1 and report["verdict"] == "FAIL"
    failed = {c["name"] for c in report["failed"]}  # type: ignore[union-attr]
    assert "scan.identifier_findings" in failed
    assert "scan.rare_tokens" in failed
    assert "canaries.max_exposure_bits" in failed
    assert any(name.endswith("tpr_at_1%_fpr") or name.endswith("tpr_at_0.1%_fpr")
               for name in failed)
    assert any(name.endswith("epsilon_lower_bound") for name in failed)
    counts = report["scan"]["counts"]  # type: ignore[index]
    assert counts["person_name"] > 0 and counts["ipp"] > 0
    for canary in report["canaries"]:  # type: ignore[attr-defined]
        assert canary["exposure_bits"] > 8.0  # rank 1 of 1001: log2(1001) = 9.97
    assert report["privacy_unit"] == "patient"
    assert (tmp_path / "report" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    info = ModelStore(home).get(ref)
    assert info.tags[TAG + "audit.verdict"] == "FAIL"
    assert info.tags[TAG + "audit.policy_digest"] == load_policy().digest
    logged = {f.path for f in ModelStore(home).client.list_artifacts(info.run_id, "audit")}
    assert {"audit/audit-report.json", "audit/roc.png", "audit/policy.toml"} <= logged

    # The gate: a FAIL verdict blocks the export, exit 1, nothing written.
    out = tmp_path / "ship"
    code = main(["model", "export", str(ref), "--out", str(out), "--home", str(home)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "audit verdict FAIL" in err[0]
    assert not out.exists()

    # An override by a named approver exports, and is recorded with who, when and why.
    code = main(["model", "export", str(ref), "--out", str(out), "--home", str(home),
                 "--override", "--approver", "Dr Claire Martin (DPO)", "--justification",
                 "research use under agreement 2026-17"])
    assert code == 0 and (out / "model.onnx").is_file()
    tags = ModelStore(home).get(ref).tags
    assert tags[TAG + "export.override.approver"] == "Dr Claire Martin (DPO)"
    assert tags[TAG + "export.override.justification"] == "research use under agreement 2026-17"
    assert tags[TAG + "export.override.verdict"] == "FAIL"
    assert tags[TAG + "export.override.time"]


def test_default_coder_ships_no_identifier_nor_canary_and_a_pass_opens_the_gate(
    canary_corpus: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """On 700 stays the membership figures are too noisy to judge the default coder (the
    demo and scripts/bench_audit.py do, at full size); what must hold at any size: the
    scan is clean, the canaries were not memorised, and a PASS opens the export gate
    for exactly the audited bytes. The membership limits are relaxed here to get a PASS."""
    steps.train_model(canary_corpus, tmp_path / "m", CoderConfig(epochs=6, seed=2))
    ref = _register(home, tmp_path / "m", "coder")
    relaxed = tmp_path / "relaxed.toml"
    text = default_policy_path().read_text()
    for key in ("max_auc = 0.60", "max_tpr_at_0_1pct_fpr = 0.02", "max_tpr_at_1pct_fpr = 0.05",
                "max_epsilon_lower_bound = 1.0"):
        text = text.replace(key, key.split("=")[0] + "= 1.0" if "eps" not in key
                            else key.split("=")[0] + "= 100.0")
    relaxed.write_text(text)
    code, report = _audit(home, ref, canary_corpus, tmp_path / "report", capsys,
                          "--policy", str(relaxed))
    assert report["scan"]["counts"] == {}  # type: ignore[index]
    assert len(report["canaries"]) > 0  # type: ignore[arg-type]
    for canary in report["canaries"]:  # type: ignore[attr-defined]
        assert canary["exposure_bits"] < 2.0  # the secret never entered the vocabulary
    assert code == 0 and report["verdict"] == "PASS", report["failed"]
    store = ModelStore(home)
    result = steps.export_model(store, ref, tmp_path / "ship")
    assert result.onnx_digest == store.get(ref).tags[TAG + "audit.onnx_digest"]
    assert TAG + "export.override.approver" not in store.get(ref).tags


def test_export_without_audit_is_refused_and_writes_nothing(
    keras_model: steps.TrainReport, home: Path, tmp_path: Path,
) -> None:
    ref = _register(home, keras_model.out_dir, "coder")
    with pytest.raises(GateRefused, match="no audit"):
        steps.export_model(ModelStore(home), ref, tmp_path / "ship")
    assert not (tmp_path / "ship").exists()
    assert TAG + "export.override.approver" not in ModelStore(home).get(ref).tags


def test_a_pass_verdict_for_other_onnx_bytes_does_not_open_the_gate(
    keras_model: steps.TrainReport, home: Path, tmp_path: Path,
) -> None:
    ref = _register(home, keras_model.out_dir, "coder")
    store = ModelStore(home)
    store.set_tags(store.get(ref), {TAG + "audit.verdict": "PASS",
                                    TAG + "audit.onnx_digest": "sha256:" + "0" * 64})
    with pytest.raises(GateRefused, match="other ONNX bytes"):
        steps.export_model(store, ref, tmp_path / "ship")


def test_override_needs_an_approver_and_a_justification(tmp_path: Path) -> None:
    with pytest.raises(BadInput):
        Override("  ", "because")
    code = main(["model", "export", "x/1", "--out", str(tmp_path / "o"), "--home",
                 str(tmp_path / "h"), "--override", "--approver", "A"])
    assert code == 2


@pytest.mark.parametrize("edit, message", [
    (lambda t: t + "\n[extra]\nkey = 1\n", "unknown keys extra"),
    (lambda t: t.replace("max_auc = 0.60", "max_auc = 0.3"), "max_auc = 0.3 is outside"),
    (lambda t: t.replace("reference_models = 8", "reference_models = 8.5"), "an integer"),
    (lambda t: t.replace("policy_version = 1", "policy_version = 2"), "policy_version"),
    (lambda t: t.replace("[scan]", "[scan]\nbogus = 1"), "unknown keys bogus"),
])
def test_bad_policy_is_refused_before_anything_is_logged(
    edit: object, message: str, keras_model: steps.TrainReport, corpus_x: Path, home: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(edit(default_policy_path().read_text()))  # type: ignore[operator]
    ref = _register(home, keras_model.out_dir, "coder")
    before = ModelStore(home).get(ref).tags
    code, _ = _audit(home, ref, corpus_x, tmp_path / "r", capsys, "--policy", str(policy))
    err = capsys.readouterr().err
    assert code == 2
    assert ModelStore(home).get(ref).tags == before
    assert not (tmp_path / "r").exists()
    del err


def test_overlapping_or_foreign_sets_are_bad_input_and_log_nothing(
    keras_model: steps.TrainReport, corpus_x: Path, corpus_y: Path, home: Path, tmp_path: Path,
) -> None:
    ref = _register(home, keras_model.out_dir, "coder")
    store = ModelStore(home)
    before = store.get(ref).tags
    policy = load_policy()
    # a different corpus of the same site whose patient ids are the members' ids
    twin = tmp_path / "twin"
    steps.generate_corpus("X", 300, 999, 0, twin)
    with pytest.raises(BadInput, match="overlap"):
        steps.audit_model(store, ref, corpus_x, twin, policy, tmp_path / "r1")
    with pytest.raises(BadInput, match="both must come from the training site"):
        steps.audit_model(store, ref, corpus_x, corpus_y, policy, tmp_path / "r2")
    with pytest.raises(BadInput, match="not the corpus"):
        steps.audit_model(store, ref, corpus_y, corpus_x, policy, tmp_path / "r3")
    assert store.get(ref).tags == before
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))
