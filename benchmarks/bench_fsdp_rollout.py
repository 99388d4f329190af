"""Rollout on FSDP2-sharded weights: gathered once around the rollout (r1train.parallel.gathered,
what the trainer does), eager and with the compiled decode step (`--rollout_compile`), against
FSDP's own per-layer gathering at every decode step.

Run: `torchrun --nproc_per_node 2 benchmarks/bench_fsdp_rollout.py [hidden layers vocab]`
(CPU: gloo; CUDA: nccl, one GPU per process). Prints, per variant, the rollout time and the
parameter bytes each rank holds unsharded during it. Every completion runs to max_new_tokens
(no eos), so both variants run the same decode steps on every rank (FSDP's per-layer gathers
need that; the trainer's gathered rollout does not).
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist


def main(hidden=256, layers=4, vocab=4096, P=4, G=4, new=32, rounds=3):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1train import parallel
    from r1train.generate import generate

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=4 * hidden,
                      tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dev)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    root_bytes = full_bytes - layers * layer_bytes
    parallel.shard_model(model, activation_checkpointing=False)
    prompts = [[1 + (7 * i + j) % (vocab - 1) for j in range(8)] for i in range(P)]

    def rollout(compile=False):
        g = torch.Generator(device=dev).manual_seed(rank)
        return generate(model, prompts, group_size=G, max_new_tokens=new, eos_id=-1, pad_id=0,
                        generator=g, compile=compile)

    def gathered(compile=False):
        with parallel.gathered(model):
            return rollout(compile)

    res = {}
    for name, fn, resident in (("gathered once", gathered, full_bytes),
                               ("gathered once, compiled step", lambda: gathered(True),
                                full_bytes),
                               ("per-layer (FSDP)", rollout, root_bytes + layer_bytes)):
        fn()  # (the compiled variant: compiles here)
        times = []
        for _ in range(rounds):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res[name] = dict(seconds=sorted(times)[len(times) // 2],
                         tokens_per_s=P * G * new / sorted(times)[len(times) // 2],
                         unsharded_param_MiB=resident / 2**20)
    if rank == 0:
        print(json.dumps(dict(world=dist.get_world_size(), device=str(dev), hidden=hidden,
                              layers=layers, vocab=vocab, params_MiB=full_bytes / 2**20,
                              shard_MiB=full_bytes / dist.get_world_size() / 2**20, **res),
                         indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
