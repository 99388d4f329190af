"""The stages around the GRPO loop: the stage list of a mode, cold-start SFT, the pipeline that
runs the stages in order (checkpoint at every stage end, Ctrl-C, resume) and the outputs."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time

import torch

from r1train import tasks as tasks_mod
from r1train.loss import sft_loss
from r1train.model import lm_head_of
from r1train.runtime import derived_seed


class Stages:
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


    def sft_rows(self) -> list[tuple[list[int], int]]:
        cfg = self.cfg
        if cfg.sft_data:
            with open(cfg.sft_data, encoding="utf-8") as f:
                data = [json.loads(line) for line in f if line.strip()]
            pairs = [(d["prompt"], tasks_mod.sft_target(d)) for d in data]
        else:
            exs = self.task.examples(range(cfg.sft_examples))
            pairs = [(e.prompt, tasks_mod.completion_text(e)) for e in exs]
        rows = []
        for prompt, completion in pairs:
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
        pbar = _progress(self.is_main)
        prev = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        try:
            while self.state["stage"] < len(stages):
                name = stages[self.state["stage"]]
                done = True
                if name.startswith("eval:"):
                    key = name.split(":", 1)[1]
                    self.state["evals"][key] = self.evaluate()
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


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    def factory(total: int, desc: str, initial: int):
        return tqdm(total=total, desc=desc, initial=initial, disable=not enabled,
                    dynamic_ncols=True, leave=True)

    return factory
