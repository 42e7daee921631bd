"""The receive data path: bounded memory whatever the bundle's size, and model-signing's
verifier fed the digests taken while unpacking (the same manifest, still checked)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.transfer_support import make_site, ship_dir
from transfer.bundle import SIGNATURE_FILE, _hashing_config, sign_model_dir, verify_model_signature
from transfer.errors import SignatureInvalid

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench_bundle.py"


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_bundle", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peaks(root: Path, size_mib: int) -> dict[str, float]:
    """create and verify of a bundle of ``size_mib``, each in a fresh process, as
    scripts/bench_bundle.py runs them (its own peak resident set, VmHWM: ``ru_maxrss``
    would start at this test runner's size)."""
    bench = _bench()
    work = root / f"w{size_mib}"
    work.mkdir()
    bench.prepare(work, size_mib)
    peaks = {}
    for step in ("create", "verify"):
        out = subprocess.run([sys.executable, str(BENCH), "--child", step, str(work)],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        peaks[step] = float(json.loads(out.stdout.strip().splitlines()[-1])["hwm_mb"])
    return peaks


def test_create_and_verify_memory_does_not_grow_with_the_bundle(tmp_path: Path) -> None:
    """An 8 MiB and a 64 MiB model (both above onnx_safety.FULL_PARSE_LIMIT) peak within
    a few MB of each other, under 100 MB (MLflow is not imported by either)."""
    small, large = _peaks(tmp_path, 8), _peaks(tmp_path, 64)
    for step in ("create", "verify"):
        assert large[step] <= 100, (step, large)
        assert abs(large[step] - small[step]) < 6, (step, small, large)


def _signed(tmp_path: Path) -> tuple[Path, Path, str]:
    x = make_site(tmp_path, "X")
    model = tmp_path / "stage" / "model"
    model.mkdir(parents=True)
    for f in ship_dir(tmp_path).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    signature = tmp_path / "stage" / SIGNATURE_FILE
    sign_model_dir(x.identity, model, signature)
    return model, signature, x.public.signing_key_pem


def _digests(model: Path) -> dict[str, str]:
    return {str(p): "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
            for p in model.iterdir()}


def test_known_digests_give_the_manifest_model_signing_computes(tmp_path: Path) -> None:
    model, _, _ = _signed(tmp_path)
    assert _hashing_config(_digests(model)).hash(model) == _hashing_config().hash(model)


def test_signature_checked_against_unpack_digests_refuses_a_wrong_one(
        tmp_path: Path) -> None:
    """The digests taken while unpacking are what the signed manifest is compared with:
    a wrong one (a file that changed as it was written) is refused, though the file on
    disk is the signed one; with the right ones it verifies."""
    model, signature, key = _signed(tmp_path)
    known = _digests(model)
    verify_model_signature(model, signature, key, tmp_path, known)
    known[str(model / "labels.json")] = "sha256:" + "0" * 64
    with pytest.raises(SignatureInvalid, match="does not verify"):
        verify_model_signature(model, signature, key, tmp_path, known)


def test_a_file_missing_from_unpack_digests_is_hashed_by_model_signing(
        tmp_path: Path) -> None:
    model, signature, key = _signed(tmp_path)
    known = _digests(model)
    del known[str(model / "model.onnx")]
    verify_model_signature(model, signature, key, tmp_path, known)
    (model / "model.onnx").write_bytes(b"changed")
    with pytest.raises(SignatureInvalid):
        verify_model_signature(model, signature, key, tmp_path, known)
