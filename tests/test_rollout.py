"""The rollout's compiled decode step, its sampling log-probs, and the mismatch / IS weights."""
import warnings

import pytest
import torch

from r1train import generate as gen_mod
from r1train.generate import generate, generate_nocache_greedy
from r1train.loss import rollout_mismatch, token_logprobs_from_hidden


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model, tok = tiny_model
    prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
               for t in ["1+2=", "123+45=", "9="]]
    return model, tok, prompts


def _kw(tok, **over):
    return dict(dict(group_size=2, max_new_tokens=10, eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id, temperature=0.0), **over)


def _fresh_counting_compiles(model, monkeypatch):
    """A copy of `model` (its own compiled decoders) and the list each compile appends to."""
    work = type(model)(model.config)
    work.load_state_dict(model.state_dict())
    compiles, inductor = [], gen_mod._Decoder._inductor

    def counted(self, gm, example_inputs):
        compiles.append(1)
        return inductor(self, gm, example_inputs)

    monkeypatch.setattr(gen_mod._Decoder, "_inductor", counted)
    return work, compiles


def teacher_forced_logps(model, prompt, completion, temperature=1.0):
    """log softmax(logits / T) of each completion token, one full forward, float64."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].double()
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_compiled_greedy_matches_eager_and_nocache(tiny):
    model, tok, prompts = tiny
    eager = generate(model, prompts, **_kw(tok))
    compiled = generate(model, prompts, compile=True, **_kw(tok))
    assert torch.equal(eager.tokens, compiled.tokens)
    assert torch.equal(eager.lengths, compiled.lengths)
    torch.testing.assert_close(eager.logps, compiled.logps, rtol=1e-5, atol=1e-5)
    outs = set()
    for i, p in enumerate(prompts):
        ref = generate_nocache_greedy(model, p, 10, tok.eos_token_id)
        n = int(compiled.lengths[2 * i])
        assert compiled.tokens[2 * i, :n].tolist() == ref
        torch.testing.assert_close(compiled.logps[2 * i, :n].double(),
                                   teacher_forced_logps(model, p, ref), rtol=1e-4, atol=1e-4)
        outs.add(tuple(ref))
    assert len(outs) > 1


@pytest.mark.parametrize("compile", [False, True])
def test_several_eos_ids_stop_as_transformers_generate(tiny, compile):
    """eos_id as a list (an instruct model's end of turn and end of text): each row stops at the
    first token in it, which it keeps, as transformers' `generate(eos_token_id=[...])` does;
    eager and compiled, a row stopped by either id."""
    model, tok, prompts = tiny
    T = 12
    free = generate(model, prompts, **_kw(tok, group_size=1, max_new_tokens=T, eos_id=-1))
    assert int(free.lengths.min()) == T
    # row 0 stops at the first token (after its first) whose id it has not sampled before (id
    # a), row 1 at a later first occurrence of an id b that neither row has sampled by then;
    # row 2 wherever either occurs
    r0, r1 = free.tokens[0].tolist(), free.tokens[1].tolist()
    i = next(i for i in range(1, T) if r0[i] not in r0[:i])
    a = r0[i]
    j = next((j for j in range(1, T) if r1[j] not in r1[:j] + r0[:i + 1] and a not in r1[:j + 1]),
             None)
    assert j is not None, "the tiny model's greedy rows share their ids: change the prompts"
    b = r1[j]
    got = generate(model, prompts, compile=compile,
                   **_kw(tok, group_size=1, max_new_tokens=T, eos_id=[a, b]))
    assert got.lengths.tolist()[:2] == [i + 1, j + 1] and i + 1 < T and j + 1 < T
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                                                              dtype=torch.long),
                                 do_sample=False, max_new_tokens=T, eos_token_id=[a, b],
                                 pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        while ref and ref[-1] == tok.pad_token_id and ref[-1] not in (a, b):
            ref.pop()  # (generate pads a finished row to the longest)
        n = int(got.lengths[i])
        assert got.tokens[i, :n].tolist() == ref
        assert (got.tokens[i, n:] == tok.pad_token_id).all() and (got.logps[i, n:] == 0).all()


def test_compiled_beyond_dynamos_recompile_limit(tiny):
    """Every decoder shape (rows, prompt length bucket, completion budget) is one more compile of
    the same step function; past dynamo's recompile limit (8 by default, 2 here) dynamo would run
    the step eagerly, silently after the first warning. The decode step raises the limit around
    its own compiles: a third shape still compiles and decodes as the eager loop."""
    model, tok, prompts = tiny
    work = type(model)(model.config)
    work.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        for T in (3, 4, 5):
            got = generate(work, prompts, compile=True, **_kw(tok, max_new_tokens=T))
            want = generate(work, prompts, **_kw(tok, max_new_tokens=T))
            assert torch.equal(got.tokens, want.tokens)
    decs = work.__dict__["_r1k_decoders"]
    assert sorted(k[2] for k in decs) == [3, 4, 5]
    assert all(d.compiled is not None and d.graph is not None for d in decs.values())


def test_compiled_prompt_lengths_share_a_power_of_two_bucket(tiny, monkeypatch):
    """A compiled rollout pads its prompts to a power of two (16 at least), an eager one to a
    multiple of 16: prompts of 33 to 64 tokens (three buckets of 16) run on one compiled step,
    compiled once, with the eager loop's tokens and log-probs."""
    model, tok, _ = tiny
    work, compiles = _fresh_counting_compiles(model, monkeypatch)
    assert [gen_mod.prompt_slots(n, False) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 48, 64]
    assert [gen_mod.prompt_slots(n, True) for n in (1, 16, 17, 33, 64, 65)] == \
        [16, 16, 32, 64, 64, 128]
    g = torch.Generator().manual_seed(0)
    for n in (33, 45, 64):
        ps = [[tok.bos_token_id] + torch.randint(10, len(tok), (m - 1,), generator=g).tolist()
              for m in (n, n - 9, 20)]
        kw = _kw(tok, temperature=1.0, max_new_tokens=6)
        got = generate(work, ps, compile=True, **kw, generator=torch.Generator().manual_seed(1))
        want = generate(work, ps, **kw, generator=torch.Generator().manual_seed(1))
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
        torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-5)
    assert [k[1] for k in work.__dict__["_r1k_decoders"]] == [64 + 6] and len(compiles) == 1


