"""Tests of the trainer's pieces: verifier safety, rewards, tasks, generation, losses, the
pipeline (summary schema, Ctrl-C + exact resume, r1-zero, rejection sampling, distillation)."""
from __future__ import annotations

import builtins
import json
import os
import signal

import pytest
import torch

import r1kernels
from r1kernels import reference
from r1train import rewards as R
from r1train import tasks as T
from r1train.config import Config, parse_args
from r1train.generate import generate, generate_nocache_greedy
from r1train.loss import policy_loss, sft_loss, token_logprobs_from_hidden

TINY = dict(tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_intermediate=64, sft_examples=32,
            sft_epochs=1, sft_batch_size=16, grpo_steps=4, prompts_per_step=4, group_size=4,
            max_new_tokens=24, eval_examples=8, checkpoint_every=0, threads=1,
            rollout_compile=False)  # compiling is tested in test_rollout.py


# ---- verifier and rewards ---------------------------------------------------------------------

@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hacked')", "open('/etc/passwd').read()", "x + 1",
    "2**10", "9**9**9", "(lambda: 1)()", "[1, 2]", "1 if 1 else 2", "'a' * 3", "1; 2",
    "1" * 300, "10**12 * 10**12", "1/0", "()", "", "True + 1", "1 < 2", "a.b",
])
def test_safe_eval_rejects(expr):
    for _ in range(2):  # (safe_eval is cached: a rejection is not, it is raised again)
        with pytest.raises(R.UnsafeExpression):
            R.safe_eval(expr)


def test_safe_eval_values():
    assert R.safe_eval("1+2*3") == 7
    assert R.safe_eval("(25-5)/4") == 5
    assert R.safe_eval(" -3 + +4 ") == 1
    assert R.safe_eval("7/2") * 2 == 7  # exact fractions, no float rounding
    R.safe_eval.cache_clear()
    assert [R.safe_eval(e) for e in ("1+1", "2", "1+1", " 2")] == [2, 2, 2, 2]
    assert R.safe_eval.cache_info().hits == 1  # the text is the key: "2" and " 2" both parsed


def test_verify_never_calls_eval(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    ex = T.Example("2+2=", "4")
    assert R.verify("<think></think><answer>__import__('os').getcwd()</answer>", ex) is False
    assert R.verify("<think>x</think><answer>4</answer>", ex) is True


def test_verify_arithmetic_and_countdown():
    ex = T.Example("12+34=", "46")
    assert R.verify("<think>2+4=6</think><answer>46</answer>", ex)
    assert R.verify("<think></think><answer> 46.0 </answer>", ex)
    assert not R.verify("<think></think><answer>45</answer>", ex)
    assert not R.verify("46", ex)  # no answer tag
    assert not R.verify("<answer></answer>", ex)
    cd = T.Example("3 7 25>46:", "25+3*7", "", (3, 7, 25))
    assert R.verify("<answer>25+3*7</answer>", cd)
    assert R.verify("<answer>7*3+25</answer>", cd)
    assert not R.verify("<answer>25+21</answer>", cd)       # 21 is not one of the numbers
    assert not R.verify("<answer>25+25-4</answer>", cd)     # 25 used twice, 4 not given
    assert not R.verify("<answer>25+3</answer>", cd)        # wrong value
    assert not R.verify("<answer>25+'3</answer>", cd)       # not even Python: no SyntaxError
    assert not R.verify("<answer>25+3.0*7</answer>", cd)    # 3.0 is not one of the numbers


def test_verify_hostile_and_decimal_answers():
    ex = T.Example("47+38=", "85")
    for lit in ("1e999", "-1e999", "1e309*0", "1e400-1e400"):  # float('inf') literals: wrong, no crash
        assert R.verify(f"<think>x</think><answer>{lit}</answer>", ex) is False
    dec = T.Example("q", "0.3")  # decimal literals are exact: 0.3 == 3/10 == 0.1+0.2
    for ans in ("3/10", "0.1+0.2", "0.30", ".3"):
        assert R.verify(f"<think></think><answer>{ans}</answer>", dec), ans
    assert not R.verify("<think></think><answer>0.30000001</answer>", dec)
    assert R.verify("<think></think><answer>1/10</answer>", T.Example("q", "0.1"))
    # the graded answer is the one after the reasoning, not one written inside it
    assert not R.verify("<think><answer>85</answer></think><answer>3</answer>", ex)
    assert R.verify("<think><answer>3</answer></think><answer>85</answer>", ex)
    assert R.verify("<think>x</think><answer>85</answer><answer>84</answer>", ex)  # the first


def test_format_reward_and_weighted_sum():
    ex = T.Example("1+1=", "2")
    good = "<think>1+1=2</think><answer>2</answer>"
    assert R.format_reward(good, ex) == 1.0
    assert R.format_reward("<answer>2</answer>", ex) == 0.0
    assert R.format_reward(good + "junk", ex) == 0.0
    for bad in ("<think>x</think><answer>1</answer><answer>2</answer>",   # a second answer
                "<think><think>x</think></think><answer>2</answer>",   # nested reasoning
                "<think>x</think><answer><answer>2</answer></answer>",  # nested answer
                "<think><answer>2</answer></think><answer>2</answer>",  # answer in the reasoning
                "<think>x</think><think>y</think><answer>2</answer>"):  # two reasoning blocks
        assert R.format_reward(bad, ex) == 0.0, bad
    assert R.format_reward(" <think>a\nb < c</think>\n<answer> 2 </answer>\n", ex) == 1.0
    fn = R.RewardFn({"accuracy": 1.0, "format": 0.1})
    totals, values = fn(["p"] * 3, [good, "<think></think><answer>3</answer>", "2"], [ex] * 3)
    assert totals == [pytest.approx(1.1), pytest.approx(0.1), 0.0]
    assert values == {"accuracy": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]}


