"""The two losses of the trainer, computed from last hidden states and the lm_head weight.

`policy_loss` is the GRPO objective on completion tokens; `sft_loss` is masked next-token NLL.
Both go through r1kernels so the full `[tokens, vocab]` logits are never materialized when the
fused ops are available (`r1kernels.GRPOLoss`, `r1kernels.linear_token_logprobs`). When this
checkout of r1kernels does not have them yet, the same math runs on the plain-torch references of
`r1kernels.reference` (materialized logits) - identical results, more memory.
"""
from __future__ import annotations

import torch

import r1kernels
from r1kernels import reference


def token_logprobs_from_hidden(hidden, weight, bias, labels) -> torch.Tensor:
    """Per-token log p(label) [B, T] fp32 from hidden [B, T, H] and lm_head weight [V, H]."""
    if hasattr(r1kernels, "linear_token_logprobs"):
        return r1kernels.linear_token_logprobs(hidden, weight, labels, bias=bias)
    return reference.linear_token_logprobs_ref(hidden, weight, labels, bias=bias)


_LOSS_MODULES: dict = {}


def policy_loss(hidden, weight, bias, labels, mask, advantages, *, ref_logps=None,
                num_items_in_batch=None, loss_type="dapo", epsilon_low=0.2, epsilon_high=None,
                beta=0.0, max_completion_length=None):
    """GRPO loss on hidden states: `r1kernels.GRPOLoss` (fused) when available, else reference.

    Returns (loss, metrics) with metrics kl, clip_ratio (and entropy when the fused op has it).
    Old log-probs are not passed: one update per rollout is on-policy (old = logps.detach()).
    """
    kwargs = dict(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                  beta=beta, max_completion_length=max_completion_length)
    if hasattr(r1kernels, "GRPOLoss"):
        key = tuple(sorted(kwargs.items()))
        if key not in _LOSS_MODULES:
            _LOSS_MODULES[key] = r1kernels.GRPOLoss(**kwargs)
        out = _LOSS_MODULES[key](hidden, weight, labels, mask, advantages, bias=bias,
                                 ref_logps=ref_logps, num_items_in_batch=num_items_in_batch)
        return out.loss, out.metrics
    logps = reference.linear_token_logprobs_ref(hidden, weight, labels, bias=bias)
    return reference.grpo_loss_ref(logps, advantages, mask, ref_logps=ref_logps,
                                   num_items_in_batch=num_items_in_batch, **kwargs)


def sft_loss(hidden, weight, bias, labels, mask, num_items: float) -> torch.Tensor:
    """Sum of masked token NLL divided by `num_items` (the token count of the whole batch)."""
    logps = token_logprobs_from_hidden(hidden, weight, bias, labels)
    return -(logps * mask).sum() / max(float(num_items), 1.0)
