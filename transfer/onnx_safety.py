"""Checks on a received ONNX model, run only after every signature has verified.

onnx 1.17 (pinned by TensorFlow 2.15; DESIGN.md, Dependencies) has known bugs with
external-data paths, symlinks and cyclic model-local functions. So a received model is
refused if it refers to external data anywhere (initializers, sparse initializers,
tensor attributes, subgraphs, training graphs), defines model-local functions, or uses
an operator domain outside the allow-list.

The check reads the protobuf wire format itself, streaming from the file: it descends
only into the messages that can hold those constructs and seeks over everything else
(weights included), so a 1 GiB model is checked in a few MB of memory and no onnx
parser code runs on it. Models up to ``FULL_PARSE_LIMIT`` (4 MiB) are then also loaded
with ``onnx.load(load_external_data=False)`` as a second, complete decoding; a model
that onnx cannot decode is refused. The limit bounds what that costs: importing onnx
(~25 MB) and decoding hold about twice the model in memory, so above 4 MiB (it was
32 MiB) a receive's memory no longer grows with the model (a 30 MiB model peaked at
167 MB in ``bundle verify``, against 86 MB now, as for 300 MiB).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from transfer.errors import UnsafeModel

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit
FULL_PARSE_LIMIT = 4 << 20
MAX_NESTING = 32
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# message -> {field number: what it holds}; fields not listed are skipped unread.
# Field numbers from onnx.proto (onnx 1.17).
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 8: "opset", 20: "training", 25: "FUNCTION"},
    "training": {1: "graph", 2: "graph"},
    "opset": {1: "DOMAIN"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute", 7: "DOMAIN"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse",
                  23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "EXTERNAL_DATA", 14: "DATA_LOCATION"},
}


class _Reader:
    def __init__(self, f: BinaryIO, name: str) -> None:
        self._f = f
        self.name = name
        self.pos = 0

    def bad(self, why: str) -> UnsafeModel:
        return UnsafeModel(f"{self.name}: not a well-formed ONNX model ({why})")

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise self.bad("truncated")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        self._f.seek(n, 1)
        self.pos += n

    def varint(self) -> int:
        value = 0
        for shift in range(0, 70, 7):
            byte = self.read(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise self.bad("varint too long")


def _walk(r: _Reader, kind: str, end: int, depth: int) -> None:
    if depth > MAX_NESTING:
        raise UnsafeModel(f"{r.name}: graphs nested deeper than {MAX_NESTING}")
    schema = _SCHEMA[kind]
    while r.pos < end:
        key = r.varint()
        field, wire = key >> 3, key & 7
        what = schema.get(field)
        if wire == 0:
            value = r.varint()
            if what == "DATA_LOCATION" and value == _EXTERNAL:
                raise UnsafeModel(f"{r.name}: a tensor uses external data")
            continue
        if wire in (1, 5):
            r.skip(8 if wire == 1 else 4)
            continue
        if wire != 2:
            raise r.bad(f"wire type {wire}")
        length = r.varint()
        stop = r.pos + length
        if stop > end:
            raise r.bad("a field runs past its message")
        if what is None or what == "DATA_LOCATION":
            r.skip(length)
        elif what == "FUNCTION":
            raise UnsafeModel(f"{r.name}: model-local functions are refused")
        elif what == "EXTERNAL_DATA":
            raise UnsafeModel(f"{r.name}: a tensor uses external data")
        elif what == "DOMAIN":
            if length > 256:
                raise r.bad("domain name too long")
            domain = r.read(length).decode("utf-8", "replace")
            if domain not in ALLOWED_DOMAINS:
                raise UnsafeModel(f"{r.name}: operator domain {domain!r} is not allowed")
        else:
            _walk(r, what, stop, depth + (what == "graph"))
        if r.pos != stop:
            raise r.bad("a message overruns its length")


def check_model(path: Path) -> None:
    """Refuse ``path`` unless it is a self-contained ONNX model in allowed domains."""
    if path.is_symlink() or not path.is_file():
        raise UnsafeModel(f"{path.name}: not a regular file")
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise UnsafeModel(f"{path.name}: larger than {MAX_ONNX_BYTES} bytes")
    with path.open("rb") as f:
        _walk(_Reader(f, path.name), "model", size, 0)
    if size <= FULL_PARSE_LIMIT:
        _full_parse(path)


def _full_parse(path: Path) -> None:
    import onnx
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise UnsafeModel(f"{path.name}: onnx cannot decode the model") from e
    if len(model.functions) > 0:  # the wire check found none; belt and braces
        raise UnsafeModel(f"{path.name}: model-local functions are refused")
