"""Drop-in integrations of r1kernels' fused GRPO loss with training frameworks.

- `r1kernels.integrations.trl`: `R1KGRPOTrainer`, a `trl.GRPOTrainer` whose loss runs through
  `r1kernels.GRPOLoss` (hidden states -> loss without logits). Needs trl (imported lazily).
- `r1kernels.integrations.verl`: `compute_policy_loss_r1k` with verl's policy-loss signature and
  `register_verl_policy_loss()` to register it (needs verl importable).
- `examples/grpo_plain_torch.py`: a plain PyTorch GRPO step using `GRPOLoss` directly.
"""
