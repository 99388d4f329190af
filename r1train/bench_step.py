"""Measure one GRPO step (rollout + update) of a random-weight model.

`python -m r1train.bench_step [--tiny]`.

Default shape: Qwen2.5-0.5B (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864,
vocab 151936, tied embeddings), 16 prompts x 8 completions, prompts of 64 tokens, 256 new tokens
(end-of-sequence disabled so every completion has exactly 256 tokens). Reports generation
tokens/s, update seconds and peak memory as one JSON line. `--tiny` runs a small shape (CPU smoke
test). Random weights, so the numbers are about speed and memory only.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small shape for a CPU smoke test")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--micro_batch_tokens", type=int, default=16384)
    ap.add_argument("--out", default="", help="also write the JSON result to this file")
    args = ap.parse_args(argv)

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1train.config import Config
    from r1train.generate import generate
    from r1train.model import build_char_tokenizer
    from r1train.train import Trainer

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    shape = TINY if args.tiny else QWEN25_05B
    tok = build_char_tokenizer()
    cfg_m = Qwen2Config(**shape, max_position_embeddings=args.prompt_len + args.new_tokens + 8,
                        tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg_m).to(dtype)
    cfg = Config(out_dir="", device=str(dev), dtype=args.dtype, group_size=args.group_size,
                 prompts_per_step=args.prompts, max_new_tokens=args.new_tokens,
                 gradient_checkpointing=args.gradient_checkpointing,
                 micro_batch_tokens=args.micro_batch_tokens)
    trainer = Trainer(cfg)
    trainer.attach(model, tok)
    opt = trainer.make_optimizer(cfg.lr)
    P, G, T = args.prompts, args.group_size, args.new_tokens
    gen = torch.Generator(device=dev).manual_seed(0)
    prompts = torch.randint(10, shape["vocab_size"], (P, args.prompt_len), generator=gen,
                            device=dev).tolist()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def one_step():
        sync()
        t0 = time.perf_counter()
        roll = generate(model, prompts, group_size=G, max_new_tokens=T, eos_id=-1,
                        pad_id=tok.pad_token_id, temperature=1.0, generator=gen)
        sync()
        t1 = time.perf_counter()
        rewards = torch.rand(P * G, generator=gen, device=dev)
        trainer.update(opt, prompts, roll.tokens, roll.lengths.tolist(), rewards, G)
        sync()
        return t1 - t0, time.perf_counter() - t1

    one_step()  # warm-up: allocator, kernels, optimizer state
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_gen, t_upd = one_step()
    result = {
        "shape": "tiny" if args.tiny else "qwen2.5-0.5b", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": args.dtype, "prompts": P, "group_size": G, "prompt_len": args.prompt_len,
        "new_tokens": T, "parameters": sum(p.numel() for p in model.parameters()),
        "generation_seconds": t_gen, "generation_tokens_per_s": P * G * T / t_gen,
        "update_seconds": t_upd, "step_seconds": t_gen + t_upd,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(dev) / 2**30
                            if dev.type == "cuda" else None),
        "fused_loss": hasattr(__import__("r1kernels"), "GRPOLoss"),
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
