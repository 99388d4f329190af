"""The rest of the R1 recipe: the four stages, R1-Zero's base model and template, the language
reward, TRL-signature rewards, datasets (JSONL / Parquet / saved `datasets`), a real BPE tokenizer
with a chat template, math-verify, R1's evaluation protocol and `r1-train sample`."""
from __future__ import annotations

import json
import os

import pytest
import torch

from r1train import rewards as R
from r1train import tasks as T
from r1train.config import Config

TINY = dict(tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_intermediate=64, sft_examples=32,
            sft_epochs=1, sft_batch_size=16, grpo_steps=3, prompts_per_step=4, group_size=4,
            max_new_tokens=24, eval_examples=8, checkpoint_every=0, threads=1)


def _run(tmp_path, name, **over):
    from r1train.train import train

    cfg = Config(**{**TINY, "out_dir": str(tmp_path / name), **over})
    return cfg, train(cfg)


def _rows(path):
    return [json.loads(x) for x in open(path).read().splitlines() if x]


# ---- rewards ----------------------------------------------------------------------------------

def test_language_reward():
    f = R.language_reward
    ex = T.Example("q", "1")
    assert f("<think>add the units then the tens</think><answer>1</answer>", ex) == 1.0
    assert f("<think>add 先 the units</think><answer>1</answer>", ex) == pytest.approx(3 / 4)
    assert f("<think>先加个位</think><answer>1</answer>", ex, scripts="cjk") == 1.0
    assert f("<think>先加 units</think><answer>1</answer>", ex, scripts="cjk") == 0.5
    assert f("<think>7+8=15,4+3+1=8</think><answer>85</answer>", ex) == 1.0  # no words
    assert f("<answer>85</answer>", ex) == 0.0  # no chain of thought
    assert f("<think>mixed日本</think>", ex, scripts="cjk") == 0.0  # a word in two scripts
    assert f("<think>mixed日本</think>", ex, scripts="latin,cjk") == 1.0
    rf = R.RewardFn({"language": 1.0}, language="cyrillic")
    totals, _ = rf(["q"], ["<think>сложить units</think>"], [ex])
    assert totals == [0.5]


def test_trl_signature_reward_and_none(tmp_path):
    calls = {}

    def trl_style(prompts, completions, answer, level, **kw):
        calls.update(prompts=prompts, answer=answer, level=level)
        return [None if c == "skip" else float(len(c)) for c in completions]

    rf = R.RewardFn({"accuracy": 1.0, "format": 0.5})
    rf.parts.append(("trl", trl_style, 2.0))
    exs = [T.Example("p1", "3", columns={"level": 1}), T.Example("p2", "4", columns={"level": 2})]
    good = "<think>x</think><answer>3</answer>"
    totals, values = rf(["P1", "P2"], [good, "skip"], exs)
    assert calls == {"prompts": ["P1", "P2"], "answer": ["3", "4"], "level": [1, 2]}
    assert values["trl"] == [float(len(good)), None]
    assert totals == [1.0 + 0.5 + 2.0 * len(good), 0.0]  # None: that function does not count
    only = R.RewardFn({})
    only.parts.append(("trl", trl_style, 1.0))
    assert only(["a", "b"], ["skip", "ab"], exs)[0] == [None, 2.0]  # every function None: skipped
    bad = R.RewardFn({})
    bad.parts.append(("short", lambda prompts, completions, **kw: [1.0], 1.0))
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        bad(["a", "b"], ["x", "y"], exs)