def test_pluggable_reward():
    fn = R.RewardFn({"r1train.rewards:format_reward": 2.0})
    assert fn(["p"], ["<think></think><answer>1</answer>"], [T.Example("p", "1")])[0] == [2.0]
    with pytest.raises(ValueError, match="reward expected"):
        R.resolve_reward("nope")


# ---- tasks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_arithmetic_solutions_verify(difficulty):
    task = T.Arithmetic(difficulty)
    for seed in range(50):
        ex = task.example(seed)
        assert ex == task.example(seed)  # pure function of the seed
        assert R.verify(T.completion_text(ex), ex), ex
        assert R.format_reward(T.completion_text(ex), ex) == 1.0
        a, b = (int(x) for x in ex.prompt[:-1].replace("-", "+").split("+"))
        assert max(a, b) < 10 ** difficulty


def test_addition_trace():
    assert T._addition_trace(47, 38) == "7+8=15,4+3+1=8"
    assert T._addition_trace(5, 95) == "5+5=10,0+9+1=10"


@pytest.mark.parametrize("difficulty", [2, 3, 4])
def test_countdown_solutions_verify(difficulty):
    task = T.Countdown(difficulty)
    for seed in range(50):
        ex = task.example(seed)
        assert len(ex.numbers) == difficulty
        assert R.verify(T.completion_text(ex), ex), ex


def test_jsonl_task(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(20)))
    task = T.make_task("jsonl", 1, str(p))
    train = {task.example(s).prompt for s in range(100)}
    held = {task.example(T.EVAL_SEED_BASE + s).prompt for s in range(100)}
    assert train and held and not (train & held)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(ValueError, match="no column 'answer'"):
        T.make_task("jsonl", 1, str(bad))


# ---- model and generation (tiny_model: tests/conftest.py) ---------------------------------------

def test_tokenizer_roundtrip(tiny_model):
    _, tok = tiny_model
    text = "12+34=<think>2+4=6</think><answer>46</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 + 1 + 5 + 1 + 1 + 2 + 1  # chars, tags are one token each
    assert tok.decode(ids) == text


