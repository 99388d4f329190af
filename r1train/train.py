"""The GRPO loop of the R1 recipe (the stages around it: stages.py).

A GRPO step, as a reader should hold it in their head:

    prompts  = task examples for (seed, step, global index)         # pure function: exact resume
    rollout  = generate(policy, prompts, G per prompt)              # same weights, static KV cache
    rewards  = accuracy (safe verifier) + 0.1 * format              # or the configured ones
    A        = r1kernels.group_advantages(rewards, G)               # (r - mean) / (std + eps)
    loss     = GRPO loss on last hidden states + lm_head weight     # r1kernels.GRPOLoss
    step the optimizer once                                         # on-policy: old logps = logps

Deviations from textbook GRPO (Shao et al. 2024), all standard in DAPO/TRL practice:
- one optimizer step per rollout, so the importance ratio is 1 and old log-probs are not
  recomputed; the clip still bounds the step through its gradient (epsilon_low/high, DAPO style);
- loss_type "dapo" (token-level mean over the whole batch) by default instead of per-sequence mean;
- beta = 0 by default (no reference model, no KL term); beta > 0 adds the k3 KL to a frozen copy;
- completions that do not finish within max_new_tokens keep their (zero) accuracy reward.

Distributed: under torchrun every process rolls out its own prompts; gradients are averaged by
DistributedDataParallel (gloo on CPU, nccl on GPU), or with `--fsdp true` weights, gradients and
optimizer states are sharded by FSDP2 (r1train/parallel.py). Checkpoints go through
torch.distributed.checkpoint (r1train/checkpoint.py); rank 0 writes the other files.
Setup (r1train/runtime.py), checkpointing (checkpoint.py), evaluation (evaluate.py) and the stages
around this loop (stages.py) live beside this file.
"""
from __future__ import annotations

import contextlib
import gc
import math
import sys
import time

import torch
import torch.distributed as dist

import r1kernels
from r1train import parallel
from r1train.checkpoint import Checkpointing
from r1train.config import Config
from r1train.evaluate import Evaluation
from r1train.generate import generate
from r1train.loss import policy_loss, rollout_mismatch, token_logprobs_from_hidden
from r1train.model import lm_head_of
from r1train.rewards import format_reward, verify
from r1train.runtime import Body, Runtime
from r1train.stages import LOG_NAME, Stages

GRPO_SEED_BASE = 1 << 30   # GRPO prompt seeds; SFT uses [0, sft_examples), eval >= 2**40
SEED_BASE = {"rl": GRPO_SEED_BASE, "rl2": 1 << 32}  # each RL stage sees its own prompts


