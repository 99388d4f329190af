"""MoE routing and token dispatch: moe_route, moe_permute / moe_unpermute and the balance helpers.

Routing (one token = one row of E router logits):
    s = softmax(x) | sigmoid(x) | sqrt(softplus(x));  c = s + bias (bias only selects)
    groups (n_group > 1): group score = top-2 sum of c (with bias) or max of c (without);
    keep the topk_group best groups; pick the top_k best experts among them.
    w = s[ids] / (sum s[ids] + 1e-20) if norm_topk_prob;  w *= routed_scaling_factor
    w *= expert_scale[ids]  (optional; a [T, k] gather after the kernel, so autograd gives both
                             dL/d expert_scale and the gw * expert_scale[ids] the kernel backward sees)
Every backend ranks by the packed key (tier, value, -index): tier 3 eligible, 2 outside the kept
groups, 1 NaN, so NaN is never picked while a non-NaN score remains and ties go to the lower
index; values compare as fp32 through the order-preserving integer map of their bits.

Backward (router logits get gradient through the selected weights only). With g = dL/dw:
    gs_i = c/S (g_i - sum_j g_j s_j / S)  (norm, S = sum s[ids] + 1e-20), else gs_i = c g_i
    sigmoid: dL/dx[ids_i] = gs_i s_i (1 - s_i), 0 elsewhere
    sqrtsoftplus: dL/dx[ids_i] = gs_i sigmoid(x_i) / (2 s_i) = gs_i (1 - exp(-s_i^2)) / (2 s_i)
             (from the saved s: expm1 for small s; 0 where s underflowed to 0), 0 elsewhere
    softmax: dL/dx_e = s_e (G_e - sum_i gs_i s_i),  G = gs scattered to ids,  s_e = exp(x_e - lse)
Saved for backward: the [T, k] selected scores and ids, the [T] logsumexp (softmax), and the
router logits themselves for softmax (an input that exists anyway): never a new [T, E] tensor.

Dispatch (deterministic, no atomics): rows are ordered by expert, then token, then slot; expert
e's segment starts at offsets[e], a multiple of `align`, and is zero-padded to a multiple of
`align`. The output always has R = T*k + E*(align-1) rows (a static bound: no host sync, CUDA-
graph safe); rows from offsets[E] on are zero padding too.
    permute:   out[row(t, j)] = hidden[t]
    unpermute: y[t] = sum_j w[t, j] * eo[row(t, j)]   (fp32 accumulation)
    VJPs: d hidden[t] = sum_j g[row(t, j)];  d eo[row(t, j)] = w[t, j] gy[t];  d w[t, j] = <gy[t], eo[row]>

Backends: CUDA kernels (csrc/moe/), the Triton kernels below, C++ CPU kernels and plain torch.
Each backend's kernels are registered ops (`torch.ops.r1kernels` for cuda/cpp, the
`r1kernels_triton` / `r1kernels_torch` namespaces below) with one signature per op, so the
autograd code is shared and torch.compile sees one opaque node per kernel; eager calls go to the
Python launchers directly, and skip autograd when nothing requires grad. The CUDA and Triton
routing kernels take E <= 512 and top_k <= 32 (larger routers run the torch path).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from r1kernels import _custom_ops, dispatch
from r1kernels.ops._triton import HAS_TRITON, next_power_of_2, tl, triton

OP_ROUTE = "moe_route"
OP_PERMUTE = "moe_permute"
OP_UNPERMUTE = "moe_unpermute"
# Preference on CUDA from the H100 measurements in BENCHMARKS.md: the CUDA router is 4x faster
# than the Triton one; for permute + unpermute (T=16384, H=7168, k=8) the Triton row copies are
# 2.4x faster than the CUDA kernels (2.2 ms vs 5.4 ms), so Triton goes first there.
dispatch.register(OP_ROUTE, cuda=("cuda", "triton", "torch"), cpu=("cpp", "torch"))
for _op in (OP_PERMUTE, OP_UNPERMUTE):
    dispatch.register(_op, cuda=("triton", "cuda", "torch"), cpu=("cpp", "torch"))

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")  # kernel code: the index
MAX_KERNEL_EXPERTS = 512  # the CUDA and Triton routing kernels: E <= 512 (bigger E runs in torch)
MAX_KERNEL_TOPK = 32      # the CUDA routing kernel keeps one selected expert per lane


class MoEPermutation(NamedTuple):
    """Where moe_permute put each (token, slot): the input of moe_unpermute.

    counts    [E] int32    tokens routed to each expert
    offsets   [E + 1] int32 start row of each expert's segment (multiples of align); offsets[E]
                           is the number of rows in use
    row_ids   [T, k] int32 row of (token t, slot j) in the permuted tensor
    token_ids [R] int32    source token of each row, -1 for zero padding rows
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    row_ids: torch.Tensor
    token_ids: torch.Tensor


# ================================================================================================
# Triton kernels
# ================================================================================================

# packed key = tier * 2^52 + ordered_fp32 * 2^20 + (2^20 - 1 - index)  (csrc/moe/moe.h)
_TIER_SHIFT = tl.constexpr(1 << 52) if HAS_TRITON else 1 << 52


