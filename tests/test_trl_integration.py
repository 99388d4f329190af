"""R1KGRPOTrainer against TRL's own GRPOTrainer (tiny models from configs, fp32): the same loss,
gradients, every logged metric and the same weights after training."""
import math
import os
import warnings

import pytest
import torch

for _mod in ("trl", "transformers", "datasets", "tokenizers"):
    pytest.importorskip(_mod, reason=f"{_mod} is not installed (pip install r1kernels[trl])")

import tokenizers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from r1kernels.integrations.hf import apply_r1kernels, remove_r1kernels  # noqa: E402
from r1kernels.integrations.trl import R1KGRPOTrainer  # noqa: E402

V = 64
_TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second",
           "epoch")


def _tokenizer():
    vocab = {f"w{i}": i for i in range(60)}
    vocab.update({"<pad>": 60, "<eos>": 61, "<unk>": 62})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def _model_path(family, tmp):
    """A tiny model saved to disk (TRL loads the reference model from the path when beta != 0)."""
    import transformers as tf
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  tie_word_embeddings=False, pad_token_id=60, eos_token_id=61)
    torch.manual_seed(0)
    if family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif family == "gemma3":  # soft-capped logits
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=16, final_logit_softcapping=2.0,
                                                         **common))
    elif family == "granite":  # logits divided by logits_scaling
        model = tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=0.5, **common))
    else:  # MoE: the router's balance loss joins the loss
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            output_router_logits=True, router_aux_loss_coef=0.05, **common))
    with torch.no_grad():  # logits of a few units: clipping, softcap and entropy all matter
        model.get_output_embeddings().weight.normal_(0, 1.0)
    path = os.path.join(tmp, family)
    model.save_pretrained(path)
    return path


def _reward(completions, **kw):
    return [float(c.count("w3")) - 0.1 * len(c.split()) for c in completions]


def _trainer(cls, path, tmp, **cfg):
    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w3 w3"] * 4})
    cfg.setdefault("max_steps", 1)
    cfg.setdefault("bf16", False)  # (GRPOConfig's default: bf16 autocast, on CPU too)
    args = GRPOConfig(output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, report_to=[], logging_steps=1,
                      use_cpu=True, save_strategy="no", seed=7, **cfg)
    return cls(model=path, reward_funcs=_reward, args=args, train_dataset=ds,
               processing_class=_tokenizer())


# one case per loss type and per option; the last ones take TRL's loss on r1kernels' log-probs
CASES = [
    ("dapo", dict(epsilon_high=0.28)),
    ("dapo", dict(importance_sampling_level="sequence", beta=0.02)),
    ("grpo", dict(beta=0.04, use_bias_correction_kl=True)),
    ("bnpo", dict(beta=0.02, delta=1.5)),
    ("dr_grpo", dict()),
    ("cispo", dict(epsilon_high=1.1)),
    ("sapo", dict(importance_sampling_level="sequence")),
    ("luspo", dict(importance_sampling_level="sequence")),
    ("grpo", dict(top_entropy_quantile=0.5)),
    ("dapo", dict(off_policy_mask_threshold=0.05)),
    ("grpo", dict(entropy_coef=0.01)),
    ("bnpo", dict(use_adaptive_entropy=True, entropy_target=5.0)),
    ("vespo", dict()),
]
_IDS = [f"{lt}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for lt, kw in CASES]


# ---- one loss call on a fixed batch ---------------------------------------------------------


def _inputs(seed=0):
    """A batch far off-policy (old log-probs 1 nat away: much clipping), with left padding, a
    short completion and an empty one."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = 6, 3, 7
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 1:] = 0
    completion_mask[3] = 0
    return {"prompt_ids": torch.randint(0, 60, (B, P), generator=g), "prompt_mask": prompt_mask,
            "completion_ids": torch.randint(0, 60, (B, T), generator=g),
            "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
            "num_items_in_batch": completion_mask.sum().float() * 2,
            "old_per_token_logps": -torch.rand(B, T, generator=g) * 4 - 2,
            "ref_per_token_logps": -torch.rand(B, T, generator=g) * 4 - 2}


class _TwoRanks:
    """The trainer's accelerator as seen from rank 0 of two: reduce adds the other rank's
    (fixed) sums, gather appends its (fixed) values. What TRL sums, R1K must sum."""

    def __init__(self, acc):
        self.acc = acc

    def __getattr__(self, name):
        return getattr(self.acc, name)

    @staticmethod
    def _other(t):
        return torch.arange(1, t.numel() + 1, dtype=t.dtype).reshape(t.shape) * 2.5 + 0.25

    def reduce(self, t, reduction="sum"):
        assert reduction == "sum"
        return t + self._other(t)

    def gather(self, t):
        return torch.cat([t.reshape(-1), self._other(t.reshape(-1)) / t.numel() / 3])

    gather_for_metrics = gather

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


def _loss_call(trainer, fn, inputs):
    model = trainer.model
    model.zero_grad()
    for v in trainer._metrics["train"].values():
        v.clear()
    loss = fn(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.item(), grads, metrics


def _compare(a, b, rtol):
    (l0, g0, m0), (l1, g1, m1) = a, b
    assert l1 == pytest.approx(l0, rel=rtol, abs=1e-6)
    assert set(g1) == set(g0) and len(g0) > 3
    for n in g0:
        scale = g0[n].abs().max().item()
        torch.testing.assert_close(g1[n], g0[n], rtol=10 * rtol, atol=10 * rtol * scale, msg=n)
    assert set(m1) == set(m0), (sorted(m0), sorted(m1))
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=rtol, abs=1e-6, nan_ok=True), k


@pytest.mark.parametrize("loss_type,extra", CASES, ids=_IDS)
def test_compute_loss_matches_trl(loss_type, extra, tmp_path):
    """R1KGRPOTrainer._compute_loss against TRL's (TRL's own head put back for it), on one
    batch, as rank 0 of two: loss, every parameter gradient, every metric."""
    path = _model_path("qwen2", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(R1KGRPOTrainer, path, str(tmp_path), loss_type=loss_type, **extra)
    ours = [w for w in caught if "R1KGRPOTrainer" in str(w.message)]
    assert len(ours) == (1 if trainer._r1k_unfused else 0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop; 2 checks scaling
    trainer.accelerator = _TwoRanks(trainer.accelerator)
    inputs = _inputs()
    if trainer.beta == 0.0:
        inputs.pop("ref_per_token_logps")
    state = (trainer.entropy_coef, trainer._last_world_entropy)
    remove_r1kernels(trainer.model)  # TRL's own fused head
    want = _loss_call(trainer, GRPOTrainer._compute_loss, inputs)
    trainer.entropy_coef, trainer._last_world_entropy = state
    trainer._entropy_window_stats = None
    apply_r1kernels(trainer.model, temperature=trainer.temperature)
    got = _loss_call(trainer, R1KGRPOTrainer._compute_loss, inputs)
    _compare(want, got, rtol=1e-5)
    m = want[2]
    assert "entropy" in m
    if loss_type in ("dapo", "grpo", "bnpo", "dr_grpo", "luspo") and not trainer._r1k_unfused:
        assert {"clip_ratio/low_min", "clip_ratio/high_max", "clip_ratio/region_mean"} <= set(m)
        assert m["clip_ratio/region_mean"] > 0  # the batch is clipped: the metrics mean something


@pytest.mark.parametrize("family", ["gemma3", "granite", "qwen3_moe"])
def test_compute_loss_matches_trl_other_models(family, tmp_path):
    """Soft-capped (Gemma-3) and scaled (Granite divides by logits_scaling) logits; an MoE
    model's aux loss (and its aux_loss metric)."""
    path = _model_path(family, str(tmp_path))
    trainer = _trainer(R1KGRPOTrainer, path, str(tmp_path), loss_type="grpo", beta=0.04)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = _inputs()
    remove_r1kernels(trainer.model)
    want = _loss_call(trainer, GRPOTrainer._compute_loss, inputs)
    apply_r1kernels(trainer.model, temperature=trainer.temperature)
    got = _loss_call(trainer, R1KGRPOTrainer._compute_loss, inputs)
    _compare(want, got, rtol=1e-5)
    assert ("aux_loss" in got[2]) == (family == "qwen3_moe")


