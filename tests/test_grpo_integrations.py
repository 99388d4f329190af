"""Integrations of the fused GRPO loss: TRL trainer subclass, verl policy loss, plain PyTorch loop."""
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


# ---- TRL ----------------------------------------------------------------------------------------


def _tiny_model(family):
    """A tiny causal LM of `family` (fp32, random): Qwen2 (a plain head), or a head that
    transforms its logits (Gemma-3: final_logit_softcapping; Cohere: logit_scale multiplies;
    Granite: logits_scaling divides), its lm_head scaled up so that the transform matters."""
    import transformers

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  tie_word_embeddings=False, pad_token_id=60, eos_token_id=61)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if family == "gemma3":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            final_logit_softcapping=5.0, head_dim=16, **common))
    elif family == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.25, **common))
    else:
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=4.0,
                                                                           **common))
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    return model


def _tiny_trainer(cls, family="qwen2", **cfg_kw):
    pytest.importorskip("trl")
    tokenizers = pytest.importorskip("tokenizers")
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig

    vocab = {f"w{i}": i for i in range(60)}
    vocab.update({"<pad>": 60, "<eos>": 61, "<unk>": 62})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    # saved to disk and passed by path: with beta != 0 TRL loads the reference model from there
    path = os.path.join("/tmp", f"r1k_trl_model_{family}_{os.getpid()}")
    _tiny_model(family).save_pretrained(path)
    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"] * 4})

    def reward(completions, **kw):
        return [float(c.count("w3")) for c in completions]

    args = GRPOConfig(output_dir=os.path.join("/tmp", f"r1k_trl_{os.getpid()}"),
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      max_steps=1, report_to=[], logging_steps=1, use_cpu=True, save_strategy="no",
                      **cfg_kw)
    return cls(model=path, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)


def _inputs(trainer, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P, T = 4, 3, 6
    prompt_ids = torch.randint(0, 60, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0  # left padding
    completion_ids = torch.randint(0, 60, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 1:] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
            "num_items_in_batch": completion_mask.sum().float(),
            "old_per_token_logps": -torch.rand(B, T, generator=g) * 4 - 2,
            "ref_per_token_logps": -torch.rand(B, T, generator=g) * 4 - 2}


@pytest.mark.parametrize("loss_type,extra", [
    ("dapo", dict(epsilon_high=0.28)),
    ("grpo", dict(beta=0.04, use_bias_correction_kl=True)),
    ("bnpo", dict(beta=0.02, delta=1.5)),
    ("dr_grpo", dict()),
    ("cispo", dict(epsilon_high=5.0)),
    ("sapo", dict(importance_sampling_level="sequence")),
    ("luspo", dict(importance_sampling_level="sequence")),
])
def test_trl_trainer_subclass_matches_trl(loss_type, extra):
    """R1KGRPOTrainer._compute_loss == GRPOTrainer._compute_loss on the same model and batch:
    loss, every parameter gradient, and the logged metrics (fp32: no autocast)."""
    compare_with_trl(loss_type, extra, bf16=False, rtol=1e-4)


def test_trl_trainer_subclass_matches_trl_bf16_autocast():
    """Under bf16 autocast both heads take bf16 GEMM inputs; TRL also rounds the logits to bf16
    (2^-8 relative), so agreement is at that level."""
    compare_with_trl("grpo", dict(beta=0.04), bf16=True, rtol=2e-2)


def _need_trl():
    for mod in ("trl", "transformers", "datasets", "tokenizers"):
        pytest.importorskip(mod, reason=f"{mod} is not installed (pip install trl)")


@pytest.mark.parametrize("family", ["gemma3", "cohere", "granite"])
def test_trl_trainer_subclass_matches_trl_transformed_heads(family):
    """Models whose head soft-caps or scales its logits take the fused path (with GRPOLoss's
    softcap / logit_scale read from their config) and match TRL's own loss on them."""
    compare_with_trl("grpo", dict(beta=0.04), bf16=False, rtol=1e-4, family=family)


def compare_with_trl(loss_type, extra, bf16, rtol, family="qwen2"):
    _need_trl()
    from trl import GRPOTrainer
    from r1kernels.integrations.trl import R1KGRPOTrainer

    trainer = _tiny_trainer(R1KGRPOTrainer, family=family, loss_type=loss_type, bf16=bf16,
                            **extra)
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop; 2 checks the scaling
    inputs = _inputs(trainer)
    if trainer.beta == 0.0:
        inputs.pop("ref_per_token_logps")
    assert trainer._r1k_supported(model, inputs)  # the fused path, not TRL's fallback
    results = []
    for fn in (GRPOTrainer._compute_loss, R1KGRPOTrainer._compute_loss):
        model.zero_grad()
        for v in trainer._metrics["train"].values():
            v.clear()
        loss = fn(trainer, model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
        results.append((loss.item(), grads, metrics))
    (l0, g0, m0), (l1, g1, m1) = results
    assert l1 == pytest.approx(l0, rel=rtol, abs=1e-6)
    assert set(g1) == set(g0) and len(g0) > 0
    for n in g0:
        scale = g0[n].abs().max().item()
        torch.testing.assert_close(g1[n], g0[n], rtol=10 * rtol, atol=10 * rtol * scale, msg=n)
    keys = [k for k in m0 if k in ("kl", "entropy", "cispo_clip_ratio") or k.endswith("_mean")]
    assert "entropy" in keys
    for k in keys:
        if extra.get("importance_sampling_level") == "sequence" and k.startswith("clip_ratio"):
            continue  # TRL averages sequence-level clip flags per sequence (documented deviation)
        assert m1[k] == pytest.approx(m0[k], rel=rtol, abs=1e-6), k


def test_trl_trainer_trains_one_step():
    _need_trl()
    from r1kernels.integrations.trl import R1KGRPOTrainer

    trainer = _tiny_trainer(R1KGRPOTrainer, beta=0.04)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("lm_head" in n for n in changed) and len(changed) > 3
