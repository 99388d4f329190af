"""Per-token log-probabilities (and entropy) from hidden states and the lm_head weight, without
ever holding the [N, V] logits.

    logits = hidden @ weight.T + bias,   logp / entropy as in ops/token_logprobs.py

Design: two sweeps over [rows x vocabulary] tiles of at most `TILE_ELEMS` fp32 logits.
  Pass 1 (forward): per row tile, per vocabulary tile: Z = h_tile @ W_tile.T accumulated and
    output in fp32 (cuBLAS `torch.mm(..., out_dtype=float32)` for bf16/fp16 on CUDA: products are
    never rounded to bf16; fp32 inputs use fp32 GEMMs, TF32 only if the user enabled it), then the
    statistics kernel of token_logprobs merges (max, sum-exp, target logit, entropy sum) of the
    tile into a per-row state. Keeps lse and entropy (8 bytes per row) for pass 2.
  Pass 2 (backward, once dL/dlogp is known): vocabulary tile outer, row tile inner: recompute Z,
    G = dL/dZ (token_logprobs' gradient kernel, written in the GEMM dtype), then
      grad_hidden[rows] += G @ W_tile              (fp32 accumulator [N, H])
      grad_weight[tile]  = sum_rows G.T @ h_rows   (fp32 accumulator [tile, H], rounded once)
      grad_bias[tile]    = sum_rows G              (fp32)
FLOPs: 8 * N * H * V (pass 1: one GEMM, pass 2: three). A single sweep (6 * N * H * V) would have
to keep grad_weight in fp32 across row chunks (4 bytes * V * H: 2.3 GiB for Qwen2.5-7B's head)
or round its running sum to bf16 once per chunk; vocabulary-outer order gives each grad_weight
tile one fp32 reduction over all rows with bounded memory instead.
Extra memory: Z tile (<= TILE_ELEMS * 4 bytes) + G tile + [tile, H] fp32 + the gradients (grad_hidden
accumulated in fp32) + O(N) floats: independent of N apart from the gradients themselves.
On CUDA, TILE_ELEMS = 2**26: a 256 MiB fp32 tile (N=16384 -> 4096 vocabulary columns per tile).

Internal entry point for the fused GRPO loss (_notes/INTERFACE_logprobs_loss.md):
`linear_token_logprobs_with_grad(...)` = pass 1, grad_fn, pass 2 in one call. grad_fn is called
once with (0, N) (every log-prob is known after pass 1, so `chunk_multiple` always holds).
"""
from __future__ import annotations

from typing import Callable

import torch

from r1kernels import dispatch
from r1kernels.ops import token_logprobs as tlp

OP = "linear_token_logprobs"
dispatch.register(OP, cuda=("triton", "torch"), cpu=("torch",))

# fp32 logits elements per tile (module attributes, read at call time; tests shrink them)
TILE_ELEMS_CUDA = 1 << 26
TILE_ELEMS_CPU = 1 << 21
MAX_TILE_ROWS = 16384


