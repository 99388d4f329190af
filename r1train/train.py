"""The R1 recipe in one loop: evaluate -> cold-start SFT -> evaluate -> GRPO -> evaluate.

A GRPO step, as a reader should hold it in their head:

    prompts  = task examples for (seed, step, rank)                 # pure function: exact resume
    rollout  = generate(policy, prompts, G per prompt)              # same weights, static KV cache
    rewards  = accuracy (safe verifier) + 0.1 * format
    A        = r1kernels.group_advantages(rewards, G)               # (r - mean) / (std + eps)
    loss     = GRPO loss on last hidden states + lm_head weight     # r1kernels.GRPOLoss
    step the optimizer once                                         # on-policy: old logps = logps

Deviations from textbook GRPO (Shao et al. 2024), all standard in DAPO/TRL practice:
- one optimizer step per rollout, so the importance ratio is 1 and old log-probs are not
  recomputed; the clip still bounds the step through its gradient (epsilon_low/high, DAPO style);
- loss_type "dapo" (token-level mean over the whole batch) by default instead of per-sequence mean;
- beta = 0 by default (no reference model, no KL term); beta > 0 adds the k3 KL to a frozen copy;
- completions that do not finish within max_new_tokens keep their (zero) accuracy reward.

Distributed: under torchrun every process rolls out its own prompts, gradients are averaged by
DistributedDataParallel (gloo on CPU, nccl on GPU), rank 0 writes files.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

import r1kernels
from r1train import tasks as tasks_mod
from r1train.config import Config
from r1train.generate import generate
from r1train.loss import policy_loss, sft_loss, token_logprobs_from_hidden
from r1train.model import build_tiny_model, decoder_of, lm_head_of, load_model
from r1train.rewards import RewardFn, verify

GRPO_SEED_BASE = 1 << 30   # GRPO prompt seeds; SFT uses [0, sft_examples), eval >= 2**40
RS_SEED_BASE = 1 << 35     # rejection-sampling prompt seeds


def derived_seed(*parts) -> int:
    """A 63-bit seed from (run seed, stage, step, rank, ...): independent streams, no state."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


