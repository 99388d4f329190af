"""r1kernels.integrations.hf: a patched transformers model against the same model unpatched
(its own logits, its own loss), fp32, values and every parameter gradient."""
import copy
import inspect
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1kernels.integrations.hf import apply_r1kernels, head_transform, remove_r1kernels  # noqa: E402

V = 67  # odd vocabulary


def _qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, **kw))


def _qwen3(**kw):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64, **kw))


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw.setdefault("tie_word_embeddings", True)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, **kw))


def _gemma3(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=8,
                                              max_position_embeddings=64,
                                              final_logit_softcapping=3.0, **kw))


def _qwen3_moe(**kw):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                              moe_intermediate_size=16, num_experts=4,
                                              num_experts_per_tok=2, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=8, max_position_embeddings=64,
                                              output_router_logits=True,
                                              router_aux_loss_coef=0.01, **kw))


MODELS = {"qwen2": _qwen2, "qwen3": _qwen3, "llama_tied": _llama, "gemma3_softcap": _gemma3,
          "qwen3_moe": _qwen3_moe}


def _pair(name, seed=0, **kw):
    torch.manual_seed(seed)
    ref = MODELS[name](**kw).float()
    with torch.no_grad():  # random heads: logits of a few units, so the softcap bites
        ref.get_output_embeddings().weight.normal_(0, 0.5)
    model = copy.deepcopy(ref)
    apply_r1kernels(model)
    return ref, model


