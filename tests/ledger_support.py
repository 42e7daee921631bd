"""Helpers for the ledger tests: a worker process that appends, and tamper helpers.

Run as ``python -m tests.ledger_support append URL SITE KEY_PEM COUNT START_AT`` (the
concurrency tests start several at once) or ``... pause URL SITE KEY_PEM`` (appends one
record and stops inside the transaction, after the insert and before the commit, so
that the crash test can SIGKILL it there).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from transfer.ledger import Ledger
from transfer.records import EcdsaSigner, Record, RecordKind, Subject

PAUSED = "paused-inside-the-transaction"


def load_signer(pem: Path) -> EcdsaSigner:
    key = serialization.load_pem_private_key(pem.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return EcdsaSigner(key)


def write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


def subject(i: int) -> Subject:
    return Subject.of(f"model:m/{i}", "sha256:" + f"{i:064x}")


def _append(url: str, site: str, pem: Path, count: int, start_at: float) -> None:
    signer = load_signer(pem)
    with Ledger(url, site) as ledger:
        time.sleep(max(0.0, start_at - time.time()))
        for i in range(count):
            ledger.append(RecordKind.FINETUNE, [subject(i)],
                          {"model": "m", "version": str(i), "worker": os.getpid()}, signer)
    print(f"{os.getpid()} appended {count}", flush=True)


def _pause(url: str, site: str, pem: Path) -> None:
    def stop_here(record: Record) -> None:
        print(f"{PAUSED} {record.seq} {record.id}", flush=True)
        time.sleep(120)

    with Ledger(url, site, after_insert=stop_here) as ledger:
        ledger.append(RecordKind.FINETUNE, [subject(9999)], {"model": "m"}, load_signer(pem))


if __name__ == "__main__":
    command, url, site, pem = sys.argv[1:5]
    if command == "append":
        _append(url, site, Path(pem), int(sys.argv[5]), float(sys.argv[6]))
    else:
        _pause(url, site, Path(pem))


# -- test-side helpers (run in the pytest process) ------------------------------------


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.ledger_support", *args]


def run_concurrently(url: str, site: str, pem: Path, processes: int, each: int
                     ) -> tuple[float, list[str]]:
    """Start ``processes`` appenders at the same instant; seconds taken and their output."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    start_at = time.time() + 2.5  # time for every worker to import and connect
    procs = [subprocess.Popen(_worker("append", url, site, str(pem), str(each), str(start_at)),
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(processes)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    return time.time() - start_at, outputs


def kill_mid_append(url: str, site: str, pem: Path) -> tuple[int, str]:
    """Start an append, SIGKILL it after its insert and before its commit: (seq, id)."""
    import signal
    import subprocess

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(_worker("pause", url, site, str(pem)), cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[0] == PAUSED, proc.stderr.read() if proc.stderr else line
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    return int(line[1]), line[2]
