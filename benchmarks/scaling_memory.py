"""The per-rank memory model of docs/scaling.md, as arithmetic (no GPU needed):
`python benchmarks/scaling_memory.py` prints its tables. Every term is a formula of the model's
config and the run's sizes; docs/scaling.md says where each comes from and what to measure."""
from __future__ import annotations

GB = 1e9
# Qwen2.5 configs (config.json of each): hidden, layers, heads, kv heads, intermediate, vocab, tied
MODELS = {
    "Qwen2.5-0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "Qwen2.5-1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "Qwen2.5-7B": (3584, 28, 28, 4, 18944, 152064, False),
    "Qwen2.5-32B": (5120, 64, 40, 8, 27648, 152064, False),
}
MICRO_TOKENS = 8192          # tokens per update micro-batch (micro_batch_tokens)
ROLLOUT_SEQS = 128           # sequences generated at once per rank (P x G)
ROLLOUT_LEN = 1024           # prompt + completion tokens per sequence
LOSS_CHUNK = 5 * 2**25 * 4   # the loss's fp32 logits chunk on CUDA (TILE_ELEMS_CUDA)
FP32_ACC_LIMIT = 2**30       # SINGLE_SWEEP_FP32_ACC_BYTES


def sizes(h, L, nh, kv, inter, V, tied):
    hd = h // nh
    layer = h * (h + 2 * kv * hd) + (h + 2 * kv * hd) + h * h + 3 * h * inter + 2 * h
    embed = V * h
    params = L * layer + embed * (1 if tied else 2) + h
    return params, layer, embed, hd


def row(name, n_gpu):
    h, L, nh, kv, inter, V, tied = MODELS[name]
    params, layer, embed, hd = sizes(h, L, nh, kv, inter, V, tied)
    bf16_states = 8 * params / n_gpu        # bf16 weights, grads, AdamW m and v (--dtype bfloat16)
    mixed_states = 16 * params / n_gpu      # fp32 weights + grads + AdamW m, v (bf16 compute)
    gathered = 2 * 2 * layer if n_gpu > 1 else 0  # bf16: the layer computing + the one prefetched
    head = 2 * embed if n_gpu > 1 else 0     # the lm_head gathered by the loss (DTensor)
    # activations per token and layer kept for backward (bf16, SDPA/flash attention, SwiGLU):
    # inputs of the two norms, q, k, v, attention out, o-proj in, gate, up, act(gate) * up
    per_tok_layer = 2 * (6 * h + 2 * kv * hd + 4 * inter)
    act_full = MICRO_TOKENS * per_tok_layer * L
    act_ckpt = MICRO_TOKENS * (2 * h * L + per_tok_layer)  # layer inputs + one layer recomputed
    kv_cache = 2 * L * kv * hd * 2 * ROLLOUT_SEQS * ROLLOUT_LEN
    acc = 4 * embed if 4 * embed <= FP32_ACC_LIMIT else 2 * embed  # grad_weight running sum
    loss = LOSS_CHUNK + acc + 4 * MICRO_TOKENS * h                    # + fp32 grad_hidden
    rollout_weights = 2 * params if n_gpu > 1 else 0  # trainer: every layer gathered (bf16)
    train_peak = bf16_states + gathered + head + act_ckpt + loss
    return dict(params=params / 1e9, bf16_states=bf16_states / GB, mixed_states=mixed_states / GB,
                gathered=(gathered + head) / GB, act_full=act_full / GB, act_ckpt=act_ckpt / GB,
                kv=kv_cache / GB, loss=loss / GB, rollout_weights=rollout_weights / GB,
                train_peak=train_peak / GB,
                rollout_peak=(bf16_states + rollout_weights + kv_cache) / GB)


def main():
    cols = ("bf16_states", "mixed_states", "gathered", "act_full", "act_ckpt", "loss", "kv",
            "rollout_weights", "train_peak", "rollout_peak")
    print("| model | GPUs | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name in MODELS:
        for n in (1, 8, 64):
            r = row(name, n)
            print(f"| {name} ({r['params']:.2f}B) | {n} | " +
                  " | ".join(f"{r[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
