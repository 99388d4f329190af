"""Per-token log-probabilities (and entropy) from hidden states and the lm_head weight, without
ever holding the [N, V] logits.

    logits = hidden @ weight.T + bias,   logp / entropy as in ops/token_logprobs.py
(heads that transform their logits, softcap= and logit_scale=, too: each logits tile goes
through the same kernels, with the head's constants inv_temp and cap of
token_logprobs.head_constants)

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
FLOPs: 8 * N * H * V (pass 1: one GEMM, pass 2: three). The single sweep below (6 * N * H * V,
only where dL/dlogp is known per chunk of rows) has to keep grad_weight in fp32 across row chunks
(4 bytes * V * H: 2.3 GiB for a 151936 x 4096 head) or round its running sum to bf16 once per
chunk; vocabulary-outer order gives each grad_weight tile one fp32 reduction over all rows with
bounded memory instead.
Extra memory: the Z tile (<= TILE_ELEMS * 4 bytes; G is written over it in place) + [tile, H] fp32
+ the gradients (grad_hidden accumulated in fp32) + O(N) floats: independent of N apart from the
gradients themselves.
On CUDA, TILE_ELEMS = 5 * 2**25: a 640 MiB fp32 tile (N=16384 -> 10240 vocabulary columns per
tile; the H100 runs in BENCHMARKS.md used 2**26, 4096 columns).
Opt-in (FUSED_GEMM = True, Triton backend): tl.dot kernels that compute the logits tile and apply
the statistics / gradient in their epilogue, so no fp32 logits tile goes through memory (below).
Measured on an H100 at N=16384, H=4096, V=151936 (BENCHMARKS.md): forward 103.6 ms against
34.8 ms with cuBLAS tiles, forward+backward 211.5 ms against 132.5 ms, so it stays off.

Internal entry point for the fused GRPO loss (_notes/INTERFACE_logprobs_loss.md):
`linear_token_logprobs_with_grad(..., sweep="auto" | "one" | "two")`, where dL/dlogp comes from a
`grad_fn` of the log-probs instead of autograd, so it can run in either order:
  sweep="two": pass 1, grad_fn once with (0, N), pass 2 (above): 8 * N * H * V FLOPs.
  sweep="one" (single sweep, rows outer): per chunk of R rows (whole groups of chunk_multiple
    rows, e.g. whole sequences, or the given chunk_bounds), the full-vocabulary fp32 logits
    Z [R, V] (fp32 accumulation;
    one GEMM over the whole vocabulary, or per vocabulary tile where 16-bit operands need fp32
    copies, i.e. off CUDA), the statistics (logp, entropy, lse) of the chunk,
    grad_fn(start, end, ...) for that chunk, G = dL/dZ written over Z (or, with SWEEP_GROUP_ROWS,
    into a G buffer that collects several chunks before the GEMMs below run on all of them; on
    sm_90 with the cluster kernel (R1K_FUSED_CLUSTER), the statistics, dL/dlogp and G of a chunk
    come from one kernel that reads Z once: token_logprobs.cluster_chunk), then
      grad_hidden[rows] = G @ W          (fp32 accumulation, rounded once)
      grad_weight      += G.T @ h_rows   (see precision below)
      grad_bias        += sum_rows G     (fp32)
    FLOPs: 6 * N * H * V (three GEMMs, the logits are computed once).
    Extra memory: the chunk buffer R * V * 4 bytes with R = TILE_ELEMS // V, rounded down to
    whole 128-row GEMM tiles when chunk_multiple is 1, else to a multiple of chunk_multiple (at
    least chunk_multiple: a sequence longer than the budget gets a buffer of
    chunk_multiple * V * 4 bytes, which depends on T but not on N), an fp32 [R, H] product, the
    gradients and O(N) floats. Each chunk reads the whole weight in two GEMMs (its bytes against
    4 * R * H * V FLOPs: compute-bound from R ~ 512 on an H100) and rounds grad_weight's running
    sum once (read and written whole: 2.3 GB per chunk for a 151936 x 4096 bf16 head), so R
    should be large. On CUDA, 640 MiB: R = 1024 at V = 151936 (GRPOLoss with token-level
    importance sampling and linear_token_logprobs_fwd_bwd chunk rows, not sequences, so any
    sequence length gets R), so at N = 16384, H = 4096 bf16 the extra memory is by arithmetic
    594 MiB + grad_weight 1.16 GiB + grad_hidden 128 MiB + O(R * H) (the 2.5 GiB target;
    tests/test_grpo_loss_module.py checks it on a GPU).
    grad_weight precision: accumulated in an fp32 [V, H] buffer when weight is fp32 or when that
    buffer fits SINGLE_SWEEP_FP32_ACC_BYTES (1 GiB: e.g. V=32000, H=4096 but not Qwen2.5-7B's
    151936 x 3584 head, 2.0 GiB); otherwise in the weight-dtype gradient itself with cuBLAS-style
    addmm (product accumulated in fp32, added to the running sum in fp32, rounded to
    bf16/fp16 once per row chunk). That costs one rounding (unit roundoff u = 2**-8 for bf16,
    2**-11 for fp16) of the running sum per chunk: after K = ceil(N / R) chunks the error of an
    element is at most K * u * max_k |running sum_k| (random-walk typical: sqrt(K) * u; at
    N=16384, V=151936 on CUDA K = 16) instead of
    one rounding, u * |grad|, in the two-sweep order (tests/test_linear_token_logprobs.py checks
    the bound). GEMMs: cuBLAS (FUSED_GEMM does not apply to this mode).
  sweep="auto" (default): "one" when a chunk of chunk_multiple rows fits
    SINGLE_SWEEP_MAX_CHUNK_ELEMS_* fp32 logits (CUDA: 2**28, 1 GiB, i.e. groups of up to 1766
    rows at V = 151936; always for chunk_multiple = 1), else "two" (memory bounded by
    TILE_ELEMS for any sequence length).
grad_fn(start, end, logp_chunk, entropy_chunk) -> dlogp_chunk may thus be called once per chunk
of rows, in row order, each [start, end) made of whole groups of chunk_multiple rows (the last
one may be shorter when N is not a multiple of chunk_multiple).
The public `linear_token_logprobs` (dL/dlogp known only in backward) always uses two sweeps.
Rows labelled ignore_index (`labelled_rows`) are gathered out before any of this, in
`linear_token_logprobs` (a differentiable gather, so autograd saves the gathered [N', H] rows)
and `linear_token_logprobs_fwd_bwd`: their outputs are 0 and their gradient rows 0 by
definition, so the GEMMs cover only the N' labelled rows (an SFT batch's prompt tokens, -100,
cost nothing).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from r1kernels import dispatch
from r1kernels.ops import token_logprobs as tlp
from r1kernels.ops._triton import tl, triton
from r1kernels.ops.token_logprobs import _head, _tanh_sech2

OP = "linear_token_logprobs"
dispatch.register(OP, cuda=("triton", "torch"), cpu=("cpp", "torch"), ext_ops=tlp.CPP_OPS)

# fp32 logits elements per tile, and per single-sweep chunk (module attributes, read at call
# time; tests shrink them). CUDA: 640 MiB, i.e. 1024 rows of V = 151936 per single-sweep chunk
# (each chunk reads the whole weight in two GEMMs and rounds grad_weight's running sum once:
# larger chunks do both fewer times) and 10240 columns per two-sweep tile at N = 16384 (each
# vocabulary tile reads and writes the fp32 grad_hidden accumulator once)
TILE_ELEMS_CUDA = 5 << 25
# CPU: 128 MiB, i.e. 220 rows of V = 151936 per single-sweep chunk. Each chunk streams the whole
# weight through three GEMMs, so the chunk must be tall enough for the GEMMs' arithmetic to hide
# that read. GRPOLoss on hidden states at N = 512, H = 512, V = 151936, one thread, in CPU
# seconds: 8 MiB chunks (13 rows) 6.93, 1.9x eager's 3.66; 64 MiB 3.66; 128 MiB 3.18 at a
# 427 MiB peak (eager: 890 MiB); 256 MiB 3.18 at 522 MiB (CPU time, as benchmarks/cpu_hidden.py).
TILE_ELEMS_CPU = 1 << 25
MAX_TILE_ROWS = 16384
# single sweep (linear_token_logprobs_with_grad): fp32 grad_weight accumulator limit, and the
# largest chunk of whole sequences (fp32 logits elements) for which sweep="auto" picks it
SINGLE_SWEEP_FP32_ACC_BYTES = 1 << 30
SINGLE_SWEEP_MAX_CHUNK_ELEMS_CUDA = 1 << 28
SINGLE_SWEEP_MAX_CHUNK_ELEMS_CPU = 1 << 23
# G groups (opt-in; on the H100, 2026-11-23, 512-row chunks in 2048-row groups gave GRPOLoss
# 90.2 ms at 2.25 GiB against 89.7 ms at 1.98 GiB for the 1024-row default): None, or the rows
# of a separate G buffer [rows, V] in the GEMM dtype that collects the G of several consecutive
# chunks before the grad_hidden and grad_weight GEMMs run on all of them at once. grad_weight's bf16
# read-modify-write (2.3 GB per GEMM at V=151936, H=4096) then happens once per group, and its
# GEMM has K = group rows, while the fp32 logits chunk stays small: e.g. 512-row chunks in
# 2048-row groups hold 297 MiB of fp32 logits + 594 MiB of G (against 594 MiB for 1024-row
# chunks with G written over them, and 1.16 GiB for 2048-row chunks). Taken where the GEMMs
# cover the whole vocabulary at once (CUDA, or fp32 weights) and the chunk kernels write G
# anywhere (triton, cpp backends). Env R1K_SWEEP_GROUP_ROWS (0: off) overrides it.
SWEEP_GROUP_ROWS: int | None = None


def tile_shape(n_rows: int, vocab: int, hidden: int, device: torch.device) -> tuple[int, int]:
    """(rows, columns) of a logits tile: rows as many as fit (<= MAX_TILE_ROWS), columns the rest
    of the budget, a multiple of 128 when the vocabulary is split. The budget also bounds the
    fp32 copies of the operand slices ([rows, H] and [columns, H]) made where 16-bit GEMMs
    cannot output fp32 (CPU)."""
    budget = TILE_ELEMS_CUDA if device.type == "cuda" else TILE_ELEMS_CPU
    rows = max(1, min(n_rows, MAX_TILE_ROWS, budget // max(hidden, 1)))
    cols = max(1, min(vocab, budget // max(rows, hidden, 1)))
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


_ADDMM_OUT_DTYPE_OK = True  # cleared if this torch build rejects addmm(..., out_dtype, out=self)


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> None:
    """acc (fp32) = beta * acc + a @ b, accumulated in fp32; beta = 0 ignores acc's contents
    (uninitialized memory included: the GEMM does not read it)."""
    global _ADDMM_OUT_DTYPE_OK
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
    elif a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        if _ADDMM_OUT_DTYPE_OK:
            try:  # cuBLAS: C = A @ B + beta C with 16-bit A, B and fp32 C, no temporary
                torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
                return
            except RuntimeError:
                _ADDMM_OUT_DTYPE_OK = False
        if beta == 0:
            acc.copy_(torch.mm(a, b, out_dtype=torch.float32))
        else:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float(), beta=beta)


# ---- opt-in fused Triton GEMMs (FUSED_GEMM = True) -------------------------------------------
# The default CUDA path writes each fp32 logits tile to memory (cuBLAS) and reads it back in the
# statistics / gradient kernels: 8 bytes per logit and pass, ~40 GB over both passes at N=16384,
# V=151936. These kernels compute the logits tile with tl.dot (fp32 accumulators, wgmma on sm_90)
# and apply the statistics / gradient in the epilogue, so pass 1 writes only per-row partial
# statistics and pass 2 writes only the 16-bit gradient tile (2 bytes per logit). Opt-in until
# measured against cuBLAS on a GPU (benchmarks/bench_linear_token_logprobs.py, r1k-triton-fused).
FUSED_GEMM = False
FUSED_BLOCKS = dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3)  # no spills on sm_90


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_hn, stride_hk,
                 stride_wv, stride_wk, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The raw logits h[rows] @ w[cols].T + b[cols] as an fp32 [BM, BN] tile (callers apply the
    head and mask the columns outside cols).

    IEEE: exact fp32 products (fp32 inputs without TF32; also set under the interpreter, where
    16-bit operands are upcast first: Triton 3.6's interpreter multiplies bf16 bit patterns as
    integers in tl.dot)."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    ks = tl.arange(0, BK)
    for k0 in range(0, H, BK):
        k = k0 + ks
        k_ok = k < H
        a = tl.load(h_ptr + rows[:, None] * stride_hn + k[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wv + k[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


# Pass 1: program (row block, vocabulary split) -> partial (m, s, t, w) of its rows over its
# vocabulary range, written to part[split, 4, N]. FLOPs 2 * BM * BN * H per tile; bytes: the
# operands (mostly from L2) and 16 bytes per row and split.
@triton.jit
def _linear_logprobs_fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr, N, V, H, stride_hn,
                                stride_hk, stride_wv, stride_wk, v_per_split, inv_temp, cap,
                                HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr,
                                HEAD: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                                BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < N
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BM], dtype=tl.float32)
    t = tl.zeros([BM], dtype=tl.float32)
    w = tl.zeros([BM], dtype=tl.float32)
    v_begin = split * v_per_split
    v_end = tl.minimum(V, v_begin + v_per_split)
    for v0 in range(v_begin, v_end, BN):
        cols = v0 + tl.arange(0, BN)
        col_ok = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_hn,
                         stride_hk, stride_wv, stride_wk, HAS_BIAS, IEEE, BM, BN, BK)
        z = tl.where(col_ok[None, :], _head(z, col_ok[None, :], inv_temp, cap, HEAD),
                     float("-inf"))
        t += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref[:, None])
        if ENTROPY:
            w = alpha * (w + s * tl.where(s > 0.0, m - m_ref, 0.0))
            w += tl.sum(e * tl.where(e > 0.0, z - m_ref[:, None], 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    base = part_ptr + split.to(tl.int64) * 4 * N + rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + N, s, mask=row_ok)
    tl.store(base + 2 * N, t, mask=row_ok)
    tl.store(base + 3 * N, w, mask=row_ok)


# Pass 2: program (row block, column block of the vocabulary tile [col0, col0 + c)) -> the
# gradient tile G = dL/dz in g's dtype (formula of ops/token_logprobs.py). Bytes written: c * N
# * itemsize per vocabulary tile; the GEMMs with G stay on cuBLAS.
@triton.jit
def _linear_logprobs_grad_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, dlogp_ptr,
                                 dent_ptr, g_ptr, stride_g, N, c, col0, H, stride_hn, stride_hk,
                                 stride_wv, stride_wk, inv_temp, cap, ignore_index,
                                 HAS_BIAS: tl.constexpr, HAS_DENT: tl.constexpr,
                                 HEAD: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                                 BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < N
    local = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = local < c
    cols = col0 + local
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_hn, stride_hk,
                     stride_wv, stride_wk, HAS_BIAS, IEEE, BM, BN, BK)
    if HEAD == 2:
        th, dhead = _tanh_sech2(z * cap)
        z = tl.where(col_ok[None, :], th * inv_temp, float("-inf"))
    else:
        z = tl.where(col_ok[None, :], z * inv_temp, float("-inf"))
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    ignored = label == ignore_index
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    dlogp = tl.where(ignored, 0.0, tl.load(dlogp_ptr + rows, mask=row_ok, other=0.0))
    logp_v = z - lse[:, None]
    p = tl.exp(logp_v)
    g = tl.where(cols[None, :] == label[:, None], dlogp[:, None], 0.0) - dlogp[:, None] * p
    if HAS_DENT:
        dent = tl.where(ignored, 0.0, tl.load(dent_ptr + rows, mask=row_ok, other=0.0))
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g -= dent[:, None] * p * tl.where(p > 0.0, logp_v + ent[:, None], 0.0)
    g = g * inv_temp
    if HEAD == 2:
        g = g * (cap * dhead)
    g = tl.where(ignored[:, None], 0.0, g)
    tl.store(g_ptr + rows[:, None] * stride_g + local[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _ieee(x: torch.Tensor) -> bool:
    """fp32 inputs: exact fp32 products unless the user allowed TF32 (and always in the
    interpreter, see _logits_tile)."""
    if dispatch.TRITON_INTERPRET and not x.is_cuda:
        return True
    return x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def fused_forward_stats(h, w, b, y, inv_temp: float, entropy: bool, cap: float = 0.0):
    """Partial statistics of pass 1 in one launch: [splits, 4, N] fp32 (m, s, t, w)."""
    n, hid = h.shape
    vocab = w.shape[0]
    cfg = FUSED_BLOCKS
    row_blocks = triton.cdiv(n, cfg["BM"])
    # enough programs to fill the GPU: split the vocabulary so that there are >= ~4 per SM
    splits = max(1, min(triton.cdiv(vocab, cfg["BN"]), triton.cdiv(1024, max(row_blocks, 1))))
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), cfg["BN"]) * cfg["BN"]
    splits = triton.cdiv(vocab, v_per_split)
    part = torch.empty(splits, 4, n, dtype=torch.float32, device=h.device)
    if n:
        _linear_logprobs_fwd_kernel[(row_blocks, splits)](
            h, w, b if b is not None else h, y, part, n, vocab, hid, h.stride(0), h.stride(1),
            w.stride(0), w.stride(1), v_per_split, float(inv_temp), float(cap),
            HAS_BIAS=b is not None, ENTROPY=entropy, HEAD=tlp.head_kind(inv_temp, cap),
            IEEE=_ieee(h), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return part


def merge_partials(part: torch.Tensor) -> tuple:
    """Merge [splits, 4, N] partial statistics (disjoint vocabulary ranges) into (m, s, t, w)."""
    m_i, s_i, t_i, w_i = part.unbind(1)
    m = m_i.amax(0)
    m_ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    scale = torch.exp(m_i - m_ref)
    shift = torch.where(s_i > 0, m_i - m_ref, torch.zeros_like(m_i))
    s = (s_i * scale).sum(0)
    w = (scale * (w_i + s_i * shift)).sum(0)
    return m, s, t_i.sum(0), w


def fused_grad_tile(h, w, b, y, lse, ent, dlogp, dent, g, col0: int, inv_temp: float,
                    ignore_index: int, cap: float = 0.0) -> None:
    """G [n, c] = dL/dlogits[:, col0:col0 + c] from h and w, in one launch."""
    n, hid = h.shape
    c = g.shape[1]
    if n == 0 or c == 0:
        return
    cfg = FUSED_BLOCKS
    has_dent = dent is not None
    _linear_logprobs_grad_kernel[(triton.cdiv(n, cfg["BM"]), triton.cdiv(c, cfg["BN"]))](
        h, w, b if b is not None else h, y, lse, ent if has_dent else lse, dlogp,
        dent if has_dent else dlogp, g, g.stride(0), n, c, col0, hid, h.stride(0), h.stride(1),
        w.stride(0), w.stride(1), float(inv_temp), float(cap), int(ignore_index),
        HAS_BIAS=b is not None, HAS_DENT=has_dent, HEAD=tlp.head_kind(inv_temp, cap),
        IEEE=_ieee(h), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ---- pass 1: log-probs, entropy, lse ----------------------------------------------------------


def forward_stats(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                  inv_temp: float, ignore_index: int, entropy: bool, backend: str,
                  cap: float = 0.0):
    """(logp [N], entropy [N] or None, lse [N]) fp32; h [N, H], w [V, H], y [N]."""
    n_all, vocab = h.shape[0], w.shape[0]
    if backend == "triton" and FUSED_GEMM and not torch.compiler.is_compiling():
        state = merge_partials(fused_forward_stats(h, w, b, y, inv_temp, entropy, cap))
        return tlp.finalize(state, y.long(), vocab, ignore_index, entropy)
    rows, cols = tile_shape(n_all, vocab, h.shape[1], h.device)
    f32 = dict(dtype=torch.float32, device=h.device)
    logp = torch.empty(n_all, **f32)
    ent = torch.empty(n_all, **f32) if entropy else None
    lse = torch.empty(n_all, **f32)
    for r0 in range(0, n_all, rows):
        hr, yr = h[r0:r0 + rows], y[r0:r0 + rows]
        n = hr.shape[0]
        if backend in tlp.TILE_BACKENDS:
            state = torch.empty(4, n, **f32)
            out = torch.empty(3, n, **f32)
        else:
            st = None
            yl = yr.long()
        for v0 in range(0, vocab, cols):
            z = _mm_f32(hr, w[v0:v0 + cols].t())
            bv = None if b is None else b[v0:v0 + cols]
            last = v0 + cols >= vocab
            if backend in tlp.TILE_BACKENDS:
                tlp.stats_tile(backend, z, yr, bv, state, out, col0=v0, vocab=vocab,
                               inv_temp=inv_temp, ignore_index=ignore_index, accum=v0 > 0,
                               final=last, entropy=entropy, cap=cap)
            else:
                if bv is not None:
                    z += bv.float()
                if cap:
                    z = tlp.head_torch(z, inv_temp, cap)[0]
                else:
                    z *= inv_temp
                st = tlp.stats_torch(z, yl - v0, st, entropy)
            del z
        if backend in tlp.TILE_BACKENDS:
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
                   backend: str, need: tuple[bool, bool, bool], cap: float = 0.0):
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
    rows, cols = tile_shape(n_all, vocab, h.shape[1], h.device)
    gdt = _gemm_dtype(h)
    dlogp = dlogp.float().contiguous()
    dent = None if dent is None else dent.float().contiguous()
    yl = y.long()
    ignored = yl == ignore_index
    fused = backend == "triton" and FUSED_GEMM and not torch.compiler.is_compiling()
    for v0 in range(0, vocab, cols):
        wv = w[v0:v0 + cols]
        c = wv.shape[0]
        bv = None if b is None else b[v0:v0 + cols]
        gw_acc = torch.zeros(c, hid, **f32) if need_w else None
        for r0 in range(0, n_all, rows):
            sl = slice(r0, r0 + rows)
            hr = h[sl]
            if fused:  # logits tile and gradient in one kernel: only G is written
                g = torch.empty(hr.shape[0], c, dtype=gdt, device=h.device)
                fused_grad_tile(hr, w, b, y[sl], lse[sl], None if dent is None else ent[sl],
                                dlogp[sl], None if dent is None else dent[sl], g, v0, inv_temp,
                                ignore_index, cap)
            elif backend in tlp.TILE_BACKENDS:
                z = _mm_f32(hr, wv.t())
                # The gradient overwrites the logits tile: row r of G (c values of gdt) goes to
                # the first c * itemsize bytes of fp32 row r, which the kernel's program for row
                # r has already read (block k writes only bytes of blocks <= k). So G is z itself
                # (fp32) or a [n, c] view with row stride 2c (16-bit). Eager only: a custom op
                # under torch.compile may not alias its inputs.
                if torch.compiler.is_compiling():
                    g = torch.empty(z.shape, dtype=gdt, device=z.device)
                elif gdt == torch.float32:
                    g = z
                else:
                    g = z.view(gdt)[:, :z.shape[1]]
                tlp.grad_tile(backend, z, g, y[sl], bv, lse[sl],
                              None if dent is None else ent[sl], dlogp[sl],
                              None if dent is None else dent[sl], col0=v0, inv_temp=inv_temp,
                              ignore_index=ignore_index, cap=cap)
                del z
            else:
                z = _mm_f32(hr, wv.t())
                if bv is not None:
                    z += bv.float()
                dhead = None
                if cap:
                    z, dhead = tlp.head_torch(z, inv_temp, cap, grad=True)
                else:
                    z *= inv_temp
                g = tlp.grad_torch(z, yl[sl] - v0, ignored[sl], lse[sl],
                                   None if dent is None else ent[sl], dlogp[sl],
                                   None if dent is None else dent[sl], inv_temp, dhead).to(gdt)
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


# ---- single sweep: logits, grad_fn and gradients per chunk of rows ---------------------------


def sweep_rows(n_rows: int, vocab: int, chunk_multiple: int, device: torch.device) -> int:
    """Rows per single-sweep chunk: as many whole groups of chunk_multiple rows as fit the chunk
    budget as full-vocabulary fp32 rows (<= MAX_TILE_ROWS; a multiple of 128 rows, whole GEMM
    tiles, when chunk_multiple is 1 and there are 256 or more), at least one group."""
    budget = TILE_ELEMS_CUDA if device.type == "cuda" else TILE_ELEMS_CPU
    rows = min(budget // max(vocab, 1), MAX_TILE_ROWS)
    if chunk_multiple == 1 and rows >= 256:
        rows -= rows % 128
    rows = rows // chunk_multiple * chunk_multiple
    return max(chunk_multiple, min(rows, n_rows))


def single_sweep_fits(vocab: int, chunk_multiple: int, device: torch.device) -> bool:
    limit = SINGLE_SWEEP_MAX_CHUNK_ELEMS_CUDA if device.type == "cuda" else \
        SINGLE_SWEEP_MAX_CHUNK_ELEMS_CPU
    return chunk_multiple * vocab <= limit


def _addmm_lowp_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> None:
    """acc (16-bit) = beta * acc + a @ b: the product accumulated in fp32, added to acc in fp32,
    rounded once (cuBLAS GEMM with a 16-bit C and fp32 compute; emulated with fp32 temporaries
    elsewhere); beta = 0 ignores acc's contents."""
    if acc.is_cuda and a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif beta == 0:
        acc.copy_(torch.mm(a.float(), b.float()))
    else:
        acc.copy_(acc.float().addmm_(a.float(), b.float()))


