"""Checkpointing beside the GRPO loop: the metrics log, atomic checkpoints (weights, optimizer,
stage/step, evaluations, history, KL reference), exact resume, and the replicas' checksum test."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist


class Checkpointing:
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
