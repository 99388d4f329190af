"""The log-prob ops and GRPOLoss on a distributed lm_head: FSDP2's DTensor weights, and a
vocabulary split over the ranks of a process group (tensor parallelism).

DTensor (FSDP2): `fully_shard` leaves a parameter outside its module's forward as a DTensor
(`Shard(0)` of the rows). `gather_weight` turns it into the whole tensor with
`full_tensor(grad_placements=[Partial()])`: forward all-gathers it, and backward hands the
gradient to the parameter as a Partial (per-rank) DTensor redistributed to the parameter's own
placement, i.e. a reduce-scatter (Shard) or an all-reduce (Replicate) of the sum over ranks:
what FSDP2's own reduce-scatter computes before its divide factor. The fused single sweep of
`linear_token_logprobs_fwd_bwd` (gradients made in the forward) returns its grad_weight the same
way (`shard_grad`). A tied embedding's two gradients (FSDP2's, through the embedding, and this
one) are summed on the parameter's `.grad`. A DTensor means data parallelism (docs/api.md):
each rank's hidden states and labels are its own, so the ranks' gradients are summed. For a
vocabulary split over ranks with the same batch on each (tensor parallelism), pass the local
slice (`dtensor.to_local()`) and `process_group=` instead.

Tensor-parallel vocabulary: rank r holds rows [o_r, o_r + V_r) of the lm_head (or columns of the
logits), in rank order. The ops run unchanged on the local slice with a local label (the real
one where the rank owns it, else the dummy id 0), which gives the local log-partition
lse_r = z_label_r - logp_r (z_label_r the logit at the local label, one dot product per row) and
the local entropy H_r. Across ranks, with M = max_r lse_r, e_r = exp(lse_r - M), S = sum_r e_r:
    lse  = M + log S,   m_r = e_r / S   (the probability mass of rank r's slice)
    logp = [logp_r + lse_r - M at the owner] - log S
    H    = sum_r m_r (H_r - log m_r) = sum_r e_r (H_r - (lse_r - M)) / S + log S
Two all-reduces per chunk of rows: MAX of lse_r (4 bytes per token) and SUM of
(e_r, owner's logp_r + lse_r - M, e_r (H_r - lse_r + M)) (8 bytes per token, 12 with entropy):
12-16 bytes of payload per token (a ring all-reduce sends and receives 2 (R - 1) / R times its
payload per rank). Gradients (p_i = m_r q_i, q the local softmax, g = dL/dlogp, e = dL/dH):
    dL/dz_i = g (1[i = label] - m_r q_i) - e m_r q_i (log q_i + log m_r + H)
which is the local op's own backward with upstream a on logp_r and b on H_r,
    b = e m_r,   a = g m_r + e m_r (log m_r + H - H_r),
plus c = (owned ? g : 0) - a at the local label's logit (a rank-1 fix-up through dz/dx there).
All of this is in the head's logits z = softcap * tanh(logit_scale * x / softcap) / T
(logit_scale * x / T without a soft-cap; x the raw logit), which the local ops see: z at the
local label is computed here from x the same way, and the fix-up reaches x through
dz/dx = logit_scale * (1 - tanh^2) / T (logit_scale / T without a soft-cap). So every rank keeps
its slice's grad_weight / grad_logits, and grad_hidden, a partial sum on each rank, is
all-reduced once per call: H elements per token in hidden's dtype (2 H bytes of payload per
token in bf16). The fused single sweep makes the conversion inside
its per-chunk grad_fn (the chunk's two all-reduces), so its gradients still come out of the
forward. Labels are global ids: one outside [0, sum_r V_r) is an IndexError on every rank
(every rank sees the same labels). The slice sizes are exchanged once per call (an all-gather of
one int64 per rank).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

LOCAL_IGNORE = -1  # ignore_index of the local ops (a local label is >= 0, so never ignored)


# ---- DTensor (FSDP2) ----------------------------------------------------------------------------


def is_dtensor(t) -> bool:
    if not dist.is_available():  # (torch builds without torch.distributed)
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gather_weight(t):
    """The whole tensor of a DTensor (any placement), differentiable: its gradient reaches the
    DTensor with the DTensor's own placement as the sum over ranks (Partial -> placement: a
    reduce-scatter for Shard, an all-reduce for Replicate). Plain tensors and None pass as they
    are."""
    if t is None or not is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial()] * t.device_mesh.ndim)


def shard_grad(grad: torch.Tensor | None, like):
    """A gradient of the whole tensor computed on this rank -> the DTensor of `like`'s mesh and
    placement holding the sum over ranks of every rank's gradient."""
    if grad is None or not is_dtensor(like):
        return grad
    from torch.distributed.tensor import DTensor, Partial

    partial = DTensor.from_local(grad, like.device_mesh, [Partial()] * like.device_mesh.ndim,
                                 run_check=False)
    return partial.redistribute(like.device_mesh, like.placements)


