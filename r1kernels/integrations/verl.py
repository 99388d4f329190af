"""verl policy losses backed by r1kernels.grpo_loss: drop-ins for verl 0.9.1's "vanilla" and "gspo".

    from r1kernels.integrations.verl import register_verl_policy_loss
    register_verl_policy_loss()            # registers "r1k_vanilla" and "r1k_gspo"
    # then: actor_rollout_ref.actor.policy_loss.loss_mode=r1k_vanilla (or r1k_gspo)

`compute_policy_loss_r1k` (vanilla) and `compute_policy_loss_r1k_gspo` have the signature of verl's
registered policy losses (`verl.trainer.ppo.core_algos.register_policy_loss`):

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
       rollout_is_weights=None) -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
                                             "actor/pg_clipfrac_lower"} as floats)

and return what verl's `compute_policy_loss_vanilla` / `compute_policy_loss_gspo` return for the
same inputs and the same actor config (`FSDPActorConfig` or any `ActorConfig`, an omegaconf
DictConfig or an object with those attributes): the loss and the gradient to fp32 rounding, and
the metrics with verl's meanings. What is verl's, in detail (tests/test_verl.py compares with
verl's own core_algos):
  - clip range config.clip_ratio_low / clip_ratio_high (None: config.clip_ratio);
  - vanilla: log-ratio clamped to [-20, 20] (no gradient outside), dual clip for A < 0 at
    config.clip_ratio_c (> 1; loss capped at -A * clip_ratio_c);
  - gspo: the sequence ratio s_b = exp(mean_t log-ratio) applied per token with verl's
    straight-through gradient, ratio_t = sg(s_b) pi_t / sg(pi_t) (its log clamped at 10, no
    gradient above), no dual clip;
  - rollout_is_weights multiply the per-token loss;
  - every loss_agg_mode of verl's agg_loss (token-mean, token-sum, seq-mean-token-mean,
    seq-mean-token-sum, seq-mean-token-sum-norm) with config.global_batch_info as verl's worker
    fills it: dp_size, batch_num_tokens (token-mean), global_batch_size (seq-mean-*),
    loss_scale_factor (seq-mean-token-sum-norm); without them, the micro-batch's token count or
    count of non-empty rows (fully masked rows are left out, like verl);
  - metrics: pg_clipfrac = masked fraction of clipped tokens, ppo_kl = masked mean of
    old - new log-prob (vanilla: the clamped log-ratio), pg_clipfrac_lower = masked fraction of
    A < 0 tokens whose ratio is above clip_ratio_c (the dual clip; 0 for gspo).
The one deliberate difference: a micro-batch with no response token and no global batch info
gives loss 0 and zero gradients where verl's division gives NaN.

The fused kernel computes the clipped loss, its gradient and the clip fraction in one pass; a
few elementwise torch ops around it give verl's log-ratio (clamps, GSPO's straight-through
ratio), its normalization and the other two metrics.
"""
from __future__ import annotations

import torch

from r1kernels.ops.grpo_loss import grpo_loss

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm")


def _get(config, name, default=None):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def _check(old_log_prob, log_prob, advantages, loss_agg_mode, config, where):
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"{where}: loss_agg_mode must be one of {LOSS_AGG_MODES}, got "
                         f"{loss_agg_mode!r}")
    if config is None:
        raise ValueError(f"{where}: config is required (verl's actor config)")
    if not isinstance(log_prob, torch.Tensor) or log_prob.dim() != 2:
        raise ValueError(f"{where}: log_prob must be a [B, T] tensor, got "
                         f"{tuple(getattr(log_prob, 'shape', ()))}")
    for name, x in (("old_log_prob", old_log_prob), ("advantages", advantages)):
        if not isinstance(x, torch.Tensor) or x.shape != log_prob.shape:
            raise ValueError(f"{where}: {name} must have the shape of log_prob "
                             f"{tuple(log_prob.shape)}, got {tuple(getattr(x, 'shape', ()))}")


def _normalization(response_mask, loss_agg_mode, config, where):
    """verl's agg_loss as (grpo_loss loss_type, num_items_in_batch, factor): agg_loss(l) =
    factor * grpo_loss(..., loss_type, num_items_in_batch)."""
    info = _get(config, "global_batch_info", None) or {}
    dp = _get(info, "dp_size", 1)
    if loss_agg_mode == "token-sum":
        return "dapo", 1, dp  # sum(l m) * dp_size
    if loss_agg_mode == "token-mean":  # sum(l m) / batch_num_tokens * dp_size
        tokens = _get(info, "batch_num_tokens")
        if tokens is None and dp > 1:
            raise ValueError(f"{where}: global_batch_info['batch_num_tokens'] is required when "
                             f"dp_size > 1 (token-mean)")
        return "dapo", tokens, dp
    rows = _get(info, "global_batch_size")
    if rows is None:
        if dp > 1:
            raise ValueError(f"{where}: global_batch_info['global_batch_size'] is required when "
                             f"dp_size > 1 ({loss_agg_mode})")
        rows = (response_mask.sum(-1) > 0).sum().clamp(min=1)  # non-empty rows
    if loss_agg_mode == "seq-mean-token-mean":
        # sum_b sum_t(l m) / n_b / rows * dp_size; grpo's loss is that sum over B
        return "grpo", None, response_mask.shape[0] * dp / rows
    horizon = _get(info, "loss_scale_factor", response_mask.shape[-1])
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return "dapo", rows, dp / horizon  # sum(l m) / rows * dp_size / loss_scale_factor
    return "dapo", rows, dp  # seq-mean-token-sum


