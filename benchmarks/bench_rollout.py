"""Rollout: completion tokens/s of r1train's generate (compiled decode step, and eager) beside
transformers' `model.generate(num_return_sequences=G)` (what TRL uses without vLLM), same model,
same prompts, same sampling (temperature 1), every completion exactly T tokens (no end token).
Peak memory: on CUDA the peak extra memory of a call; on CPU the peak extra bytes of a call
(torch.profiler's allocation events) plus what the compiled rollout keeps between calls (its KV
cache and buffers), beyond the model's weights.

`pre-issue-loop` is r1train's rollout before the compiled decode step and `sample_tokens` (the
eager loop with a sort-based top-p sampler, `r1train/generate.py` at commit 8fd5bfa, read from
this clone's git history; skipped without it). The "vs base" column is the tokens/s ratio over
`hf-generate`. Bytes: a decode step reads every
weight once and the KV cache written so far, so the rollout reads T * weight bytes + the cache's
sum over steps; %copy is that over the measured copy bandwidth, the decode roofline fraction
(the GPU target: >= 50% at 16 x 8 x 512, bf16, Qwen2.5-0.5B shape). Random weights.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from r1train.generate import generate
from shapes import DEVICE, shape_id, shapes_for

OP = "rollout"
SHAPES = shapes_for(OP, DEVICE)
MODELS = {
    # the trainer's default tiny model (character vocabulary)
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=103),
    # 12.2M parameters
    "qwen2-12m": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=1024, vocab_size=32000),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
}
_CACHE: dict = {}


def setup(shape):
    key = shape_id(shape)
    if key not in _CACHE:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        m = MODELS[shape["model"]]
        cfg = Qwen2Config(**m, max_position_embeddings=shape["prompt"] + shape["T"] + 32,
                          tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = Qwen2ForCausalLM(cfg).to(getattr(torch, shape["dtype"])).eval()
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, m["vocab_size"], (shape["P"], shape["prompt"]), generator=g).tolist()
        _CACHE.clear()
        _CACHE[key] = (model, prompts)
    return _CACHE[key]


PRE_ISSUE = "8fd5bfa"  # the last commit whose rollout was the eager loop (issue 21's baseline)


def pre_issue_generate():
    """`generate` of r1train/generate.py at PRE_ISSUE, loaded from git (None without the history)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{PRE_ISSUE}:r1train/generate.py"], cwd=root,
                         capture_output=True, text=True)
    if src.returncode != 0:
        return None
    spec = importlib.util.spec_from_loader("r1k_pre_issue_generate", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclass looks its module up)
    exec(compile(src.stdout, f"{PRE_ISSUE}:r1train/generate.py", "exec"), mod.__dict__)
    return mod.generate


def rollout_bytes(model, shape) -> float:
    c = model.config
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    head = c.hidden_size // c.num_attention_heads
    kv_per_pos = 2 * c.num_hidden_layers * c.num_key_value_heads * head * model.dtype.itemsize
    B, T, Lp = shape["P"] * shape["G"], shape["T"], shape["prompt"]
    return T * w + B * kv_per_pos * sum(Lp + t for t in range(T))


def held_bytes(model) -> int:
    """Bytes the compiled rollout keeps between calls: its decoders' KV caches and buffers (the
    other providers allocate theirs per call, which the call's peak counts)."""
    total = 0
    for dec in model.__dict__.get("_r1k_decoders", {}).values():
        total += sum(t.nbytes for t in vars(dec).values() if isinstance(t, torch.Tensor))
        total += sum(layer.keys.nbytes + layer.values.nbytes for layer in dec.cache.layers
                     if layer.is_initialized)
    return total


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", ["r1k-compiled", "r1k-eager", "pre-issue-loop", "hf-generate"])
def test_rollout(benchmark, bench, provider, shape):
    model, prompts = setup(shape)
    P, G, T = shape["P"], shape["G"], shape["T"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if provider == "pre-issue-loop":
        old = pre_issue_generate()
        if old is None:
            pytest.skip(f"no git history with commit {PRE_ISSUE} in this clone")

        def fn():
            return old(model, prompts, group_size=G, max_new_tokens=T, eos_id=-1, pad_id=0,
                       temperature=1.0, generator=gen)
    elif provider.startswith("r1k-"):
        compile = provider == "r1k-compiled"

        def fn():
            return generate(model, prompts, group_size=G, max_new_tokens=T, eos_id=-1, pad_id=0,
                            temperature=1.0, generator=gen, compile=compile)
    else:
        ids = torch.tensor(prompts, device=DEVICE)

        def fn():
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                      max_new_tokens=T, min_new_tokens=T, num_return_sequences=G,
                                      pad_token_id=0)
    row = bench(benchmark, fn, op=OP, shape=shape, provider=provider,
                bytes=rollout_bytes(model, shape), baseline="hf-generate",
                rounds=5 if DEVICE == "cuda" else 3,
                cpu_peak=(lambda: held_bytes(model)) if provider == "r1k-compiled" else (lambda: 0))
    row["tokens_per_s"] = P * G * T / row["median_s"]
    benchmark.extra_info["tokens_per_s"] = row["tokens_per_s"]