class Body(torch.nn.Module):
    """The decoder without its lm_head: what DDP wraps, so gradients sync on backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return decoder_of(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if cfg.device == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            dev = cfg.device
        if dev.startswith("cuda") and self.world > 1:
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(dev)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.is_main = self.rank == 0
        self.task = tasks_mod.make_task(cfg.task, cfg.difficulty, cfg.data or None)
        self.reward_fn = RewardFn(cfg.rewards)
        self.ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
        self.stop_requested = False
        # progress of the run; everything needed to continue it exactly lives here + weights + optim
        self.state = {"stage": 0, "step": 0, "evals": {}, "history": [], "elapsed": 0.0}
        self.ref_model = None
        self.bars = _progress(self.is_main)

    # ---- setup ---------------------------------------------------------------------------------
    def stages(self) -> list[str]:
        s = ["eval:base"]
        if self.cfg.mode == "r1":
            s += ["sft", "eval:after_sft"]
        elif self.cfg.mode != "r1-zero":
            raise ValueError(f"mode expected 'r1' or 'r1-zero', got {self.cfg.mode!r}")
        s += ["grpo", "eval:after_grpo"]
        if self.cfg.rs_prompts > 0:
            s.append("rejection_sampling")
        return s

    def setup_model(self):
        cfg = self.cfg
        path = cfg.model
        if not path:
            path = os.path.join(cfg.out_dir, "base_model")
            # the settings it was built with: a base model left in out_dir by a run with another
            # seed or shape is rebuilt, not silently reused
            spec = dict(hidden_size=cfg.tiny_hidden, num_layers=cfg.tiny_layers,
                        num_heads=cfg.tiny_heads, intermediate_size=cfg.tiny_intermediate,
                        max_positions=256, seed=cfg.seed)
            marker = os.path.join(path, "r1k_tiny_model.json")
            if self.is_main and _read_json(marker) != spec:
                if os.path.exists(os.path.join(path, "config.json")):
                    print(f"[r1-train] {path} was built with other settings: rebuilding it",
                          file=sys.stderr, flush=True)
                build_tiny_model(path, **spec)
                with open(marker, "w", encoding="utf-8") as f:
                    json.dump(spec, f)
            self.barrier()
        model, tok = load_model(path, device=self.device, dtype=cfg.dtype,
                                attn_implementation=cfg.attn_implementation or None,
                                moe_kernels=cfg.moe_kernels)
        self.attach(model, tok)

    def attach(self, model, tok):
        """Use `model` (already on self.device) as the policy; wrap it for DDP when distributed."""
        cfg = self.cfg
        self.model, self.tok = model, tok
        if cfg.gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None) \
                or self.model.gradient_checkpointing_enable  # renamed in transformers 5.x
            enable()
            self.model.config.use_cache = False
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id
        if cfg.beta > 0:  # frozen reference policy (with LoRA this would be the adapters off)
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        body = Body(self.model)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            body = DDP(body, device_ids=ids)
        self.body = body

    def make_optimizer(self, lr: float):
        return torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.cfg.weight_decay,
                                 betas=(0.9, 0.99))

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ---- text <-> tokens -----------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        bos = self.tok.bos_token_id
        return ([bos] if bos is not None else []) + ids

    def decode(self, tokens: torch.Tensor, length: int) -> str:
        ids = tokens[:length].tolist()
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.tok.decode(ids, skip_special_tokens=False)

    # ---- batches for the update: right-padded, bucketed by length ------------------------------
    def micro_batches(self, rows: list[tuple[list[int], int]]):
        """rows: (token ids, prompt length). Yields (ids, attn, labels, mask, index) micro-batches
        of rows of similar length, at most `micro_batch_tokens` padded tokens each."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        batch: list[int] = []
        groups = []
        for i in order:
            longest = len(rows[i][0])
            if batch and (len(batch) + 1) * longest > self.cfg.micro_batch_tokens:
                groups.append(batch)
                batch = []
            batch.append(i)
        if batch:
            groups.append(batch)
        for g in groups:
            L = max(len(rows[i][0]) for i in g)
            ids = torch.full((len(g), L), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(g), L), dtype=torch.long)
            mask = torch.zeros((len(g), L - 1), dtype=torch.bool)
            for j, i in enumerate(g):
                seq, n_prompt = rows[i]
                ids[j, :len(seq)] = torch.tensor(seq)
                attn[j, :len(seq)] = 1
                mask[j, n_prompt - 1:len(seq) - 1] = True  # position t predicts token t + 1
            labels = ids[:, 1:].clone()
            yield (ids.to(self.device), attn.to(self.device), labels.to(self.device),
                   mask.to(self.device), torch.tensor(g, device=self.device))

    def hidden(self, ids, attn):
        """Last hidden states at positions 0..L-2 (each predicts the next token)."""
        return self.body(ids, attn)[:, :-1]

    def backward_and_step(self, opt, micro, loss_of) -> tuple[float, float]:
        """Accumulate over micro-batches (gradients synced on the last), clip, step."""
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            if self.world > 1 and not last:
                with self.body.no_sync():
                    loss = loss_of(mb)
                    loss.backward()
            else:
                loss = loss_of(mb)
                loss.backward()
            total += float(loss.detach())
        if not micro and self.world > 1:  # keep collectives matched: a zero contribution
            loss = self.body(*self._dummy_batch()).sum() * 0.0
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        opt.step()
        return total, float(gnorm)

    def _dummy_batch(self):
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
        return ids, torch.ones_like(ids)

    # ---- stages --------------------------------------------------------------------------------
    def sft_pairs(self) -> list[tuple[str, str]]:
        """(prompt, completion) of the SFT set: sft_data's lines, else generated examples."""
        cfg = self.cfg
        if cfg.sft_data:
            with open(cfg.sft_data, encoding="utf-8") as f:
                data = [json.loads(line) for line in f if line.strip()]
            if not data:
                raise ValueError(f"sft_data {cfg.sft_data!r} has no examples (an empty file, or "
                                 "one of blank lines): SFT would train on nothing")
            return [(d["prompt"], tasks_mod.sft_target(d)) for d in data]
        exs = self.task.examples(range(cfg.sft_examples))
        return [(e.prompt, tasks_mod.completion_text(e)) for e in exs]

    def sft_rows(self) -> list[tuple[list[int], int]]:
        rows = []
        for prompt, completion in self.sft_pairs():
            p = self.encode_prompt(prompt)
            c = self.tok(completion, add_special_tokens=False)["input_ids"] + [self.eos_id]
            rows.append((p + c, len(p)))
        return rows

    def run_sft(self, opt, pbar_factory):
        cfg = self.cfg
        rows = self.sft_rows()
        per_epoch = math.ceil(len(rows) / cfg.sft_batch_size)
        total = cfg.sft_epochs * per_epoch
        bar = pbar_factory(total, "sft", self.state["step"])
        while self.state["step"] < total:
            step = self.state["step"]
            epoch, k = divmod(step, per_epoch)
            order = list(range(len(rows)))
            random.Random(derived_seed(cfg.seed, "sft-order", epoch)).shuffle(order)
            batch = order[k * cfg.sft_batch_size:(k + 1) * cfg.sft_batch_size]
            mine = [rows[i] for i in batch[self.rank::self.world]]
            n_tok = sum(len(r[0]) - r[1] for r in mine)
            n_all = self.all_sum([n_tok])[0] / self.world  # DDP averages: scale to a global mean
            micro = list(self.micro_batches(mine))
            w, b = lm_head_of(self.model)

            def loss_of(mb):
                ids, attn, labels, mask, _ = mb
                return sft_loss(self.hidden(ids, attn), w, b, labels, mask, n_all)

            loss, gnorm = self.backward_and_step(opt, micro, loss_of)
            loss = self.all_sum([loss])[0] / self.world
            self.state["step"] += 1
            self.log({"stage": "sft", "step": self.state["step"], "loss": loss, "grad_norm": gnorm})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.after_step(opt, total):
                bar.close()
                return False
        bar.close()
        return True

    def rollout_and_score(self, examples, *, group_size, temperature, generator):
        cfg = self.cfg
        prompts = [self.encode_prompt(e.prompt) for e in examples]
        roll = generate(self.model, prompts, group_size=group_size,
                        max_new_tokens=cfg.max_new_tokens, eos_id=self.eos_id, pad_id=self.pad_id,
                        temperature=temperature, top_p=cfg.top_p, generator=generator)
        lengths = roll.lengths.tolist()
        tokens = roll.tokens.cpu()  # one device-to-host copy for the whole rollout
        texts = [self.decode(tokens[i], lengths[i]) for i in range(len(lengths))]
        scores = [self.reward_fn(t, examples[i // group_size]) for i, t in enumerate(texts)]
        return roll, prompts, texts, lengths, scores

    def update(self, opt, prompts, tokens, lengths, rewards, G):
        """One GRPO optimizer step on a rollout: group advantages, bucketed micro-batches,
        policy_loss on hidden states (r1kernels), gradients averaged over processes."""
        cfg = self.cfg
        adv = r1kernels.group_advantages(rewards, G)
        tokens = tokens.cpu()
        rows = []
        for i in range(len(lengths)):
            p = prompts[i // G]
            rows.append((p + tokens[i, :lengths[i]].tolist(), len(p)))
        n_tok = sum(lengths)
        n_all = self.all_sum([n_tok])[0] / self.world
        micro = list(self.micro_batches(rows))
        w, b = lm_head_of(self.model)
        extra = {"kl": 0.0, "clip_ratio": 0.0}

        def loss_of(mb):
            ids, attn, labels, mask, index = mb
            ref = None
            if self.ref_model is not None:
                with torch.no_grad():
                    h_ref = decoder_of(self.ref_model)(input_ids=ids, attention_mask=attn,
                                                       use_cache=False).last_hidden_state[:, :-1]
                    rw, rb = lm_head_of(self.ref_model)
                    # only the completion tokens' log-probs are used: the others are labelled
                    # -100, so they skip the lm_head (r1kernels.linear_token_logprobs)
                    ref = token_logprobs_from_hidden(h_ref, rw, rb, labels.masked_fill(~mask, -100))
            loss, metrics = policy_loss(
                self.hidden(ids, attn), w, b, labels, mask, adv[index], ref_logps=ref,
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
        return loss, gnorm, extra

    def grpo_step(self, opt) -> dict:
        cfg = self.cfg
        step, G, P = self.state["step"], cfg.group_size, cfg.prompts_per_step
        t0 = time.perf_counter()
        first = GRPO_SEED_BASE + (step * self.world + self.rank) * P
        examples = self.task.examples(range(first, first + P))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derived_seed(cfg.seed, "grpo-sample", step, self.rank))
        roll, prompts, texts, lengths, scores = self.rollout_and_score(
            examples, group_size=G, temperature=cfg.temperature, generator=gen)
        t_gen = time.perf_counter() - t0
        rewards = torch.tensor([s[0] for s in scores], dtype=torch.float32, device=self.device)
        # groups whose rewards differ: the others have advantage 0 and teach nothing
        signal = float((rewards.view(-1, G).amax(1) > rewards.view(-1, G).amin(1)).sum())
        loss, gnorm, extra = self.update(opt, prompts, roll.tokens, lengths, rewards, G)
        acc = [s[1].get("accuracy", 0.0) for s in scores]
        fmt = [s[1].get("format", 0.0) for s in scores]
        n_tok = sum(lengths)
        sums = self.all_sum([float(rewards.sum()), sum(acc), sum(fmt), float(n_tok), len(acc),
                             loss, extra["kl"], extra["clip_ratio"], signal])
        n = sums[4]
        return {"stage": "grpo", "step": step + 1, "reward": sums[0] / n, "accuracy": sums[1] / n,
                "format": sums[2] / n, "completion_len": sums[3] / n, "loss": sums[5] / self.world,
                "kl": sums[6] / self.world, "clip_ratio": sums[7] / self.world, "grad_norm": gnorm,
                "groups_with_signal": int(sums[8]), "gen_tokens_per_s": n_tok / max(t_gen, 1e-9),
                "step_seconds": time.perf_counter() - t0, **({"entropy": extra["entropy"]}
                                                             if "entropy" in extra else {})}

    def run_grpo(self, opt, pbar_factory):
        cfg = self.cfg
        bar = pbar_factory(cfg.grpo_steps, "grpo", self.state["step"])
        while self.state["step"] < cfg.grpo_steps:
            m = self.grpo_step(opt)
            self.state["step"] += 1
            self.log(m)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}",
                            len=f"{m['completion_len']:.0f}")
            if cfg.eval_every and self.state["step"] % cfg.eval_every == 0 \
                    and self.state["step"] < cfg.grpo_steps:
                acc = self.evaluate()
                self.log({"stage": "eval", "step": self.state["step"], "eval_accuracy": acc})
            if self.after_step(opt, cfg.grpo_steps):
                bar.close()
                return False
        bar.close()
        grpo = [r for r in self.state["history"] if r.get("stage") == "grpo"]
        if self.is_main and grpo and not any(r["groups_with_signal"] for r in grpo):
            print(f"[r1-train] warning: in all {len(grpo)} GRPO steps every group's "
                  f"{cfg.group_size} completions had the same reward (mean "
                  f"{sum(r['reward'] for r in grpo) / len(grpo):.3f}): the advantages were 0 and "
                  "the policy did not learn (R1-Zero on a model that never gets a reward? try "
                  "mode r1, more steps, a larger group_size or an easier task)",
                  file=sys.stderr, flush=True)
        return True

    @torch.no_grad()
    def evaluate(self, desc: str = "eval") -> float:
        """Greedy accuracy on the held-out split (this rank's share, summed over ranks)."""
        cfg = self.cfg
        seeds = list(range(tasks_mod.EVAL_SEED_BASE, tasks_mod.EVAL_SEED_BASE + cfg.eval_examples))
        mine = seeds[self.rank::self.world]
        correct = 0.0
        bar = self.bars(len(mine), desc, 0, leave=False)
        for i in range(0, len(mine), 100):
            exs = self.task.examples(mine[i:i + 100])
            _, _, texts, _, _ = self.rollout_and_score(exs, group_size=1, temperature=0.0,
                                                       generator=None)
            correct += sum(verify(t, e) for t, e in zip(texts, exs))
            bar.update(len(exs))
        bar.close()
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
        if self.is_main and n == 0:
            print(f"[r1-train] warning: rejection sampling kept 0 of {cfg.rs_prompts} prompts x "
                  f"{cfg.rs_samples} samples (none verified correct): {out} is empty",
                  file=sys.stderr, flush=True)
        return out, n

    # ---- bookkeeping ---------------------------------------------------------------------------
    def log(self, row: dict):
        self.state["history"].append(row)
        if self.is_main:
            with open(os.path.join(self.cfg.out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def after_step(self, opt, total: int) -> bool:
        """Checkpoint when due; True if a Ctrl-C asked to stop (checkpoint already written)."""
        stop = self.all_sum([1.0 if self.stop_requested else 0.0])[0] > 0
        step = self.state["step"]
        if stop or (self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0
                    and step < total):
            self.save_checkpoint(opt)
        return stop

    def save_checkpoint(self, opt):
        """Atomic: write to a temporary file, then rename over the previous checkpoint."""
        if not self.is_main:
            return
        state = dict(self.state, elapsed=self.state["elapsed"] + time.perf_counter() - self.t_start)
        payload = {"model": self.model.state_dict(),
                   "optimizer": opt.state_dict() if opt is not None else None,
                   "state": state, "config": asdict(self.cfg),
                   # the KL reference: the weights at the start of GRPO, not those of the cut
                   "ref_model": None if self.ref_model is None else self.ref_model.state_dict()}
        tmp = self.ckpt_path + ".tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.ckpt_path)

    def load_checkpoint(self):
        payload = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(payload["model"])
        self.state = payload["state"]
        if self.ref_model is not None:  # (a checkpoint of a run without beta has none)
            ref = payload.get("ref_model")
            self.ref_model.load_state_dict(ref if ref is not None else payload["model"])
        if self.is_main:  # metrics.jsonl holds exactly the history of the checkpoint
            with open(os.path.join(self.cfg.out_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.state["history"])
        return payload["optimizer"]

    @torch.no_grad()
    def replicas_in_sync(self) -> bool:
        """True iff every process holds bit-identical weights (per-tensor checksums agree)."""
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()]
                           + [p.detach().double().abs().sum() for p in self.model.parameters()])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    def write_outputs(self):
        cfg = self.cfg
        ev = self.state["evals"]
        summary = {
            "eval": {"base": ev.get("base"), "after_sft": ev.get("after_sft"),
                     "after_grpo": ev.get("after_grpo")},
            "wall_seconds": self.state["elapsed"] + time.perf_counter() - self.t_start,
            "task": cfg.task, "difficulty": cfg.difficulty, "mode": cfg.mode, "seed": cfg.seed,
            "world_size": self.world, "device": str(self.device),
            "model_parameters": sum(p.numel() for p in self.model.parameters()),
            "eval_examples": cfg.eval_examples, "grpo_steps": cfg.grpo_steps,
            "kernels": kernel_report(self.device),
        }
        for k, v in ev.items():
            if k not in summary["eval"]:
                summary["eval"][k] = v
        if "rejection_sampling" in self.state:
            summary["rejection_sampling"] = self.state["rejection_sampling"]
        if self.world > 1:
            summary["replicas_in_sync"] = self.replicas_in_sync()
        if not self.is_main:
            return summary
        self.model.save_pretrained(os.path.join(cfg.out_dir, "model"), safe_serialization=True)
        self.tok.save_pretrained(os.path.join(cfg.out_dir, "model"))
        tmp = os.path.join(cfg.out_dir, "summary.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(cfg.out_dir, "summary.json"))
        from r1train.plot import plot_metrics

        plot_metrics(self.state["history"], os.path.join(cfg.out_dir, "plot.png"), summary)
        return summary

    # ---- the pipeline --------------------------------------------------------------------------
    def run(self) -> dict | None:
        cfg = self.cfg
        self.t_start = time.perf_counter()
        torch.manual_seed(derived_seed(cfg.seed, "torch", self.rank))
        if self.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        self.barrier()
        self.setup_model()
        opt_state = None
        if cfg.resume and os.path.exists(self.ckpt_path):
            opt_state = self.load_checkpoint()
        elif self.is_main:
            open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w").close()
        stages = self.stages()
        if "sft" in stages[self.state["stage"]:] and cfg.sft_data:
            self.sft_pairs()  # a file with no examples fails now, not after the first evaluation
        pbar = self.bars
        prev = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        try:
            while self.state["stage"] < len(stages):
                name = stages[self.state["stage"]]
                done = True
                if name.startswith("eval:"):
                    key = name.split(":", 1)[1]
                    self.state["evals"][key] = self.evaluate(f"eval {key}")
                    if cfg.pass_k > 0:
                        self.state["evals"][f"{key}_pass@{cfg.pass_k}"] = self.pass_at_k(cfg.pass_k)
                    if self.is_main:
                        print(f"[r1-train] held-out accuracy {key}: "
                              f"{self.state['evals'][key]:.3f}", file=sys.stderr, flush=True)
                    opt = None
                elif name in ("sft", "grpo"):
                    lr = cfg.sft_lr if name == "sft" else cfg.lr
                    opt = self.make_optimizer(lr)
                    if opt_state is not None:
                        opt.load_state_dict(opt_state)
                        opt_state = None
                    if name == "grpo" and self.ref_model is not None and self.state["step"] == 0:
                        self.ref_model.load_state_dict(self.model.state_dict())
                    run = self.run_sft if name == "sft" else self.run_grpo
                    done = run(opt, pbar)
                    if done:
                        opt = None
                else:  # rejection sampling
                    path, n = self.rejection_sample()
                    self.state["rejection_sampling"] = {"path": path, "kept": n,
                                                        "prompts": cfg.rs_prompts,
                                                        "samples": cfg.rs_samples}
                    opt = None
                if not done:
                    if self.is_main:
                        print(f"[r1-train] interrupted: checkpoint saved to {self.ckpt_path}; "
                              f"continue with --resume true", file=sys.stderr, flush=True)
                    return None
                self.state["stage"] += 1
                self.state["step"] = 0
                self.save_checkpoint(opt)
                if self.all_sum([1.0 if self.stop_requested else 0.0])[0] > 0:
                    if self.is_main:  # Ctrl-C during an evaluation: stop at the stage boundary
                        print(f"[r1-train] interrupted: checkpoint saved to {self.ckpt_path}; "
                              f"continue with --resume true", file=sys.stderr, flush=True)
                    return None
            return self.write_outputs()
        finally:
            if prev is not None:
                signal.signal(signal.SIGINT, prev)

    def _on_sigint(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C stops immediately
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.is_main:
            print("\n[r1-train] Ctrl-C: finishing this step, then saving a checkpoint "
                  "(press again to abort)", file=sys.stderr, flush=True)


def kernel_report(device: torch.device) -> dict:
    """What moves a run's numbers besides the seed: the backend each r1kernels op ran on for
    this device, the SIMD copy of the C++ CPU kernels this CPU runs, torch's thread count."""
    from r1kernels import _custom_ops, dispatch

    simd = None
    if _custom_ops.EXT_ERROR is None:
        from r1kernels import _C

        simd = _C.cpu_simd_level()
    return {"backends": {op: dispatch.select(op, device) for op in sorted(dispatch.registered_ops())},
            "cpu_simd": simd, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "r1kernels": r1kernels.__version__}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    def factory(total: int, desc: str, initial: int, leave: bool = True):
        return tqdm(total=total, desc=desc, initial=initial, disable=not enabled,
                    dynamic_ncols=True, leave=leave)

    return factory


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
