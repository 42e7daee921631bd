#!/usr/bin/env python3
"""Benchmark: CPU time and peak memory of refusing hostile bundles, beside a baseline.

Each case runs in a fresh child process, so ``ru_maxrss`` is that refusal's own peak;
the child first measures its resident set after imports and set-up (the baseline) and
reports the peak *added* by the refusal, and the CPU seconds (user + system) it took:

* ``pax-150k``: a payload whose first tar header is a 150 kB PAX extended header
  (CPython's quadratic PAX parsing, CVE-2024-6232: 13 s of CPU in tarfile on 3.11.7);
* ``pax-256m``: a 256 MiB PAX extended header (tarfile held it in memory, +513 MiB);
* ``gnu-3000``: 3,000 GNU long-name headers (a RecursionError in tarfile);
* ``json-60k``: a 60 KB nested-JSON outer header (a RecursionError in json).

Each is refused twice: by ``transfer.archive.unpack_stream`` on the bare stream (the
256 MiB stream is produced lazily, never held), and by ``bundle receive``
(``transfer.exchange.receive_bundle``: decryption, unpacking, refusal record) on a real
bundle. ``--tarfile`` also runs the first two through Python's tarfile, the baseline the
strict reader replaces (slow: 150 kB takes tens of seconds).

Usage: python scripts/bench_refusals.py [--tarfile] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def _header(name: bytes, kind: bytes, size: int) -> bytes:
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\x00"
    block[124:136] = b"%011o\x00" % size
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


class _Lazy(io.RawIOBase):
    """A read-only stream of ``head`` then ``size`` bytes of ``fill``, never held whole."""

    def __init__(self, head: bytes, size: int, fill: bytes = b"a") -> None:
        self._parts = self._generate(head, size, fill)
        self._pending = b""

    @staticmethod
    def _generate(head: bytes, size: int, fill: bytes) -> Iterator[bytes]:
        yield head
        chunk = fill * (1 << 20)
        while size > 0:
            yield chunk[:size]
            size -= len(chunk)
        yield bytes(1024)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if not self._pending:
            self._pending = next(self._parts, b"")
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _pax(size: int) -> tuple[bytes, int]:
    record = b"%d path=" % size
    return _header(b"PaxHeaders/x", b"x", size) + record, size - len(record)


def stream(case: str) -> io.RawIOBase:
    if case == "pax-150k":
        return _Lazy(*_pax(150_000))
    if case == "pax-256m":
        return _Lazy(*_pax(256 << 20))
    if case == "gnu-3000":
        one = _header(b"././@LongLink", b"L", 512) + b"a" * 512
        return _Lazy(one * 3000, 0)
    raise SystemExit(f"no archive stream for {case}")


def _usage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_maxrss * 1024 / MB


# ----------------------------------------------------------------- child

def child(case: str, level: str, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from passerelle.errors import PasserelleError

    if level == "bundle":
        from datetime import UTC, datetime

        from registry.store import ModelStore
        from tests.transfer_support import forge, make_site, ship_dir, trust
        from transfer.bundle import MAGIC
        from transfer.exchange import receive_bundle

        x, y = make_site(work, "X"), make_site(work, "Y")
        trust(x, y)
        trust(y, x)
        bundle = work / "hostile.bundle"
        if case == "json-60k":
            nested = b"[" * 30_000 + b"]" * 30_000
            bundle.write_bytes(MAGIC + len(nested).to_bytes(4, "big") + nested)
        else:
            def replace(tar: Path) -> None:
                with tar.open("wb") as f:
                    src = stream(case)
                    while chunk := src.read(1 << 20):
                        f.write(chunk)

            forge(bundle, x, [y], ship_dir(work), now=datetime.now(UTC),
                  replace_tar=replace)
        store = ModelStore(y.home)
        store.client.search_registered_models()  # MLflow imported and set up first
        cpu0, rss0 = _usage()
        start = time.perf_counter()
        try:
            receive_bundle(bundle, y.home, store, identity=y.identity)
            outcome = "ACCEPTED"
        except PasserelleError as e:
            outcome = f"{type(e).__name__}: {e}"
    else:
        from transfer.archive import unpack_stream

        dest = work / "out"
        dest.mkdir()
        src = stream(case)
        cpu0, rss0 = _usage()
        start = time.perf_counter()
        try:
            if level == "tarfile":
                import tarfile

                with tarfile.open(fileobj=src, mode="r|") as tar:
                    for _ in tar:
                        pass
                outcome = "read by tarfile"
            else:
                unpack_stream(src, dest)  # type: ignore[arg-type]
                outcome = "ACCEPTED"
        except PasserelleError as e:
            outcome = f"{type(e).__name__}: {e}"
        except (RecursionError, ValueError, OSError, EOFError) as e:
            outcome = f"{type(e).__name__} (not a refusal)"
        except Exception as e:
            outcome = f"{type(e).__name__}: {str(e)[:80]}"
    seconds = time.perf_counter() - start
    cpu1, rss1 = _usage()
    return {"case": case, "level": level, "outcome": outcome[:160], "seconds": seconds,
            "cpu_seconds": cpu1 - cpu0, "peak_added_mb": max(0.0, rss1 - rss0),
            "peak_mb": rss1}


def _run(case: str, level: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-refusal-") as work:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        out = subprocess.run([sys.executable, __file__, "--child", case, level, work],
                             check=True, capture_output=True, text=True, env=env,
                             timeout=1800)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarfile", action="store_true",
                        help="also run Python's tarfile on the PAX cases (default: off)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here (default: none)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], Path(args.child[2]))))
        return 0
    plan = [(c, "archive") for c in ("pax-150k", "pax-256m", "gnu-3000")]
    plan += [(c, "bundle") for c in ("pax-150k", "pax-256m", "gnu-3000", "json-60k")]
    if args.tarfile:
        plan += [("pax-150k", "tarfile"), ("gnu-3000", "tarfile")]
    rows = []
    print(f"{'case':<10} {'level':<8} {'CPU s':>7} {'wall s':>7} {'+peak MB':>9}  outcome")
    for case, level in plan:
        row = _run(case, level)
        rows.append(row)
        print(f"{case:<10} {level:<8} {row['cpu_seconds']:>7.3f} {row['seconds']:>7.3f} "
              f"{row['peak_added_mb']:>9.1f}  {row['outcome']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
