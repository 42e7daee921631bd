#!/usr/bin/env python3
"""Benchmark: coding stays with ``predict`` and ``serve`` against bare onnxruntime and Keras.

Sets up a real transfer in a work folder: site X trains the reference coder (Keras) on
a synthetic corpus, registers and exports it (ONNX, parity checked), seals it for Y;
site Y receives it. Then, on Y's stays, in the same run:

* bare onnxruntime: the few lines anyone would write (vocabulary.encode + session.run,
  argmax), and the model alone (session.run on token ids already encoded);
* predict: Passerelle's coding path on a loaded, verified model (parse the stay, encode,
  run, softmax, top-5 with labels, JSON Lines), per batch; and ``code_file`` end to end
  (verification of signature, ledger digest and withdrawal, reading, writing);
* serve: ``passerelle serve`` in its own process, a real HTTP client with a keep-alive
  connection posting one stay per request (latency p50/p99), and batches;
* Keras predict of the source model on the same token ids (``model.predict`` and a
  direct ``model(x)`` call).

Goals (issue 13): predict >= 0.8 x bare onnxruntime at batch 256; serve p99 < 50 ms for a
single stay; onnxruntime >= 2 x Keras.

Usage: python scripts/bench_predict.py [--stays-x 6000] [--stays-y 2000] [--batch 256]
       [--repeats 30] [--requests 500] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _race(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Time every function once per round, rounds interleaved (the machine's load drifts
    between rounds, not between the contenders of one round)."""
    for fn in fns.values():
        fn()  # warm-up
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            fns[name]()
            out[name].append(time.perf_counter() - t)
    return out


def _summary(seconds: list[float], stays: int) -> dict[str, float]:
    a = np.asarray(seconds)
    return {"stays_per_s": stays / float(np.median(a)), "p50_ms": float(np.percentile(a, 50)) * 1e3,
            "p99_ms": float(np.percentile(a, 99)) * 1e3}


