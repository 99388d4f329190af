"""Checkpoints: the model, the optimizer and the KL reference through torch.distributed.checkpoint
(DCP), the run's progress (stage, step, evaluations, metric history) and configuration as JSON.
Nothing is unpickled on resume. `Checkpointing` is the trainer's side of it (beside the GRPO loop):
the metrics log, checkpoints when due, exact resume inside the stage a run stopped in.

Layout: `out_dir/checkpoint/` holds DCP's files (each rank writes its own shards: FSDP2's DTensor
shards, or one copy of DDP's replicated tensors) and `state.json` (run state, config, world
size). One process writes and reads it without a process group; a checkpoint written by N
processes resumes on M (DCP reshards: FSDP2 <-> FSDP2 with another N, DDP or one process <->
FSDP2). Atomic: written to `checkpoint.tmp/`, then renamed over the previous one (which stays as
`checkpoint.old/` until the rename is done, and is read if the process died in between).

`--resume true` continues the run the checkpoint belongs to: no checkpoint, or a configuration
that changes what the run computes, is an error naming the difference (`check_config`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist

DIR = "checkpoint"
# fields that may change on --resume: where and how the run executes, not what it computes
# (grpo_steps / rl2_steps / eval_every: a run may be extended, evaluated more or less often)
MAY_DIFFER = frozenset({"out_dir", "resume", "device", "threads", "checkpoint_every", "fsdp",
                        "gradient_checkpointing", "micro_batch_tokens", "attn_implementation",
                        "grpo_steps", "rl2_steps", "eval_every"})


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier():
    if _dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


@contextlib.contextmanager
def _quiet():
    """DCP warns that it works in one process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def find(out_dir: str) -> str | None:
    """The checkpoint directory in out_dir (the previous one if a save died mid-rename)."""
    for name in (DIR, DIR + ".old"):
        path = os.path.join(out_dir, name)
        if os.path.exists(os.path.join(path, "state.json")):
            return path
    return None


def save(out_dir: str, *, model, opt, ref_model, state: dict, config: dict, world: int) -> str:
    """Every rank calls this (collective under a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    path = os.path.join(out_dir, DIR)
    tmp, old = path + ".tmp", path + ".old"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    sd = {"model": get_model_state_dict(model)}
    if opt is not None:
        sd["optimizer"] = get_optimizer_state_dict(model, opt)
    if ref_model is not None:  # the KL reference: the weights at the start of GRPO
        sd["ref_model"] = get_model_state_dict(ref_model)
    with _quiet():
        dcp.save(sd, checkpoint_id=tmp)
    if _rank() == 0:
        meta = {"state": state, "config": config, "world_size": world,
                "has_optimizer": opt is not None, "has_ref_model": ref_model is not None}
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def check_config(meta: dict, config: dict, world: int, path: str) -> None:
    """ValueError naming every field whose value would make this run compute something else
    than the run that wrote the checkpoint. prompts_per_step is per process: the global batch
    (prompts_per_step x processes) must match."""
    saved = meta["config"]
    diffs = []
    for k in sorted(set(saved) | set(config)):
        if k in MAY_DIFFER or k == "prompts_per_step":
            continue
        if saved.get(k) != config.get(k):
            diffs.append(f"{k}={saved.get(k)!r} in the checkpoint, {config.get(k)!r} now")
    before = saved.get("prompts_per_step", 0) * meta["world_size"]
    now = config.get("prompts_per_step", 0) * world
    if before != now:
        diffs.append(f"prompts_per_step x processes = {saved.get('prompts_per_step')} x "
                     f"{meta['world_size']} = {before} in the checkpoint, "
                     f"{config.get('prompts_per_step')} x {world} = {now} now")
    if diffs:
        raise ValueError(f"--resume true: the checkpoint {path} belongs to a run with other "
                         f"settings: " + "; ".join(diffs) + ". Resume with the same settings, "
                         "or start a new run in another out_dir.")


def load_model(path: str, model, ref_model=None) -> None:
    """The weights (and the KL reference's, or the weights themselves when the checkpoint has
    none) into the (possibly sharded) modules."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    meta = read_meta(path)
    sd = {"model": get_model_state_dict(model)}
    with _quiet():
        dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    if ref_model is not None:
        key = "ref_model" if meta["has_ref_model"] else "model"
        rsd = {key: get_model_state_dict(ref_model)}
        with _quiet():
            dcp.load(rsd, checkpoint_id=path)
        set_model_state_dict(ref_model, rsd[key])


def load_optimizer(path: str, model, opt) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    sd = {"optimizer": get_optimizer_state_dict(model, opt)}
    with _quiet():
        dcp.load(sd, checkpoint_id=path)
    set_optimizer_state_dict(model, opt, sd["optimizer"])


class Checkpointing:
    """The trainer's side: the metrics log, checkpoints of the run (weights, optimizer and KL
    reference through the functions above; stage/step, evaluations, history in state.json),
    exact resume, and the replicas' checksum test."""

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
        """Every rank (a collective under a process group): DCP shards + state.json, atomic."""
        state = dict(self.state, elapsed=self.state["elapsed"] + time.perf_counter() - self.t_start)
        save(self.cfg.out_dir, model=self.model, opt=opt, ref_model=self.ref_model, state=state,
             config=asdict(self.cfg), world=self.world)

    def load_checkpoint(self):
        """The run's weights and state; returns the checkpoint's path when it holds an
        optimizer (loaded once the stage's optimizer exists, `load_optimizer`), else None."""
        path = find(self.cfg.out_dir)
        if path is None:
            raise ValueError(f"--resume true: no checkpoint in {self.cfg.out_dir} (expected "
                             f"{self.ckpt_path}/state.json); start without --resume")
        meta = read_meta(path)
        check_config(meta, asdict(self.cfg), self.world, path)
        load_model(path, self.model, self.ref_model)
        self.state = meta["state"]
        if self.is_main:  # metrics.jsonl holds exactly the history of the checkpoint
            with open(os.path.join(self.cfg.out_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.state["history"])
        return path if meta["has_optimizer"] else None

    @torch.no_grad()
    def replicas_in_sync(self) -> bool:
        """True iff every process holds bit-identical weights (per-tensor checksums agree)."""
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()]
                           + [p.detach().double().abs().sum() for p in self.model.parameters()])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))
