#!/usr/bin/env python3
"""Benchmark: DP-SGD fine-tuning at site Y, its utility and its cost, in one run.

1. Generates X's and Y's corpora (default 20,000 and 6,000 stays, as the demo), trains
   the reference coder at X, exports it to ONNX and registers it at a Y home as
   received.
2. Utility at epsilon = 3 (patient level, delta = 1e-5), accuracy on Y's held-out
   patients: (a) the transferred model as received; (b) the transferred model
   fine-tuned under DP (``passerelle finetune``'s code, hidden+logits train);
   (c) a model of the same architecture trained from scratch at Y under DP at the same
   budget (all layers train; X's vocabulary, which is public to Y, so that building a
   vocabulary spends none of Y's budget).
3. Cost: time per epoch of DP fine-tuning vs non-private fine-tuning (same model, same
   data, same batch size in stays, same optimizer), with the default layers
   (hidden+logits) and with the embedding trained: the DP epoch in the production
   configuration (OS CSPRNG sampling and noise; the clipping path DpSgd chose, named in
   ``dp_path``), alternated with plain epochs and summarised by the median ratio of wall
   time (``time_ratio``) and of process CPU time (``cpu_time_ratio``); the
   per-example (fallback) path timed beside them; and the peak resident memory of
   each phase above the memory at its start (/proc/self/status sampled every 5 ms).

4. (``--vendor keras-conv1d keras-transformer``, instead of 1-3) the same cost
   measurement for the vendors' Conv1D and transformer encoder of
   tests/vendor_models.py, built wider (vocabulary 5,000, 256 tokens, embedding 64, 50
   codes), converted by tf2onnx as a vendor's model is, every weight trained, on
   synthetic token ids, an expected 256 stays per step.

Usage: python scripts/bench_finetune.py [--x-stays 20000] [--y-stays 6000]
       [--epsilon 3] [--epochs 10] [--repeats 5] [--cost-only] [--workdir DIR]
       [--json FILE]
       python scripts/bench_finetune.py --vendor keras-conv1d keras-transformer
       [--vendor-stays 4096] [--repeats 5] [--vendor-per-example] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from adapters.dp import DpSgd, DpSgdPlan
from adapters.finetune import (
    FinetuneOptions,
    accuracy,
    load_site_data,
    logits_of,
    plan_privacy,
    run_dp_sgd,
)
from adapters.onnx_export import keras_to_onnx
from adapters.onnx_tf import OnnxExecutor, load_model
from passerelle import steps
from registry.coder import CoderConfig, build_keras_model
from registry.export import Override
from registry.store import TAG, ModelStore, PrivacyUnit
from registry.vocabulary import Vocabulary
from transfer.identity import init_site
from transfer.pseudonym import site_key
from transfer.site_policy import set_value

DEFAULT_LAYER_SETS: tuple[tuple[str, ...] | None, ...] = (
    ("hidden", "logits"), ("embedding", "hidden", "logits"))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak RSS above the RSS at entry, in MiB, sampled every 5 ms."""
    out: dict[str, float] = {}
    start = _rss_kib()
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kib())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_above_start_mib"] = (peak[0] - start) / 1024
        out["peak_rss_mib"] = peak[0] / 1024


