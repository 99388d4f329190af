"""Integrations of r1kernels with training and modeling libraries.

- `r1kernels.integrations.hf`: `apply_r1kernels(model)` / `remove_r1kernels(model)`: any
  transformers causal LM computes its loss (labels=...) and per-token log-probs and entropy
  (return_token_logprobs=True) through r1kernels' lm_head ops, without logits.
- `r1kernels.integrations.trl`: `R1KGRPOTrainer`, a `trl.GRPOTrainer` (1.16) whose loss runs
  through `r1kernels.GRPOLoss` (hidden states -> loss without logits) and whose log-probs come
  from r1kernels' head. Needs trl.
- `r1kernels.integrations.verl`: drop-ins for verl's "vanilla" and "gspo" policy losses and
  `register_verl_policy_loss()` to register them as "r1k_vanilla" and "r1k_gspo" (needs verl).
- `r1kernels.integrations.hf_moe`: `apply_r1kernels_moe(model)` patches the routers of transformers'
  MoE families (DeepSeek-V3/V3.2/V4, GLM-4.5, Kimi-K2.5, Qwen2/3/3.5-MoE, Qwen3-Next, OLMoE, Mixtral,
  gpt-oss, Gemma-4, ...) with moe_route, and their experts (experts_implementation "r1kernels")
  with moe_permute / moe_unpermute; routing replay.
- `examples/grpo_plain_torch.py`: a plain PyTorch GRPO step using `GRPOLoss` directly.
"""
