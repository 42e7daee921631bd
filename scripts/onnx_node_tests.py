"""Run the ONNX backend node tests shipped inside the onnx package on the executor.

Prints, per operator of the executor's table, how many node tests pass, fail or are
refused by the executor (``unsupported``: an attribute, dtype or opset outside what it
claims, refused with its own error), then the totals and every failure. Exit status 1
when a test of a claimed operator fails. See ``tests/onnx_node_suite.py`` for how a test
is attributed to an operator and compared.

    python scripts/onnx_node_tests.py [--verbose]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package

from rich.console import Console
from rich.progress import track
from rich.table import Table

from adapters.onnx_tf import supported_operators
from tests.onnx_node_suite import claimed_tests, node_tests, run_node_test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true",
                        help="also list every refused test and its reason (default: off)")
    args = parser.parse_args()
    console = Console()
    everything = node_tests()
    tests = claimed_tests()
    results = [run_node_test(t) for t in track(tests, description="node tests",
                                                console=console, transient=True)]
    counts: dict[tuple[str, str], Counter[str]] = {op: Counter() for op in supported_operators()}
    for r in results:
        counts.setdefault(r.test.operator, Counter())[r.outcome] += 1
    table = Table(title="ONNX backend node tests on the executor, per operator")
    for column in ("operator", "pass", "fail", "unsupported"):
        table.add_column(column, justify="left" if column == "operator" else "right")
    table_ops = set(supported_operators())
    for (domain, op), c in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        # a function operator outside the table, tested through its _expanded graphs
        suffix = "" if (domain, op) in table_ops else " (expanded only)"
        table.add_row(f"{domain + '::' if domain else ''}{op}{suffix}", str(c["pass"]),
                      str(c["fail"]), str(c["unsupported"]))
    console.print(table)
    total = Counter(r.outcome for r in results)
    console.print(f"{len(everything)} node tests in onnx; {len(tests)} use only operators of "
                  f"the table: {total['pass']} pass, {total['fail']} fail, "
                  f"{total['unsupported']} unsupported")
    no_test = sorted(op for op, c in counts.items() if not sum(c.values()))
    if no_test:
        console.print("operators without a node test: "
                      + ", ".join(f"{d + '::' if d else ''}{o}" for d, o in no_test))
    for r in results:
        if r.outcome == "fail" or (args.verbose and r.outcome == "unsupported"):
            console.print(f"{r.outcome}: {r.test.name}: {r.detail}", markup=False)
    return 1 if total["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
