"""The ONNX backend node tests shipped inside the onnx package, on the executor.

Every node test whose operators are all in the executor's table runs (see
``tests/onnx_node_suite.py``): a wrong value or a TensorFlow error fails; the executor may
only refuse a test with its own error, naming what it does not claim (an attribute
value, a dtype, an opset), never crash on it. ``scripts/onnx_node_tests.py`` prints the
same run as a table per operator.
"""

from __future__ import annotations

import pytest

from adapters.onnx_tf import supported_operators
from tests.onnx_node_suite import NodeTest, claimed_tests, run_node_test

CLAIMED = claimed_tests()


@pytest.mark.parametrize("test", CLAIMED, ids=[t.name for t in CLAIMED])
def test_node_test_of_a_claimed_operator_passes_or_is_refused_cleanly(test: NodeTest) -> None:
    result = run_node_test(test)
    assert result.outcome != "fail", result.detail
    assert result.outcome == "pass" or result.detail  # a refusal says what is refused


def test_the_operators_vendors_models_need_pass_their_node_tests() -> None:
    """Not refused wholesale: each has node tests, and most of them pass."""
    needed = ["Conv", "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Slice",
              "Expand", "Erf", "ConstantOfShape", "CumSum", "Range", "ReduceProd",
              "ReduceSumSquare", "Max", "Min", "Clip", "BatchNormalization", "Split",
              "ReverseSequence", "GRU", "LSTM", "LayerNormalization", "Gelu"]
    outcomes: dict[str, list[str]] = {op: [] for op in needed}
    for test in CLAIMED:
        if test.operator[1] in outcomes and not test.operator[0]:
            outcomes[test.operator[1]].append(run_node_test(test).outcome)
    for op in needed:
        assert ("", op) in supported_operators()
        assert outcomes[op].count("pass") >= max(1, len(outcomes[op]) // 2), (op, outcomes[op])