def tile_shape(n_rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(rows, columns) of a logits tile: rows as many as fit (<= MAX_TILE_ROWS), columns the rest
    of the budget, a multiple of 128 when the vocabulary is split."""
    budget = TILE_ELEMS_CUDA if device.type == "cuda" else TILE_ELEMS_CPU
    rows = max(1, min(n_rows, MAX_TILE_ROWS, budget))
    cols = max(1, min(vocab, budget // rows))
    if cols < vocab and cols >= 256:
        cols -= cols % 128
    return rows, cols


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the gradient tile fed to the backward GEMMs."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype  # tensor-core GEMMs with fp32 accumulation
    return torch.float32


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (never rounded to a 16-bit type)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b)  # TF32 only if torch.backends.cuda.matmul.allow_tf32
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, accumulated in fp32."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


# ---- pass 1: log-probs, entropy, lse ----------------------------------------------------------


def forward_stats(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                  inv_temp: float, ignore_index: int, entropy: bool, backend: str):
    """(logp [N], entropy [N] or None, lse [N]) fp32; h [N, H], w [V, H], y [N]."""
    n_all, vocab = h.shape[0], w.shape[0]
    rows, cols = tile_shape(n_all, vocab, h.device)
    f32 = dict(dtype=torch.float32, device=h.device)
    logp = torch.empty(n_all, **f32)
    ent = torch.empty(n_all, **f32) if entropy else None
    lse = torch.empty(n_all, **f32)
    for r0 in range(0, n_all, rows):
        hr, yr = h[r0:r0 + rows], y[r0:r0 + rows]
        n = hr.shape[0]
        if backend == "triton":
            state = torch.empty(4, n, **f32)
            out = torch.empty(3, n, **f32)
        else:
            st = None
            yl = yr.long()
        for v0 in range(0, vocab, cols):
            z = _mm_f32(hr, w[v0:v0 + cols].t())
            bv = None if b is None else b[v0:v0 + cols]
            last = v0 + cols >= vocab
            if backend == "triton":
                tlp.stats_triton(z, yr, bv, state, out, col0=v0, vocab=vocab, inv_temp=inv_temp,
                                 ignore_index=ignore_index, accum=v0 > 0, final=last,
                                 entropy=entropy)
            else:
                if bv is not None:
                    z += bv.float()
                z *= inv_temp
                st = tlp.stats_torch(z, yl - v0, st, entropy)
            del z
        if backend == "triton":
            lp, en, ls = out[0], out[1], out[2]
        else:
            lp, en, ls = tlp.finalize(st, yl, vocab, ignore_index, entropy)
        logp[r0:r0 + n] = lp
        lse[r0:r0 + n] = ls
        if entropy:
            ent[r0:r0 + n] = en
    return logp, ent, lse


# ---- pass 2: gradients ------------------------------------------------------------------------


def backward_grads(h, w, b, y, lse, ent, dlogp, dent, inv_temp: float, ignore_index: int,
                   backend: str, need: tuple[bool, bool, bool]):
    """(grad_hidden, grad_weight, grad_bias) or None for each one not needed."""
    n_all, hid = h.shape
    vocab = w.shape[0]
    need_h, need_w, need_b = need[0], need[1], need[2] and b is not None
    f32 = dict(dtype=torch.float32, device=h.device)
    gh = gw = gb = None
    if need_h:
        gh = torch.zeros(n_all, hid, **f32)
    if need_w:
        gw = torch.empty_like(w)
    if need_b:
        gb = torch.zeros(vocab, **f32)
    if not (need_h or need_w or need_b):
        return None, None, None
    rows, cols = tile_shape(n_all, vocab, h.device)
    gdt = _gemm_dtype(h)
    dlogp = dlogp.float().contiguous()
    dent = None if dent is None else dent.float().contiguous()
    yl = y.long()
    ignored = yl == ignore_index
    for v0 in range(0, vocab, cols):
        wv = w[v0:v0 + cols]
        c = wv.shape[0]
        bv = None if b is None else b[v0:v0 + cols]
        gw_acc = torch.zeros(c, hid, **f32) if need_w else None
        for r0 in range(0, n_all, rows):
            sl = slice(r0, r0 + rows)
            hr = h[sl]
            z = _mm_f32(hr, wv.t())
            if backend == "triton":
                g = z if gdt == torch.float32 else torch.empty(z.shape, dtype=gdt, device=z.device)
                tlp.grad_triton(z, g, y[sl], bv, lse[sl], None if dent is None else ent[sl],
                                dlogp[sl], None if dent is None else dent[sl], col0=v0,
                                inv_temp=inv_temp, ignore_index=ignore_index)
            else:
                if bv is not None:
                    z += bv.float()
                z *= inv_temp
                g = tlp.grad_torch(z, yl[sl] - v0, ignored[sl], lse[sl],
                                   None if dent is None else ent[sl], dlogp[sl],
                                   None if dent is None else dent[sl], inv_temp).to(gdt)
            del z
            if need_h:
                _addmm_f32_(gh[sl], g, wv)
            if need_w:
                _addmm_f32_(gw_acc, g.t(), hr)
            if need_b:
                gb[v0:v0 + c] += torch.sum(g, dim=0, dtype=torch.float32)
            del g
        if need_w:
            gw[v0:v0 + c].copy_(gw_acc)  # one rounding of the fp32 sum over all rows
            del gw_acc
    if need_h and gh.dtype != h.dtype:
        gh = gh.to(h.dtype)
    if need_b and gb.dtype != b.dtype:
        gb = gb.to(b.dtype)
    return gh, gw, gb


# ---- autograd ---------------------------------------------------------------------------------


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], labels [N], bias [V] | None -> logp [N] (, entropy [N])."""

    @staticmethod
    def forward(ctx, h, w, y, b, inv_temp, ignore_index, with_entropy, backend):
        logp, ent, lse = forward_stats(h, w, b, y, inv_temp, ignore_index, with_entropy, backend)
        # saves the inputs themselves and 8 bytes per row: pass 2 recomputes the logits
        ctx.save_for_backward(h, w, y, b, lse, ent)
        ctx.args = (inv_temp, ignore_index, with_entropy, backend)
        if with_entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, dlogp, dent=None):
        h, w, y, b, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, with_entropy, backend = ctx.args
        if dlogp is None:
            dlogp = torch.zeros_like(lse)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        gh, gw, gb = backward_grads(h, w, b, y, lse, ent if with_entropy else None, dlogp,
                                    dent if with_entropy else None, inv_temp, ignore_index,
                                    backend, need)
        return gh, gw, None, gb, None, None, None, None


