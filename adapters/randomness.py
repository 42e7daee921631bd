"""Randomness for DP-SGD: the operating system's CSPRNG in production, a parameter in tests.

:class:`SecureRandom` draws every random number of a DP-SGD run from ``os.urandom``
(Linux ``getrandom``: the kernel's ChaCha20-based CSPRNG, seeded from hardware entropy),
vectorised: ``8 n`` bytes become ``n`` 64-bit integers, whose top 53 bits give uniforms
``k / 2**53`` on ``[0, 1)`` (every float64 of that grid equally likely). Normals are made
from those uniforms by Box-Muller in float64. Nothing is seeded and nothing can be
replayed: two runs never share noise or samples.

Anything with the same two methods can stand in (:class:`RandomSource`), in particular
``numpy.random.Generator``: tests pass ``np.random.default_rng(seed)`` to be
deterministic. A seeded generator makes the noise reproducible, and reproducible noise
can be subtracted: it voids the guarantee, so only tests may pass one.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

_MANTISSA = 53


class RandomSource(Protocol):
    """What DP-SGD draws: uniforms on [0, 1) (Poisson sampling) and standard normals
    (the Gaussian noise), both float64. ``numpy.random.Generator`` is one."""

    def random(self, size: int) -> npt.NDArray[np.float64]: ...

    def standard_normal(self, size: int) -> npt.NDArray[np.float64]: ...


class SecureRandom:
    """Uniforms and normals from ``os.urandom`` (see the module docstring)."""

    def random(self, size: int) -> npt.NDArray[np.float64]:
        if size < 0:
            raise ValueError("size must be non-negative")
        words = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
        out: npt.NDArray[np.float64] = (
            (words >> np.uint64(64 - _MANTISSA)).astype(np.float64) * 2.0 ** -_MANTISSA)
        return out

    def standard_normal(self, size: int) -> npt.NDArray[np.float64]:
        """Box-Muller: ``sqrt(-2 ln u1) (cos, sin)(2 pi u2)`` with ``u1`` in (0, 1]."""
        half = (size + 1) // 2
        u = self.random(2 * half)
        radius = np.sqrt(-2.0 * np.log1p(-u[:half]))  # 1 - u in (0, 1]: log finite
        angle = (2.0 * math.pi) * u[half:]
        out: npt.NDArray[np.float64] = np.concatenate(
            [radius * np.cos(angle), radius * np.sin(angle)])[:size]
        return out


def is_seeded(rng: Any) -> bool:
    """True unless ``rng`` is the operating system's generator (for the run's record)."""
    return not isinstance(rng, SecureRandom)
