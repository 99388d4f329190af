"""Integrations of the fused GRPO loss: verl policy loss, plain PyTorch loop (TRL:
tests/test_trl_integration.py)."""
import os
import sys
import types

import pytest
import torch

from r1kernels.integrations.verl import (compute_policy_loss_r1k, compute_policy_loss_r1k_gspo,
                                         register_verl_policy_loss)

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


# ---- verl -------------------------------------------------------------------------------------


def verl_vanilla_f64(old, lp, adv, mask, agg, eps_lo, eps_hi, clip_c, rw=None, seq=False, L=None):
    """verl's vanilla/GSPO policy loss written out in float64 (dual clip, aggregation modes)."""
    lp = lp.double().clone().requires_grad_(True)
    m = mask.double()
    if seq:
        w = ((lp - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        ratio = torch.exp(w).expand_as(lp)
    else:
        ratio = torch.exp(lp - old)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi)
    c1 = torch.maximum(l1, l2)
    losses = c1
    if not seq:
        l3 = -adv * clip_c
        losses = torch.where(adv < 0, torch.minimum(l3, c1), c1)
    if rw is not None:
        losses = losses * rw
    if agg == "token-mean":
        loss = (losses * m).sum() / m.sum().clamp(min=1)
    elif agg == "seq-mean-token-mean":
        loss = ((losses * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif agg == "seq-mean-token-sum":
        loss = (losses * m).sum(-1).mean()
    else:
        loss = (losses * m).sum() / (lp.shape[0] * (L or lp.shape[1]))
    loss.backward()
    return loss.item(), lp.grad


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("with_rw", [False, True])
def test_verl_policy_loss_matches_formula(agg, with_rw):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 20
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.8  # wide: dual clip hit
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    mask = torch.rand(B, T, generator=g) < 0.8
    rw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5 if with_rw else None
    config = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 2.0}
    x = lp.float().requires_grad_(True)
    loss, metrics = compute_policy_loss_r1k(old.float(), x, adv.float(), mask, agg, config,
                                            None if rw is None else rw.float())
    loss.backward()
    rloss, rgrad = verl_vanilla_f64(old, lp, adv, mask, agg, 0.2, 0.28, 2.0, rw)
    assert loss.item() == pytest.approx(rloss, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(x.grad.double(), rgrad, rtol=1e-5, atol=1e-8)
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert 0 < metrics["actor/pg_clipfrac"] < 1
    # token-mean with verl's global batch info: normalize by the global token count per rank
    if agg == "token-mean":
        cfg = dict(config, global_batch_info={"batch_num_tokens": 400, "dp_size": 2})
        loss2, _ = compute_policy_loss_r1k(old.float(), lp.float(), adv.float(), mask, agg, cfg,
                                           None if rw is None else rw.float())
        assert loss2.item() == pytest.approx(rloss * mask.sum().item() / 200, rel=1e-5)


def test_verl_gspo_matches_formula():
    g = torch.Generator().manual_seed(2)
    B, T = 5, 16
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64)
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    mask = torch.rand(B, T, generator=g) < 0.8
    x = lp.float().requires_grad_(True)
    config = types.SimpleNamespace(clip_ratio=0.2, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    loss, _ = compute_policy_loss_r1k_gspo(old.float(), x, adv.float(), mask, config=config)
    loss.backward()
    rloss, rgrad = verl_vanilla_f64(old, lp, adv, mask, "seq-mean-token-mean", 3e-4, 4e-4, None, seq=True)
    assert loss.item() == pytest.approx(rloss, rel=1e-5)
    torch.testing.assert_close(x.grad.double(), rgrad, rtol=1e-5, atol=1e-8)


def test_verl_bad_agg_mode():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        compute_policy_loss_r1k(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                                torch.ones(2, 3), "token-sum")


def test_verl_registration(monkeypatch):
    """With verl importable, the losses land in its registry under the given names. verl itself
    is not installable here, so a stand-in module with verl's register_policy_loss is used unless
    the real one imports."""
    try:
        from verl.trainer.ppo import core_algos  # noqa: F401
    except ImportError:
        registry = {}

        def register_policy_loss(name):
            def deco(fn):
                registry[name] = fn
                return fn
            return deco

        core = types.ModuleType("verl.trainer.ppo.core_algos")
        core.register_policy_loss = register_policy_loss
        core.POLICY_LOSS_REGISTRY = registry
        for name in ("verl", "verl.trainer", "verl.trainer.ppo"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core)
    register_verl_policy_loss("r1k_test", "r1k_test_gspo")
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    assert POLICY_LOSS_REGISTRY["r1k_test"] is compute_policy_loss_r1k
    assert POLICY_LOSS_REGISTRY["r1k_test_gspo"] is compute_policy_loss_r1k_gspo
