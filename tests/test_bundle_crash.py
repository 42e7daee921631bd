"""SIGKILL at random points of ``bundle receive`` and ``bundle create`` (real CLI
processes, real MLflow, real ledger): after each kill, and after the run that follows,
no version is registered twice, no plaintext is outside the home's private areas, no
receive run holds the model without a version, the ledger matches the registry, and no
sequence number is used twice.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from registry.store import RECEIVE_TAG, TAG, ModelStore
from tests.transfer_support import Site, forge, make_site, ship_dir, trust
from transfer.ledger import Ledger, ledger_url
from transfer.records import RecordKind

PLAINTEXT = {"model.onnx", "transfer_statement.json", "vocabulary.json", "labels.json",
             "model_card.json", "model.sig", "payload.tar"}
PRIVATE = {".receiving", ".sending", "received", "mlartifacts"}  # all under a 0700 home


def _cli(*args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, "-m", "passerelle.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen[bytes], reached: Callable[[], bool],
               delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``reached()`` first holds (unless it
    ended first); whether it was killed."""
    deadline = time.monotonic() + 300
    while not reached():
        if proc.poll() is not None:
            proc.communicate()
            return False
        assert time.monotonic() < deadline, "the command never reached that point"
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        proc.communicate()
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    return True


def _timed(*args: str) -> float:
    start = time.monotonic()
    proc = _cli(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return time.monotonic() - start


def _plaintext_outside(root: Path, home: Path) -> list[Path]:
    """Plaintext files under ``root`` outside ``home``'s private areas (the sender's
    source folders under ``root/src`` excepted)."""
    found = []
    for path in root.rglob("*"):
        if root / "src" in path.parents:
            continue
        if path.is_file() and path.name in PLAINTEXT:
            inside = home in path.parents and path.relative_to(home).parts[0] in PRIVATE
            if not inside:
                found.append(path)
    return found


def _check_receiver(y: Site, root: Path, settled: bool) -> None:
    store = ModelStore(y.home)
    versions = store.client.search_model_versions("name = 'X.pmsi-coder'")
    digests = [v.tags.get(TAG + "bundle_digest") for v in versions]
    assert len(digests) == len(set(digests)), "a bundle registered twice"
    assert _plaintext_outside(root, y.home) == []
    if not settled:
        return
    with Ledger(ledger_url(y.home), "Y") as ledger:
        recorded = sorted((r.fields["local_model"], r.fields["local_version"])
                          for r in ledger.records(kind=RecordKind.BUNDLE_RECEIVED))
    assert recorded == sorted((v.name, str(v.version)) for v in versions)
    linked = {v.run_id for v in versions}
    runs = store.client.search_runs([store._experiment()],
                                    filter_string=f"tags.`{RECEIVE_TAG}` LIKE '%'")
    assert {r.info.run_id for r in runs} <= linked, "a receive run without its version"
    assert list((y.home / ".receiving").iterdir()) == []


def test_receive_killed_at_random_points_registers_each_bundle_once(tmp_path: Path) -> None:
    from transfer.exchange import receive_bundle

    rng = random.Random(12)  # noqa: S311 - test kill points, not security
    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    trust(y, x)
    now = datetime.now(UTC)
    bundles = [forge(tmp_path / f"b{i}.bundle", x, [y],
                     ship_dir(tmp_path / "src", name=f"s{i}"), version=str(i),
                     sequence=i, now=now) for i in (1, 2, 3, 4)]
    store = ModelStore(y.home)
    receive_bundle(bundles[0], y.home, store, identity=y.identity)
    _check_receiver(y, tmp_path, settled=True)
    artifacts = y.home / "mlartifacts"
    runs_before = len(list(artifacts.rglob("onnx")))
    phases: list[Callable[[], bool]] = [
        lambda: any((y.home / ".receiving").glob("rx-*/content")),  # decrypting
        lambda: (y.home / "received" / "X" / "pmsi-coder" / "3-3").exists(),  # installed
        lambda: len(list(artifacts.rglob("onnx"))) > runs_before,  # logging the run
    ]
    kills = 0
    for bundle, phase in zip(bundles[1:], phases, strict=True):
        proc = _cli("bundle", "receive", str(bundle), "--home", str(y.home))
        kills += _kill_when(proc, phase, rng.uniform(0.0, 0.3))
        _check_receiver(y, tmp_path, settled=False)
        runs_before = len(list(artifacts.rglob("onnx")))
        done = receive_bundle(bundle, y.home, store, identity=y.identity)  # the next run
        _check_receiver(y, tmp_path, settled=True)
        again = receive_bundle(bundle, y.home, store, identity=y.identity)
        assert again.already and again.version.ref == done.version.ref
    # one version per bundle (a version left without its record by a kill is removed
    # and the bundle registered again: MLflow does not reuse its number)
    versions = store.client.search_model_versions("name = 'X.pmsi-coder'")
    assert sorted(v.tags[TAG + "source_version"] for v in versions) == ["1", "2", "3", "4"]
    assert kills >= 2, f"only {kills} of 3 runs were killed before they ended"


def _exported_version(home: Path, root: Path, pad: bool = True) -> str:
    """A vendor's tiny ONNX registered through the intake and exported with a recorded
    override, as ``model register`` then ``model export --override`` leave it (real
    MLflow); ``pad``: 4 MiB more weights, for a longer encryption for the kill to land in."""
    from passerelle import steps
    from registry.store import VersionRef
    from tests.conftest import TEST_OVERRIDE
    from tests.intake_support import registered_torch_onnx

    ref = registered_torch_onnx(home, root / "src", pad_mib=4 if pad else 0)
    steps.export_model(ModelStore(home), VersionRef.parse(ref), root / "src" / "exported",
                       TEST_OVERRIDE)
    return ref


def test_create_killed_at_random_points_leaves_no_plaintext_and_no_reused_sequence(
        tmp_path: Path) -> None:
    from registry.store import VersionRef
    from transfer.bundle import read_envelope
    from transfer.exchange import create_bundle

    rng = random.Random(7)  # noqa: S311 - test kill points, not security
    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    ref = _exported_version(x.home, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    sending = x.home / ".sending"
    phases: list[Callable[[], bool]] = [
        lambda: any(sending.glob("tx-*/onnx")),  # exported folder fetched
        lambda: any(out_dir.glob("*.partial")),  # encrypting
    ]
    kills = 0
    for i, phase in enumerate(phases):
        out = out_dir / f"killed-{i}"
        proc = _cli("bundle", "create", ref, "--to", "Y", "--out", str(out), "--home",
                    str(x.home))
        kills += _kill_when(proc, phase, rng.uniform(0.0, 0.2))
        leftovers = [p for p in out_dir.iterdir() if p != out]
        assert all(p.name.endswith(".partial") for p in leftovers), leftovers  # ciphertext
        assert _plaintext_outside(tmp_path, x.home) == []
    create_bundle(x.home, ModelStore(x.home), VersionRef.parse(ref), ["Y"], out_dir / "last")
    assert [p.name for p in (x.home / ".sending").iterdir()] == []  # leftovers removed
    with Ledger(ledger_url(x.home), "X") as ledger:
        sequences = [r.fields["sequence"]
                     for r in ledger.records(kind=RecordKind.BUNDLE_CREATED)]
    assert len(sequences) == len(set(sequences)), sequences
    written = [read_envelope(p).header.transfer.sequence for p in out_dir.iterdir()
               if not p.name.endswith(".partial")]
    assert len(written) == len(set(written)) and set(written) <= set(sequences)
    assert kills >= 1, "no create was killed before it ended"


def _created(site: Site) -> list[tuple[str, int, str]]:
    with Ledger(ledger_url(site.home), site.identity.site) as ledger:
        return [(r.id, r.fields["sequence"], r.fields["bundle"])
                for r in ledger.records(kind=RecordKind.BUNDLE_CREATED)]


def test_create_killed_between_its_record_and_the_rename_is_finished_by_the_next_create(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A kill (here KeyboardInterrupt raised by the final rename, once) after the
    ``bundle_created`` record: the ciphertext stays beside --out with a journal in the
    home; the next create finishes that bundle under its name (roll forward), then makes
    its own; every record names a bundle on disk, no sequence is used twice."""
    import transfer.bundle as bundle_module
    from registry.store import VersionRef
    from transfer.bundle import read_envelope
    from transfer.exchange import create_bundle, verify_bundle

    x, y = make_site(tmp_path, "X"), make_site(tmp_path, "Y")
    trust(x, y)
    trust(y, x)
    ref = VersionRef.parse(_exported_version(x.home, tmp_path, pad=False))
    store = ModelStore(x.home)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    killed = out_dir / "killed.bundle"
    real_replace = os.replace

    def interrupted(src: Any, dst: Any) -> None:
        if Path(dst) == killed:
            monkeypatch.setattr(bundle_module.os, "replace", real_replace)
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(bundle_module.os, "replace", interrupted)
    try:
        create_bundle(x.home, store, ref, ["Y"], killed)
        raise AssertionError("the rename was not interrupted")
    except KeyboardInterrupt:
        pass
    # the detectable state: a record, no bundle yet, its ciphertext and a journal
    [(record, sequence, payload)] = _created(x)
    assert not killed.exists()
    [partial] = [p for p in out_dir.iterdir()]
    assert partial.name.endswith(".partial")
    journals = list((x.home / "transfer" / "pending-bundles").glob("tx-*.json"))
    assert len(journals) == 1 and json.loads(journals[0].read_text())["payload"] == payload
    assert _plaintext_outside(tmp_path, x.home) == []

    done = create_bundle(x.home, store, ref, ["Y"], out_dir / "next.bundle")
    assert done.finished == (killed,)
    assert sorted(p.name for p in out_dir.iterdir()) == ["killed.bundle", "next.bundle"]
    assert list((x.home / "transfer" / "pending-bundles").iterdir()) == []
    header = read_envelope(killed).header
    assert (header.ledger_record, header.transfer.sequence, header.payload_digest) == (
        record, sequence, payload)
    assert verify_bundle(killed, y.home).decrypted  # signed again over the recorded payload
    created = _created(x)
    on_disk = {(read_envelope(p).header.ledger_record, read_envelope(p).header.transfer.sequence)
               for p in out_dir.iterdir()}
    assert on_disk == {(r, s) for r, s, _ in created}
    assert len({s for _, s, _ in created}) == len(created) == 2
    assert _plaintext_outside(tmp_path, x.home) == []
    assert list((x.home / ".sending").iterdir()) == []


def test_two_first_receives_on_a_fresh_home_at_once_both_register(tmp_path: Path) -> None:
    """Two ``bundle receive`` processes start together on a home whose MLflow store does
    not exist yet (its schema is created under the home's lock), with bundles from two
    senders: both succeed, two versions, two ``bundle_received`` records, and the chain
    verifies."""
    from transfer.ledger_site import verify_site

    x, z, y = (make_site(tmp_path, name) for name in ("X", "Z", "Y"))
    trust(x, y)
    trust(z, y)
    trust(y, x, z)
    now = datetime.now(UTC)
    bundles = [forge(tmp_path / f"{s.identity.site}.bundle", s, [y],
                     ship_dir(tmp_path / "src", name=s.identity.site), now=now)
               for s in (x, z)]
    assert not (y.home / "mlflow.db").exists() and not (y.home / "mlartifacts").exists()
    procs = [_cli("bundle", "receive", str(b), "--home", str(y.home)) for b in bundles]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    store = ModelStore(y.home)
    versions = [(v.name, str(v.version)) for name in ("X.pmsi-coder", "Z.pmsi-coder")
                for v in store.client.search_model_versions(f"name = '{name}'")]
    assert sorted(versions) == [("X.pmsi-coder", "1"), ("Z.pmsi-coder", "1")]
    with Ledger(ledger_url(y.home), "Y") as ledger:
        received = ledger.records(kind=RecordKind.BUNDLE_RECEIVED)
    assert sorted(r.fields["from"] for r in received) == ["X", "Z"]
    verify_site(y.home)
    assert list((y.home / ".receiving").iterdir()) == []
    assert _plaintext_outside(tmp_path, y.home) == []
