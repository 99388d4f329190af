"""Loads the C++ extension and registers fake (meta) kernels for its ops.

The ops are defined in csrc/torch_bindings.cpp (`TORCH_LIBRARY(r1kernels, m)`). Fake kernels
here give them shapes without running, so they trace under torch.compile(fullgraph=True) and
pass `torch.library.opcheck`. Autograd formulas are registered by each op module in ops/.
"""
from __future__ import annotations

import torch

EXT_ERROR: str | None
try:
    from r1kernels import _C  # noqa: F401  (loading registers the ops)

    EXT_ERROR = None
except ImportError as exc:  # built without the extension, or a torch ABI mismatch
    EXT_ERROR = f"{type(exc).__name__}: {exc}"


def has_op(name: str) -> bool:
    return EXT_ERROR is None and hasattr(torch.ops.r1kernels, name)


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether the extension registered a `dispatch_key` ("CPU"/"CUDA") kernel for op `name`."""
    if not has_op(name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"r1kernels::{name}", dispatch_key)


def register_fake(name: str):
    """Decorator: register a fake kernel for r1kernels::name when the extension defines it."""

    def wrap(fn):
        if has_op(name):
            torch.library.register_fake(f"r1kernels::{name}")(fn)
        return fn

    return wrap


# ---- fake kernels ---------------------------------------------------------------------------


@register_fake("group_advantages")
def _group_advantages_fake(rewards, group_size, scale, eps):
    return torch.empty_like(rewards, dtype=torch.float32)