def test_gsm8k_answers_and_math_verify(monkeypatch):
    ex = T.Example("q", "She pays 3 * 4 = 12 dollars.\n#### 12")
    assert R.verify("<think>t</think><answer>12</answer>", ex)
    assert R.verify("<think>t</think><answer>24/2</answer>", ex)
    assert not R.verify("<think>t</think><answer>13</answer>", ex)
    half = T.Example("q", "1/2")
    assert R.verify("<answer>0.5</answer>", half)  # our verifier: exact fractions
    pytest.importorskip("math_verify")
    import builtins
    import re

    # sympy builds numbers and symbols from the LaTeX grammar's tokens with parse_expr (eval):
    # model text reaches eval only as such constructors of digits and letters
    evaluated = []
    real_eval = builtins.eval

    def spy(src, *a, **k):
        evaluated.append(src if isinstance(src, str) else "<code>")
        return real_eval(src, *a, **k)

    monkeypatch.setattr(builtins, "eval", spy)
    assert R.verify("<answer>\\frac{1}{2}</answer>", half)
    assert R.verify("<answer>\\frac{2}{4}</answer>", T.Example("q", "\\frac{1}{2}"))
    assert R.verify("<answer>\\{3, 1, 2\\}</answer>", T.Example("q", "\\{1,2,3\\}"))
    assert R.verify("<answer>\\boxed{(0, 1]}</answer>", T.Example("q", "(0,1]"))
    assert R.verify("<answer>x^{2}+1.5</answer>", T.Example("q", "x^2+3/2"))
    assert not R.verify("<answer>\\frac{1}{3}</answer>", half)
    for hostile in ("\\frac{__import__('os')}{2}", "\\text{__import__('os').system('x')}",
                    "__import__('os').system('echo x')", "\\mathrm{exec}('1')"):
        assert not R.verify(f"<answer>{hostile}</answer>", half)
    allowed = re.compile(r"^(Integer \(\d+ \)|Float \('[\d.]+' \)|Symbol \('[A-Za-z]+' \)|E )$")
    assert evaluated and all(allowed.match(e) for e in evaluated), set(evaluated)


# ---- data -------------------------------------------------------------------------------------

def test_dataset_jsonl_parquet_and_saved_dir(tmp_path):
    import datasets

    rows = [{"question": f"{i}+1=", "solution": f"#### {i + 1}", "level": i % 3}
            for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:15]),
                          "test": datasets.Dataset.from_list(rows[15:])}
                         ).save_to_disk(str(tmp_path / "saved"))
    for path in ("d.jsonl", "d.parquet", "saved"):
        task = T.make_task("dataset", 0, str(tmp_path / path), "prompt=question,answer=solution")
        ex = task.example(0)
        assert ex.prompt == "0+1=" and R.gold_answer(ex.answer) == "1"
        assert ex.columns == {"solution": "#### 1", "level": 0}  # the columns but the prompt
        held = {task.example(T.EVAL_SEED_BASE + s).prompt for s in range(50)}
        train = {task.example(s).prompt for s in range(50)}
        assert held and not (held & train)
        if path == "saved":  # the DatasetDict's test split is the held-out set
            assert held == {f"{i}+1=" for i in range(15, 20)}
    with pytest.raises(ValueError, match="data_columns"):
        T.make_task("dataset", 0, str(tmp_path / "d.jsonl"), "query=question")
    with pytest.raises(ValueError, match="no column 'prompt'"):
        T.make_task("dataset", 0, str(tmp_path / "d.jsonl"))


