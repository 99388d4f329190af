"""The two losses of the trainer, computed from last hidden states and the lm_head weight.

`policy_loss` is the GRPO objective on completion tokens; `sft_loss` is masked next-token NLL.
Both run on r1kernels' public ops (`GRPOLoss`, `linear_token_logprobs[_fwd_bwd]`), so the full
`[tokens, vocab]` logits are never materialized.
"""
from __future__ import annotations

import torch

import r1kernels


def token_logprobs_from_hidden(hidden, weight, bias, labels) -> torch.Tensor:
    """Per-token log p(label) [B, T] fp32 from hidden [B, T, H] and lm_head weight [V, H]."""
    return r1kernels.linear_token_logprobs(hidden, weight, labels, bias=bias)


_LOSS_MODULES: dict = {}


def rollout_mismatch(train_logps, rollout_logps, mask, *, mode: str = "", cap: float = 2.0):
    """Rollout-vs-train mismatch of the completion tokens and, with `mode`, the importance weights
    that correct it (`grpo_loss`'s `rollout_is_weights`, detached):

        r = exp(train_logps - rollout_logps)     per token, the update's log-probs over the
                                                 sampler's (same weights: only numerics differ)
        tis: w = min(r, cap)                     truncated importance sampling
        mis: w = r where r <= cap, else 0        masked importance sampling

    Returns (weights or None, sums) with sums = (sum |train - rollout|, count of tokens whose r
    leaves [0.5, 2], sum of w) over the mask, for token-weighted averages across micro-batches.
    """
    if mode not in ("", "tis", "mis"):
        raise ValueError(f"rollout_is: expected '', 'tis' or 'mis', got {mode!r}")
    if not cap > 0:
        raise ValueError(f"rollout_is_cap: expected a number > 0, got {cap!r}")
    m = mask.bool()
    delta = (train_logps.detach().float() - rollout_logps.float()).masked_fill(~m, 0.0)
    r = torch.exp(delta)
    out = (delta.abs().sum(), (m & ((r < 0.5) | (r > 2.0))).sum().float())
    if not mode:
        return None, out + (m.sum().float(),)
    w = r.clamp(max=cap) if mode == "tis" else torch.where(r <= cap, r, torch.zeros_like(r))
    w = w.masked_fill(~m, 0.0)
    return w, out + (w.sum(),)


def policy_loss(hidden, weight, bias, labels, mask, advantages, *, ref_logps=None,
                rollout_is_weights=None, num_items_in_batch=None, loss_type="dapo",
                epsilon_low=0.2, epsilon_high=None, beta=0.0, max_completion_length=None):
    """GRPO loss on hidden states through `r1kernels.GRPOLoss` (one module per configuration).

    Returns (loss, metrics) with metrics kl, clip_ratio and entropy.
    Old log-probs are not passed: one update per rollout is on-policy (old = logps.detach()).
    """
    kwargs = dict(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                  beta=beta, max_completion_length=max_completion_length)
    key = tuple(sorted(kwargs.items()))
    if key not in _LOSS_MODULES:
        _LOSS_MODULES[key] = r1kernels.GRPOLoss(**kwargs)
    out = _LOSS_MODULES[key](hidden, weight, labels, mask, advantages, bias=bias,
                             ref_logps=ref_logps, rollout_is_weights=rollout_is_weights,
                             num_items_in_batch=num_items_in_batch)
    return out.loss, out.metrics


class _FusedNLL(torch.autograd.Function):
    """-sum(mask * logp) / n from hidden states with the gradients made in the forward pass: the
    upstream gradient of every log-prob (-mask / n) is known up front, so
    `linear_token_logprobs_fwd_bwd` computes the logits once (6 N H V FLOPs instead of the 8 of
    forward + backward through autograd); backward only scales the saved gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, mask, num_items):
        # only the tokens in the mask go through the lm_head (prompt and padding tokens have a
        # zero upstream gradient and no part in the loss)
        H = hidden.shape[-1]
        rows = mask.reshape(-1).nonzero().squeeze(1)
        g_lp = torch.full((rows.numel(),), -1.0 / max(float(num_items), 1.0), device=hidden.device)
        h2 = hidden.reshape(-1, H)
        logp, _, gh, gw, gb = r1kernels.linear_token_logprobs_fwd_bwd(
            h2.index_select(0, rows), weight, labels.reshape(-1).index_select(0, rows), g_lp,
            bias=bias)
        gh = gh.new_zeros(h2.shape).index_copy_(0, rows, gh).view(hidden.shape)
        ctx.grads = (gh, gw, gb)
        return (logp * g_lp).sum()

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("sft_loss: backward through the same graph twice is not supported "
                               "(the gradients were made in the forward pass)")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        scale = lambda t: None if t is None else t * g.to(t.dtype)  # noqa: E731
        return scale(gh), scale(gw), scale(gb), None, None, None


def sft_loss(hidden, weight, bias, labels, mask, num_items: float) -> torch.Tensor:
    """Sum of masked token NLL divided by `num_items` (the token count of the whole batch); with
    gradients, one fused vocabulary sweep (`_FusedNLL`). A DTensor lm_head (FSDP2) is gathered;
    its gradient comes back summed over ranks in its placement."""
    from r1kernels.distributed import gather_weight

    weight, bias = gather_weight(weight), gather_weight(bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        return _FusedNLL.apply(hidden, weight, bias, labels, mask, num_items)
    # tokens outside the mask labelled -100: log-prob 0, and they skip the lm_head
    logps = token_logprobs_from_hidden(hidden, weight, bias, labels.masked_fill(~mask.bool(), -100))
    return -(logps * mask).sum() / max(float(num_items), 1.0)
