"""Integrations of r1kernels with training and modeling libraries.

- `r1kernels.integrations.trl`: `R1KGRPOTrainer`, a `trl.GRPOTrainer` whose loss runs through
  `r1kernels.GRPOLoss` (hidden states -> loss without logits). Needs trl (imported lazily).
- `r1kernels.integrations.verl`: `compute_policy_loss_r1k` with verl's policy-loss signature and
  `register_verl_policy_loss()` to register it (needs verl importable).
- `r1kernels.integrations.hf_moe`: patches transformers' DeepSeek-V3 / Qwen3-MoE routers and expert
  dispatch with r1kernels' MoE ops, and routing replay.
- `examples/grpo_plain_torch.py`: a plain PyTorch GRPO step using `GRPOLoss` directly.
"""