@triton.jit
def _ordered_key(x):
    """fp32 -> int64 in [0, 2^32) ordered like the floats (-0.0 == +0.0; NaN must be masked)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b.to(tl.int64) + 2147483648, (~b).to(tl.int64))


@triton.jit
def _sqrt_softplus(x):
    """sqrt(softplus(x)), softplus as torch's (x itself above 20); log1p(e) = log(u) * e / (u - 1)
    with u = 1 + e is exact to rounding for tiny e (Goldberg), where log(1 + e) would give 0."""
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
    return tl.where(x != x, x, tl.sqrt(tl.where(x > 20.0, x, lp)))


@triton.jit
def _sqrt_softplus_grad(s):
    """d sqrt(softplus(x))/dx from s: (1 - exp(-s^2)) / (2s); 1 - exp(-u) as (1 - y) u / -log(y),
    y = exp(-u), for u < 1 (exact to rounding, Kahan's expm1); 0 where s is 0 (the limit)."""
    u = s * s
    y = tl.exp(-u)
    small = (1.0 - y) * u / tl.where(y == 1.0, 1.0, -tl.log(tl.where(y == 1.0, 0.5, y)))
    em = tl.where(u < 1.0, tl.where(y == 1.0, u, small), 1.0 - y)
    return tl.where(s == 0.0, 0.0, em / (2.0 * s))


# Routing forward. One program routes ROWS tokens held as a [ROWS, BLOCK_E] register tile.
# Bytes: reads T*E*elt (logits) + E*4 (bias); writes T*(12k + 4) (weights, ids, scores, lse).
# Work per token: group stage 2 max-reductions per group + topk_group for the kept groups, then
# top_k max-reductions over the packed int64 keys (no sort).
@triton.jit
def _moe_route_fwd_kernel(x_ptr, bias_ptr, replay_ptr, w_ptr, ids_ptr, sel_ptr, lse_ptr,
                          T, E, stride_x, top_k, n_group, topk_group, group_size, scale,
                          SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, REPLAY: tl.constexpr,
                          GROUPED: tl.constexpr, GROUP_TAKE: tl.constexpr, NORM: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
                          ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    m = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=float("-inf")).to(tl.float32)
    xnan = x != x
    if SCORE == 1:
        s = 1.0 / (1.0 + tl.exp(-x))
        lse = tl.zeros([ROWS], dtype=tl.float32)
    elif SCORE == 2:
        s = _sqrt_softplus(x)
        lse = tl.zeros([ROWS], dtype=tl.float32)
    else:
        # torch semantics: a NaN logit makes the whole row NaN
        row_nan = tl.max(xnan.to(tl.int32), axis=1) > 0
        xm = tl.where(xnan, float("-inf"), x)
        mx = tl.max(xm, axis=1)
        e = tl.exp(xm - mx[:, None])
        e = tl.where(m, e, 0.0)
        den = tl.sum(e, axis=1)
        s = e / den[:, None]
        s = tl.where(row_nan[:, None], float("nan"), s)
        lse = tl.where(row_nan, float("nan"), mx + tl.log(den))
    kcols = tl.arange(0, BLOCK_K)
    kok = kcols < top_k
    wt = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    it = tl.zeros([ROWS, BLOCK_K], dtype=tl.int32)
    if REPLAY:
        rid = tl.load(replay_ptr + rows[:, None] * top_k + kcols[None, :],
                      mask=row_ok[:, None] & kok[None, :], other=0).to(tl.int32)
        rid = tl.minimum(tl.maximum(rid, 0), E - 1)  # the op validated them; never read out of bounds
        for r in range(0, top_k):
            id_r = tl.sum(tl.where(kcols[None, :] == r, rid, 0), axis=1)
            v = tl.sum(tl.where(cols[None, :] == id_r[:, None], s, 0.0), axis=1)
            wt = tl.where(kcols[None, :] == r, v[:, None], wt)
            it = tl.where(kcols[None, :] == r, id_r[:, None], it)
    else:
        c = s
        if HAS_BIAS:
            c = s + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
        cnan = c != c
        low = _ordered_key(tl.where(cnan, 0.0, c)) * 1048576 + (1048575 - cols)[None, :]
        low = tl.where(cnan, (1048575 - cols)[None, :].to(tl.int64), low)
        tier = tl.where(cnan, 1, 3).to(tl.int64)
        if GROUPED:
            gid = cols // group_size
            gcols = tl.arange(0, BLOCK_G)
            gkeys = tl.full([ROWS, BLOCK_G], -1, dtype=tl.int64)
            for g in range(0, n_group):
                ing = m & (gid == g)[None, :]
                k1 = tl.where(ing, tier * _TIER_SHIFT + low, -1)
                b1 = tl.max(k1, axis=1)
                hit1 = k1 == b1[:, None]
                gsc = tl.sum(tl.where(hit1, c, 0.0), axis=1)
                if GROUP_TAKE == 2:
                    k2 = tl.where(hit1, -1, k1)
                    b2 = tl.max(k2, axis=1)
                    gsc += tl.sum(tl.where((k2 == b2[:, None]) & (b2[:, None] >= 0), c, 0.0), axis=1)
                gnan = gsc != gsc
                gk = tl.where(gnan, 0, _ordered_key(tl.where(gnan, 0.0, gsc)))
                gk = tl.where(gnan, 1, 2).to(tl.int64) * _TIER_SHIFT + gk * 1048576 + (1048575 - g)
                gkeys = tl.where(gcols[None, :] == g, gk[:, None], gkeys)
            gsel = tl.zeros([ROWS, BLOCK_G], dtype=tl.int32)
            for r in range(0, topk_group):
                b = tl.max(gkeys, axis=1)
                hit = gkeys == b[:, None]
                gsel = tl.where(hit, 1, gsel)
                gkeys = tl.where(hit, -1, gkeys)
            elig = tl.zeros([ROWS, BLOCK_E], dtype=tl.int32)
            for g in range(0, n_group):
                kept = tl.sum(tl.where(gcols[None, :] == g, gsel, 0), axis=1)
                elig = tl.where((gid == g)[None, :], kept[:, None], elig)
            tier = tl.where(cnan, 1, tl.where(elig > 0, 3, 2)).to(tl.int64)
        key = tl.where(m, tier * _TIER_SHIFT + low, -1)
        for r in range(0, top_k):
            b = tl.max(key, axis=1)
            hit = key == b[:, None]
            v = tl.sum(tl.where(hit, s, 0.0), axis=1)
            id_r = (1048575 - (b & 1048575)).to(tl.int32)
            key = tl.where(hit, -1, key)
            wt = tl.where(kcols[None, :] == r, v[:, None], wt)
            it = tl.where(kcols[None, :] == r, id_r[:, None], it)
    sel = wt
    if NORM:
        wt = wt / (tl.sum(wt, axis=1)[:, None] + 1e-20)
    wt = wt * scale
    ko = rows[:, None] * top_k + kcols[None, :]
    km = row_ok[:, None] & kok[None, :]
    tl.store(w_ptr + ko, wt, mask=km)
    tl.store(ids_ptr + ko, it, mask=km)
    tl.store(sel_ptr + ko, sel, mask=km)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


# Routing backward: dx[t, e] from gs = dL/ds[ids] (see the module docstring).
# Bytes: reads T*k*12 (+ T*E*elt logits and T*4 lse for softmax); writes T*E*elt.
@triton.jit
def _moe_route_bwd_kernel(gs_ptr, ids_ptr, sel_ptr, x_ptr, lse_ptr, dx_ptr, T, E, stride_x, top_k,
                          SCORE: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_E)
    m = row_ok[:, None] & (cols < E)[None, :]
    G = tl.zeros([ROWS, BLOCK_E], dtype=tl.float32)
    for j in range(0, top_k):
        g = tl.load(gs_ptr + rows * top_k + j, mask=row_ok, other=0.0)
        i = tl.load(ids_ptr + rows * top_k + j, mask=row_ok, other=-1)
        if SCORE == 1:
            sj = tl.load(sel_ptr + rows * top_k + j, mask=row_ok, other=0.0)
            g = g * sj * (1.0 - sj)
        elif SCORE == 2:
            g = g * _sqrt_softplus_grad(tl.load(sel_ptr + rows * top_k + j, mask=row_ok, other=0.0))
        G += tl.where(cols[None, :] == i[:, None], g[:, None], 0.0)
    if SCORE != 0:
        dx = G
    else:
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=float("-inf")).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        s = tl.exp(x - lse[:, None])
        s = tl.where(m, s, 0.0)
        d = tl.sum(G * s, axis=1)
        dx = s * (G - d[:, None])
    tl.store(dx_ptr + rows[:, None] * E + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)


