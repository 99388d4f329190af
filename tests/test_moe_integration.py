"""transformers MoE families with the r1kernels routers and experts: same logits, gradients and
load-balancing loss as the unpatched model on tiny random models (fp32); routing replay across
copies of a model; the experts_implementation switch; class-level patches."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import r1kernels  # noqa: E402
from r1kernels import dispatch  # noqa: E402
from r1kernels.integrations import hf_moe  # noqa: E402
from r1kernels.integrations.hf_moe import (RoutingReplay, apply_r1kernels_moe,  # noqa: E402
                                           apply_r1kernels_moe_to_deepseek_v3, apply_r1kernels_moe_to_qwen3_moe)
from conftest import DEVICE  # noqa: E402

BACKENDS = dispatch.available_backends("moe_route", DEVICE)

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
           first_k_dense_replace=0, n_shared_experts=1, num_key_value_heads=4)
DS = dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5,
          first_k_dense_replace=0, n_shared_experts=1)
LINEAR_ATTN = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                   linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                   shared_expert_intermediate_size=16)
# family -> (config class, model class, config overrides); every MoE family apply_r1kernels_moe covers
FAMILIES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(MLA, **DS)),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                     dict(MLA, **DS, q_lora_rank=16, index_n_heads=2, index_head_dim=8, index_topk=4)),
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM",
                    dict(num_local_experts=16, num_experts_per_tok=4, routed_scaling_factor=1.5, num_hidden_layers=3,
                         mlp_layer_types=["hash_moe", "moe", "moe"])),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", DS),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(MLA, **DS, num_hidden_layers=3)),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                    dict(MLA, **DS, q_lora_rank=16, index_n_heads=2, index_head_dim=8, index_topk=4)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", DS),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM", DS),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", dict(DS, num_experts=16)),
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", dict(DS, num_hidden_layers=3)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=16)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=12, num_experts_per_tok=3)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(LINEAR_ATTN, num_experts=12, num_experts_per_tok=3, norm_topk_prob=False)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(LINEAR_ATTN, num_experts=12, num_experts_per_tok=3)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(num_experts=8, num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["full_attention"] * 2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16,
                     layer_types=["sliding_attention", "full_attention"], sliding_window=4)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM",
               dict(enable_moe_block=True, num_experts=8, top_k_experts=2, sliding_window=4, global_head_dim=8,
                    vocab_size_per_layer_input=64, hidden_size_per_layer_input=8,
                    layer_types=["sliding_attention", "full_attention"])),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM",
              dict(num_experts=8, num_experts_per_tok=2, num_dense_layers=0, route_scale=1.7)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(num_experts=8, moe_topk=2)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=16)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                         dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=16,
                              layer_types=["attention", "attention"], mamba_n_heads=4, mamba_d_head=16)),
}
ROUTER_WEIGHTS = ("weight", "proj.weight", "gate.weight", "wg.weight")


def _randomize_routers(model):
    """Zero-initialised routers tie every score; give them random weights, biases, scales, hashes."""
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if name in ("expert_bias", "e_score_correction_bias"):  # router's or block's selection bias
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if type(mod) not in ROUTER_CLASSES:
            continue
        for name, p in list(mod.named_parameters()) + list(mod.named_buffers()):
            with torch.no_grad():
                if name in ROUTER_WEIGHTS:
                    p.copy_(torch.randn(p.shape, generator=g))
                elif name == "bias":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif name == "per_expert_scale":
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                elif name == "tid2eid":
                    E = mod.num_experts
                    p.copy_(torch.stack([torch.randperm(E, generator=g)[:p.shape[1]] for _ in range(p.shape[0])]))


ROUTER_CLASSES = set()
for _fam in hf_moe.FAMILIES:
    ROUTER_CLASSES.update(hf_moe._router_classes(_fam))


def build(family, **extra):
    cname, mname, kw = FAMILIES[family]
    cfg = getattr(transformers, cname)(**{**COMMON, **kw, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, mname)(cfg).float()
    _randomize_routers(model)
    return model.to(DEVICE)


def n_routers(model):
    return sum(type(m) in ROUTER_CLASSES for m in model.modules())


def n_experts(model):
    return sum(hasattr(m, "is_transposed") and hasattr(m, "has_gate") for m in model.modules())


def run(model, ids):
    """Forward (with the load-balancing loss where the family has one) and backward."""
    has_aux = getattr(model.config, "output_router_logits", None) is not None
    out = model(ids, output_router_logits=True) if has_aux else model(ids)
    loss = out.logits.square().mean()
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + out.aux_loss
    loss.backward()
    return out


def compare(patched, eager, ids, backend=None, family=""):
    """Logits, aux loss and every gradient of the patched model against the eager one; returns the
    max abs / relative-to-max differences. Gradients: rtol 1e-5, atol the larger of 1e-5 of the
    tensor's largest value and 20x the distance between transformers' own two experts
    implementations ("eager" and "grouped_mm" differ by up to 4e-4 of the largest value in
    DeepSeek-V4's hyper-connection head, whose gradients are small sums of cancelling terms)."""
    other = copy.deepcopy(eager)
    other.set_experts_implementation("eager" if eager.config._experts_implementation != "eager" else "grouped_mm")
    ref = run(eager, ids)
    run(other, ids)
    noise = {name: float((p.grad - q.grad).abs().max()) for (name, p), (_, q) in
             zip(other.named_parameters(), eager.named_parameters()) if q.grad is not None}
    with dispatch.use_backend(backend) if backend else _nullcontext():
        out = run(patched, ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5 * float(ref.logits.detach().abs().max()))
    diffs = {"logits": _diff(out.logits, ref.logits)}
    if getattr(ref, "aux_loss", None) is not None:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-7)
        diffs["aux_loss"] = _diff(out.aux_loss, ref.aux_loss)
    n = 0
    worst = (0.0, 0.0)
    for (name, p), (_, q) in zip(patched.named_parameters(), eager.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        n += 1
        atol = max(1e-5 * float(q.grad.abs().max()), 20 * noise[name])
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")
        d = _diff(p.grad, q.grad)
        worst = (max(worst[0], d[0]), max(worst[1], d[1]))
    assert n > 10
    diffs["grads"] = worst
    return diffs


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _diff(a, b):
    a, b = a.detach().double(), b.detach().double()
    absd = float((a - b).abs().max())
    return absd, absd / max(float(b.abs().max()), 1e-30)


def count_route_calls(monkeypatch):
    calls = []
    orig = hf_moe.moe_route

    def spy(*a, **kw):
        w, ids = orig(*a, **kw)
        calls.append((kw.get("replay_ids") is not None, ids))
        return w, ids

    monkeypatch.setattr(hf_moe, "moe_route", spy)
    return calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_eager(family, monkeypatch):
    eager = build(family)
    patched = copy.deepcopy(eager)
    R, X = n_routers(eager), n_experts(eager)
    assert R >= 2 and X == R
    assert apply_r1kernels_moe(patched) == R + X
    assert patched.config._experts_implementation == "r1kernels"
    calls = count_route_calls(monkeypatch)
    ids = torch.randint(3, 64, (2, 7), device=DEVICE)
    diffs = compare(patched, eager, ids, family=family)
    assert len(calls) == R
    report = ", ".join(f"{k} {a:.1e}/{r:.1e}" for k, (a, r) in diffs.items())
    print(f"\n{family}: routers {R}, max abs/rel diff {report}")  # shown with pytest -s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["deepseek_v4", "gemma4"])  # sqrtsoftplus, hash ids, expert_scale
def test_matches_eager_every_backend(family, backend):
    eager = build(family)
    patched = copy.deepcopy(eager)
    apply_r1kernels_moe(patched)
    compare(patched, eager, torch.randint(3, 64, (2, 5), device=DEVICE), backend, family)


@pytest.mark.parametrize("norm", [True, False])
def test_norm_topk_prob_follows_the_config(norm):
    for family in ("qwen3_moe", "deepseek_v3"):
        eager = build(family, norm_topk_prob=norm)
        patched = copy.deepcopy(eager)
        apply_r1kernels_moe(patched)
        compare(patched, eager, torch.randint(3, 64, (2, 5), device=DEVICE), family=family)


def test_kimi_k25():
    """Kimi-K2.5 (multimodal): its DeepSeek-V3 text model, one group of 384 experts (tiny: 24)."""
    text = dict(COMMON, **MLA, n_routed_experts=24, n_group=1, topk_group=1, num_experts_per_tok=6,
                routed_scaling_factor=2.827, model_type="deepseek_v3")
    vision = dict(num_hidden_layers=1, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                  pos_emb_height=4, pos_emb_width=4)
    cfg = transformers.Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=16)
    torch.manual_seed(0)
    eager = transformers.Kimi_K25ForConditionalGeneration(cfg).float()
    _randomize_routers(eager)
    eager = eager.to(DEVICE)
    patched = copy.deepcopy(eager)
    R = n_routers(eager)
    assert R == 2
    assert apply_r1kernels_moe(patched) == 2 * R
    ids = torch.randint(3, 64, (2, 6), device=DEVICE)
    out, ref = patched(ids), eager(ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.logits.square().mean().backward()
    ref.logits.square().mean().backward()
    for (name, p), (_, q) in zip(patched.named_parameters(), eager.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * float(q.grad.abs().max()),
                                       msg=lambda m: f"{name}: {m}")


def _replayed(model, seq, replay, monkeypatch):
    """Forward `model` in replay; returns {router name: ids it used}."""
    used = {}
    orig = RoutingReplay._replay_ids

    def spy(self, name, fresh, shape):
        ids = orig(self, name, fresh, shape)
        used[name] = ids
        return ids

    monkeypatch.setattr(RoutingReplay, "_replay_ids", spy)
    with replay.replay():
        out = model(seq).logits
    monkeypatch.setattr(RoutingReplay, "_replay_ids", orig)
    return used, out


def _router_weight(mod):
    return next(p for name, p in mod.named_parameters() if name in ROUTER_WEIGHTS)


def _perturb_routers(model):
    with torch.no_grad():
        for mod in model.modules():
            if type(mod) in ROUTER_CLASSES:
                w = _router_weight(mod)
                w.add_(torch.randn_like(w) * 3.0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_replay_on_a_copy(family, monkeypatch):
    """Record on one model, replay on an identical copy (deep copy) whose routers then moved:
    the copy uses exactly the recorded ids, under the same router names."""
    model = build(family)
    other = copy.deepcopy(model)
    apply_r1kernels_moe(model)
    apply_r1kernels_moe(other)
    seq = torch.randint(3, 64, (2, 6), device=DEVICE)
    rec = RoutingReplay()
    with rec.record():
        model(seq)
    assert len(rec.routing) == n_routers(model)
    assert all(not name.startswith("router@") and ".layers." in name for name in rec.routing)
    _perturb_routers(other)
    free = RoutingReplay()
    with free.record():
        other(seq)
    used, out = _replayed(other, seq, rec, monkeypatch)
    assert sorted(used) == sorted(rec.routing)
    for name, ids in used.items():
        assert torch.equal(ids.view(2, 6, -1).cpu().int(), rec.routing[name].cpu())
    hashed = [n for n, m in model.named_modules() if type(m).__name__ == "DeepseekV4HashRouter"]
    for name in hashed:  # hash routing ignores the router weights: the same ids either way
        assert torch.equal(free.routing[name], rec.routing[name])
    assert any(not torch.equal(free.routing[n], rec.routing[n]) for n in rec.routing if n not in hashed)
    out.square().mean().backward()
    for mod in other.modules():
        if type(mod) in ROUTER_CLASSES:
            w = _router_weight(mod)
            assert w.grad is not None and w.grad.abs().sum() > 0


def test_deepseek_v4_hash_layers_route_by_token():
    """DeepSeek-V4's hash-routed layers take tid2eid[input_ids] as the ids (moe_route replay_ids)."""
    model = build("deepseek_v4")
    apply_r1kernels_moe(model)
    seq = torch.randint(3, 64, (2, 6), device=DEVICE)
    rec = RoutingReplay()
    with rec.record():
        model(seq)
    (name, router), = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "DeepseekV4HashRouter"]
    assert torch.equal(rec.routing[name].long().cpu(), router.tid2eid[seq].cpu())


def test_bias_update_reaches_the_patched_router():
    """DeepSeek-style auxiliary-loss-free balancing: moe_update_bias on e_score_correction_bias
    (counts from the recorded ids) changes the routing of the patched model as of the eager one."""
    eager = build("glm4_moe")
    patched = copy.deepcopy(eager)
    apply_r1kernels_moe(patched)
    seq = torch.randint(3, 64, (4, 8), device=DEVICE)
    rec = RoutingReplay()
    with rec.record():
        patched(seq)
    for model in (patched, eager):
        for name, mod in model.named_modules():
            if type(mod) in ROUTER_CLASSES:
                counts = r1kernels.moe_expert_counts(rec.routing[name].to(DEVICE), mod.num_experts)
                r1kernels.moe_update_bias(mod.e_score_correction_bias, counts, 0.3)
    after = RoutingReplay()
    with after.record():
        out = patched(seq).logits
    assert any(not torch.equal(after.routing[n], rec.routing[n]) for n in rec.routing)
    torch.testing.assert_close(out, eager(seq).logits, rtol=1e-5, atol=1e-5)


def test_experts_implementation():
    eager = build("qwen3_moe")
    ids = torch.randint(3, 64, (2, 5), device=DEVICE)
    ref = eager(ids).logits
    # the registered implementation alone (no router patch), as from_pretrained(experts_implementation=...)
    m = copy.deepcopy(eager)
    m.set_experts_implementation("r1kernels")
    calls = []
    orig = hf_moe.moe_permute
    try:
        hf_moe.moe_permute = lambda *a, **k: calls.append(1) or orig(*a, **k)
        torch.testing.assert_close(m(ids).logits, ref, rtol=1e-5, atol=1e-5)
    finally:
        hf_moe.moe_permute = orig
    assert len(calls) == 2
    # a user's own choice: replaced with a warning, or kept with experts=False (router only)
    m = copy.deepcopy(eager)
    m.set_experts_implementation("batched_mm")
    with pytest.warns(UserWarning, match="batched_mm"):
        assert apply_r1kernels_moe(m) == 4
    assert m.config._experts_implementation == "r1kernels"
    m = copy.deepcopy(eager)
    m.set_experts_implementation("batched_mm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_r1kernels_moe(m, experts=False) == 2
    assert m.config._experts_implementation == "batched_mm"
    torch.testing.assert_close(m(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # and back
    m.set_experts_implementation("eager")
    torch.testing.assert_close(m(ids).logits, ref, rtol=1e-5, atol=1e-5)
    m = copy.deepcopy(eager)
    assert apply_r1kernels_moe(m, router=False) == 2
    torch.testing.assert_close(m(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_unknown_model_type():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="llama"):
        apply_r1kernels_moe(model)
    with pytest.raises(ValueError, match="model_type"):
        apply_r1kernels_moe(None, model_type="llama")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v4"])
def test_class_patch_replays_across_models(family, monkeypatch):
    """Class-level patch: models created afterwards are patched, their routers named by module
    path, so a recording on one replays on another built from the same weights."""
    mod = hf_moe._module(family)
    saved = {c: c.__dict__.get("forward") for c in hf_moe._router_classes(family)}
    bases = [c for c in vars(mod).values() if isinstance(c, type) and c.__name__.endswith("PreTrainedModel")]
    saved_init = {c: c.__dict__.get("post_init") for c in bases}
    eager = build(family)
    ids = torch.randint(3, 64, (2, 6), device=DEVICE)
    ref = eager(ids).logits
    try:
        n = apply_r1kernels_moe(None, model_type=family)
        assert n == len(saved) + 1  # the router classes and the experts class
        a = build(family)
        b = build(family)  # same seed: the same weights, a separate model
        assert a.config._experts_implementation == "r1kernels"
        torch.testing.assert_close(a(ids).logits, ref, rtol=1e-5, atol=1e-5)
        rec = RoutingReplay()
        with rec.record():
            a(ids)
        assert len(rec.routing) == n_routers(a) and all(".layers." in k for k in rec.routing)
        _perturb_routers(b)
        used, _ = _replayed(b, ids, rec, monkeypatch)
        assert sorted(used) == sorted(rec.routing)
        for name, got in used.items():
            assert torch.equal(got.view(2, 6, -1).cpu().int(), rec.routing[name].cpu())
    finally:
        for c, f in saved.items():
            c.forward = f
        for c, f in saved_init.items():
            if f is None:
                if "post_init" in c.__dict__:
                    del c.post_init
            else:
                c.post_init = f


def test_unnamed_router_cannot_record():
    """A router whose class was patched after its model was built has no name: recording raises
    (instead of keying the ids by id(), which no copy could replay)."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m

    model = build("qwen3_moe")
    saved = m.Qwen3MoeTopKRouter.__dict__["forward"]
    try:
        m.Qwen3MoeTopKRouter.forward = hf_moe._softmax_router(None, True)
        with pytest.raises(RuntimeError, match="no name"):
            with RoutingReplay().record():
                model(torch.randint(3, 64, (1, 4), device=DEVICE))
    finally:
        m.Qwen3MoeTopKRouter.forward = saved


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_family_names(backend):
    eager = build("deepseek_v3")
    patched = copy.deepcopy(eager)
    assert apply_r1kernels_moe_to_deepseek_v3(patched) == 4  # 2 layers x (router, experts)
    compare(patched, eager, torch.randint(3, 64, (2, 5), device=DEVICE), backend)
    q = build("qwen3_moe")
    assert apply_r1kernels_moe_to_qwen3_moe(copy.deepcopy(q), experts=False) == 2


def test_routing_replay_generate(monkeypatch):
    model = build("deepseek_v3")
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
    _perturb_routers(model)
    used, out = _replayed(model, seq, replay, monkeypatch)
    for name in names:
        assert torch.equal(used[name].view(2, 10, 4)[:, :9].cpu().int(), replay.routing[name].cpu())
    out.square().mean().backward()

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


def test_v4_unknown_score_fn_is_a_value_error():
    """A DeepSeek-V4 router whose activation moe_route has no score_func for: a ValueError naming
    it, not a silently different routing."""
    import types

    from r1kernels.integrations.hf_moe import _v4_score

    class GeluActivation(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="score_fn GeluActivation"):
        _v4_score(types.SimpleNamespace(score_fn=GeluActivation()))
    assert _v4_score(types.SimpleNamespace(score_fn=torch.nn.Sigmoid())) == "sigmoid"