def _upstream_grads(out, start: int, end: int, entropy: bool, op: str):
    """grad_fn's result for rows [start, end): dL/dlogp or (dL/dlogp, dL/dentropy), checked,
    as contiguous fp32 (dL/dentropy None when not given)."""
    dlogp, dent = out if isinstance(out, tuple) else (out, None)
    if dent is not None and not entropy:
        raise ValueError(f"{op}: a dL/dentropy from grad_fn needs with_entropy=True")
    n = end - start
    for name, t in (("dL/dlogp", dlogp), ("dL/dentropy", dent)):
        if (t is not None or name == "dL/dlogp") and \
                (not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,)):
            raise ValueError(f"{op}: grad_fn must return {name} of shape ({n},) for rows "
                             f"[{start}, {end}), got {getattr(t, 'shape', type(t).__name__)}")
    return dlogp.float().contiguous(), (None if dent is None else dent.float().contiguous())


def _chunk_grad(z, yr, b, *, lp_out, ent_out, r0: int, inv_temp: float, ignore_index: int,
                entropy: bool, backend: str, grad_fn: Callable, cols: int, gdt, op: str,
                need_any: bool, chunk_kernel: Callable | None = None, g_out=None,
                cap: float = 0.0):
    """One single-sweep chunk's statistics (into lp_out / ent_out), grad_fn, and G = dL/dZ
    written over the chunk's fp32 logits z (None when no gradient is needed). chunk_kernel
    (z, yr, g, r0, inv_temp, ignore_index, entropy, cap) -> out [3, n] | None: a kernel that
    makes the statistics and G in one read of z, with dL/dlogp computed in-kernel (instead of grad_fn;
    token_logprobs.cluster_chunk), tried first where it may apply. g_out: where G goes (a
    slice of the sweep's G group buffer; tile backends only), instead of over z. cap: the
    head's (token_logprobs.head_constants), also passed to chunk_kernel as its last argument."""
    n, vocab = z.shape
    if (chunk_kernel is not None and need_any and b is None and backend == "triton"
            and gdt != torch.float32 and not torch.compiler.is_compiling()):
        g = z.view(gdt)[:, :vocab] if g_out is None else g_out
        out = chunk_kernel(z, yr, g, r0, inv_temp, ignore_index, entropy, cap)
        if out is not None:
            lp_out.copy_(out[0])
            if entropy:
                ent_out.copy_(out[1])
            return g
    f32 = dict(dtype=torch.float32, device=z.device)
    if backend in tlp.TILE_BACKENDS:
        state = torch.empty(4, n, **f32)
        out = torch.empty(3, n, **f32)
        tlp.stats_tile(backend, z, yr, b, state, out, col0=0, vocab=vocab, inv_temp=inv_temp,
                       ignore_index=ignore_index, accum=False, final=True, entropy=entropy,
                       cap=cap)
        lp, en, lse = out[0], out[1] if entropy else None, out[2]
    else:  # per vocabulary tile (temporaries stay within the tile budget)
        yl = yr.long()
        st = None
        for v0 in range(0, vocab, cols):
            zt = z[:, v0:v0 + cols]
            if b is not None:
                zt += b[v0:v0 + cols].float()
            if cap:  # z keeps the raw logits (+ bias): the gradient needs sech^2 of them
                st = tlp.stats_torch(tlp.head_torch(zt, inv_temp, cap)[0], yl - v0, st, entropy)
                continue
            zt *= inv_temp  # z keeps the scaled logits for the gradient
            st = tlp.stats_torch(zt.clone(), yl - v0, st, entropy)
        del zt
        lp, en, lse = tlp.finalize(st, yl, vocab, ignore_index, entropy)
    lp_out.copy_(lp)
    if entropy:
        ent_out.copy_(en)
    dlogp = grad_fn(r0, r0 + n, lp_out, ent_out)
    dlogp, dent = _upstream_grads(dlogp, r0, r0 + n, entropy, op)
    en_g = en if dent is not None else None
    if not need_any:
        return None
    if backend in tlp.TILE_BACKENDS:  # G written over Z (see backward_grads)
        if g_out is not None:
            g = g_out
        elif torch.compiler.is_compiling():
            g = torch.empty(z.shape, dtype=gdt, device=z.device)
        elif gdt == torch.float32:
            g = z
        else:
            g = z.view(gdt)[:, :vocab]
        tlp.grad_tile(backend, z, g, yr, b, lse, en_g, dlogp, dent, col0=0, inv_temp=inv_temp,
                      ignore_index=ignore_index, cap=cap)
    else:  # G written over Z tile by tile (a 16-bit G: the aliasing of the Triton path)
        g = z if gdt == torch.float32 else z.view(gdt)[:, :vocab]
        ignored = yl == ignore_index
        for v0 in range(0, vocab, cols):
            zt, dhead = z[:, v0:v0 + cols], None
            if cap:
                zt, dhead = tlp.head_torch(zt, inv_temp, cap, grad=True)
            g[:, v0:v0 + cols] = tlp.grad_torch(zt, yl - v0, ignored, lse, en_g, dlogp, dent,
                                                inv_temp, dhead)
    return g


