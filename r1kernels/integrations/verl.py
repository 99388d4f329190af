"""verl policy loss backed by r1kernels.grpo_loss.

    from r1kernels.integrations.verl import register_verl_policy_loss
    register_verl_policy_loss()            # registers "r1k_vanilla" and "r1k_gspo"
    # then: actor_rollout_ref.actor.policy_loss.loss_mode=r1k_vanilla

`compute_policy_loss_r1k` has the signature of verl's registered policy losses
(`verl.trainer.ppo.core_algos.register_policy_loss`):

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
       config=None, rollout_is_weights=None) -> (pg_loss, pg_metrics: dict[str, float])

and computes verl's "vanilla" (token level) or "gspo" (sequence level) clipped objective with the
fused kernel (loss, gradient and metrics in one pass):
  - clip range: config.clip_ratio_low / clip_ratio_high (default config.clip_ratio);
  - dual-clip (config.clip_ratio_c, default 3.0, vanilla only): for A < 0 the loss is capped at
    -A * clip_ratio_c, which is exactly r1kernels' `delta=clip_ratio_c` (coef_1 = min(coef_1,
    delta)); for A > 0 delta > 1 + eps_high changes nothing;
  - loss_agg_mode -> loss_type: "token-mean" -> dapo (normalizer: global_batch_info's
    batch_num_tokens / dp_size when verl provides it, else the micro-batch's token count),
    "seq-mean-token-mean" -> grpo, "seq-mean-token-sum" -> luspo,
    "seq-mean-token-sum-norm" -> dr_grpo (L = loss_scale_factor or the response length);
  - rollout_is_weights multiply the per-token loss, like verl.
Differences from verl's torch code: verl clamps log(ratio) to [-20, 20] before exp (we do not, the
kernel is exact in fp32 for |log ratio| < 88), and verl's GSPO uses the straight-through ratio
sg(s) * pi / sg(pi), whose gradient equals the sequence-level ratio's only at aggregation
"seq-mean-token-mean" (the mode verl forces for gspo; we use the exact sequence-level gradient).
"""
from __future__ import annotations

import torch

from r1kernels.ops.grpo_loss import grpo_loss

AGG_TO_LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo",
                    "seq-mean-token-sum": "luspo", "seq-mean-token-sum-norm": "dr_grpo"}


def _get(config, name, default=None):
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def compute_policy_loss_r1k(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                            advantages: torch.Tensor, response_mask: torch.Tensor,
                            loss_agg_mode: str = "token-mean", config=None,
                            rollout_is_weights: torch.Tensor | None = None, *,
                            importance_sampling_level: str = "token"):
    """verl policy loss (see module docstring). Returns (pg_loss, metrics dict of floats)."""
    if loss_agg_mode not in AGG_TO_LOSS_TYPE:
        raise ValueError(f"compute_policy_loss_r1k: loss_agg_mode must be one of "
                         f"{tuple(AGG_TO_LOSS_TYPE)}, got {loss_agg_mode!r}")
    clip = _get(config, "clip_ratio", 0.2)
    eps_lo = _get(config, "clip_ratio_low", clip)
    eps_hi = _get(config, "clip_ratio_high", clip)
    delta = None
    if importance_sampling_level == "token":
        delta = float(_get(config, "clip_ratio_c", 3.0))
        if delta <= 1.0:
            raise ValueError(f"compute_policy_loss_r1k: clip_ratio_c must be > 1, got {delta}")
    info = _get(config, "global_batch_info", None) or {}
    kw = {}
    loss_type = AGG_TO_LOSS_TYPE[loss_agg_mode]
    if loss_type == "dapo" and info.get("batch_num_tokens"):
        kw["num_items_in_batch"] = float(info["batch_num_tokens"]) / float(info.get("dp_size", 1) or 1)
    if loss_type == "dr_grpo" and info.get("loss_scale_factor"):
        kw["max_completion_length"] = int(info["loss_scale_factor"])
    out = grpo_loss(log_prob, advantages, response_mask, old_logps=old_log_prob,
                    loss_type=loss_type, epsilon_low=eps_lo, epsilon_high=eps_hi, delta=delta,
                    importance_sampling_level=importance_sampling_level,
                    rollout_is_weights=rollout_is_weights, **kw)
    m = out.metrics
    with torch.no_grad():
        mf = response_mask.float()
        ppo_kl = ((old_log_prob.float() - log_prob.float()) * mf).sum() / mf.sum().clamp(min=1.0)
    metrics = {"actor/pg_clipfrac": m["clip_ratio"].item(), "actor/ppo_kl": ppo_kl.item(),
               "actor/pg_clipfrac_lower": m["clip_ratio_low"].item()}
    return out.loss, metrics


def compute_policy_loss_r1k_gspo(old_log_prob, log_prob, advantages, response_mask,
                                 loss_agg_mode: str = "seq-mean-token-mean", config=None,
                                 rollout_is_weights=None):
    """GSPO (sequence-level ratio); verl aggregates GSPO with seq-mean-token-mean."""
    return compute_policy_loss_r1k(old_log_prob, log_prob, advantages, response_mask,
                                   "seq-mean-token-mean", config, rollout_is_weights,
                                   importance_sampling_level="sequence")


def register_verl_policy_loss(name: str = "r1k_vanilla", gspo_name: str = "r1k_gspo") -> None:
    """Register the losses in verl's policy-loss registry (raises ImportError without verl)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    register_policy_loss(name)(compute_policy_loss_r1k)
    register_policy_loss(gspo_name)(compute_policy_loss_r1k_gspo)