# Permutation map, pass 1: chunk_counts[e, c] = number of the BLOCK ids of chunk c routed to e.
# Pass 1b: program (e, c) gives each id of chunk c routed to e its rank among all ids routed to
# e: the counts of the earlier chunks plus a cumsum inside the chunk (stable by token, then slot;
# no atomics); chunk 0 also writes counts[e]. Grid E x ceil(N / BLOCK), fully parallel.
# Bytes: 2 x E x N*4 read (the ids stay in L2: 1 MB at T=16384, k=8) + N*4 written.
@triton.jit
def _moe_chunk_count_kernel(ids_ptr, chunk_counts_ptr, N, n_chunks, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    c = tl.program_id(1)
    i = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(ids_ptr + i, mask=i < N, other=-1)
    cnt = tl.sum((v == e).to(tl.int32), axis=0)
    tl.store(chunk_counts_ptr + e.to(tl.int64) * n_chunks + c, cnt)


@triton.jit
def _moe_count_rank_kernel(ids_ptr, chunk_counts_ptr, rank_ptr, counts_ptr, N, n_chunks,
                           BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    e = tl.program_id(0)
    c = tl.program_id(1)
    cc = tl.arange(0, BLOCK_C)
    row = tl.load(chunk_counts_ptr + e.to(tl.int64) * n_chunks + cc, mask=cc < n_chunks, other=0)
    before = tl.sum(tl.where(cc < c, row, 0), axis=0)
    i = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(ids_ptr + i, mask=i < N, other=-1)
    hit = v == e
    rank = before + tl.cumsum(hit.to(tl.int32), axis=0) - 1
    tl.store(rank_ptr + i, rank, mask=hit)
    if c == 0:
        tl.store(counts_ptr + e + tl.arange(0, 1), tl.zeros([1], dtype=tl.int32) + tl.sum(row, axis=0))


# Pass 2: offsets = exclusive cumsum of counts rounded up to align. One program.
@triton.jit
def _moe_offsets_kernel(counts_ptr, offsets_ptr, E, align, BLOCK_E: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    c = tl.load(counts_ptr + cols, mask=cols < E, other=0)
    p = (c + align - 1) // align * align
    tl.store(offsets_ptr + 1 + cols, tl.cumsum(p, axis=0), mask=cols < E)
    tl.store(offsets_ptr + tl.arange(0, 1), tl.zeros([1], dtype=tl.int32))


# Pass 3: row = offsets[e] + rank; token_ids[row] = t. Bytes: N*(4 + 4 + 4 + 4).
@triton.jit
def _moe_rows_kernel(ids_ptr, rank_ptr, offsets_ptr, row_ptr, token_ptr, N, E, K, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    e = tl.load(ids_ptr + i, mask=ok, other=0)
    ok = ok & (e >= 0) & (e < E)
    r = tl.load(offsets_ptr + e, mask=ok, other=0) + tl.load(rank_ptr + i, mask=ok, other=0)
    tl.store(row_ptr + i, tl.where(ok, r, -1), mask=i < N)
    tl.store(token_ptr + r, (i // K).to(tl.int32), mask=ok)


# out[row(t, j)] = x[t] (* w[t, j]): program (t, h-block) reads x[t] once, writes k rows.
# Bytes: T*H*elt read + T*k*H*elt written (+ T*k*8 of map and weights).
@triton.jit
def _moe_scatter_rows_kernel(x_ptr, row_ptr, w_ptr, out_ptr, H, K, R, stride_x,
                             HAS_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hok = h < H
    kk = tl.arange(0, BLOCK_K)
    kok = kk < K
    r = tl.load(row_ptr + t * K + kk, mask=kok, other=-1).to(tl.int64)
    x = tl.load(x_ptr + t * stride_x + h, mask=hok, other=0.0)
    if HAS_W:  # fp32 product; a plain copy keeps every bit (fp64 included)
        w = tl.load(w_ptr + t * K + kk, mask=kok, other=0.0).to(tl.float32)
        v = x.to(tl.float32)[None, :] * w[:, None]
    else:
        v = tl.broadcast_to(x[None, :], (BLOCK_K, BLOCK_H))
    tl.store(out_ptr + r[:, None] * H + h[None, :], v.to(out_ptr.dtype.element_ty),
             mask=((r >= 0) & (r < R))[:, None] & hok[None, :])


# Zero the padding rows: program e clears rows [offsets[e] + counts[e], offsets[e + 1]); program E
# clears the tail [offsets[E], R). Bytes: (padding rows) * H * elt.
@triton.jit
def _moe_zero_pad_kernel(out_ptr, counts_ptr, offsets_ptr, E, R, H, BLOCK_H: tl.constexpr):
    e = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    if e < E:
        start = tl.load(offsets_ptr + e) + tl.load(counts_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
    else:
        start = tl.load(offsets_ptr + E)
        end = R
    for r in range(start, end):
        base = (tl.full([1], 0, dtype=tl.int64) + r) * H  # int64 row offset
        for h0 in range(0, H, BLOCK_H):
            tl.store(out_ptr + base + h0 + h,
                     tl.zeros([BLOCK_H], dtype=out_ptr.dtype.element_ty), mask=h0 + h < H)


# y[t] = sum_j w[t, j] * src[row(t, j)] in fp32. Bytes: T*k*H*elt read + T*H*elt written.
@triton.jit
def _moe_unpermute_kernel(src_ptr, row_ptr, w_ptr, out_ptr, H, K, R,
                            HAS_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hok = h < H
    kk = tl.arange(0, BLOCK_K)
    kok = kk < K
    r = tl.load(row_ptr + t * K + kk, mask=kok, other=-1).to(tl.int64)
    v = tl.load(src_ptr + r[:, None] * H + h[None, :], mask=((r >= 0) & (r < R))[:, None] & hok[None, :],
                other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + t * K + kk, mask=kok, other=0.0).to(tl.float32)
        v = v * w[:, None]
    tl.store(out_ptr + t * H + h, tl.sum(v, axis=0).to(out_ptr.dtype.element_ty), mask=hok)


# dw[t, j] = <gy[t], src[row(t, j)]> in fp32. Bytes: T*H*elt + T*k*H*elt read, T*k*4 written.
@triton.jit
def _moe_rows_dot_kernel(gy_ptr, src_ptr, row_ptr, out_ptr, H, K, R,
                         BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    kok = kk < K
    r = tl.load(row_ptr + t * K + kk, mask=kok, other=-1).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    hh = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hh
        hok = h < H
        g = tl.load(gy_ptr + t * H + h, mask=hok, other=0.0).to(tl.float32)
        v = tl.load(src_ptr + r[:, None] * H + h[None, :], mask=((r >= 0) & (r < R))[:, None] & hok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(v * g[None, :], axis=1)
    tl.store(out_ptr + t * K + kk, acc, mask=kok)


# ---- Triton launchers --------------------------------------------------------------------------


def _route_tiles(E: int, top_k: int, n_group: int):
    BLOCK_E = max(16, next_power_of_2(E))
    ROWS = max(1, min(16, 1024 // BLOCK_E))  # <= 8 int64 keys per thread at 4 warps: no spills
    return BLOCK_E, max(2, next_power_of_2(top_k)), max(2, next_power_of_2(n_group)), ROWS


def moe_route_fwd_triton(logits, top_k, score_func, n_group, topk_group, bias, norm, scale, replay_ids):
    T, E = logits.shape
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    dev = x.device
    w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    sel = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    if T == 0:
        return w, ids, sel, lse
    BLOCK_E, BLOCK_K, BLOCK_G, ROWS = _route_tiles(E, top_k, n_group)
    rep = replay_ids.contiguous() if replay_ids is not None else ids
    b = bias if bias is not None else w
    _moe_route_fwd_kernel[(triton.cdiv(T, ROWS),)](
        x, b, rep, w, ids, sel, lse, T, E, x.stride(0), top_k, n_group, topk_group, E // n_group,
        float(scale), SCORE=SCORE_FUNCS.index(score_func), HAS_BIAS=bias is not None,
        REPLAY=replay_ids is not None, GROUPED=n_group > 1, GROUP_TAKE=2 if (bias is not None and E // n_group >= 2) else 1,
        NORM=bool(norm), BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K, BLOCK_G=BLOCK_G, ROWS=ROWS, num_warps=4)
    return w, ids, sel, lse


def moe_route_bwd_triton(gs, ids, sel, logits, lse, num_experts, dtype, score_func):
    T, E = gs.shape[0], num_experts
    dx = torch.empty(T, E, dtype=dtype, device=gs.device)
    if T == 0:
        return dx
    if logits is None:  # sigmoid, sqrtsoftplus: the kernel never reads the logits
        x, sx = gs, 0
    else:
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        sx = x.stride(0)
    BLOCK_E, _, _, ROWS = _route_tiles(E, 1, 1)
    _moe_route_bwd_kernel[(triton.cdiv(T, ROWS),)](
        gs.contiguous(), ids.contiguous(), sel.contiguous(), x, lse, dx, T, E, sx, ids.shape[1],
        SCORE=SCORE_FUNCS.index(score_func), BLOCK_E=BLOCK_E, ROWS=ROWS, num_warps=4)
    return dx


def _permute_with(permute_map, scatter_rows):
    """moe_permute of one backend: its row map, then its row scatter."""

    def permute(hidden, ids, num_experts, align):
        counts, offsets, row_ids, token_ids = permute_map(ids, num_experts, align)
        out = scatter_rows(hidden, row_ids, token_ids, counts, offsets, None)
        return out, counts, offsets, row_ids, token_ids

    return permute


def moe_permute_map_triton(ids, num_experts, align):
    T, K = ids.shape
    N = T * K
    E = num_experts
    dev = ids.device
    flat = ids.reshape(-1).to(torch.int32).contiguous()
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    rank = torch.empty(N, dtype=torch.int32, device=dev)
    row_ids = torch.empty(N, dtype=torch.int32, device=dev)
    token_ids = torch.full((N + E * (align - 1),), -1, dtype=torch.int32, device=dev)
    BLOCK = 4096
    n_chunks = max(1, triton.cdiv(N, BLOCK))
    chunk_counts = torch.empty(E, n_chunks, dtype=torch.int32, device=dev)
    _moe_chunk_count_kernel[(E, n_chunks)](flat, chunk_counts, N, n_chunks, BLOCK=BLOCK, num_warps=8)
    _moe_count_rank_kernel[(E, n_chunks)](flat, chunk_counts, rank, counts, N, n_chunks, BLOCK=BLOCK,
                                          BLOCK_C=max(16, next_power_of_2(n_chunks)), num_warps=8)
    _moe_offsets_kernel[(1,)](counts, offsets, E, align, BLOCK_E=max(16, next_power_of_2(E)), num_warps=4)
    if N:
        _moe_rows_kernel[(triton.cdiv(N, 1024),)](flat, rank, offsets, row_ids, token_ids, N, E, K,
                                                    BLOCK=1024, num_warps=4)
    return counts, offsets, row_ids.view(T, K), token_ids


def _rows_tiles(H, K):
    BLOCK_K = max(2, next_power_of_2(K))
    BLOCK_H = max(16, min(next_power_of_2(H), 4096 // BLOCK_K, 1024))
    return BLOCK_K, BLOCK_H


def moe_scatter_rows_triton(x, row_ids, token_ids, counts, offsets, weights):
    T, H = x.shape
    K = row_ids.shape[1]
    R = token_ids.shape[0]
    out = torch.empty(R, H, dtype=x.dtype, device=x.device)
    if H == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    BLOCK_K, BLOCK_H = _rows_tiles(H, K)
    if T and K:
        w = weights.contiguous() if weights is not None else row_ids
        _moe_scatter_rows_kernel[(T, triton.cdiv(H, BLOCK_H))](
            x, row_ids.contiguous(), w, out, H, K, R, x.stride(0), HAS_W=weights is not None,
            BLOCK_K=BLOCK_K, BLOCK_H=BLOCK_H, num_warps=4)
    if R > T * K:  # padding rows exist only when align > 1
        E = counts.shape[0]
        _moe_zero_pad_kernel[(E + 1,)](out, counts, offsets, E, R, H, BLOCK_H=min(1024, max(16, next_power_of_2(H))),
                                       num_warps=4)
    return out


def moe_unpermute_triton(src, row_ids, weights):
    T, K = row_ids.shape
    H = src.shape[1]
    out = torch.empty(T, H, dtype=src.dtype, device=src.device)
    if T == 0 or H == 0:
        return out
    if K == 0:
        return out.zero_()
    BLOCK_K, BLOCK_H = _rows_tiles(H, K)
    w = weights.contiguous() if weights is not None else row_ids
    _moe_unpermute_kernel[(T, triton.cdiv(H, BLOCK_H))](
        src.contiguous(), row_ids.contiguous(), w, out, H, K, src.shape[0], HAS_W=weights is not None,
        BLOCK_K=BLOCK_K, BLOCK_H=BLOCK_H, num_warps=4)
    return out


def moe_rows_dot_triton(gy, src, row_ids):
    T, K = row_ids.shape
    H = src.shape[1]
    out = torch.zeros(T, K, dtype=torch.float32, device=gy.device)
    if T == 0 or K == 0 or H == 0:
        return out
    BLOCK_K, BLOCK_H = _rows_tiles(H, K)
    _moe_rows_dot_kernel[(T,)](gy.contiguous(), src.contiguous(), row_ids.contiguous(), out, H, K, src.shape[0],
                               BLOCK_K=BLOCK_K, BLOCK_H=BLOCK_H, num_warps=4)
    return out


# ================================================================================================
# plain-torch kernels (any device; the "torch" backend)
# ================================================================================================


def moe_route_fwd_torch(logits, top_k, score_func, n_group, topk_group, bias, norm, scale, replay_ids):
    from r1kernels.reference import moe_route_ref

    x = logits.float()
    with torch.no_grad():
        _, ids = moe_route_ref(x, top_k, score_func=score_func, n_group=n_group, topk_group=topk_group,
                               correction_bias=bias, norm_topk_prob=norm, replay_ids=replay_ids)
        if score_func == "softmax":
            lse = torch.logsumexp(x, dim=-1) if x.shape[1] else x.new_zeros(x.shape[0])
            s_sel = torch.softmax(x, dim=-1).gather(1, ids.long())  # NaN rows as torch.softmax
        elif score_func == "sigmoid":
            lse = x.new_zeros(x.shape[0])
            s_sel = torch.sigmoid(x.gather(1, ids.long()))
        else:
            lse = x.new_zeros(x.shape[0])
            s_sel = torch.nn.functional.softplus(x.gather(1, ids.long())).sqrt()
        w = s_sel / (s_sel.sum(-1, keepdim=True) + 1e-20) if norm else s_sel
        w = w * scale
    return w, ids, s_sel, lse


def moe_route_bwd_torch(gs, ids, sel, logits, lse, num_experts, dtype, score_func):
    T, E = gs.shape[0], num_experts
    idx = ids.long()
    if score_func != "softmax":
        if score_func == "sigmoid":
            g = gs * sel * (1 - sel)
        else:
            g = gs * torch.where(sel == 0, 0.0, -torch.expm1(-sel * sel) / (2 * sel))
        return torch.zeros(T, E, dtype=torch.float32, device=gs.device).scatter_add_(1, idx, g).to(dtype)
    G = torch.zeros(T, E, dtype=torch.float32, device=gs.device).scatter_add_(1, idx, gs)
    s = torch.exp(logits.float() - lse[:, None])
    return (s * (G - (G * s).sum(-1, keepdim=True))).to(logits.dtype)




def moe_permute_map_torch(ids, num_experts, align):
    T, K = ids.shape
    E = num_experts
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + align - 1) // align * align
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(padded, 0)])
    starts = torch.cumsum(counts, 0) - counts
    se = flat[order]
    rows_sorted = offsets[se] + torch.arange(flat.numel(), device=flat.device) - starts[se]
    row_ids = torch.empty_like(flat).index_put_((order,), rows_sorted)
    token_ids = torch.full((T * K + E * (align - 1),), -1, dtype=torch.long, device=flat.device)
    token_ids.index_put_((rows_sorted,), order // max(K, 1))
    return counts.int(), offsets.int(), row_ids.view(T, K).int(), token_ids.int()


def moe_scatter_rows_torch(x, row_ids, token_ids, counts, offsets, weights):
    T, H = x.shape
    R = token_ids.shape[0]
    src = x.float().unsqueeze(1).expand(T, row_ids.shape[1], H)
    if weights is not None:
        src = src * weights.float().unsqueeze(-1)
    out = torch.zeros(R, H, dtype=x.dtype, device=x.device)
    return out.index_copy_(0, row_ids.reshape(-1).long(), src.reshape(-1, H).to(x.dtype))


def moe_unpermute_torch(src, row_ids, weights):
    rows = src[row_ids.long()].float()  # [T, k, H]
    if weights is not None:
        rows = rows * weights.float().unsqueeze(-1)
    return rows.sum(1).to(src.dtype)


def moe_rows_dot_torch(gy, src, row_ids):
    rows = src[row_ids.long()].float()
    return (rows * gy.float().unsqueeze(1)).sum(-1)


# ================================================================================================
# registered ops: one signature per kernel, four namespaces (r1kernels = cuda/cpp)
# ================================================================================================


def _check_ids(name: str, ids: torch.Tensor, E: int) -> None:
    """IndexError when an expert id is outside [0, E) (one reduction; syncs on CUDA)."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids.reshape(-1))
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= E:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name}: expert ids must be in [0, {E}), got {bad}")


def _check_rows(row_ids: torch.Tensor, R: int) -> None:
    """IndexError when a row of the permutation is outside [0, R) (one reduction; syncs on CUDA,
    so skipped while a CUDA graph is captured: the kernels mask rows outside [0, R) anyway)."""
    if row_ids.numel() == 0 or (row_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = torch.aminmax(row_ids.reshape(-1))
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= R:
        raise IndexError(f"moe_unpermute: perm.row_ids must be in [0, {R}) (the rows of expert_out), "
                         f"got {lo if lo < 0 else hi}")


def _route_fake(logits, top_k, score_func, n_group, topk_group, bias, norm, scale, replay_ids):
    T = logits.shape[0]
    f = logits.new_empty(T, top_k, dtype=torch.float32)
    return f, logits.new_empty(T, top_k, dtype=torch.int32), torch.empty_like(f), logits.new_empty(T, dtype=torch.float32)


def _route_bwd_fake(gs, ids, sel, logits, lse, num_experts, dtype, score_func):
    return gs.new_empty(gs.shape[0], num_experts, dtype=dtype)


def _permute_fake(hidden, ids, num_experts, align):
    T, K = ids.shape
    R = T * K + num_experts * (align - 1)
    i32 = torch.int32
    return (hidden.new_empty(R, hidden.shape[1]), ids.new_empty(num_experts, dtype=i32),
            ids.new_empty(num_experts + 1, dtype=i32), ids.new_empty(T, K, dtype=i32), ids.new_empty(R, dtype=i32))


def _scatter_fake(x, row_ids, token_ids, counts, offsets, weights):
    return x.new_empty(token_ids.shape[0], x.shape[1])


def _unpermute_fake(src, row_ids, weights):
    return src.new_empty(row_ids.shape[0], src.shape[1])


def _dot_fake(gy, src, row_ids):
    return gy.new_empty(row_ids.shape, dtype=torch.float32)


T_ = torch.Tensor
OT = Optional[torch.Tensor]


def _checked_impls(impl: dict) -> dict:
    """The Python kernels of one backend under the registered op names, with the argument checks
    the C++ ops do (expert ids and permutation rows in range -> IndexError)."""

    def moe_route(logits, top_k, score_func, n_group, topk_group, bias, norm, scale, replay_ids):
        if replay_ids is not None:
            _check_ids("moe_route: replay_ids", replay_ids, logits.shape[1])
        return impl["route"](logits, top_k, score_func, n_group, topk_group, bias, norm, scale, replay_ids)

    def moe_route_backward(gs, ids, sel, logits, lse, num_experts, dtype, score_func):
        if score_func == "softmax" and logits is None:
            raise ValueError("moe_route_backward: softmax needs the logits")
        return impl["route_bwd"](gs, ids, sel, logits, lse, num_experts, dtype, score_func)

    def moe_permute(hidden, ids, num_experts, align):
        _check_ids("moe_permute: ids", ids, num_experts)
        return impl["permute"](hidden, ids, num_experts, align)

    def moe_unpermute(src, row_ids, weights):
        _check_rows(row_ids, src.shape[0])
        return impl["unpermute"](src, row_ids, weights)

    return dict(moe_route=moe_route, moe_route_backward=moe_route_backward, moe_permute=moe_permute,
                moe_scatter_rows=impl["scatter"], moe_unpermute=moe_unpermute, moe_rows_dot=impl["dot"])


def _define_python_ops(ns: str, fns: dict) -> None:
    """Register the checked Python kernels of one backend as custom ops torch.ops.<ns>.*, so that
    torch.compile sees each as one opaque node (eager calls skip this wrapper: `_call`)."""

    @torch.library.custom_op(f"{ns}::moe_route", mutates_args=())
    def route(logits: T_, top_k: int, score_func: str, n_group: int, topk_group: int, bias: OT,
              norm: bool, scale: float, replay_ids: OT) -> tuple[T_, T_, T_, T_]:
        return fns["moe_route"](logits, top_k, score_func, n_group, topk_group, bias, norm, scale, replay_ids)

    route.register_fake(_route_fake)

    @torch.library.custom_op(f"{ns}::moe_route_backward", mutates_args=())
    def route_bwd(gs: T_, ids: T_, sel: T_, logits: OT, lse: T_, num_experts: int, dtype: torch.dtype,
                  score_func: str) -> T_:
        return fns["moe_route_backward"](gs, ids, sel, logits, lse, num_experts, dtype, score_func)

    route_bwd.register_fake(_route_bwd_fake)

    @torch.library.custom_op(f"{ns}::moe_permute", mutates_args=())
    def permute(hidden: T_, ids: T_, num_experts: int, align: int) -> tuple[T_, T_, T_, T_, T_]:
        return fns["moe_permute"](hidden, ids, num_experts, align)

    permute.register_fake(_permute_fake)

    @torch.library.custom_op(f"{ns}::moe_scatter_rows", mutates_args=())
    def scatter(x: T_, row_ids: T_, token_ids: T_, counts: T_, offsets: T_, weights: OT) -> T_:
        return fns["moe_scatter_rows"](x, row_ids, token_ids, counts, offsets, weights)

    scatter.register_fake(_scatter_fake)

    @torch.library.custom_op(f"{ns}::moe_unpermute", mutates_args=())
    def unpermute(src: T_, row_ids: T_, weights: OT) -> T_:
        return fns["moe_unpermute"](src, row_ids, weights)

    unpermute.register_fake(_unpermute_fake)

    @torch.library.custom_op(f"{ns}::moe_rows_dot", mutates_args=())
    def dot(gy: T_, src: T_, row_ids: T_) -> T_:
        return fns["moe_rows_dot"](gy, src, row_ids)

    dot.register_fake(_dot_fake)


_PY_KERNELS = {"torch": _checked_impls(dict(
    route=moe_route_fwd_torch, route_bwd=moe_route_bwd_torch,
    permute=_permute_with(moe_permute_map_torch, moe_scatter_rows_torch),
    scatter=moe_scatter_rows_torch, unpermute=moe_unpermute_torch, dot=moe_rows_dot_torch))}
_define_python_ops("r1kernels_torch", _PY_KERNELS["torch"])
if HAS_TRITON:
    _PY_KERNELS["triton"] = _checked_impls(dict(
        route=moe_route_fwd_triton, route_bwd=moe_route_bwd_triton,
        permute=_permute_with(moe_permute_map_triton, moe_scatter_rows_triton),
        scatter=moe_scatter_rows_triton, unpermute=moe_unpermute_triton, dot=moe_rows_dot_triton))
    _define_python_ops("r1kernels_triton", _PY_KERNELS["triton"])


@torch.library.custom_op("r1kernels_torch::moe_segment_counts", mutates_args=())
def _segment_counts(ids: torch.Tensor, seg: torch.Tensor, num_segments: int, num_experts: int) -> torch.Tensor:
    """counts[b, e] = number of slots of segment b's tokens routed to e (int64)."""
    _check_ids("moe: ids", ids, num_experts)
    flat = (seg.long().unsqueeze(1) * num_experts + ids.long()).reshape(-1)
    return torch.bincount(flat, minlength=num_segments * num_experts).view(num_segments, num_experts)


@_segment_counts.register_fake
def _(ids, seg, num_segments, num_experts):
    return ids.new_empty(num_segments, num_experts, dtype=torch.int64)


@torch.compiler.assume_constant_result
def _select(op: str, device_type: str) -> str:
    """dispatch.select, evaluated once at trace time under torch.compile (the first, uncached
    selection queries the dispatcher, which dynamo cannot trace)."""
    return dispatch.select(op, device_type)


def _call(backend: str, name: str, *args):
    """Run kernel `name` of `backend`: the C++ op for cuda/cpp; for triton/torch the custom op
    while torch.compile traces, else the Python launcher directly (saves the custom-op overhead,
    tens of microseconds, on every eager call)."""
    if backend in ("cuda", "cpp"):
        return getattr(torch.ops.r1kernels, name)(*args)
    if torch.compiler.is_compiling():
        ns = torch.ops.r1kernels_triton if backend == "triton" else torch.ops.r1kernels_torch
        return getattr(ns, name)(*args)
    return _PY_KERNELS[backend][name](*args)


def _bwd_backend(backend: str) -> str:
    """Routing backward: the backend's own kernel; the torch formula when the extension lacks it."""
    if backend in ("cuda", "cpp") and not _custom_ops.has_op("moe_route_backward"):
        return "torch"
    return backend


# ================================================================================================
# autograd
# ================================================================================================


class MoERouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, replay_ids, top_k, score_func, n_group, topk_group, norm, scale, backend):
        w, ids, sel, lse = _call(backend, "moe_route", logits, top_k, score_func, n_group, topk_group,
                                 bias, norm, scale, replay_ids)
        ctx.mark_non_differentiable(ids)
        # softmax needs the logits (an input, kept by reference); sigmoid/sqrtsoftplus only [T, k]
        ctx.save_for_backward(logits if score_func == "softmax" else None, ids, sel, lse)
        ctx.args = (score_func, bool(norm), float(scale), backend, logits.shape[1], logits.dtype)
        return w, ids

    @staticmethod
    def backward(ctx, gw, _gids):
        logits, ids, sel, lse = ctx.saved_tensors
        score_func, norm, scale, backend, E, dtype = ctx.args
        gw = gw.float()
        if norm:
            S = sel.sum(-1, keepdim=True) + 1e-20
            gs = (scale / S) * (gw - (gw * sel).sum(-1, keepdim=True) / S)
        else:
            gs = gw * scale
        dx = _call(_bwd_backend(backend), "moe_route_backward", gs, ids, sel, logits, lse, E, dtype, score_func)
        return dx, None, None, None, None, None, None, None, None, None


class MoEPermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, ids, num_experts, align, backend):
        out, counts, offsets, row_ids, token_ids = _call(backend, "moe_permute", hidden, ids, num_experts, align)
        ctx.mark_non_differentiable(counts, offsets, row_ids, token_ids)
        ctx.save_for_backward(row_ids)
        ctx.backend = backend
        return out, counts, offsets, row_ids, token_ids

    @staticmethod
    def backward(ctx, g, *_):
        (row_ids,) = ctx.saved_tensors
        gh = _call(ctx.backend, "moe_unpermute", g.contiguous(), row_ids, None)
        return gh, None, None, None, None


class MoEUnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, weights, row_ids, token_ids, counts, offsets, backend):
        y = _call(backend, "moe_unpermute", expert_out, row_ids, weights)
        ctx.save_for_backward(expert_out, weights, row_ids, token_ids, counts, offsets)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, gy):
        eo, w, row_ids, token_ids, counts, offsets = ctx.saved_tensors
        gy = gy.contiguous()
        geo = gw = None
        if ctx.needs_input_grad[0]:
            geo = _call(ctx.backend, "moe_scatter_rows", gy, row_ids, token_ids, counts, offsets, w)
        if ctx.needs_input_grad[1]:
            gw = _call(ctx.backend, "moe_rows_dot", gy, eo, row_ids).to(w.dtype)
        return geo, gw, None, None, None, None, None


# ================================================================================================
# public functions
# ================================================================================================

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require_tensor(op, name, t, *, dim=None, floating=None, integer=False):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOATS:
        raise ValueError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype}")


def _kernel_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype == torch.float64 else x


def moe_route(router_logits: torch.Tensor, top_k: int, *, score_func: str = "softmax", n_group: int = 1,
              topk_group: int = 1, correction_bias: Optional[torch.Tensor] = None,
              norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
              replay_ids: Optional[torch.Tensor] = None,
              expert_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert routing of `router_logits [T, E]` -> (weights [T, k] fp32, ids [T, k] int32).

    See docs/api.md and the module docstring. Differentiable w.r.t. router_logits through the
    weights, and w.r.t. `expert_scale [E]` (which multiplies each chosen expert's weight after the
    normalization, before routed_scaling_factor). `replay_ids [T, k]` skips selection (routing
    replay; also hash routing, whose ids the caller computes). `norm_topk_prob` divides by
    the selected scores' sum + 1e-20, as DeepSeek-V3's reference code (and transformers') does:
    the same as the plain sum unless the selected scores add up to less than about 1e-13 (then
    the weights sum to less than 1 instead of dividing by almost zero). E up to 512 and top_k up
    to 32 run in the CUDA / Triton kernels (larger in torch); the C++ CPU kernels take any size.

    The routers of transformers 5.25 as moe_route calls (h: the router's input rows, W its
    weight; r1kernels.integrations.hf_moe patches these models):

    model (router class)             logits (caller)        moe_route arguments
    -------------------------------  ---------------------  ------------------------------------------
    DeepSeek-V3, V3.2                fp32 h @ W.T           score_func="sigmoid", n_group=8, topk_group=4,
      (DeepseekV3TopkRouter)                                correction_bias=e_score_correction_bias,
                                                            norm_topk_prob=True, routed_scaling_factor=2.5
    GLM-4.5/4.6 (Glm4MoeTopkRouter)  fp32 h @ W.T           as DeepSeek-V3 with the config's n_group,
                                                            topk_group, routed_scaling_factor
    Kimi-K2.5 (kimi_k25: its text    fp32 h @ W.T           as DeepSeek-V3 with n_group=1, topk_group=1,
      model is DeepSeek-V3)                                 E=384
    DeepSeek-V4 (DeepseekV4TopK-     h @ W.T                score_func="sqrtsoftplus", correction_bias=
      Router)                                               e_score_correction_bias, norm_topk_prob=True,
                                                            routed_scaling_factor=1.5 (no groups)
      hash layers (DeepseekV4Hash-   h @ W.T                score_func="sqrtsoftplus", replay_ids=
      Router, first mlp_layer_types)                        tid2eid[input_ids], norm_topk_prob=True,
                                                            routed_scaling_factor=1.5
    gpt-oss (GptOssTopKRouter)       h @ W.T + b (router    score_func="softmax", norm_topk_prob=True
                                     bias, added by caller) (softmax over the top-k logits)
    Gemma-4 (Gemma4TextRouter)       proj(rms_norm(h) *     score_func="softmax", norm_topk_prob=True,
                                     scale * H**-0.5)       expert_scale=per_expert_scale,
                                                            top_k=config.top_k_experts
    Qwen3-MoE (top-8 of 128),        h @ W.T                score_func="softmax", norm_topk_prob=
      OLMoE (top-8 of 64), Qwen2-MoE                        config.norm_topk_prob (default False)
    Qwen3-Next (512 experts, top-10) h @ W.T                score_func="softmax", norm_topk_prob=
                                                            config.norm_topk_prob (default True)
    Qwen3.5-MoE (256-512 experts,    h @ W.T                score_func="softmax", norm_topk_prob=True;
      top-8..10)                                            the shared expert (sigmoid-gated) is outside
    Mixtral (top-2 of 8)             h @ W.T                score_func="softmax", norm_topk_prob=True
    """
    op = "moe_route"
    _require_tensor(op, "router_logits", router_logits, dim=2, floating=True)
    T, E = router_logits.shape
    if not _is_int(top_k) or not 1 <= top_k <= E:
        raise ValueError(f"{op}: top_k must be an int in [1, E={E}], got {top_k!r}")
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"{op}: score_func must be 'softmax', 'sigmoid' or 'sqrtsoftplus', got {score_func!r}")
    if not _is_int(n_group) or n_group < 1 or E % n_group:
        raise ValueError(f"{op}: n_group must be a positive int dividing E={E}, got {n_group!r}")
    if not _is_int(topk_group) or not 1 <= topk_group <= n_group:
        raise ValueError(f"{op}: topk_group must be an int in [1, n_group={n_group}], got {topk_group!r}")
    if n_group > 1 and top_k > topk_group * (E // n_group):
        raise ValueError(f"{op}: top_k={top_k} exceeds the {topk_group * (E // n_group)} experts of "
                         f"the topk_group={topk_group} kept groups")
    if not isinstance(routed_scaling_factor, (int, float)) or isinstance(routed_scaling_factor, bool):
        raise ValueError(f"{op}: routed_scaling_factor must be a number, got {routed_scaling_factor!r}")
    bias = None
    if correction_bias is not None:
        _require_tensor(op, "correction_bias", correction_bias, dim=1, floating=True)
        if correction_bias.shape[0] != E or correction_bias.device != router_logits.device:
            raise ValueError(f"{op}: correction_bias must be [E={E}] on {router_logits.device}, got "
                             f"{tuple(correction_bias.shape)} on {correction_bias.device}")
        bias = correction_bias.detach().float().contiguous()
    if expert_scale is not None:
        _require_tensor(op, "expert_scale", expert_scale, dim=1, floating=True)
        if expert_scale.shape[0] != E or expert_scale.device != router_logits.device:
            raise ValueError(f"{op}: expert_scale must be [E={E}] on {router_logits.device}, got "
                             f"{tuple(expert_scale.shape)} on {expert_scale.device}")
    rep = None
    if replay_ids is not None:
        _require_tensor(op, "replay_ids", replay_ids, dim=2, integer=True)
        if tuple(replay_ids.shape) != (T, top_k) or replay_ids.device != router_logits.device:
            raise ValueError(f"{op}: replay_ids must be [T={T}, top_k={top_k}] on {router_logits.device}, "
                             f"got {tuple(replay_ids.shape)} on {replay_ids.device}")
        rep = replay_ids.detach()
        if rep.dtype not in (torch.int32, torch.int64):
            rep = rep.long()
    backend = _select(OP_ROUTE, router_logits.device.type)
    if backend in ("cuda", "triton") and (E > MAX_KERNEL_EXPERTS or top_k > MAX_KERNEL_TOPK):
        backend = "torch"  # beyond the register budget of the one-token-per-warp kernels
    if rep is not None and backend in ("cuda", "cpp") and not torch.compiler.is_compiling():
        # checked here rather than by the C++ op: on one H100 machine (torch 2.11.0+cu130) an
        # exception thrown by our C++ ops crashed the process instead of raising (BENCHMARKS.md)
        _check_ids("moe_route: replay_ids", rep, E)
    x = _kernel_dtype(router_logits)
    if x.requires_grad and torch.is_grad_enabled():
        w, ids = MoERouteFunction.apply(x, bias, rep, top_k, score_func, n_group, topk_group,
                                        bool(norm_topk_prob), float(routed_scaling_factor), backend)
    else:
        w, ids, _, _ = _call(backend, "moe_route", x, top_k, score_func, n_group, topk_group, bias,
                             bool(norm_topk_prob), float(routed_scaling_factor), rep)
    if expert_scale is not None:  # after the kernel: autograd reaches expert_scale and the logits
        w = w * expert_scale.float()[ids.long()]
    return w, ids


def moe_permute(hidden: torch.Tensor, ids: torch.Tensor, num_experts: int, *,
                align: int = 1) -> tuple[torch.Tensor, MoEPermutation]:
    """Copy each token row once per chosen expert, grouped by expert (stable; deterministic).

    Returns (permuted [T*k + E*(align-1), H] in hidden's dtype, MoEPermutation). Expert e's rows
    are permuted[offsets[e] : offsets[e] + counts[e]]; the rest of each segment is zeros.
    """
    op = "moe_permute"
    _require_tensor(op, "hidden", hidden, dim=2, floating=True)
    _require_tensor(op, "ids", ids, dim=2, integer=True)
    if ids.shape[0] != hidden.shape[0] or ids.device != hidden.device:
        raise ValueError(f"{op}: ids must be [T={hidden.shape[0]}, k] on {hidden.device}, got "
                         f"{tuple(ids.shape)} on {ids.device}")
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"{op}: num_experts must be a positive int, got {num_experts!r}")
    if not _is_int(align) or align < 1:
        raise ValueError(f"{op}: align must be a positive int, got {align!r}")
    if ids.numel() + num_experts * (align - 1) >= 2**31:
        raise ValueError(f"{op}: T*k + E*(align-1) must fit in int32, got {ids.numel() + num_experts * (align - 1)}")
    ids = ids.detach()
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.long()
    backend = _select(OP_PERMUTE, hidden.device.type)
    if backend in ("cuda", "cpp") and not torch.compiler.is_compiling():
        _check_ids("moe_permute: ids", ids, num_experts)  # see moe_route
    if hidden.requires_grad and torch.is_grad_enabled():
        out, counts, offsets, row_ids, token_ids = MoEPermuteFunction.apply(hidden, ids.detach(), num_experts,
                                                                            align, backend)
    else:
        out, counts, offsets, row_ids, token_ids = _call(backend, "moe_permute", hidden, ids.detach(), num_experts,
                                                         align)
    return out, MoEPermutation(counts, offsets, row_ids, token_ids)


def moe_unpermute(expert_out: torch.Tensor, perm: MoEPermutation, weights: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * expert_out[row(t, j)] (fp32 accumulation), in expert_out's dtype.

    IndexError when perm.row_ids holds a row outside [0, expert_out.shape[0]) (every backend).
    """
    op = "moe_unpermute"
    _require_tensor(op, "expert_out", expert_out, dim=2, floating=True)
    _require_tensor(op, "weights", weights, dim=2, floating=True)
    if not isinstance(perm, MoEPermutation):
        raise ValueError(f"{op}: perm must be the MoEPermutation returned by moe_permute, got {type(perm).__name__}")
    if expert_out.shape[0] != perm.token_ids.shape[0]:
        raise ValueError(f"{op}: expert_out must have the {perm.token_ids.shape[0]} rows of the permutation, "
                         f"got {expert_out.shape[0]}")
    if tuple(weights.shape) != tuple(perm.row_ids.shape):
        raise ValueError(f"{op}: weights must be [T, k]={tuple(perm.row_ids.shape)}, got {tuple(weights.shape)}")
    if expert_out.device != perm.row_ids.device or weights.device != perm.row_ids.device:
        raise ValueError(f"{op}: expert_out, weights and perm must be on one device")
    backend = _select(OP_UNPERMUTE, expert_out.device.type)
    if backend in ("cuda", "cpp") and not torch.compiler.is_compiling():
        _check_rows(perm.row_ids, expert_out.shape[0])  # see moe_route (the Python kernels check their own)
    eo = _kernel_dtype(expert_out)
    if (eo.requires_grad or weights.requires_grad) and torch.is_grad_enabled():
        y = MoEUnpermuteFunction.apply(eo, weights, perm.row_ids, perm.token_ids, perm.counts, perm.offsets,
                                       backend)
    else:
        y = _call(backend, "moe_unpermute", eo, perm.row_ids, weights)
    return y.to(expert_out.dtype)


def moe_expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 [E]: how many (token, slot) pairs chose each expert. IndexError for ids outside [0, E)."""
    _require_tensor("moe_expert_counts", "ids", ids, integer=True)
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"moe_expert_counts: num_experts must be a positive int, got {num_experts!r}")
    flat = ids.detach().reshape(-1, 1)
    seg = torch.zeros(flat.shape[0], dtype=torch.int32, device=ids.device)
    return torch.ops.r1kernels_torch.moe_segment_counts(flat, seg, 1, num_experts)[0].to(torch.int32)


@torch.no_grad()
def moe_update_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean(counts) - counts), in place."""
    _require_tensor("moe_update_bias", "bias", bias, dim=1, floating=True)
    if bias.shape[0] > 1 and bias.stride(0) == 0:
        raise ValueError("moe_update_bias: bias is updated in place and must own one element per expert, "
                         "got an expanded (stride-0) tensor")
    _require_tensor("moe_update_bias", "counts", counts, dim=1)
    if counts.shape != bias.shape or counts.device != bias.device:
        raise ValueError(f"moe_update_bias: counts must be [E={bias.shape[0]}] on {bias.device}, got "
                         f"{tuple(counts.shape)} on {counts.device}")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        raise ValueError(f"moe_update_bias: rate must be a number, got {rate!r}")
    c = counts.to(torch.float64)
    bias.add_(torch.sign(c.mean() - c).to(bias.dtype), alpha=rate)
    return bias


def moe_sequence_aux_loss(scores: torch.Tensor, ids: torch.Tensor,
                          seq_len: Union[int, Sequence[int], torch.Tensor], top_k: int,
                          alpha: float) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences (differentiable in scores).

    scores [T, E] are the affinities s (sigmoid or softmax outputs), ids [T, top_k] the selected
    experts. seq_len: tokens per sequence (T a multiple of it), or the lengths of packed sequences.
    """
    op = "moe_sequence_aux_loss"
    _require_tensor(op, "scores", scores, dim=2, floating=True)
    _require_tensor(op, "ids", ids, dim=2, integer=True)
    T, E = scores.shape
    if not _is_int(top_k) or top_k < 1 or tuple(ids.shape) != (T, top_k):
        raise ValueError(f"{op}: ids must be [T={T}, top_k={top_k}], got {tuple(ids.shape)}")
    if ids.device != scores.device:
        raise ValueError(f"{op}: ids must be on {scores.device}, got {ids.device}")
    s = scores if scores.dtype == torch.float64 else scores.float()
    p = s / s.sum(-1, keepdim=True)
    if _is_int(seq_len):
        if seq_len < 1 or T % seq_len:
            raise ValueError(f"{op}: seq_len must be a positive int dividing T={T}, got {seq_len}")
        B = T // seq_len
        P = p.view(B, seq_len, E).mean(1)
        seg = torch.arange(T, device=s.device) // seq_len
        lens = torch.full((B,), seq_len, dtype=s.dtype, device=s.device)
    else:
        if isinstance(seq_len, torch.Tensor):
            lens_t = seq_len.to(s.device)
        elif isinstance(seq_len, Sequence) and all(_is_int(n) for n in seq_len):
            lens_t = torch.tensor(list(seq_len), dtype=torch.long, device=s.device)  # ([] too)
        else:
            lens_t = None
        if lens_t is None or lens_t.dim() != 1 or lens_t.is_floating_point() \
                or lens_t.dtype == torch.bool or int(lens_t.sum()) != T or bool((lens_t < 1).any()):
            raise ValueError(f"{op}: seq_len must be an int or positive integer lengths summing to "
                             f"T={T}, got {seq_len!r}")
        B = lens_t.shape[0]
        seg = torch.repeat_interleave(torch.arange(B, device=s.device), lens_t)
        lens = lens_t.to(s.dtype)
        P = torch.zeros(B, E, dtype=s.dtype, device=s.device).index_add(0, seg, p) / lens[:, None]
    counts = torch.ops.r1kernels_torch.moe_segment_counts(ids.detach(), seg.to(torch.int32), B, E)
    f = counts.to(s.dtype) * (E / top_k) / lens[:, None]
    return alpha * (f * P).sum(-1).sum() / max(B, 1)  # (no sequence: 0, not the NaN of a mean)
