"""The trainer under torchrun: 2 CPU processes with the gloo backend (DDP)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file


def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "r1train", "--out_dir", str(out), "--device", "cpu", "--tiny_hidden", "32",
           "--tiny_layers", "1", "--tiny_heads", "2", "--tiny_intermediate", "64",
           "--sft_examples", "32", "--sft_epochs", "1", "--sft_batch_size", "16",
           "--grpo_steps", "3", "--prompts_per_step", "2", "--group_size", "4",
           "--max_new_tokens", "24", "--eval_examples", "8", "--rs_prompts", "4",
           "--rs_samples", "2", "--checkpoint_every", "0"]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["replicas_in_sync"] is True  # DDP kept both processes' weights identical
    assert set(summary["eval"]) >= {"base", "after_sft", "after_grpo"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "grpo"] == [1, 2, 3]
    assert os.path.exists(summary["rejection_sampling"]["path"])
    # and training did move them
    final = load_file(str(out / "model" / "model.safetensors"))
    base = load_file(str(out / "base_model" / "model.safetensors"))
    assert any(not torch.equal(final[k], base[k]) for k in final)
