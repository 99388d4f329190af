"""Optional Triton import: `triton`/`tl` are None-like stand-ins when Triton is not installed,
so op modules import (and their torch/C++ paths work) without it."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False

    class _Missing:
        """Decorators become no-ops; anything else raises when used."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def heuristics(_values):
            return lambda f: f

        @staticmethod
        def autotune(*_a, **_kw):
            return lambda f: f

        def __getattr__(self, name):
            raise RuntimeError("triton is not installed (pip install triton)")

    triton = _Missing()
    tl = _Missing()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
