"""Plain-PyTorch references for every op, written for clarity, not speed.

Each `<op>_ref` is dtype-generic: give it float64 inputs and it computes in float64, which is what
the tests compare every backend against. Low-precision inputs are upcast to at least float32,
matching what the kernels promise. Semantics are those of docs/api.md.
"""
from __future__ import annotations

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


# ---- group-normalized advantages --------------------------------------------------------------


def group_advantages_ref(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                         eps: float = 1e-4) -> torch.Tensor:
    """A = (r - mean_group(r)) / (std + eps); NaN rewards ignored and given 0; constant groups 0."""
    r = _upcast(rewards).reshape(-1, group_size)
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True)
    rz = torch.where(valid, r, torch.zeros_like(r))
    mean = rz.sum(1, keepdim=True) / n.clamp(min=1)
    dev = torch.where(valid, r - mean, torch.zeros_like(r))
    inf = torch.full_like(r, float("inf"))
    lo = torch.where(valid, r, inf).amin(1, keepdim=True)
    hi = torch.where(valid, r, -inf).amax(1, keepdim=True)
    constant = (n <= 1) | (lo == hi)
    if scale == "group":
        var = (dev * dev).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        std = torch.sqrt(torch.where(constant, torch.ones_like(var), var))  # no sqrt(0) in grad
        denom = std + eps
    elif scale == "batch":
        nb = valid.sum()
        mean_b = rz.sum() / nb.clamp(min=1)
        dev_b = torch.where(valid, r - mean_b, torch.zeros_like(r))
        var_b = (dev_b * dev_b).sum() / (nb - 1).clamp(min=1)
        # a batch with no spread has only constant groups, whose advantage is 0 anyway
        std_b = torch.sqrt(torch.where(var_b > 0, var_b, torch.ones_like(var_b)))
        std_b = torch.where(var_b > 0, std_b, torch.zeros_like(std_b))
        denom = std_b + eps
    elif scale == "none":
        denom = torch.ones_like(mean)
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    adv = torch.where(constant | ~valid, torch.zeros_like(r), dev / denom)
    return adv.reshape(rewards.shape)


# ---- per-token log-probabilities --------------------------------------------------------------


def token_logprobs_ref(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                       ignore_index: int = -100, with_entropy: bool = False,
                       softcap: float | None = None, logit_scale: float = 1.0):
    """logp = log_softmax(z)[label] (0 where label == ignore_index); optional entropy. z is the
    head's: logits * logit_scale, then softcap * tanh(. / softcap) when softcap is given, then
    / temperature."""
    x = _upcast(logits) * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    x = x / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    labels = labels.long()  # (compared with ignore_index in int64, whatever the labels' dtype)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not with_entropy:
        return logp
    entropy = torch.special.entr(logp_all.exp()).sum(-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp, entropy


def linear_token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              ignore_index: int = -100, with_entropy: bool = False,
                              softcap: float | None = None, logit_scale: float = 1.0):
    """token_logprobs_ref(hidden @ weight.T + bias, labels, ...), with materialized logits."""
    logits = _upcast(hidden) @ _upcast(weight).T
    if bias is not None:
        logits = logits + _upcast(bias)
    return token_logprobs_ref(logits, labels, temperature=temperature, ignore_index=ignore_index,
                              with_entropy=with_entropy, softcap=softcap, logit_scale=logit_scale)


# ---- GRPO loss --------------------------------------------------------------------------------

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")


