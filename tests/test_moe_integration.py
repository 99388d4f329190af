"""transformers DeepSeek-V3 / Qwen3-MoE with the r1kernels router and dispatch: same outputs and
gradients as the eager modeling code on tiny random models; routing replay."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1kernels import dispatch  # noqa: E402
from r1kernels.integrations import hf_moe  # noqa: E402
from r1kernels.integrations.hf_moe import (RoutingReplay, apply_r1kernels_moe_to_deepseek_v3,  # noqa: E402
                                           apply_r1kernels_moe_to_qwen3_moe)
from conftest import DEVICE  # noqa: E402

BACKENDS = dispatch.available_backends("moe_route", DEVICE)


def tiny_deepseek_v3():
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16, n_group=4,
        topk_group=2, num_experts_per_tok=4, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    model = transformers.DeepseekV3ForCausalLM(cfg).float()
    for mod in model.modules():
        if type(mod).__name__ == "DeepseekV3TopkRouter":  # zero-initialised: every score would tie
            torch.nn.init.normal_(mod.weight, std=1.0)
            torch.nn.init.normal_(mod.e_score_correction_bias, std=0.1)
    return model.to(DEVICE)


def tiny_qwen3_moe(norm_topk_prob):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=12, num_experts_per_tok=3,
        norm_topk_prob=norm_topk_prob, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.Qwen3MoeForCausalLM(cfg).float()
    for mod in model.modules():
        if type(mod).__name__ == "Qwen3MoeTopKRouter":
            torch.nn.init.normal_(mod.weight, std=1.0)
    return model.to(DEVICE)


def compare(patched, eager, ids, backend):
    with dispatch.use_backend(backend):
        out = patched(ids).logits
        out.square().mean().backward()
    ref = eager(ids).logits
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    n = 0
    for (name, p), (_, q) in zip(patched.named_parameters(), eager.named_parameters()):
        if q.grad is None:
            continue
        n += 1
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert n > 10


def count_calls(monkeypatch):
    calls = {"route": 0, "permute": 0, "unpermute": 0}
    for name, key in (("moe_route", "route"), ("moe_permute", "permute"), ("moe_unpermute", "unpermute")):
        orig = getattr(hf_moe, name)

        def wrapped(*a, _orig=orig, _key=key, **kw):
            calls[_key] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(hf_moe, name, wrapped)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepseek_v3_matches_eager(backend, monkeypatch):
    eager = tiny_deepseek_v3()
    patched = copy.deepcopy(eager)
    assert apply_r1kernels_moe_to_deepseek_v3(patched) == 4  # 2 layers x (router, experts)
    calls = count_calls(monkeypatch)
    ids = torch.randint(3, 64, (2, 9), device=DEVICE)
    compare(patched, eager, ids, backend)
    assert calls == {"route": 2, "permute": 2, "unpermute": 2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe_matches_eager(backend, norm, monkeypatch):
    eager = tiny_qwen3_moe(norm)
    patched = copy.deepcopy(eager)
    assert apply_r1kernels_moe_to_qwen3_moe(patched) == 6  # 2 layers x (router, block, experts)
    calls = count_calls(monkeypatch)
    ids = torch.randint(3, 64, (3, 5), device=DEVICE)
    compare(patched, eager, ids, backend)
    assert calls == {"route": 2, "permute": 2, "unpermute": 2}


def test_router_only_and_experts_only():
    eager = tiny_qwen3_moe(True)
    ids = torch.randint(3, 64, (2, 6), device=DEVICE)
    for kw in (dict(experts=False), dict(router=False)):
        patched = copy.deepcopy(eager)
        apply_r1kernels_moe_to_qwen3_moe(patched, **kw)
        torch.testing.assert_close(patched(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)


def test_class_patch():
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    saved = {c: c.__dict__["forward"] for c in (m.DeepseekV3TopkRouter, m.DeepseekV3Experts)}
    try:
        eager = tiny_deepseek_v3()
        ids = torch.randint(3, 64, (2, 5), device=DEVICE)
        ref = eager(ids).logits
        assert apply_r1kernels_moe_to_deepseek_v3() == 2
        assert m.DeepseekV3TopkRouter.forward is hf_moe._deepseek_v3_router_forward
        torch.testing.assert_close(eager(ids).logits, ref, rtol=1e-5, atol=1e-5)
    finally:
        for c, f in saved.items():
            c.forward = f


def test_routing_replay(monkeypatch):
    model = tiny_deepseek_v3()
    apply_r1kernels_moe_to_deepseek_v3(model)
    prompt = torch.randint(3, 64, (2, 6), device=DEVICE)
    replay = RoutingReplay()
    with replay.record():
        seq = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert seq.shape == (2, 10)
    names = sorted(replay.routing)
    assert names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    for ids in replay.routing.values():
        assert ids.shape == (2, 9, 4) and ids.dtype == torch.int32  # the last token is never forwarded

    # generation without a KV cache re-runs the sequence every step: same record
    nocache = RoutingReplay()
    with nocache.record():
        seq2 = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(seq2, seq)
    for name in names:
        assert torch.equal(nocache.routing[name], replay.routing[name])

    # same weights: a teacher-forced forward routes like generation did (prefill + decode steps)
    fresh = RoutingReplay()
    with fresh.record():
        model(seq)
    for name in names:
        assert torch.equal(fresh.routing[name][:, :9], replay.routing[name])

    # a policy update moves the routers; replay keeps the rollout's experts, the weights are new
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__ == "DeepseekV3TopkRouter":
                mod.weight.add_(torch.randn_like(mod.weight) * 2.0)
    used = []
    orig = hf_moe.moe_route

    def spy(*a, replay_ids=None, **kw):
        w, ids = orig(*a, replay_ids=replay_ids, **kw)
        if replay_ids is not None:
            used.append(ids)
        return w, ids

    monkeypatch.setattr(hf_moe, "moe_route", spy)
    with replay.replay():
        out = model(seq).logits
    assert len(used) == 2
    for ids, name in zip(used, names):
        assert torch.equal(ids.view(2, 10, 4)[:, :9].cpu(), replay.routing[name].cpu())
    free = RoutingReplay()
    with free.record():
        model(seq)
    assert any(not torch.equal(free.routing[n][:, :9], replay.routing[n]) for n in names)  # the update mattered
    out.square().mean().backward()
    for mod in model.modules():
        if type(mod).__name__ == "DeepseekV3TopkRouter":
            assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0

    # micro-batches: select rows
    sub = replay.select([1])
    with sub.replay():
        out1 = model(seq[1:]).logits
    torch.testing.assert_close(out1, out[1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        with replay.replay():
            model(seq[:1])
    with pytest.raises(KeyError):
        with RoutingReplay().replay():
            model(seq)
    with pytest.raises(RuntimeError, match="active"):
        with replay.replay():
            with replay.record():
                pass