# ---- tensor-parallel vocabulary: bookkeeping ----------------------------------------------------


class VocabSlice:
    """This rank's slice [lo, hi) of a vocabulary split over `group` (sizes exchanged once)."""

    def __init__(self, group, vocab_local: int, device: torch.device):
        self.group = group
        self.world = dist.get_world_size(group)
        mine = torch.tensor([vocab_local], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(sizes, mine, group=group)
        sizes = [int(s) for s in torch.cat(sizes).tolist()]
        rank = dist.get_rank(group)
        self.lo = sum(sizes[:rank])
        self.hi = self.lo + vocab_local
        self.total = sum(sizes)

    def localize(self, y: torch.Tensor, ignore_index: int):
        """Global labels [N] (int64) -> (local labels for the local op, the same with the dummy 0
        at ignored rows (safe to index with), owned [N] bool, valid [N] bool)."""
        valid = y != ignore_index
        owned = valid & (y >= self.lo) & (y < self.hi)
        safe = torch.where(owned, y - self.lo, 0)
        local = torch.where(valid, safe, LOCAL_IGNORE)
        return local, safe, owned, valid


def check_group(op: str, group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: process_group needs an initialized torch.distributed, got "
                         f"{group!r} without one")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"{op}: process_group must be a torch.distributed.ProcessGroup, got "
                         f"{type(group).__name__}")


# ---- the combination across ranks ---------------------------------------------------------------


def combine(lse_r, logp_r, ent_r, owned, valid, group):
    """Whole-vocabulary (logp, entropy or None, m_r, lse) from the local statistics: the two
    all-reduces of the module docstring. Ignored rows give 0."""
    lse_r = torch.where(valid, lse_r, 0.0)
    mx = lse_r.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    d = lse_r - mx
    e = torch.exp(d)
    parts = [e, torch.where(owned, logp_r + d, 0.0)]
    if ent_r is not None:
        parts.append(e * (ent_r - d))
    pack = torch.stack(parts)
    dist.all_reduce(pack, group=group)
    log_s = torch.log(pack[0])
    logp = torch.where(valid, pack[1] - log_s, 0.0)
    ent = None if ent_r is None else torch.where(valid, pack[2] / pack[0] + log_s, 0.0)
    m_r = torch.where(valid, e / pack[0], 0.0)
    return logp, ent, m_r, mx + log_s


def local_upstream(g_l, g_h, m_r, log_m, ent, ent_r, owned, valid):
    """(a on logp_r, b on H_r or None, c at the local label's logit) for upstream gradients g_l
    on logp and g_h on the entropy (None: no entropy term): see the module docstring."""
    g_l = torch.where(valid, g_l.float(), 0.0)
    a = g_l * m_r
    b = None
    if g_h is not None:
        g_h = torch.where(valid, g_h.float(), 0.0)
        b = g_h * m_r
        a = a + b * torch.where(valid, log_m + ent - ent_r, 0.0)
    c = torch.where(owned, g_l, 0.0) - a
    return a, b, c


