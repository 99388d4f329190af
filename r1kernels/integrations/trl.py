"""`R1KGRPOTrainer`: TRL's GRPOTrainer with its lm_head and loss run by r1kernels.

    from r1kernels.integrations.trl import R1KGRPOTrainer
    trainer = R1KGRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), ...)

Tested with TRL 1.16 (the `trl` extra pins it: this class overrides private methods).

- The model (and the reference model) get r1kernels' head (`integrations.hf.apply_r1kernels`),
  so every per-token log-prob TRL computes (old, reference, and the loss's own on the TRL path
  below) comes from `r1kernels.linear_token_logprobs`, with the model's soft-capping or logit
  scaling (Gemma, Cohere, Granite, ...) and TRL's temperature.
- The loss, for loss types grpo, bnpo, dr_grpo, dapo, luspo, cispo and sapo: the backbone's last
  hidden states at the completion positions go straight into the fused `r1kernels.GRPOLoss` with
  the lm_head weight (one vocabulary sweep computes the loss and the gradients; the [B, T, V]
  logits are never built). The call goes through the (possibly DDP-wrapped) model's forward, so
  the data-parallel wrappers see a forward as usual. Loss value, gradients and every metric TRL
  1.16 logs for the same config follow its `_compute_loss`: gradient accumulation,
  `num_items_in_batch` rescaling, vLLM importance-sampling correction, MoE aux loss, `kl`,
  `entropy`, `clip_ratio/{low,high,region}_mean` (token-weighted at token level, one value per
  sequence at importance_sampling_level="sequence"), `clip_ratio/low_min`, `clip_ratio/high_max`,
  `cispo_clip_ratio`, with sums and counts reduced across processes where TRL reduces them.
- Options whose loss needs every token's log-prob or entropy before any gradient (so no single
  sweep can produce it) or that GRPOLoss does not implement: `top_entropy_quantile < 1`,
  `off_policy_mask_threshold`, the entropy bonus (`entropy_coef`, `use_adaptive_entropy`),
  `loss_type="vespo"`, and multimodal inputs: TRL's own `_compute_loss` runs, on log-probs and
  entropies from r1kernels' head (two sweeps, still no logits). One warning names the option.
Mixed precision: under autocast the head GEMM takes autocast-dtype inputs (as TRL's) but
accumulates and normalizes in fp32; in fp32 everything agrees with TRL to fp32 rounding.
"""
from __future__ import annotations

import warnings

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from r1kernels.integrations.hf import apply_r1kernels, head_transform
from r1kernels.nn import GRPOLoss

_FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                    "spatial_shapes", "num_tiles", "num_images", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids")


