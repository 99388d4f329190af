"""Per-token log-probabilities (and entropy) from logits, reading each row once per pass.

With z = logits / T (fp32), for each row (heads that transform their logits: z =
head(logits) / T, below):
    lse     = log sum_v exp(z_v)
    logp    = z[label] - lse                     (0 where label == ignore_index)
    entropy = lse - sum_v p_v z_v = log s - w / s (0 where ignored)
where, relative to the running max m, s = sum_v exp(z_v - m) and w = sum_v exp(z_v - m)(z_v - m):
both are merged online block by block (and, for the hidden-state op, tile by tile across the
vocabulary), so no [N, V] fp32 copy of the logits ever exists.

VJP (p = softmax(z), H = entropy, g = dL/dlogp, e = dL/dentropy):
    dL/dlogits_v = (g * (1[v == label] - p_v) - e * p_v * (log p_v + H)) / T
(0 on ignored rows).
Heads that transform their logits (docs/api.md): x' = logit_scale * x (Cohere, Granite), then
x'' = softcap * tanh(x' / softcap) (Gemma's final_logit_softcapping), then z = x'' / T. The
kernels take two constants (head_constants): without a soft-cap z = inv_temp * x with
inv_temp = logit_scale / T (the plain head's code, any logit_scale for free); with one,
z = inv_temp * tanh(cap * x) with inv_temp = softcap / T and cap = logit_scale / softcap (a
HEAD constexpr, head_kind: the plain head's kernels are unchanged), and
dz/dx = inv_temp * cap * sech^2(cap * x), so dL/dlogits above gains the factor
cap * sech^2(cap * x). tanh and sech^2 come from one exp(-2|y|) (tanh = (1 - e) / (1 + e), sech^2 = 4e / (1 + e)^2: no cancellation in
sech^2 where tanh saturates; a short series for |y| < 0.25, where 1 - e would cancel).
The backward can write it in place into the logits buffer
(`inplace_backward=True` / `inplace=True`) when the caller no longer needs the logits. A row
whose g and e are both zero (a masked token) gets exact zeros without its logits being read by
the Triton kernels: no traffic, and no NaN from whatever a masked position holds.

Backends: Triton kernels below (CUDA tensors; CPU tensors under TRITON_INTERPRET=1); C++ CPU
kernels with the same per-row contract (csrc/token_logprobs/token_logprobs_cpu.cpp, launched by
`stats_cpp` / `grad_cpp`; the default on CPU); and a chunked PyTorch path (any device) whose fp32
working copy is bounded by `TORCH_CHUNK_ELEMS`.

Internal entry point for the fused GRPO loss (see _notes/INTERFACE_logprobs_loss.md):
`token_logprobs_with_grad(...)`. Its `grad_fn` is called exactly once, with (0, N): every
log-prob is known after one sweep, so whole sequences (`chunk_multiple`) are always together.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from r1kernels import dispatch
from r1kernels.ops._triton import HAS_TRITON, next_power_of_2, tl, triton
from r1kernels.ops.grpo_loss import _grpo_token_terms

OP = "token_logprobs"
# the C++ kernels of the "cpp" backend (also used by linear_token_logprobs on CPU)
CPP_OPS = ("logprob_tile_stats", "logprob_tile_grad")
dispatch.register(OP, cuda=("triton", "torch"), cpu=("cpp", "torch"), ext_ops=CPP_OPS)
# backends whose kernels take [n, c] tiles of logits row by row (stats_tile, grad_tile)
TILE_BACKENDS = ("triton", "cpp")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch path: rows are processed in chunks whose fp32 working copy holds at most this many elements
TORCH_CHUNK_ELEMS = 1 << 22


# ---- Triton kernels ---------------------------------------------------------------------------
# Forward statistics: one program per row, a loop over the row's columns in BLOCK_V blocks.
# Bytes: reads the row once (N * V * itemsize), writes 3-4 fp32 per row. On an H100 at ~3 TB/s,
# N=16384, V=151936 bf16 (4.98 GB) is a 1.7 ms read. One exp per element (block-scalar online
# max, so the running state is rescaled once per block, not per element).
# Used with ACCUM/FINAL by the hidden-state op to merge statistics across vocabulary tiles:
# state = (m, s, t, w) per row, col0 = first vocabulary id of the tile.


@triton.jit
def _tanh_sech2(y):
    """(tanh y, sech^2 y = 1 - tanh^2 y) in fp32 from one exp (module docstring); +-inf give
    (+-1, 0), NaN gives NaN."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    y2 = y * y
    # |y| < 0.25: y - y^3/3 + 2y^5/15 - 17y^7/315 + 62y^9/2835 (next term < 1e-8 relative)
    series = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0
                                                                    + y2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, series, tl.where(y < 0.0, -1.0, 1.0) * ((1.0 - e) / (1.0 + e)))
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _head(x, ok, inv_temp, cap, HEAD: tl.constexpr):
    """Scaled logits z of raw logits x (fp32; -inf where not `ok`), HEAD = head_kind(inv_temp,
    cap): 0 inv_temp * x (inv_temp > 0), 1 the same with inv_temp < 0, 2 (a soft-cap)
    inv_temp * tanh(cap * x); -inf where not `ok` (1 and 2 would map -inf to +inf or -1)."""
    if HEAD == 2:
        t, _ = _tanh_sech2(x * cap)
        return tl.where(ok, t * inv_temp, float("-inf"))
    if HEAD == 1:
        return tl.where(ok, x * inv_temp, float("-inf"))
    return x * inv_temp