class _Combine(torch.autograd.Function):
    """(lse_r, logp_r, ent_r | None) -> (logp, ent | None) of the whole vocabulary; backward is
    local (the upstream gradients are the same on every rank)."""

    @staticmethod
    def forward(ctx, lse_r, logp_r, ent_r, owned, valid, group):
        logp, ent, m_r, lse = combine(lse_r, logp_r, ent_r, owned, valid, group)
        ctx.save_for_backward(m_r, torch.where(valid, lse_r - lse, 0.0), ent, ent_r, owned, valid)
        ctx.has_ent = ent_r is not None
        if ent is None:
            return logp
        return logp, ent

    @staticmethod
    def backward(ctx, g_l, g_h=None):
        m_r, log_m, ent, ent_r, owned, valid = ctx.saved_tensors
        if g_l is None:
            g_l = torch.zeros_like(m_r)
        a, b, c = local_upstream(g_l, g_h if ctx.has_ent else None, m_r, log_m, ent, ent_r,
                                 owned, valid)
        # lse_r = z_label_r - logp_r: dL/dlse_r = c, and logp_r receives a = (its own) - c
        return c, a + c, b, None, None, None


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient (an input replicated on every rank
    whose per-rank gradients are partial sums: the hidden states of a vocabulary-split head)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _head(op: str, temperature, softcap, logit_scale) -> tuple[float, float]:
    """The local ops' head constants (inv_temp, cap), arguments checked (tlp.head_constants)."""
    from r1kernels.ops import token_logprobs as tlp

    return tlp.head_constants(op, tlp.check_temperature(op, temperature), softcap, logit_scale)


def _head_logits(x, inv_temp: float, cap: float):
    """The head's logits z of raw fp32 logits x, as the local ops compute them: inv_temp *
    tanh(cap * x) with a soft-cap (cap != 0), else inv_temp * x; differentiable."""
    return (torch.tanh(x * cap) if cap else x) * inv_temp


def _head_slope(x, inv_temp: float, cap: float):
    """dz/dx of _head_logits at raw fp32 logits x [N]: inv_temp * cap * sech^2(cap x)
    (= logit_scale (1 - tanh^2) / T), or inv_temp (= logit_scale / T) without a soft-cap.
    sech^2 y as 4e / (1 + e)^2 with e = exp(-2|y|), as the kernels (no cancellation where tanh
    saturates)."""
    if not cap:
        return torch.full_like(x, inv_temp)
    e = torch.exp(-2.0 * (x * cap).abs())
    return 4.0 * e / ((1.0 + e) * (1.0 + e)) * (inv_temp * cap)


def _label_logits(h, w, b, safe, rows: int = 4096):
    """The raw logit at the local label per row, fp32 [N]: h . w[label] + b[label],
    differentiable (N * H multiply-adds, in row chunks of `rows` to bound the [rows, H]
    temporaries)."""
    out = []
    for r0 in range(0, h.shape[0], rows):
        s = safe[r0:r0 + rows]
        x = (h[r0:r0 + rows].float() * w.index_select(0, s).float()).sum(-1)
        if b is not None:
            x = x + b.index_select(0, s).float()
        out.append(x)
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


def _check_labels(op, labels, batch_shape, ignore_index, device, vs: VocabSlice):
    from r1kernels.ops import token_logprobs as tlp

    tlp.check_labels(op, labels, batch_shape, ignore_index, device)
    y = tlp.flat_labels(labels)
    tlp.check_label_values(op, y, vs.total, ignore_index)  # same labels, same error everywhere
    return y


# ---- tensor-parallel ops ------------------------------------------------------------------------


