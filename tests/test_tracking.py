"""The MLmodel signature logged beside every version: read from the ONNX wire format,
without decoding weights, and equal to what onnx's own parser says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from registry.tracking import model_signature
from tests.transfer_support import tiny_onnx


def _reference(path: Path) -> tuple[list[tuple[str, int, tuple[int, ...]]], ...]:
    proto = onnx.load(str(path))
    inits = {i.name for i in proto.graph.initializer}

    def rows(values: object) -> list[tuple[str, int, tuple[int, ...]]]:
        return [(v.name, v.type.tensor_type.elem_type,  # type: ignore[attr-defined]
                 tuple(d.dim_value if d.HasField("dim_value") else -1
                       for d in v.type.tensor_type.shape.dim))  # type: ignore[attr-defined]
                for v in values if v.name not in inits]  # type: ignore[attr-defined]

    return rows(proto.graph.input), rows(proto.graph.output)


def _names(signature: object) -> tuple[list[str], list[str]]:
    return ([s.name for s in signature.inputs.inputs],  # type: ignore[attr-defined]
            [s.name for s in signature.outputs.inputs])  # type: ignore[attr-defined]


def test_signature_equals_onnx_parser_and_skips_initializers_listed_as_inputs(
        tmp_path: Path) -> None:
    model = tiny_onnx()
    # Old exporters list initializers among the graph inputs: they are no model input.
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 4]))
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    signature = model_signature(folder)
    inputs, outputs = _reference(folder / "model.onnx")
    assert _names(signature) == ([r[0] for r in inputs], [r[0] for r in outputs]) == \
        (["x"], ["logits"])
    assert signature.inputs.inputs[0].shape == (1, 4)  # type: ignore[union-attr]


_PEAK = """
import sys
from pathlib import Path
import mlflow.models, mlflow.types.schema, onnx
from registry.tracking import model_signature
folder = Path(sys.argv[1])
if sys.argv[2] == "parse":
    onnx.load(str(folder / "model.onnx"))
else:
    sig = model_signature(folder)
    assert [s.name for s in sig.inputs.inputs] == ["x"], sig
    assert sig.inputs.inputs[0].shape == (-1, 4096), sig
# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
status = Path("/proc/self/status").read_text()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def _peak_kib(folder: Path, how: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PEAK, str(folder), how], check=True,
                          capture_output=True, text=True)
    return int(done.stdout.split()[-1])


def test_a_large_model_is_read_without_decoding_its_weights(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4096])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4096])
    weight = numpy_helper.from_array(np.ones((4096, 4096), np.float32), "w")  # 64 MiB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              [weight])
    folder = tmp_path / "big"
    folder.mkdir()
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    # Same imports in both processes; only onnx's parser decodes the 64 MiB weight.
    streamed, parsed = _peak_kib(folder, "signature"), _peak_kib(folder, "parse")
    assert streamed + 48 * 1024 < parsed, (streamed, parsed)


def test_a_model_without_input_gets_no_signature(tmp_path: Path) -> None:
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    c = helper.make_node("Constant", [], ["y"], value=helper.make_tensor("v", 1, [1], [1.0]))
    folder = tmp_path / "c"
    folder.mkdir()
    onnx.save(helper.make_model(helper.make_graph([c], "g", [], [y])), str(folder / "model.onnx"))
    assert model_signature(folder) is None


def test_a_truncated_file_gets_no_signature(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    onnx.save(tiny_onnx(), str(folder / "model.onnx"))
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    assert model_signature(folder) is None
