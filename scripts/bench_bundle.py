#!/usr/bin/env python3
"""Benchmark: bundle create and receive throughput and peak memory, beside the floor.

For each size (MiB) it writes an ONNX model with one initializer of that size, then,
each step in a fresh child process (so ``ru_maxrss`` is that step's peak resident set):

* create: stage + model-signing + deterministic tar + age encryption + signed header
  (transfer.bundle.bundle_directory, as ``bundle create`` does after export; MLflow is
  not imported: the real command also reads the version from the registry);
* verify: every receive check, decrypting into the private area (``bundle verify``);
* receive: verify + atomic install + registration in a SQLite MLflow registry (set up
  beforehand, as a site's registry is). MLflow's import is in the step: ``from mlflow
  import MlflowClient`` alone is ~160 MB resident and ~2.5 s (mlflow/__init__ imports
  mlflow.genai, mlflow.data with pandas, the gateway with fastapi, whatever is used), so
  receive cannot be under 100 MB while it registers through MLflow's client; compare
  its peak with verify's (the same data path without MLflow);
* floor: ``sha256sum`` + ``age -e`` on the model (create), ``sha256sum`` + ``age -d`` on
  the bundle's payload (receive), the standard tools on the same file in the same run.

The data path reads the payload twice: once to check its digest against the signed
header before anything is decrypted, once to decrypt it, with the ciphertext hashed
again and the plaintext unpacked and hashed on a second thread; model-signing's
verifier is given those digests instead of reading the files a third time.

Peaks are ``ru_maxrss`` of each step's process (MB); ``hwm_mb`` in --json is VmHWM,
the same figure unless the process launching the steps is larger than a step (Linux
carries ``ru_maxrss`` over fork and exec).

Usage: python scripts/bench_bundle.py --sizes 100 [1024] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 1_000_000
TARGET_RATIO = 0.7  # throughput, relative to the floor's, that each step must reach
PEAK_LIMIT_MB = 100


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _vfield(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def write_big_onnx(path: Path, size: int) -> None:
    """An Identity model over one float initializer of ``size`` bytes, written streaming."""
    size -= size % 4
    node = _field(1, b"w") + _field(2, b"y") + _field(4, b"Identity")
    tensor_head = _vfield(1, size // 4) + _vfield(2, 1) + _field(8, b"w")
    raw_head = _varint(9 << 3 | 2) + _varint(size)
    tensor_len = len(tensor_head) + len(raw_head) + size
    shape = _field(2, _field(1, _vfield(1, size // 4)))  # TensorShapeProto, one dim
    value_info = _field(12, _field(1, b"y") + _field(2, _field(1, _vfield(1, 1) + shape)))
    # an (unused) graph input, so that MLflow can make a signature of the model
    value_info += _field(11, _field(1, b"x") + _field(2, _field(1, _vfield(1, 1) + _field(
        2, _field(1, _vfield(1, 1))))))
    graph_body_len = (len(_field(1, node)) + len(_field(2, b"big")) +
                      len(_varint(5 << 3 | 2)) + len(_varint(tensor_len)) + tensor_len +
                      len(value_info))
    with path.open("wb") as f:
        f.write(_vfield(1, 8) + _field(8, _vfield(2, 17)))
        f.write(_varint(7 << 3 | 2) + _varint(graph_body_len))
        f.write(_field(1, node) + _field(2, b"big"))
        f.write(_varint(5 << 3 | 2) + _varint(tensor_len) + tensor_head + raw_head)
        left = size
        while left:
            chunk = os.urandom(min(left, 4 << 20))
            f.write(chunk)
            left -= len(chunk)
        f.write(value_info)


def _peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss * 1024 / MB  # ru_maxrss is KiB on Linux


def _hwm_mb() -> float:
    """This process's own peak resident set (VmHWM). Linux carries ``ru_maxrss`` over
    fork and exec (a child starts at its parent's resident size then), so a step
    launched from a large process (a test runner) reports that size; VmHWM does not."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MB
    return _peak_mb()


# ----------------------------------------------------------------- child steps

def child(step: str, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from transfer.identity import load_site

    x_home, y_home = work / "x", work / "y"
    bundle = work / "model.bundle"
    start = time.perf_counter()
    if step == "create":
        from datetime import UTC, datetime

        from passerelle.digests import sha256_file
        from transfer.bundle import bundle_directory, make_transfer
        from transfer.statement import TransferStatement
        from transfer.trust import TrustStore

        me = load_site(x_home)
        to = [TrustStore(x_home).recipient("Y")]
        ship = work / "ship"
        statement = TransferStatement(
            make_transfer(me, to, "bench", "1", 1, datetime.now(UTC)), "benchmark",
            "none", "none", sha256_file(ship / "model.onnx"))
        bundle_directory(me, ship, statement, to, bundle)
    elif step == "verify":
        from transfer.exchange import verify_bundle

        verify_bundle(bundle, y_home)
    elif step == "receive":
        from registry.store import ModelStore
        from transfer.exchange import receive_bundle

        receive_bundle(bundle, y_home, ModelStore(y_home))
    else:
        raise SystemExit(f"unknown step {step}")
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(),
            "hwm_mb": _hwm_mb()}


def floor(kind: str, work: Path) -> dict[str, Any]:
    age = shutil.which("age")
    if age is None:
        raise SystemExit("error: the age tool is needed for the floor (apt-get install age)")
    start = time.perf_counter()
    if kind == "create":
        model = work / "ship" / "model.onnx"
        recipient = json.loads((work / "y" / "identity" / "identity.json").read_text())[
            "age_recipient"]
        subprocess.run(["sha256sum", str(model)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([age, "-r", recipient, "-o", str(work / "floor.age"), str(model)],
                       check=True)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from transfer.bundle import read_envelope

        bundle = work / "model.bundle"
        offset = read_envelope(bundle).payload_offset
        subprocess.run(["sha256sum", str(bundle)], check=True, stdout=subprocess.DEVNULL)
        with bundle.open("rb") as f:
            f.seek(offset)
            subprocess.run([age, "-d", "-i", str(work / "y" / "identity" / "age_identity.txt"),
                            "-o", os.devnull], stdin=f, check=True)
    return {"seconds": time.perf_counter() - start,
            "peak_mb": _peak_mb(resource.RUSAGE_CHILDREN)}


def _run_child(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------- driver

def prepare(work: Path, size_mib: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from transfer.identity import init_site
    from transfer.trust import TrustStore

    x, y = init_site(work / "x", "X"), init_site(work / "y", "Y")
    TrustStore(work / "x").add(y)
    TrustStore(work / "y").add(x)
    # The receiving site's registry exists before it receives (MLflow's one-time schema
    # creation is not part of a receive's throughput).
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from registry.store import ModelStore; "
                    "ModelStore(Path(sys.argv[1])).client.search_registered_models()",
                    str(work / "y")], check=True, env=env,
                   cwd=Path(__file__).resolve().parent.parent)
    ship = work / "ship"
    ship.mkdir()
    write_big_onnx(ship / "model.onnx", size_mib << 20)
    for name, doc in (("vocabulary.json", {"tokens": []}), ("labels.json", {}),
                      ("model_card.json", {"format": "passerelle-model-card"})):
        (ship / name).write_text(json.dumps(doc))


def bench(size_mib: int, root: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{size_mib}-", dir=root))
    try:
        prepare(work, size_mib)
        mb = (size_mib << 20) / MB
        row: dict[str, Any] = {"size_mib": size_mib}
        for step in ("create", "verify", "receive"):
            row[step] = _run_child(["--child", step, str(work)])
        for kind in ("create", "receive"):
            row[f"floor_{kind}"] = _run_child(["--floor", kind, str(work)])
        for key in ("create", "verify", "receive", "floor_create", "floor_receive"):
            row[key]["mb_per_s"] = mb / row[key]["seconds"]
        row["bundle_bytes"] = (work / "model.bundle").stat().st_size
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(rows: list[dict[str, Any]]) -> None:
    print(f"{'size':>8} {'step':<10} {'seconds':>8} {'MB/s':>8} {'peak MB':>8}")
    for row in rows:
        for key in ("create", "floor_create", "verify", "receive", "floor_receive"):
            r = row[key]
            print(f"{row['size_mib']:>6}Mi {key:<14} {r['seconds']:>8.2f} {r['mb_per_s']:>8.1f} "
                  f"{r['peak_mb']:>8.1f}")
    print()
    for row in rows:
        verdicts = []
        for step, floor_key in (("create", "floor_create"), ("verify", "floor_receive"),
                                ("receive", "floor_receive")):
            ratio = row[floor_key]["seconds"] / row[step]["seconds"]
            peak = row[step]["peak_mb"]
            verdicts.append(f"{step} {ratio:.2f}x the floor's throughput "
                            f"({'ok' if ratio >= TARGET_RATIO else 'BELOW'} {TARGET_RATIO}x), "
                            f"peak {peak:.0f} MB "
                            f"({'ok' if peak <= PEAK_LIMIT_MB else 'ABOVE'} {PEAK_LIMIT_MB} MB)")
        print(f"{row['size_mib']} MiB: " + "; ".join(verdicts))
    print("floor: sha256sum + age -e (create), sha256sum + age -d (verify, receive)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100], metavar="MIB",
                        help="payload sizes to bundle, in MiB (default 100)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder in which each size's work folder is made and removed "
                             "(default: the system's temporary folder)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write results here (default: none)")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--floor", nargs=2, metavar=("KIND", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return 0
    if args.floor:
        print(json.dumps(floor(args.floor[0], Path(args.floor[1]))))
        return 0
    root = args.workdir or Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    rows = [bench(size, root) for size in args.sizes]
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
