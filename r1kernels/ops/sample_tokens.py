"""Token sampling for rollouts: temperature, top-k, top-p, min-p, and the sampled token's log-prob.

    z = logits / temperature          (logits at temperature 0; non-finite logits: probability 0)
    order tokens by (z descending, id ascending)
    keep the shortest of three prefixes of that order: the top_k first; the fewest whose mass
    reaches top_p of the top-k mass; those with p >= min_p * max(p)
    token = inverse CDF, in id order, of the kept mass at one uniform u per row
    logp  = log softmax(z)[token]     (unfiltered: the distribution the trainer's log-probs use)

One uniform per row is drawn from the caller's `torch.Generator` on the logits' device and handed
to the kernel, so every backend draws the same token from the same generator state (up to the
rounding of cumulative sums at a boundary). Nothing is read back to the host.

Backends: a Triton kernel for CUDA that never sorts the vocabulary (below), a C++ CPU kernel
(csrc/sample_tokens/: one SIMD exp per logit; the top-k and top-p boundaries found by bisection
over the logits' float bits, no sort), and a torch path (sort-based, any device).
"""
from __future__ import annotations

import torch

from r1kernels import dispatch
from r1kernels.ops._triton import HAS_TRITON, tl, triton

OP = "sample_tokens"
dispatch.register(OP, cuda=("triton", "torch"), cpu=("cpp", "torch"))

# ---- Triton kernel ------------------------------------------------------------------------------
# One program per row; the row is read from global memory (L2 on a GPU: a 151936-wide fp32 row is
# 594 KB) once per pass, never written, never sorted:
#   1 pass      max, sum of exp, argmax, count of finite logits (online softmax)
#   <= 9 passes per filter: a radix-16 search for the boundary key. Keys are the fp32 values of
#               z mapped to int32 in the same order; each pass counts (top-k) or sums the
#               probabilities (top-p) of the keys >= 16 pivots at once, shrinking the interval
#               known to hold the boundary 16-fold (32 bits in 8-9 passes). FlashInfer's
#               sorting-free sampling searches pivots in probability space by rejection instead;
#               this search is deterministic, so every backend draws the same token for a u.
#   1 pass      ties at the boundary key (how many are kept: the lowest ids), its probability
#   2 passes    kept mass, then the inverse CDF in id order (running prefix sums per block)
# So plain temperature sampling reads the row 2-3 times; top-k + top-p about 20 times.

# Keys: -2**31 is below every finite key (non-finite logits get -2**31 - 1); 0x7F800000 (the key
# of +inf) is above every finite key.
NPIV = 16


@triton.jit
def _load_row(row_ptr, offs, V, temp):
    """z = logits / temp for columns `offs`, whether it counts (finite), and its order key."""
    in_row = offs < V
    x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(tl.float32) / temp
    ok = in_row & (tl.abs(x) < float("inf"))  # NaN fails the comparison too
    b = x.to(tl.int32, bitcast=True)
    key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)  # negative floats: flip magnitude bits
    key = tl.where(ok, key, -(1 << 31) - 1)
    return x, ok, key