# ---- validation -------------------------------------------------------------------------------


def _prepare(op, hidden, weight, labels, bias, temperature, ignore_index):
    tlp.check_float(op, "hidden", hidden)
    tlp.check_float(op, "weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight expected 2-D [V, H], got shape {tuple(weight.shape)}")
    vocab, hid = weight.shape
    if vocab < 1:
        raise ValueError(f"{op}: weight must have at least one row (V >= 1), got shape "
                         f"{tuple(weight.shape)}")
    if hidden.shape[-1] != hid:
        raise ValueError(f"{op}: hidden expected last dimension {hid} (weight is [V, H] = "
                         f"{tuple(weight.shape)}), got shape {tuple(hidden.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"{op}: weight expected on device {hidden.device}, got {weight.device}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{op}: weight expected dtype {hidden.dtype} (that of hidden), got "
                         f"{weight.dtype}")
    if bias is not None:
        tlp.check_float(op, "bias", bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"{op}: bias expected shape ({vocab},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"{op}: bias expected on device {hidden.device}, got {bias.device}")
    tlp.check_labels(op, labels, hidden.shape[:-1], vocab, ignore_index, hidden.device)
    temperature = tlp.check_temperature(op, temperature)
    h = hidden.reshape(-1, hid)
    return h, labels.reshape(-1).contiguous(), 1.0 / temperature


# ---- public function and internal entry point -------------------------------------------------


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int = -100, with_entropy: bool = False):
    """token_logprobs(hidden @ weight.T + bias, labels, ...) without the [N, V] logits.

    `hidden [..., H]`, `weight [V, H]`, optional `bias [V]`, `labels [...]`. Returns fp32
    `logp [...]` (and `entropy [...]` when `with_entropy`), differentiable with respect to
    hidden, weight and bias. Matmul products accumulate in fp32. See shared/API.md.
    """
    h, y, inv_temp = _prepare(OP, hidden, weight, labels, bias, temperature, ignore_index)
    backend = dispatch.select(OP, h.device)
    out = LinearTokenLogprobsFunction.apply(h, weight, y, bias, inv_temp, int(ignore_index),
                                            bool(with_entropy), backend)
    shape = labels.shape
    if with_entropy:
        return out[0].reshape(shape), out[1].reshape(shape)
    return out.reshape(shape)


def linear_token_logprobs_with_grad(hidden: torch.Tensor, weight: torch.Tensor,
                                    labels: torch.Tensor, bias: torch.Tensor | None, *,
                                    temperature: float, ignore_index: int, with_entropy: bool,
                                    grad_fn: Callable, chunk_multiple: int = 1,
                                    need_grads: tuple[bool, bool, bool] = (True, True, True)):
    """Log-probs and the gradients of a loss whose dL/dlogp `grad_fn` gives, in one call.

    Returns (logp [N] fp32, entropy [N] fp32 or None, grad_hidden [N, H] in hidden's dtype or
    None, grad_weight [V, H] in weight's dtype (fp32 accumulation) or None, grad_bias [V] or
    None). grad_fn(start, end, logp_chunk, entropy_chunk) -> dlogp_chunk is called once with
    (0, N); the entropy is for metrics only (no gradient through it).
    """
    op = "linear_token_logprobs_with_grad"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"{op}: hidden expected 2-D [N, H], got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    if isinstance(chunk_multiple, bool) or not isinstance(chunk_multiple, int) or chunk_multiple < 1:
        raise ValueError(f"{op}: chunk_multiple must be a positive int, got {chunk_multiple!r}")
    if len(tuple(need_grads)) != 3:
        raise ValueError(f"{op}: need_grads expected 3 booleans (hidden, weight, bias), got "
                         f"{need_grads!r}")
    h, y, inv_temp = _prepare(op, hidden, weight, labels, bias, temperature, ignore_index)
    backend = dispatch.select(OP, h.device)
    with torch.no_grad():
        logp, ent, lse = forward_stats(h, weight, bias, y, inv_temp, int(ignore_index),
                                       bool(with_entropy), backend)
        n = h.shape[0]
        dlogp = grad_fn(0, n, logp, ent)
        if not isinstance(dlogp, torch.Tensor) or tuple(dlogp.shape) != (n,):
            raise ValueError(f"{op}: grad_fn must return a tensor of shape ({n},), got "
                             f"{getattr(dlogp, 'shape', type(dlogp).__name__)}")
        gh, gw, gb = backward_grads(h, weight, bias, y, lse, None, dlogp, None, inv_temp,
                                    int(ignore_index), backend,
                                    tuple(bool(x) for x in need_grads))
    return logp, ent, gh, gw, gb