def test_prompts_encoded_in_one_call_as_one_by_one(tiny_model):
    """encode_prompts tokenizes the batch in one call: the ids are the rendered prompts' own
    tokens, each after one BOS, whatever the other prompts' lengths (no padding)."""
    import types

    from r1train.runtime import Runtime

    _, tok = tiny_model
    rt = types.SimpleNamespace(tok=tok, render_prompt=lambda t: f"Q: {t} A:")
    texts = ["1+2=", "", "123+4567=", "9*9=" * 5]
    got = Runtime.encode_prompts(rt, texts)
    bos = tok.bos_token_id
    assert bos is not None and [len(g) for g in got] != [len(got[0])] * len(got)
    assert got == [[bos] + tok(f"Q: {t} A:", add_special_tokens=False)["input_ids"]
                   for t in texts]
    assert Runtime.encode_prompts(rt, []) == []


@pytest.mark.parametrize("cleanup", [False, True])
def test_decode_of_a_rollout_is_transformers_decode(tiny_model, cleanup, monkeypatch):
    """The trainer decodes a rollout in one call into `tokenizers`; the texts are transformers'
    own `decode` of each row's first `length` tokens without a final EOS (any of the model's eos
    ids; special tokens and an EOS inside a row kept), also through the row-by-row path a
    tokenizer that cleans up spaces takes."""
    import types

    from r1train.runtime import Runtime

    _, tok = tiny_model
    monkeypatch.setattr(tok, "clean_up_tokenization_spaces", cleanup, raising=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(tok), (7, 9), generator=g)
    eos = tok.eos_token_id
    other = (eos + 1) % len(tok)  # a second eos id (an instruct model's end of turn)
    tokens[tokens == other] = (eos + 2) % len(tok)
    tokens[1, 4] = tokens[2, 8] = tokens[3, 2] = eos  # ends with EOS; EOS inside a row
    tokens[6, 2] = other  # ends with the other
    lengths = [9, 5, 9, 9, 0, 1, 3]
    rt = types.SimpleNamespace(tok=tok, eos_id=eos, eos_ids=[eos, other])
    got = Runtime.decode(rt, tokens, lengths)
    want = []
    for row, n in zip(tokens.tolist(), lengths):
        ids = row[:n]
        want.append(tok.decode(ids[:-1] if ids and ids[-1] in (eos, other) else ids,
                               skip_special_tokens=False))
    assert got == want and eos in tokens[3, :9].tolist() and len(set(want)) == 7
    assert got[6] == tok.decode(tokens[6, :2].tolist(), skip_special_tokens=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_kv_cache_generation_matches_no_cache(tiny_model, attn):
    model, tok = tiny_model
    model.set_attn_implementation(attn)
    texts = ["1+2=", "123+45=", "9="]  # different lengths: left padding is exercised
    prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    roll = generate(model, prompts, group_size=2, max_new_tokens=12, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id, temperature=0.0)
    assert roll.tokens.shape == (6, 12)
    outs = set()
    for i, p in enumerate(prompts):
        ref = generate_nocache_greedy(model, p, 12, tok.eos_token_id)
        for j in (2 * i, 2 * i + 1):
            n = int(roll.lengths[j])
            assert roll.tokens[j, :n].tolist() == ref
            assert (roll.tokens[j, n:] == tok.pad_token_id).all()
        outs.add(tuple(ref))
    assert len(outs) > 1  # the test would be vacuous if every prompt gave the same output
    model.set_attn_implementation("sdpa")


def test_sampling_seeded_and_eos(tiny_model):
    model, tok = tiny_model
    prompts = [[tok.bos_token_id, 5, 6], [tok.bos_token_id, 7]]
    kw = dict(group_size=4, max_new_tokens=10, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
              temperature=1.0, top_p=0.9)
    a = generate(model, prompts, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, prompts, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert len({tuple(r) for r in a.tokens.tolist()}) > 1  # the group's samples differ
    # pretend token 7 is eos: everything after the first 7 is padding and lengths stop there
    c = generate(model, prompts, generator=torch.Generator().manual_seed(1),
                 **dict(kw, eos_id=int(a.tokens[0, 2])))
    for row, n in zip(c.tokens.tolist(), c.lengths.tolist()):
        if n < 10:
            assert row[n - 1] == int(a.tokens[0, 2]) and all(t == tok.pad_token_id for t in row[n:])


def test_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    draws = {int(r1kernels.sample_tokens(logits, top_p=0.01, generator=g)[0]) for _ in range(50)}
    assert draws == {1}
    draws = {int(r1kernels.sample_tokens(logits, top_p=0.9, generator=g)[0]) for _ in range(200)}
    assert draws == {1, 3}
    assert int(r1kernels.sample_tokens(logits, temperature=0.0)[0]) == 1


# ---- losses -----------------------------------------------------------------------------------

def test_policy_loss_matches_reference():
    torch.manual_seed(0)
    B, L, H, V = 4, 7, 16, 11
    h = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, L))
    mask = torch.rand(B, L) > 0.3
    adv = torch.randn(B, dtype=torch.float64)
    ref_lp = -torch.rand(B, L, dtype=torch.float64)
    loss, m = policy_loss(h, w, None, labels, mask, adv, ref_logps=ref_lp, beta=0.1,
                          num_items_in_batch=20.0, loss_type="dapo", epsilon_high=0.28)
    gh, gw = torch.autograd.grad(loss, (h, w))
    lp = reference.token_logprobs_ref(h @ w.T, labels)
    ref_loss, ref_m = reference.grpo_loss_ref(lp, adv, mask, ref_logps=ref_lp, beta=0.1,
                                              num_items_in_batch=20.0, epsilon_high=0.28)
    rh, rw = torch.autograd.grad(ref_loss, (h, w))
    # the fused r1kernels.GRPOLoss computes in fp32 (API.md): fp32-level tolerances vs float64
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)
    assert float(m["kl"]) == pytest.approx(float(ref_m["kl"]), rel=1e-5)
    assert float(ref_m["kl"]) > 0


