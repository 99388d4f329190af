"""The stages around the GRPO loop and the pipeline that runs them in order.

DeepSeek-R1's recipe as stages (`--stages`, comma-separated, in this order):

    pretrain  the tiny default's base model: plain text of the task domain (for r1-zero)
    sft       cold-start SFT on worked examples in the R1 format (or `sft_data`)
    rl        reasoning RL: GRPO (the loop in train.py)
    rs        rejection sampling: verified-correct samples of the current model, as SFT data
    rs_sft    SFT of the *base* model on those samples and the cold-start set (rs runs first
              when it is not listed)
    rl2       the final RL stage, from the rs_sft model

The held-out evaluation runs on the base model (after pretrain) and after every training stage;
every stage ends with a checkpoint, and a resumed run continues inside the stage it stopped in.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time

import torch

from r1train import checkpoint as ckpt
from r1train import rewards as rewards_mod
from r1train import tasks as tasks_mod
from r1train.loss import sft_loss
from r1train.model import lm_head_of, load_model
from r1train.runtime import derived_seed

STAGES = ("pretrain", "sft", "rl", "rs", "rs_sft", "rl2")
EVAL_KEY = {"sft": "after_sft", "rl": "after_grpo", "rs_sft": "after_rs_sft", "rl2": "after_rl2"}
LOG_NAME = {"rl": "grpo"}  # the stage name in metrics.jsonl


class Stages:
    def stages(self) -> list[str]:
        """The run's steps: training stages and `eval:<key>` evaluations, in order."""
        cfg = self.cfg
        if cfg.mode not in ("r1", "r1-zero"):
            raise ValueError(f"mode expected 'r1' or 'r1-zero', got {cfg.mode!r}")
        if cfg.stages:
            names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
        elif cfg.mode == "r1":
            names = ["sft", "rl"] + (["rs"] if cfg.rs_prompts > 0 else [])
        else:  # R1-Zero starts from a base model: the tiny default is pretrained first
            names = ([] if cfg.model else ["pretrain"]) + ["rl"] \
                + (["rs"] if cfg.rs_prompts > 0 else [])
        bad = [n for n in names if n not in STAGES]
        if bad or not names:
            raise ValueError(f"stages: expected names from {list(STAGES)}, got {cfg.stages!r}")
        if "pretrain" in names[1:] or len(set(names)) != len(names):
            raise ValueError(f"stages: pretrain only first, each stage once; got {cfg.stages!r}")
        if cfg.mode == "r1-zero" and {"sft", "rs_sft"} & set(names):
            raise ValueError("stages: r1-zero is pure RL from the base model (no sft, rs_sft)")
        if "pretrain" in names and cfg.model:
            raise ValueError("stages: pretrain builds the tiny default's base model; with --model "
                             "the model given is the base model")
        out = []
        for n in names:
            if n == "rs_sft" and (not out or out[-1] != "rs"):
                out.append("rs")
            out.append(n)
            if n in EVAL_KEY:
                out.append(f"eval:{EVAL_KEY[n]}")
        at = 1 if names[0] == "pretrain" else 0
        return out[:at] + ["eval:base"] + out[at:]

    # ---- the language-model stages: pretrain, sft, rs_sft ------------------------------------
    def lm_rows(self, name: str) -> list[tuple[list[int], int]]:
        """(token ids, tokens not trained on) of a stage's training set."""
        cfg = self.cfg
        if name == "pretrain":  # plain documents: every token is trained on
            tpl = self.prompt_template()
            seeds = range(tasks_mod.PRETRAIN_SEED_BASE, tasks_mod.PRETRAIN_SEED_BASE
                          + cfg.pretrain_docs)
            docs = [tasks_mod.pretrain_text(self.task, s, tpl, cfg.pretrain_format_share)
                    for s in seeds]
            bos = [] if self.tok.bos_token_id is None else [self.tok.bos_token_id]
            return [(bos + self.encode_text(d) + [self.eos_id], 1) for d in docs]
        pairs = []
        if name == "rs_sft":  # the verified samples, plus the cold-start set below (the paper
            # mixes its rejection-sampled traces with other SFT data)
            with open(self.state["rejection_sampling"]["path"], encoding="utf-8") as f:
                pairs = [(d["prompt"], d["completion"]) for d in map(json.loads, f)]
        if cfg.sft_data:
            pairs += self.sft_data_pairs()
        elif isinstance(self.task, tasks_mod.DatasetTask):
            pairs += self.task.sft_pairs(cfg.sft_examples)
        else:
            exs = self.task.examples(range(cfg.sft_examples))
            pairs += [(e.prompt, tasks_mod.completion_text(e)) for e in exs]
        rows = []
        for (prompt, completion), p in zip(pairs, self.encode_prompts([q for q, _ in pairs])):
            c = self.encode_text(completion) + [self.eos_id]
            rows.append((p + c, len(p)))
        return rows

    def sft_data_pairs(self) -> list[tuple[str, str]]:
        """(prompt, completion) of the sft_data file; a file with no examples is a ValueError."""
        cfg = self.cfg
        with open(cfg.sft_data, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
        if not data:
            raise ValueError(f"sft_data {cfg.sft_data!r} has no examples (an empty file, or one "
                             "of blank lines): SFT would train on nothing")
        return [(d["prompt"], tasks_mod.sft_target(d)) for d in data]

    def run_lm(self, opt, pbar_factory, name: str) -> bool:
        """Masked next-token SFT over the stage's rows for `epochs` passes (False if stopped)."""
        cfg = self.cfg
        rows = self.lm_rows(name)
        if not rows:
            raise ValueError(f"stage {name}: no training rows")
        epochs = cfg.pretrain_epochs if name == "pretrain" else cfg.sft_epochs
        per_epoch = math.ceil(len(rows) / cfg.sft_batch_size)
        total = epochs * per_epoch
        bar = pbar_factory(total, name, self.state["step"])
        while self.state["step"] < total:
            step = self.state["step"]
            epoch, k = divmod(step, per_epoch)
            order = list(range(len(rows)))
            random.Random(derived_seed(cfg.seed, f"{name}-order", epoch)).shuffle(order)
            batch = order[k * cfg.sft_batch_size:(k + 1) * cfg.sft_batch_size]
            mine = [rows[i] for i in batch[self.rank::self.world]]
            n_tok = sum(len(r[0]) - r[1] for r in mine)
            n_all = self.all_sum([n_tok])[0] / self.grad_divide  # gradients: a global mean
            micro = list(self.micro_batches(mine))
            w, b = lm_head_of(self.model)

            def loss_of(mb):
                ids, attn, labels, mask, _ = mb
                return sft_loss(self.hidden(ids, attn), w, b, labels, mask, n_all)

            loss, gnorm = self.backward_and_step(opt, micro, loss_of)
            loss = self.all_sum([loss])[0] / self.grad_divide
            self.state["step"] += 1
            self.log({"stage": name, "step": self.state["step"], "loss": loss, "grad_norm": gnorm})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.after_step(opt, total):
                bar.close()
                return False
        bar.close()
        return True

    def restart_from_base(self):
        """rs_sft starts again from the base model (as DeepSeek-R1 does), not the RL policy."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict)

        base, _ = load_model(self.state.get("base_path") or self.model_path, device=self.device,
                             dtype=self.cfg.dtype, moe_kernels=self.cfg.moe_kernels)
        # the whole weights, into each rank's shards under FSDP2
        set_model_state_dict(self.model, base.state_dict(),
                             options=StateDictOptions(full_state_dict=True))

    def full_state_dict(self):
        """Under FSDP2 the whole weights gathered to CPU (a collective, every rank calls it);
        None otherwise (save_pretrained then reads the model's own)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))

    def save_base(self):
        """After pretrain: the base model as a model directory (rs_sft restarts from it)."""
        path = os.path.join(self.cfg.out_dir, "pretrained_base")
        full = self.full_state_dict()
        if self.is_main:
            self.model.save_pretrained(path, safe_serialization=True, state_dict=full)
            self.tok.save_pretrained(path)
        self.barrier()
        self.state["base_path"] = path

    # ---- outputs -------------------------------------------------------------------------------
    def write_outputs(self):
        cfg = self.cfg
        table = self.state["stage_table"]
        keys = ["base", "after_sft", "after_grpo"] + [k for k in table if k not in
                                                       ("base", "after_sft", "after_grpo")]
        summary = {
            "eval": {k: table[k]["accuracy"] if k in table else None for k in keys},
            "eval_format": {k: table[k]["format"] if k in table else None for k in keys},
            "stages": table,
            "wall_seconds": self.state["elapsed"] + time.perf_counter() - self.t_start,
            "task": cfg.task, "difficulty": cfg.difficulty, "mode": cfg.mode, "seed": cfg.seed,
            "world_size": self.world, "device": str(self.device),
            "model_parameters": sum(p.numel() for p in self.model.parameters()),
            "eval_examples": cfg.eval_examples, "grpo_steps": cfg.grpo_steps,
            "stage_seconds": self.state["stage_seconds"],
            "kernels": kernel_report(self.device),
            "verifier": rewards_mod.verifier_report(),
        }
        if "rejection_sampling" in self.state:
            summary["rejection_sampling"] = self.state["rejection_sampling"]
        full = self.full_state_dict()
        if self.world > 1 and not self.fsdp:
            summary["replicas_in_sync"] = self.replicas_in_sync()
        if not self.is_main:
            return summary
        self.model.save_pretrained(os.path.join(cfg.out_dir, "model"), safe_serialization=True,
                                   state_dict=full)
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
        stages = self.stages()  # a bad --stages fails before any work
        if self.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        self.barrier()
        self.setup_model()
        opt_state = None
        if cfg.resume:  # (no checkpoint, or one of a run with other settings: ValueError)
            opt_state = self.load_checkpoint()
        elif self.is_main:
            open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w").close()
        if cfg.sft_data and any(s in ("sft", "rs_sft") for s in stages[self.state["stage"]:]):
            self.sft_data_pairs()  # a file with no examples fails now, not after an evaluation
        pbar = self.bars = _progress(self.is_main)
        prev = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        try:
            while self.state["stage"] < len(stages):
                name = stages[self.state["stage"]]
                t0 = time.perf_counter()
                done, opt = True, None
                if name.startswith("eval:"):
                    key = name.split(":", 1)[1]
                    m = self.state["stage_table"][key] = self.evaluate_stage()
                    if self.is_main:
                        print(f"[r1-train] held-out {key}: " + ", ".join(
                            f"{k} {v:.3f}" for k, v in m.items()), file=sys.stderr, flush=True)
                elif name == "rs":
                    path, n = self.rejection_sample()
                    self.state["rejection_sampling"] = {"path": path, "kept": n,
                                                        "prompts": self.rs_prompts(),
                                                        "samples": cfg.rs_samples}
                else:
                    self.current_stage = name
                    if name == "rs_sft" and self.state["step"] == 0:
                        self.restart_from_base()
                    opt = self.make_optimizer(cfg.lr if name in ("rl", "rl2") else cfg.sft_lr)
                    if opt_state is not None:
                        ckpt.load_optimizer(opt_state, self.model, opt)
                        opt_state = None
                    if name in ("rl", "rl2"):
                        if self.ref_model is not None and self.state["step"] == 0:
                            self.ref_model.load_state_dict(self.model.state_dict())
                        done = self.run_grpo(opt, pbar)
                    else:
                        done = self.run_lm(opt, pbar, name)
                    if done:
                        opt = None
                        if name == "pretrain":
                            self.save_base()
                if not done:
                    if self.is_main:
                        print(f"[r1-train] interrupted: checkpoint saved to {self.ckpt_path}; "
                              f"continue with --resume true", file=sys.stderr, flush=True)
                    return None
                secs = self.state["stage_seconds"]
                secs[name] = secs.get(name, 0.0) + time.perf_counter() - t0
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


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    def factory(total: int, desc: str, initial: int, leave: bool = True):
        return tqdm(total=total, desc=desc, initial=initial, disable=not enabled,
                    dynamic_ncols=True, leave=leave)

    return factory


def kernel_report(device: torch.device) -> dict:
    """What moves a run's numbers besides the seed: the backend each r1kernels op ran on for
    this device, the SIMD copy of the C++ CPU kernels this CPU runs, torch's thread count."""
    import r1kernels
    from r1kernels import _custom_ops, dispatch

    simd = None
    if _custom_ops.EXT_ERROR is None:
        from r1kernels import _C

        simd = _C.cpu_simd_level()
    return {"backends": {op: dispatch.select(op, device) for op in sorted(dispatch.registered_ops())},
            "cpu_simd": simd, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "r1kernels": r1kernels.__version__}
