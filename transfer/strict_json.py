"""JSON from untrusted bytes, bounded before it is parsed.

Python's ``json`` decoder recurses once per nested array or object, so 60 KB of ``[``
is a ``RecursionError`` rather than a refusal. :func:`loads` checks the size and the
nesting depth first, with a linear scan that holds nothing but a counter, and turns
every decoding failure into the caller's own error class.
"""

from __future__ import annotations

import json
import re
from typing import Any

from passerelle.errors import PasserelleError

MAX_DEPTH = 32
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def depth_of(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (strings skipped)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRING.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads(raw: bytes, what: str, error: type[PasserelleError], max_bytes: int,
          max_depth: int = MAX_DEPTH, noun: str = "JSON") -> Any:
    """Decode ``raw`` (UTF-8 JSON) or raise ``error`` saying why, never anything else."""
    if len(raw) > max_bytes:
        raise error(f"{what}: larger than {max_bytes} bytes")
    if depth_of(raw) > max_depth:
        raise error(f"{what}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{what}: not {noun}") from e
