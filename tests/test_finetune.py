"""DP-SGD fine-tuning at the receiving site: accounting, clipping, budget, the command.

The model is the small reference coder of conftest, exported to ONNX at a site X home
and registered as received at a site Y home (no bundle: the bundle has its own tests).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import onnx
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from tensorflow_privacy import GaussianSumQuery

from adapters.dp import (
    Accountant,
    DpSetting,
    DpSgd,
    DpSgdPlan,
    calibrate_noise,
    default_delta,
    epsilon,
    poisson_sample,
)
from adapters.finetune import (
    FinetuneOptions,
    load_site_data,
    logits_of,
    plan_privacy,
    run_dp_sgd,
)
from adapters.onnx_tf import OnnxExecutor
from passerelle import steps
from passerelle.cli import main
from passerelle.errors import BadInput
from registry.audit.metrics import epsilon_lower_bound, roc_curve
from registry.export import run_onnx
from registry.store import TAG, ModelStore, PrivacyUnit, VersionRef
from registry.vocabulary import Vocabulary
from tests.transfer_support import received_home
from transfer.ledger_site import open_ledger
from transfer.pseudonym import site_key
from transfer.records import RecordKind
from transfer.site_policy import set_value

MNIST_Q, MNIST_STEPS = 256 / 60000, int(60 * 60000 / 256)


# ---------------------------------------------------------------------- accounting


def test_mnist_tutorial_setting_gives_dp_accounting_0_4_3_values() -> None:
    setting = DpSetting(MNIST_Q, 1.1, MNIST_STEPS, 1e-5)
    assert MNIST_STEPS == 14062
    assert round(epsilon(setting, Accountant.RDP), 3) == 2.597
    assert round(epsilon(setting, Accountant.PLD), 3) == 2.382


@pytest.mark.parametrize(("q", "z", "steps", "delta"), [
    (0.01, 1.0, 1000, 1e-5), (0.05, 0.8, 200, 1e-6), (0.1, 2.0, 50, 1e-5), (1.0, 5.0, 10, 1e-5),
])
def test_epsilon_matches_an_independent_dp_accounting_computation(
        q: float, z: float, steps: int, delta: float) -> None:
    gaussian = dp_accounting.GaussianDpEvent(z)
    event = dp_accounting.SelfComposedDpEvent(
        gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian), steps)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(event)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(event)
    setting = DpSetting(q, z, steps, delta)
    assert epsilon(setting, Accountant.RDP) == pytest.approx(rdp.get_epsilon(delta), rel=1e-9)
    assert epsilon(setting, Accountant.PLD) == pytest.approx(pld.get_epsilon(delta), rel=1e-9)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.floats(0.5, 10.0), q=st.floats(0.005, 0.5), steps=st.integers(1, 300))
def test_calibrated_noise_never_overshoots_the_target_rdp(target: float, q: float,
                                                          steps: int) -> None:
    z = calibrate_noise(target, 1e-5, q, steps, Accountant.RDP)
    assert epsilon(DpSetting(q, z, steps, 1e-5), Accountant.RDP) <= target
    # and it is tight: 5 % less noise overshoots
    assert epsilon(DpSetting(q, z * 0.95, steps, 1e-5), Accountant.RDP) > target


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.floats(1.0, 8.0), q=st.floats(0.01, 0.2), steps=st.integers(5, 60))
def test_calibrated_noise_never_overshoots_the_target_pld(target: float, q: float,
                                                          steps: int) -> None:
    z = calibrate_noise(target, 1e-5, q, steps, Accountant.PLD)
    assert epsilon(DpSetting(q, z, steps, 1e-5), Accountant.PLD) <= target


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_epsilon_is_refused(bad: float) -> None:
    with pytest.raises(BadInput):
        calibrate_noise(bad, 1e-5, 0.1, 10)


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-5, 2.0])
def test_bad_delta_is_refused(bad: float) -> None:
    with pytest.raises(BadInput):
        DpSetting(0.1, 1.0, 10, bad)


def test_default_delta_is_well_under_one_over_units() -> None:
    assert default_delta(1000) == 1e-5
    assert default_delta(10**6) == pytest.approx(1e-7)


def test_poisson_sampling_takes_each_unit_with_probability_q() -> None:
    rng = np.random.default_rng(0)
    sizes = [len(poisson_sample(rng, 1000, 0.05)) for _ in range(400)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.03)
    assert np.std(sizes) == pytest.approx(math.sqrt(1000 * 0.05 * 0.95), rel=0.15)


def test_plan_normalises_by_the_expected_batch_size() -> None:
    plan = DpSgdPlan.make(units=400, expected_batch_size=32, epochs=3, clip=1.0,
                          noise_multiplier=1.0)
    assert plan.sampling_rate == 32 / 400 and plan.expected_batch_size == 32
    assert plan.steps == math.ceil(3 * 400 / 32)


# ------------------------------------------------------------------ clipping, noise


def _mlp(tied: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="enc/MatMul"),
             helper.make_node("Relu", ["h"], ["r"], name="enc/Relu")]
    if tied:  # w1 read twice
        nodes.append(helper.make_node("MatMul", ["r", "w1"], ["h2"], name="mid/MatMul"))
        nodes.append(helper.make_node("MatMul", ["h2", "w2"], ["logits"], name="out/MatMul"))
    else:
        nodes.append(helper.make_node("MatMul", ["r", "w2"], ["logits"], name="out/MatMul"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reference_unit_gradients(executor: OnnxExecutor, x: Any, y: Any,
                              seg: Any) -> list[list[np.ndarray[Any, Any]]]:
    """One unit at a time, with a plain tape over the sum of its stays' losses."""
    out = []
    for u in range(int(seg.max()) + 1):
        with tf.GradientTape() as tape:
            logits = executor({"x": x[seg == u]})["logits"]
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                y[seg == u], logits))
        out.append([g.numpy() for g in tape.gradient(loss, executor.trainable_variables)])
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_patient_contribution_is_clipped_once_and_tied_weights_sum_their_uses(
        tied: bool) -> None:
    executor = OnnxExecutor.from_model(_mlp(tied))
    if tied:
        assert len(executor.parameters[0].consumers) == 2
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=9)
    seg = np.asarray([0, 0, 0, 1, 2, 2, 3, 3, 3], np.int32)  # 4 patients, several stays
    clip = 0.5
    sgd = DpSgd(executor, "x", "logits", clip, 1.0, tf.keras.optimizers.SGD(0.1))
    summed, norms = sgd.clipped_sum(x, y, seg, 4)
    reference = _reference_unit_gradients(executor, x, y, seg)
    # the same clipping rule as tensorflow-privacy's query (clip_by_global_norm per record)
    query = GaussianSumQuery(l2_norm_clip=clip, stddev=0.0)
    params = query.derive_sample_params(query.initial_global_state())
    expected = [np.zeros_like(g) for g in reference[0]]
    for u, grads in enumerate(reference):
        clipped = query.preprocess_record(params, [tf.constant(g) for g in grads])
        ref_norm = math.sqrt(sum(float(np.sum(g ** 2)) for g in grads))
        assert float(norms[u]) == pytest.approx(ref_norm, rel=1e-4)
        expected = [e + c.numpy() for e, c in zip(expected, clipped, strict=True)]
    for got, want in zip(summed, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)