def setup(work: Path, stays_x: int, stays_y: int) -> tuple[Path, Path, Path, str]:
    from passerelle import steps
    from registry.coder import CoderConfig
    from registry.export import Override
    from registry.store import ModelStore
    from transfer.exchange import create_bundle, receive_bundle
    from transfer.identity import init_site, load_site
    from transfer.trust import TrustStore

    data_x, data_y = work / "data-x", work / "data-y"
    steps.generate_corpus("X", stays_x, 1, 0, data_x)
    steps.generate_corpus("Y", stays_y, 2, 0, data_y)
    x, y = work / "x", work / "y"
    init_site(x, "CHU-X")
    init_site(y, "CH-Y")
    TrustStore(x).add(load_site(y).public)
    TrustStore(y).add(load_site(x).public)
    report = steps.train_model(data_x, work / "model", CoderConfig(epochs=2, seed=1))
    store = ModelStore(x)
    info = steps.register_model(store, report.out_dir, "pmsi-coder", "PMSI coding",
                                "GDPR 6(1)(e)", data_x)
    steps.export_model(store, info.ref, work / "export",
                       Override("Benchmark", "benchmark without an audit"))
    create_bundle(x, store, info.ref, ["CH-Y"], work / "coder.bundle")
    received = receive_bundle(work / "coder.bundle", y, ModelStore(y))
    return y, data_y, report.out_dir, str(received.version.ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_serve(home: Path, ref: str, stays: list[dict[str, Any]], requests: int,
                batch: int) -> dict[str, Any]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "passerelle.cli", "serve", ref, "--port",
                             str(port), "--home", str(home)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/ping")
                answer = conn.getresponse()
                answer.read()
                if answer.status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.3)

        def post(rows: list[dict[str, Any]]) -> None:
            body = json.dumps({"dataframe_records": rows}).encode()
            conn.request("POST", "/invocations", body,
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"serve answered {r.status}")

        single = [{"stay_id": s["stay_id"], "sections": s["sections"]} for s in stays]
        for row in single[:20]:
            post([row])  # warm-up
        lat = []
        for i in range(requests):
            t = time.perf_counter()
            post([single[i % len(single)]])
            lat.append(time.perf_counter() - t)
        batches = _timed(lambda: post(single[:batch]), 10)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    a = np.asarray(lat)
    return {"single_p50_ms": float(np.percentile(a, 50)) * 1e3,
            "single_p99_ms": float(np.percentile(a, 99)) * 1e3,
            "single_stays_per_s": 1 / float(np.median(a)),
            f"batch{batch}": _summary(batches, batch)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stays-x", type=int, default=6000, help="stays of X's corpus (default 6000)")
    p.add_argument("--stays-y", type=int, default=2000, help="stays of Y's corpus (default 2000)")
    p.add_argument("--batch", type=int, default=256, help="stays per batch (default 256)")
    p.add_argument("--repeats", type=int, default=30,
                   help="timed repetitions of each batch measurement (default 30)")
    p.add_argument("--requests", type=int, default=500,
                   help="single-stay HTTP requests to serve (default 500)")
    p.add_argument("--workdir", type=Path,
                   help="work folder (default: a new temporary folder)")
    p.add_argument("--json", type=Path, help="also write the results here (default: none)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"setting up a transfer in {work} ...", file=sys.stderr)
    home, data_y, model_dir, ref = setup(work, args.stays_x, args.stays_y)

    import onnxruntime as ort

    from registry.coder import load_source_model
    from registry.model_dir import open_model_dir
    from registry.store import ModelStore, VersionRef
    from registry.vocabulary import select_text
    from transfer.coding import code_file
    from transfer.scoring import load_verified, parse_stay, session_options

    stays = [json.loads(line) for line in (data_y / "stays.jsonl").read_text().splitlines()]
    batch_docs = [{"stay_id": s["stay_id"], "sections": s["sections"]}
                  for s in stays[:args.batch]]
    t = time.perf_counter()
    coder = load_verified(ModelStore(home), VersionRef.parse(ref))
    verify_s = time.perf_counter() - t
    vocab = coder.model.vocabulary
    # the same bytes and options as Passerelle's coder (threads that do not spin: two
    # spinning pools would steal each other's cores), in a session of its own
    session = ort.InferenceSession(coder.model.onnx_bytes, session_options(),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    sections = vocab.config.sections
    ids = vocab.encode([select_text(d["sections"], sections) for d in batch_docs])

    def bare() -> None:
        x = vocab.encode([select_text(d["sections"], sections) for d in batch_docs])
        session.run(["logits"], {name: x})[0].argmax(axis=1)

    def model_only() -> None:
        session.run(["logits"], {name: ids})

    def predict() -> None:
        parsed = [parse_stay(d, "bench", coder.sections) for d in batch_docs]
        for row in coder.code(parsed, 5):
            json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    keras = load_source_model(open_model_dir(model_dir).model_file,
                              open_model_dir(model_dir).metadata.framework)

    def keras_predict() -> None:
        keras.predict(ids, batch_size=args.batch, verbose=0)

    def keras_call() -> None:
        np.asarray(keras(ids, training=False))

    def keras_encoded() -> None:  # the same work as bare onnxruntime, in Keras
        x = vocab.encode([select_text(d["sections"], sections) for d in batch_docs])
        keras.predict(x, batch_size=args.batch, verbose=0).argmax(axis=1)

    one = batch_docs[:1]
    one_ids = ids[:1]

    def bare_single() -> None:
        x = vocab.encode([select_text(one[0]["sections"], sections)])
        session.run(["logits"], {name: x})

    results: dict[str, Any] = {"batch": args.batch, "stays_y": len(stays), "model": ref,
                               "verify_and_load_s": verify_s}
    # onnxruntime's contenders race each other, then Keras's (TensorFlow's threads would
    # otherwise compete with the next contender)
    raced = _race({"bare_onnxruntime": bare, "onnxruntime_model_only": model_only,
                   "predict": predict}, args.repeats)
    raced |= _race({"keras_predict": keras_predict,
                    "keras_predict_with_encoding": keras_encoded, "keras_call": keras_call},
                   args.repeats)
    for label, seconds in raced.items():
        results[label] = _summary(seconds, args.batch)
    results["bare_onnxruntime_single"] = _summary(_timed(bare_single, 200), 1)
    results["onnxruntime_model_only_single"] = _summary(
        _timed(lambda: session.run(["logits"], {name: one_ids}), 200), 1)
    out = work / "codes.jsonl"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    code_file(ModelStore(home), VersionRef.parse(ref), data_y, out, 5)
    end_to_end = time.perf_counter() - t
    results["predict_end_to_end"] = {"stays": len(stays), "seconds": end_to_end,
                                     "stays_per_s": len(stays) / end_to_end}
    results["serve"] = bench_serve(home, ref, stays, args.requests, args.batch)
    r = results
    ratio = r["predict"]["stays_per_s"] / r["bare_onnxruntime"]["stays_per_s"]
    vs_keras = r["predict"]["stays_per_s"] / r["keras_predict_with_encoding"]["stays_per_s"]
    vs_keras_call = r["predict"]["stays_per_s"] / r["keras_call"]["stays_per_s"]
    results["ratios"] = {"predict_over_bare_onnxruntime": ratio,
                         "predict_over_keras_predict_with_encoding": vs_keras,
                         "onnxruntime_model_over_keras_predict":
                             r["onnxruntime_model_only"]["stays_per_s"]
                             / r["keras_predict"]["stays_per_s"],
                         "predict_over_keras_call": vs_keras_call,
                         "onnxruntime_model_over_keras_call":
                             r["onnxruntime_model_only"]["stays_per_s"]
                             / r["keras_call"]["stays_per_s"]}
    print(f"model {ref}, batch {args.batch}, {args.repeats} interleaved rounds (median):")
    for label in ("bare_onnxruntime", "onnxruntime_model_only", "predict", "keras_predict",
                  "keras_predict_with_encoding", "keras_call"):
        s = r[label]
        print(f"  {label:28s} {s['stays_per_s']:10.0f} stays/s   p50 {s['p50_ms']:7.2f} ms"
              f"   p99 {s['p99_ms']:7.2f} ms")
    print(f"  predict end to end       {r['predict_end_to_end']['stays_per_s']:10.0f} stays/s"
          f"   ({len(stays)} stays, verification and load {verify_s * 1e3:.0f} ms)")
    sv = r["serve"]
    print(f"  serve, 1 stay/request    p50 {sv['single_p50_ms']:.2f} ms   p99 "
          f"{sv['single_p99_ms']:.2f} ms ({args.requests} requests; bare onnxruntime one "
          f"stay p50 {r['bare_onnxruntime_single']['p50_ms']:.2f} ms, p99 "
          f"{r['bare_onnxruntime_single']['p99_ms']:.2f} ms)")
    b = sv[f"batch{args.batch}"]
    print(f"  serve, {args.batch} stays/request {b['stays_per_s']:8.0f} stays/s   p50 "
          f"{b['p50_ms']:.2f} ms")
    print(f"goal predict >= 0.8 x bare onnxruntime: {ratio:.2f} x "
          f"({'met' if ratio >= 0.8 else 'NOT met'})")
    print(f"goal serve p99 < 50 ms (single stay): {sv['single_p99_ms']:.2f} ms "
          f"({'met' if sv['single_p99_ms'] < 50 else 'NOT met'})")
    print(f"compass predict >= 2 x Keras predict (both encoding the letters): {vs_keras:.2f} x "
          f"({'met' if vs_keras >= 2 else 'NOT met'}); model alone, onnxruntime over Keras "
          f"predict {results['ratios']['onnxruntime_model_over_keras_predict']:.2f} x, over a "
          f"direct Keras call {results['ratios']['onnxruntime_model_over_keras_call']:.2f} x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
