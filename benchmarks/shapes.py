"""One registry of benchmark shapes, shared by every bench_<op>.py.

On a GPU the shapes are the realistic ones the targets in BENCHMARKS.md are stated for; on CPU
they are small, so that `pytest benchmarks/ --benchmark-only` finishes in a few minutes.
"""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Model sizes users run GRPO on: hidden size H, vocabulary V, experts E, top_k (groups), and the
# head's soft-cap c (z = c * tanh(z / c); the `softcap` field of the log-prob shapes, None = none).
MODELS = {
    "qwen2.5": dict(H=4096, V=151936),  # the Qwen2.5 tokenizer; H of the targets
    "qwen2.5-7b": dict(H=3584, V=151936),
    "llama3": dict(H=4096, V=128256),
    "deepseek-v3": dict(H=7168, E=256, top_k=8, n_group=8, topk_group=4),
    "qwen3-moe": dict(E=128, top_k=8),
    "qwen3-30b-a3b": dict(H=2048, E=128, top_k=8),
    "gpt-oss-20b": dict(H=2880, V=201088, E=32, top_k=4),
    "qwen3.5-397b": dict(E=512, top_k=10),
    "kimi-k2": dict(E=384, top_k=8, n_group=1, topk_group=1),
    # Gemma-3/4 heads: transformers' Gemma3/Gemma4 text configs (H=2304); soft-capped as Gemma-2 (c=30)
    "gemma-3/4": dict(H=2304, V=262144, softcap=30.0),
}

SHAPES = {
    "group_advantages": {
        "cuda": [dict(P=512, G=16), dict(P=64, G=1024)],
        "cpu": [dict(P=512, G=16), dict(P=64, G=1024)],
    },
    "token_logprobs": {
        "cuda": [dict(N=16384, V=151936), dict(N=16384, V=128256), dict(N=16384, V=201088),  # gpt-oss
                 dict(N=8192, V=262144, softcap=30.0)],  # Gemma-3/4
        "cpu": [dict(N=256, V=32000), dict(N=64, V=32000, softcap=30.0)],
    },
    "linear_token_logprobs": {
        "cuda": [dict(N=16384, H=4096, V=151936), dict(N=16384, H=3584, V=151936),
                 dict(N=16384, H=4096, V=128256), dict(N=16384, H=2880, V=201088),  # gpt-oss-20b
                 dict(N=8192, H=2304, V=262144, softcap=30.0)],  # Gemma-3/4
        "cpu": [dict(N=256, H=256, V=8192), dict(N=64, H=256, V=8192, softcap=30.0)],
    },
    "grpo_loss": {
        "cuda": [dict(B=512, T=8192)],
        "cpu": [dict(B=64, T=1024)],
    },
    "grpo_loss_logits": {
        "cuda": [dict(B=16, T=1025, V=151936)],
        "cpu": [dict(B=2, T=65, V=8192)],
    },
    "grpo_loss_hidden": {
        # the target shape, and long completions (one sweep since token-level chunks)
        "cuda": [dict(B=16, T=1024, H=4096, V=151936), dict(B=4, T=4096, H=4096, V=151936)],
        "cpu": [dict(B=2, T=128, H=256, V=8192)],
    },
    "moe_route": {  # DeepSeek-V3, Qwen3-30B-A3B, gpt-oss-20b, Qwen3.5-397B, Kimi-K2
        "cuda": [dict(T=16384, E=256, top_k=8, n_group=8, topk_group=4, score_func="sigmoid", bias=True),
                 dict(T=16384, E=128, top_k=8, n_group=1, topk_group=1, score_func="softmax", bias=False),
                 dict(T=16384, E=32, top_k=4, n_group=1, topk_group=1, score_func="softmax", bias=False),
                 dict(T=16384, E=512, top_k=10, n_group=1, topk_group=1, score_func="softmax", bias=False),
                 dict(T=16384, E=384, top_k=8, n_group=1, topk_group=1, score_func="sigmoid", bias=True)],
        "cpu": [dict(T=1024, E=256, top_k=8, n_group=8, topk_group=4, score_func="sigmoid", bias=True),
                dict(T=1024, E=128, top_k=8, n_group=1, topk_group=1, score_func="softmax", bias=False),
                dict(T=256, E=512, top_k=10, n_group=1, topk_group=1, score_func="softmax", bias=False)],
    },
    "moe_permute": {  # DeepSeek-V3, Qwen3-30B-A3B, gpt-oss-20b
        "cuda": [dict(T=16384, H=7168, E=256, top_k=8), dict(T=16384, H=2048, E=128, top_k=8),
                 dict(T=16384, H=2880, E=32, top_k=4)],
        "cpu": [dict(T=512, H=1024, E=64, top_k=8)],
    },
    # rollout: model (bench_rollout.MODELS), P prompts x G completions x T new tokens
    "rollout": {
        "cuda": [dict(model="qwen2.5-0.5b", P=16, G=8, T=512, prompt=64, dtype="bfloat16")],
        "cpu": [dict(model="tiny", P=8, G=4, T=32, prompt=16, dtype="float32"),
                dict(model="qwen2-12m", P=8, G=4, T=32, prompt=16, dtype="float32")],
    },
    # one decode step's attention: the tiny default model's rollout (16 prompts x 8), and
    # Qwen2.5-0.5B's heads (14 query, 2 key/value, 64 wide) over a 64 + 512 slot cache
    "decode_attention": {
        "cuda": [dict(B=128, Hq=14, Hkv=2, L=576, D=64)],
        "cpu": [dict(B=128, Hq=4, Hkv=2, L=56, D=32), dict(B=32, Hq=14, Hkv=2, L=576, D=64)],
    },
    "sample_tokens": {
        "cuda": [dict(B=128, V=151936, top_k=0, top_p=1.0), dict(B=128, V=151936, top_k=0, top_p=0.9),
                 dict(B=128, V=151936, top_k=50, top_p=0.9)],
        "cpu": [dict(B=32, V=32000, top_k=0, top_p=1.0), dict(B=32, V=32000, top_k=0, top_p=0.9),
                dict(B=32, V=32000, top_k=50, top_p=0.9)],
    },
}


def shapes_for(op: str, device_type: str) -> list[dict]:
    return SHAPES[op]["cuda" if device_type == "cuda" else "cpu"]


def shape_id(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())