def timed(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """Wall seconds and memory; ``mem["cpu_seconds"]`` is the process's CPU time (all
    threads), steadier than wall time on a shared machine."""
    with peak_memory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    mem["cpu_seconds"] = cpu
    return seconds, mem


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--x-stays", type=int, default=20000,
                        help="stays of X's corpus (default 20000)")
    parser.add_argument("--y-stays", type=int, default=6000,
                        help="stays of Y's corpus (default 6000)")
    parser.add_argument("--epsilon", type=float, default=3.0,
                        help="target epsilon, patient level (default 3.0)")
    parser.add_argument("--delta", type=float, default=1e-5,
                        help="delta (default 1e-5)")
    parser.add_argument("--epochs", type=int, default=10,
                        help="fine-tuning epochs of the utility comparison (default 10)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="expected stays per step (default 64)")
    parser.add_argument("--scratch-learning-rate", type=float, default=1e-2,
                        help="learning rate of the model trained from scratch at Y "
                             "(default 0.01)")
    parser.add_argument("--seed", type=int, default=7,
                        help="corpus and training seed (default 7)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="alternated plain/DP epochs per layer set (default 5)")
    parser.add_argument("--cost-only", action="store_true",
                        help="skip the utility comparison (2), measure only the cost (3)")
    parser.add_argument("--vendor", nargs="*", default=None,
                        choices=["keras-conv1d", "keras-transformer"],
                        help="measure only the cost of these vendor architectures "
                             "(default: none; the coder's benchmark runs)")
    parser.add_argument("--vendor-stays", type=int, default=4096,
                        help="synthetic stays per vendor epoch (default 4096)")
    parser.add_argument("--vendor-tokens", type=int, default=256,
                        help="tokens per stay (default 256)")
    parser.add_argument("--vendor-vocab", type=int, default=5000,
                        help="vocabulary size (default 5000)")
    parser.add_argument("--vendor-embed", type=int, default=64,
                        help="embedding width (default 64)")
    parser.add_argument("--vendor-classes", type=int, default=50,
                        help="output codes (default 50)")
    parser.add_argument("--vendor-batch", type=int, default=256,
                        help="expected stays per step (default 256)")
    parser.add_argument("--vendor-per-example", action="store_true",
                        help="also time one epoch on the per-example path (slow)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="work folder (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here (default: none)")
    args = parser.parse_args()
    if args.vendor:
        vendors = {"vendor_cost": vendor_cost(args)}
        print(json.dumps(vendors, indent=1))
        if args.json:
            args.json.write_text(json.dumps(vendors, indent=1) + "\n")
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"x_stays": args.x_stays, "y_stays": args.y_stays,
                               "epsilon": args.epsilon, "delta": args.delta,
                               "epochs": args.epochs, "expected_batch_size": args.batch_size}

    # (1) the transfer, without the bundle (it has its own benchmark)
    steps.generate_corpus("X", args.x_stays, 1, 0, work / "x")
    steps.generate_corpus("Y", args.y_stays, 2, 0, work / "y")
    report = steps.train_model(work / "x", work / "model", CoderConfig(seed=args.seed))
    store_x = ModelStore(work / "home-x")
    info = steps.register_model(store_x, report.out_dir, "pmsi-coder", "bench", "bench")
    steps.export_model(store_x, info.ref, work / "export",
                       Override("Benchmark", "benchmark without an audit"))
    (work / "home-y").mkdir(exist_ok=True)
    init_site(work / "home-y", "BENCH-Y")  # a run is charged and recorded in a ledger
    set_value(work / "home-y", "privacy.epsilon_cap", "100", "Benchmark",
              "benchmark runs are not a real budget")
    store_y = ModelStore(work / "home-y")
    received = store_y.register_received(work / "export", "pmsi-coder",
                                         {TAG + "source_model": "pmsi-coder"})

    proto = load_model(work / "export" / "model.onnx")
    vocab = Vocabulary.load(work / "export" / "vocabulary.json")
    codes = [str(c) for c in json.loads((work / "export" / "labels.json").read_text())["codes"]]
    site = load_site_data(work / "y", vocab, codes, PrivacyUnit.PATIENT, 0.2,
                          site_key(work / "home-y"), True)
    options = FinetuneOptions(epsilon=args.epsilon, delta=args.delta, epochs=args.epochs,
                              expected_batch_size=args.batch_size, drop_unknown_codes=True,
                              noise_seed=args.seed)
    if not args.cost_only:
        utility(args, work, store_y, received, vocab, codes, site, options, results)
    plan, _, _, _ = plan_privacy(site, options)

    # (3) cost per epoch: DP vs non-private, same model, same data, same run
    results["cost"] = cost_per_epoch(proto, site, plan, args.seed, args.repeats)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def utility(args: argparse.Namespace, work: Path, store_y: ModelStore, received: Any,
            vocab: Vocabulary, codes: list[str], site: Any, options: FinetuneOptions,
            results: dict[str, Any]) -> None:
    """(2): the transferred model, DP fine-tuned, and trained from scratch under DP."""
    # (2b) DP fine-tuning through the command's code (it also measures (2a))
    os.environ["PASSERELLE_TESTING"] = "1"  # a seeded benchmark: recorded as not private
    t0 = time.perf_counter()
    ft = steps.finetune_model(store_y, received.ref, work / "y", options,
                              np.random.default_rng(args.seed))
    results["finetune_command_seconds"] = time.perf_counter() - t0
    results["accuracy_transferred"] = ft.accuracy_before
    results["accuracy_transferred_dp_finetuned"] = ft.accuracy_after
    results["finetune"] = {"epsilon_pld": ft.epsilon_pld, "epsilon_rdp": ft.epsilon_rdp,
                           "delta": ft.delta, "noise_multiplier": ft.noise_multiplier,
                           "sampling_rate": ft.sampling_rate, "steps": ft.steps,
                           "units_released": ft.units_released,
                           "heldout_stays": ft.heldout_stays}

    # (2c) from scratch at Y under DP, same budget, same split
    config = CoderConfig(seed=args.seed)
    scratch_proto = keras_to_onnx(build_keras_model(len(vocab), len(codes), config),
                                  vocab.config.max_len)
    scratch = OnnxExecutor.from_model(scratch_proto)  # every layer trains
    plan, _, eps_pld, _ = plan_privacy(site, options)
    t0 = time.perf_counter()
    run_dp_sgd(scratch, "logits", site, plan, args.scratch_learning_rate,
               np.random.default_rng(args.seed + 1), noise_seed=args.seed + 1)
    results["scratch_seconds"] = time.perf_counter() - t0
    results["accuracy_scratch_dp"] = accuracy(logits_of(scratch, site.heldout_inputs,
                                                        "logits"), site.heldout_labels)
    results["scratch_epsilon_pld"] = eps_pld


def cost_per_epoch(proto: Any, site: Any, plan: DpSgdPlan, seed: int, repeats: int = 5,
                   layer_sets: Sequence[tuple[str, ...] | None] = DEFAULT_LAYER_SETS,
                   per_example: bool = True) -> dict[str, Any]:
    """DP epoch vs plain epoch, same model, data, batch size (in stays) and optimizer.

    The DP epoch is the production configuration: Poisson sampling and float64 noise from
    the OS CSPRNG (SecureRandom), clipping on the path DpSgd chose (reported). Plain and
    DP epochs alternate ``repeats`` times after a warm-up; the ratio is the median of
    the per-repeat ratios (the machine is shared: alternation keeps both under the same
    load). The per-example path (the general fallback) is timed once beside them
    (``per_example``). ``layer_sets``: the trained layers of each measurement (None:
    every weight)."""
    import tensorflow as tf

    from adapters.dp import ClipPath, train_dp_sgd
    from adapters.randomness import SecureRandom

    stays_per_step = len(site.labels) * plan.sampling_rate  # expected stays per DP step
    batch = max(1, round(stays_per_step))
    one_epoch = DpSgdPlan(plan.units, plan.expected_batch_size, plan.sampling_rate,
                          max(1, round(1 / plan.sampling_rate)), plan.noise_multiplier,
                          plan.clip)
    out: dict[str, Any] = {"stays": len(site.labels), "batch_stays": batch,
                           "dp_steps_per_epoch": one_epoch.steps, "repeats": repeats}
    for trainable in layer_sets:
        executor = OnnxExecutor.from_model(
            proto, trainable=list(trainable) if trainable is not None else None)
        secure = SecureRandom()

        def make(path: ClipPath | None, executor: OnnxExecutor = executor,
                 secure: SecureRandom = secure) -> DpSgd:
            return DpSgd(executor, executor.input_names[0], "logits", plan.clip,
                         plan.noise_multiplier, tf.keras.optimizers.Adam(1e-3), rng=secure,
                         path=path)

        sgd, slow = make(None), make(ClipPath.PER_EXAMPLE)
        order_rng = np.random.default_rng(seed)

        def plain_epoch(sgd: DpSgd = sgd, rng: np.random.Generator = order_rng) -> None:
            order = rng.permutation(len(site.labels))
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                sgd.plain_step(site.inputs[idx], site.labels[idx])

        def dp_epoch(sgd: DpSgd = sgd, secure: SecureRandom = secure) -> None:
            train_dp_sgd(sgd, one_epoch, site.inputs, site.labels, site.units.tolist(),
                         secure)

        def slow_epoch(slow: DpSgd = slow, secure: SecureRandom = secure) -> None:
            train_dp_sgd(slow, one_epoch, site.inputs, site.labels, site.units.tolist(),
                         secure)

        plain_epoch()  # warm-up: traces the tf.functions of every path
        dp_epoch()
        if per_example:
            slow_epoch()
        plain_s, dp_s, ratios, cpu_ratios, plain_cpu, dp_cpu = [], [], [], [], [], []
        for _ in range(repeats):
            p_s, plain_mem = timed(plain_epoch)
            d_s, dp_mem = timed(dp_epoch)
            plain_s.append(p_s)
            dp_s.append(d_s)
            plain_cpu.append(plain_mem["cpu_seconds"])
            dp_cpu.append(dp_mem["cpu_seconds"])
            ratios.append(d_s / p_s)
            cpu_ratios.append(dp_mem["cpu_seconds"] / plain_mem["cpu_seconds"])
        row: dict[str, Any] = {
            "dp_path": sgd.path.value, "dp_fallback_reason": sgd.fallback_reason,
            "plain_epoch_seconds": float(np.median(plain_s)),
            "dp_epoch_seconds": float(np.median(dp_s)),
            "plain_epoch_cpu_seconds": float(np.median(plain_cpu)),
            "dp_epoch_cpu_seconds": float(np.median(dp_cpu)),
            "time_ratio": float(np.median(ratios)), "time_ratios": ratios,
            "cpu_time_ratio": float(np.median(cpu_ratios)), "cpu_time_ratios": cpu_ratios,
            "plain_memory": plain_mem, "dp_memory": dp_mem,
            "load_average": os.getloadavg()}
        if per_example:
            slow_s, slow_mem = timed(slow_epoch)
            row.update({"per_example_dp_epoch_seconds": slow_s,
                        "per_example_time_ratio": slow_s / float(np.median(plain_s)),
                        "per_example_cpu_seconds": slow_mem["cpu_seconds"],
                        "per_example_memory": slow_mem})
        out["+".join(trainable) if trainable is not None else "all"] = row
    return out


# ----------------------------------------------------------- vendors' architectures


def vendor_keras_models(vocab: int, max_len: int, embed: int, classes: int) -> dict[str, Any]:
    """The Conv1D and the transformer encoder of tests/vendor_models.py at a realistic,
    CPU-friendly size (same layers, wider)."""
    import tensorflow as tf

    keras, layers = tf.keras, tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    ids = keras.Input((max_len,), dtype="int32", name="token_ids")
    h = layers.Embedding(vocab, embed, name="embedding")(ids)
    h = layers.Conv1D(embed, 5, padding="same", activation="relu", name="conv_same")(h)
    h = layers.Conv1D(embed, 3, padding="causal", dilation_rate=2, activation="relu",
                      name="conv_causal")(h)
    h = layers.MaxPooling1D(2, name="pool")(h)
    h = layers.Conv1D(embed, 3, padding="valid", activation="tanh", name="conv_valid")(h)
    h = layers.GlobalMaxPooling1D(name="global_max")(h)
    conv = keras.Model(ids, layers.Dense(classes, name="logits")(h), name="vendor_conv1d")

    ids = keras.Input((max_len,), dtype="int32", name="token_ids")
    tokens = layers.Embedding(vocab, embed, name="token_embedding")(ids)
    positions = layers.Embedding(max_len, embed, name="position_embedding")(
        tf.range(max_len)[tf.newaxis, :])
    h = tokens + positions
    attended = layers.MultiHeadAttention(4, embed // 4, name="attention")(h, h)
    h = layers.LayerNormalization(epsilon=1e-6, name="norm_1")(h + attended)
    f = layers.Dense(2 * embed, activation="gelu", name="ffn_in")(h)
    f = layers.Dense(embed, name="ffn_out")(f)
    h = layers.LayerNormalization(epsilon=1e-6, name="norm_2")(h + f)
    h = layers.GlobalAveragePooling1D(name="mean")(h)
    transformer = keras.Model(ids, layers.Dense(classes, name="logits")(h),
                              name="vendor_transformer")
    return {"keras-conv1d": conv, "keras-transformer": transformer}


def vendor_cost(args: argparse.Namespace) -> dict[str, Any]:
    """DP epoch / plain epoch of the vendors' Conv1D and transformer (every weight
    trains), on synthetic token ids (1 to 3 stays per patient, padded tails), with an
    expected batch of ``--vendor-batch`` stays."""
    rng = np.random.default_rng(args.seed)
    n, length = args.vendor_stays, args.vendor_tokens
    x = rng.integers(1, args.vendor_vocab, size=(n, length)).astype(np.int32)
    kept = rng.integers(length // 4, length + 1, size=n)
    x[np.arange(length)[None, :] >= kept[:, None]] = 0
    y = rng.integers(0, args.vendor_classes, size=n).astype(np.int64)
    sizes = rng.integers(1, 4, size=n)  # stays per patient
    unit_of_stay = np.repeat(np.arange(n), sizes)[:n]
    units = int(unit_of_stay.max()) + 1
    q = min(1.0, args.vendor_batch / n)  # patients sampled with q: ~batch stays a step
    plan = DpSgdPlan(units, q * units, q, max(1, round(1 / q)), 1.0, 1.0)
    site = SimpleNamespace(inputs=x, labels=y, units=unit_of_stay)
    out: dict[str, Any] = {"stays": n, "patients": units, "tokens": length,
                           "vocabulary": args.vendor_vocab, "embedding": args.vendor_embed,
                           "expected_batch_stays": args.vendor_batch,
                           "load_average_start": os.getloadavg()}
    models = vendor_keras_models(args.vendor_vocab, length, args.vendor_embed,
                                 args.vendor_classes)
    for name in args.vendor:
        proto = keras_to_onnx(models[name], length)
        out[name] = cost_per_epoch(proto, site, plan, args.seed, args.repeats, [None],
                                   per_example=args.vendor_per_example)
        print(json.dumps({name: out[name]["all"]}, indent=1), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