def grpo_loss_ref(logps, advantages, mask, *, old_logps=None, ref_logps=None, loss_type="dapo",
                  epsilon_low=0.2, epsilon_high=None, delta=None, beta=0.0,
                  importance_sampling_level="token", use_bias_correction_kl=False,
                  rollout_is_weights=None, max_completion_length=None, num_items_in_batch=None,
                  sapo_temperature_pos=1.0, sapo_temperature_neg=1.05):
    """The GRPO loss of TRL 1.16 `GRPOTrainer._compute_loss` (gradient accumulation 1).

    Returns (loss, metrics) with metrics kl, clip_ratio_low, clip_ratio_high, clip_ratio.
    Checked against TRL 1.16's source (and its code, in tests/test_grpo_loss.py): loss and
    gradient agree for every loss type. Metrics: like TRL, the clip flags use coef_1 after the
    delta clamp; cispo's clip_ratio_high is TRL's `cispo_clip_ratio`. Where TRL differs: with
    importance_sampling_level="sequence" (and [B] advantages) TRL averages the clip flags per
    sequence over all rows; here they are fractions of masked tokens (docs/api.md). TRL's
    use_bias_correction_kl defaults to True; the API's default is False.
    """
    eps_lo = epsilon_low
    eps_hi = epsilon_low if epsilon_high is None else epsilon_high
    m = mask.to(logps.dtype)
    A = advantages.to(logps.dtype)
    if A.dim() == 1:
        A = A.unsqueeze(1)
    old = logps.detach() if old_logps is None else old_logps.to(logps.dtype)
    log_ratio = logps - old
    if importance_sampling_level == "token":
        w = log_ratio
    elif importance_sampling_level == "sequence":
        w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                         f"{importance_sampling_level!r}")
    coef_1 = torch.exp(w)
    coef_1_kl = coef_1
    zero = torch.zeros_like(logps)
    if loss_type == "cispo":
        clamped = torch.clamp(coef_1, max=eps_hi).detach()
        loss_tok = -clamped * A * logps
        low = zero.bool()
        high = ((coef_1 > eps_hi) & (A > 0)).expand_as(logps)
    elif loss_type == "sapo":
        tau = torch.where(A > 0, torch.full_like(A, sapo_temperature_pos),
                          torch.full_like(A, sapo_temperature_neg))
        loss_tok = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * A
        low = zero.bool()
        high = zero.bool()
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - eps_lo, 1 + eps_hi)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        loss_tok = -torch.min(coef_1 * A, coef_2 * A)
        # TRL 1.16 computes the clip metrics from coef_1 after the delta clamp
        low = ((coef_1 < 1 - eps_lo) & (A < 0)).expand_as(logps)
        high = ((coef_1 > 1 + eps_hi) & (A > 0)).expand_as(logps)
    else:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    loss_tok = loss_tok.expand_as(logps)
    if rollout_is_weights is not None:
        loss_tok = loss_tok * rollout_is_weights.to(logps.dtype)
    kl = zero
    if beta != 0.0:
        d = ref_logps.to(logps.dtype) - logps
        kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            kl = kl * coef_1_kl
        loss_tok = loss_tok + beta * kl

    B, T = logps.shape
    lm = loss_tok * m
    if loss_type in ("grpo", "sapo"):
        loss = (lm.sum(-1) / m.sum(-1).clamp(min=1.0)).mean() if B > 0 else lm.sum()
    elif loss_type == "bnpo":
        loss = lm.sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        L = T if max_completion_length is None else max_completion_length
        loss = lm.sum() / max(B * L, 1)
    elif loss_type in ("dapo", "cispo"):
        n = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=logps.dtype)
        loss = lm.sum() / n.clamp(min=1.0)
    else:  # luspo
        loss = lm.sum(-1).mean() if B > 0 else lm.sum()

    msum = m.sum().clamp(min=1.0)
    lowf = (low.to(m.dtype) * m).sum() / msum
    highf = (high.to(m.dtype) * m).sum() / msum
    metrics = {
        "kl": ((kl * m).sum() / msum).detach(),
        "clip_ratio_low": lowf.detach(),
        "clip_ratio_high": highf.detach(),
        "clip_ratio": (((low | high).to(m.dtype) * m).sum() / msum).detach(),
    }
    return loss, metrics


# ---- MoE routing ------------------------------------------------------------------------------
# Ordering used by every backend: a row is ranked by (tier, value, -index), descending. Tiers put
# NaN scores last (and, for expert selection, experts outside the chosen groups after every
# eligible one), so NaN is never picked while a non-NaN score remains; equal values go to the
# lower index. -0.0 equals +0.0 (torch.sort already treats them as equal).