def test_eos_id_must_be_token_ids(tiny):
    model, tok, prompts = tiny
    for bad in ([], [1.5], None, [True]):
        with pytest.raises(ValueError, match="eos_id"):
            generate(model, prompts, **_kw(tok, eos_id=bad))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prefill_skips_the_shared_padding(tiny, impl, monkeypatch):
    """The prefill runs on the longest prompt's width, not the padded one; a cached decoder
    reused by a rollout whose prompts are shorter (more shared padding, same padded length)
    never attends to the slots the last rollout wrote there: greedy tokens equal the no-cache
    reference, through decode_attention's kv_start (sdpa) and through the mask (eager)."""
    model, tok, prompts = tiny
    long = prompts + [[tok.bos_token_id] + tok("12345+678=", add_special_tokens=False)["input_ids"]]
    assert max(map(len, prompts)) < max(map(len, long)) <= gen_mod.PAD_MULTIPLE
    widths, load = [], gen_mod._Decoder.load_prefill

    def spy(self, prefill, *a):  # the prefill cache's slots: the width it ran on
        widths.append(prefill.layers[0].keys.shape[2])
        return load(self, prefill, *a)

    monkeypatch.setattr(gen_mod._Decoder, "load_prefill", spy)
    cfg = model.config
    try:
        cfg._attn_implementation = impl
        model.__dict__.pop("_r1k_decoders", None)  # (a decoder of this attention, below)
        for ps in (long, prompts, long):
            got = generate(model, ps, compile=True, **_kw(tok))
            for i, p in enumerate(ps):
                n = int(got.lengths[2 * i])
                assert got.tokens[2 * i, :n].tolist() == generate_nocache_greedy(
                    model, p, 10, tok.eos_token_id)
    finally:
        cfg._attn_implementation = "sdpa"
        model.__dict__.pop("_r1k_decoders", None)
    assert widths == [max(map(len, long)), max(map(len, prompts)), max(map(len, long))]