def token_logprobs(logits, labels, *, temperature, ignore_index, with_entropy, inplace_backward,
                   softcap, logit_scale, group):
    """token_logprobs of a vocabulary split over `group` (logits [..., V_r])."""
    from r1kernels.ops import token_logprobs as tlp

    op = tlp.OP
    check_group(op, group)
    tlp.check_float(op, "logits", logits)
    vs = VocabSlice(group, logits.shape[-1], logits.device)
    y = _check_labels(op, labels, logits.shape[:-1], ignore_index, logits.device, vs)
    inv_temp, cap = _head(op, temperature, softcap, logit_scale)
    local, safe, owned, valid = vs.localize(y, ignore_index)
    out = tlp.token_logprobs(logits, local.view(labels.shape), temperature=temperature,
                             ignore_index=LOCAL_IGNORE, with_entropy=with_entropy,
                             inplace_backward=inplace_backward, softcap=softcap,
                             logit_scale=logit_scale)
    logp_r, ent_r = (out[0].reshape(-1), out[1].reshape(-1)) if with_entropy else \
        (out.reshape(-1), None)
    x = logits.reshape(-1, logits.shape[-1])
    z = _head_logits(x.gather(1, safe.unsqueeze(1)).squeeze(1).float(), inv_temp, cap)
    res = _Combine.apply(z - logp_r, logp_r, ent_r, owned, valid, group)
    if with_entropy:
        return res[0].view(labels.shape), res[1].view(labels.shape)
    return res.view(labels.shape)


def token_logprobs_fwd_bwd(logits, labels, grad_logp, *, grad_entropy, temperature, ignore_index,
                           with_entropy, inplace, softcap, logit_scale, group):
    """token_logprobs_fwd_bwd of a vocabulary split over `group`: (logp, entropy, grad_logits
    of this rank's columns)."""
    from r1kernels.ops import token_logprobs as tlp

    op = "token_logprobs_fwd_bwd"
    check_group(op, group)
    tlp.check_float(op, "logits", logits)
    vs = VocabSlice(group, logits.shape[-1], logits.device)
    y = _check_labels(op, labels, logits.shape[:-1], ignore_index, logits.device, vs)
    glp, gent = tlp.check_upstream_grads(op, labels, grad_logp, grad_entropy, with_entropy,
                                         logits.device)
    inv_temp, cap = _head(op, temperature, softcap, logit_scale)
    head = dict(softcap=softcap, logit_scale=logit_scale)
    local, safe, owned, valid = vs.localize(y, ignore_index)
    x = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        raw = x.gather(1, safe.unsqueeze(1)).squeeze(1).float()
        z = _head_logits(raw, inv_temp, cap)
        # the local statistics, then the local op's backward with the converted upstream
        out = tlp.token_logprobs(x.detach(), local, temperature=temperature,
                                 ignore_index=LOCAL_IGNORE, with_entropy=with_entropy, **head)
        logp_r, ent_r = out if with_entropy else (out, None)
        logp, ent, m_r, lse = combine(z - logp_r, logp_r, ent_r, owned, valid, group)
        a, b, c = local_upstream(glp, gent, m_r, torch.where(valid, z - logp_r - lse, 0.0), ent,
                                 ent_r, owned, valid)
        _, _, g = tlp.token_logprobs_fwd_bwd(x, local, a, grad_entropy=b, temperature=temperature,
                                             ignore_index=LOCAL_IGNORE, with_entropy=b is not None,
                                             inplace=inplace, **head)
        g = g.view(x.shape)
        fix = c * _head_slope(raw, inv_temp, cap)
        g.scatter_add_(1, safe.unsqueeze(1), fix.to(g.dtype).unsqueeze(1))
    shape = labels.shape
    grad = logits if g.data_ptr() == logits.data_ptr() else g.view(logits.shape)
    return logp.view(shape), (ent.view(shape) if with_entropy else None), grad


