"""GRPO in plain PyTorch with r1kernels: sample groups, score, normalize, fused loss, step.

    python examples/grpo_plain_torch.py

A tiny causal LM learns to emit a target token. Each step: sample `group_size` completions per
prompt, reward = fraction of target tokens, `r1kernels.group_advantages`, old log-probs with
`r1kernels.linear_token_logprobs` (no grad), then `num_iterations` optimizer steps on
`r1kernels.GRPOLoss` fed with the model's last hidden states and its lm_head weight: the logits
of the completions are never materialized during training.
"""
from __future__ import annotations

import torch
from torch import nn

import r1kernels


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.GRU(dim, dim, batch_first=True)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mix(self.embed(ids))[0]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, steps: int, temperature: float = 1.0) -> torch.Tensor:
        ids = prompt
        for _ in range(steps):
            logits = self.lm_head(self.hidden(ids)[:, -1]) / temperature
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1)], dim=1)
        return ids[:, prompt.shape[1]:]


def train(steps: int = 30, prompts: int = 4, group_size: int = 8, length: int = 12,
          target: int = 3, num_iterations: int = 2, lr: float = 3e-2, seed: int = 0,
          loss_type: str = "dapo", beta: float = 0.0) -> list[float]:
    """Runs GRPO; returns the mean reward of each step."""
    torch.manual_seed(seed)
    model = TinyLM()
    ref_model = TinyLM()
    ref_model.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = r1kernels.GRPOLoss(loss_type=loss_type, epsilon_high=0.28, beta=beta)
    history = []
    for _ in range(steps):
        prompt = torch.randint(0, 32, (prompts, 2)).repeat_interleave(group_size, 0)
        completion = model.generate(prompt, length)
        mask = torch.ones_like(completion, dtype=torch.bool)
        rewards = (completion == target).float().mean(1)
        history.append(rewards.mean().item())
        adv = r1kernels.group_advantages(rewards, group_size)
        ids = torch.cat([prompt, completion], 1)
        with torch.no_grad():  # rollout-time log-probs of the sampling policy and the reference
            h = model.hidden(ids)[:, prompt.shape[1] - 1:-1]
            old = r1kernels.linear_token_logprobs(h, model.lm_head.weight, completion)
            ref = None
            if beta:
                hr = ref_model.hidden(ids)[:, prompt.shape[1] - 1:-1]
                ref = r1kernels.linear_token_logprobs(hr, ref_model.lm_head.weight, completion)
        for _ in range(num_iterations):
            h = model.hidden(ids)[:, prompt.shape[1] - 1:-1]  # states that predict the completion
            out = loss_fn(h, model.lm_head.weight, completion, mask, adv, old_logps=old, ref_logps=ref)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    return history


if __name__ == "__main__":
    rewards = train()
    print("mean reward per step:", " ".join(f"{r:.2f}" for r in rewards))
