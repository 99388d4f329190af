"""Integrations of the fused GRPO loss: the plain PyTorch loop (TRL: test_trl_integration.py,
verl: test_verl.py, HF: test_hf_integration.py)."""
import os
import sys

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- plain PyTorch loop -----------------------------------------------------------------------


def _example():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import grpo_plain_torch
    finally:
        sys.path.pop(0)
    return grpo_plain_torch


@pytest.mark.parametrize("loss_type,beta", [("dapo", 0.0), ("grpo", 0.04)])
def test_plain_torch_loop_learns(loss_type, beta):
    rewards = _example().train(steps=14, loss_type=loss_type, beta=beta)
    assert all(0.0 <= r <= 1.0 for r in rewards)
    # the target token starts at ~1/32 of the samples; GRPO must raise that clearly
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