def _order_desc(values: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
    """Permutation along the last dim sorting by (tier, value) descending, ties to lower index."""
    o1 = torch.sort(values, dim=-1, descending=True, stable=True).indices
    o2 = torch.sort(tier.gather(-1, o1), dim=-1, descending=True, stable=True).indices
    return o1.gather(-1, o2)


def moe_route_ref(router_logits: torch.Tensor, top_k: int, *, score_func: str = "softmax",
                  n_group: int = 1, topk_group: int = 1, correction_bias=None,
                  norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                  replay_ids=None, expert_scale=None):
    """(weights [T, k], ids [T, k] int32) of docs/api.md `moe_route`, via sorts and gathers."""
    x = _upcast(router_logits)
    T, E = x.shape
    if score_func == "softmax":
        s = torch.softmax(x, dim=-1)
    elif score_func == "sigmoid":
        s = torch.sigmoid(x)
    elif score_func == "sqrtsoftplus":
        s = torch.nn.functional.softplus(x).sqrt()
    else:
        raise ValueError(f"score_func must be 'softmax', 'sigmoid' or 'sqrtsoftplus', got {score_func!r}")
    if replay_ids is not None:
        ids = replay_ids.long()
    else:
        with torch.no_grad():
            choice = s.detach() + (correction_bias.to(s.dtype) if correction_bias is not None else 0)
            nan = torch.isnan(choice)
            val = choice.masked_fill(nan, float("-inf"))
            eligible = torch.ones_like(nan)
            if n_group > 1:
                gs = E // n_group
                order_in = _order_desc(val.view(T, n_group, gs), (~nan).view(T, n_group, gs).long())
                take = min(2, gs) if correction_bias is not None else 1
                gscore = choice.view(T, n_group, gs).gather(-1, order_in[..., :take]).sum(-1)
                gnan = torch.isnan(gscore)
                gorder = _order_desc(gscore.masked_fill(gnan, float("-inf")), (~gnan).long())
                keep = torch.zeros(T, n_group, dtype=torch.bool, device=x.device)
                keep.scatter_(1, gorder[:, :topk_group], True)
                eligible = keep.repeat_interleave(gs, dim=1)
            tier = torch.where(nan, 0, torch.where(eligible, 2, 1))
            ids = _order_desc(val, tier)[:, :top_k]
    w = s.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    if expert_scale is not None:
        w = w * _upcast(expert_scale)[ids]
    w = w * routed_scaling_factor
    return w, ids.to(torch.int32)


def moe_permute_ref(hidden: torch.Tensor, ids: torch.Tensor, num_experts: int, *, align: int = 1):
    """(permuted [T*k + E*(align-1), H], MoEPermutation) of docs/api.md `moe_permute`.

    Rows are ordered by expert, then token, then slot j; each expert segment starts at
    offsets[e] (a multiple of align); rows past the last segment are zero padding too.
    """
    from r1kernels.ops.moe import MoEPermutation

    T, k = ids.shape
    E = num_experts
    flat = ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= E):
        raise IndexError(f"moe_permute_ref: ids must be in [0, {E})")
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + align - 1) // align * align
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(padded, 0)])
    starts = torch.cumsum(counts, 0) - counts
    sorted_e = flat[order]
    rows_sorted = offsets[sorted_e] + torch.arange(flat.numel(), device=flat.device) - starts[sorted_e]
    R = T * k + E * (align - 1)
    row_ids = torch.empty_like(flat)
    row_ids[order] = rows_sorted
    token_ids = torch.full((R,), -1, dtype=torch.long, device=flat.device)
    token_ids[rows_sorted] = order // max(k, 1)
    src = hidden.repeat_interleave(k, dim=0)
    out = torch.zeros(R, hidden.shape[1], dtype=hidden.dtype, device=hidden.device).index_copy(0, row_ids, src)
    perm = MoEPermutation(counts.int(), offsets.int(), row_ids.view(T, k).int(), token_ids.int())
    return out, perm


