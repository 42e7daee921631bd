#!/usr/bin/env python3
"""The identifier scan's hit table on identifiers planted in every place an export ships.

Trains a small coder, exports it (on a recorded override: no audit here), scans the
clean export (no finding expected), plants the identifiers of tests/scan_support.py
(names from mimesis' French lists that the corpus generator never draws, spaced and
dotted numbers, dates in several shapes) in every JSON file and every string place of
the ONNX file, scans again and prints, per planted value, whether and where it was found.

Usage: python scripts/scan_planted.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from passerelle import steps
from registry.audit.scan import scan_export_dir
from registry.coder import CoderConfig
from registry.export import Override
from registry.store import ModelStore
from tests.scan_support import PLANTED, plant


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scan-planted-"))
    steps.generate_corpus("X", 800, 5, 0, work / "x")
    steps.train_model(work / "x", work / "m", CoderConfig(epochs=2))
    store = ModelStore(work / "home")
    ref = steps.register_model(store, work / "m", "coder", "scan", "scan").ref
    steps.export_model(store, ref, work / "e", Override("scan_planted.py", "no audit"))
    clean = scan_export_dir(work / "e")
    plant(work / "e")
    report = scan_export_dir(work / "e")
    table = Table(title=f"Planted identifiers (clean export: {len(clean.findings)} findings; "
                  f"planted: {len(report.findings)} findings)")
    for col in ("file", "planted", "expected", "found at"):
        table.add_column(col)
    for file, what, kind, place in PLANTED:
        hits = [f.where for f in report.findings
                if f.file == file and f.kind.value == kind and place in f.where]
        table.add_row(escape(file), escape(what), kind, escape(hits[0]) if hits else "MISSED")
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