def test_compiled_sampling_reproducible_and_logps(tiny):
    model, tok, prompts = tiny
    kw = _kw(tok, group_size=4, temperature=0.8, top_p=0.9)
    a = generate(model, prompts, generator=torch.Generator().manual_seed(3), compile=True, **kw)
    b = generate(model, prompts, generator=torch.Generator().manual_seed(3), compile=True, **kw)
    c = generate(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in a.tokens.tolist()}) > 1
    for i in range(a.tokens.shape[0]):
        n = int(a.lengths[i])
        comp = a.tokens[i, :n].tolist()
        ref = teacher_forced_logps(model, prompts[i // 4], comp, temperature=0.8)
        torch.testing.assert_close(a.logps[i, :n].double(), ref, rtol=1e-4, atol=1e-4)
        assert (a.logps[i, n:] == 0).all()


def test_compiled_step_reads_updated_weights(tiny):
    """An optimizer step changes the parameters in place: the cached compiled step decodes with
    the new weights (no re-capture, no copy), exactly as a fresh eager decode does."""
    model, tok, prompts = tiny
    work = type(model)(model.config)
    work.load_state_dict(model.state_dict())
    before = generate(work, prompts, compile=True, **_kw(tok))
    opt = torch.optim.SGD(work.parameters(), lr=0.5)
    ids = torch.tensor([prompts[1] + before.tokens[2, :4].tolist()])
    work(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = generate(work, prompts, compile=True, **_kw(tok))
    fresh = generate(work, prompts, **_kw(tok))
    assert torch.equal(after.tokens, fresh.tokens)
    torch.testing.assert_close(after.logps, fresh.logps, rtol=1e-5, atol=1e-5)
    assert not torch.equal(after.tokens, before.tokens)  # the step changed the decode
    (dec,) = work.__dict__["_r1k_decoders"].values()       # one compiled decoder, reused
    assert dec.compiled is not None


def test_compiled_rollout_enters_dynamo_once(tiny):
    """On CPU a rollout's first step runs through dynamo (its guards checked), the later steps
    call the graph it ran directly: same tokens as eager, and the graph's arguments (which hold
    the parameters) are dropped when the rollout ends."""
    model, tok, prompts = tiny
    work = type(model)(model.config)
    work.load_state_dict(model.state_dict())
    first = generate(work, prompts, compile=True, **_kw(tok))
    (dec,) = work.__dict__["_r1k_decoders"].values()
    calls, dynamo, graph = [], dec.compiled, dec.graph

    def counted_dynamo():
        calls.append(1)
        return dynamo()

    dec.compiled = counted_dynamo
    try:
        again = generate(work, prompts, compile=True, **_kw(tok))
    finally:
        dec.compiled = dynamo
    assert torch.equal(first.tokens, again.tokens)
    assert torch.equal(again.tokens, generate(work, prompts, **_kw(tok)).tokens)
    steps = int(again.lengths.max()) - 1  # token 0 comes from the prefill
    assert len(calls) == 1 and steps > 2
    assert dec.graph is graph and dec.graph_args is None


def test_compile_failure_falls_back_with_one_warning(tiny, monkeypatch):
    model, tok, prompts = tiny
    work = type(model)(model.config)
    work.load_state_dict(model.state_dict())

    def broken(fn, **kw):
        def run():
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(gen_mod, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = generate(work, prompts, compile=True, **_kw(tok))
        b = generate(work, prompts, compile=True, **_kw(tok, group_size=3))
    msgs = [w for w in caught if "decoding eagerly" in str(w.message)]
    assert len(msgs) == 1
    ref = generate(work, prompts, **_kw(tok))
    assert torch.equal(a.tokens, ref.tokens)
    assert b.tokens.shape[0] == 9


def test_rollout_mismatch_and_weights():
    train = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-3.0, -1.0, 0.0, 0.0]])
    roll = torch.tensor([[-1.0, -2.0 - 1.0, -0.5 + 1.0, 9.0], [-3.2, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    w, sums = rollout_mismatch(train, roll, mask)
    assert w is None
    torch.testing.assert_close(sums[0], torch.tensor(2.2))        # |0| + 1 + 1 + 0.2 + 0
    assert float(sums[1]) == 2.0                                  # ratios e and 1/e leave [0.5, 2]
    r = torch.exp(train - roll) * mask
    w, _ = rollout_mismatch(train, roll, mask, mode="tis", cap=2.0)
    torch.testing.assert_close(w, r.clamp(max=2.0))
    w, _ = rollout_mismatch(train, roll, mask, mode="mis", cap=2.0)
    torch.testing.assert_close(w, torch.where(r <= 2.0, r, torch.zeros_like(r)))
    assert w[0, 1] == 0 and w[0, 0] == 1
    with pytest.raises(ValueError, match="rollout_is"):
        rollout_mismatch(train, roll, mask, mode="x")
    with pytest.raises(ValueError, match="rollout_is_cap"):
        rollout_mismatch(train, roll, mask, mode="tis", cap=0.0)


def test_rollout_logps_match_the_trainers(tiny):
    """The sampler's log-probs against the trainer's own (the same weights): the mismatch of an
    fp32 rollout is float rounding, far below what --rollout_is corrects."""
    model, tok, prompts = tiny
    roll = generate(model, prompts, generator=torch.Generator().manual_seed(0),
                    **_kw(tok, temperature=1.0, group_size=3))
    for i in range(roll.tokens.shape[0]):
        n = int(roll.lengths[i])
        p = prompts[i // 3]
        ids = torch.tensor([p + roll.tokens[i, :n].tolist()])
        with torch.no_grad():
            h = model.base_model(input_ids=ids).last_hidden_state[:, len(p) - 1:-1]
            lp = token_logprobs_from_hidden(h, model.lm_head.weight, None, ids[:, len(p):])
        _, sums = rollout_mismatch(lp, roll.logps[i:i + 1, :n], torch.ones(1, n, dtype=torch.bool))
        assert float(sums[0]) / n < 1e-4 and float(sums[1]) == 0.0


@pytest.mark.parametrize("mode", ["", "tis", "mis"])
def test_trainer_logs_mismatch_and_applies_weights(tmp_path, mode, monkeypatch):
    """metrics.jsonl has the mismatch per GRPO step; with --rollout_is the loss gets the weights
    (policy_loss called with rollout_is_weights of the completion mask's shape)."""
    import json

    from r1train import train as train_mod
    from r1train.config import Config

    seen = []
    real = train_mod.policy_loss

    def spy(*a, rollout_is_weights=None, **kw):
        seen.append(rollout_is_weights)
        return real(*a, rollout_is_weights=rollout_is_weights, **kw)

    monkeypatch.setattr(train_mod, "policy_loss", spy)
    cfg = Config(out_dir=str(tmp_path / "run"), tiny_hidden=32, tiny_layers=1, tiny_heads=2,
                 tiny_intermediate=64, mode="r1-zero", grpo_steps=2, prompts_per_step=2,
                 group_size=2, max_new_tokens=8, eval_examples=4, checkpoint_every=0,
                 rollout_compile=False, rollout_is=mode, rollout_is_cap=1.5)
    train_mod.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert len(grpo) == 2
    for r in grpo:
        assert 0 <= r["mismatch_logp_abs"] < 1e-3 and r["mismatch_ratio_out"] == 0.0
        assert ("rollout_is_weight" in r) == bool(mode)
        if mode:
            assert abs(r["rollout_is_weight"] - 1.0) < 1e-3
    assert seen and all((w is None) == (not mode) for w in seen)


@pytest.mark.parametrize("with_kv_len", [True, False], ids=["kv_len", "folded"])
@pytest.mark.parametrize("Hq,Hkv,Lq,Dv", [(14, 2, 1, 16), (4, 2, 1, 16), (4, 4, 1, 16),
                                          (14, 2, 5, 16), (4, 4, 1, 8), (4, 2, 1, 24)])
def test_decode_attention_equals_sdpa(Hq, Hkv, Lq, Dv, with_kv_len):
    """`r1k_sdpa` for one query token (given `r1k_kv_len` and `r1k_kv_start`:
    r1kernels.decode_attention over slots kv_start .. kv_len - 1; without: SDPA with the grouped
    query heads folded onto their key/value head) against transformers' own `sdpa` attention,
    which repeats the keys and values: same output, with a per-row mask over a partly filled
    cache, eager and compiled. With kv_len the slots outside [kv_start, kv_len) are masked for
    transformers' and hold garbage for ours."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    B, L, D = 3, 11, 16
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = Hq // Hkv, True
    q = torch.randn(B, Lq, Hq, D, generator=g).transpose(1, 2)  # the models' strided layout
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, Dv, generator=g)  # Dv != D: multi-head latent attention's shapes
    kv_len, kv_start = torch.tensor([L, 7, 1]), torch.tensor([0, 3, 0])
    allowed = torch.rand(B, 1, Lq, L, generator=g) < 0.6
    allowed[..., 0] = True
    allowed[1, ..., 3] = True
    allowed &= torch.arange(L) < kv_len[:, None, None, None]
    if with_kv_len:
        allowed &= torch.arange(L) >= kv_start[:, None, None, None]
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
    kw = dict(scaling=D ** -0.5)
    if with_kv_len:
        for b, (n, s0) in enumerate(zip(kv_len.tolist(), kv_start.tolist())):
            k[b, :, n:], v[b, :, n:] = 1e3, -1e3
            k[b, :, :s0], v[b, :, :s0] = -1e3, 1e3
        kw["r1k_kv_len"], kw["r1k_kv_start"] = kv_len, kv_start
    got, _ = gen_mod._r1k_sdpa(module, q, k, v, mask, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    compiled = torch.compile(gen_mod._r1k_sdpa, fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=64):  # (one graph per parametrization)
        torch.testing.assert_close(compiled(module, q, k, v, mask, **kw)[0], want, rtol=1e-5,
                                   atol=1e-6)


def test_decode_attention_is_restored(tiny):
    """generate runs the model with `r1k_sdpa` and gives it back its own attention after, also
    when decoding fails."""
    model, _, _ = tiny
    assert model.config._attn_implementation == "sdpa"
    seen = []
    real = gen_mod._Decoder.step

    def spy(self):
        seen.append(self.model.config._attn_implementation)
        raise RuntimeError("stop")

    gen_mod._Decoder.step = spy
    try:
        with pytest.raises(RuntimeError, match="stop"):
            generate(model, [[1, 5, 6]], group_size=2, max_new_tokens=4, eos_id=2, pad_id=0,
                     temperature=0.0)
    finally:
        gen_mod._Decoder.step = real
    assert seen == ["r1k_sdpa"] and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_rollout_of_a_model_loaded_with_other_attention(tiny, impl):
    """A model whose attention is flash-attention or flex attention (which read 2-D padding or
    block masks, not the rollout's 4-D masks) samples its rollout with r1k_sdpa: the same tokens
    as the sdpa model, never calling its own attention (flash-attn is not even installed here),
    and gets its implementation back after."""
    model, tok, prompts = tiny
    want = generate(model, prompts, **_kw(tok))
    cfg = model.config
    cfg._attn_implementation = impl
    try:
        got = generate(model, prompts, **_kw(tok))
        assert cfg._attn_implementation == impl
    finally:
        cfg._attn_implementation = "sdpa"
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)


def test_cpu_decode_reads_live_slots_only(tiny, monkeypatch):
    """On CPU each decode step's attention is r1kernels.decode_attention (one call per layer and
    step, so transformers passed `r1k_kv_len` and `r1k_kv_start` through), given slot + 1 for the
    rows still decoding and 0 for the finished ones, and the first slot of each row's prompt
    (its left padding is not read); the tokens are transformers' sdpa's (the eager loop with
    r1k_sdpa's fold, decode_attention forced off)."""
    from r1kernels import dispatch

    model, tok, prompts = tiny
    seen = []
    real = gen_mod.decode_attention

    def spy(q, k, v, kv_len, **kw):
        seen.append(kv_len.clone())
        starts.append(kw["kv_start"].clone())
        return real(q, k, v, kv_len, **kw)

    starts = []

    monkeypatch.setattr(gen_mod, "decode_attention", spy)
    kw = _kw(tok, max_new_tokens=12, temperature=1.0)
    # the stop token: the one this random model samples most, so that rows finish at different
    # steps
    first = generate(model, prompts, **dict(kw, eos_id=-1, generator=torch.Generator().manual_seed(3)))
    eos = int(torch.mode(first.tokens.flatten()).values)
    seen.clear()
    starts.clear()
    kw["eos_id"] = eos
    roll = generate(model, prompts, **kw, generator=torch.Generator().manual_seed(3))
    layers = model.config.num_hidden_layers
    steps = len(seen) // layers
    assert steps >= 1 and len(seen) == steps * layers
    Lp = gen_mod.PAD_MULTIPLE
    G = kw["group_size"]
    first_slot = torch.tensor([Lp - len(prompts[r // G]) for r in range(len(prompts) * G)])
    assert len(set(first_slot.tolist())) > 1  # prompts of different lengths
    assert all(torch.equal(s, first_slot) for s in starts)
    finished_seen = False
    for s in range(steps):  # step s feeds token s (slot Lp + s) and samples token s + 1
        done = torch.tensor([bool((roll.tokens[r, :s + 1] == eos).any())
                             for r in range(roll.tokens.shape[0])])
        want = torch.where(done, 0, Lp + s + 1)
        assert torch.equal(seen[s * layers], want), s
        finished_seen = finished_seen or bool(done.any())
    assert finished_seen, "no row finished before the last step: the test needs another seed"
    with dispatch.use_backend("torch"):
        ref = generate(model, prompts, **kw, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ref.tokens, roll.tokens)


def test_rollout_of_multi_head_latent_attention():
    """DeepSeek-V3's attention (values 8 wide, keys 12: decode takes the folded SDPA path, not
    decode_attention): greedy rollout tokens equal the no-cache reference's."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                           moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
                           num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                           q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4,
                           qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           attn_implementation="sdpa")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    prompts = [[1, 10, 11, 12], [1, 13], [1, 20, 21, 22, 23, 24]]
    roll = generate(model, prompts, group_size=1, max_new_tokens=8, eos_id=2, pad_id=0,
                    temperature=0.0)
    for i, p in enumerate(prompts):
        ref = generate_nocache_greedy(model, p, 8, 2)
        assert roll.tokens[i, :int(roll.lengths[i])].tolist() == ref


def test_one_compiled_step_for_settings_and_nearby_batch_sizes(tiny, monkeypatch):
    """On CPU a compiled rollout's rows are padded (6 and 7 -> 8, 14 -> 16) and its sampling
    settings are read at run time: greedy and sampled rollouts of 6 and 7 rows run on one
    compiled step, compiled once, each with the tokens and log-probs of the eager loop (which
    is not padded) on its own rows."""
    model, tok, prompts = tiny
    work, compiles = _fresh_counting_compiles(model, monkeypatch)
    seven = (prompts * 3)[:7]
    runs = [(prompts, _kw(tok)), (prompts, _kw(tok, temperature=0.8, top_p=0.9, top_k=6)),
            (seven * 2, _kw(tok, group_size=1, temperature=1.3, min_p=0.05)),
            (seven, _kw(tok, group_size=1)), (prompts, _kw(tok))]
    assert [gen_mod.padded_rows(len(p) * kw["group_size"]) for p, kw in runs] == [8, 8, 16, 8, 8]
    for ps, kw in runs:
        g = dict(generator=torch.Generator().manual_seed(7)) if kw["temperature"] else {}
        got = generate(work, ps, compile=True, **kw, **g)
        g = dict(generator=torch.Generator().manual_seed(7)) if kw["temperature"] else {}
        want = generate(work, ps, **kw, **g)
        assert got.tokens.shape == want.tokens.shape == (len(ps) * kw["group_size"], 10)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
        torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-5)
    assert sorted(k[0] for k in work.__dict__["_r1k_decoders"]) == [8, 16]
    assert len(compiles) == 2  # one per padded size, whatever the settings
