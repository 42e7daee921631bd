"""The package layout: each direction between registry/ and adapters/ has one owner.

registry/ (the source side) uses adapters' exporters and ONNX runner; adapters/ (bridges,
executor, DP-SGD) never imports registry/. What both sides share (the tokenizer, the input
kinds, the privacy units, the shipped file names) lives in passerelle/ (vocabulary.py,
contract.py), and the composition of registry, adapters and transfer is in passerelle/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _importers(package: str, target: str) -> dict[str, list[str]]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = sorted(m for m in _imports(path) if m == target or m.startswith(target + "."))
        if hits:
            out[str(path.relative_to(ROOT))] = hits
    return out


def test_adapters_never_import_registry() -> None:
    assert _importers("adapters", "registry") == {}


def test_registry_imports_adapters_only_for_bridges_and_the_onnx_runner() -> None:
    """The direction registry -> adapters exists (exporters, executor, ONNX runner); it is
    the only one, as the test above holds. This test fails if it stops being used, so the
    layout note above stays true."""
    used = {m for mods in _importers("registry", "adapters").values() for m in mods}
    assert "adapters.onnx_export" in used
    assert "adapters.onnx_run" in used
