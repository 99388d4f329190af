"""Integrations of r1kernels with training and modeling libraries.

- `r1kernels.integrations.trl`: `R1KGRPOTrainer`, a `trl.GRPOTrainer` whose loss runs through
  `r1kernels.GRPOLoss` (hidden states -> loss without logits). Needs trl (imported lazily).
- `r1kernels.integrations.verl`: `compute_policy_loss_r1k` with verl's policy-loss signature and
  `register_verl_policy_loss()` to register it (needs verl importable).
- `r1kernels.integrations.hf_moe`: `apply_r1kernels_moe(model)` patches the routers of transformers'
  MoE families (DeepSeek-V3/V3.2/V4, GLM-4.5, Kimi-K2.5, Qwen2/3/3.5-MoE, Qwen3-Next, OLMoE, Mixtral,
  gpt-oss, Gemma-4, ...) with moe_route, and their experts (experts_implementation "r1kernels")
  with moe_permute / moe_unpermute; routing replay.
- `examples/grpo_plain_torch.py`: a plain PyTorch GRPO step using `GRPOLoss` directly.
"""
