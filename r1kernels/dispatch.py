"""Which backend runs each op.

Backends:
  "cuda"   CUDA kernels of the C++ extension (CUDA tensors; extension built with CUDA)
  "triton" Triton kernels (CUDA tensors; CPU tensors too when TRITON_INTERPRET=1)
  "cpp"    C++ CPU kernels of the extension (CPU tensors)
  "torch"  plain PyTorch, chunked where memory matters (any device)

Each op module registers the backends it implements, in order of preference per device type
(`register`). The choice is made once per (op, device type) and cached. `R1K_BACKEND` (read at
import) or `set_backend(...)` forces one backend for every op that implements it, in the whole
process; `use_backend(...)` does so in the calling thread only, for the `with` block, over the
process-wide setting. Forcing a backend that is implemented but unavailable here raises, naming
what is missing.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("cuda", "triton", "cpp", "torch")

# op name -> {"cuda": (preferred backends...), "cpu": (...)}
_OPS: dict[str, dict[str, tuple[str, ...]]] = {}
# op name -> the extension ops its "cpp"/"cuda" backends call (default: the op's own name)
_EXT_OPS: dict[str, tuple[str, ...]] = {}
_CACHE: dict[tuple[str, str, str | None], str] = {}
_WARNED: set[tuple[str, str]] = set()


def _env_backend() -> str | None:
    value = os.environ.get("R1K_BACKEND", "").strip().lower() or None
    if value is not None and value not in BACKENDS:
        raise ValueError(f"R1K_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


_FORCED: str | None = _env_backend()
# use_backend's per-thread override: `_THREAD.forced` is a 1-tuple (backend or None) inside a
# `with use_backend(...)` block, absent outside (a threading.local, which torch.compile guards on)
_THREAD = threading.local()

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def register(op: str, *, cuda: tuple[str, ...], cpu: tuple[str, ...],
             ext_ops: tuple[str, ...] | None = None) -> None:
    """Declare the backends `op` implements, most preferred first, per device type; `ext_ops`
    names the extension ops (torch.ops.r1kernels.*) its "cpp"/"cuda" backends call, when they
    are not the one named `op`."""
    for b in cuda + cpu:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} for op {op!r}")
    _OPS[op] = {"cuda": tuple(cuda), "cpu": tuple(cpu)}
    _EXT_OPS[op] = tuple(ext_ops) if ext_ops else (op,)
    _CACHE.clear()


def registered_ops() -> dict[str, dict[str, tuple[str, ...]]]:
    return dict(_OPS)


def extension_error() -> str | None:
    """Why the C++ extension is not loaded, or None when it is."""
    from r1kernels import _custom_ops

    return _custom_ops.EXT_ERROR


def _has_ext_kernel(op: str, key: str) -> bool:
    from r1kernels import _custom_ops

    return all(_custom_ops.has_kernel(name, key) for name in _EXT_OPS.get(op, (op,)))


def why_unavailable(op: str, backend: str, device_type: str) -> str | None:
    """None if `backend` can run `op` on `device_type` tensors here, else the reason."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed (pip install triton)"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and TRITON_INTERPRET:
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device_type}"
    if backend == "cpp":
        if device_type != "cpu":
            return f"the C++ CPU kernels need CPU tensors, got {device_type}"
        err = extension_error()
        if err is not None:
            return f"the r1kernels C++ extension is not loaded ({err})"
        if not _has_ext_kernel(op, "CPU"):
            return f"the C++ extension has no CPU kernel for {op}"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA kernels need CUDA tensors, got {device_type}"
        err = extension_error()
        if err is not None:
            return f"the r1kernels C++ extension is not loaded ({err})"
        if not _has_ext_kernel(op, "CUDA"):
            return (f"the extension was built without CUDA kernels for {op} "
                    "(reinstall with a CUDA torch and nvcc, or R1K_FORCE_CUDA_BUILD=1)")
        return None
    raise ValueError(f"unknown backend {backend!r}")


def available_backends(op: str, device_type: str) -> list[str]:
    """Backends that implement `op` and can run on `device_type` tensors here."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    impl = list(_OPS[op]["cuda"]) + list(_OPS[op]["cpu"])
    seen = []
    for b in impl:
        if b not in seen and why_unavailable(op, b, device_type) is None:
            seen.append(b)
    # preferred order for this device type first
    pref = [b for b in _OPS[op][kind] if b in seen]
    return pref + [b for b in seen if b not in pref]


def select(op: str, device: torch.device | str) -> str:
    """The backend that runs `op` for tensors on `device`."""
    local = getattr(_THREAD, "forced", None)
    return _select(op, torch.device(device).type, _FORCED if local is None else local[0])


@torch.compiler.assume_constant_result
def _select(op: str, device_type: str, forced: str | None) -> str:
    # A constant under torch.compile: the availability checks below ask the dispatcher, which
    # dynamo cannot trace, and the answer cannot change while a graph runs.
    key = (op, device_type, forced)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    if op not in _OPS:
        raise KeyError(f"r1kernels: no op named {op!r} is registered")
    kind = "cuda" if device_type == "cuda" else "cpu"
    implemented = set(_OPS[op]["cuda"]) | set(_OPS[op]["cpu"])
    if forced is not None and forced in implemented:
        reason = why_unavailable(op, forced, device_type)
        if reason is not None:
            raise RuntimeError(f"r1kernels: backend {forced!r} was requested for {op} but {reason}")
        choice = forced
    else:
        if forced is not None and (op, forced) not in _WARNED:
            _WARNED.add((op, forced))
            warnings.warn(f"r1kernels: {op} has no {forced!r} backend; using its default", stacklevel=4)
        choice = next((b for b in _OPS[op][kind] if why_unavailable(op, b, device_type) is None), "torch")
    _CACHE[key] = choice
    return choice


def _check(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def set_backend(backend: str | None) -> None:
    """Force `backend` for every op that implements it, in every thread (None: automatic choice).
    A `use_backend` block in progress in a thread still wins there."""
    global _FORCED
    _check(backend)
    _FORCED = backend


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Force `backend` (None: the automatic choice) for the ops this thread runs inside the
    block; other threads keep theirs. Blocks nest; leaving one restores the thread's previous
    setting."""
    _check(backend)
    previous = getattr(_THREAD, "forced", None)
    _THREAD.forced = (backend,)
    try:
        yield
    finally:
        if previous is None:
            del _THREAD.forced
        else:
            _THREAD.forced = previous
