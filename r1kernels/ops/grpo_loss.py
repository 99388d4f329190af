"""GRPO policy loss on given per-token log-probabilities (TRL 1.16 `GRPOTrainer._compute_loss`).

Per token, with lp = logps, A = advantage, m = mask (see docs/api.md for the full contract):

    w      = lp - old                        (token level)
           = sum_t((lp - old) m) / max(n_b, 1)  broadcast over the row (sequence level, GSPO)
    c1     = exp(w)
    grpo, bnpo, dr_grpo, dapo, luspo:
        c2 = clamp(c1, 1 - eps_lo, 1 + eps_hi);  c1' = min(c1, delta) if delta else c1
        l  = -min(c1' A, c2 A)
    cispo:  l = -sg(min(c1, eps_hi)) A lp
    sapo:   l = -sigmoid(tau (c1 - 1)) 4 / tau A,   tau = tau_pos if A > 0 else tau_neg
    l *= rollout_is_weights                                     (if given)
    l += beta (exp(ref - lp) - (ref - lp) - 1) [* c1]           (if beta != 0; [*c1]: bias corr.)

and the loss is sum_{b,t} scale_b l m with a per-row scale (1 / (B max(n_b, 1)) for grpo and sapo,
1 / max(sum m, 1) for bnpo, 1 / (B L) for dr_grpo, 1 / max(N, 1) for dapo and cispo, 1 / B for luspo).

Everything is linear in that scale, so the forward kernel computes, in one pass over each row,
the unscaled per-token gradient g = dl/dlp m (written once, fp32) and per-row partial sums
(sum l m, n_b, sum kl m and the clip counts). The last of its programs to finish (a ticket
counter) reduces the partials in a fixed order (deterministic, no float atomics) into the loss,
the metrics and the per-row scale: one launch for the whole forward. The backward pass is an
elementwise product, dlogps = g * scale_b * grad_output (torch ops). At B=512, T=8192 the kernels
take tens of microseconds on an H100; an eager call's cost is mostly host time (Python, autograd,
launches), which is why the forward is one launch and the backward has no Triton launch.

Derivatives (autograd of the torch formula, ties included):
    d(-min(t1, t2))/dc1 = -A (w1 [c1 <= delta] + (1 - w1) [1-eps_lo <= c1 <= 1+eps_hi]),
        t1 = c1' A, t2 = c2 A, w1 = 1 if t1 < t2, 1/2 if t1 == t2 (torch.minimum splits), else 0
    sapo: dl/dc1 = -4 A s (1 - s), s = sigmoid(tau (c1 - 1));  cispo: dl/dlp = -min(c1, eps_hi) A
    kl:   d kl0/dlp = 1 - exp(ref - lp); with bias correction d(kl0 c1) = c1 dkl0 + kl0 dc1
    token level:    dc1/dlp_t = c1
    sequence level: dc1/dlp_t = c1 m_t / max(n_b, 1), so the row needs sum_t m_t dl_t/dc1 (S_b)
                    before its gradient can be written: a second pass over the row (L2-resident).

Backends: Triton (CUDA, or CPU under TRITON_INTERPRET=1); C++ CPU kernels with the same
contract and formulas (csrc/grpo_loss/grpo_loss_cpu.cpp; the default on CPU); and a vectorized
torch path with the same analytic gradient (any device; compiles with
torch.compile(fullgraph=True)).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from r1kernels import dispatch
from r1kernels.ops._triton import HAS_TRITON, next_power_of_2, tl, triton

OP = "grpo_loss"
LOSS_TYPES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3, "luspo": 4, "cispo": 5, "sapo": 6}
IS_LEVELS = {"token": 0, "sequence": 1}
METRIC_NAMES = ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio")
NUM_PARTIALS = 6  # per row: sum l m, n, sum kl m, low, high, region
dispatch.register(OP, cuda=("triton", "torch"), cpu=("cpp", "torch"),
                  ext_ops=("grpo_loss_partials", "grpo_loss_finalize"))


class GRPOLossOutput(NamedTuple):
    """`loss`: scalar with grad; `metrics`: dict of detached scalar tensors."""

    loss: torch.Tensor
    metrics: dict


class _Config(NamedTuple):
    loss: int  # LOSS_TYPES value
    seq: bool  # sequence-level importance sampling
    eps_lo: float
    eps_hi: float
    delta: float | None
    beta: float
    bias_kl: bool
    tau_pos: float
    tau_neg: float
    max_len: float  # dr_grpo's L


# ---- Triton kernels ---------------------------------------------------------------------------


@triton.jit
def _grpo_token_terms(lp, old, ref, A, rw, c1, eps_lo, eps_hi, delta, beta, tau_pos, tau_neg,
                      LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_RW: tl.constexpr,
                      BETA_NZ: tl.constexpr, BIAS_KL: tl.constexpr, SEQ: tl.constexpr):
    """Per-token loss l, its derivative split as dl/dlp = g_dir + g_c1 * dc1/dlp, k3 kl and the
    low/high clip flags. All fp32."""
    zero = tl.zeros_like(lp)
    if LOSS == 5:  # cispo: -sg(min(c1, eps_hi)) A lp
        cl = tl.minimum(c1, eps_hi)
        pol = -cl * A * lp
        g_dir = -cl * A
        g_c1 = zero
        low = zero != zero
        high = (c1 > eps_hi) & (A > 0)
    elif LOSS == 6:  # sapo: soft gate
        tau = tl.where(A > 0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (c1 - 1.0))
        pol = -s * 4.0 / tau * A
        g_dir = zero
        g_c1 = -4.0 * A * s * (1.0 - s)
        low = zero != zero
        high = zero != zero
    else:  # clipped surrogate
        lo = 1.0 - eps_lo
        hi = 1.0 + eps_hi
        c2 = tl.minimum(tl.maximum(c1, lo), hi)
        if HAS_DELTA:
            c1d = tl.minimum(c1, delta)
            d1 = tl.where(c1 <= delta, 1.0, 0.0)
        else:
            c1d = c1
            d1 = zero + 1.0
        t1 = c1d * A
        t2 = c2 * A
        pol = -tl.minimum(t1, t2)
        w1 = tl.where(t1 < t2, 1.0, tl.where(t1 == t2, 0.5, 0.0))
        d2 = tl.where((c1 >= lo) & (c1 <= hi), 1.0, 0.0)
        g_dir = zero
        g_c1 = -A * (w1 * d1 + (1.0 - w1) * d2)
        # TRL's clip metrics use coef_1 after the delta clamp
        low = (c1d < lo) & (A < 0)
        high = (c1d > hi) & (A > 0)
    if HAS_RW:
        pol = pol * rw
        g_dir = g_dir * rw
        g_c1 = g_c1 * rw
    kl = zero
    if BETA_NZ:
        d = ref - lp
        ed = tl.exp(d)
        kl0 = ed - d - 1.0
        dkl0 = 1.0 - ed
        if BIAS_KL:
            kl = kl0 * c1
            if SEQ:
                g_dir = g_dir + beta * dkl0 * c1
                g_c1 = g_c1 + beta * kl0
            else:
                # token level (dc1/dlp = c1): d(c1 kl0)/dlp = c1 (kl0 + 1 - ed) = -c1 d exactly;
                # the two terms summed apart cancel (each ~beta e^d, far above their sum, when
                # the policy is far below the reference)
                g_dir = g_dir - beta * d * c1
        else:
            kl = kl0
            g_dir = g_dir + beta * dkl0
        pol = pol + beta * kl
    return pol, g_dir, g_c1, kl, low, high


@triton.jit
def _grpo_load_row_block(lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rw_ptr, row, t, ok,
                         s_lp0, s_lp1, s_old0, s_old1, s_ref0, s_ref1, s_adv0, s_adv1,
                         s_m0, s_m1, s_rw0, s_rw1,
                         HAS_OLD: tl.constexpr, HAS_RW: tl.constexpr, BETA_NZ: tl.constexpr):
    lp = tl.load(lp_ptr + row * s_lp0 + t * s_lp1, mask=ok, other=0.0).to(tl.float32)
    if HAS_OLD:
        old = tl.load(old_ptr + row * s_old0 + t * s_old1, mask=ok, other=0.0).to(tl.float32)
    else:
        old = lp  # on-policy: old = sg(lp)
    if BETA_NZ:
        ref = tl.load(ref_ptr + row * s_ref0 + t * s_ref1, mask=ok, other=0.0).to(tl.float32)
    else:
        ref = lp
    A = tl.load(adv_ptr + row * s_adv0 + t * s_adv1, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + row * s_m0 + t * s_m1, mask=ok, other=0).to(tl.float32)
    if HAS_RW:
        rw = tl.load(rw_ptr + row * s_rw0 + t * s_rw1, mask=ok, other=0.0).to(tl.float32)
    else:
        rw = lp
    return lp, old, ref, A, m, rw


# Forward: program (row, chunk) loops over its CHUNK_T tokens of the row in BLOCK_T tiles (token
# level splits each row into C chunks so that B * C programs fill the GPU; sequence level needs the
# whole row in one program: C = 1) and writes its partial sums to part[6, C, B]. Token level reads each input once
# (lp 2-4 B, old 4 B, ref 4 B if beta, A 4 B or 0 (per-row advantage, broadcast), mask 1 B,
# rollout weights 4 B if given) and writes g once (4 B): at B=512, T=8192, 13 B/token in + 4 out
# = 71 MB, ~21 us at 3.35 TB/s. Sequence level reads the row three times (the 2nd and 3rd from L2).
@triton.jit
def _grpo_loss_fwd_kernel(lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rw_ptr, grad_ptr, part_ptr,
                          B, T, C, CHUNK_T, s_lp0, s_lp1, s_old0, s_old1, s_ref0, s_ref1, s_adv0, s_adv1,
                          s_m0, s_m1, s_rw0, s_rw1,
                          eps_lo, eps_hi, delta, beta, tau_pos, tau_neg,
                          ticket_ptr, nitems_ptr, out_ptr, scale_ptr, max_len,
                          LOSS: tl.constexpr, SEQ: tl.constexpr, HAS_OLD: tl.constexpr,
                          HAS_DELTA: tl.constexpr, HAS_RW: tl.constexpr, BETA_NZ: tl.constexpr,
                          BIAS_KL: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
                          FINALIZE: tl.constexpr, HAS_NITEMS: tl.constexpr, BLOCK_B: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    t_lo = chunk * CHUNK_T
    t_hi = tl.minimum(T, t_lo + CHUNK_T)
    cols = tl.arange(0, BLOCK_T)
    c1_row = 1.0
    n_row = 0.0
    if SEQ:
        # pass 1: the row's mean log-ratio
        acc_lr = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
        for start in range(t_lo, t_hi, BLOCK_T):
            t = start + cols
            ok = t < t_hi
            lp, old, ref, A, m, rw = _grpo_load_row_block(
                lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rw_ptr, row, t, ok, s_lp0, s_lp1,
                s_old0, s_old1, s_ref0, s_ref1, s_adv0, s_adv1, s_m0, s_m1, s_rw0, s_rw1,
                HAS_OLD, False, False)
            on = m != 0.0
            acc_lr += tl.where(on, (lp - old) * m, 0.0)
            acc_n += m
        n_row = tl.sum(acc_n, axis=0)
        c1_row = tl.exp(tl.sum(acc_lr, axis=0) / tl.maximum(n_row, 1.0))
    # pass 2: loss, metrics, (token level) gradient
    a_l = tl.zeros([BLOCK_T], dtype=tl.float32)
    a_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    a_kl = tl.zeros([BLOCK_T], dtype=tl.float32)
    a_lo = tl.zeros([BLOCK_T], dtype=tl.float32)
    a_hi = tl.zeros([BLOCK_T], dtype=tl.float32)
    a_rg = tl.zeros([BLOCK_T], dtype=tl.float32)
    a_s = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(t_lo, t_hi, BLOCK_T):
        t = start + cols
        ok = t < t_hi
        lp, old, ref, A, m, rw = _grpo_load_row_block(
            lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rw_ptr, row, t, ok, s_lp0, s_lp1,
            s_old0, s_old1, s_ref0, s_ref1, s_adv0, s_adv1, s_m0, s_m1, s_rw0, s_rw1,
            HAS_OLD, HAS_RW, BETA_NZ)
        if SEQ:
            c1 = tl.zeros_like(lp) + c1_row
        else:
            c1 = tl.exp(lp - old)
        pol, g_dir, g_c1, kl, low, high = _grpo_token_terms(
            lp, old, ref, A, rw, c1, eps_lo, eps_hi, delta, beta, tau_pos, tau_neg,
            LOSS, HAS_DELTA, HAS_RW, BETA_NZ, BIAS_KL, SEQ)
        on = m != 0.0
        a_l += tl.where(on, pol * m, 0.0)
        a_n += m
        a_kl += tl.where(on, kl * m, 0.0)
        a_lo += tl.where(on & low, m, 0.0)
        a_hi += tl.where(on & high, m, 0.0)
        a_rg += tl.where(on & (low | high), m, 0.0)
        if SEQ:
            a_s += tl.where(on, g_c1 * m, 0.0)
        else:
            if WRITE_GRAD:
                # (g_c1 == 0 where c1 overflowed to inf on a clipped token: 0, not 0 * inf)
                g = tl.where(on, (g_dir + tl.where(g_c1 != 0.0, g_c1 * c1, 0.0)) * m, 0.0)
                tl.store(grad_ptr + row * T + t, g, mask=ok)
    if SEQ:
        if WRITE_GRAD:
            # pass 3: direct terms + the sequence-ratio term sum_t'(m dl/dc1) c1 m_t / n
            s_sum = tl.sum(a_s, axis=0)
            s_row = tl.where(s_sum != 0.0, s_sum * c1_row, 0.0) / tl.maximum(n_row, 1.0)
            for start in range(t_lo, t_hi, BLOCK_T):
                t = start + cols
                ok = t < t_hi
                lp, old, ref, A, m, rw = _grpo_load_row_block(
                    lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rw_ptr, row, t, ok, s_lp0, s_lp1,
                    s_old0, s_old1, s_ref0, s_ref1, s_adv0, s_adv1, s_m0, s_m1, s_rw0, s_rw1,
                    HAS_OLD, HAS_RW, BETA_NZ)
                c1 = tl.zeros_like(lp) + c1_row
                pol, g_dir, g_c1, kl, low, high = _grpo_token_terms(
                    lp, old, ref, A, rw, c1, eps_lo, eps_hi, delta, beta, tau_pos, tau_neg,
                    LOSS, HAS_DELTA, HAS_RW, BETA_NZ, BIAS_KL, SEQ)
                g = tl.where(m != 0.0, (g_dir + s_row) * m, 0.0)
                tl.store(grad_ptr + row * T + t, g, mask=ok)
    CB = C * B
    pp = part_ptr + chunk * B + row
    tl.store(pp, tl.sum(a_l, axis=0))
    tl.store(pp + CB, tl.sum(a_n, axis=0))
    tl.store(pp + 2 * CB, tl.sum(a_kl, axis=0))
    tl.store(pp + 3 * CB, tl.sum(a_lo, axis=0))
    tl.store(pp + 4 * CB, tl.sum(a_hi, axis=0))
    tl.store(pp + 5 * CB, tl.sum(a_rg, axis=0))
    if FINALIZE:
        # the last program to finish reduces every program's partials (the finalize below, same
        # fixed order: deterministic). The ticket counter is zero on entry (a fresh workspace per
        # call). All of this program's stores happen before its ticket (barrier, then a release
        # at GPU scope); the last one's acquire makes the other programs' partials visible to
        # it, and it reads them from L2 (.cg).
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == CB - 1:
            _grpo_finalize(part_ptr, nitems_ptr, out_ptr, scale_ptr, B, C, max_len, LOSS,
                           HAS_NITEMS, BLOCK_B, ".cg")


# Finalize: one program reduces the [6, C, B] partials (24 B per row and chunk) in a fixed order
# (chunks of a row in order, then rows) into out = [loss, kl, clip_low, clip_high, clip_ratio]
# and the per-row gradient scale [B]: deterministic, no float atomics. Run by the last program of
# the forward kernel (FINALIZE) or as a kernel of its own (GRPOLoss combines chunks' partials).
@triton.jit
def _grpo_finalize(part_ptr, nitems_ptr, out_ptr, scale_ptr, B, C, max_len, LOSS: tl.constexpr,
                   HAS_NITEMS: tl.constexpr, BLOCK_B: tl.constexpr, CACHE: tl.constexpr):
    offs = tl.arange(0, BLOCK_B)
    s_l = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_lr = tl.zeros([BLOCK_B], dtype=tl.float32)  # sum_b l_b / max(n_b, 1)
    s_n = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_kl = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_lo = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_hi = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_rg = tl.zeros([BLOCK_B], dtype=tl.float32)
    CB = C * B
    for start in range(0, B, BLOCK_B):
        b = start + offs
        ok = b < B
        lsum = tl.zeros([BLOCK_B], dtype=tl.float32)
        n = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c in range(0, C):
            pc = part_ptr + c * B + b
            lsum += tl.load(pc, mask=ok, other=0.0, cache_modifier=CACHE)
            n += tl.load(pc + CB, mask=ok, other=0.0, cache_modifier=CACHE)
            s_kl += tl.load(pc + 2 * CB, mask=ok, other=0.0, cache_modifier=CACHE)
            s_lo += tl.load(pc + 3 * CB, mask=ok, other=0.0, cache_modifier=CACHE)
            s_hi += tl.load(pc + 4 * CB, mask=ok, other=0.0, cache_modifier=CACHE)
            s_rg += tl.load(pc + 5 * CB, mask=ok, other=0.0, cache_modifier=CACHE)
        s_l += lsum
        s_lr += lsum / tl.maximum(n, 1.0)
        s_n += n
    n_tot = tl.sum(s_n, axis=0)
    fb = B * 1.0  # (B may arrive as a constexpr 1: Triton specializes ints equal to 1)
    if LOSS == 0 or LOSS == 6:  # grpo, sapo: mean over rows of the row means
        loss = tl.sum(s_lr, axis=0) / fb
        inv = 1.0 / fb  # times 1 / max(n_b, 1) per row
    elif LOSS == 1:  # bnpo
        inv = 1.0 / tl.maximum(n_tot, 1.0)
        loss = tl.sum(s_l, axis=0) * inv
    elif LOSS == 2:  # dr_grpo
        inv = 1.0 / tl.maximum(fb * max_len, 1.0)
        loss = tl.sum(s_l, axis=0) * inv
    elif LOSS == 4:  # luspo
        inv = 1.0 / fb
        loss = tl.sum(s_l, axis=0) * inv
    else:  # dapo, cispo
        if HAS_NITEMS:
            n_items = tl.load(nitems_ptr).to(tl.float32)
        else:
            n_items = n_tot
        inv = 1.0 / tl.maximum(n_items, 1.0)
        loss = tl.sum(s_l, axis=0) * inv
    m_inv = 1.0 / tl.maximum(n_tot, 1.0)
    tl.store(out_ptr + 0, loss)
    tl.store(out_ptr + 1, tl.sum(s_kl, axis=0) * m_inv)
    tl.store(out_ptr + 2, tl.sum(s_lo, axis=0) * m_inv)
    tl.store(out_ptr + 3, tl.sum(s_hi, axis=0) * m_inv)
    tl.store(out_ptr + 4, tl.sum(s_rg, axis=0) * m_inv)
    for start in range(0, B, BLOCK_B):
        b = start + offs
        ok = b < B
        if LOSS == 0 or LOSS == 6:
            n = tl.zeros([BLOCK_B], dtype=tl.float32)
            for c in range(0, C):
                n += tl.load(part_ptr + CB + c * B + b, mask=ok, other=0.0, cache_modifier=CACHE)
            sc = inv / tl.maximum(n, 1.0)
        else:
            sc = tl.zeros([BLOCK_B], dtype=tl.float32) + inv
        tl.store(scale_ptr + b, sc, mask=ok)


@triton.jit
def _grpo_loss_finalize_kernel(part_ptr, nitems_ptr, out_ptr, scale_ptr, B, C, max_len,
                               LOSS: tl.constexpr, HAS_NITEMS: tl.constexpr, BLOCK_B: tl.constexpr):
    _grpo_finalize(part_ptr, nitems_ptr, out_ptr, scale_ptr, B, C, max_len, LOSS, HAS_NITEMS,
                   BLOCK_B, "")


def _block_t(T: int) -> int:
    return max(16, min(1024, next_power_of_2(T)))


def _row_chunks(B: int, T: int, block_t: int, split: bool = True) -> tuple[int, int]:
    """(C, CHUNK_T): each row split into C chunks of CHUNK_T tokens (a multiple of the tile), so
    that B * C programs give every SM several to run (a few long rows would otherwise leave most
    of the GPU idle). `split=False` (sequence level) keeps whole rows."""
    if not split or T <= block_t:
        return 1, max(T, 1)
    tiles = -(-T // block_t)
    c = min(tiles, max(1, -(-_PROGRAMS_WANTED // max(B, 1))))
    chunk = -(-tiles // c) * block_t
    return -(-T // chunk), chunk


_PROGRAMS_WANTED = 2048  # ~16 four-warp programs per SM on a 132-SM H100


def _mask_view(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _launch_fwd(logps, adv, mask, old, ref, rw, cfg: _Config, write_grad: bool, grad, part,
                C: int, chunk_t: int, final=None):
    """One launch of the forward kernel; final = (ticket, nitems, out, scale) also reduces the
    partials in the same launch (the last program to finish does it)."""
    B, T = logps.shape
    m = _mask_view(mask)
    dummy = logps
    old_t = old if old is not None else dummy
    ref_t = ref if ref is not None else dummy
    rw_t = rw if rw is not None else dummy
    if final is None:
        ticket = nitems = out = scale = part
        has_nitems = False
    else:
        ticket, nitems, out, scale = final
        has_nitems = nitems is not None
        nitems = nitems if has_nitems else part
    _grpo_loss_fwd_kernel[(B, C)](
        logps, old_t, ref_t, adv, m, rw_t, grad, part, B, T, C, chunk_t,
        logps.stride(0), logps.stride(1), old_t.stride(0), old_t.stride(1),
        ref_t.stride(0), ref_t.stride(1), adv.stride(0), adv.stride(1),
        m.stride(0), m.stride(1), rw_t.stride(0), rw_t.stride(1),
        float(cfg.eps_lo), float(cfg.eps_hi), float(cfg.delta if cfg.delta is not None else 0.0),
        float(cfg.beta), float(cfg.tau_pos), float(cfg.tau_neg),
        ticket, nitems, out, scale, float(cfg.max_len),
        LOSS=cfg.loss, SEQ=cfg.seq, HAS_OLD=old is not None, HAS_DELTA=cfg.delta is not None,
        HAS_RW=rw is not None, BETA_NZ=cfg.beta != 0.0, BIAS_KL=cfg.bias_kl,
        WRITE_GRAD=write_grad, BLOCK_T=_block_t(T), FINALIZE=final is not None,
        HAS_NITEMS=has_nitems, BLOCK_B=_block_b(B, 256), num_warps=4)


def _block_b(B: int, most: int = 1024) -> int:
    """Rows per step of the finalize loop (256 at most inside the forward kernel: its registers
    count for every program of the launch)."""
    return max(16, min(most, next_power_of_2(B)))


def grpo_loss_fwd_triton(logps, adv, mask, old, ref, rw, cfg: _Config, write_grad: bool = True,
                         part: torch.Tensor | None = None, split: bool = False):
    """Launcher: [B, T] inputs (any strides; adv may have stride 0) -> (g [B, T] fp32 unscaled
    gradient, partials [6, C, B] fp32, written into `part` when given). C = 1 unless `split`
    (token level only): then rows are split into chunks, C of them (`row_chunks`)."""
    B, T = logps.shape
    dev = logps.device
    C, chunk_t = _row_chunks(B, T, _block_t(T), split and not cfg.seq)
    grad = torch.empty((B, T) if write_grad else (0,), device=dev, dtype=torch.float32)
    if part is None:
        part = torch.empty((NUM_PARTIALS, C, B), device=dev, dtype=torch.float32)
    if B > 0:
        _launch_fwd(logps, adv, mask, old, ref, rw, cfg, write_grad, grad, part, C, chunk_t)
    return grad, part


def grpo_loss_triton(logps, adv, mask, old, ref, rw, nitems, cfg: _Config, write_grad: bool):
    """The whole forward in one launch: (g [B, T] fp32 unscaled, out [5], scale [B]). The
    partials, the outputs and the ticket counter share one zero-initialized workspace (two
    allocations and a fill in all: host time is most of this op's cost on a GPU)."""
    B, T = logps.shape
    dev = logps.device
    C, chunk_t = _row_chunks(B, T, _block_t(T), not cfg.seq)
    n_part = NUM_PARTIALS * C * B
    ws = torch.zeros(n_part + 5 + B + 1, device=dev, dtype=torch.float32)
    grad = torch.empty((B, T) if write_grad else (0,), device=dev, dtype=torch.float32)
    out, scale = ws[n_part:n_part + 5], ws[n_part + 5:n_part + 5 + B]
    if B > 0:
        _launch_fwd(logps, adv, mask, old, ref, rw, cfg, write_grad, grad,
                    ws[:n_part].view(NUM_PARTIALS, C, B), C, chunk_t,
                    final=(ws[-1:].view(torch.int32), nitems, out, scale))
    return grad, out, scale


def grpo_loss_finalize_triton(part, nitems, cfg: _Config, out=None, scale=None):
    """Launcher: partials [6, B] or [6, C, B] -> (out [5] = loss and the 4 metrics, scale [B]);
    into the given buffers when passed."""
    B = part.shape[-1]
    C = part.shape[1] if part.dim() == 3 else 1
    if out is None:
        out = torch.empty(5, device=part.device, dtype=torch.float32)
    if scale is None:
        scale = torch.empty(B, device=part.device, dtype=torch.float32)
    if B == 0:
        return out.zero_(), scale
    n_t = nitems if nitems is not None else part
    _grpo_loss_finalize_kernel[(1,)](part, n_t, out, scale, B, C, float(cfg.max_len), LOSS=cfg.loss,
                                     HAS_NITEMS=nitems is not None, BLOCK_B=_block_b(B),
                                     num_warps=4)
    return out, scale


# ---- torch path: the same analytic forward/gradient, vectorized -------------------------------


def grpo_loss_fwd_torch(logps, adv, mask, old, ref, rw, cfg: _Config, write_grad: bool = True):
    m = mask.float()
    on = m != 0
    # masked positions may hold garbage (-inf, NaN): zero the inputs there once, then every
    # intermediate is finite and a final multiplication by m gives exact zeros
    lp = torch.where(on, logps.float(), 0.0)
    A = adv.float()
    lr = None if old is None else lp - torch.where(on, old.float(), 0.0)
    n = m.sum(-1)
    c1_row = None
    if cfg.seq:
        c1_row = torch.exp((lr * m).sum(-1) / n.clamp(min=1.0)) if lr is not None else torch.ones_like(n)
        c1 = c1_row.unsqueeze(-1).expand_as(lp)
    else:
        c1 = torch.exp(lr) if lr is not None else torch.ones_like(lp)
    g_dir = g_c1 = None  # None: identically zero
    low = high = None
    if cfg.loss == 5:
        cl = torch.clamp(c1, max=cfg.eps_hi)
        g_dir = -cl * A
        pol = g_dir * lp
        high = (c1 > cfg.eps_hi) & (A > 0)
    elif cfg.loss == 6:
        tau = torch.where(A > 0, cfg.tau_pos, cfg.tau_neg)
        s = torch.sigmoid(tau * (c1 - 1.0))
        pol = s * (-4.0 * A / tau)
        g_c1 = (-4.0 * A) * s * (1.0 - s)
    else:
        lo, hi = 1.0 - cfg.eps_lo, 1.0 + cfg.eps_hi
        c2 = torch.clamp(c1, lo, hi)
        c1d = c1 if cfg.delta is None else torch.clamp(c1, max=cfg.delta)
        t1, t2 = c1d * A, c2 * A
        pol = -torch.minimum(t1, t2)
        w1 = torch.where(t1 < t2, 1.0, torch.where(t1 == t2, 0.5, 0.0))
        d1 = 1.0 if cfg.delta is None else (c1 <= cfg.delta).float()
        d2 = ((c1 >= lo) & (c1 <= hi)).float()
        g_c1 = -A * (w1 * d1 + (1.0 - w1) * d2)
        low = (c1d < lo) & (A < 0)
        high = (c1d > hi) & (A > 0)
    if rw is not None:
        r = torch.where(on, rw.float(), 0.0)
        pol = pol * r
        g_dir = None if g_dir is None else g_dir * r
        g_c1 = None if g_c1 is None else g_c1 * r
    kl = None
    if cfg.beta != 0.0:
        d = torch.where(on, ref.float(), 0.0) - lp
        ed = torch.exp(d)
        kl = ed - d - 1.0
        dkl = cfg.beta * (1.0 - ed)
        if cfg.bias_kl:
            if cfg.seq:
                g_c1 = cfg.beta * kl if g_c1 is None else g_c1 + cfg.beta * kl
                dkl = dkl * c1
            else:  # token level: d(c1 kl)/dlp = -c1 d exactly (see _grpo_token_terms)
                dkl = -cfg.beta * d * c1
            kl = kl * c1
        g_dir = dkl if g_dir is None else g_dir + dkl
        pol = pol + cfg.beta * kl
    zero_rows = torch.zeros_like(n)
    flag_sum = lambda f: zero_rows if f is None else (f * m).sum(-1)  # noqa: E731
    region = low if high is None else (high if low is None else low | high)
    part = torch.stack([(pol * m).sum(-1), n, flag_sum(kl), flag_sum(low), flag_sum(high),
                        flag_sum(region)])
    if not write_grad:
        return lp.new_empty(0), part
    g = torch.zeros_like(lp) if g_dir is None else g_dir
    if cfg.seq:
        if g_c1 is not None:
            s_sum = (g_c1 * m).sum(-1)
            s_row = _mul_nz(s_sum, c1_row) / n.clamp(min=1.0)
            g = g + s_row.unsqueeze(-1)
    elif g_c1 is not None:
        g = g + _mul_nz(g_c1, c1)
    return g * m, part


def _mul_nz(a: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """a * c1, and 0 where a is 0: a clipped token (or a saturated sapo gate, cispo) has
    dl/dc1 = 0, and its gradient must stay 0 when c1 = exp(log-ratio) overflowed to inf."""
    return torch.where(a != 0, a * c1, torch.zeros((), dtype=a.dtype, device=a.device))


def row_scale(n: torch.Tensor, nitems, cfg: _Config) -> torch.Tensor:
    """Per-row gradient scale [B] from the per-row mask sums `n` [B] (fp32): the loss is
    sum_b scale_b sum_t l m. Known before any log-prob is (the fused GRPOLoss uses it up front)."""
    B = n.shape[0]
    fb = float(max(B, 1))
    if cfg.loss in (0, 6):
        return (n.clamp(min=1.0) * fb).reciprocal()  # (one launch less than 1.0 / x)
    if cfg.loss == 1:
        denom = n.sum().clamp(min=1.0)
    elif cfg.loss == 2:
        denom = torch.full_like(n.sum(), max(B * cfg.max_len, 1.0))
    elif cfg.loss == 4:
        denom = torch.full_like(n.sum(), fb)
    else:
        denom = (n.sum() if nitems is None else nitems.reshape(()).float()).clamp(min=1.0)
    return denom.reciprocal().expand(B).contiguous()


def grpo_loss_finalize_torch(part, nitems, cfg: _Config):
    n_tot = part[1].sum()
    scale = row_scale(part[1], nitems, cfg)
    loss = (part[0] * scale).sum()
    m_inv = 1.0 / n_tot.clamp(min=1.0)
    out = torch.stack([loss, part[2].sum() * m_inv, part[3].sum() * m_inv, part[4].sum() * m_inv,
                       part[5].sum() * m_inv])
    return out, scale


def grpo_loss_bwd(grad, scale, gout, dtype):
    """dlogps = g * scale_b * grad_output in the log-probs' dtype: two elementwise torch ops for
    every backend (an ATen launch costs less host time than a Triton launch)."""
    s = (scale * gout.float()).unsqueeze(-1)
    if dtype == torch.float32 or torch.compiler.is_compiling():
        return (grad * s).to(dtype)
    return torch.mul(grad, s, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


def grpo_loss_fwd_cpp(logps, adv, mask, old, ref, rw, cfg: _Config, write_grad: bool = True):
    """(g [B, T] fp32 unscaled, partials [6, B]) by the C++ CPU kernel."""
    return torch.ops.r1kernels.grpo_loss_partials(
        logps, adv, _mask_view(mask), old, ref if cfg.beta != 0.0 else None, rw, cfg.loss, cfg.seq,
        cfg.eps_lo, cfg.eps_hi, cfg.delta, cfg.beta, cfg.bias_kl, cfg.tau_pos, cfg.tau_neg,
        bool(write_grad))


def grpo_loss_finalize_cpp(part, nitems, cfg: _Config):
    return torch.ops.r1kernels.grpo_loss_finalize(part, nitems, cfg.loss, cfg.max_len)


_IMPLS = {
    "triton": (grpo_loss_fwd_triton, grpo_loss_finalize_triton),
    "cpp": (grpo_loss_fwd_cpp, grpo_loss_finalize_cpp),
    "torch": (grpo_loss_fwd_torch, grpo_loss_finalize_torch),
}


def forward_impl(backend: str):
    """(fwd, finalize) of a backend; used by GRPOLoss (r1kernels.nn) chunk by chunk. Triton's
    through its custom ops when torch.compile traces them (a raw launch does not trace)."""
    if backend == "triton" and torch.compiler.is_compiling():
        return _grpo_loss_fwd_compiled, _grpo_loss_finalize_compiled
    return _IMPLS[backend if backend in _IMPLS else "torch"]


# The Triton launcher as a custom op, so torch.compile sees one opaque node for the forward (the
# backward is two torch ops, traced as they are).
if HAS_TRITON:

    @torch.library.custom_op("r1kernels_triton::grpo_loss_fwd", mutates_args=())
    def _grpo_loss_fwd_op(logps: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                          old: torch.Tensor | None, ref: torch.Tensor | None, rw: torch.Tensor | None,
                          nitems: torch.Tensor | None, loss: int, seq: bool, eps_lo: float,
                          eps_hi: float, delta: float | None, beta: float, bias_kl: bool,
                          tau_pos: float, tau_neg: float, max_len: float,
                          write_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = _Config(loss, seq, eps_lo, eps_hi, delta, beta, bias_kl, tau_pos, tau_neg, max_len)
        grad, out, scale = grpo_loss_triton(logps, adv, mask, old, ref, rw, nitems, cfg, write_grad)
        return grad, out.clone(), scale.clone()  # custom-op outputs may not alias each other

    @_grpo_loss_fwd_op.register_fake
    def _(logps, adv, mask, old, ref, rw, nitems, loss, seq, eps_lo, eps_hi, delta, beta, bias_kl,
          tau_pos, tau_neg, max_len, write_grad):
        B, T = logps.shape
        grad = logps.new_empty((B, T) if write_grad else (0,), dtype=torch.float32)
        return grad, logps.new_empty(5, dtype=torch.float32), logps.new_empty(B, dtype=torch.float32)

    # GRPOLoss's steps (forward_impl): the partials of a chunk of rows (C = 1: whole rows), and
    # their reduction
    @torch.library.custom_op("r1kernels_triton::grpo_loss_partials", mutates_args=())
    def _grpo_loss_partials_op(logps: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                               old: torch.Tensor | None, ref: torch.Tensor | None,
                               rw: torch.Tensor | None, loss: int, seq: bool, eps_lo: float,
                               eps_hi: float, delta: float | None, beta: float, bias_kl: bool,
                               tau_pos: float, tau_neg: float, max_len: float,
                               write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = _Config(loss, seq, eps_lo, eps_hi, delta, beta, bias_kl, tau_pos, tau_neg, max_len)
        return grpo_loss_fwd_triton(logps, adv, mask, old, ref, rw, cfg, write_grad)

    @_grpo_loss_partials_op.register_fake
    def _(logps, adv, mask, old, ref, rw, loss, seq, eps_lo, eps_hi, delta, beta, bias_kl,
          tau_pos, tau_neg, max_len, write_grad):
        B, T = logps.shape
        grad = logps.new_empty((B, T) if write_grad else (0,), dtype=torch.float32)
        return grad, logps.new_empty((NUM_PARTIALS, 1, B), dtype=torch.float32)

    @torch.library.custom_op("r1kernels_triton::grpo_loss_finalize", mutates_args=())
    def _grpo_loss_finalize_op(part: torch.Tensor, nitems: torch.Tensor | None, loss: int,
                               max_len: float) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = _Config(loss, False, 0.0, 0.0, None, 0.0, False, 1.0, 1.0, max_len)
        return grpo_loss_finalize_triton(part, nitems, cfg)

    @_grpo_loss_finalize_op.register_fake
    def _(part, nitems, loss, max_len):
        return part.new_empty(5), part.new_empty(part.shape[-1])


def _grpo_loss_fwd_compiled(logps, adv, mask, old, ref, rw, cfg: _Config, write_grad: bool = True):
    return _grpo_loss_partials_op(logps, adv, mask, old, ref, rw, *cfg, write_grad)


def _grpo_loss_finalize_compiled(part, nitems, cfg: _Config):
    return _grpo_loss_finalize_op(part, nitems, cfg.loss, cfg.max_len)


def _fwd_finalize(backend, logps, adv, mask, old, ref, rw, nitems, cfg: _Config, write_grad: bool):
    """(g [B, T] fp32 unscaled, out [5], scale [B]) with the chosen backend."""
    if backend == "triton":
        if torch.compiler.is_compiling():  # one opaque node for the compiler
            return _grpo_loss_fwd_op(logps, adv, mask, old, ref, rw, nitems, *cfg, write_grad)
        # eager: the launcher directly (the custom-op wrapper costs host time per call)
        return grpo_loss_triton(logps, adv, mask, old, ref, rw, nitems, cfg, write_grad)
    fwd, fin = _IMPLS[backend]
    grad, part = fwd(logps, adv, mask, old, ref, rw, cfg, write_grad)
    out, scale = fin(part, nitems, cfg)
    return grad, out, scale


# ---- autograd ---------------------------------------------------------------------------------


class GRPOLossFunction(torch.autograd.Function):
    """(loss, out[5] = loss and metrics, detached) from [B, T] log-probs. The gradient is
    computed in the forward pass; backward only scales it by the row scale and grad_output."""

    @staticmethod
    def forward(ctx, logps, adv, mask, old, ref, rw, nitems, cfg, backend, write_grad):
        grad, out, scale = _fwd_finalize(backend, logps, adv, mask, old, ref, rw, nitems, cfg,
                                         write_grad)
        ctx.lp_dtype = logps.dtype
        ctx.save_for_backward(grad, scale)
        ctx.mark_non_differentiable(out)
        return out[0].clone(), out

    @staticmethod
    def backward(ctx, gloss, _gout):
        grad, scale = ctx.saved_tensors
        dlp = None
        if ctx.needs_input_grad[0]:
            dlp = grpo_loss_bwd(grad, scale, gloss, ctx.lp_dtype)
        return dlp, None, None, None, None, None, None, None, None, None


# ---- validation and public function -----------------------------------------------------------


def _check_number(name, value, *, low=None, allow_none=False, positive=False):
    if value is None and allow_none:
        return
    # (comparisons, not math.isfinite: Dynamo with dynamic=True traces float options as
    # symbolic floats, on which it cannot call math.isfinite; NaN fails both comparisons)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not -math.inf < value < math.inf:
        raise ValueError(f"grpo_loss: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"grpo_loss: {name} must be > 0, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"grpo_loss: {name} must be >= {low}, got {value!r}")


def make_config(**kw) -> _Config:
    """Validate the scalar options (ValueError naming the argument) and pack them. Cached: host
    time matters, the whole loss is tens of microseconds on a GPU."""
    try:
        return _make_config_cached(**kw)
    except TypeError:  # an unhashable argument: validate uncached (raises ValueError)
        return _make_config(**kw)


def _make_config(*, loss_type, epsilon_low, epsilon_high, delta, beta, importance_sampling_level,
                use_bias_correction_kl, max_completion_length, sapo_temperature_pos,
                sapo_temperature_neg, T: int, where: str = "grpo_loss") -> _Config:
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"{where}: loss_type must be one of {tuple(LOSS_TYPES)}, got {loss_type!r}")
    if not isinstance(importance_sampling_level, str) or importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"{where}: importance_sampling_level must be 'token' or 'sequence', got "
                         f"{importance_sampling_level!r}")
    _check_number("epsilon_low", epsilon_low, low=0.0)
    _check_number("epsilon_high", epsilon_high, low=0.0, allow_none=True)
    _check_number("delta", delta, allow_none=True, positive=True)
    _check_number("beta", beta, low=0.0)
    _check_number("sapo_temperature_pos", sapo_temperature_pos, positive=True)
    _check_number("sapo_temperature_neg", sapo_temperature_neg, positive=True)
    if max_completion_length is not None and (isinstance(max_completion_length, bool)
                                              or not isinstance(max_completion_length, int)
                                              or max_completion_length < 1):
        raise ValueError(f"{where}: max_completion_length must be a positive int or None, got "
                         f"{max_completion_length!r}")
    if not isinstance(use_bias_correction_kl, bool):
        raise ValueError(f"{where}: use_bias_correction_kl must be a bool, got {use_bias_correction_kl!r}")
    eps_hi = epsilon_low if epsilon_high is None else epsilon_high
    return _Config(loss=LOSS_TYPES[loss_type], seq=importance_sampling_level == "sequence",
                   eps_lo=float(epsilon_low), eps_hi=float(eps_hi),
                   delta=None if delta is None else float(delta), beta=float(beta),
                   bias_kl=bool(use_bias_correction_kl), tau_pos=float(sapo_temperature_pos),
                   tau_neg=float(sapo_temperature_neg),
                   max_len=float(T if max_completion_length is None else max_completion_length))


# typed: True and 1, 4 and 4.0 are different keys (one is a valid option, the other not)
_make_config_cached = functools.lru_cache(maxsize=256, typed=True)(_make_config)


def check_inputs(logps, advantages, mask, old_logps, ref_logps, rollout_is_weights,
                 num_items_in_batch, beta, where: str = "grpo_loss"):
    """Validate the tensors; returns (adv [B, T] view, mask, nitems tensor or None)."""
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError(f"{where}: logps must be a 2-D floating tensor [B, T], got "
                         f"{getattr(logps, 'shape', type(logps).__name__)} "
                         f"{getattr(logps, 'dtype', '')}")
    B, T = logps.shape
    dev = logps.device
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"{where}: mask must have shape {(B, T)} like logps, got "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    if mask.is_complex():
        raise ValueError(f"{where}: mask must be bool or 0/1 numbers, got {mask.dtype}")
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"{where}: advantages must be a tensor [B] or [B, T], got "
                         f"{type(advantages).__name__}")
    if tuple(advantages.shape) == (B,):
        adv = advantages.unsqueeze(1).expand(B, T)
    elif tuple(advantages.shape) in ((B, 1), (B, T)):
        adv = advantages.expand(B, T)
    else:
        raise ValueError(f"{where}: advantages must have shape {(B,)} or {(B, T)}, got "
                         f"{tuple(advantages.shape)}")
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps),
                    ("rollout_is_weights", rollout_is_weights)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, T) or not x.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating tensor of shape {(B, T)}, got "
                             f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', '')}")
    for name, x in (("advantages", advantages), ("mask", mask), ("old_logps", old_logps),
                    ("ref_logps", ref_logps), ("rollout_is_weights", rollout_is_weights)):
        if x is not None and x.device != dev:
            raise ValueError(f"{where}: {name} is on {x.device} but logps is on {dev}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"{where}: beta={beta} needs ref_logps (the reference model's log-probs)")
    nitems = None
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"{where}: num_items_in_batch must be a scalar, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
            nitems = num_items_in_batch.reshape(1).to(device=dev, dtype=torch.float32)
        elif isinstance(num_items_in_batch, (int, float)) and not isinstance(num_items_in_batch, bool) \
                and num_items_in_batch >= 0:
            nitems = torch.full((1,), float(num_items_in_batch), device=dev, dtype=torch.float32)
        else:
            raise ValueError(f"{where}: num_items_in_batch must be a number >= 0 or a scalar "
                             f"tensor, got {num_items_in_batch!r}")
    return adv, mask, nitems


def metrics_dict(out: torch.Tensor) -> dict:
    return {name: out[i + 1] for i, name in enumerate(METRIC_NAMES)}


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
              loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: float | None = None,
              delta: float | None = None, beta: float = 0.0, importance_sampling_level: str = "token",
              use_bias_correction_kl: bool = False, rollout_is_weights: torch.Tensor | None = None,
              max_completion_length: int | None = None, num_items_in_batch=None,
              sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05) -> GRPOLossOutput:
    """The GRPO loss of TRL 1.16 on per-token log-probs `logps [B, T]`; see docs/api.md.

    Returns GRPOLossOutput(loss, metrics) with metrics kl, clip_ratio_low, clip_ratio_high,
    clip_ratio (detached scalars). Gradients flow to `logps` only (old/ref log-probs, advantages
    and rollout weights are data).
    """
    adv, mask, nitems = check_inputs(logps, advantages, mask, old_logps, ref_logps,
                                     rollout_is_weights, num_items_in_batch, beta)
    cfg = make_config(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                      delta=delta, beta=beta, importance_sampling_level=importance_sampling_level,
                      use_bias_correction_kl=use_bias_correction_kl,
                      max_completion_length=max_completion_length,
                      sapo_temperature_pos=sapo_temperature_pos,
                      sapo_temperature_neg=sapo_temperature_neg, T=logps.shape[1])
    backend = dispatch.select(OP, logps.device)
    ref = ref_logps if cfg.beta != 0.0 else None
    write_grad = torch.is_grad_enabled() and logps.requires_grad
    loss, out = GRPOLossFunction.apply(logps, adv, mask, old_logps, ref, rollout_is_weights,
                                       nitems, cfg, backend, write_grad)
    return GRPOLossOutput(loss, metrics_dict(out))
