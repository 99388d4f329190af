"""Group-normalized advantages (GRPO's critic-free baseline).

    A[i] = (r[i] - mean_g(r)) / (std + eps)

std is the unbiased std of the group (scale="group"), of the whole batch ("batch"), or the
division is skipped ("none"). NaN rewards are left out of mean and std and get A = 0; a group
whose valid rewards are all equal (or with fewer than 2 of them) gets A = 0 exactly.

Backends: CUDA kernel (csrc/group_advantages/), Triton kernel (below), C++ CPU kernel, and the
float32 reference as the torch path. All run as one launch for any number of prompts.
"""
from __future__ import annotations

import torch

from r1kernels import dispatch
from r1kernels.ops._triton import HAS_TRITON, next_power_of_2, tl, triton
from r1kernels.reference import group_advantages_ref

OP = "group_advantages"
SCALES = {"group": 0, "batch": 1, "none": 2}
dispatch.register(OP, cuda=("cuda", "triton", "torch"), cpu=("cpp", "torch"))

# ---- Triton kernel ----------------------------------------------------------------------------
# Bytes: reads 4 B and writes 4 B per reward (stats re-reads of a tile hit L1/L2).
# Each program owns ROWS groups at a time ([ROWS, BLOCK_G] tile; groups longer than BLOCK_G are
# walked in chunks). scale="batch" runs with a single program that first reduces the batch.