def moe_unpermute_ref(expert_out: torch.Tensor, perm, weights: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * expert_out[row(t, j)], accumulated in fp32 (fp64 for fp64)."""
    dt = torch.float64 if torch.float64 in (expert_out.dtype, weights.dtype) else torch.float32
    rows = expert_out[perm.row_ids.long()]  # [T, k, H]
    y = (weights.to(dt).unsqueeze(-1) * rows.to(dt)).sum(1)
    return y.to(expert_out.dtype)


def moe_expert_counts_ref(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(ids.reshape(-1).long(), minlength=num_experts).to(torch.int32)


def moe_update_bias_ref(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    c = counts.to(torch.float64)
    return bias + rate * torch.sign(c.mean() - c).to(bias.dtype)


def moe_sequence_aux_loss_ref(scores: torch.Tensor, ids: torch.Tensor, seq_len, top_k: int,
                              alpha: float) -> torch.Tensor:
    """alpha * sum_i f_i P_i per sequence, averaged over sequences (DeepSeek-V3 eq. 17-20)."""
    s = _upcast(scores)
    T, E = s.shape
    lens = [seq_len] * (T // seq_len) if isinstance(seq_len, int) else [int(n) for n in seq_len]
    losses = []
    start = 0
    for n in lens:
        seg = s[start:start + n]
        p = (seg / seg.sum(-1, keepdim=True)).mean(0)
        cnt = torch.bincount(ids[start:start + n].reshape(-1).long(), minlength=E).to(s.dtype)
        f = E / (top_k * n) * cnt
        losses.append(alpha * (f * p).sum())
        start += n
    return torch.stack(losses).mean() if losses else s.sum() * 0


# ---- sampling -----------------------------------------------------------------------------------


def sample_tokens_ref(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Sort-based sampler; returns (tokens [B], logp [B], probs [B, V]).

    `z = logits / temperature` (logits at temperature 0); non-finite logits (NaN, +-inf) have
    probability 0. The tokens are ordered by (z descending, id ascending); top_k, top_p and min_p
    each keep a prefix of that order (top_p of the mass left by top_k, min_p against the largest
    probability), so the kept set is the shortest of the three prefixes. `probs` is that set's
    renormalized distribution; the token is its inverse CDF in id order at `uniforms [B]`
    (the first id whose cumulative kept mass exceeds `u * total`). Greedy at temperature 0.
    `logp = log softmax(z)[token]`, unfiltered. A row without a finite logit: token 0, logp NaN.
    """
    x = _upcast(logits)
    B, V = x.shape
    z = x if temperature == 0 else x / temperature
    finite = torch.isfinite(z)
    zf = torch.where(finite, z, torch.full_like(z, float("-inf")))
    m = zf.amax(-1, keepdim=True) if V else zf.new_full((B, 1), float("-inf"))
    logp_all = zf - m - torch.log(torch.exp(zf - m).sum(-1, keepdim=True))
    p = torch.exp(zf - m)
    order = torch.sort(zf, dim=-1, descending=True, stable=True).indices  # ties: lower id first
    sp = p.gather(-1, order)
    keep = finite.gather(-1, order)
    if temperature == 0:
        keep &= torch.arange(V, device=x.device) < 1
    if top_k > 0:
        keep &= torch.arange(V, device=x.device) < top_k
    if top_p < 1.0:
        kept = torch.where(keep, sp, torch.zeros_like(sp))
        cum = kept.cumsum(-1)
        keep &= (cum - kept) < top_p * cum[:, -1:]  # the shortest prefix reaching top_p
    if min_p > 0.0:
        keep &= sp >= min_p  # the largest probability is exp(0) = 1 here
    kept = torch.zeros_like(p).scatter(-1, order, torch.where(keep, sp, torch.zeros_like(sp)))
    total = kept.sum(-1, keepdim=True)
    probs = kept / total
    cdf = kept.cumsum(-1)
    target = uniforms.to(cdf.dtype).reshape(B, 1) * total
    last = torch.where(kept > 0, torch.arange(V, device=x.device), -1).amax(-1) if V else \
        torch.zeros(B, dtype=torch.long, device=x.device)
    tokens = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    tokens = torch.minimum(tokens, last.clamp(min=0))
    has = finite.any(-1)
    tokens = torch.where(has, tokens, torch.zeros_like(tokens))
    logp = logp_all.gather(-1, tokens[:, None]).squeeze(-1) if V else x.new_full((B,), float("nan"))
    logp = torch.where(has, logp, torch.full_like(logp, float("nan")))
    return tokens, logp, probs


# ---- decode attention ---------------------------------------------------------------------------


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                         mask: torch.Tensor | None = None, scale: float | None = None,
                         kv_start: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per row over slots kv_start[b] (default 0) .. kv_len[b] - 1, row by row
    and head by head: softmax(scale q k^T + mask) v; zeros for a row with no slot or all of them
    at -inf."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    x, kk, vv = _upcast(q), _upcast(k), _upcast(v)
    out = torch.zeros_like(x)
    for b in range(B):
        slots = slice(0 if kv_start is None else int(kv_start[b]), int(kv_len[b]))
        for h in range(Hq):
            s = (kk[b, h // G, slots] @ x[b, h]) * scale
            if mask is not None:
                s = s + mask[b, slots].to(s.dtype)
            if s.numel() == 0 or not bool((s > float("-inf")).any()):
                continue
            out[b, h] = torch.softmax(s, 0) @ vv[b, h // G, slots]
    return out
