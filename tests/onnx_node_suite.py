"""The ONNX backend node tests that ship inside the onnx package, run on the executor.

Each test is a directory ``onnx/backend/test/data/node/<name>/`` holding ``model.onnx``
(usually one node) and ``test_data_set_*/{input,output}_*.pb`` (tensors written by the
ONNX reference implementation). A test *belongs* to the operator it is named after (the
longest ONNX operator name, in snake case, that prefixes the test name; ``_expanded``
tests, which spell a function operator out in simpler ones, belong to the function
operator), or to its only node's operator. A test is *run* when every operator of its
graph is in the executor's table; its outcome is then

- ``pass``: every output has the expected dtype, shape and values (``rtol=1e-3``,
  ``atol=1e-6``; integers, booleans and strings exactly);
- ``unsupported``: the executor refused the graph or the inputs with one of its own
  errors (:class:`~adapters.errors.UnsupportedModel`: an attribute, a dtype or an opset
  outside what it claims);
- ``fail``: anything else (a wrong value, a TensorFlow error).

A model whose default-domain opset is older than the executor's first supported opset
(13) is moved to opset 13 when none of its operators changed between the two (same
``since_version``): it then means exactly the same thing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import tensorflow as tf
from onnx import numpy_helper

from adapters.errors import UnsupportedModel
from adapters.onnx_tf import SUPPORTED_OPSETS, OnnxExecutor, supported_operators

Outcome = Literal["pass", "fail", "unsupported"]
RTOL, ATOL = 1e-3, 1e-6
NODE_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"


@dataclass(frozen=True)
class NodeTest:
    name: str
    directory: Path
    operator: tuple[str, str]  # (domain, op_type) the test belongs to
    operators: frozenset[tuple[str, str]]  # every operator of its graph


@dataclass(frozen=True)
class NodeResult:
    test: NodeTest
    outcome: Outcome
    detail: str = ""


def _snake(op_type: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", op_type).lower()


@cache
def _schema_names() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        domain = "" if schema.domain == "ai.onnx" else schema.domain
        out.setdefault(_snake(schema.name), (domain, schema.name))
    return out


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _belongs_to(name: str, graph_ops: frozenset[tuple[str, str]],
                model: onnx.ModelProto) -> tuple[str, str]:
    if len(model.graph.node) == 1:
        node = model.graph.node[0]
        return _domain(node.domain), node.op_type
    stem = name.removeprefix("test_")
    names = _schema_names()
    best = max((s for s in names if stem == s or stem.startswith(s + "_")), key=len,
               default=None)
    if best is not None:
        return names[best]
    return sorted(graph_ops)[0]


def node_tests() -> list[NodeTest]:
    """Every node test of the installed onnx package, sorted by name."""
    out = []
    for directory in sorted(NODE_DIR.iterdir()):
        model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
        ops = frozenset((_domain(n.domain), n.op_type) for n in model.graph.node)
        out.append(NodeTest(directory.name, directory, _belongs_to(directory.name, ops, model),
                            ops))
    return out


def claimed_tests() -> list[NodeTest]:
    """The node tests whose every operator is in the executor's operator table."""
    table = set(supported_operators())
    return [t for t in node_tests() if t.operators <= table]


def _raise_old_opset(model: onnx.ModelProto) -> None:
    first = SUPPORTED_OPSETS[""].start
    for opset in model.opset_import:
        if _domain(opset.domain) or opset.version >= first:
            continue
        for node in model.graph.node:
            if _domain(node.domain):
                continue
            old = onnx.defs.get_schema(node.op_type, opset.version, "").since_version
            new = onnx.defs.get_schema(node.op_type, first, "").since_version
            if old != new:
                return  # the operator changed: keep the old opset (refused)
        opset.version = first


def _tensors(directory: Path, prefix: str) -> Iterator[Any]:
    for path in sorted(directory.glob(f"{prefix}_*.pb"),
                       key=lambda p: int(p.stem.rsplit("_", 1)[1])):
        tensor = onnx.TensorProto()
        tensor.ParseFromString(path.read_bytes())
        yield numpy_helper.to_array(tensor)


def _compare(name: str, expected: Any, got: Any) -> str:
    got = np.asarray(got)
    if expected.dtype.kind == "O" or got.dtype.kind in "SO":
        got_list = [g.decode() if isinstance(g, bytes) else g for g in got.ravel()]
        same = got.shape == expected.shape and got_list == list(expected.ravel())
        return "" if same else f"{name}: strings differ"
    if got.shape != expected.shape:
        return f"{name}: shape {got.shape} != {expected.shape}"
    if got.dtype != expected.dtype:
        return f"{name}: dtype {got.dtype} != {expected.dtype}"
    if expected.dtype.kind in "fc":
        try:
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
        except AssertionError:
            diff = np.nanmax(np.abs(got.astype(np.float64) - expected.astype(np.float64)))
            return f"{name}: values differ (max abs diff {diff:.3g})"
        return ""
    return "" if np.array_equal(got, expected) else f"{name}: values differ"


def run_node_test(test: NodeTest) -> NodeResult:
    """Run one node test (every data set) on the executor, eagerly."""
    model = onnx.load(str(test.directory / "model.onnx"), load_external_data=False)
    _raise_old_opset(model)
    try:
        executor = OnnxExecutor.from_model(model)
    except UnsupportedModel as e:
        return NodeResult(test, "unsupported", str(e))
    except Exception as e:  # (a node test the executor cannot build: a bug)
        return NodeResult(test, "fail", f"build: {type(e).__name__}: {e}")
    bf16 = {v.name for v in model.graph.input
            if v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16}
    for data in sorted(test.directory.glob("test_data_set_*")):
        try:
            inputs = list(_tensors(data, "input"))
            expected = list(_tensors(data, "output"))
        except Exception as e:  # (sequences, optionals: not tensors)
            return NodeResult(test, "unsupported", f"non-tensor test data: {e}")
        feeds = {name: _to_bfloat16(value) if name in bf16 else value
                 for name, value in zip(executor.input_names, inputs, strict=False)}
        try:
            got = executor(feeds)
        except UnsupportedModel as e:
            return NodeResult(test, "unsupported", str(e))
        except Exception as e:  # (a TensorFlow error is a failure)
            return NodeResult(test, "fail", f"run: {type(e).__name__}: {str(e)[:300]}")
        for name, value in zip(executor.output_names, expected, strict=False):
            mine = got[name]
            if mine.dtype == tf.bfloat16:  # numpy_helper keeps bfloat16 as its uint16 bits
                mine = tf.bitcast(mine, tf.uint16)
            problem = _compare(name, value, mine.numpy())
            if problem:
                return NodeResult(test, "fail", f"{data.name}: {problem}")
    return NodeResult(test, "pass")


def _to_bfloat16(bits: Any) -> Any:
    return tf.bitcast(tf.constant(np.asarray(bits, np.uint16)), tf.bfloat16)