def linear_token_logprobs(hidden, weight, labels, *, bias, temperature, ignore_index, with_entropy,
                          softcap, logit_scale, group):
    """linear_token_logprobs of an lm_head whose rows are split over `group` (weight [V_r, H])."""
    from r1kernels.ops import linear_token_logprobs as ltl
    from r1kernels.ops import token_logprobs as tlp

    op = ltl.OP
    check_group(op, group)
    tlp.check_float(op, "weight", weight, min_dim=2)
    tlp.check_float(op, "hidden", hidden)
    vs = VocabSlice(group, weight.shape[0], hidden.device)
    y = _check_labels(op, labels, hidden.shape[:-1], ignore_index, hidden.device, vs)
    inv_temp, cap = _head(op, temperature, softcap, logit_scale)
    local, safe, owned, valid = vs.localize(y, ignore_index)
    h = _SumGradOverRanks.apply(hidden, group)
    out = ltl.linear_token_logprobs(h, weight, local.view(labels.shape), bias=bias,
                                    temperature=temperature, ignore_index=LOCAL_IGNORE,
                                    with_entropy=with_entropy, softcap=softcap,
                                    logit_scale=logit_scale)
    logp_r, ent_r = (out[0].reshape(-1), out[1].reshape(-1)) if with_entropy else \
        (out.reshape(-1), None)
    z = _head_logits(_label_logits(h.reshape(-1, h.shape[-1]), weight, bias, safe), inv_temp, cap)
    res = _Combine.apply(z - logp_r, logp_r, ent_r, owned, valid, group)
    if with_entropy:
        return res[0].view(labels.shape), res[1].view(labels.shape)
    return res.view(labels.shape)


def linear_with_grad(hidden, weight, labels, bias, *, temperature, ignore_index, with_entropy,
                     grad_fn: Callable, group, need_grads=(True, True, True),
                     vocab_slice: VocabSlice | None = None, softcap=None, logit_scale=1.0, **kw):
    """linear_token_logprobs_with_grad (same arguments and returns: hidden [N, H], global
    labels [N], already checked against the whole vocabulary) for a vocabulary split over
    `group`: grad_fn sees the whole vocabulary's log-probs and entropies of each chunk, the
    returned logp / entropy are those, grad_hidden is summed over ranks and grad_weight /
    grad_bias are this rank's slice. `kw`: chunk_multiple, chunk_bounds, sweep (the cluster
    chunk kernel, which computes dL/dlogp from local statistics, is not used). vocab_slice:
    the caller's VocabSlice of this weight (else the slice sizes are exchanged here)."""
    from r1kernels.ops import linear_token_logprobs as ltl

    kw.pop("chunk_kernel", None)
    kw.pop("labels_checked", None)
    vs = vocab_slice or VocabSlice(group, weight.shape[0], hidden.device)
    y = labels.reshape(-1).to(torch.int64)
    inv_temp, cap = _head("linear_token_logprobs_with_grad", temperature, softcap, logit_scale)
    local, safe, owned, valid = vs.localize(y, ignore_index)
    n = y.numel()
    with torch.no_grad():
        raw = _label_logits(hidden, weight, bias, safe)
        z, slope = _head_logits(raw, inv_temp, cap), _head_slope(raw, inv_temp, cap)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp_all, ent_all = torch.zeros(n, **f32), torch.zeros(n, **f32) if with_entropy else None
    fix = torch.zeros(n, **f32)

    def local_grad_fn(start, end, logp_r, ent_r):
        sl = slice(start, end)
        logp, ent, m_r, lse = combine(z[sl] - logp_r, logp_r, ent_r, owned[sl], valid[sl], group)
        logp_all[sl] = logp
        if with_entropy:
            ent_all[sl] = ent
        out = grad_fn(start, end, logp, ent)
        g_l, g_h = out if isinstance(out, tuple) else (out, None)
        log_m = torch.where(valid[sl], z[sl] - logp_r - lse, 0.0)
        a, b, c = local_upstream(g_l, g_h, m_r, log_m, ent, ent_r, owned[sl], valid[sl])
        fix[sl] = c * slope[sl]
        return a if b is None else (a, b)

    _, _, gh, gw, gb = ltl.linear_token_logprobs_with_grad(
        hidden, weight, local, bias, temperature=temperature, ignore_index=LOCAL_IGNORE,
        with_entropy=with_entropy, grad_fn=local_grad_fn, need_grads=need_grads,
        labels_checked=True, softcap=softcap, logit_scale=logit_scale, **kw)
    with torch.no_grad():  # the rank-1 fix-up at each row's local label
        if gh is not None:
            gh = (gh.float() + fix.unsqueeze(1) * weight.index_select(0, safe).float()).to(gh.dtype)
            if gh.numel():
                dist.all_reduce(gh, group=group)
        if gw is not None:
            gw.index_add_(0, safe, (fix.unsqueeze(1) * hidden.float()).to(gw.dtype))
        if gb is not None:
            gb.index_add_(0, safe, fix.to(gb.dtype))
    return logp_all, ent_all, gh, gw, gb