def test_reference_logps_of_completion_tokens_only():
    """The trainer computes the reference model's log-probs with the tokens outside the mask
    labelled -100 (they skip the lm_head; their log-prob is 0): the policy loss, its metrics and
    gradients are those of the reference log-probs of every token."""
    torch.manual_seed(2)
    B, L, H, V = 3, 6, 8, 13
    h = torch.randn(B, L, H)
    w = torch.randn(V, H)
    h_ref, w_ref = h + 0.1 * torch.randn(B, L, H), w + 0.1 * torch.randn(V, H)
    labels = torch.randint(0, V, (B, L))
    mask = torch.rand(B, L) > 0.4
    adv = torch.randn(B)
    outs = []
    for lab in (labels, labels.masked_fill(~mask, -100)):
        ref = token_logprobs_from_hidden(h_ref, w_ref, None, lab)
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, m = policy_loss(hh, ww, None, labels, mask, adv, ref_logps=ref, beta=0.1)
        outs.append((loss.item(), float(m["kl"]), *torch.autograd.grad(loss, (hh, ww))))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6) and outs[0][1] == pytest.approx(outs[1][1], rel=1e-6)
    for a, b in zip(outs[0][2:], outs[1][2:]):
        torch.testing.assert_close(a, b)


def test_sft_loss_is_masked_nll():
    torch.manual_seed(0)
    h, w = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(13, 8, dtype=torch.float64)
    labels = torch.randint(0, 13, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    nll = torch.nn.functional.cross_entropy((h @ w.T)[mask], labels[mask], reduction="sum")
    torch.testing.assert_close(sft_loss(h, w, None, labels, mask, 6).double(), nll / 6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_sft_loss_gradients_fused(with_bias):
    """With gradients, sft_loss makes them in its forward pass (linear_token_logprobs_fwd_bwd):
    the same loss and gradients as autograd through the materialized logits, scaled by the
    upstream gradient. Only tokens in the mask go through the lm_head: NaN hidden states
    elsewhere (ours only) change nothing, and their gradient is exactly zero."""
    torch.manual_seed(1)
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    w = torch.randn(13, 8, dtype=torch.float64)
    b = torch.randn(13, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, 13, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    leaves = [t.float().requires_grad_(True) for t in (h.masked_fill(~mask.unsqueeze(-1), float("nan")), w)
              + ((b,) if with_bias else ())]
    loss = sft_loss(leaves[0], leaves[1], leaves[2] if with_bias else None, labels, mask, 6)
    (loss * 3).backward()
    refs = [t.clone().requires_grad_(True) for t in (h, w) + ((b,) if with_bias else ())]
    logits = refs[0] @ refs[1].T + (refs[2] if with_bias else 0)
    ref = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum") / 6
    (ref * 3).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for ours, r in zip(leaves, refs):
        torch.testing.assert_close(ours.grad.double(), r.grad, rtol=1e-4, atol=1e-6)


# ---- configuration ----------------------------------------------------------------------------

def test_config_yaml_and_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("grpo_steps: 7\nlr: 0.01\nrewards: {accuracy: 1.0}\n")
    cfg = parse_args(["--config", str(y), "--lr", "0.5", "--resume", "true",
                      "--rewards", "accuracy=1,format=0.5"])
    assert (cfg.grpo_steps, cfg.lr, cfg.resume) == (7, 0.5, True)
    assert cfg.rewards == {"accuracy": 1.0, "format": 0.5}
    assert parse_args([]) == Config()
    y.write_text("not_a_field: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(y)])
    # YAML 1.1 reads 1e-6 as a string: it is parsed as the field's type, like a flag
    y.write_text("lr: 1e-6\nsft_lr: 2\nrewards: accuracy=1,format=0.2\nresume: 'yes'\n")
    cfg = parse_args(["--config", str(y)])
    assert (cfg.lr, cfg.sft_lr, cfg.resume) == (1e-6, 2.0, True) and type(cfg.sft_lr) is float
    assert cfg.rewards == {"accuracy": 1.0, "format": 0.2}
    for bad in ("grpo_steps: 2.5\n", "lr: fast\n", "resume: 3\n", "rewards: [1, 2]\n",
                "grpo_steps: true\n"):
        y.write_text(bad)
        with pytest.raises(SystemExit, match=bad.split(":")[0]):
            parse_args(["--config", str(y)])


# ---- the pipeline -----------------------------------------------------------------------------

def _run(tmp_path, name, **over):
    from r1train.train import train

    cfg = Config(**{**TINY, "out_dir": str(tmp_path / name), **over})
    return cfg, train(cfg)


def test_pipeline_summary_schema(tmp_path):
    cfg, s = _run(tmp_path, "run", pass_k=2, eval_every=2)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["eval"] == s["eval"]
    for key in ("base", "after_sft", "after_grpo"):
        assert 0.0 <= on_disk["eval"][key] <= 1.0
    assert on_disk["eval_format"].keys() == on_disk["eval"].keys()
    for key in ("base", "after_sft", "after_grpo"):  # the stage table: R1's protocol too
        row = on_disk["stages"][key]
        assert set(row) == {"accuracy", "format", "completion_len", "pass@1", "cons@2", "pass@2"}
        assert row["accuracy"] == on_disk["eval"][key] and 0 < row["completion_len"] <= 24
        assert 0.0 <= row["pass@1"] <= row["pass@2"] <= 1.0
    assert on_disk["wall_seconds"] > 0
    # what moves the figures besides the seed: each op's backend and the C++ kernels' SIMD copy
    from r1kernels import _custom_ops, dispatch

    k = on_disk["kernels"]
    assert k["backends"]["linear_token_logprobs"] == dispatch.select("linear_token_logprobs", "cpu")
    assert set(k["backends"]) == set(dispatch.registered_ops()) and k["threads"] == 1
    if _custom_ops.EXT_ERROR is None:
        from r1kernels import _C

        assert k["cpu_simd"] == _C.cpu_simd_level()
    from r1train import rewards  # the grader: math-verify, when installed, changes a run

    assert on_disk["verifier"] == rewards.verifier_report()
    assert ("math-verify 0." in on_disk["verifier"]) == (rewards._mv is not None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2, 3, 4]
    assert {"reward", "accuracy", "format", "kl", "completion_len", "loss"} <= set(grpo[0])
    for r in grpo:  # the step's phases, disjoint; tokens/s over the generation only
        phases = r["gen_seconds"] + r["reward_seconds"] + r["update_seconds"]
        assert min(r["gen_seconds"], r["reward_seconds"], r["update_seconds"]) > 0
        assert phases <= r["step_seconds"] < phases + 0.5
        n_tok = r["completion_len"] * cfg.prompts_per_step * cfg.group_size
        assert r["gen_tokens_per_s"] * r["gen_seconds"] == pytest.approx(n_tok, rel=1e-6)
    assert any(r["stage"] == "eval" for r in rows)
    assert any(r["stage"] == "sft" for r in rows)
    # the trained model directory loads back with from_pretrained (safetensors)
    from r1train.model import load_model

    files = os.listdir(tmp_path / "run" / "model")
    assert any(f.endswith(".safetensors") for f in files)
    model, _ = load_model(str(tmp_path / "run" / "model"), device=torch.device("cpu"))
    assert model.use_kernels is False  # no layer swapped for a kernel from the Hub
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "run" / "plot.png").stat().st_size > 1000


def test_ctrl_c_then_resume_is_exact(tmp_path, monkeypatch):
    from r1train import train as train_mod

    # a reward that varies within every group, so the policy moves away from the KL reference
    # before the cut: a resume that took the cut's weights as the reference would differ
    (tmp_path / "len_reward.py").write_text("def length(completion, example):\n"
                                            "    return len(completion) / 100\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    over = dict(beta=0.05, checkpoint_every=3, rewards={"accuracy": 1.0, "len_reward:length": 1.0})
    _, full = _run(tmp_path, "full", **over)
    real_step = train_mod.Trainer.grpo_step
    calls = {"n": 0}

    def step_then_ctrl_c(self, opt):
        out = real_step(self, opt)
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C here
        return out

    monkeypatch.setattr(train_mod.Trainer, "grpo_step", step_then_ctrl_c)
    _, interrupted = _run(tmp_path, "cut", **over)
    ck = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert interrupted is None and ck["state"]["step"] == 2
    monkeypatch.setattr(train_mod.Trainer, "grpo_step", real_step)
    _, resumed = _run(tmp_path, "cut", resume=True, **over)
    assert resumed["eval"] == full["eval"]
    m_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    m_cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if "second" not in k and "per_s" not in k}
             for r in m_full]
    assert strip == [{k: v for k, v in json.loads(r).items()
                      if "second" not in k and "per_s" not in k} for r in m_cut]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_model_follows_seed_and_shape(tmp_path):
    """A tiny base model left in out_dir by a run with another seed or shape is rebuilt."""
    from r1train.train import Trainer

    def params(**over):
        t = Trainer(Config(**{**TINY, "out_dir": str(tmp_path / "o"), **over}))
        t.setup_model()
        return [p.detach().clone() for p in t.model.parameters()]

    a = params()
    assert all(torch.equal(x, y) for x, y in zip(a, params()))  # same settings: reused as is
    b = params(seed=1)
    assert len(a) == len(b) and not all(torch.equal(x, y) for x, y in zip(a, b))
    c = params(tiny_hidden=16)
    assert sum(p.numel() for p in c) < sum(p.numel() for p in a)


def test_micro_batching_and_checkpointing_do_not_change_the_update(tmp_path, monkeypatch):
    # a user reward (module:function) that varies within every group, so each step updates
    (tmp_path / "my_rewards.py").write_text("def length(completion, example):\n"
                                            "    return len(completion) / 100\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    over = dict(mode="r1-zero", stages="rl", grpo_steps=2, rewards={"my_rewards:length": 1.0})
    _, _ = _run(tmp_path, "big", micro_batch_tokens=100000, **over)
    _, _ = _run(tmp_path, "small", micro_batch_tokens=64, gradient_checkpointing=True, **over)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "big" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "small" / "model" / "model.safetensors"))
    changed = False
    base = load_file(str(tmp_path / "big" / "base_model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
        changed |= not torch.equal(a[k], base[k])
    assert changed


def test_r1_zero_rejection_sampling_and_distillation(tmp_path, capfd):
    cfg, s = _run(tmp_path, "zero", mode="r1-zero", grpo_steps=2, rs_prompts=6, rs_samples=4,
                  task="countdown", difficulty=2, pretrain_docs=16, pretrain_epochs=1)
    assert s["eval"]["after_sft"] is None and s["eval"]["after_grpo"] is not None
    rs = s["rejection_sampling"]
    # outcomes that teach nothing are said, once, on the console (and only then)
    err = capfd.readouterr().err
    grpo = [json.loads(x) for x in (tmp_path / "zero" / "metrics.jsonl").read_text().splitlines()
            if '"grpo"' in x]
    no_signal = all(r["groups_with_signal"] == 0 for r in grpo)
    assert ("had the same reward" in err) == no_signal
    assert err.count("had the same reward") <= 1
    assert ("rejection sampling kept 0" in err) == (rs["kept"] == 0)
    lines = open(rs["path"]).read().splitlines()
    assert len(lines) == rs["kept"]
    task = T.Countdown(2)
    for line in lines:  # every kept completion is verified correct
        row = json.loads(line)
        ex = next(task.example(x) for x in range(1 << 35, (1 << 35) + 6)
                  if task.example(x).prompt == row["prompt"])
        assert R.verify(row["completion"], ex)
    # distillation = SFT on a JSONL of (prompt, completion), e.g. from a stronger model
    data = tmp_path / "distill.jsonl"
    rows = [{"prompt": e.prompt, "completion": T.completion_text(e)}
            for e in T.Countdown(2).examples(range(16))]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    _, s2 = _run(tmp_path, "distill", sft_data=str(data), grpo_steps=1, task="countdown",
                 difficulty=2)
    hist = [json.loads(x) for x in (tmp_path / "distill" / "metrics.jsonl").read_text().split("\n")
            if x]
    assert sum(r["stage"] == "sft" for r in hist) == 1  # 16 rows, batch 16, 1 epoch
    # an SFT file with no examples is an error before any work, not a run that trains on nothing
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="sft_data .* has no examples"):
        _run(tmp_path, "empty", sft_data=str(tmp_path / "empty.jsonl"))
    assert not (tmp_path / "empty" / "metrics.jsonl").read_text()


def test_console_shows_our_bars_only(tmp_path):
    """r1-train's stderr: our stage and eval bars, no transformers save/load bars and no
    deprecation messages from the generation loop."""
    import subprocess
    import sys
    flags = [f"--{k}={v}" for k, v in {**TINY, "grpo_steps": 1, "eval_examples": 4}.items()]
    out = subprocess.run([sys.executable, "-m", "r1train", "--out_dir", str(tmp_path / "o"),
                          *flags], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "default"})
    assert out.returncode == 0, out.stderr
    for theirs in ("Loading weights", "Writing model shards", "deprecated", "Warning"):
        assert theirs not in out.stderr, out.stderr
    for ours in ("eval:", "sft:", "grpo:", "held-out base", "held-out after_grpo"):
        assert ours in out.stderr, out.stderr


def test_plot_smoothing_is_exact():
    """Values returning to 0 smooth to exactly 0 (a running sum left 1e-17, which matplotlib
    drew as an axis offset)."""
    from r1train.plot import _smooth

    ys = [0.1, 0.7, 0.3] + [0.0] * 12
    assert _smooth(ys, 3)[-1] == 0.0 and _smooth([0.1] * 30)[-1] == pytest.approx(0.1, abs=1e-16)
    assert _smooth(ys, 3)[:3] == pytest.approx([0.1, 0.4, 1.1 / 3])


def test_bench_step_smoke():
    from r1train import bench_step

    r = bench_step.main(["--tiny", "--dtype", "float32", "--prompts", "2", "--group_size", "2",
                         "--prompt_len", "4", "--new_tokens", "6"])
    assert r["generation_tokens_per_s"] > 0 and r["update_seconds"] > 0


def test_moe_model_directory(tmp_path):
    """A user's local MoE checkpoint (Qwen3-MoE) trains through the same code, its router and
    expert dispatch replaced by r1kernels ops."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from r1train.model import build_char_tokenizer, load_model

    tok = build_char_tokenizer()
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    path = tmp_path / "moe"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    model, tok = load_model(str(path), device=torch.device("cpu"))
    eager, _ = load_model(str(path), device=torch.device("cpu"), moe_kernels=False)
    router = next(m for m in model.modules() if type(m).__name__ == "Qwen3MoeTopKRouter")
    assert hasattr(router, "_r1k_name")  # the r1kernels router is in place
    ids = torch.tensor([[1, 10, 11, 12, 13, 14]])
    torch.testing.assert_close(model(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-5)
    prompts = [[tok.bos_token_id, 10, 11, 12], [tok.bos_token_id, 13]]
    roll = generate(model, prompts, group_size=1, max_new_tokens=8, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id, temperature=0.0)
    for i, p in enumerate(prompts):
        ref = generate_nocache_greedy(model, p, 8, tok.eos_token_id)
        assert roll.tokens[i, :int(roll.lengths[i])].tolist() == ref
    _, s = _run(tmp_path, "moe_run", model=str(path), grpo_steps=2)
    assert s["model_parameters"] == sum(p.numel() for p in model.parameters())


def test_every_eos_id_of_the_model_ends_a_completion(tmp_path):
    """A model directory whose generation_config lists two eos ids (an instruct model's end of
    turn and end of text): the trainer's rollouts stop at either (the tokenizer's first, as TRL's
    GRPOTrainer), and the texts leave either out at the end."""
    from r1train.model import build_tiny_model, load_model
    from r1train.train import SEED_BASE, Trainer

    path = build_tiny_model(str(tmp_path / "m"), hidden_size=32, num_layers=1, num_heads=2,
                            intermediate_size=64, max_positions=128, seed=0)
    model, tok = load_model(path, device=torch.device("cpu"))
    t = Trainer(Config(**{**TINY, "out_dir": str(tmp_path / "o"), "model": path}))
    t.setup_model()
    exs = t.task.examples(range(SEED_BASE["rl"], SEED_BASE["rl"] + 4))
    free = t.rollout(exs, group_size=4, temperature=1.0,
                     generator=t.prompt_generators("x", range(4)))[0]
    # the token the model samples most often (not the tokenizer's eos) as the second eos id
    ids, counts = free.tokens[free.tokens != tok.eos_token_id].unique(return_counts=True)
    other = int(ids[counts.argmax()])
    model.generation_config.eos_token_id = [other, tok.eos_token_id]
    model.save_pretrained(path)
    t = Trainer(Config(**{**TINY, "out_dir": str(tmp_path / "o2"), "model": path}))
    t.setup_model()
    assert t.eos_ids == [tok.eos_token_id, other]
    roll, _, texts, lengths = t.rollout(exs, group_size=4, temperature=1.0,
                                        generator=t.prompt_generators("x", range(4)))
    stopped = 0
    for row, n, text in zip(roll.tokens.tolist(), lengths, texts):
        ends = [i for i, x in enumerate(row[:n]) if x in (other, tok.eos_token_id)]
        assert ends in ([], [n - 1])  # the first eos of either kind ends the row
        stopped += bool(ends) and row[n - 1] == other
        assert text == t.decode(torch.tensor([row]), [n - bool(ends)])[0]
    assert stopped > 0


def test_user_trainer_module_does_not_shadow_ours(tmp_path):
    """A user's own trainer.py beside their script must not shadow the installed trainer."""
    import subprocess
    import sys
    (tmp_path / "trainer.py").write_text("raise SystemExit('user trainer imported')\n")
    code = ("import r1train.cli, r1train.train, trainer; "
            "print(r1train.cli.__file__); print(trainer.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    # importing `trainer` runs the user's file (exit message), after ours imported fine
    assert "user trainer imported" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-c", "import r1train.cli; print(r1train.cli.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path) not in out.stdout
