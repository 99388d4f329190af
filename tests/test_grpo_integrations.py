"""Integrations of the fused GRPO loss: TRL trainer subclass, plain PyTorch loop (verl: test_verl.py)."""
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


# ---- TRL ----------------------------------------------------------------------------------------


def _tiny_trainer(cls, **cfg_kw):
    pytest.importorskip("trl")
    tokenizers = pytest.importorskip("tokenizers")
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig

    vocab = {f"w{i}": i for i in range(60)}
    vocab.update({"<pad>": 60, "<eos>": 61, "<unk>": 62})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=60, eos_token_id=61)
    # saved to disk and passed by path: with beta != 0 TRL loads the reference model from there
    path = os.path.join("/tmp", f"r1k_trl_model_{os.getpid()}")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
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


def compare_with_trl(loss_type, extra, bf16, rtol):
    _need_trl()
    from trl import GRPOTrainer
    from r1kernels.integrations.trl import R1KGRPOTrainer

    trainer = _tiny_trainer(R1KGRPOTrainer, loss_type=loss_type, bf16=bf16, **extra)
    model = r1train.model
    model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop; 2 checks the scaling
    inputs = _inputs(trainer)
    if trainer.beta == 0.0:
        inputs.pop("ref_per_token_logps")
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
    before = {n: p.detach().clone() for n, p in r1train.model.named_parameters()}
    out = r1train.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    changed = [n for n, p in r1train.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("lm_head" in n for n in changed) and len(changed) > 3