def _bpe_model_dir(path):
    """A tiny Qwen2 with a byte-level BPE tokenizer trained on generated text and a chat
    template, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>",
               "</answer>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [f"{a}+{b}={a + b} The user asks a question and the Assistant answers"
            for a in range(30) for b in range(30)]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                          "assistant\n{% endif %}")
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def test_real_tokenizer_chat_template_dataset_and_trl_reward(tmp_path, monkeypatch):
    import datasets

    from r1train.train import Trainer

    model = _bpe_model_dir(tmp_path / "bpe")
    rows = [{"question": f"{i}+2=", "solution": str(i + 2), "weight": 0.5} for i in range(40)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "trl_rewards.py").write_text(
        "SEEN = []\n"
        "def length(prompts, completions, solution, weight, **kw):\n"
        "    SEEN.append((prompts[0], solution[0], weight[0]))\n"
        "    return [None if i % 4 == 0 else w * len(c) / 50\n"
        "            for i, (c, w) in enumerate(zip(completions, weight))]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    over = dict(model=model, task="dataset", data=str(tmp_path / "d.parquet"),
                data_columns="prompt=question,answer=solution",
                rewards={"trl_rewards:length": 1.0}, grpo_steps=2)
    t = Trainer(Config(**{**TINY, "out_dir": str(tmp_path / "o"), **over}))
    t.setup_model()
    text = t.render_prompt("3+2=")
    assert text == ("<|im_start|>system\n" + Config().system_prompt + "<|im_end|>\n"
                    "<|im_start|>user\n3+2=<|im_end|>\n<|im_start|>assistant\n")
    ids = t.encode_prompts(["3+2=", "10+20="])  # the chat template writes no BOS: none added
    assert [t.tok.decode(i) for i in ids] == [text, t.render_prompt("10+20=")]
    assert t.tok.tokenize("<think>") == ["<think>"]
    _, s = _run(tmp_path, "run", **over)
    import trl_rewards

    prompt, solution, weight = trl_rewards.SEEN[0]
    assert prompt.startswith("<|im_start|>system") and weight == 0.5 and solution.isdigit()
    grpo = [r for r in _rows(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "grpo"]
    assert [r["skipped"] for r in grpo] == [4, 4]  # None for every 4th of the 16 samples
    assert s["eval"]["after_grpo"] is not None


# ---- evaluation protocol ----------------------------------------------------------------------

def test_vote_key():
    from r1train.evaluate import vote_key

    assert vote_key("<answer>0.5</answer>") == vote_key("<answer>1/2</answer>") == "1/2"
    assert vote_key("<answer> a b</answer>") == "ab"
    assert vote_key("no answer") is None


def test_pass_at_1_and_cons_at_k(tmp_path, monkeypatch):
    from r1train.train import Trainer

    t = Trainer(Config(**{**TINY, "out_dir": str(tmp_path / "o"), "eval_examples": 2}))
    t.setup_model()
    exs = t.task.examples([T.EVAL_SEED_BASE, T.EVAL_SEED_BASE + 1])
    right = [f"<answer>{e.answer}</answer>" for e in exs]
    # prompt 0: 1 of 4 right, the majority wrong; prompt 1: 2 of 4 right, the majority right
    texts = [right[0], "<answer>7</answer>", "<answer>7</answer>", "x",
             right[1], right[1], "<answer>9999</answer>", "x"]
    seen = {}

    def canned(self, examples, *, group_size, temperature, generator, top_p=None):
        seen.update(temperature=temperature, top_p=top_p, k=group_size)
        return None, None, texts, None

    monkeypatch.setattr(Trainer, "rollout", canned)
    m = t.sampled_metrics(4)
    assert seen == {"temperature": 0.6, "top_p": 0.95, "k": 4}
    assert m == {"pass@1": pytest.approx((1 / 4 + 2 / 4) / 2), "cons@4": 0.5, "pass@4": 1.0}


# ---- the stages -------------------------------------------------------------------------------

def test_stage_lists():
    from r1train.train import Trainer

    def stages(**kw):
        return Trainer(Config(**{**TINY, **kw})).stages()

    assert stages() == ["eval:base", "sft", "eval:after_sft", "rl", "eval:after_grpo"]
    assert stages(mode="r1-zero") == ["pretrain", "eval:base", "rl", "eval:after_grpo"]
    assert stages(stages="sft,rl,rs_sft,rl2") == [
        "eval:base", "sft", "eval:after_sft", "rl", "eval:after_grpo", "rs", "rs_sft",
        "eval:after_rs_sft", "rl2", "eval:after_rl2"]
    for bad in ("sft,sft", "rl,pretrain", "sft,rlx"):
        with pytest.raises(ValueError, match="stages"):
            stages(stages=bad)
    with pytest.raises(ValueError, match="r1-zero"):
        stages(mode="r1-zero", stages="sft,rl")
    with pytest.raises(ValueError, match="prompt_template"):
        stages(prompt_template="no placeholder")


def test_four_stages_restart_from_base_and_resume(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from r1train.train import Trainer

    over = dict(stages="sft,rl,rs_sft,rl2", rl2_steps=2, rs_prompts=8, rs_samples=2,
                eval_every=1)
    starts = {}
    real_lm = Trainer.run_lm

    def record(self, opt, bar, name):
        if self.state["step"] == 0:
            starts[name] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return real_lm(self, opt, bar, name)

    monkeypatch.setattr(Trainer, "run_lm", record)
    _, full = _run(tmp_path, "full", **over)
    base = load_file(str(tmp_path / "full" / "base_model" / "model.safetensors"))
    for k, v in base.items():  # rs_sft starts again from the base model, sft from it too
        assert torch.equal(starts["rs_sft"][k], v) and torch.equal(starts["sft"][k], v)
    assert list(full["stages"]) == ["base", "after_sft", "after_grpo", "after_rs_sft",
                                    "after_rl2"]
    for row in full["stages"].values():
        assert set(row) == {"accuracy", "format", "completion_len"}
    assert full["eval_format"].keys() == full["eval"].keys()
    rows = _rows(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["stage"] == "rl2"] == [1, 2]
    assert [r["stage"] for r in rows if r["stage"] in ("sft", "rs_sft")] == ["sft"] * 2 + \
        ["rs_sft"] * 2  # 32 cold-start rows (rs kept none from this tiny model), batch 16
    assert any(r.get("of") == "rl2" for r in rows if r["stage"] == "eval")
    # Ctrl-C inside rs_sft, then resume: the same run
    monkeypatch.setattr(Trainer, "run_lm", real_lm)
    def cut(self, opt, bar, name):
        if name == "rs_sft":
            self.stop_requested = True
        return real_lm(self, opt, bar, name)

    monkeypatch.setattr(Trainer, "run_lm", cut)
    assert _run(tmp_path, "cut", **over)[1] is None
    ck = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert ck["state"]["step"] == 1
    monkeypatch.setattr(Trainer, "run_lm", real_lm)
    _, resumed = _run(tmp_path, "cut", resume=True, **over)
    assert resumed["stages"] == full["stages"]
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_r1_zero_pretrain_stage(tmp_path):
    tpl = T.TINY_R1_ZERO_TEMPLATE
    task = T.Arithmetic(2)
    docs = [T.pretrain_text(task, s, tpl, 0.1) for s in range(2000)]
    fmt = sum("</think><answer>" in d for d in docs) / len(docs)
    assert 0.03 < fmt < 0.08  # 10% of the question-answer half
    assert all(d.count("</think><answer>") <= 1 for d in docs)
    for d in (d for d in docs if "</think><answer>" in d):  # the thought ends in its result
        answer = d.rsplit("<answer>", 1)[1].split("</answer>")[0]
        assert d.rsplit("</think>", 1)[0].endswith(f", so {answer}"), d
    assert sum(d.startswith(tpl.split("{")[0]) for d in docs) > 800
    _, s = _run(tmp_path, "zero", mode="r1-zero", pretrain_docs=32, pretrain_epochs=1)
    assert s["eval"]["after_sft"] is None and s["eval_format"]["base"] is not None
    rows = _rows(tmp_path / "zero" / "metrics.jsonl")
    assert [r["stage"] for r in rows if r["stage"] != "grpo"] == ["pretrain", "pretrain"]
    assert os.path.exists(tmp_path / "zero" / "pretrained_base" / "model.safetensors")


def test_sample_cli_writes_verified_traces(tmp_path, monkeypatch):
    from r1train import cli
    from r1train.train import Trainer

    def canned(self, examples, *, group_size, temperature, generator, top_p=None):
        texts = []
        for e in examples:
            texts += [T.completion_text(e), "<think>x</think><answer>-1</answer>"] * \
                (group_size // 2)
        return None, None, texts, None

    monkeypatch.setattr(Trainer, "rollout", canned)
    out = tmp_path / "traces.jsonl"
    assert cli.main(["sample", "--out_dir", str(tmp_path / "o"), "--tiny_hidden", "32",
                     "--tiny_layers", "1", "--tiny_heads", "2", "--tiny_intermediate", "64",
                     "--rs_prompts", "5", "--rs_samples", "4", "--rs_out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 5  # one distinct verified trace per prompt; the wrong ones dropped
    assert all(R.verify(r["completion"], T.Example(r["prompt"], r["answer"])) for r in rows)
