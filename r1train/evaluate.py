"""Evaluation beside the GRPO loop, with DeepSeek-R1's protocol, and rejection sampling.

On the held-out split, per stage:
- greedy decoding: accuracy, format rate (the R1 format reward), mean completion length (tokens);
- with `pass_k = k`: k samples per prompt at temperature 0.6 and top-p 0.95 (the paper's setting):
  pass@1 (the mean correctness of the k samples, an unbiased estimate), cons@k (the majority
  answer's correctness; ties go to the answer seen first) and pass@k (any of the k correct).
Rejection sampling keeps the verified-correct samples of the current model as SFT data.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter

import torch

from r1train import tasks as tasks_mod
from r1train.rewards import extract_answer, format_reward, gold_answer, safe_eval, verify
from r1train.runtime import derived_seed

RS_SEED_BASE = 1 << 35     # rejection-sampling prompt seeds
EVAL_TEMPERATURE, EVAL_TOP_P = 0.6, 0.95


def vote_key(completion: str) -> str | None:
    """The answer a majority vote counts: its exact value when it is arithmetic, else its text
    without spaces; None when there is no answer."""
    ans = extract_answer(completion)
    if not ans:
        return None
    try:
        return str(safe_eval(gold_answer(ans)))
    except (ValueError, OverflowError, RecursionError):
        return "".join(ans.split())


class Evaluation:
    def held_out(self) -> list[int]:
        seeds = range(tasks_mod.EVAL_SEED_BASE, tasks_mod.EVAL_SEED_BASE + self.cfg.eval_examples)
        return list(seeds)[self.rank::self.world]

    def prompt_generators(self, tag: str, prompt_seeds) -> list[torch.Generator]:
        """One sampling stream per prompt, named by (run seed, tag, the prompt's seed): what a
        prompt's completions draw does not depend on the process count or the batching."""
        return [torch.Generator(device=self.device).manual_seed(derived_seed(self.cfg.seed, tag, s))
                for s in prompt_seeds]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy, format rate and completion length on the held-out split (all ranks)."""
        mine = self.held_out()
        correct = fmt = length = 0.0
        bar = self.bars(len(mine), "eval", 0, leave=False)
        # as many rows at a time as a GRPO rollout: both decode on one compiled step
        chunk = self.cfg.prompts_per_step * self.cfg.group_size
        for i in range(0, len(mine), chunk):
            exs = self.task.examples(mine[i:i + chunk])
            _, _, texts, lengths = self.rollout(exs, group_size=1, temperature=0.0,
                                                generator=None)
            correct += sum(verify(t, e) for t, e in zip(texts, exs))
            fmt += sum(format_reward(t, e) for t, e in zip(texts, exs))
            length += sum(lengths)
            bar.update(len(exs))
        bar.close()
        c, f, n_len, n = self.all_sum([correct, fmt, length, float(len(mine))])
        n = max(n, 1.0)
        return {"accuracy": c / n, "format": f / n, "completion_len": n_len / n}

    @torch.no_grad()
    def sampled_metrics(self, k: int) -> dict[str, float]:
        """pass@1 (mean over k samples), cons@k and pass@k at temperature 0.6, top-p 0.95."""
        mine = self.held_out()
        p1 = cons = any_ = 0.0
        for i in range(0, len(mine), 32):
            exs = self.task.examples(mine[i:i + 32])
            _, _, texts, _ = self.rollout(
                exs, group_size=k, temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P,
                generator=self.prompt_generators("pass@k", mine[i:i + 32]))
            for j, e in enumerate(exs):
                group = texts[j * k:(j + 1) * k]
                ok = [verify(t, e) for t in group]
                p1 += sum(ok) / k
                any_ += any(ok)
                votes = Counter(v for v in map(vote_key, group) if v is not None)
                if votes:
                    top = votes.most_common(1)[0][0]
                    cons += next(o for t, o in zip(group, ok) if vote_key(t) == top)
        s1, sc, sa, n = self.all_sum([p1, cons, any_, float(len(mine))])
        n = max(n, 1.0)
        return {"pass@1": s1 / n, f"cons@{k}": sc / n, f"pass@{k}": sa / n}

    def evaluate_stage(self) -> dict[str, float]:
        m = self.evaluate()
        if self.cfg.pass_k > 0:
            m.update(self.sampled_metrics(self.cfg.pass_k))
        return m

    def rs_prompts(self) -> int:
        return self.cfg.rs_prompts or self.cfg.sft_examples

    @torch.no_grad()
    def rejection_sample(self, out: str = "") -> tuple[str, int]:
        """N samples per prompt, keep the verified-correct ones (each distinct one once), write an
        SFT JSONL of {prompt, completion, answer}."""
        cfg = self.cfg
        out = out or cfg.rs_out or os.path.join(cfg.out_dir, "rejection_sampled.jsonl")
        seeds = list(range(RS_SEED_BASE, RS_SEED_BASE + self.rs_prompts()))[self.rank::self.world]
        kept = []
        for i in range(0, len(seeds), 16):
            exs = self.task.examples(seeds[i:i + 16])
            _, _, texts, _ = self.rollout(
                exs, group_size=cfg.rs_samples, temperature=cfg.temperature,
                generator=self.prompt_generators("rs", seeds[i:i + 16]))
            for j, t in enumerate(texts):
                e = exs[j // cfg.rs_samples]
                row = {"prompt": e.prompt, "completion": t, "answer": e.answer}
                if verify(t, e) and row not in kept:
                    kept.append(row)
        part = f"{out}.rank{self.rank}"
        with open(part, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.barrier()
        n = 0
        if self.is_main:
            with open(out + ".tmp", "w", encoding="utf-8") as f:
                for r in range(self.world):
                    with open(f"{out}.rank{r}", encoding="utf-8") as pf:
                        for line in pf:
                            f.write(line)
                            n += 1
                    os.remove(f"{out}.rank{r}")
            os.replace(out + ".tmp", out)
        self.barrier()
        if self.is_main and n == 0:
            print(f"[r1-train] warning: rejection sampling kept 0 of {self.rs_prompts()} prompts x "
                  f"{cfg.rs_samples} samples (none verified correct): {out} is empty",
                  file=sys.stderr, flush=True)
        return out, n
