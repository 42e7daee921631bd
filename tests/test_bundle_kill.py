"""A receive killed (SIGKILL) right after decryption leaves no plaintext outside the
private receiving area, registers nothing, and the next run removes the leftovers."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from registry.store import ModelStore
from tests.transfer_support import LEDGER_FILES, forge, make_site, ship_dir, trust
from transfer.bundle import SLEEP_AFTER_DECRYPT_ENV
from transfer.exchange import verify_bundle


def test_receive_killed_after_decryption_leaves_no_plaintext(tmp_path: Path) -> None:
    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    trust(y, x)
    bundle = forge(tmp_path / "b.bundle", x, [y], ship_dir(tmp_path), now=datetime.now(UTC))
    env = {**os.environ, SLEEP_AFTER_DECRYPT_ENV: "60"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "passerelle.cli", "bundle", "receive",
                             str(bundle), "--home", str(y.home)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    area = y.home / ".receiving"
    try:
        deadline = time.monotonic() + 120
        while not list(area.glob("rx-*/content/model.sig")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the receive never reached decryption"
            time.sleep(0.1)
        time.sleep(0.5)  # decrypted and unpacked, now sleeping in the hook
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # What the killed process left: plaintext only inside the private 0700 area.
    leftovers = [p for p in y.home.rglob("*") if p.is_file()]
    plaintext = [p for p in leftovers if area in p.parents]
    assert {p.name for p in plaintext} >= {"model.onnx", "transfer_statement.json",
                                           "model.sig"}
    assert stat.S_IMODE(area.stat().st_mode) == 0o700
    for p in plaintext:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert all(stat.S_IMODE(d.stat().st_mode) == 0o700
                   for d in p.parents if area in d.parents or d == area)
    outside = {p.relative_to(y.home).parts[0] for p in leftovers if p not in plaintext}
    assert outside <= {"identity", "trust.json", ".receiving.lock", "mlflow.db",
                       *LEDGER_FILES}, outside
    assert not (y.home / "received").exists()
    assert ModelStore(y.home).client.search_registered_models() == []

    # The next run cleans the stale area before anything else.
    verify_bundle(bundle, y.home)
    assert list(area.iterdir()) == []