def single_sweep(h, w, b, y, inv_temp: float, ignore_index: int, entropy: bool, backend: str,
                 grad_fn: Callable, chunk_multiple: int, need: tuple[bool, bool, bool], op: str,
                 chunk_bounds: list[int] | None = None, chunk_kernel: Callable | None = None,
                 cap: float = 0.0):
    """(logp, entropy or None, grad_hidden, grad_weight, grad_bias) in one sweep (module
    docstring); grad_fn is called once per chunk of rows (chunk_bounds: the chunks' row
    boundaries [0, ..., N], instead of groups of chunk_multiple rows)."""
    n_all, hid = h.shape
    vocab = w.shape[0]
    need_h, need_w, need_b = need[0], need[1], need[2] and b is not None
    f32 = dict(dtype=torch.float32, device=h.device)
    logp = torch.empty(n_all, **f32)
    ent = torch.empty(n_all, **f32) if entropy else None
    gh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else None
    gw = gw_acc = gb = None
    if need_w:  # uninitialized: the first chunk's GEMMs write it with beta = 0
        if w.dtype == torch.float32:
            gw = gw_acc = torch.empty_like(w, memory_format=torch.contiguous_format)
        elif vocab * hid * 4 <= SINGLE_SWEEP_FP32_ACC_BYTES:
            gw_acc = torch.empty(vocab, hid, **f32)
        else:  # running sum in weight's dtype, rounded once per row chunk
            gw = torch.empty_like(w, memory_format=torch.contiguous_format)
    if need_b:
        gb = torch.zeros(vocab, **f32)
    if chunk_bounds is None:
        rows = sweep_rows(n_all, vocab, chunk_multiple, h.device)
        chunk_bounds = list(range(0, n_all, rows)) + [n_all]
    else:
        rows = max(e - s for s, e in zip(chunk_bounds, chunk_bounds[1:]))
    budget = TILE_ELEMS_CUDA if h.is_cuda else TILE_ELEMS_CPU
    # vocabulary tiles of the elementwise torch work and of GEMMs whose operands need fp32
    # copies (16-bit off CUDA); GEMMs that need none cover the whole vocabulary at once
    cols = max(1, min(vocab, budget // max(rows, hid, 1)))
    if cols < vocab and cols >= 256:
        cols -= cols % 128
    gcols = vocab if h.is_cuda or w.dtype == torch.float32 else cols
    gdt = _gemm_dtype(h)
    group = _group_rows(rows, n_all)
    if (group is None or gcols < vocab or backend not in tlp.TILE_BACKENDS
            or not (need_h or need_w or need_b) or torch.compiler.is_compiling()):
        group = None
    if group is not None:  # G of consecutive chunks collected, then the gradient GEMMs on all
        return _grouped_sweep(h, w, b, y, inv_temp, ignore_index, entropy, backend, grad_fn,
                              need, op, chunk_bounds, chunk_kernel, group, gdt, cols, logp, ent,
                              gh, gw, gw_acc, gb, cap)
    for r0, r1 in zip(chunk_bounds, chunk_bounds[1:]):
        sl = slice(r0, r1)
        hr, yr = h[sl], y[sl]
        n = hr.shape[0]
        # full-vocabulary fp32 logits of the chunk
        if gcols >= vocab:
            z = _mm_f32(hr, w.t())
        else:
            z = torch.empty(n, vocab, **f32)
            for v0 in range(0, vocab, gcols):
                z[:, v0:v0 + gcols] = _mm_f32(hr, w[v0:v0 + gcols].t())
        g = _chunk_grad(z, yr, b, lp_out=logp[sl], ent_out=None if ent is None else ent[sl],
                        r0=r0, inv_temp=inv_temp, ignore_index=ignore_index, entropy=entropy,
                        backend=backend, grad_fn=grad_fn, cols=cols, gdt=gdt, op=op,
                        need_any=need_h or need_w or need_b, chunk_kernel=chunk_kernel, cap=cap)
        del z
        if g is None:
            continue
        gh_acc = torch.zeros(n, hid, **f32) if need_h and gcols < vocab else None
        for v0 in range(0, vocab, gcols):
            gt, wv = g[:, v0:v0 + gcols], w[v0:v0 + gcols]
            if need_h:
                if gh_acc is None:  # one GEMM over the whole vocabulary
                    gh[sl] = _mm_f32(gt, wv)
                else:
                    _addmm_f32_(gh_acc, gt, wv)
            if need_w:
                beta = 0.0 if r0 == chunk_bounds[0] else 1.0
                if gw_acc is not None:
                    _addmm_f32_(gw_acc[v0:v0 + gcols], gt.t(), hr, beta)
                else:
                    _addmm_lowp_(gw[v0:v0 + gcols], gt.t(), hr, beta)
            if need_b:
                gb[v0:v0 + gcols] += torch.sum(gt, dim=0, dtype=torch.float32)
        if gh_acc is not None:
            gh[sl] = gh_acc
        del g, gt, wv, gh_acc  # views of the chunk buffer: free it before the next chunk
    if need_w and gw is None:
        gw = gw_acc.to(w.dtype)  # one rounding of the fp32 sum over all rows
    if need_b and gb.dtype != b.dtype:
        gb = gb.to(b.dtype)
    return logp, ent, gh, gw, gb


def _group_rows(chunk_rows: int, n_all: int) -> int | None:
    """Rows of the G group buffer (SWEEP_GROUP_ROWS or R1K_SWEEP_GROUP_ROWS), at least one
    chunk and at most all rows; None when off or when a group would hold one chunk only."""
    import os

    env = os.environ.get("R1K_SWEEP_GROUP_ROWS")
    if env is not None:
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"R1K_SWEEP_GROUP_ROWS must be a non-negative integer (0: off), "
                             f"got {env!r}")
        group = value or None
    else:
        group = SWEEP_GROUP_ROWS
    if group is None:
        return None
    group = min(max(int(group), chunk_rows), n_all)
    return group if group > chunk_rows else None


def _grouped_sweep(h, w, b, y, inv_temp, ignore_index, entropy, backend, grad_fn, need, op,
                   chunk_bounds, chunk_kernel, group, gdt, cols, logp, ent, gh, gw, gw_acc, gb,
                   cap=0.0):
    """single_sweep with a G group buffer (SWEEP_GROUP_ROWS): each chunk's statistics and G
    (into the buffer), and the gradient GEMMs once per group of consecutive whole chunks."""
    vocab, hid = w.shape
    need_h, need_w, need_b = need[0], need[1], need[2] and b is not None
    group = max(group, max(e - s for s, e in zip(chunk_bounds, chunk_bounds[1:])))
    gbuf = torch.empty(group, vocab, dtype=gdt, device=h.device)
    first = True

    def flush(g0, g1):
        nonlocal first
        gt, hr = gbuf[:g1 - g0], h[g0:g1]
        if need_h:
            gh[g0:g1] = _mm_f32(gt, w)
        if need_w:
            beta = 0.0 if first else 1.0
            if gw_acc is not None:
                _addmm_f32_(gw_acc, gt.t(), hr, beta)
            else:
                _addmm_lowp_(gw, gt.t(), hr, beta)
        if need_b:
            gb.add_(torch.sum(gt, dim=0, dtype=torch.float32))
        first = False

    g0 = chunk_bounds[0]
    for r0, r1 in zip(chunk_bounds, chunk_bounds[1:]):
        if r1 - g0 > group:  # this chunk does not fit: the group so far first
            flush(g0, r0)
            g0 = r0
        sl = slice(r0, r1)
        z = _mm_f32(h[sl], w.t())
        _chunk_grad(z, y[sl], b, lp_out=logp[sl], ent_out=None if ent is None else ent[sl],
                    r0=r0, inv_temp=inv_temp, ignore_index=ignore_index, entropy=entropy,
                    backend=backend, grad_fn=grad_fn, cols=cols, gdt=gdt, op=op, need_any=True,
                    chunk_kernel=chunk_kernel, g_out=gbuf[r0 - g0:r1 - g0], cap=cap)
        del z
    flush(g0, chunk_bounds[-1])
    del gbuf
    if need_w and gw is None:
        gw = gw_acc.to(w.dtype)
    if need_b and gb.dtype != b.dtype:
        gb = gb.to(b.dtype)
    return logp, ent, gh, gw, gb


# ---- autograd ---------------------------------------------------------------------------------


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], labels [N], bias [V] | None -> logp [N] (, entropy [N])."""

    @staticmethod
    def forward(ctx, h, w, y, b, inv_temp, ignore_index, with_entropy, backend, cap):
        logp, ent, lse = forward_stats(h, w, b, y, inv_temp, ignore_index, with_entropy, backend,
                                       cap)
        # saves the inputs themselves and 8 bytes per row: pass 2 recomputes the logits
        ctx.save_for_backward(h, w, y, b, lse, ent)
        ctx.args = (inv_temp, ignore_index, with_entropy, backend, cap)
        if with_entropy:
            return logp, ent
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, dlogp, dent=None):
        h, w, y, b, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, with_entropy, backend, cap = ctx.args
        if dlogp is None:
            dlogp = torch.zeros_like(lse)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        gh, gw, gb = backward_grads(h, w, b, y, lse, ent if with_entropy else None, dlogp,
                                    dent if with_entropy else None, inv_temp, ignore_index,
                                    backend, need, cap)
        return gh, gw, None, gb, None, None, None, None, None


# ---- validation -------------------------------------------------------------------------------


def _prepare(op, hidden, weight, labels, bias, temperature, ignore_index, label_data=True,
             softcap=None, logit_scale=1.0):
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
    tlp.check_labels(op, labels, hidden.shape[:-1], ignore_index, hidden.device)
    temperature = tlp.check_temperature(op, temperature)
    inv_temp, cap = tlp.head_constants(op, temperature, softcap, logit_scale)
    h = hidden.reshape(math.prod(hidden.shape[:-1]), hid)  # (-1 is ambiguous when H = 0)
    if bias is not None:
        bias = bias.contiguous()  # the kernels read bias with unit stride ([V]: a small copy)
    y = tlp.flat_labels(labels)
    if label_data:
        tlp.check_label_values(op, y, vocab, ignore_index)
    return h, bias, y, inv_temp, cap


# ---- public function and internal entry point -------------------------------------------------


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int = -100, with_entropy: bool = False,
                          softcap: float | None = None, logit_scale: float = 1.0,
                          process_group=None):
    """token_logprobs(hidden @ weight.T + bias, labels, ...) without the [N, V] logits.

    `hidden [..., H]`, `weight [V, H]`, optional `bias [V]`, `labels [...]`. Returns fp32
    `logp [...]` (and `entropy [...]` when `with_entropy`), differentiable with respect to
    hidden, weight and bias. Matmul products accumulate in fp32. `logit_scale` and `softcap`:
    the head's transform of the logits, as in token_logprobs. See docs/api.md.
    `weight` / `bias` may be DTensors (FSDP2): gathered, their gradient the sum over ranks in
    their own placement. `process_group`: weight [V_r, H] is this rank's contiguous slice of a
    vocabulary split over the group, labels global ids, grad_hidden summed over ranks
    (r1kernels/distributed.py: 12-16 bytes per token, plus H elements per token in backward).
    """
    from r1kernels import distributed

    weight, bias = distributed.gather_weight(weight), distributed.gather_weight(bias)
    if process_group is not None:
        return distributed.linear_token_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
            with_entropy=with_entropy, softcap=softcap, logit_scale=logit_scale,
            group=process_group)
    h, bias, y, inv_temp, cap = _prepare(OP, hidden, weight, labels, bias, temperature,
                                         ignore_index, label_data=False, softcap=softcap,
                                         logit_scale=logit_scale)
    backend = dispatch.select(OP, h.device)
    rows = labelled_rows(y, ignore_index, OP, weight.shape[0])
    if rows is not None:  # (differentiable gather and scatter around the op)
        h, y = h.index_select(0, rows), y.index_select(0, rows)
    out = LinearTokenLogprobsFunction.apply(h, weight, y, bias, inv_temp, int(ignore_index),
                                            bool(with_entropy), backend, cap)
    outs = out if with_entropy else (out,)
    if rows is not None:
        outs = tuple(o.new_zeros(labels.numel()).index_copy(0, rows, o) for o in outs)
    outs = tuple(o.reshape(labels.shape) for o in outs)
    return outs if with_entropy else outs[0]


def labelled_rows(y: torch.Tensor, ignore_index: int, op: str, vocab: int):
    """Indices of the rows whose label is not ignore_index (None when that is every row), the
    labels' values checked in the same host sync (tlp.checked_rows): only
    those go through the GEMMs. A row labelled ignore_index (HF's -100 for prompt and padding
    tokens, often most of an SFT batch) has log-prob and entropy 0 by definition and a zero
    gradient, so computing its logits would cost the full 6-8 H V FLOPs per row for nothing."""
    return tlp.checked_rows(op, y, vocab, ignore_index, y != ignore_index)


def linear_token_logprobs_with_grad(hidden: torch.Tensor, weight: torch.Tensor,
                                    labels: torch.Tensor, bias: torch.Tensor | None, *,
                                    temperature: float, ignore_index: int, with_entropy: bool,
                                    grad_fn: Callable, chunk_multiple: int = 1,
                                    need_grads: tuple[bool, bool, bool] = (True, True, True),
                                    sweep: str = "auto", chunk_bounds: list[int] | None = None,
                                    chunk_kernel: Callable | None = None,
                                    labels_checked: bool = False, softcap: float | None = None,
                                    logit_scale: float = 1.0):
    """Log-probs and the gradients of a loss whose dL/dlogp `grad_fn` gives, in one call.

    Returns (logp [N] fp32, entropy [N] fp32 or None, grad_hidden [N, H] in hidden's dtype or
    None, grad_weight [V, H] in weight's dtype or None, grad_bias [V] or None).
    grad_fn(start, end, logp_chunk, entropy_chunk) -> dlogp_chunk, or (dlogp_chunk,
    dentropy_chunk) for a loss of the entropy too (with_entropy=True), is called per chunk of
    whole groups of `chunk_multiple` rows, in row order (sweep="one"), or once with (0, N)
    (sweep="two"). `chunk_bounds` (instead of chunk_multiple): the single sweep's chunks as row
    boundaries [0, ..., N], e.g. whole sequences of different lengths. `sweep`: "one"
    (6 N H V FLOPs), "two" (8 N H V FLOPs, grad_weight always reduced in fp32) or "auto" (module
    docstring; with chunk_bounds: "one" when the largest chunk fits the limit). chunk_kernel:
    see _chunk_grad (single sweep only; it must give what grad_fn would, for a grad_fn without
    side effects). labels_checked: the caller has checked the labels' values already
    (tlp.checked_rows), so no second host sync here. softcap, logit_scale: the head, as in
    linear_token_logprobs.
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
    if sweep not in ("auto", "one", "two"):
        raise ValueError(f"{op}: sweep expected 'auto', 'one' or 'two', got {sweep!r}")
    h, bias, y, inv_temp, cap = _prepare(op, hidden, weight, labels, bias, temperature,
                                         ignore_index, label_data=not labels_checked,
                                         softcap=softcap, logit_scale=logit_scale)
    backend = dispatch.select(OP, h.device)
    need = tuple(bool(x) for x in need_grads)
    if chunk_bounds is not None:
        chunk_bounds = [int(b) for b in chunk_bounds]
        if len(chunk_bounds) < 2 or chunk_bounds[0] != 0 or chunk_bounds[-1] != h.shape[0] or \
                any(e <= s for s, e in zip(chunk_bounds, chunk_bounds[1:])):
            raise ValueError(f"{op}: chunk_bounds must rise strictly from 0 to N={h.shape[0]}, "
                             f"got {chunk_bounds}")
    if sweep == "auto":
        largest = chunk_multiple if chunk_bounds is None else \
            max(e - s for s, e in zip(chunk_bounds, chunk_bounds[1:]))
        sweep = "one" if single_sweep_fits(weight.shape[0], largest, h.device) else "two"
    if sweep == "one" and h.shape[0] > 0:
        with torch.no_grad():
            return single_sweep(h, weight, bias, y, inv_temp, int(ignore_index),
                                bool(with_entropy), backend, grad_fn, chunk_multiple, need, op,
                                chunk_bounds, chunk_kernel, cap)
    with torch.no_grad():
        logp, ent, lse = forward_stats(h, weight, bias, y, inv_temp, int(ignore_index),
                                       bool(with_entropy), backend, cap)
        n = h.shape[0]
        dlogp = grad_fn(0, n, logp, ent)
        dlogp, dent = _upstream_grads(dlogp, 0, n, with_entropy, op)
        gh, gw, gb = backward_grads(h, weight, bias, y, lse, ent if dent is not None else None,
                                    dlogp, dent, inv_temp, int(ignore_index), backend, need, cap)
    return logp, ent, gh, gw, gb


def linear_token_logprobs_fwd_bwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                  grad_logp: torch.Tensor, *, grad_entropy: torch.Tensor | None = None,
                                  bias: torch.Tensor | None = None, temperature: float = 1.0,
                                  ignore_index: int = -100, with_entropy: bool = False,
                                  softcap: float | None = None, logit_scale: float = 1.0,
                                  process_group=None):
    """Forward and backward of `linear_token_logprobs` in one sweep of the vocabulary, for a loss
    whose upstream gradient is known up front: L = sum(grad_logp * logp) + sum(grad_entropy *
    entropy) (SFT's mean NLL: grad_logp = -1/N; any loss linear in the log-probs).

    Returns (logp [...] fp32, entropy [...] or None, grad_hidden [..., H], grad_weight [V, H],
    grad_bias [V] or None), gradients in the inputs' dtypes. The logits are computed once
    (6 N H V FLOPs instead of the 8 N H V of forward + backward through autograd); grad_weight's
    running sum follows the single-sweep precision rule of the module docstring. Not
    differentiable itself. softcap, logit_scale: the head, as in linear_token_logprobs. A
    DTensor `weight` / `bias` (FSDP2) gets its gradient as a DTensor of its own placement, the
    sum over ranks of every rank's gradient. `process_group`: a vocabulary split over the group
    (see linear_token_logprobs); grad_hidden is summed over ranks, grad_weight / grad_bias are
    this rank's slice.
    """
    from r1kernels import distributed

    if distributed.is_dtensor(weight) or distributed.is_dtensor(bias):
        w_full = weight.full_tensor() if distributed.is_dtensor(weight) else weight
        b_full = bias.full_tensor() if distributed.is_dtensor(bias) else bias
        logp, ent, gh, gw, gb = linear_token_logprobs_fwd_bwd(
            hidden, w_full, labels, grad_logp, grad_entropy=grad_entropy, bias=b_full,
            temperature=temperature, ignore_index=ignore_index, with_entropy=with_entropy,
            softcap=softcap, logit_scale=logit_scale, process_group=process_group)
        return logp, ent, gh, distributed.shard_grad(gw, weight), distributed.shard_grad(gb, bias)
    if process_group is not None:
        return distributed.linear_token_logprobs_fwd_bwd(
            hidden, weight, labels, grad_logp, grad_entropy=grad_entropy, bias=bias,
            temperature=temperature, ignore_index=ignore_index, with_entropy=with_entropy,
            softcap=softcap, logit_scale=logit_scale, group=process_group)
    op = "linear_token_logprobs_fwd_bwd"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must be a tensor [..., H], got {type(hidden).__name__}")
    glp, gent = tlp.check_upstream_grads(op, labels, grad_logp, grad_entropy, with_entropy,
                                         hidden.device)
    _prepare(op, hidden, weight, labels, bias, temperature, ignore_index, label_data=False,
             softcap=softcap, logit_scale=logit_scale)
    h2, y2 = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1]), tlp.flat_labels(labels)
    rows = labelled_rows(y2, ignore_index, op, weight.shape[0])  # (and the labels' values)
    h_in, y_in = h2, y2
    if rows is not None:  # rows labelled ignore_index: zeros, not computed (labelled_rows)
        h_in, y_in = h2.index_select(0, rows), y2.index_select(0, rows)
        glp = glp.index_select(0, rows)
        gent = None if gent is None else gent.index_select(0, rows)

    def grad_fn(start, end, logp, ent):
        return glp[start:end], (None if gent is None else gent[start:end])

    def chunk_kernel(z, yr, g, r0, inv_temp, ignore_index, entropy, cap):
        sl = slice(r0, r0 + z.shape[0])
        return tlp.cluster_chunk(z, yr, g, inv_temp, ignore_index, entropy, grad_logp=glp[sl],
                                 grad_entropy=None if gent is None else gent[sl], cap=cap)

    need = (True, True, bias is not None)
    logp, ent, gh, gw, gb = linear_token_logprobs_with_grad(
        h_in, weight, y_in, bias, temperature=temperature, ignore_index=ignore_index,
        with_entropy=with_entropy, grad_fn=grad_fn, need_grads=need, chunk_kernel=chunk_kernel,
        labels_checked=True, softcap=softcap, logit_scale=logit_scale)
    if rows is not None:
        n = y2.numel()
        logp = logp.new_zeros(n).index_copy_(0, rows, logp)
        ent = None if ent is None else ent.new_zeros(n).index_copy_(0, rows, ent)
        gh = gh.new_zeros(h2.shape).index_copy_(0, rows, gh)
    shape = labels.shape
    return (logp.reshape(shape), None if ent is None else ent.reshape(shape),
            gh.reshape(hidden.shape), gw, gb)