@triton.jit
def _search(row_ptr, V, temp, m, lo, hi, goal, MASS: tl.constexpr, BLOCK: tl.constexpr,
            NPIV: tl.constexpr):
    """The largest key t in [lo, hi) with f(t) >= goal, f(t) = count (or probability mass) of the
    keys >= t; f(lo) >= goal and f(hi) < goal are assumed (f is non-increasing)."""
    cols = tl.arange(0, BLOCK)
    j = tl.arange(0, NPIV).to(tl.int64)
    while hi - lo > 1:
        step = (hi - lo + NPIV - 1) // NPIV
        piv = lo + j * step
        acc = tl.zeros([NPIV], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            x, ok, key = _load_row(row_ptr, offs, V, temp)
            if MASS:
                w = tl.where(ok, tl.exp(x - m), 0.0)
            else:
                w = ok.to(tl.float32)
            acc += tl.sum(tl.where(key[:, None] >= piv[None, :], w[:, None], 0.0), axis=0)
        good = ((acc >= goal) & (piv < hi)) | (j == 0)
        lo = tl.max(tl.where(good, piv, lo), axis=0)
        hi = tl.minimum(hi, lo + step)
    return lo


@triton.jit
def _tail(row_ptr, V, temp, m, t, BLOCK: tl.constexpr):
    """Count and mass of the keys > t, count of the keys == t, and the probability at key t."""
    cols = tl.arange(0, BLOCK)
    c_gt = 0.0
    m_gt = 0.0
    c_eq = 0.0
    p_t = 0.0
    for start in range(0, V, BLOCK):
        offs = start + cols
        x, ok, key = _load_row(row_ptr, offs, V, temp)
        p = tl.where(ok, tl.exp(x - m), 0.0)
        c_gt += tl.sum((key > t).to(tl.float32), axis=0)
        m_gt += tl.sum(tl.where(key > t, p, 0.0), axis=0)
        c_eq += tl.sum((key == t).to(tl.float32), axis=0)
        p_t = tl.maximum(p_t, tl.max(tl.where(key == t, p, 0.0), axis=0))
    return c_gt, m_gt, c_eq, p_t


@triton.jit
def _kept(x, ok, key, m, t_star, r_star, rank0, min_p, MINP: tl.constexpr):
    """Kept columns of a block and their probabilities: keys above t_star, the first r_star of
    the keys equal to it (in id order; rank0 of them came in earlier blocks), p >= min_p."""
    eq = key == t_star
    rank = rank0 + tl.cumsum(eq.to(tl.float32), axis=0) - eq.to(tl.float32)
    p = tl.where(ok, tl.exp(x - m), 0.0)
    kept = ok & ((key > t_star) | (eq & (rank < r_star)))
    if MINP:
        kept = kept & (p >= min_p)
    return kept, tl.where(kept, p, 0.0), tl.sum(eq.to(tl.float32), axis=0)


@triton.jit
def _sample_tokens_kernel(logits_ptr, stride, u_ptr, tok_ptr, logp_ptr, V, temp, top_k, top_p,
                          min_p, GREEDY: tl.constexpr, TOPK: tl.constexpr, TOPP: tl.constexpr,
                          MINP: tl.constexpr, BLOCK: tl.constexpr, NPIV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    # pass 1: online max / sum of exp, the first argmax, count of finite logits
    m = float("-inf")
    s = 0.0
    n = 0.0
    best = float("-inf")
    arg = 0
    for start in range(0, V, BLOCK):
        offs = start + cols
        x, ok, key = _load_row(row_ptr, offs, V, temp)
        xm = tl.where(ok, x, float("-inf"))
        bmax = tl.max(xm, axis=0)
        new_m = tl.maximum(m, bmax)
        alpha = tl.where(new_m == float("-inf"), 0.0, tl.exp(m - new_m))
        s = s * alpha + tl.sum(tl.where(ok, tl.exp(x - new_m), 0.0), axis=0)
        m = new_m
        n += tl.sum(ok.to(tl.float32), axis=0)
        barg = tl.argmax(xm, axis=0)
        arg = tl.where(bmax > best, start + barg, arg)
        best = tl.maximum(best, bmax)
    lse = m + tl.log(s)
    tok = arg.to(tl.int64)
    if not GREEDY:
        t_star = -2147483648 + 0 * row  # every finite key is above: keep all
        r_star = 0.0
        mass = s
        if TOPK:
            if top_k < n:
                t_star = _search(row_ptr, V, temp, m, t_star, 2139095040 + 0 * row, top_k * 1.0,
                                 False, BLOCK, NPIV)
                c_gt, m_gt, c_eq, p_t = _tail(row_ptr, V, temp, m, t_star, BLOCK)
                r_star = top_k - c_gt
                mass = m_gt + r_star * p_t
        if TOPP:
            goal = top_p * mass
            t_p = _search(row_ptr, V, temp, m, t_star, 2139095040 + 0 * row, goal, True, BLOCK, NPIV)
            c_gt, m_gt, c_eq, p_t = _tail(row_ptr, V, temp, m, t_p, BLOCK)
            r_p = tl.where(p_t > 0, tl.ceil((goal - m_gt) / p_t), c_eq)
            r_p = tl.minimum(tl.maximum(r_p, 1.0), c_eq)
            r_p = tl.where(t_p == t_star, tl.minimum(r_p, r_star), r_p)
            t_star = t_p
            r_star = r_p
        if TOPK or TOPP or MINP:
            mass = 0.0
            rank0 = 0.0
            for start in range(0, V, BLOCK):
                offs = start + cols
                x, ok, key = _load_row(row_ptr, offs, V, temp)
                kept, q, n_eq = _kept(x, ok, key, m, t_star, r_star, rank0, min_p, MINP)
                mass += tl.sum(q, axis=0)
                rank0 += n_eq
        # inverse CDF in id order: the first kept column whose running mass exceeds u * mass
        target = tl.load(u_ptr + row) * mass
        c = 0.0
        rank0 = 0.0
        tok = -1 + 0 * row
        last = 0 + 0 * row
        for start in range(0, V, BLOCK):
            offs = start + cols
            x, ok, key = _load_row(row_ptr, offs, V, temp)
            kept, q, n_eq = _kept(x, ok, key, m, t_star, r_star, rank0, min_p, MINP)
            cs = c + tl.cumsum(q, axis=0)
            cand = tl.min(tl.where(kept & (cs > target), offs, V), axis=0).to(tl.int64)
            tok = tl.where((tok < 0) & (cand < V), cand, tok)
            last = tl.maximum(last, tl.max(tl.where(kept, offs, 0), axis=0).to(tl.int64))
            c += tl.sum(q, axis=0)
            rank0 += n_eq
        tok = tl.where(tok < 0, last, tok)  # u * mass rounded past the last kept column
    tok = tl.where(n > 0, tok, 0)
    x_tok = tl.load(row_ptr + tok).to(tl.float32) / temp
    logp = tl.where(n > 0, x_tok - lse, float("nan"))
    tl.store(tok_ptr + row, tok)
    tl.store(logp_ptr + row, logp)


def sample_tokens_triton(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int,
                         top_p: float, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: logits [B, V] (unit column stride), u [B] fp32 -> tokens int64, logp fp32."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    B, V = x.shape
    tok = torch.empty(B, dtype=torch.int64, device=x.device)
    logp = torch.empty(B, dtype=torch.float32, device=x.device)
    if B == 0:
        return tok, logp
    greedy = temperature == 0
    _sample_tokens_kernel[(B,)](
        x, x.stride(0), u, tok, logp, V, 1.0 if greedy else float(temperature), int(top_k),
        float(top_p), float(min_p), GREEDY=greedy, TOPK=0 < top_k < V, TOPP=top_p < 1.0,
        MINP=min_p > 0.0, BLOCK=1024 if V >= 1024 else 128, NPIV=NPIV, num_warps=8)
    return tok, logp


# The Triton launcher as a custom op, so torch.compile (a compiled decode step) treats it as one
# opaque node; eager calls skip the wrapper.
if HAS_TRITON:

    @torch.library.custom_op("r1kernels_triton::sample_tokens", mutates_args=())
    def _sample_tokens_triton_op(logits: torch.Tensor, u: torch.Tensor, temperature: float,
                                 top_k: int, top_p: float, min_p: float
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_tokens_triton(logits, u, temperature, top_k, top_p, min_p)

    @_sample_tokens_triton_op.register_fake
    def _(logits, u, temperature, top_k, top_p, min_p):
        B = logits.shape[0]
        return (logits.new_empty(B, dtype=torch.int64), logits.new_empty(B, dtype=torch.float32))


# ---- torch path ---------------------------------------------------------------------------------


def sample_tokens_torch(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int,
                        top_p: float, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rule in plain torch, fp32; sorts the vocabulary when top_k or top_p filters."""
    B, V = logits.shape
    z = logits.float() if temperature == 0 else logits.float() / temperature
    finite = torch.isfinite(z)
    zf = z.masked_fill(~finite, float("-inf"))
    m = zf.amax(-1, keepdim=True)
    has = finite.any(-1)
    p = torch.exp(zf - m)
    lse = m.squeeze(-1) + torch.log(p.sum(-1))
    if temperature == 0:
        tok = zf.argmax(-1)  # the first maximum
    else:
        kept = p
        if 0 < top_k < V or top_p < 1.0:
            sp, order = torch.sort(zf, dim=-1, descending=True, stable=True)
            sp = torch.exp(sp - m)
            keep = torch.ones_like(sp, dtype=torch.bool)
            if 0 < top_k < V:
                keep[:, top_k:] = False
            if top_p < 1.0:
                q = sp * keep
                cum = q.cumsum(-1)
                keep &= (cum - q) < top_p * cum[:, -1:]
            kept = torch.zeros_like(p).scatter_(-1, order, sp * keep)
        if min_p > 0.0:
            kept = kept * (kept >= min_p)
        cdf = kept.cumsum(-1)
        target = u.reshape(B, 1) * cdf[:, -1:]
        tok = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        ids = torch.arange(V, device=logits.device)
        last = torch.where(kept > 0, ids, 0).amax(-1)
        tok = torch.minimum(tok, last)
    tok = torch.where(has, tok, torch.zeros_like(tok))
    logp = zf.gather(-1, tok[:, None]).squeeze(-1) - lse
    return tok, torch.where(has, logp, torch.full_like(logp, float("nan")))


# ---- public function ----------------------------------------------------------------------------


def _check(logits, temperature, top_k, top_p, min_p) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"sample_tokens: logits must be a floating-point tensor, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"sample_tokens: logits must be [B, V] with V >= 1, got shape "
                         f"{tuple(logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 <= temperature < float("inf"):
        raise ValueError(f"sample_tokens: temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"sample_tokens: top_k must be an int >= 0, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"sample_tokens: top_p must be in (0, 1], got {top_p!r}")
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1:
        raise ValueError(f"sample_tokens: min_p must be in [0, 1], got {min_p!r}")


def sample_tokens_with_uniforms(logits: torch.Tensor, uniforms: torch.Tensor, *,
                                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                                min_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` with the uniforms given (`[B]` fp32 in [0, 1), on the logits' device):
    what a compiled decode loop calls with uniforms drawn ahead of time from its generator."""
    _check(logits, temperature, top_k, top_p, min_p)
    temperature, top_k, top_p, min_p = float(temperature), int(top_k), float(top_p), float(min_p)
    u = uniforms.to(torch.float32).reshape(-1)
    if u.shape[0] != logits.shape[0] or u.device != logits.device:
        raise ValueError(f"sample_tokens: uniforms must be [B] = [{logits.shape[0]}] on "
                         f"{logits.device}, got {tuple(uniforms.shape)} on {uniforms.device}")
    backend = dispatch.select(OP, logits.device)
    if backend == "cpp":
        return torch.ops.r1kernels.sample_tokens(logits, u, temperature, top_k, top_p, min_p)
    if backend == "triton":
        if torch.compiler.is_compiling():
            return _sample_tokens_triton_op(logits, u, temperature, top_k, top_p, min_p)
        return sample_tokens_triton(logits, u, temperature, top_k, top_p, min_p)
    return sample_tokens_torch(logits, u, temperature, top_k, top_p, min_p)


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits [B, V]` and its log-prob under the unfiltered
    `softmax(logits / temperature)`; returns (tokens int64 [B], logp fp32 [B]). See docs/api.md.

    Filters in order top_k (0 = off), top_p (1 = off), min_p (0 = off); temperature 0 is greedy
    (the first maximum; logp under softmax(logits)). NaN and infinite logits are never sampled
    while a finite one remains; a row without one gives token 0 and logp NaN. One uniform per row
    comes from `generator` (on the logits' device): same generator state, same tokens.
    """
    _check(logits, temperature, top_k, top_p, min_p)
    u = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    return sample_tokens_with_uniforms(logits, u, temperature=temperature, top_k=top_k,
                                       top_p=top_p, min_p=min_p)
