"""apply_r1kernels under FSDP2, in 2 real gloo processes on CPU: a tiny Qwen2 (tied and untied
head), every layer and the root fully_shard-ed, each rank its own batch; the loss (fused NLL) and
token log-probs of each rank, and every gradient after FSDP2's reduction, against one unsharded,
unpatched process on both batches.

pytest runs this file under torchrun; each process prints ALL OK."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fsdp2_matches_one_process():
    pytest.importorskip("transformers")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # CPU tensors: the C++ backend
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("ALL OK") == 2


def _case(rank, world, tied):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1kernels.integrations.hf import apply_r1kernels

    cfg = Qwen2Config(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=tied)
    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(cfg)
    model = Qwen2ForCausalLM(cfg)
    model.load_state_dict(ref.state_dict())
    batches = []
    for r in range(world):
        g = torch.Generator().manual_seed(100 + r)
        ids = torch.randint(0, 37, (2, 7), generator=g)
        labels = ids.clone()
        labels[r % 2, :3] = -100
        batches.append((ids, torch.ones_like(ids), labels))
    # one process, unpatched: FSDP2 averages the ranks' gradients
    losses = [ref(input_ids=i, attention_mask=a, labels=y).loss for i, a, y in batches]
    (sum(losses) / world).backward()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    apply_r1kernels(model)
    ids, attn, labels = batches[rank]
    out = model(input_ids=ids, attention_mask=attn, labels=labels)
    torch.testing.assert_close(out.loss, losses[rank].detach(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"tied={tied} {name}: {m}")
    with torch.no_grad():
        lp = model(input_ids=ids, attention_mask=attn, labels=labels,
                   return_token_logprobs=True).token_logprobs
        want = torch.log_softmax(ref(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
        want = want.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(lp, want * (labels[:, 1:] != -100), rtol=1e-5, atol=1e-5)
    dist.barrier()


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        for tied in (False, True):
            _case(dist.get_rank(), dist.get_world_size(), tied)
        print(f"rank {dist.get_rank()}: ALL OK", flush=True)
    finally:
        dist.destroy_process_group()