def _masked_mean(x, mask):
    """verl_F.masked_mean."""
    return (torch.where(mask.bool(), x, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def _clipped_loss(log_prob, log_ratio, keep, advantages, response_mask, loss_agg_mode, config,
                  rollout_is_weights, clip_ratio_c, where):
    """verl's clipped surrogate of the ratio exp(log_ratio) (detached values; the gradient
    reaches log_prob, ratio_t d log_prob_t, where `keep`), aggregated like verl's agg_loss.
    Returns (loss, clip fraction)."""
    # value log_ratio, derivative 1 to log_prob where keep: the kernel sees the ratio verl uses
    lp = log_ratio + torch.where(keep, log_prob - log_prob.detach(), 0.0)
    zero = lp.new_zeros(()).expand(lp.shape)
    loss_type, num_items, factor = _normalization(response_mask, loss_agg_mode, config, where)
    clip = _get(config, "clip_ratio", 0.2)
    eps_lo, eps_hi = _get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)
    kw = dict(old_logps=zero, loss_type=loss_type, num_items_in_batch=num_items,
              epsilon_low=eps_lo, rollout_is_weights=rollout_is_weights)
    if clip_ratio_c is None or clip_ratio_c > 1.0 + eps_hi:
        # verl's dual clip min(-A c, max(-A r, -A clip(r))) for A < 0 is grpo_loss's delta
        out = grpo_loss(lp, advantages, response_mask, epsilon_high=eps_hi, delta=clip_ratio_c,
                        **kw)
        loss, clipfrac = out.loss, out.metrics["clip_ratio"]
    else:
        # clip_ratio_c <= 1 + clip_ratio_high: A < 0 tokens are clipped to [1 - eps_lo, c], A > 0
        # tokens to 1 + eps_hi; one kernel call for each sign (a token with A = 0 adds nothing)
        pos = grpo_loss(lp, advantages.clamp(min=0), response_mask, epsilon_high=eps_hi, **kw)
        neg = grpo_loss(lp, advantages.clamp(max=0), response_mask,
                        epsilon_high=clip_ratio_c - 1.0, delta=clip_ratio_c, **kw)
        loss = pos.loss + neg.loss
        clipfrac = pos.metrics["clip_ratio"] + neg.metrics["clip_ratio"]
    return loss * factor, clipfrac


def _metrics(clipfrac, ppo_kl, clipfrac_lower):
    values = torch.stack([clipfrac.float(), ppo_kl.float(), clipfrac_lower.float()]).tolist()
    return dict(zip(("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), values))


def compute_policy_loss_r1k(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                            advantages: torch.Tensor, response_mask: torch.Tensor,
                            loss_agg_mode: str = "token-mean", config=None,
                            rollout_is_weights: torch.Tensor | None = None):
    """verl's "vanilla" policy loss (PPO clip with dual clip); see the module docstring.
    Returns (pg_loss, metrics dict of floats)."""
    where = "compute_policy_loss_r1k"
    _check(old_log_prob, log_prob, advantages, loss_agg_mode, config, where)
    clip_ratio_c = float(_get(config, "clip_ratio_c", 3.0))
    if not clip_ratio_c > 1.0:
        raise ValueError(f"{where}: clip_ratio_c must be > 1 (dual-clip PPO), got {clip_ratio_c}")
    raw = log_prob.detach() - old_log_prob
    log_ratio = raw.clamp(-20.0, 20.0)
    loss, clipfrac = _clipped_loss(log_prob, log_ratio, raw == log_ratio, advantages,
                                   response_mask, loss_agg_mode, config, rollout_is_weights,
                                   clip_ratio_c, where)
    with torch.no_grad():
        ppo_kl = _masked_mean(-log_ratio, response_mask)
        lower = _masked_mean((advantages < 0) & (torch.exp(log_ratio) > clip_ratio_c),
                             response_mask)
    return loss, _metrics(clipfrac, ppo_kl, lower)


def compute_policy_loss_r1k_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                 advantages: torch.Tensor, response_mask: torch.Tensor,
                                 loss_agg_mode: str = "seq-mean-token-mean", config=None,
                                 rollout_is_weights: torch.Tensor | None = None):
    """verl's "gspo" policy loss (sequence ratio, straight-through per token); see the module
    docstring. Returns (pg_loss, metrics dict of floats)."""
    where = "compute_policy_loss_r1k_gspo"
    _check(old_log_prob, log_prob, advantages, loss_agg_mode, config, where)
    raw = log_prob.detach() - old_log_prob
    seq = (raw * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
    log_ratio = seq.clamp(max=10.0).unsqueeze(-1).expand(raw.shape)
    loss, clipfrac = _clipped_loss(log_prob, log_ratio, (seq <= 10.0).unsqueeze(-1), advantages,
                                   response_mask, loss_agg_mode, config, rollout_is_weights, None,
                                   where)
    with torch.no_grad():
        ppo_kl = _masked_mean(-raw, response_mask)
    return loss, _metrics(clipfrac, ppo_kl, torch.zeros_like(ppo_kl))


def register_verl_policy_loss(name: str = "r1k_vanilla", gspo_name: str = "r1k_gspo") -> None:
    """Register the losses in verl's policy-loss registry (raises ImportError without verl)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    register_policy_loss(name)(compute_policy_loss_r1k)
    register_policy_loss(gspo_name)(compute_policy_loss_r1k_gspo)
