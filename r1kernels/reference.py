"""Plain-PyTorch references for every op, written for clarity, not speed.

Each `<op>_ref` is dtype-generic: give it float64 inputs and it computes in float64, which is what
the tests compare every backend against. Low-precision inputs are upcast to at least float32,
matching what the kernels promise. Semantics are those of shared/API.md.
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
                       ignore_index: int = -100, with_entropy: bool = False):
    """logp = log_softmax(logits / T)[label] (0 where label == ignore_index); optional entropy."""
    x = _upcast(logits) / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not with_entropy:
        return logp
    entropy = torch.special.entr(logp_all.exp()).sum(-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp, entropy


def linear_token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              ignore_index: int = -100, with_entropy: bool = False):
    """token_logprobs_ref(hidden @ weight.T + bias, labels, ...), with materialized logits."""
    logits = _upcast(hidden) @ _upcast(weight).T
    if bias is not None:
        logits = logits + _upcast(bias)
    return token_logprobs_ref(logits, labels, temperature=temperature, ignore_index=ignore_index,
                              with_entropy=with_entropy)


# ---- GRPO loss --------------------------------------------------------------------------------

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")


def grpo_loss_ref(logps, advantages, mask, *, old_logps=None, ref_logps=None, loss_type="dapo",
                  epsilon_low=0.2, epsilon_high=None, delta=None, beta=0.0,
                  importance_sampling_level="token", use_bias_correction_kl=False,
                  rollout_is_weights=None, max_completion_length=None, num_items_in_batch=None,
                  sapo_temperature_pos=1.0, sapo_temperature_neg=1.05):
    """The GRPO loss of TRL 1.16 `GRPOTrainer._compute_loss` (gradient accumulation 1).

    Returns (loss, metrics) with metrics kl, clip_ratio_low, clip_ratio_high, clip_ratio.
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
