"""`R1KGRPOTrainer`: TRL's GRPOTrainer with the loss computed by r1kernels.GRPOLoss.

    from r1kernels.integrations.trl import R1KGRPOTrainer
    trainer = R1KGRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), ...)

Only `_compute_loss` changes: the backbone's last hidden states at the completion positions go
straight into the fused GRPOLoss with the lm_head weight, so the [B, T, V] logits are never built
and the lm_head gradient comes out of the same vocabulary sweep. The loss value, the gradients and
the logged metrics (`kl`, `entropy`, `clip_ratio/*`, `cispo_clip_ratio`) follow TRL 1.16's
`_compute_loss` (gradient accumulation, `num_items_in_batch` rescaling and vLLM importance-sampling
correction included). Configurations the fused path does not cover fall back to TRL's own code:
loss_type="vespo", off-policy masking, top-entropy masking, the entropy bonus, MoE aux loss,
multimodal inputs, and models whose logits are scaled or soft-capped in a way not in `_HEADS`.
The heads in `_HEADS` (Gemma 2/3/4: final_logit_softcapping; Cohere, Cohere2: logit_scale
multiplies; Granite, GraniteMoE(-Shared, -Hybrid): logits_scaling divides, as transformers' own
modeling code applies them) go through GRPOLoss's softcap= / logit_scale=.
Mixed precision: under autocast the head GEMM takes autocast-dtype inputs (as TRL's) but accumulates
and normalizes in fp32 (TRL rounds the logits to bf16 first), so log-probs differ from TRL's at
bf16 rounding level; in fp32 they agree to fp32 rounding.
Deviation: clip metrics at importance_sampling_level="sequence" are token-weighted fractions
(TRL averages per sequence).
"""
from __future__ import annotations

import torch
from trl import GRPOTrainer

from r1kernels.nn import GRPOLoss

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                    "spatial_shapes", "num_tiles", "num_images", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


# The head transforms GRPOLoss takes, by the text config's model_type: (attribute, what the model's
# forward does with it), as in transformers 5.25's modeling code (the same attribute name means
# different things elsewhere: HyperCLOVAX multiplies by logits_scaling, Granite divides).
_HEADS = {
    **{t: ("final_logit_softcapping", "softcap") for t in
       ("gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text")},
    **{t: ("logit_scale", "multiply") for t in ("cohere", "cohere2")},
    **{t: ("logits_scaling", "divide") for t in
       ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")},
}
_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
               "logits_scaling")


def _head_kwargs(tc) -> dict | None:
    """GRPOLoss's softcap / logit_scale for the model of text config `tc`, or None when its head
    transforms the logits in a way not known here (the trainer then falls back to TRL)."""
    attr, how = _HEADS.get(getattr(tc, "model_type", None), (None, None))
    for a in _HEAD_ATTRS:
        if a != attr and getattr(tc, a, None) not in (None, 1.0):
            return None
    value = None if attr is None else getattr(tc, attr, None)
    if value is None:
        return {}
    if how == "softcap":
        return {"softcap": float(value)}
    return {"logit_scale": float(value) if how == "multiply" else 1.0 / float(value)}


class R1KGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer whose policy loss runs through r1kernels.GRPOLoss (see module docstring)."""

    def _r1k_loss_fn(self, head: dict | None = None) -> GRPOLoss:
        """The fused loss of this trainer's options; `head`: the model's softcap / logit_scale
        (_head_kwargs)."""
        return GRPOLoss(
            loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=self.args.delta, beta=self.beta, temperature=self.temperature,
            importance_sampling_level=self.importance_sampling_level,
            use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
            max_completion_length=self.max_completion_length,
            sapo_temperature_pos=self.args.sapo_temperature_pos,
            sapo_temperature_neg=self.args.sapo_temperature_neg, **(head or {}))

    def _r1k_supported(self, model, inputs) -> bool:
        if self.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"):
            return False
        if self.off_policy_mask_threshold is not None or self.top_entropy_quantile < 1.0:
            return False
        if getattr(self, "_entropy_bonus_enabled", False) or getattr(self, "aux_loss_enabled", False):
            return False
        if any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS):
            return False
        return _head_kwargs(_text_config(self.accelerator.unwrap_model(model))) is not None

    def _compute_loss(self, model, inputs):
        if not self._r1k_supported(model, inputs):
            return super()._compute_loss(model, inputs)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        # last hidden states that predict the completion tokens (as TRL's fused head: shift by one)
        unwrapped = self.accelerator.unwrap_model(model)
        if hasattr(unwrapped, "get_base_model"):  # PEFT
            unwrapped = unwrapped.get_base_model()
        backbone = getattr(unwrapped, unwrapped.base_model_prefix)
        dev = input_ids.device.type
        with self.accelerator.autocast():
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            # under mixed precision the head runs in the autocast dtype like TRL's (bf16 GEMM
            # inputs), with fp32 accumulation and fp32 log-softmax (TRL rounds logits to bf16)
            amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        hidden = out.last_hidden_state[:, :-1][:, -T:]
        lm_head = unwrapped.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if amp is not None and not self.args.cast_lm_head_to_fp32:
            hidden, weight = hidden.to(amp), weight.to(amp)
            bias = None if bias is None else bias.to(amp)

        mode = "train" if self.model.training else "eval"
        num_items = None
        if self.loss_type in ("dapo", "cispo"):
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                ga = self.current_gradient_accumulation_steps
                num_items = num_items * ga / self.args.steps_per_generation
        rw = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            rw = inputs["importance_sampling_ratio"]
            rw = rw.expand_as(completion_ids) if rw.dim() == 2 and rw.size(1) == 1 else rw
        adv = inputs["advantages"]
        head = _head_kwargs(_text_config(unwrapped))
        result = self._r1k_loss_fn(head)(
            hidden, weight, completion_ids, mask, adv, bias=bias,
            old_logps=inputs.get("old_per_token_logps"),
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            rollout_is_weights=rw, num_items_in_batch=num_items)
        loss = result.loss
        if self.loss_type not in ("dapo", "cispo") and mode == "train":
            loss = loss / self.current_gradient_accumulation_steps

        m = result.metrics
        gather = lambda x: self.accelerator.gather(x.reshape(1)).nanmean().item()  # noqa: E731
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(gather(m["kl"]))
        self._metrics[mode]["entropy"].append(gather(m["entropy"]))
        if self.loss_type == "cispo":
            self._metrics[mode]["cispo_clip_ratio"].append(gather(m["clip_ratio_high"]))
        elif self.loss_type != "sapo":
            self._metrics[mode]["clip_ratio/low_mean"].append(gather(m["clip_ratio_low"]))
            self._metrics[mode]["clip_ratio/high_mean"].append(gather(m["clip_ratio_high"]))
            self._metrics[mode]["clip_ratio/region_mean"].append(gather(m["clip_ratio"]))
        return loss