class Trainer(Runtime, Checkpointing, Evaluation, Stages):
    """The policy, its optimizer state and the run's progress; the GRPO step is below."""

    def rollout(self, examples, *, group_size, temperature, generator, top_p=None):
        """G completions per example: (rollout, prompt ids, decoded texts, lengths)."""
        cfg = self.cfg
        prompts = self.encode_prompts([e.prompt for e in examples])
        with parallel.gathered(self.model) if self.fsdp else contextlib.nullcontext():
            roll = generate(self.model, prompts, group_size=group_size,
                            max_new_tokens=cfg.max_new_tokens, eos_id=self.eos_ids,
                            pad_id=self.pad_id, temperature=temperature,
                            top_p=cfg.top_p if top_p is None else top_p, generator=generator,
                            compile=cfg.rollout_compile)
        lengths = roll.lengths.tolist()
        tokens = roll.tokens.cpu()  # one device-to-host copy for the whole rollout
        return roll, prompts, self.decode(tokens, lengths), lengths

    def score(self, examples, texts, group_size):
        """The reward of each completion (None: skipped) and the values of each reward function;
        completion i answers examples[i // group_size]."""
        rendered = [self.render_prompt(e.prompt) for e in examples]
        return self.reward_fn([rendered[i // group_size] for i in range(len(texts))], texts,
                              [examples[i // group_size] for i in range(len(texts))])

    def update(self, opt, prompts, tokens, lengths, rewards, G, rollout_logps=None):
        """One GRPO optimizer step on a rollout: group advantages, bucketed micro-batches,
        policy_loss on hidden states (r1kernels); the loss is normalized by the global batch's
        token count (DDP averages gradients over processes, FSDP2 sums them: `grad_divide`).
        With the rollout's sampling log-probs: the rollout-vs-train mismatch (and cfg.rollout_is
        importance weights)."""
        cfg = self.cfg
        adv = r1kernels.group_advantages(rewards, G)  # a NaN (skipped) reward: advantage 0
        tokens = tokens.cpu()
        rows, keep = [], (~torch.isnan(rewards)).tolist()
        kept = [i for i in range(len(lengths)) if keep[i]]  # row j of the loss is sample kept[j]
        for i in range(len(lengths)):
            if keep[i]:  # a skipped sample is left out of the loss and its normalization
                p = prompts[i // G]
                rows.append((p + tokens[i, :lengths[i]].tolist(), len(p)))
        # (+ one zero: the empty micro-batch an FSDP rank adds reads row 0, maybe with no row kept)
        adv = torch.cat([adv[torch.tensor(keep, device=adv.device)], adv.new_zeros(1)])
        n_tok = sum(n for n, k in zip(lengths, keep) if k)
        n_all = self.all_sum([n_tok])[0] / self.grad_divide
        micro = list(self.micro_batches(rows))
        w, b = lm_head_of(self.model)
        extra = {"kl": 0.0, "clip_ratio": 0.0}
        mismatch = {"mismatch_logp_abs": 0.0, "mismatch_ratio_out": 0.0, "rollout_is_weight": 0.0}

        def loss_of(mb):
            ids, attn, labels, mask, index = mb
            ref = None
            if self.ref_model is not None:
                with torch.no_grad():
                    h_ref = Body(self.ref_model)(ids, attn)[:, :-1]
                    rw, rb = lm_head_of(self.ref_model)
                    # only the completion tokens' log-probs are used: the others are labelled
                    # -100, so they skip the lm_head (r1kernels.linear_token_logprobs)
                    ref = token_logprobs_from_hidden(h_ref, rw, rb, labels.masked_fill(~mask, -100))
            hidden = self.hidden(ids, attn)
            is_w = None
            if rollout_logps is not None and bool(mask.any()):  # the sampler's log-probs
                with torch.no_grad():
                    train_lp = token_logprobs_from_hidden(hidden.detach(), w, b,
                                                          labels.masked_fill(~mask, -100))
                roll_lp = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
                roll_lp[mask] = torch.cat([rollout_logps[kept[j], :lengths[kept[j]]]
                                           for j in index.tolist()])
                is_w, sums = rollout_mismatch(train_lp, roll_lp, mask, mode=cfg.rollout_is,
                                              cap=cfg.rollout_is_cap)
                for k, v in zip(mismatch, sums):
                    mismatch[k] += float(v) / max(n_tok, 1)
            loss, metrics = policy_loss(
                hidden, w, b, labels, mask, adv[index], ref_logps=ref, rollout_is_weights=is_w,
                num_items_in_batch=n_all, loss_type=cfg.loss_type, epsilon_low=cfg.epsilon_low,
                epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                max_completion_length=cfg.max_new_tokens)
            share = float(mask.sum()) / max(n_tok, 1)  # token-weighted average over micro-batches
            for k in extra:
                extra[k] += share * float(metrics.get(k, 0.0))
            if "entropy" in metrics:
                extra["entropy"] = extra.get("entropy", 0.0) + share * float(metrics["entropy"])
            return loss

        loss, gnorm = self.backward_and_step(opt, micro, loss_of)
        if rollout_logps is not None:
            extra.update(mismatch)
        return loss, gnorm, extra

    def grpo_step(self, opt) -> dict:
        cfg = self.cfg
        stage = self.current_stage  # rl or rl2: their own prompts and sampling streams
        step, G, P = self.state["step"], cfg.group_size, cfg.prompts_per_step
        t0 = time.perf_counter()
        first = SEED_BASE[stage] + (step * self.world + self.rank) * P
        examples = self.task.examples(range(first, first + P))
        # one sampling stream per prompt, named by its global index: the samples do not depend
        # on how the step's prompts are split over processes (a run resumes on another count)
        tag = "grpo-sample" if stage == "rl" else f"{stage}-sample"
        gen = self.prompt_generators(tag, range(first, first + P))
        roll, prompts, texts, lengths = self.rollout(examples, group_size=G,
                                                     temperature=cfg.temperature, generator=gen)
        t_gen = time.perf_counter()
        totals, values = self.score(examples, texts, G)
        t_reward = time.perf_counter()
        rewards = torch.tensor([math.nan if r is None else r for r in totals],
                               dtype=torch.float32, device=self.device)
        # groups whose (scored) rewards differ: the others have advantage 0 and teach nothing
        r, nan = rewards.view(-1, G), torch.isnan(rewards.view(-1, G))
        signal = float((r.masked_fill(nan, -math.inf).amax(1)
                        > r.masked_fill(nan, math.inf).amin(1)).sum())
        loss, gnorm, extra = self.update(opt, prompts, roll.tokens, lengths, rewards, G,
                                         rollout_logps=roll.logps)
        t_update = time.perf_counter()
        exs = [examples[i // G] for i in range(len(texts))]
        acc = values.get("accuracy") or [float(verify(t, e)) for t, e in zip(texts, exs)]
        fmt = values.get("format") or [format_reward(t, e) for t, e in zip(texts, exs)]
        scored = [r for r in totals if r is not None]
        n_tok = sum(lengths)
        sums = self.all_sum([sum(scored), len(scored), sum(acc), sum(fmt), float(n_tok), len(acc),
                             loss, extra["kl"], extra["clip_ratio"], signal])
        n = sums[5]
        return {"stage": LOG_NAME.get(stage, stage), "step": step + 1,
                "reward": sums[0] / max(sums[1], 1.0), "accuracy": sums[2] / n,
                "format": sums[3] / n, "completion_len": sums[4] / n, "skipped": n - sums[1],
                "loss": sums[6] / self.grad_divide, "kl": sums[7] / self.world,
                "clip_ratio": sums[8] / self.world, "grad_norm": gnorm,
                "groups_with_signal": int(sums[9]),
                # this process's phases (as verl's timing_s/gen, /reward, /update_actor): the
                # rollout (prompts, generation, detokenizing), the reward functions, the update
                "gen_tokens_per_s": n_tok / max(t_gen - t0, 1e-9),
                "gen_seconds": t_gen - t0, "reward_seconds": t_reward - t_gen,
                "update_seconds": t_update - t_reward,
                "step_seconds": time.perf_counter() - t0, **({"entropy": extra["entropy"]}
                                                             if "entropy" in extra else {}),
                **self.rollout_metrics(extra)}

    def rollout_metrics(self, extra: dict) -> dict:
        """Mean |logp_train - logp_rollout| per completion token, the fraction of tokens whose
        ratio leaves [0.5, 2], the mean importance weight (with --rollout_is), over processes."""
        keys = ["mismatch_logp_abs", "mismatch_ratio_out"] + (["rollout_is_weight"]
                                                              if self.cfg.rollout_is else [])
        return dict(zip(keys, (v / self.world for v in self.all_sum([extra[k] for k in keys]))))

    def run_grpo(self, opt, pbar_factory):
        cfg = self.cfg
        stage = self.current_stage
        steps = cfg.grpo_steps if stage == "rl" else cfg.rl2_steps
        bar = pbar_factory(steps, LOG_NAME.get(stage, stage), self.state["step"])
        while self.state["step"] < steps:
            m = self.grpo_step(opt)
            self.state["step"] += 1
            self.log(m)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}",
                            len=f"{m['completion_len']:.0f}")
            if cfg.eval_every and self.state["step"] % cfg.eval_every == 0 \
                    and self.state["step"] < steps:
                ev = self.evaluate()
                self.log({"stage": "eval", "of": m["stage"], "step": self.state["step"],
                          **{f"eval_{k}": v for k, v in ev.items()}})
            if self.after_step(opt, steps):
                bar.close()
                return False
        bar.close()
        name = LOG_NAME.get(stage, stage)
        rl = [r for r in self.state["history"] if r.get("stage") == name and "reward" in r]
        if self.is_main and rl and not any(r.get("groups_with_signal") for r in rl):
            print(f"[r1-train] warning: in all {len(rl)} {name} steps every group's "
                  f"{cfg.group_size} completions had the same reward (mean "
                  f"{sum(r['reward'] for r in rl) / len(rl):.3f}): the advantages were 0 and the "
                  "policy did not learn (R1-Zero on a model that never gets a reward? try mode r1, "
                  "more steps, a larger group_size or an easier task)", file=sys.stderr, flush=True)
        return True


def train(cfg: Config) -> dict | None:
    """Run the configured pipeline; returns the summary (None if interrupted)."""
    trainer = Trainer(cfg)
    finished = False
    try:
        summary = trainer.run()
        finished = True
        return summary
    finally:
        if trainer.world > 1 and dist.is_initialized():
            if finished:
                dist.barrier()  # every rank is past its last collective before any tears down
            # The DDP wrapper's reducer holds the process group: release it while every peer is
            # still alive (a gloo group destroyed after a peer exited can hang in its destructor).
            trainer.body = None
            gc.collect()
            dist.destroy_process_group()