def test_noise_has_the_analytic_standard_deviation() -> None:
    executor = OnnxExecutor.from_model(_mlp())
    sgd = DpSgd(executor, "x", "logits", 2.0, 1.5, tf.keras.optimizers.SGD(1.0),
                rng=np.random.default_rng(0))  # the noise's generator (28 coordinates)
    before = [v.numpy().copy() for v in executor.trainable_variables]
    for _ in range(20):  # empty batches: the update is pure noise / expected batch size
        sgd.private_step(np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                         np.zeros(0, np.int32), 0, expected_batch_size=1.0)
    moved = np.concatenate([(v.numpy() - b).ravel()
                            for v, b in zip(executor.trainable_variables, before, strict=True)])
    # 20 independent N(0, (2 * 1.5)^2) per coordinate, summed: std 3 * sqrt(20)
    assert np.std(moved) == pytest.approx(3.0 * math.sqrt(20), rel=0.2)


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory,
             keras_model: steps.TrainReport) -> tuple[Path, VersionRef]:
    """Site Y's home with the exported coder registered as received."""
    return received_home(tmp_path_factory.mktemp("finetune"), keras_model.out_dir)


def _copy_home(home: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "home-y"
    shutil.copytree(home, dst)
    return dst


def _versions(home: Path) -> list[str]:
    return ModelStore(home).versions("pmsi-coder")


def test_finetune_registers_a_new_version_with_privacy_lineage(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = _copy_home(received[0], tmp_path)
    code = main(["finetune", str(received[1]), "--data", str(corpus_y), "--epsilon", "3",
                 "--delta", "1e-5", "--epochs", "3", "--batch-size", "32", "--home", str(home),
                 "--drop-unknown-codes", "--seed", "1", "--json"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["epsilon_pld"] <= 3.0 < doc["epsilon_rdp"] + 1
    info = ModelStore(home).get(VersionRef("pmsi-coder", doc["version"]))
    tags = info.tags
    for key in ("epsilon_pld", "epsilon_rdp", "delta", "noise_multiplier", "clip",
                "sampling_rate", "steps", "privacy_unit", "trainable", "accuracy_before",
                "accuracy_after"):
        assert TAG + "finetune." + key in tags
    assert tags[TAG + "bundle_digest"] == "sha256:" + "ab" * 32
    assert tags[TAG + "finetuned_from"] == str(received[1])
    assert tags[TAG + "dataset_fingerprint"].startswith("hmac:")
    assert tags[TAG + "finetune.seeded"] == "true" and tags[TAG + "finetune.private"] == "false"
    assert tags[TAG + "finetune.accuracy_scope"] == "heldout-outside-budget-not-dp"
    assert "train_units" not in json.dumps(doc)  # the exact count is never released
    assert float(tags[TAG + "finetune.epsilon_pld"]) <= 3.0
    # the source's audit verdict was earned by other bytes: not inherited, status stated
    assert tags[TAG + "audit.status"] == "not-audited"
    assert TAG + "audit_verdict" not in tags and TAG + "audit.verdict" not in tags
    source_tags = ModelStore(home).get(received[1]).tags
    assert tags[TAG + "source_audit_verdict"] == source_tags.get(TAG + "audit_verdict", "none")
    # the new ONNX runs in onnxruntime and matches the executor
    out = ModelStore(home).download(info, "onnx", tmp_path / "dl")
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    x = np.zeros((3, 128), np.int32)
    x[:, :5] = [[2, 3, 4, 5, 6]]
    executor = OnnxExecutor.from_model(proto)
    ours = executor({executor.input_names[0]: x})
    np.testing.assert_allclose(np.asarray(ours["logits"]),
                               run_onnx(proto.SerializeToString(), x), atol=1e-4)
    assert [r.fields["outcome"] for r in _runs(home, RecordKind.FINETUNE)] == ["finished"]
    assert len(_runs(home, RecordKind.FINETUNE_STARTED)) == 1


def _runs(home: Path, kind: RecordKind) -> list[Any]:
    with open_ledger(home) as ledger:
        return ledger.records(kind=kind)


def _refused(argv: list[str], home: Path, capsys: pytest.CaptureFixture[str]) -> int:
    before = _versions(home)
    try:
        code = main([*argv, "--home", str(home)])
    except SystemExit as e:  # refused by the option's type, as argparse exits
        code = int(e.code or 0)
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert _versions(home) == before
    return code


@pytest.mark.parametrize(("flag", "value"), [("--epsilon", "0"), ("--epsilon", "-2"),
                                             ("--delta", "0"), ("--delta", "1.5")])
def test_bad_privacy_parameters_are_refused(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path, flag: str,
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    home = _copy_home(received[0], tmp_path)
    args = {"--epsilon": "3", "--delta": "1e-5"} | {flag: value}
    argv = ["finetune", str(received[1]), "--data", str(corpus_y), "--drop-unknown-codes",
            *[a for kv in args.items() for a in kv]]
    assert _refused(argv, home, capsys) == 2


def test_unknown_codes_are_refused_by_default(
        corpus_x: Path, corpus_y: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import collections
    import dataclasses

    from passerelle.corpus.storage import read_corpus, write_corpus
    from tests.conftest import small_config

    # X's coder knows every code of the table at this size: train one on X without the
    # code Y uses most, so that Y's data holds a code the model never saw.
    x = read_corpus(corpus_x)
    missing = collections.Counter(y.main_diagnosis
                                  for y in read_corpus(corpus_y).stays).most_common(1)[0][0]
    kept = tuple(s for s in x.stays if missing not in (s.main_diagnosis, s.true_diagnosis))
    partial = tmp_path / "x-without-one-code"
    write_corpus(dataclasses.replace(x, stays=kept, canaries=()), partial)
    model = steps.train_model(partial, tmp_path / "model",
                              dataclasses.replace(small_config(), epochs=1))
    (tmp_path / "sites").mkdir()
    home, ref = received_home(tmp_path / "sites", model.out_dir)
    argv = ["finetune", str(ref), "--data", str(corpus_y), "--epsilon", "3"]
    before = _versions(home)
    assert main([*argv, "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and missing in err and "--drop-unknown-codes" in err, err
    assert _versions(home) == before
    assert _runs(home, RecordKind.FINETUNE_STARTED) == []


def test_budget_exceeded_is_refused_before_training(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = _copy_home(received[0], tmp_path)
    set_value(home, "privacy.epsilon_cap", "2", "DPO", "test")
    argv = ["finetune", str(received[1]), "--data", str(corpus_y), "--epsilon", "3",
            "--drop-unknown-codes"]
    assert _refused(argv, home, capsys) == 1
    assert _runs(home, RecordKind.FINETUNE_STARTED) == []


def test_unsupported_operators_are_refused(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = _copy_home(received[0], tmp_path)
    store = ModelStore(home)
    src = store.download(store.get(received[1]), "onnx", tmp_path / "src")
    proto = onnx.load(str(src / "model.onnx"), load_external_data=False)
    node = proto.graph.node[-1]
    node.op_type, node.domain = "Softplus", ""  # same arity, not in the executor's table
    (src / "model.onnx").write_bytes(proto.SerializeToString())
    bad = store.register_received(src, "pmsi-coder", {})
    argv = ["finetune", str(bad.ref), "--data", str(corpus_y), "--epsilon", "3",
            "--drop-unknown-codes"]
    before = _versions(home)
    assert main([*argv, "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unsupported ONNX operators: ai.onnx::Softplus")
    assert _versions(home) == before
    assert _runs(home, RecordKind.FINETUNE_STARTED) == []


def test_finetuning_beats_the_transferred_model_on_the_sites_patients(
        received: tuple[Path, VersionRef], corpus_y: Path, tmp_path: Path) -> None:
    """Utility at small size: epsilon 3, patient level; the accuracy band has an upper
    bound too, so that 'DP silently off' (a huge jump) fails."""
    home = _copy_home(received[0], tmp_path)
    result = steps.finetune_model(
        ModelStore(home), received[1], corpus_y,
        FinetuneOptions(epsilon=3.0, delta=1e-5, epochs=8, expected_batch_size=32,
                        learning_rate=5e-3, drop_unknown_codes=True, noise_seed=0),
        rng=np.random.default_rng(0))
    print(f"accuracy before {result.accuracy_before:.3f} after {result.accuracy_after:.3f}")
    assert result.accuracy_after > result.accuracy_before
    assert result.epsilon_pld <= 3.0


def _true_code_log_probability(logits: np.ndarray[Any, Any],
                               labels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    log_p = np.asarray(tf.nn.log_softmax(logits.astype(np.float64), axis=1))
    return np.asarray(log_p[np.arange(len(labels)), labels])


def _per_unit(scores: np.ndarray[Any, Any], units: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.asarray([scores[units == u].mean() for u in np.unique(units)])


def test_membership_inference_on_canaries_stays_under_the_claimed_epsilon(
        received: tuple[Path, VersionRef], tmp_path: Path) -> None:
    """Canary patients planted in Y's data; the loss-threshold attack (per patient) on
    training vs held-out patients gives an empirical epsilon lower bound (Clopper-Pearson,
    95 %) that must not exceed the claimed epsilon. At this size the bound can only be
    small (the audit's 'epsilon max detectable'): this catches gross failures only."""
    data = tmp_path / "y-canaries"
    steps.generate_corpus("Y", 500, 21, 5, data)
    store = ModelStore(received[0])
    src = store.download(store.get(received[1]), "onnx", tmp_path / "src")
    executor = OnnxExecutor.from_model(onnx.load(str(src / "model.onnx"),
                                                 load_external_data=False),
                                       trainable=["hidden", "logits"])
    codes = [str(c) for c in json.loads((src / "labels.json").read_text())["codes"]]
    site = load_site_data(data, Vocabulary.load(src / "vocabulary.json"), codes,
                          PrivacyUnit.PATIENT, 0.5, site_key(received[0]), True)
    options = FinetuneOptions(epsilon=3.0, delta=1e-5, epochs=8, expected_batch_size=32,
                              noise_seed=3)
    plan, setting, eps_pld, _ = plan_privacy(site, options)
    run_dp_sgd(executor, "logits", site, plan, 5e-3, np.random.default_rng(3), noise_seed=3)
    members = _per_unit(_true_code_log_probability(
        logits_of(executor, site.inputs, "logits"), site.labels), site.units)
    nonmembers = _per_unit(_true_code_log_probability(
        logits_of(executor, site.heldout_inputs, "logits"), site.heldout_labels),
        site.heldout_units)
    bound = epsilon_lower_bound(roc_curve(members, nonmembers), len(members),
                                len(nonmembers), setting.delta)
    print(f"empirical epsilon lower bound {bound.epsilon_lower:.3f} (max detectable "
          f"{bound.epsilon_max_detectable:.3f}) vs claimed {eps_pld:.3f}")
    assert bound.epsilon_lower <= eps_pld