@triton.jit
def _tile_stats(r_ptr, rows, row_ok, G, BLOCK_G: tl.constexpr, ROWS: tl.constexpr):
    """Per-row count, sum, min, max of the non-NaN rewards of a [ROWS] set of groups."""
    n = tl.zeros([ROWS], dtype=tl.float32)
    s = tl.zeros([ROWS], dtype=tl.float32)
    lo = tl.full([ROWS], float("inf"), dtype=tl.float32)
    hi = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_G)
    for start in range(0, G, BLOCK_G):
        c = start + cols
        ok = row_ok[:, None] & (c[None, :] < G)
        v = tl.load(r_ptr + rows[:, None] * G + c[None, :], mask=ok, other=float("nan"))
        valid = v == v
        n += tl.sum(valid.to(tl.float32), axis=1)
        s += tl.sum(tl.where(valid, v, 0.0), axis=1)
        lo = tl.minimum(lo, tl.min(tl.where(valid, v, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(valid, v, float("-inf")), axis=1))
    return n, s, lo, hi


@triton.jit
def _tile_sq_dev(r_ptr, rows, row_ok, G, mean, BLOCK_G: tl.constexpr, ROWS: tl.constexpr):
    acc = tl.zeros([ROWS], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_G)
    for start in range(0, G, BLOCK_G):
        c = start + cols
        ok = row_ok[:, None] & (c[None, :] < G)
        v = tl.load(r_ptr + rows[:, None] * G + c[None, :], mask=ok, other=float("nan"))
        d = tl.where(v == v, v - mean[:, None], 0.0)
        acc += tl.sum(d * d, axis=1)
    return acc


@triton.jit
def _normalize_tile(r_ptr, out_ptr, tile, P, G, eps, batch_std, MODE: tl.constexpr,
                    BLOCK_G: tl.constexpr, ROWS: tl.constexpr):
    """Write the advantages of groups [tile * ROWS, tile * ROWS + ROWS)."""
    rows = tl.arange(0, ROWS).to(tl.int64) + tile * ROWS  # int64: rows * G may pass 2**31
    row_ok = rows < P
    cols = tl.arange(0, BLOCK_G)
    n, s, lo, hi = _tile_stats(r_ptr, rows, row_ok, G, BLOCK_G, ROWS)
    constant = (n <= 1.0) | (lo == hi)
    mean = s / tl.maximum(n, 1.0)
    if MODE == 0:
        ssd = _tile_sq_dev(r_ptr, rows, row_ok, G, mean, BLOCK_G, ROWS)
        denom = tl.where(constant, 1.0, tl.sqrt(ssd / tl.maximum(n - 1.0, 1.0)) + eps)
    elif MODE == 1:
        denom = tl.zeros([ROWS], dtype=tl.float32) + (batch_std + eps)
    else:
        denom = tl.full([ROWS], 1.0, dtype=tl.float32)
    inv = 1.0 / denom
    for start in range(0, G, BLOCK_G):
        c = start + cols
        ok = row_ok[:, None] & (c[None, :] < G)
        offs = rows[:, None] * G + c[None, :]
        v = tl.load(r_ptr + offs, mask=ok, other=float("nan"))
        a = (v - mean[:, None]) * inv[:, None]
        a = tl.where((v == v) & (~constant[:, None]), a, 0.0)
        tl.store(out_ptr + offs, a, mask=ok)


@triton.jit
def _group_advantages_fwd_kernel(r_ptr, out_ptr, P, G, eps, MODE: tl.constexpr,
                                 BLOCK_G: tl.constexpr, ROWS: tl.constexpr, BLOCK_B: tl.constexpr):
    if MODE == 1:
        # whole-batch std: this single program reduces the batch, then walks every tile
        one = tl.full([1], 0, dtype=tl.int64)
        total = P * G
        bn, bs, blo, bhi = _tile_stats(r_ptr, one, one == 0, total, BLOCK_B, 1)
        bmean = bs / tl.maximum(bn, 1.0)
        bssd = _tile_sq_dev(r_ptr, one, one == 0, total, bmean, BLOCK_B, 1)
        batch_std = tl.sum(tl.where(bn > 1.0, tl.sqrt(bssd / tl.maximum(bn - 1.0, 1.0)), 0.0), axis=0)
        for tile in range(0, tl.cdiv(P, ROWS)):
            _normalize_tile(r_ptr, out_ptr, tile, P, G, eps, batch_std, MODE, BLOCK_G, ROWS)
    else:
        _normalize_tile(r_ptr, out_ptr, tl.program_id(0), P, G, eps, 0.0, MODE, BLOCK_G, ROWS)


def group_advantages_fwd_triton(rewards: torch.Tensor, group_size: int, scale: str,
                                eps: float) -> torch.Tensor:
    """Launcher: 1-D fp32 rewards -> fp32 advantages, one launch."""
    r = rewards.contiguous()
    out = torch.empty_like(r)
    G = int(group_size)
    P = r.numel() // G
    if P == 0:
        return out
    BLOCK_G = min(next_power_of_2(G), 1024)
    ROWS = max(1, min(1024 // BLOCK_G, next_power_of_2(P)))  # <= 8 rewards per thread: no spills
    mode = SCALES[scale]
    # scale="batch": one program, so the batch statistics are known before any group is written
    grid = (1,) if mode == 1 else (triton.cdiv(P, ROWS),)
    _group_advantages_fwd_kernel[grid](r, out, P, G, float(eps), MODE=mode, BLOCK_G=BLOCK_G,
                                       ROWS=ROWS, BLOCK_B=2048, num_warps=4)
    return out


# The Triton launcher as a custom op, so torch.compile treats it as one opaque node. Eager calls
# skip the custom-op wrapper (tens of microseconds of Python on an op that takes a few).
if HAS_TRITON:

    @torch.library.custom_op("r1kernels_triton::group_advantages", mutates_args=())
    def _group_advantages_triton_op(rewards: torch.Tensor, group_size: int, scale: str,
                                    eps: float) -> torch.Tensor:
        return group_advantages_fwd_triton(rewards, group_size, scale, eps)

    @_group_advantages_triton_op.register_fake
    def _(rewards, group_size, scale, eps):
        return torch.empty_like(rewards)


def _forward(rewards: torch.Tensor, group_size: int, scale: str, eps: float, backend: str) -> torch.Tensor:
    if backend in ("cuda", "cpp"):
        return torch.ops.r1kernels.group_advantages(rewards, group_size, scale, eps)
    if backend == "triton":
        if torch.compiler.is_compiling():
            return _group_advantages_triton_op(rewards, group_size, scale, eps)
        return group_advantages_fwd_triton(rewards, group_size, scale, eps)
    return group_advantages_ref(rewards, group_size, scale=scale, eps=eps)


class GroupAdvantagesFunction(torch.autograd.Function):
    """Kernel forward; dA/dr recomputed from the reference in backward (rewards are a few
    thousand floats, and are rarely differentiable at all: only used when they require grad)."""

    @staticmethod
    def forward(ctx, rewards, group_size, scale, eps, backend):
        ctx.save_for_backward(rewards)
        ctx.args = (group_size, scale, eps)
        return _forward(rewards, group_size, scale, eps, backend)

    @staticmethod
    def backward(ctx, grad):
        (rewards,) = ctx.saved_tensors
        group_size, scale, eps = ctx.args
        with torch.enable_grad():
            r = rewards.detach().requires_grad_(True)
            out = group_advantages_ref(r, group_size, scale=scale, eps=eps)
            (g,) = torch.autograd.grad(out, r, grad)
        return g, None, None, None, None


# ---- public function --------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-normalized advantages of `rewards [P * G]` (consecutive blocks of `group_size`).

    Returns fp32 advantages of the same shape. See docs/api.md.
    """
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"group_advantages: rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise ValueError(f"group_advantages: rewards must be real numbers, got dtype {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_advantages: group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_advantages: rewards.numel() ({rewards.numel()}) is not a multiple "
                         f"of group_size ({group_size})")
    if not isinstance(scale, str) or scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps != float("inf")):
        raise ValueError(f"group_advantages: eps must be a finite number >= 0, got {eps!r}")
    shape = rewards.shape
    r = rewards.reshape(-1).to(torch.float32)
    backend = dispatch.select(OP, r.device)
    if r.requires_grad and torch.is_grad_enabled():
        out = GroupAdvantagesFunction.apply(r, group_size, scale, float(eps), backend)
    else:
        out = _forward(r, group_size, scale, float(eps), backend)
    return out.reshape(shape)