@triton.jit
def _online_stats_update(m, s, w, z, ENTROPY: tl.constexpr):
    """Merge one block of scaled logits z into the row state (max m, sum-exp s, entropy sum w;
    s and w relative to m): one exp per element, the state rescaled once per block."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: any finite ref
    alpha = tl.exp(m - m_ref)
    e = tl.exp(z - m_ref)
    if ENTROPY:
        # w is relative to m: moving the reference to m_ref adds (m - m_ref) to every term
        w = alpha * (w + s * tl.where(s > 0.0, m - m_ref, 0.0))
        w += tl.sum(e * tl.where(e > 0.0, z - m_ref, 0.0), axis=0)
    s = s * alpha + tl.sum(e, axis=0)
    return m_new, s, w


@triton.jit
def _merge_partials(mv, sv, wv, ENTROPY: tl.constexpr):
    """Merge a vector of partial statistics (max, sum-exp and entropy sum relative to their own
    max; -inf / 0 / 0 for empty parts) into the row's (m, s, w), s and w relative to m."""
    m = tl.max(mv, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    f = tl.exp(mv - m_ref)
    s = tl.sum(sv * f, axis=0)
    w = s * 0.0
    if ENTROPY:
        w = tl.sum(f * (wv + sv * tl.where(sv > 0.0, mv - m_ref, 0.0)), axis=0)
    return m, s, w


@triton.jit
def _logits_grad(z, is_label, lse, ent, dlogp, dent, inv_temp, cap, HAS_DENT: tl.constexpr,
                 HEAD: tl.constexpr):
    """dL/dlogits of a block of raw logits z (formula in the module docstring)."""
    if HEAD == 2:
        t, d = _tanh_sech2(z * cap)
        logp_v = t * inv_temp - lse
    else:
        logp_v = z * inv_temp - lse
    p = tl.exp(logp_v)
    g = tl.where(is_label, dlogp, 0.0) - dlogp * p
    if HAS_DENT:
        g -= dent * p * tl.where(p > 0.0, logp_v + ent, 0.0)
    if HEAD == 2:
        return g * inv_temp * (cap * d)
    return g * inv_temp


@triton.jit
def _token_logprobs_fwd_kernel(x_ptr, stride_x, labels_ptr, bias_ptr, state_ptr, out_ptr,
                               n_rows, n_cols, col0, vocab, inv_temp, cap, ignore_index,
                               HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr, FINAL: tl.constexpr,
                               ENTROPY: tl.constexpr, HEAD: tl.constexpr,
                               BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    loc = label - col0  # the label's column inside this tile (may be outside it)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
    if ACCUM:
        m = tl.load(state_ptr + row)
        s = tl.load(state_ptr + n_rows + row)
        t = tl.load(state_ptr + 2 * n_rows + row)
        w = tl.load(state_ptr + 3 * n_rows + row)
    else:
        m = zero - float("inf")
        s = zero
        t = zero
        w = zero
    # an ignored row (label == ignore_index: a prompt or padding token) has zero outputs: its
    # logits are not read (no traffic, and nothing a padded position holds can leak)
    ignored = label == ignore_index
    n_read = tl.where(ignored, 0, n_cols)
    # the target logit: one masked load (not a reduction per block)
    in_tile = (loc >= 0) & (loc < n_read)
    zt = tl.load(x_row + loc, mask=in_tile, other=0.0).to(tl.float32)
    if HAS_BIAS:
        zt += tl.load(bias_ptr + loc, mask=in_tile, other=0.0).to(tl.float32)
    t += tl.where(in_tile, _head(zt, in_tile, inv_temp, cap, HEAD), 0.0)
    for start in range(0, n_read, BLOCK_V):
        c = start + cols
        ok = c < n_cols
        z = tl.load(x_row + c, mask=ok, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + c, mask=ok, other=0.0).to(tl.float32)
        m, s, w = _online_stats_update(m, s, w, _head(z, ok, inv_temp, cap, HEAD), ENTROPY)
    if FINAL:
        lse = m + tl.log(s)
        valid = (label >= 0) & (label < vocab)
        logp = tl.where(valid, (t - m) - tl.log(s), float("nan"))  # t - m is exact  # out-of-range label: NaN, never garbage
        tl.store(out_ptr + row, tl.where(ignored, 0.0, logp))
        tl.store(out_ptr + 2 * n_rows + row, tl.where(ignored, 0.0, lse))
        if ENTROPY:
            ent = tl.log(s) - w / s
            tl.store(out_ptr + n_rows + row, tl.where(ignored, 0.0, ent))
    else:
        tl.store(state_ptr + row, m)
        tl.store(state_ptr + n_rows + row, s)
        tl.store(state_ptr + 2 * n_rows + row, t)
        tl.store(state_ptr + 3 * n_rows + row, w)


# Backward: dL/dlogits of one row per program (formula in the module docstring).
# Bytes: reads the row and writes it (2 * N * V * itemsize; 3.4 ms at N=16384, V=151936 bf16 on
# an H100). g_ptr may equal x_ptr (in-place): each element is read before it is overwritten by
# the same program. Also used by the hidden-state op on fp32 logits tiles (col0 = tile start).


@triton.jit
def _token_logprobs_bwd_kernel(x_ptr, stride_x, g_ptr, stride_g, labels_ptr, bias_ptr, lse_ptr,
                               ent_ptr, dlogp_ptr, dent_ptr, n_cols, col0, inv_temp, cap,
                               ignore_index, HAS_BIAS: tl.constexpr, HAS_DENT: tl.constexpr,
                               HEAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    loc = label - col0
    lse = tl.load(lse_ptr + row)
    dlogp = tl.where(ignored, 0.0, tl.load(dlogp_ptr + row).to(tl.float32))
    dent = dlogp
    ent = lse
    if HAS_DENT:
        dent = tl.where(ignored, 0.0, tl.load(dent_ptr + row).to(tl.float32))
        ent = tl.load(ent_ptr + row)
    x_row = x_ptr + row * stride_x
    g_row = g_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    # a row whose upstream gradients are both zero (a masked token, an ignored label) has an
    # exactly zero gradient: it is written without reading the row (no traffic, and no NaN from
    # whatever the logits of a masked position hold)
    dead = (dlogp == 0.0) & (dent == 0.0)
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        ok = c < n_cols
        rd = ok & (dead == 0)
        z = tl.load(x_row + c, mask=rd, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + c, mask=rd, other=0.0).to(tl.float32)
        g = _logits_grad(z, c == loc, lse, ent, dlogp, dent, inv_temp, cap, HAS_DENT, HEAD)
        g = tl.where(ignored | dead, 0.0, g)
        tl.store(g_row + c, g.to(g_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_result(m, s, w, zt, valid, ignored):
    """(lse, logp, entropy) of a row from its merged statistics and its label's scaled logit zt;
    logp is NaN for a label out of range (`valid` false: the launchers reject those first) and 0
    on ignored rows."""
    lse = m + tl.log(s)
    logp = tl.where(valid, (zt - m) - tl.log(s), float("nan"))
    logp = tl.where(ignored, 0.0, logp)
    ent = tl.log(s) - w / s
    return lse, logp, ent


@triton.jit
def _grpo_token_dlogp(logp, row, b, old_ptr, ref_ptr, adv_ptr, mask_ptr, rw_ptr, scale_ptr,
                      eps_lo, eps_hi, delta, beta, tau_pos, tau_neg, LOSS: tl.constexpr,
                      HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_RW: tl.constexpr,
                      BETA_NZ: tl.constexpr, BIAS_KL: tl.constexpr):
    """dL/dlogp of token `row` (sequence b) under the GRPO loss (r1kernels/ops/grpo_loss.py,
    token-level ratio), scaled by the row's loss scale; computed on 1-element blocks."""
    one = tl.arange(0, 1)
    lp1 = tl.zeros([1], dtype=tl.float32) + logp
    if HAS_OLD:
        old1 = tl.load(old_ptr + row + one).to(tl.float32)
    else:
        old1 = lp1  # on-policy: old = sg(logp)
    if BETA_NZ:
        ref1 = tl.load(ref_ptr + row + one).to(tl.float32)
    else:
        ref1 = lp1
    a1 = tl.load(adv_ptr + row + one).to(tl.float32)
    m1 = tl.load(mask_ptr + row + one).to(tl.float32)
    if HAS_RW:
        rw1 = tl.load(rw_ptr + row + one).to(tl.float32)
    else:
        rw1 = lp1
    c1 = tl.exp(lp1 - old1)
    pol, g_dir, g_c1, kl, low, high = _grpo_token_terms(
        lp1, old1, ref1, a1, rw1, c1, eps_lo, eps_hi, delta, beta, tau_pos, tau_neg,
        LOSS, HAS_DELTA, HAS_RW, BETA_NZ, BIAS_KL, False)
    g1 = tl.where(m1 != 0.0, (g_dir + tl.where(g_c1 != 0.0, g_c1 * c1, 0.0)) * m1, 0.0)
    return tl.sum(g1, axis=0) * tl.load(scale_ptr + b)


# Forward and backward in one kernel, for callers that know dL/dlogp (and dL/dentropy) of a row as
# soon as its log-prob is known: either given up front (MODE 0: `token_logprobs_fwd_bwd`, e.g. a
# loss linear in the log-probs) or the GRPO loss's own per-token derivative (MODE 1: the fused
# `GRPOLoss.from_logits`, token-level importance sampling). Per row:
#   pass 1: online statistics (max, sum-exp, entropy term, target logit): logp, entropy
#   dL/dlogp of the row: given, or the GRPO token terms times the row's loss scale
#   pass 2: re-read the row and write dL/dlogits (in place into the logits when g_ptr == x_ptr).
# Two launch modes (FUSED_CONFIG below):
#  - persistent (the design for the 2-pass floor): ~one or two programs per SM walk the rows so
#    that the rows in flight (132 x 297 KiB at V=151936 bf16 = 38 MiB) could stay in the 50 MB L2
#    between the passes: HBM would see one read and one write (3.3 ms at N=16384, V=151936 bf16,
#    3.0 TB/s) instead of read, read, write (4.9 ms). Pass-1 loads ask L2 to keep the lines
#    (evict_last), pass-2 loads and the stores let them go (evict_first). Measured on an H100
#    (BENCHMARKS.md): 6.1-8.0 ms over 9 configurations, i.e. the re-reads did not come from L2
#    at a useful rate and one program per SM has too few loads in flight.
#  - two launches (the default since that measurement): PHASE 1 = statistics, PHASE 2 =
#    dL/dlogp and dL/dlogits, one program per row each: 5.76 ms, the same as token_logprobs
#    forward + backward through autograd (5.72 ms), with the GRPO loss computed in-kernel and
#    strided [B, T] rows (no per-sequence launches, no copies).
# Rows are addressed as [B, T] with strides (s_xb, s_xt): a [B, T + 1, V][:, :-1] slice works
# without a copy.


@triton.jit
def _token_logprobs_fused_kernel(
        x_ptr, s_xb, s_xt, g_ptr, s_gb, s_gt, labels_ptr, out_ptr,
        glp_ptr, gent_ptr,
        old_ptr, ref_ptr, adv_ptr, mask_ptr, rw_ptr, scale_ptr,
        N, T, V, inv_temp, cap, ignore_index,
        eps_lo, eps_hi, delta, beta, tau_pos, tau_neg,
        MODE: tl.constexpr, ENTROPY: tl.constexpr, HAS_DENT: tl.constexpr, HEAD: tl.constexpr,
        LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_RW: tl.constexpr,
        BETA_NZ: tl.constexpr, BIAS_KL: tl.constexpr, BLOCK_V: tl.constexpr,
        LANES: tl.constexpr, PHASE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_V)
    for r in range(pid, N, nprog):
        row = tl.cast(r, tl.int64)
        b = row // T
        t_ = row - b * T
        x_row = x_ptr + b * s_xb + t_ * s_xt
        g_row = g_ptr + b * s_gb + t_ * s_gt
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
        zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
        # a token labelled ignore_index, or outside the GRPO mask (MODE 1), contributes nothing:
        # its row is not read, its outputs are 0 (lse too) and its gradient is written as zeros
        # (prompt and padding tokens are often a large part of a batch)
        live = label != ignore_index
        if MODE == 1:
            live = live & (tl.load(mask_ptr + row) != 0)
        v_read = tl.where(live, V, 0)
        if PHASE != 2:
            if LANES:
                # per-lane online statistics, reduced across the block once per row: no block-wide
                # reduction (and barrier) per iteration, so the warps of a program run (and load)
                # independently; costs a second exp per element
                mv = tl.full([BLOCK_V], float("-inf"), tl.float32)
                sv = tl.zeros([BLOCK_V], dtype=tl.float32)
                wv = tl.zeros([BLOCK_V], dtype=tl.float32)
                for start in range(0, v_read, BLOCK_V):
                    c = start + cols
                    ok = c < V
                    z = _head(tl.load(x_row + c, mask=ok, other=float("-inf"),
                                      eviction_policy="evict_last").to(tl.float32),
                              ok, inv_temp, cap, HEAD)
                    m_new = tl.maximum(mv, z)
                    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp(mv - m_ref)
                    e = tl.exp(z - m_ref)
                    if ENTROPY:
                        wv = alpha * (wv + sv * tl.where(sv > 0.0, mv - m_ref, 0.0)) + \
                            e * tl.where(e > 0.0, z - m_ref, 0.0)
                    sv = sv * alpha + e
                    mv = m_new
                m, s, w = _merge_partials(mv, sv, wv, ENTROPY)
            else:
                m = zero - float("inf")
                s = zero
                w = zero
                for start in range(0, v_read, BLOCK_V):
                    c = start + cols
                    ok = c < V
                    z = _head(tl.load(x_row + c, mask=ok, other=float("-inf"),
                                      eviction_policy="evict_last").to(tl.float32),
                              ok, inv_temp, cap, HEAD)
                    m, s, w = _online_stats_update(m, s, w, z, ENTROPY)
            valid = (label >= 0) & (label < V)
            zt = _head(tl.load(x_row + label, mask=valid & live, other=0.0).to(tl.float32),
                       valid, inv_temp, cap, HEAD)
            lse, logp, ent = _row_result(m, s, w, zt, valid, ignored)
            lse = tl.where(live, lse, 0.0)
            logp = tl.where(live, logp, 0.0)
            ent = tl.where(live, ent, 0.0)
            tl.store(out_ptr + row, logp)
            if ENTROPY:
                tl.store(out_ptr + N + row, tl.where(ignored, 0.0, ent))
            if PHASE == 1:
                tl.store(out_ptr + 2 * N + row, lse)
        else:  # statistics from the PHASE 1 launch
            logp = tl.load(out_ptr + row)
            ent = tl.load(out_ptr + N + row)
            lse = tl.load(out_ptr + 2 * N + row)
        if PHASE != 1:
            dent = zero
            if MODE == 0:
                dlp = tl.load(glp_ptr + row).to(tl.float32)
                if HAS_DENT:
                    dent = tl.load(gent_ptr + row).to(tl.float32)
            else:
                dlp = _grpo_token_dlogp(logp, row, b, old_ptr, ref_ptr, adv_ptr, mask_ptr, rw_ptr,
                                        scale_ptr, eps_lo, eps_hi, delta, beta, tau_pos, tau_neg,
                                        LOSS, HAS_OLD, HAS_DELTA, HAS_RW, BETA_NZ, BIAS_KL)
            dlp = tl.where(ignored, 0.0, dlp)
            dent = tl.where(ignored, 0.0, dent)
            # zero upstream gradients (a masked token, an ignored label, a GRPO group whose
            # rewards are all equal: advantage 0) give an exactly zero row: written, not read
            dead = (dlp == 0.0) & (dent == 0.0)
            nz = dead == 0  # (a float comparison's scalar would not combine with a mask in the
            if MODE == 1:   # interpreter; this form does, and compiles the same)
                nz = nz & live
            for start in range(0, V, BLOCK_V):
                c = start + cols
                ok = c < V
                # not read: exact zeros written (whatever the row's statistics were)
                z = tl.load(x_row + c, mask=ok & nz, other=float("-inf"),
                            eviction_policy="evict_first").to(tl.float32)
                g = _logits_grad(z, c == label, lse, ent, dlp, dent, inv_temp, cap, HAS_DENT,
                                 HEAD)
                g = tl.where(nz, g, 0.0)
                tl.store(g_row + c, g.to(g_ptr.dtype.element_ty), mask=ok,
                         eviction_policy="evict_first")


# launch configuration of the fused kernel: programs per SM, warps per program, block width,
# per-lane statistics (1) or block statistics (0) in pass 1. programs_per_sm = 0: two launches of
# one program per row instead (PHASE 1 statistics, PHASE 2 gradient: the row is read twice from
# HBM, no grid-size limit). Tuned on an H100 (BENCHMARKS.md); override with
# R1K_FUSED_LOGITS="programs_per_sm,warps,block,lanes[,stats_warps,stats_block]"
# (the last two: the two-launch mode's statistics launch, e.g. one warp per row, whose block
# reductions need no barrier).
# Defaults measured on an H100 (BENCHMARKS.md, 2026-11-23): token_logprobs_fwd_bwd 5.41 ms with
# a one-warp statistics launch against 5.73 ms without; the GRPO variant (from_logits) the other
# way round, 5.83 ms against 6.15 ms.
FUSED_CONFIG = (0, 8, 4096, 0, 1, 2048)
FUSED_CONFIG_GRPO = (0, 8, 4096, 0)


def _fused_config(grpo: bool = False) -> tuple[int, int, int, int, int, int]:
    """(programs_per_sm, warps, block, lanes, stats_warps, stats_block): R1K_FUSED_LOGITS, or
    FUSED_CONFIG (FUSED_CONFIG_GRPO for the GRPO variant), missing trailing values 0. The last
    two apply to the two-launch mode's statistics launch (0: the same as the gradient launch)."""
    env = os.environ.get("R1K_FUSED_LOGITS")
    if env:
        v = _env_ints("R1K_FUSED_LOGITS", env, 2, 6)
        if v[0] < 0:
            raise ValueError(f"R1K_FUSED_LOGITS: programs_per_sm must be >= 0 (0: two launches), "
                             f"got {env!r}")
    else:
        v = list(FUSED_CONFIG_GRPO if grpo else FUSED_CONFIG)
    return tuple(v + [0] * (6 - len(v)))[:6]


def _env_ints(name: str, value: str, least: int, most: int) -> list:
    try:
        v = [int(x) for x in value.split(",")]
    except ValueError:
        v = []
    if not least <= len(v) <= most or (len(v) > 1 and v[1] < 1):
        raise ValueError(f"{name} must be {least} to {most} comma-separated integers (warps >= 1), "
                         f"got {value!r}")
    return v


def _num_programs(device: torch.device, n_rows: int, per_sm: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: a few programs, each walking several rows
        sms = 4
    return max(1, min(n_rows, sms * per_sm))


# The cluster kernel (csrc/token_logprobs/fused_logits_cluster.cu, sm_90): one read of the logits
# and one write of their gradient, each row held on chip by a thread-block cluster. The default
# where it applies (CUDA build, compute capability 9+, V a multiple of 8 and within what the
# cluster holds, rows on 16-byte boundaries): bf16/fp16 logits (token_logprobs_fwd_bwd,
# GRPOLoss.from_logits), and the fp32 logits chunks of the hidden-state single sweep with a
# bf16/fp16 gradient (cluster_chunk), for which the setting doubles (cluster, else threads) so
# that a CTA holds as many bytes. Elsewhere the Triton kernels run. On an H100 (2026-11-23,
# BENCHMARKS.md) 8 CTAs x 256 threads measured faster than the Triton kernels and than the other
# settings tried: token_logprobs_fwd_bwd 4.49 against 5.77 ms (base-2 arithmetic; 4.83 against
# 5.41 ms before), from_logits in place 5.37 against 6.23 ms, a hidden-state GRPOLoss call's
# logits kernels 6.5 against 7.9 ms.
# R1K_FUSED_CLUSTER="cluster,threads[,variant]" (1-16 / 256 or 512 / 0 or 1) chooses another
# setting, "0" turns it off.
#
# The third field picks a variant of the kernel (0, the default: rows in registers, one cluster
# launched per row):
#   1 the persistent register kernel (R1K_FUSED_CLUSTER="8,256,1"): the default's code in a loop
#     over rows, on only the clusters that fit at once, each CTA prefetching its segment of its
#     next row into L2 (one bulk-prefetch instruction) before it reads the current one. Not yet
#     measured on a GPU (written 2026-11-23 without one): opt-in until it is, and measured first
#     by `bash benchmarks/run_gpu.sh quick`.
# (A variant staging rows in shared memory with bulk copies was measured no faster on the H100,
# 4.74-4.95 ms against the register kernel's 4.7, and removed.)
FUSED_CLUSTER: tuple[int, int, int] | None = (8, 256, 0)
CLUSTER_MAX_VECS = 16  # 16-byte vectors per thread (csrc/token_logprobs/fused_logits_cluster.h)


def _cluster_setting() -> tuple[int, int, int] | None:
    """(cluster, threads, variant) from R1K_FUSED_CLUSTER ("0" or "": off), else FUSED_CLUSTER."""
    env = os.environ.get("R1K_FUSED_CLUSTER")
    if env is None:
        return FUSED_CLUSTER
    if env.strip() in ("", "0", "off"):
        return None
    v = _env_ints("R1K_FUSED_CLUSTER", env, 2, 3)
    if v[0] not in (1, 2, 4, 8, 16) or v[1] not in (256, 512) or v[2:] not in ([], [0], [1]):
        raise ValueError(f"R1K_FUSED_CLUSTER must be 'cluster,threads[,variant]' with cluster in "
                         f"1, 2, 4, 8, 16, threads 256 or 512 and variant 0 or 1 (or 0: off), "
                         f"got {env!r}")
    return v[0], v[1], (v[2] if len(v) == 3 else 0)


def _cluster_seg(V: int, cl: int) -> int:
    """Columns per CTA (fused_logits_seg in the kernel's header)."""
    return ((V + cl - 1) // cl + 7) // 8 * 8


def _rows_aligned(t: torch.Tensor) -> bool:
    return (t.stride(-1) == 1 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0
            and t.data_ptr() % 16 == 0)


def _cluster_dtypes_ok(x: torch.Tensor, g: torch.Tensor) -> bool:
    if x.dtype in (torch.bfloat16, torch.float16):
        return g.dtype == x.dtype
    return x.dtype == torch.float32 and g.dtype in (torch.bfloat16, torch.float16)


def cluster_config(x3: torch.Tensor, g3: torch.Tensor) -> tuple[int, int, int] | None:
    """(cluster, threads, variant) when the cluster kernel is on and takes these logits
    [B, T, V] and this gradient buffer, else None. (Its head: cluster_head_ok.)"""
    setting = _cluster_setting()
    if setting is None or x3.device.type != "cuda" or torch.compiler.is_compiling():
        return None  # (eager only: its schema does not model g aliasing x)
    from r1kernels import _custom_ops

    cl, threads, variant = setting
    if x3.dtype == torch.float32:  # 4 logits per 16-byte vector: twice the CTAs or threads
        cl, threads = (cl * 2, threads) if cl < 16 else (cl, min(512, threads * 2))
    per_vec = 16 // x3.element_size()
    V = x3.shape[-1]
    fits = V <= cl * threads * per_vec * CLUSTER_MAX_VECS
    ok = (_custom_ops.has_kernel("fused_logits_cluster", "CUDA")
          and torch.cuda.get_device_capability(x3.device)[0] >= 9
          and _cluster_dtypes_ok(x3, g3)
          and V % 8 == 0 and fits
          and _rows_aligned(x3) and _rows_aligned(g3))
    return (cl, threads, variant) if ok else None


def cluster_head_ok(inv_temp: float, cap: float) -> bool:
    """Whether the cluster kernel takes this head (head_constants): z = inv_temp * x, or with a
    soft-cap inv_temp * tanh(cap * x), for inv_temp > 0 and cap >= 0 (it finds a row's max from
    its raw logits' max); a negative logit_scale runs the Triton kernel."""
    return inv_temp > 0 and cap >= 0


def cluster_setting(x3: torch.Tensor, g3: torch.Tensor, inv_temp: float,
                    cap: float) -> tuple[int, int, int] | None:
    """cluster_config for this head: soft-capped heads are compiled for the default setting's
    shape only (256 threads, variant 0); any other setting runs them on the Triton kernel."""
    if not cluster_head_ok(inv_temp, cap):
        return None
    setting = cluster_config(x3, g3)
    if setting is not None and cap != 0 and (setting[1] != 256 or setting[2] != 0):
        return None
    return setting


def cluster_chunk(z: torch.Tensor, labels: torch.Tensor, g: torch.Tensor, inv_temp: float,
                  ignore_index: int, with_entropy: bool, *, grad_logp=None, grad_entropy=None,
                  grpo=None, cap: float = 0.0) -> torch.Tensor | None:
    """The cluster kernel on one chunk of the hidden-state single sweep: fp32 logits z [n, V],
    dL/dlogits into g [n, V] (16-bit; may share z's storage), the upstream gradients or the GRPO
    inputs already cut to the chunk's rows (grpo's scale per row: each row is its own
    "sequence" here). Returns out [3, n] (logp, entropy, lse), or None where the kernel does not
    apply (the caller's tile kernels run instead)."""
    x3, g3 = z.unsqueeze(1), g.unsqueeze(1)
    setting = cluster_setting(x3, g3, inv_temp, cap)
    if setting is None:
        return None
    return fused_cluster(x3, labels, g3, inv_temp, ignore_index, with_entropy, setting,
                         grad_logp=grad_logp, grad_entropy=grad_entropy, grpo=grpo, cap=cap)


def fused_cluster(x3, labels, g3, inv_temp, ignore_index, with_entropy, setting, *,
                  grad_logp=None, grad_entropy=None, grpo=None, cap: float = 0.0) -> torch.Tensor:
    """fused_triton's contract, by the cluster kernel (setting = cluster_config(x3, g3))."""
    B, T, V = x3.shape
    n = B * T
    out = torch.zeros(3, n, dtype=torch.float32, device=x3.device)
    if n == 0:
        return out

    def f32(t):
        return None if t is None else t.reshape(-1).to(torch.float32).contiguous()

    y = labels.reshape(-1).to(torch.int64).contiguous()
    if grpo is None:
        glp, gent = f32(grad_logp), f32(grad_entropy)
        adv = mask = old = ref = rw = scale = None
        loss, floats, delta, bias_kl = 0, (0.0,) * 5, None, False
    else:
        cfg, adv, mask, old, ref, rw, scale = grpo
        glp = gent = None
        adv, mask, old, ref, rw, scale = (f32(t) for t in (adv, mask, old, ref, rw, scale))
        if cfg.beta == 0.0:
            ref = None
        loss, delta, bias_kl = int(cfg.loss), cfg.delta, bool(cfg.bias_kl)
        floats = (float(cfg.eps_lo), float(cfg.eps_hi), float(cfg.beta), float(cfg.tau_pos),
                  float(cfg.tau_neg))
    eps_lo, eps_hi, beta, tau_pos, tau_neg = floats
    torch.ops.r1kernels.fused_logits_cluster(
        x3, g3, y, out, glp, gent, adv, mask, old, ref, rw, scale, float(inv_temp),
        int(ignore_index), bool(with_entropy), loss, eps_lo, eps_hi,
        None if delta is None else float(delta), beta, bias_kl, tau_pos, tau_neg,
        int(setting[0]), int(setting[1]), int(setting[2]), float(cap))
    return out


def fused_logits(x3: torch.Tensor, labels: torch.Tensor, g3: torch.Tensor, inv_temp: float,
                 ignore_index: int, with_entropy: bool, *, grad_logp=None, grad_entropy=None,
                 grpo=None, cap: float = 0.0) -> torch.Tensor:
    """The fused logits kernels' entry point: the cluster kernel where it is on and applies
    (cluster_config), else the Triton kernel (fused_triton, whose contract both follow)."""
    setting = cluster_setting(x3, g3, inv_temp, cap)
    if setting is not None:
        return fused_cluster(x3, labels, g3, inv_temp, ignore_index, with_entropy, setting,
                             grad_logp=grad_logp, grad_entropy=grad_entropy, grpo=grpo, cap=cap)
    return fused_triton(x3, labels, g3, inv_temp, ignore_index, with_entropy,
                        grad_logp=grad_logp, grad_entropy=grad_entropy, grpo=grpo, cap=cap)


def fused_triton(x3: torch.Tensor, labels: torch.Tensor, g3: torch.Tensor, inv_temp: float,
                 ignore_index: int, with_entropy: bool, *, grad_logp=None, grad_entropy=None,
                 grpo=None, cap: float = 0.0) -> torch.Tensor:
    """Launch the fused kernel on logits x3 [B, T, V] (last dim contiguous; any row strides),
    writing dL/dlogits into g3 (same shape; may be x3 itself). labels [B * T] contiguous.
    Either grad_logp [B * T] (and optionally grad_entropy [B * T]) or grpo = (cfg, adv, mask,
    old, ref, rw, scale), the [B * T] per-token inputs contiguous and scale [B]. Returns
    out [3, B * T] fp32: logp, entropy (zeros unless with_entropy), and lse in two-launch mode."""
    B, T, V = x3.shape
    n = B * T
    out = torch.zeros(3, n, dtype=torch.float32, device=x3.device)
    if n == 0:
        return out
    per_sm, warps, block, lanes, stats_warps, stats_block = _fused_config(grpo is not None)
    if grpo is None:
        mode = 0
        cfg = None
        glp = grad_logp
        gent = grad_entropy if grad_entropy is not None else glp
        old = ref = adv = mask = rw = scale = glp
    else:
        mode = 1
        cfg, adv, mask, old, ref, rw, scale = grpo
        glp = gent = scale
        old = old if old is not None else scale
        ref = ref if ref is not None else scale
        rw = rw if rw is not None else scale
    tail = (old, ref, adv, mask, rw, scale)
    floats = ((float(cfg.eps_lo), float(cfg.eps_hi),
               float(cfg.delta if cfg.delta is not None else 0.0), float(cfg.beta),
               float(cfg.tau_pos), float(cfg.tau_neg)) if cfg is not None else (0.0,) * 6)
    consts = dict(MODE=mode, ENTROPY=bool(with_entropy),
                  HAS_DENT=mode == 0 and grad_entropy is not None,
                  HEAD=head_kind(inv_temp, cap),
                  LOSS=cfg.loss if cfg is not None else 0,
                  HAS_OLD=cfg is not None and grpo[3] is not None,
                  HAS_DELTA=cfg is not None and cfg.delta is not None,
                  HAS_RW=cfg is not None and grpo[5] is not None,
                  BETA_NZ=cfg is not None and cfg.beta != 0.0,
                  BIAS_KL=cfg is not None and cfg.bias_kl)
    head = (x3, x3.stride(0), x3.stride(1), g3, g3.stride(0), g3.stride(1), labels, out)
    launches = [(0, warps, block)] if per_sm > 0 else \
        [(1, stats_warps or warps, stats_block or block), (2, warps, block)]
    grid = (_num_programs(x3.device, n, per_sm) if per_sm > 0 else n,)
    for phase, w, blk in launches:
        _token_logprobs_fused_kernel[grid](
            *head, glp, gent, *tail, n, T, V, float(inv_temp), float(cap), int(ignore_index),
            *floats, **consts, BLOCK_V=max(16, min(blk, next_power_of_2(V))), LANES=bool(lanes),
            PHASE=phase, num_warps=w)
    return out


def _block_v(n_cols: int, stats: bool = False) -> tuple[int, int]:
    """(block, warps) of the statistics (stats=True) and gradient kernels. The statistics
    kernel runs one warp per row (no barrier in its block reductions) over 2048-column blocks:
    on an H100 that read [16384, 151936] bf16 in 1.83 ms against 1.95 ms for (8 warps, 4096);
    R1K_STATS_LAUNCH="warps,block" overrides it."""
    env = os.environ.get("R1K_STATS_LAUNCH") if stats else None
    if env:
        warps, block = _env_ints("R1K_STATS_LAUNCH", env, 2, 2)
        if warps < 1 or block < 16:
            raise ValueError(f"R1K_STATS_LAUNCH must be 'warps,block' with warps >= 1 and "
                             f"block >= 16, got {env!r}")
        return max(16, min(next_power_of_2(n_cols), next_power_of_2(block))), warps
    if stats:
        return max(16, min(next_power_of_2(n_cols), 2048)), 1
    block = max(16, min(next_power_of_2(n_cols), 4096))
    return block, (8 if block >= 4096 else 4)


def stats_triton(x: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                 state: torch.Tensor, out: torch.Tensor, *, col0: int, vocab: int, inv_temp: float,
                 ignore_index: int, accum: bool, final: bool, entropy: bool,
                 cap: float = 0.0) -> None:
    """Launch the statistics kernel on rows of `x [n, c]` (last dim contiguous); the head's
    constants inv_temp, cap as in head_constants.

    state [4, n] fp32 (m, s, t, w) is read when `accum` and written unless `final`; out [3, n]
    fp32 (logp, entropy, lse) is written when `final`.
    """
    n, c = x.shape
    if n == 0:
        return
    block, warps = _block_v(c, stats=True)
    _token_logprobs_fwd_kernel[(n,)](
        x, x.stride(0), labels, bias if bias is not None else x, state, out, n, c, col0, vocab,
        float(inv_temp), float(cap), int(ignore_index), HAS_BIAS=bias is not None, ACCUM=accum,
        FINAL=final, ENTROPY=entropy, HEAD=head_kind(inv_temp, cap), BLOCK_V=block,
        num_warps=warps)


def grad_triton(x: torch.Tensor, g: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                lse: torch.Tensor, ent: torch.Tensor | None, dlogp: torch.Tensor,
                dent: torch.Tensor | None, *, col0: int, inv_temp: float,
                ignore_index: int, cap: float = 0.0) -> None:
    """Write dL/dx into g (g may be x itself) for rows of `x [n, c]` (last dim contiguous)."""
    n, c = x.shape
    if n == 0:
        return
    block, warps = _block_v(c)
    has_dent = dent is not None
    _token_logprobs_bwd_kernel[(n,)](
        x, x.stride(0), g, g.stride(0), labels, bias if bias is not None else x, lse,
        ent if has_dent else lse, dlogp, dent if has_dent else dlogp, c, col0, float(inv_temp),
        float(cap), int(ignore_index), HAS_BIAS=bias is not None, HAS_DENT=has_dent,
        HEAD=head_kind(inv_temp, cap), BLOCK_V=block, num_warps=warps)


def stats_cpp(x: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
              state: torch.Tensor, out: torch.Tensor, *, col0: int, vocab: int, inv_temp: float,
              ignore_index: int, accum: bool, final: bool, entropy: bool,
              cap: float = 0.0) -> None:
    """stats_triton's contract on CPU tensors, by the C++ kernel."""
    torch.ops.r1kernels.logprob_tile_stats(x, labels, bias, state, out, int(col0), int(vocab),
                                           float(inv_temp), int(ignore_index), bool(accum),
                                           bool(final), bool(entropy), float(cap))


def grad_cpp(x: torch.Tensor, g: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
             lse: torch.Tensor, ent: torch.Tensor | None, dlogp: torch.Tensor,
             dent: torch.Tensor | None, *, col0: int, inv_temp: float, ignore_index: int,
             cap: float = 0.0) -> None:
    """grad_triton's contract on CPU tensors, by the C++ kernel (g may be x itself, or a 16-bit
    view over fp32 x's rows)."""
    has_dent = dent is not None
    torch.ops.r1kernels.logprob_tile_grad(x, g, labels, bias, lse, ent if has_dent else None, dlogp,
                                          dent, int(col0), float(inv_temp), int(ignore_index),
                                          float(cap))


def fwd_rows(backend: str, logits, labels, inv_temp: float, ignore_index: int,
             with_entropy: bool, cap: float = 0.0):
    """[3, N] fp32 (logp, entropy (zeros unless with_entropy), lse) of logits [N, V] by the
    Triton or C++ statistics kernel."""
    out = torch.zeros(3, logits.shape[0], dtype=torch.float32, device=logits.device)
    stats = stats_cpp if backend == "cpp" else stats_triton
    stats(logits, labels, None, out, out, col0=0, vocab=logits.shape[1], inv_temp=inv_temp,
          ignore_index=ignore_index, accum=False, final=True, entropy=with_entropy, cap=cap)
    return out


def bwd_rows(backend: str, logits, labels, lse, ent, dlogp, dent, inv_temp: float,
             ignore_index: int, inplace: bool, out: torch.Tensor | None = None,
             cap: float = 0.0) -> torch.Tensor:
    g = logits if inplace else (torch.empty_like(logits) if out is None else out)
    grad = grad_cpp if backend == "cpp" else grad_triton
    grad(logits, g, labels, None, lse, ent, dlogp, dent, col0=0, inv_temp=inv_temp,
         ignore_index=ignore_index, cap=cap)
    return g


# The Triton launchers as custom ops, so torch.compile sees one opaque node per launch (eager
# calls go to the launchers directly: a custom op costs tens of microseconds of Python).
if HAS_TRITON:

    @torch.library.custom_op("r1kernels_triton::token_logprobs_fwd", mutates_args=())
    def _fwd_triton_op(logits: torch.Tensor, labels: torch.Tensor, inv_temp: float,
                       ignore_index: int, with_entropy: bool, cap: float = 0.0) -> torch.Tensor:
        return fwd_rows("triton", logits, labels, inv_temp, ignore_index, with_entropy, cap)

    @_fwd_triton_op.register_fake
    def _(logits, labels, inv_temp, ignore_index, with_entropy, cap=0.0):
        return logits.new_empty(3, logits.shape[0], dtype=torch.float32)

    @torch.library.custom_op("r1kernels_triton::token_logprobs_bwd", mutates_args=())
    def _bwd_triton_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                       ent: torch.Tensor | None, dlogp: torch.Tensor, dent: torch.Tensor | None,
                       inv_temp: float, ignore_index: int, cap: float = 0.0) -> torch.Tensor:
        return bwd_rows("triton", logits, labels, lse, ent, dlogp, dent, inv_temp, ignore_index,
                        False, cap=cap)

    @_bwd_triton_op.register_fake
    def _(logits, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, cap=0.0):
        return torch.empty_like(logits)

    @torch.library.custom_op("r1kernels_triton::token_logprobs_bwd_", mutates_args=("logits",))
    def _bwd_inplace_triton_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                               ent: torch.Tensor | None, dlogp: torch.Tensor,
                               dent: torch.Tensor | None, inv_temp: float,
                               ignore_index: int, cap: float = 0.0) -> None:
        grad_triton(logits, logits, labels, None, lse, ent, dlogp, dent, col0=0,
                    inv_temp=inv_temp, ignore_index=ignore_index, cap=cap)

    @_bwd_inplace_triton_op.register_fake
    def _(logits, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, cap=0.0):
        return None

    # tile-level launchers used by the hidden-state op (linear_token_logprobs)
    @torch.library.custom_op("r1kernels_triton::logprob_tile_stats", mutates_args=("state", "out"))
    def _tile_stats_op(x: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                       state: torch.Tensor, out: torch.Tensor, col0: int, vocab: int,
                       inv_temp: float, ignore_index: int, accum: bool, final: bool,
                       entropy: bool, cap: float = 0.0) -> None:
        stats_triton(x, labels, bias, state, out, col0=col0, vocab=vocab, inv_temp=inv_temp,
                     ignore_index=ignore_index, accum=accum, final=final, entropy=entropy,
                     cap=cap)

    @_tile_stats_op.register_fake
    def _(x, labels, bias, state, out, col0, vocab, inv_temp, ignore_index, accum, final, entropy,
          cap=0.0):
        return None

    @torch.library.custom_op("r1kernels_triton::logprob_tile_grad", mutates_args=("g",))
    def _tile_grad_op(x: torch.Tensor, g: torch.Tensor, labels: torch.Tensor,
                      bias: torch.Tensor | None, lse: torch.Tensor, ent: torch.Tensor | None,
                      dlogp: torch.Tensor, dent: torch.Tensor | None, col0: int, inv_temp: float,
                      ignore_index: int, cap: float = 0.0) -> None:
        grad_triton(x, g, labels, bias, lse, ent, dlogp, dent, col0=col0, inv_temp=inv_temp,
                    ignore_index=ignore_index, cap=cap)

    @_tile_grad_op.register_fake
    def _(x, g, labels, bias, lse, ent, dlogp, dent, col0, inv_temp, ignore_index, cap=0.0):
        return None


def stats_tile(backend, x, labels, bias, state, out, *, col0, vocab, inv_temp, ignore_index, accum,
               final, entropy, cap=0.0) -> None:
    """stats_cpp or stats_triton (backend "cpp" / "triton"), the latter through its custom op
    when torch.compile traces it."""
    if backend == "cpp":
        stats_cpp(x, labels, bias, state, out, col0=col0, vocab=vocab, inv_temp=inv_temp,
                  ignore_index=ignore_index, accum=accum, final=final, entropy=entropy, cap=cap)
    elif torch.compiler.is_compiling():
        _tile_stats_op(x, labels, bias, state, out, col0, vocab, inv_temp, ignore_index, accum,
                       final, entropy, cap)
    else:
        stats_triton(x, labels, bias, state, out, col0=col0, vocab=vocab, inv_temp=inv_temp,
                     ignore_index=ignore_index, accum=accum, final=final, entropy=entropy,
                     cap=cap)


def grad_tile(backend, x, g, labels, bias, lse, ent, dlogp, dent, *, col0, inv_temp,
              ignore_index, cap=0.0) -> None:
    """grad_cpp or grad_triton (backend "cpp" / "triton"), the latter through its custom op when
    torch.compile traces it (g must not alias x then)."""
    if backend == "cpp":
        grad_cpp(x, g, labels, bias, lse, ent, dlogp, dent, col0=col0, inv_temp=inv_temp,
                 ignore_index=ignore_index, cap=cap)
    elif torch.compiler.is_compiling():
        _tile_grad_op(x, g, labels, bias, lse, ent, dlogp, dent, col0, inv_temp, ignore_index,
                      cap)
    else:
        grad_triton(x, g, labels, bias, lse, ent, dlogp, dent, col0=col0, inv_temp=inv_temp,
                    ignore_index=ignore_index, cap=cap)


# ---- PyTorch path (chunked over rows; the same math on fp32 tiles) ----------------------------


def head_torch(x: torch.Tensor, inv_temp: float, cap: float, grad: bool = False):
    """(z, dhead) of raw fp32 logits x (not modified): z = inv_temp * x, or with a soft-cap
    (cap != 0) inv_temp * tanh(cap * x) and, when `grad`, dhead = cap * sech^2(cap * x) (from
    exp(-2|cap x|): no cancellation where tanh saturates; grad_torch's factor besides
    inv_temp). dhead is None without a soft-cap or without `grad`."""
    if not cap:
        return x * inv_temp, None
    y = x * cap
    dhead = None
    if grad:
        e = torch.exp(y.abs().mul(-2.0))
        dhead = e.mul(4.0 * cap).div_((e + 1.0).square_())
    return y.tanh_().mul_(inv_temp), dhead



def stats_torch(z: torch.Tensor, loc: torch.Tensor, state: tuple | None, entropy: bool):
    """Merge the statistics of the fp32 tile z [n, c] (already / T) into state (m, s, t, w).

    loc [n] int64: the label's column inside the tile (outside [0, c) when not in it).
    z is overwritten: callers pass a tile they own.
    """
    n, c = z.shape
    in_tile = (loc >= 0) & (loc < c)
    zt = z.gather(1, loc.clamp(0, max(c - 1, 0)).unsqueeze(1)).squeeze(1)
    t_tile = torch.where(in_tile, zt, torch.zeros_like(zt))
    m_tile = z.amax(dim=1)
    if state is None:
        m = torch.full_like(m_tile, float("-inf"))
        s = torch.zeros_like(m_tile)
        t = torch.zeros_like(m_tile)
        w = torch.zeros_like(m_tile)
    else:
        m, s, t, w = state
    m_new = torch.maximum(m, m_tile)
    m_ref = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_ref)
    # d = z - m_ref, floored at -1e4 (exp is 0 there either way): no 0 * -inf below
    d = z.sub_(m_ref.unsqueeze(1)).clamp_(min=-1e4)
    e = torch.exp(d)
    if entropy:
        w = alpha * (w + s * torch.where(s > 0, m - m_ref, torch.zeros_like(s)))
        w = w + torch.linalg.vecdot(e, d, dim=1)
    s = s * alpha + e.sum(1)
    return m_new, s, t + t_tile, w


def finalize(state: tuple, labels: torch.Tensor, vocab: int, ignore_index: int, entropy: bool):
    """(logp, entropy or None, lse) from the merged statistics."""
    m, s, t, w = state
    lse = m + torch.log(s)
    ignored = labels == ignore_index
    valid = (labels >= 0) & (labels < vocab)
    zero = torch.zeros_like(lse)
    logp = torch.where(valid, (t - m) - torch.log(s), torch.full_like(lse, float("nan")))
    logp = torch.where(ignored, zero, logp)
    ent = None
    if entropy:
        ent = torch.where(ignored, zero, torch.log(s) - w / s)
    return logp, ent, lse


def grad_torch(z: torch.Tensor, loc: torch.Tensor, ignored: torch.Tensor, lse: torch.Tensor,
               ent: torch.Tensor | None, dlogp: torch.Tensor, dent: torch.Tensor | None,
               inv_temp: float, dhead: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dlogits of the fp32 tile z [n, c] (already / T), computed in place in z:
    g = p * (-(dlogp + dent * H) - dent * log p) + dlogp * onehot, times 1/T (and times dhead,
    head_torch's, with a soft-cap), with log p floored at -1e4 (p is 0 there either way: no
    0 * -inf)."""
    n, c = z.shape
    zero = torch.zeros_like(lse)
    g_row = torch.where(ignored, zero, dlogp.float())
    logp_v = z.sub_(lse.unsqueeze(1)).clamp_(min=-1e4)
    p = torch.exp(logp_v)
    if dent is not None:
        e_row = torch.where(ignored, zero, dent.float())
        coef = -(g_row + e_row * ent)
        g = logp_v.mul_(-e_row.unsqueeze(1)).add_(coef.unsqueeze(1)).mul_(p)
    else:
        g = p.mul_(-g_row.unsqueeze(1))
    in_tile = (loc >= 0) & (loc < c)
    onehot = torch.where(in_tile, g_row, zero).unsqueeze(1)
    g = g.scatter_add_(1, loc.clamp(0, max(c - 1, 0)).unsqueeze(1), onehot)
    g = g.masked_fill_(ignored.unsqueeze(1), 0.0)
    if dhead is not None:
        g.mul_(dhead)
    return g.mul_(inv_temp)


def _chunk_rows(n_cols: int) -> int:
    return max(1, TORCH_CHUNK_ELEMS // max(n_cols, 1))


def fwd_torch(x: torch.Tensor, labels: torch.Tensor, inv_temp: float, ignore_index: int,
              with_entropy: bool, cap: float = 0.0):
    """(logp, entropy or None, lse) with at most TORCH_CHUNK_ELEMS fp32 logits alive at once."""
    n, v = x.shape
    outs = []
    step = _chunk_rows(v)
    for r0 in range(0, n, step):
        z = head_torch(x[r0:r0 + step].float(), inv_temp, cap)[0]
        y = labels[r0:r0 + step].long()
        st = stats_torch(z, y, None, with_entropy)
        outs.append(finalize(st, y, v, ignore_index, with_entropy))
    if not outs:
        empty = x.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None), empty
    logp = torch.cat([o[0] for o in outs])
    ent = torch.cat([o[1] for o in outs]) if with_entropy else None
    lse = torch.cat([o[2] for o in outs])
    return logp, ent, lse


def bwd_torch(x: torch.Tensor, labels: torch.Tensor, lse, ent, dlogp, dent, inv_temp: float,
              ignore_index: int, out: torch.Tensor | None = None,
              cap: float = 0.0) -> torch.Tensor:
    """dL/dx in x's dtype, written chunk by chunk into `out` (may be x itself, or None: new)."""
    n, v = x.shape
    g_all = torch.empty_like(x) if out is None else out
    step = _chunk_rows(v)
    for r0 in range(0, n, step):
        sl = slice(r0, r0 + step)
        z, dhead = head_torch(x[sl].float(), inv_temp, cap, grad=True)
        y = labels[sl].long()
        g = grad_torch(z, y, y == ignore_index, lse[sl], None if ent is None else ent[sl],
                       dlogp[sl], None if dent is None else dent[sl], inv_temp, dhead)
        g_all[sl].copy_(g)
    return g_all


# ---- dispatch to one backend ------------------------------------------------------------------


def _fwd(backend: str, x, labels, inv_temp: float, ignore_index: int, with_entropy: bool,
         cap: float = 0.0):
    if backend not in TILE_BACKENDS:
        return fwd_torch(x, labels, inv_temp, ignore_index, with_entropy, cap)
    if backend == "triton" and torch.compiler.is_compiling():
        out = _fwd_triton_op(x, labels, inv_temp, ignore_index, with_entropy, cap)
    else:
        out = fwd_rows(backend, x, labels, inv_temp, ignore_index, with_entropy, cap)
    return out[0], (out[1] if with_entropy else None), out[2]


def _bwd(backend: str, x, labels, lse, ent, dlogp, dent, inv_temp: float, ignore_index: int,
         inplace: bool, out: torch.Tensor | None = None, cap: float = 0.0) -> torch.Tensor:
    """dL/dx in x's dtype: into x itself (inplace), into `out` (x's shape, rows contiguous), or
    a new tensor."""
    dlogp = dlogp.float().contiguous()
    dent = None if dent is None else dent.float().contiguous()
    if backend == "triton" and torch.compiler.is_compiling():
        if inplace:
            _bwd_inplace_triton_op(x, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, cap)
            return x
        g = _bwd_triton_op(x, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, cap)
        return g if out is None else out.copy_(g)
    if backend in TILE_BACKENDS:
        return bwd_rows(backend, x, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, inplace,
                        out, cap)
    return bwd_torch(x, labels, lse, ent, dlogp, dent, inv_temp, ignore_index,
                     out=x if inplace else out, cap=cap)


class TokenLogprobsFunction(torch.autograd.Function):
    """logits [N, V] (last dim contiguous), labels [N] -> logp [N] (, entropy [N])."""

    @staticmethod
    def forward(ctx, x, labels, inv_temp, ignore_index, with_entropy, backend, inplace, cap):
        logp, ent, lse = _fwd(backend, x, labels, inv_temp, ignore_index, with_entropy, cap)
        # saves the logits themselves (no copy) and 4-8 bytes per row
        ctx.save_for_backward(x, labels, lse, ent)
        ctx.args = (inv_temp, ignore_index, backend, inplace, cap)
        ctx.with_entropy = with_entropy
        if with_entropy:
            return logp, ent
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, dlogp, dent=None):
        x, labels, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, backend, inplace, cap = ctx.args
        if dlogp is None:
            dlogp = torch.zeros_like(lse)
        g = _bwd(backend, x, labels, lse, ent if ctx.with_entropy else None, dlogp,
                 dent if ctx.with_entropy else None, inv_temp, ignore_index, inplace, cap=cap)
        return g, None, None, None, None, None, None, None


# ---- validation -------------------------------------------------------------------------------


MAX_TEMPERATURE = 1e30  # 1 / temperature stays a normal fp32 number (the kernels' constant)
# logits / temperature stays finite in fp32 for logits within +-1e8 (below ~3e-39, 1 / temperature
# itself overflows fp32 and every log-prob is NaN, where float64 is finite)
MIN_TEMPERATURE = 1e-30


def check_temperature(op: str, temperature) -> float:
    """temperature as a float in [MIN_TEMPERATURE, MAX_TEMPERATURE]: a Python or NumPy real
    number, not a tensor (reading a CUDA tensor's value would wait for the GPU)."""
    if isinstance(temperature, torch.Tensor):
        raise ValueError(f"{op}: temperature must be a number, not a tensor (use float(t)), got "
                         f"a tensor of shape {tuple(temperature.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or \
            not MIN_TEMPERATURE <= float(temperature) <= MAX_TEMPERATURE:
        raise ValueError(f"{op}: temperature must be a number in [{MIN_TEMPERATURE:g}, "
                         f"{MAX_TEMPERATURE:g}] (logits / temperature must fit fp32), got "
                         f"{temperature!r}")
    return float(temperature)


FP32_TINY, FP32_MAX = 2.0 ** -126, 3.4028234663852886e38  # normal fp32 range (kernel constants)


def head_kind(inv_temp: float, cap: float) -> int:
    """The Triton kernels' HEAD constexpr (_head): 0 the plain head (inv_temp > 0), 1 a negative
    logit_scale without soft-cap (the kernels' -inf padding must be masked again after the
    scaling), 2 a soft-cap."""
    return 2 if cap else (1 if inv_temp < 0 else 0)


def head_constants(op: str, temperature: float, softcap, logit_scale) -> tuple[float, float]:
    """The kernels' constants (inv_temp, cap) of the head z = softcap * tanh(logit_scale * x /
    softcap) / temperature (no tanh when softcap is None): (logit_scale / temperature, 0.0)
    without a soft-cap, (softcap / temperature, logit_scale / softcap) with one (module
    docstring). temperature already checked (check_temperature). softcap: None or a positive
    finite real; logit_scale: a finite nonzero real (Python or NumPy numbers, not tensors); both
    constants must be normal fp32 numbers (ValueError naming the argument otherwise)."""
    for name, v in (("softcap", softcap), ("logit_scale", logit_scale)):
        if v is None and name == "softcap":
            continue
        if isinstance(v, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a number, not a tensor (use float(t)), got a "
                             f"tensor of shape {tuple(v.shape)}")
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{op}: {name} must be a real number, got {v!r}")
    if softcap is not None and not 0 < float(softcap) < math.inf:
        raise ValueError(f"{op}: softcap must be None or a positive finite number, got {softcap!r}")
    if not 0 < abs(float(logit_scale)) < math.inf:
        raise ValueError(f"{op}: logit_scale must be a finite nonzero number, got {logit_scale!r}")
    scale = float(logit_scale)
    if softcap is None:
        inv_temp, cap = scale / temperature, 0.0
    else:
        inv_temp, cap = float(softcap) / temperature, scale / float(softcap)
    # (the argument that sets each constant besides temperature: logit_scale / T without a
    # soft-cap; softcap / T and logit_scale / softcap with one)
    names = ("logit_scale", "") if softcap is None else ("softcap", "logit_scale")
    for name, v in zip(names, (inv_temp, cap)):
        if v and not FP32_TINY <= abs(v) <= FP32_MAX:
            raise ValueError(f"{op}: {name} out of range: logit_scale={logit_scale!r}, "
                             f"softcap={softcap!r}, temperature={temperature!r} give a kernel "
                             f"constant {v!r} outside the normal fp32 range")
    return inv_temp, cap


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """The labels as the ops use them inside: flat, contiguous int64. Every comparison with
    ignore_index or the vocabulary size is made on these: on a narrower integer dtype, torch
    would convert -100 or V to that dtype (uint8: -100 is 156) and misjudge labels."""
    return labels.reshape(-1).to(torch.int64).contiguous()


def _bad_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Where a label is outside [0, vocab) and not ignore_index."""
    labels = labels.to(torch.int64)  # (no copy for int64; see flat_labels)
    return ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)


def _bad_label_error(op: str, labels, bad, vocab: int, ignore_index) -> IndexError:
    first = labels[bad].reshape(-1)[0].item()
    return IndexError(f"{op}: labels must be in [0, {vocab}) or ignore_index={ignore_index}, "
                      f"got {first}")


def checked_rows(op: str, labels: torch.Tensor, vocab: int, ignore_index: int,
                 keep: torch.Tensor):
    """The labels' value check (IndexError for a label out of range) and the indices
    of the True entries of `keep` (flattened; None when that is all of them), with one host
    sync for both (the bad-label and kept-row counts) instead of two. Under torch.compile: no
    check, None (every row kept). Call check_labels first."""
    flat = keep.reshape(-1)
    if torch.compiler.is_compiling() or flat.numel() == 0:
        return None
    bad = _bad_labels(labels, vocab, ignore_index)
    n_bad, n_keep = torch.stack([bad.sum(), flat.sum()]).tolist()
    if n_bad:
        raise _bad_label_error(op, labels, bad, vocab, ignore_index)
    if n_keep == flat.numel():
        return None
    return torch.nonzero_static(flat, size=int(n_keep)).squeeze(1)  # no second sync


def check_label_values(op: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """The labels' value check alone: IndexError for a label outside [0, vocab) that
    is not ignore_index (one host sync; none under torch.compile, where the kernels return NaN
    instead). The fused kernels never read at an out-of-range label, so their launchers split
    it around the launch instead (start_label_check)."""
    if labels.numel() and not torch.compiler.is_compiling():
        bad = _bad_labels(labels, vocab, ignore_index)
        if bool(bad.any()):
            raise _bad_label_error(op, labels, bad, vocab, ignore_index)


def start_label_check(op: str, labels: torch.Tensor, vocab: int, ignore_index: int):
    """check_label_values in two halves, for launchers whose kernel never reads at an
    out-of-range label: call this before enqueueing the kernel, and the function it returns
    after. On CUDA the check's kernels and a copy of its flag to pinned host memory go into the
    stream first, and the returned function waits for them alone (an event), not for the kernel
    enqueued after them: the call returns while its kernel runs, so the host prepares the next
    call meanwhile instead of leaving the GPU idle. Elsewhere (CPU tensors, torch.compile, no
    labels) the returned function is check_label_values itself."""
    if not labels.is_cuda or labels.numel() == 0 or torch.compiler.is_compiling():
        return lambda: check_label_values(op, labels, vocab, ignore_index)
    stream = torch.cuda.current_stream(labels.device)
    bad = _bad_labels(labels, vocab, ignore_index)
    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
    with torch.cuda.stream(stream):
        flag.copy_(bad.any(), non_blocking=True)
    done = torch.cuda.Event()
    done.record(stream)

    def finish():
        done.synchronize()
        if bool(flag):
            raise _bad_label_error(op, labels, bad, vocab, ignore_index)

    return finish


def check_ignore_index(op: str, ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) \
            or not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"{op}: ignore_index must be an int64 integer, got {ignore_index!r}")


def check_labels(op: str, labels: torch.Tensor, batch_shape, ignore_index, device) -> None:
    """Type, shape and device of the labels, and ignore_index. Their values are checked on the
    int64 labels (flat_labels) by check_label_values, checked_rows or start_label_check."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(f"{op}: labels expected shape {tuple(batch_shape)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{op}: labels expected on device {device}, got {labels.device}")
    check_ignore_index(op, ignore_index)


def check_upstream_grads(op: str, labels, grad_logp, grad_entropy, with_entropy: bool, device):
    """The upstream gradients of the *_fwd_bwd functions: floating, shaped like labels, on
    `device`; returned flat, contiguous fp32 (grad_entropy None when not given)."""
    for name, g in (("grad_logp", grad_logp), ("grad_entropy", grad_entropy)):
        if g is None and name == "grad_entropy":
            continue
        if not isinstance(g, torch.Tensor) or not isinstance(labels, torch.Tensor) \
                or tuple(g.shape) != tuple(labels.shape) or not g.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating tensor of shape "
                             f"{tuple(getattr(labels, 'shape', ()))} like labels, got "
                             f"{tuple(getattr(g, 'shape', ()))} {getattr(g, 'dtype', '')}")
        if g.device != device:
            raise ValueError(f"{op}: {name} is on {g.device} but the inputs are on {device}")
    if grad_entropy is not None and not with_entropy:
        raise ValueError(f"{op}: grad_entropy needs with_entropy=True")
    return (grad_logp.reshape(-1).float().contiguous(),
            None if grad_entropy is None else grad_entropy.reshape(-1).float().contiguous())


def check_float(op: str, name: str, t, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimension(s), got shape "
                         f"{tuple(t.shape)}")


def _prepare(op: str, logits, labels, temperature, ignore_index, label_data: bool = True,
             softcap=None, logit_scale=1.0):
    """(logits [N, V] with contiguous rows, labels [N] int64, inv_temp, cap): head_constants."""
    check_float(op, "logits", logits)
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"{op}: logits must have a vocabulary dimension >= 1, got shape "
                         f"{tuple(logits.shape)}")
    check_labels(op, labels, logits.shape[:-1], ignore_index, logits.device)
    temperature = check_temperature(op, temperature)
    inv_temp, cap = head_constants(op, temperature, softcap, logit_scale)
    x = logits.reshape(-1, vocab)
    if x.stride(-1) != 1:
        x = x.contiguous()  # kernels read rows with unit stride; copy stays in the logits' dtype
    y = flat_labels(labels)
    if label_data:
        check_label_values(op, y, vocab, ignore_index)
    return x, y, inv_temp, cap


# ---- public function and internal entry point -------------------------------------------------


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, with_entropy: bool = False,
                   inplace_backward: bool = False, softcap: float | None = None,
                   logit_scale: float = 1.0, process_group=None):
    """logp = log_softmax(logits.float() / temperature)[label], 0 where label == ignore_index.

    `logits [..., V]`, `labels [...]` integer; returns fp32 `logp [...]`, and `entropy [...]` too
    when `with_entropy`. Differentiable. `inplace_backward=True` writes dL/dlogits into the logits
    buffer during backward (saves one [N, V] allocation; the logits are garbage afterwards).
    Heads that transform their logits: `logit_scale` multiplies them first (Cohere's
    logit_scale; Granite's 1 / logits_scaling), then `softcap` applies softcap * tanh(z /
    softcap) (Gemma's final_logit_softcapping), then the division by temperature.
    `process_group`: the logits are this rank's contiguous slice of a vocabulary split over the
    group, labels global ids (r1kernels/distributed.py: 12-16 bytes per token on the wire).
    See docs/api.md.
    """
    if process_group is not None:
        from r1kernels import distributed

        return distributed.token_logprobs(logits, labels, temperature=temperature,
                                          ignore_index=ignore_index, with_entropy=with_entropy,
                                          inplace_backward=inplace_backward, softcap=softcap,
                                          logit_scale=logit_scale, group=process_group)
    x, y, inv_temp, cap = _prepare(OP, logits, labels, temperature, ignore_index, label_data=False,
                                   softcap=softcap, logit_scale=logit_scale)
    backend = dispatch.select(OP, x.device)
    if backend == "triton":  # its kernels never read at an out-of-range label: check around them
        label_check = start_label_check(OP, y, x.shape[1], ignore_index)
    else:
        check_label_values(OP, y, x.shape[1], ignore_index)
        label_check = None
    inplace = bool(inplace_backward) and x.data_ptr() == logits.data_ptr() and x.is_contiguous()
    out = TokenLogprobsFunction.apply(x, y, inv_temp, int(ignore_index), bool(with_entropy),
                                      backend, inplace, cap)
    if label_check is not None:
        label_check()
    shape = labels.shape
    if with_entropy:
        return out[0].reshape(shape), out[1].reshape(shape)
    return out.reshape(shape)


def token_logprobs_with_grad(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                             ignore_index: int, with_entropy: bool,
                             grad_fn: Callable, chunk_multiple: int = 1,
                             inplace: bool = False, out: torch.Tensor | None = None,
                             softcap: float | None = None, logit_scale: float = 1.0):
    """(logp [N] fp32, entropy [N] fp32 or None, grad_logits [N, V] in logits' dtype).

    grad_fn(start, end, logp_chunk, entropy_chunk) -> dL/dlogp for rows start:end; called once
    with (0, N) (so chunk_multiple always holds). The entropy is for metrics: no gradient flows
    through it. `inplace=True` writes grad_logits into `logits` (returned as that same tensor
    when it is 2-D with contiguous rows); otherwise `out` (logits' shape and dtype, rows
    contiguous), when given, receives it (e.g. one sequence's slice of a batch's gradient).
    """
    op = "token_logprobs_with_grad"
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits expected 2-D [N, V], got shape {tuple(logits.shape)}")
    if isinstance(chunk_multiple, bool) or not isinstance(chunk_multiple, int) or chunk_multiple < 1:
        raise ValueError(f"{op}: chunk_multiple must be a positive int, got {chunk_multiple!r}")
    x, y, inv_temp, cap = _prepare(op, logits, labels, temperature, ignore_index,
                                   softcap=softcap, logit_scale=logit_scale)
    if out is not None and (tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype
                            or out.device != x.device or (x.shape[1] > 1 and out.stride(1) != 1)):
        raise ValueError(f"{op}: out must be a {x.dtype} tensor of shape {tuple(x.shape)} on "
                         f"{x.device} with contiguous rows, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device} strides {out.stride()}")
    backend = dispatch.select(OP, x.device)
    with torch.no_grad():
        logp, ent, lse = _fwd(backend, x, y, inv_temp, int(ignore_index), bool(with_entropy), cap)
        n = x.shape[0]
        dlogp = grad_fn(0, n, logp, ent)
        if not isinstance(dlogp, torch.Tensor) or tuple(dlogp.shape) != (n,):
            raise ValueError(f"{op}: grad_fn must return a tensor of shape ({n},), got "
                             f"{getattr(dlogp, 'shape', type(dlogp).__name__)}")
        inplace = bool(inplace) and x.data_ptr() == logits.data_ptr() and x.is_contiguous()
        grad = _bwd(backend, x, y, lse, None, dlogp, None, inv_temp, int(ignore_index), inplace,
                    None if inplace else out, cap)
    return logp, ent, grad


def token_logprobs_fwd_bwd(logits: torch.Tensor, labels: torch.Tensor, grad_logp: torch.Tensor, *,
                           grad_entropy: torch.Tensor | None = None, temperature: float = 1.0,
                           ignore_index: int = -100, with_entropy: bool = False,
                           inplace: bool = False, softcap: float | None = None,
                           logit_scale: float = 1.0, process_group=None):
    """Forward and backward of `token_logprobs` in one call, for a loss whose upstream gradient
    is known before the log-probs are (SFT's mean NLL: -1/N per token; any loss linear in logp).

    Returns (logp [...] fp32, entropy [...] fp32 or None, grad_logits) where grad_logits =
    dL/dlogits for L = sum(grad_logp * logp) + sum(grad_entropy * entropy), in the logits' dtype
    (softcap, logit_scale: the head, as in token_logprobs);
    written into `logits` itself when `inplace=True` (the logits are then overwritten). On CUDA
    the fused kernel of this module (statistics, then dL/dlogits; launch modes in FUSED_CONFIG).
    Not differentiable itself. A label out of range is an IndexError; on the fused path it is
    raised after the kernel ran (so with inplace=True the logits are overwritten by then).
    `process_group`: a vocabulary split over the group (see token_logprobs); grad_logits is
    this rank's columns.
    """
    if process_group is not None:
        from r1kernels import distributed

        return distributed.token_logprobs_fwd_bwd(
            logits, labels, grad_logp, grad_entropy=grad_entropy, temperature=temperature,
            ignore_index=ignore_index, with_entropy=with_entropy, inplace=inplace,
            softcap=softcap, logit_scale=logit_scale, group=process_group)
    op = "token_logprobs_fwd_bwd"
    x, y, inv_temp, cap = _prepare(op, logits, labels, temperature, ignore_index, label_data=False,
                                   softcap=softcap, logit_scale=logit_scale)
    n = x.shape[0]
    glp, gent = check_upstream_grads(op, labels, grad_logp, grad_entropy, with_entropy, x.device)
    inplace = bool(inplace) and x.data_ptr() == logits.data_ptr() and x.is_contiguous()
    backend = dispatch.select(OP, x.device)
    with torch.no_grad():
        if backend == "triton":
            g = x if inplace else torch.empty_like(x)
            label_check = start_label_check(op, y, x.shape[1], ignore_index)
            out = fused_logits(x.view(1, n, x.shape[1]), y, g.view(1, n, x.shape[1]), inv_temp,
                               int(ignore_index), bool(with_entropy), grad_logp=glp,
                               grad_entropy=gent, cap=cap)
            label_check()  # (waits for the check, not for the kernel)
            logp, ent = out[0], (out[1] if with_entropy else None)
        else:
            check_label_values(op, y, x.shape[1], ignore_index)
            logp, ent, lse = _fwd(backend, x, y, inv_temp, int(ignore_index), bool(with_entropy),
                                  cap)
            g = _bwd(backend, x, y, lse, ent if gent is not None else None, glp, gent, inv_temp,
                     int(ignore_index), inplace, cap=cap)
    shape = labels.shape
    grad = logits if inplace else g.view(logits.shape)
    return logp.reshape(shape), (ent.reshape(shape) if with_entropy else None), grad