class R1KGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer whose lm_head and policy loss run through r1kernels (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # on top of TRL's own fused head: its `fused_lm_head=True` calls now reach r1kernels
        head = dict(temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        apply_r1kernels(self.model, **head)
        if self.ref_model is not None:
            apply_r1kernels(self.ref_model, **head)
        self._r1k_unfused = self._r1k_unfused_options()
        self._r1k_warned = False
        if self._r1k_unfused:
            self._r1k_warn(", ".join(self._r1k_unfused))

    def _r1k_unfused_options(self) -> list[str]:
        opts = []
        if self.loss_type not in _FUSED_LOSS_TYPES:
            opts.append(f"loss_type={self.loss_type!r}")
        if self.top_entropy_quantile < 1.0:
            opts.append(f"top_entropy_quantile={self.top_entropy_quantile}")
        if self.off_policy_mask_threshold is not None:
            opts.append(f"off_policy_mask_threshold={self.off_policy_mask_threshold}")
        if self.entropy_coef != 0.0:
            opts.append(f"entropy_coef={self.entropy_coef}")
        if self.use_adaptive_entropy:
            opts.append("use_adaptive_entropy=True")
        return opts

    def _r1k_warn(self, what: str) -> None:
        if not self._r1k_warned:
            self._r1k_warned = True
            warnings.warn(f"R1KGRPOTrainer: {what}: the loss is TRL's own _compute_loss, on "
                          f"log-probs from r1kernels' lm_head (linear_token_logprobs: no logits, "
                          f"two vocabulary sweeps) instead of the single-sweep fused GRPOLoss",
                          stacklevel=3)

    def _r1k_loss_fn(self, model) -> GRPOLoss:
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        return GRPOLoss(
            loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=self.args.delta, beta=self.beta, temperature=self.temperature,
            importance_sampling_level=self.importance_sampling_level,
            use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
            max_completion_length=self.max_completion_length,
            sapo_temperature_pos=self.args.sapo_temperature_pos,
            sapo_temperature_neg=self.args.sapo_temperature_neg, per_sequence_metrics=True,
            **head_transform(base.config))

    def _compute_loss(self, model, inputs):
        if self._r1k_unfused:
            return super()._compute_loss(model, inputs)
        if any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS):
            self._r1k_warn("multimodal inputs")
            return super()._compute_loss(model, inputs)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        num_items = None
        if self.loss_type in ("dapo", "cispo"):
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accum / self.args.steps_per_generation
        rw = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            rw = inputs["importance_sampling_ratio"]
            rw = rw.expand_as(completion_ids) if rw.dim() == 2 and rw.size(1) == 1 else rw
        loss_fn = self._r1k_loss_fn(model)

        def head(hidden, weight, bias, _labels):  # the states that predict the completion
            return loss_fn(hidden[:, -T:], weight, completion_ids, mask, inputs["advantages"],
                           bias=bias, old_logps=inputs.get("old_per_token_logps"),
                           ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                           rollout_is_weights=rw, num_items_in_batch=num_items)

        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-T] = -100
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        lm_head_fn=head, **extra)
        loss, m = out.head_output
        if self.loss_type not in ("dapo", "cispo"):
            loss = loss / accum
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * out.aux_loss / accum
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(out.aux_loss).mean().item())
        self._r1k_log(mode, m, mask)
        return loss

    def _r1k_log(self, mode: str, m: dict, mask: torch.Tensor) -> None:
        """TRL 1.16's metrics from GRPOLoss's: global means as (sum, count) reduced across
        processes; per-sequence values gathered for the min / max."""
        metrics = self._metrics[mode]
        n_seq = mask.sum(-1).float()
        count = n_seq.sum()
        seq_level = self.importance_sampling_level == "sequence"

        def mean(local_sum, local_count):
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def token_mean(name):  # m[name] is sum / max(count, 1) of this process's tokens
            return mean(m[name] * count, count)

        def clip_mean(name):
            if seq_level:  # one value per sequence, every sequence counted
                per_seq = m[name + "_per_sequence"]
                return mean(per_seq.sum(), torch.tensor(float(per_seq.numel()), device=count.device))
            return token_mean(name)

        def per_sequence(name):  # TRL: a sequence without tokens has no fraction (NaN)
            per_seq = m[name + "_per_sequence"]
            return per_seq if seq_level else torch.where(n_seq > 0, per_seq, float("nan"))

        if self.beta != 0.0:
            metrics["kl"].append(token_mean("kl"))
        metrics["entropy"].append(token_mean("entropy"))
        if self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(clip_mean("clip_ratio_high"))
        elif self.loss_type != "sapo":
            metrics["clip_ratio/low_mean"].append(clip_mean("clip_ratio_low"))
            metrics["clip_ratio/high_mean"].append(clip_mean("clip_ratio_high"))
            metrics["clip_ratio/region_mean"].append(clip_mean("clip_ratio"))
            low = self.accelerator.gather(per_sequence("clip_ratio_low"))
            metrics["clip_ratio/low_min"].append(nanmin(low).item())
            high = self.accelerator.gather(per_sequence("clip_ratio_high"))
            metrics["clip_ratio/high_max"].append(nanmax(high).item())
