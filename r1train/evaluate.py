"""Evaluation beside the GRPO loop: greedy accuracy and pass@k on the held-out split, and
rejection sampling (verified-correct samples written as SFT data)."""
from __future__ import annotations

import json
import os

import torch

from r1train import tasks as tasks_mod
from r1train.rewards import verify
from r1train.runtime import derived_seed

RS_SEED_BASE = 1 << 35     # rejection-sampling prompt seeds


class Evaluation:
    @torch.no_grad()
    def evaluate(self) -> float:
        """Greedy accuracy on the held-out split (this rank's share, summed over ranks)."""
        cfg = self.cfg
        seeds = list(range(tasks_mod.EVAL_SEED_BASE, tasks_mod.EVAL_SEED_BASE + cfg.eval_examples))
        mine = seeds[self.rank::self.world]
        correct = 0.0
        for i in range(0, len(mine), 100):
            exs = self.task.examples(mine[i:i + 100])
            _, _, texts, _, _ = self.rollout_and_score(exs, group_size=1, temperature=0.0,
                                                       generator=None)
            correct += sum(verify(t, e) for t, e in zip(texts, exs))
        c, n = self.all_sum([correct, float(len(mine))])
        return c / max(n, 1.0)

    @torch.no_grad()
    def pass_at_k(self, k: int) -> float:
        cfg = self.cfg
        seeds = list(range(tasks_mod.EVAL_SEED_BASE, tasks_mod.EVAL_SEED_BASE + cfg.eval_examples))
        mine = seeds[self.rank::self.world]
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derived_seed(cfg.seed, "pass@k", self.rank))
        hits = 0.0
        for i in range(0, len(mine), 32):
            exs = self.task.examples(mine[i:i + 32])
            _, _, texts, _, _ = self.rollout_and_score(exs, group_size=k, temperature=1.0,
                                                       generator=gen)
            for j, e in enumerate(exs):
                hits += any(verify(t, e) for t in texts[j * k:(j + 1) * k])
        c, n = self.all_sum([hits, float(len(mine))])
        return c / max(n, 1.0)

    @torch.no_grad()
    def rejection_sample(self) -> tuple[str, int]:
        """N samples per prompt, keep the verified-correct ones, write an SFT JSONL."""
        cfg = self.cfg
        out = cfg.rs_out or os.path.join(cfg.out_dir, "rejection_sampled.jsonl")
        seeds = list(range(RS_SEED_BASE, RS_SEED_BASE + cfg.rs_prompts))[self.rank::self.world]
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derived_seed(cfg.seed, "rs", self.rank))
        kept = []
        for i in range(0, len(seeds), 16):
            exs = self.task.examples(seeds[i:i + 16])
            _, _, texts, _, scores = self.rollout_and_score(
                exs, group_size=cfg.rs_samples, temperature=cfg.temperature, generator=gen)
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
        return out, n
