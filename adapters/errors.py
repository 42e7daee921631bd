"""Errors raised by the ONNX adapters (all :class:`passerelle.errors.BadInput`, exit 2)."""

from __future__ import annotations

from collections.abc import Iterable

from passerelle.errors import BadInput


class UnsupportedModel(BadInput):
    """The ONNX model uses a feature the TensorFlow executor refuses to run.

    Model-local functions, external data, subgraph attributes (If, Loop, Scan), an
    opset outside the supported range, or a request to train a non-float tensor.
    """


class UnsupportedOperators(UnsupportedModel):
    """The graph uses operators outside the executor's operator table.

    ``operators`` lists every unsupported ``(domain, op_type)`` pair of the graph, sorted,
    with the default domain spelled ``""``.
    """

    def __init__(self, operators: Iterable[tuple[str, str]], hint: str = "") -> None:
        self.operators: tuple[tuple[str, str], ...] = tuple(sorted(set(operators)))
        listed = ", ".join(f"{d or 'ai.onnx'}::{op}" for d, op in self.operators)
        super().__init__(f"unsupported ONNX operators: {listed}" + (f" ({hint})" if hint else ""))


class UnsupportedOperator(UnsupportedOperators):
    """Operators of the table used with attributes, inputs or outputs they refuse.

    ``problems`` lists every ``(domain, op_type, node name, reason)`` of the graph, so that
    all refused uses are reported at once, when the executor is built (never mid-training).
    """

    def __init__(self, problems: Iterable[tuple[str, str, str, str]]) -> None:
        self.problems: tuple[tuple[str, str, str, str], ...] = tuple(problems)
        self.operators = tuple(sorted({(d, op) for d, op, _, _ in self.problems}))
        listed = "; ".join(f"{d or 'ai.onnx'}::{op} node {name!r}: {why}"
                           for d, op, name, why in self.problems)
        UnsupportedModel.__init__(self, f"unsupported use of ONNX operators: {listed}")


class UnknownParameter(BadInput):
    """A trainable selection names no initializer, weight attribute or group of the graph."""
