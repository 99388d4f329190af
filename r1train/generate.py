"""Rollout: G completions per prompt, sampled in one batch from the policy's own weights.

- Prompts are left-padded and prefilled once (batch P); the KV cache is then repeated G times
  (`batch_repeat_interleave`), so a group's prompt is processed once, not G times.
- The KV cache is a transformers `StaticCache`: preallocated to prompt + max_new_tokens and written
  by index, so no tensor grows during decoding.
- Sampling (temperature, top-p) runs on the device from a seeded `torch.Generator`. The loop never
  reads a device value per token: it checks "all finished?" once every `sync_every` tokens.
- No second copy of the weights: the rollout calls the same module the optimizer updates.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids: list[list[int]]   # P prompts (unpadded)
    tokens: torch.Tensor          # [P*G, T] completion tokens, pad after the end
    lengths: torch.Tensor         # [P*G] completion lengths, eos included when produced
    group_size: int


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from `logits [B, V]`; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _repeat_cache(cache, repeats: int) -> None:
    """Repeat each prompt's prefilled keys/values for its G completions (one allocation)."""
    for layer in cache.layers:
        if hasattr(layer, "batch_repeat_interleave"):
            layer.batch_repeat_interleave(repeats)
            continue
        layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
        layer.values = layer.values.repeat_interleave(repeats, dim=0)
        if hasattr(layer, "batch_size"):
            layer.batch_size *= repeats


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], *, group_size: int, max_new_tokens: int,
             eos_id: int, pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, sync_every: int = 8) -> Rollout:
    from transformers import StaticCache

    dev = next(model.parameters()).device
    P, G, T = len(prompt_ids), group_size, max_new_tokens
    Lp = max(len(p) for p in prompt_ids)
    L = Lp + T
    ids = torch.full((P, Lp), pad_id, dtype=torch.long)
    attn = torch.zeros((P, L), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, Lp - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, Lp - len(p):] = 1
    ids, attn = ids.to(dev), attn.to(dev)
    prompt_len = attn[:, :Lp].sum(-1)                       # [P]
    pos = (attn[:, :Lp].cumsum(-1) - 1).clamp(min=0)
    cache_pos = torch.arange(L, device=dev)

    # Attention masks are built here as 4-D additive masks over the whole static cache (which
    # transformers uses as given): no per-step mask construction or host checks inside the model.
    dtype = next(model.parameters()).dtype
    neg = torch.finfo(dtype).min
    key_ok = attn.bool()                                    # [P, L] real prompt tokens + new slots
    causal = cache_pos[None, :] <= cache_pos[:Lp, None]     # [Lp, L]
    allowed = key_ok[:, None, :] & causal[None] & (cache_pos < Lp)[None, None, :]
    allowed |= (cache_pos[None, :] == cache_pos[:Lp, None])[None]  # pads attend to themselves
    prefill_mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, neg)

    was_training = model.training
    model.eval()
    cache = StaticCache(config=model.config, max_cache_len=L)  # filled in place by the model
    # the forward's name for it: `cache` in recent transformers, where `past_key_values` (and the
    # output's attribute of that name) print a deprecation message
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    out = model(input_ids=ids, attention_mask=prefill_mask[:, None], position_ids=pos,
                cache_position=cache_pos[:Lp], use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    _repeat_cache(cache, G)
    logits = out.logits[:, -1].repeat_interleave(G, 0)
    key_ok = key_ok.repeat_interleave(G, 0)
    step_mask = torch.zeros((P * G, 1, 1, L), dtype=dtype, device=dev)
    next_pos = prompt_len.repeat_interleave(G, 0)           # position id of the first new token

    tokens = torch.full((P * G, T), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(P * G, dtype=torch.bool, device=dev)
    lengths = torch.full((P * G,), T, dtype=torch.long, device=dev)
    for t in range(T):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, t] = nxt
        finished_now = (nxt == eos_id) & ~done
        lengths = torch.where(finished_now, torch.full_like(lengths, t + 1), lengths)
        done = done | finished_now
        if t == T - 1 or ((t + 1) % sync_every == 0 and bool(done.all())):
            break
        allowed = key_ok & (cache_pos <= Lp + t)            # [P*G, L]: prompt + new tokens so far
        step_mask.zero_().masked_fill_(~allowed[:, None, None, :], neg)
        out = model(input_ids=nxt[:, None], attention_mask=step_mask,
                    position_ids=(next_pos + t)[:, None],
                    cache_position=cache_pos[Lp + t: Lp + t + 1], use_cache=True,
                    **{cache_kw: cache})
        logits = out.logits[:, -1]
    model.train(was_training)
    return Rollout(list(prompt_ids), tokens, lengths, G)


@torch.no_grad()
def generate_nocache_greedy(model, prompt: list[int], max_new_tokens: int,
                            eos_id: int) -> list[int]:
    """Reference for tests: recompute the whole sequence each step, no cache, greedy."""
    dev = next(model.parameters()).device
    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([seq], device=dev), use_cache=False).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok == eos_id:
            break
    return out