# ---- whole training runs --------------------------------------------------------------------


def _train(cls, path, tmp, **cfg):
    trainer = _trainer(cls, path, tmp, **cfg)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.allclose(trainer.model.lm_head.weight, before)  # it did train
    logs = [{k: v for k, v in e.items() if k not in _TIMING} for e in trainer.state.log_history]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return logs, weights


@pytest.mark.parametrize("loss_type,extra", CASES, ids=_IDS)
def test_training_matches_trl(loss_type, extra, tmp_path):
    """Two optimizer steps of two micro-batches each on one generation round (the second step
    off-policy: its old log-probs are the first step's), stock GRPOTrainer and R1KGRPOTrainer
    from the same seed: every logged value and the final weights."""
    path = _model_path("qwen2", str(tmp_path))
    cfg = dict(loss_type=loss_type, max_steps=2, gradient_accumulation_steps=2,
               num_iterations=2, optim="sgd", learning_rate=1.0, **extra)
    logs0, w0 = _train(GRPOTrainer, path, str(tmp_path), **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logs1, w1 = _train(R1KGRPOTrainer, path, str(tmp_path), **cfg)
    assert len(logs1) == len(logs0) == 3  # two steps and the summary
    for e0, e1 in zip(logs0, logs1):
        assert set(e1) == set(e0)
        for k, v in e0.items():
            if isinstance(v, float) and not math.isnan(v):
                assert e1[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
            else:
                assert e1[k] == v or (isinstance(v, float) and math.isnan(e1[k])), k
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], rtol=1e-4, atol=1e-5, msg=n)


def test_compute_loss_matches_trl_bf16_autocast(tmp_path):
    """Under bf16 autocast both heads take bf16 GEMM inputs; r1kernels accumulates and normalizes
    in fp32, so agreement is at bf16 rounding level (2^-8 relative)."""
    path = _model_path("qwen2", str(tmp_path))
    trainer = _trainer(R1KGRPOTrainer, path, str(tmp_path), loss_type="grpo", beta=0.04,
                       bf16=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = _inputs()
    remove_r1kernels(trainer.model)
    want = _loss_call(trainer, GRPOTrainer._compute_loss, inputs)
    apply_r1kernels(trainer.model, temperature=trainer.temperature)
    got = _loss_call(trainer, R1KGRPOTrainer._compute_loss, inputs)
    _compare(want, got, rtol=2e-2)
