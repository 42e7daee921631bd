"""The memorisation audit end to end, and the export gate it feeds.

A deliberately leaky model (no patient floor, identifiers and header kept, overfit on a
small set with planted canaries) must FAIL for the right reasons; the export gate must
refuse anything without a PASS verdict under the site's pinned policy for the exact ONNX
bytes, unless a named approver records a justification. Refusals and bad input leave
nothing behind. Every audited model is trained on a corpus whose reserve the site sealed
(tests.audit_support.sealed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
from tests.audit_support import RELAXED_MEMBERSHIP, sealed, small_policy

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Site:
    home: Path  # the site's home, whose ledger holds the reserve_sealed record
    data: Path  # the sealed corpus (reserve included)
    train: Path  # the corpus handed to training


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("canary")
    steps.generate_corpus("X", 700, 21, 20, root / "x")  # 20 canaries: ~12 in training
    return Site(root / "home", root / "x", sealed(root / "home", root / "x", root / "train"))


@pytest.fixture(scope="module")
def leaky_model(tmp_path_factory: pytest.TempPathFactory, site: Site) -> Path:
    out = tmp_path_factory.mktemp("leaky") / "m"
    config = CoderConfig(epochs=40, batch_size=32, learning_rate=1e-2, seed=2,
                         vocabulary=VocabularyConfig(min_patients=1, drop_identifiers=False,
                                                     sections=ALL_SECTIONS, max_len=160))
    steps.train_model(site.train, out, config)
    return out


def _register(home: Path, model: Path, name: str) -> VersionRef:
    store = ModelStore(home)
    return steps.register_model(store, model, name, "PMSI coding", "GDPR 6(1)(e)").ref


def _audit(site: Site, ref: VersionRef, out: Path, capsys: pytest.CaptureFixture[str],
           *extra: str, policy: Path | None = None) -> tuple[int, dict[str, object]]:
    policy = policy or small_policy(out.parent / f"{out.name}-policy.toml")
    code = main(["model", "audit", str(ref), "--members", str(site.train), "--nonmembers",
                 str(site.data), "--home", str(site.home), "--policy", str(policy), "--out",
                 str(out), "--json", *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out else {}


def test_leaky_model_fails_with_identifiers_low_fpr_tpr_and_canary_exposure(
    leaky_model: Path, site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    home = site.home
    ref = _register(home, leaky_model, "leaky")
    code, report = _audit(site, ref, tmp_path / "report", capsys)
    assert code == 1 and report["verdict"] == "FAIL"
    failed = {c["name"] for c in report["failed"]}  # type: ignore[union-attr]
    assert "scan.identifier_findings" in failed
    assert "scan.rare_tokens" in failed
    assert any(name.endswith("tpr_at_1%_fpr") or name.endswith("tpr_at_0.1%_fpr")
               for name in failed)
    assert any(name.endswith("epsilon_lower_bound") for name in failed)
    counts = report["scan"]["counts"]  # type: ignore[index]
    assert counts["person_name"] > 0 and counts["ipp"] > 0
    # The secrets are in the vocabulary: ranks spread over the candidates, not 1/501/1001.
    canaries = report["canaries"]
    assert isinstance(canaries, list) and len(canaries) >= 3
    assert len({c["rank"] for c in canaries}) >= 3
    assert all(0.0 <= c["exposure_bits"] <= c["max_bits"] == 24.0 for c in canaries)
    assert report["privacy_unit"] == "patient"
    assert (tmp_path / "report" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    info = ModelStore(home).get(ref)
    assert info.tags[TAG + "audit.verdict"] == "FAIL"
    assert info.tags[TAG + "audit.policy_digest"] == load_policy(
        tmp_path / "report-policy.toml").digest
    assert info.tags[TAG + "audit.policy_pinned"] == "false"  # 4 models: not the default
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


def test_a_pass_under_an_unpinned_policy_opens_no_gate_until_the_site_pins_it(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """On 700 stays the membership and canary figures are too noisy to judge the default
    coder (the demo and scripts/bench_audit.py do, at full size): which canaries fall in
    training changes with the reserve the site draws, and a canary repeated over several
    stays of a 6-epoch model reached 10.8 bits against the default 10 in one CI run. What
    must hold at any size: the scan is clean, every training canary is measured, and a PASS
    opens the export gate for exactly the audited bytes only under the site's pinned
    policy. The membership and canary limits are relaxed here to get a PASS; that relaxed
    policy must be pinned to count."""
    home = site.home
    steps.train_model(site.train, tmp_path / "m", CoderConfig(epochs=6, seed=2))
    ref = _register(home, tmp_path / "m", "coder")
    relaxed = small_policy(tmp_path / "relaxed.toml", **RELAXED_MEMBERSHIP)
    code, report = _audit(site, ref, tmp_path / "report", capsys, policy=relaxed)
    assert report["scan"]["counts"] == {}  # type: ignore[index]
    canaries = report["canaries"]
    assert isinstance(canaries, list) and canaries, report
    assert all(990 <= c["candidates"] <= 1000 and c["max_bits"] == 24.0 for c in canaries)
    assert code == 0 and report["verdict"] == "PASS", report["failed"]
    assert report["policy"]["pinned"] is False  # type: ignore[index]
    store = ModelStore(home)
    assert store.get(ref).tags[TAG + "audit.policy_pinned"] == "false"
    # A PASS under a policy the site did not pin: refused, exit 1, nothing written.
    code = main(["model", "export", str(ref), "--out", str(tmp_path / "ship"), "--home",
                 str(home)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "pinned policy" in err[0], err
    assert not (tmp_path / "ship").exists()
    # The site pins that policy (a recorded act): the same verdict now opens the gate.
    code = main(["site", "policy", "set", "audit.policy_sha256", load_policy(relaxed).digest,
                 "--approver", "DPO", "--justification", "test policy", "--home", str(home)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    result = steps.export_model(store, ref, tmp_path / "ship")
    assert result.onnx_digest == store.get(ref).tags[TAG + "audit.onnx_digest"]
    assert TAG + "export.override.approver" not in store.get(ref).tags


def test_unpinning_brings_back_the_default_policy(site: Site) -> None:
    code = main(["site", "policy", "set", "audit.policy_sha256", "", "--approver", "DPO",
                 "--justification", "back to the default", "--home", str(site.home)])
    assert code == 0
    from registry.audit.policy import pinned_policy_digest

    assert pinned_policy_digest(site.home) == load_policy().digest


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
    (lambda t: t.replace("policy_version = 2", "policy_version = 3"), "policy_version"),
    (lambda t: t.replace("policy_version = 2", "policy_version = 1").replace(
        "max_reference_shift = 2.0\n", ""), "policy_version 1 has no [attacks] max_reference"),
    (lambda t: t.replace("max_reference_shift = 2.0", "max_reference_shift = 50.0"),
     "max_reference_shift = 50.0 is outside"),
    (lambda t: t.replace("[scan]", "[scan]\nbogus = 1"), "unknown keys bogus"),
    (lambda t: t.replace("reference_models = 8", "reference_models = 2"),
     "reference_models = 2 is outside [4, 64]"),
    (lambda t: t.replace("reference_models = 8", "reference_models = 200"), "outside [4, 64]"),
    (lambda t: t.replace("min_patients = 30", "min_patients = 3"), "outside"),
])
def test_bad_policy_is_refused_before_anything_is_logged(
    edit: object, message: str, keras_model: steps.TrainReport, site: Site,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(edit(default_policy_path().read_text()))  # type: ignore[operator]
    ref = _register(site.home, keras_model.out_dir, "coder")
    before = ModelStore(site.home).get(ref).tags
    code = main(["model", "audit", str(ref), "--members", str(site.train), "--nonmembers",
                 str(site.data), "--home", str(site.home), "--policy", str(policy),
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert ModelStore(site.home).get(ref).tags == before
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("count, message", [
    ("1", "can only raise"), ("7", "can only raise"), ("65", "above 64")])
def test_reference_models_below_the_policy_or_above_its_bound_are_bad_input(
    count: str, message: str, keras_model: steps.TrainReport, site: Site, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = _register(site.home, keras_model.out_dir, "coder")
    code = main(["model", "audit", str(ref), "--members", str(site.train), "--nonmembers",
                 str(site.data), "--home", str(site.home), "--reference-models", count,
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_corpora_other_than_the_sealed_ones_are_bad_input_and_log_nothing(
    keras_model: steps.TrainReport, corpus_x: Path, corpus_y: Path, site: Site, tmp_path: Path,
) -> None:
    store = ModelStore(site.home)
    ref = _register(site.home, keras_model.out_dir, "coder")  # trained on corpus_x, unsealed
    before = store.get(ref).tags
    policy = load_policy()
    with pytest.raises(BadInput, match="no sealed reserve"):
        steps.audit_model(store, ref, corpus_x, corpus_x, policy, tmp_path / "r1")
    with pytest.raises(BadInput, match="not the corpus"):
        steps.audit_model(store, ref, corpus_y, corpus_x, policy, tmp_path / "r2")
    assert store.get(ref).tags == before
    assert not any((tmp_path / r).exists() for r in ("r1", "r2"))


def test_seal_draws_the_reserve_by_keyed_hash_and_commits_to_it(site: Site,
                                                                 tmp_path: Path) -> None:
    from passerelle.corpus import manifest_digest, read_corpus
    from registry.audit.reserve import draw_reserve, find_seal, reserve_digest

    everyone = read_corpus(site.data)
    train = {s.patient_id for s in read_corpus(site.train).stays}
    seal = find_seal(site.home, manifest_digest(site.train))
    assert seal is not None and seal.corpus == manifest_digest(site.data)
    reserve = draw_reserve(site.home, everyone, seal.fraction)
    assert not reserve & train and reserve | train == {s.patient_id for s in everyone.stays}
    assert seal.reserve_patients == len(reserve) and seal.training_patients == len(train)
    assert seal.reserve_digest == reserve_digest(site.home, reserve)
    assert 0.15 < len(reserve) / (len(reserve) + len(train)) < 0.35
    # The same key and corpus give the same reserve: sealing again changes nothing.
    again = steps.seal_data(site.home, site.data, seal.fraction, tmp_path / "again")
    assert again.reserve_digest == seal.reserve_digest
    assert manifest_digest(tmp_path / "again") == manifest_digest(site.train)


@pytest.mark.parametrize("fraction", ["0.9", "0.01"])
def test_seal_with_a_bad_fraction_writes_and_records_nothing(
    fraction: str, site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from transfer.ledger_site import open_ledger

    with open_ledger(site.home) as ledger:
        before = len(ledger.records())
    try:
        code = main(["data", "seal", str(site.data), "--fraction", fraction, "--out",
                     str(tmp_path / "t"), "--home", str(site.home)])
    except SystemExit as e:  # refused by the option's type, before the command runs
        code = int(e.code or 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert not (tmp_path / "t").exists()
    with open_ledger(site.home) as ledger:
        assert len(ledger.records()) == before


def _all_patients_model(site: Site, out: Path, declare_rebuilt_split: bool) -> None:
    """The issue's model trained on every patient (40 epochs there, 20 here: already 100 %
    on the training stays at this size) on the whole training corpus, with the default
    recipe (held-out fraction 0.2) recorded as if it had been used."""
    from passerelle.corpus import label_table, manifest_digest, read_corpus
    from registry.coder import fit_coder, save_coder, split_by_patient

    corpus = read_corpus(site.train)
    examples = steps.examples_of(corpus)
    config = CoderConfig(epochs=20, batch_size=32, learning_rate=1e-2, seed=2)
    _, held_idx = split_by_patient(examples, config.heldout_fraction, config.seed)
    coder = fit_coder(examples, config, heldout=examples.subset(held_idx))
    out.mkdir()
    save_coder(coder, out, label_table(), {"site": "X", "dataset_fingerprint":
                                           manifest_digest(site.train)}, [])
    if declare_rebuilt_split:
        _forge_split(site, out, out)


def _forge_split(site: Site, model: Path, out: Path) -> None:
    """Lie about the counts in a copy of ``model`` so that the split "reproduces"."""
    import shutil

    from passerelle.corpus import read_corpus
    from registry.coder import split_by_patient
    from registry.model_dir import METADATA

    if out != model:
        shutil.copytree(model, out)
    examples = steps.examples_of(read_corpus(site.train))
    train_idx, _ = split_by_patient(examples, 0.2, 2)
    meta = json.loads((out / METADATA).read_text())
    meta["training"]["train_stays"] = len(train_idx)
    meta["training"]["train_patients"] = len({examples.patient_ids[i] for i in train_idx})
    (out / METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def test_a_model_trained_on_every_patient_is_refused(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # As trained, its metadata says so (more training stays than the split gives): the
    # declared split does not reproduce, bad input, nothing logged.
    _all_patients_model(site, tmp_path / "honest", declare_rebuilt_split=False)
    _forge_split(site, tmp_path / "honest", tmp_path / "forged")
    ref = _register(site.home, tmp_path / "honest", "all-patients")
    before = ModelStore(site.home).get(ref).tags
    code, _ = _audit(site, ref, tmp_path / "r1", capsys)
    assert code == 2 and not (tmp_path / "r1").exists()
    assert ModelStore(site.home).get(ref).tags == before
    # With the counts forged to match, it fits its declared held-out patients far better
    # than the sealed reserve: FAIL, with that reason named, and the gate stays shut.
    ref = _register(site.home, tmp_path / "forged", "all-patients")
    code, report = _audit(site, ref, tmp_path / "r2", capsys)
    failed = {c["name"] for c in report["failed"]}  # type: ignore[union-attr]
    assert code == 1 and report["verdict"] == "FAIL"
    assert "split.heldout_fits_better_than_reserve_z" in failed, failed
    split = report["split"]
    assert split["heldout_top1"] > split["reserve_top1"] + 0.1  # type: ignore[index]
    # the reserve's patients are real non-members: the attacks see the memorisation
    # (loss-threshold AUC 0.599 to 0.702 over six runs: the reserve the site draws varies;
    # the declared held-out patients, members in truth, count as non-members and dilute it)
    assert report["attacks"]["loss-threshold"]["auc"] > 0.55  # type: ignore[index]


def test_parity_inputs_that_are_not_the_declared_held_out_stays_are_bad_input(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    import numpy as np

    from registry.model_dir import METADATA, PARITY_INPUTS, file_digests

    steps.train_model(site.train, tmp_path / "m", CoderConfig(epochs=1, seed=2))
    parity = np.load(tmp_path / "m" / PARITY_INPUTS)
    np.save(tmp_path / "m" / PARITY_INPUTS, parity[::-1].copy(), allow_pickle=False)
    meta = json.loads((tmp_path / "m" / METADATA).read_text())
    meta["files"] = file_digests(tmp_path / "m", list(meta["files"]))
    (tmp_path / "m" / METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    ref = _register(site.home, tmp_path / "m", "coder")
    code, _ = _audit(site, ref, tmp_path / "r", capsys)
    assert code == 2 and not (tmp_path / "r").exists()
    assert TAG + "audit.verdict" not in ModelStore(site.home).get(ref).tags


def test_a_reserve_below_the_policy_minimum_is_bad_input(
    keras_model: steps.TrainReport, site: Site, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    steps.train_model(site.train, tmp_path / "m", CoderConfig(epochs=1, seed=2))
    ref = _register(site.home, tmp_path / "m", "coder")
    policy = small_policy(tmp_path / "p.toml", **{"min_patients = 30": "min_patients = 5000"})
    code, _ = _audit(site, ref, tmp_path / "r", capsys, policy=policy)
    assert code == 2 and not (tmp_path / "r").exists()
    assert TAG + "audit.verdict" not in ModelStore(site.home).get(ref).tags