def _batch(B=3, L=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[0, :2] = 0  # left padding
    labels = ids.masked_fill(attn == 0, -100)
    labels[1, :4] = -100  # a prompt
    labels[2, -1] = -100
    return ids, attn, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads(model, ref, rtol=1e-5):
    g, r = _grads(model), _grads(ref)
    assert set(g) == set(r) and len(r) > 5
    for n in r:
        atol = rtol * max(r[n].abs().max().item(), 1e-6)
        torch.testing.assert_close(g[n], r[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_grads_match_unpatched(name):
    ref, model = _pair(name)
    ids, attn, labels = _batch()
    out_ref = ref(ids, attention_mask=attn, labels=labels)
    out = model(ids, attention_mask=attn, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    if name == "qwen3_moe":  # the router's balance loss is part of HF's loss
        assert out_ref.aux_loss is not None
        torch.testing.assert_close(out.aux_loss, out_ref.aux_loss, rtol=1e-5, atol=1e-7)
    out_ref.loss.backward()
    out.loss.backward()
    _assert_grads(model, ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_token_logprobs_match_log_softmax(name):
    ref, model = _pair(name)
    ids, attn, labels = _batch()
    temp = 0.7
    logits = ref(ids, attention_mask=attn).logits[:, :-1].float() / temp
    y = labels[:, 1:]
    lsm = torch.log_softmax(logits, -1)
    keep = y != -100
    want_lp = lsm.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    want_ent = -(lsm.exp() * lsm).sum(-1) * keep
    out = model(ids, attention_mask=attn, labels=labels, return_token_logprobs=True,
                temperature=temp)
    assert out.token_logprobs.shape == y.shape and out.log_probs is out.token_logprobs
    torch.testing.assert_close(out.token_logprobs, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, want_ent, rtol=1e-5, atol=1e-5)
    want_loss = -want_lp.sum() / keep.sum()
    if out.aux_loss is not None:  # MoE: HF's loss adds the router's balance loss
        want_loss = want_loss + model.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-6)
    # gradients of a loss of both outputs (weights not constant across positions)
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)
    ((want_lp * w1).sum() + (want_ent * w2).sum()).backward()
    ((out.token_logprobs * w1).sum() + (out.entropy * w2).sum()).backward()
    _assert_grads(model, ref)


def test_shift_labels_and_num_items_in_batch():
    ref, model = _pair("qwen2")
    ids, attn, labels = _batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    n = torch.tensor(11.0)
    out_ref = ref(ids, attention_mask=attn, shift_labels=shift, labels=labels,
                  num_items_in_batch=n)
    out = model(ids, attention_mask=attn, shift_labels=shift, num_items_in_batch=n)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    (out.loss * 3).backward()  # a scaled upstream gradient reaches the fused NLL's gradients
    for p in ref.parameters():
        p.grad *= 3
    _assert_grads(model, ref)
    lp = model(ids, attention_mask=attn, shift_labels=shift, return_token_logprobs=True)
    assert lp.token_logprobs.shape == shift.shape


def test_tied_embedding_gets_both_gradients():
    ref, model = _pair("llama_tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, attn, labels = _batch()
    ref(ids, attention_mask=attn, labels=labels).loss.backward()
    model(ids, attention_mask=attn, labels=labels).loss.backward()
    # the tied matrix's gradient is the head's plus the embedding's: compare the total
    torch.testing.assert_close(model.model.embed_tokens.weight.grad,
                               ref.model.embed_tokens.weight.grad, rtol=1e-5, atol=1e-7)
    # rows of tokens absent from the input get their gradient from the head alone
    absent = torch.ones(V, dtype=torch.bool)
    absent[ids.unique()] = False
    assert model.model.embed_tokens.weight.grad[absent].abs().min() > 0


def test_gradient_checkpointing_matches():
    ref, model = _pair("qwen3")
    for m in (ref, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids, attn, labels = _batch()
    ref(ids, attention_mask=attn, labels=labels).loss.backward()
    model(ids, attention_mask=attn, labels=labels).loss.backward()
    _assert_grads(model, ref)


def test_remove_restores_and_generation_untouched():
    from transformers import Qwen2ForCausalLM
    ref, model = _pair("qwen2")
    ids, attn, labels = _batch()
    assert "forward" in model.__dict__
    # without labels: the original forward (logits), and generate works
    torch.testing.assert_close(model(ids, attention_mask=attn).logits,
                               ref(ids, attention_mask=attn).logits)
    gen = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 3)
    # the signature seen by inspect is the model's own (Trainer's column filter)
    assert "input_ids" in inspect.signature(model.forward).parameters
    apply_r1kernels(model, temperature=2.0)  # a second call updates settings, keeps the original
    remove_r1kernels(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_r1k_state")
    assert model.forward.__func__ is Qwen2ForCausalLM.forward
    out = model(ids, attention_mask=attn, labels=labels)
    assert out.logits is not None
    remove_r1kernels(model)  # no-op


def test_bad_calls():
    _, model = _pair("qwen2")
    ids, attn, _ = _batch()
    with pytest.raises(ValueError, match="labels"):
        model(ids, attention_mask=attn, return_token_logprobs=True)
    with pytest.raises(ValueError, match="temperature"):
        apply_r1kernels(model, temperature=0.0)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="torch.nn.Linear"):
        model(ids, attention_mask=attn, labels=ids)


def test_head_transform_reads_configs_like_transformers():
    from transformers import CohereConfig, Gemma3TextConfig, GraniteConfig, Qwen2Config
    assert head_transform(Qwen2Config()) == {}
    assert head_transform(Gemma3TextConfig(final_logit_softcapping=30.0)) == {"softcap": 30.0}
    assert head_transform(CohereConfig(logit_scale=0.0625)) == {"logit_scale": 0.0625}
    assert head_transform(GraniteConfig(logits_scaling=8.0)) == {"logit_scale": 0.125}
    # MPT's modeling code ignores its config's logit_scale (which may be a string)
    from transformers import MptConfig
    assert head_transform(MptConfig(logit_scale="inv_sqrt_d_model")) == {}
    with pytest.raises(ValueError, match="logits_scaling"):
        head_transform(types.SimpleNamespace(model_type="custom", logits_scaling="8"))


def test_granite_and_cohere_scaled_heads_match():
    """Granite divides its logits by logits_scaling, Cohere multiplies by logit_scale."""
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for model_cls, cfg in ((GraniteForCausalLM, GraniteConfig(logits_scaling=4.0, **common)),
                           (CohereForCausalLM, CohereConfig(logit_scale=0.25, **common))):
        torch.manual_seed(0)
        ref = model_cls(cfg).float()
        model = apply_r1kernels(copy.deepcopy(ref))
        ids, attn, labels = _batch()
        out_ref, out = ref(ids, attention_mask=attn, labels=labels), model(
            ids, attention_mask=attn, labels=labels)
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
        out_ref.loss.backward()
        out.loss.backward()
        _assert_grads(model, ref)


def test_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _qwen2()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model = copy.deepcopy(ref)
    apply_r1kernels(model)
    ids, attn, labels = _batch()
    out_ref, out = ref(input_ids=ids, attention_mask=attn, labels=labels), model(
        input_ids=ids, attention_mask=attn, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    g, r = _grads(model), _grads(ref)
    assert set(g) == set(r) and all("lora" in n for n in r) and len(r) == 8
    for n in r:
        torch.testing.assert_close(g[n], r[n], rtol=1e-5, atol=1e-5 * r[n].abs().max().item())
    out = model(input_ids=ids, attention_mask=attn, labels=labels, return_token_logprobs=True)
    assert out.token_logprobs.shape == (3, 8)
    remove_r1kernels(model)
    assert model(input_ids=ids, attention_mask=attn).logits is not None
    # an adapter on the head itself is refused (its weight would be ignored)
    lm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="torch.nn.Linear"):
        apply_r1kernels(lm)