def linear_token_logprobs_fwd_bwd(hidden, weight, labels, grad_logp, *, grad_entropy, bias,
                                  temperature, ignore_index, with_entropy, softcap, logit_scale,
                                  group):
    """linear_token_logprobs_fwd_bwd of an lm_head whose rows are split over `group`."""
    from r1kernels.ops import linear_token_logprobs as ltl
    from r1kernels.ops import token_logprobs as tlp

    op = "linear_token_logprobs_fwd_bwd"
    check_group(op, group)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must be a tensor [..., H], got {type(hidden).__name__}")
    tlp.check_float(op, "weight", weight, min_dim=2)
    glp, gent = tlp.check_upstream_grads(op, labels, grad_logp, grad_entropy, with_entropy,
                                         hidden.device)
    ltl._prepare(op, hidden, weight, labels, bias, temperature, LOCAL_IGNORE, label_data=False,
                 softcap=softcap, logit_scale=logit_scale)
    vs = VocabSlice(group, weight.shape[0], hidden.device)
    _check_labels(op, labels, hidden.shape[:-1], ignore_index, hidden.device, vs)
    h2 = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])

    def grad_fn(start, end, logp, ent):
        return glp[start:end], (None if gent is None else gent[start:end])

    logp, ent, gh, gw, gb = linear_with_grad(
        h2, weight, labels, bias, temperature=temperature, ignore_index=ignore_index,
        with_entropy=with_entropy, grad_fn=grad_fn, group=group,
        need_grads=(True, True, bias is not None), softcap=softcap, logit_scale=logit_scale)
    shape = labels.shape
    return (logp.view(shape), None if ent is None else ent.view(shape), gh.view(hidden.shape), gw,
            gb)


def logits_with_grad(logits, labels, *, temperature, ignore_index, with_entropy, grad_fn,
                     inplace, softcap, logit_scale, group):
    """token_logprobs_with_grad (logits [N, V_r], global labels [N]) for a vocabulary split over
    `group`: (logp, entropy or None of the whole vocabulary, grad_logits of this rank's
    columns); grad_fn is called once with (0, N) and the whole vocabulary's statistics."""
    from r1kernels.ops import token_logprobs as tlp

    vs = VocabSlice(group, logits.shape[-1], logits.device)
    y = _check_labels("GRPOLoss.from_logits", labels, labels.shape, ignore_index, logits.device, vs)
    inv_temp, cap = _head("GRPOLoss.from_logits", temperature, softcap, logit_scale)
    local, safe, owned, valid = vs.localize(y, ignore_index)
    raw = logits.detach().gather(1, safe.unsqueeze(1)).squeeze(1).float()
    z = _head_logits(raw, inv_temp, cap)
    keep = {}

    def local_grad_fn(start, end, logp_r, ent_r):
        logp, ent, m_r, lse = combine(z - logp_r, logp_r, ent_r, owned, valid, group)
        keep.update(logp=logp, ent=ent)
        g_l = grad_fn(start, end, logp, ent)
        a, _, c = local_upstream(g_l, None, m_r, None, ent, ent_r, owned, valid)
        keep["fix"] = c * _head_slope(raw, inv_temp, cap)
        return a

    _, _, g = tlp.token_logprobs_with_grad(logits, local, temperature=temperature,
                                           ignore_index=LOCAL_IGNORE, with_entropy=with_entropy,
                                           grad_fn=local_grad_fn, inplace=inplace,
                                           softcap=softcap, logit_scale=logit_scale)
    with torch.no_grad():
        g.view(-1, logits.shape[-1]).scatter_add_(1, safe.unsqueeze(1),
                                                  keep["fix"].to(g.dtype).unsqueeze(1))
    return keep["logp"], keep["ent"], g
