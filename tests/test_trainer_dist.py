"""The trainer under torchrun: 2 CPU processes with the gloo backend (DDP, and FSDP2 with
`--fsdp true`), a GRPO update on 2 processes against 1, and kill -9 + resume (DCP checkpoints)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--tiny_hidden", "32", "--tiny_layers", "1", "--tiny_heads", "2",
        "--tiny_intermediate", "64", "--max_new_tokens", "24", "--eval_examples", "8"]


def _env(tmp_path):
    # a reward that varies within every group, so every GRPO step moves the weights
    (tmp_path / "len_reward.py").write_text("def length(completion, example):\n"
                                            "    return len(completion) / 100\n")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [REPO, str(tmp_path), os.environ.get("PYTHONPATH", "")]))


def _torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(n)]


def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = _torchrun(2) + [
        "-m", "r1train", "--out_dir", str(out), *TINY, "--sft_examples", "32", "--sft_epochs", "1",
        "--sft_batch_size", "16", "--grpo_steps", "3", "--prompts_per_step", "2",
        "--group_size", "4", "--rs_prompts", "4", "--rs_samples", "2", "--checkpoint_every", "0"]
    proc = subprocess.run(cmd, env=_env(tmp_path), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["replicas_in_sync"] is True  # DDP kept both processes' weights identical
    assert set(summary["eval"]) >= {"base", "after_sft", "after_grpo"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "grpo"] == [1, 2, 3]
    assert os.path.exists(summary["rejection_sampling"]["path"])
    # and training did move them
    final = load_file(str(out / "model" / "model.safetensors"))
    base = load_file(str(out / "base_model" / "model.safetensors"))
    assert any(not torch.equal(final[k], base[k]) for k in final)


# ---- FSDP2: 2 processes = 1 process with the same global batch ---------------------------------

UPDATE = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_intermediate=64, device="cpu",
              threads=1, max_new_tokens=12, micro_batch_tokens=40, lr=1e-3, beta=0.0)


def _rollout(world, rank, P=4, G=3):
    """A fixed global rollout (P prompts x G completions), this rank's share of the prompts."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(8, 60, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 6, (P,), generator=g)]
    tokens = torch.randint(8, 60, (P * G, 12), generator=g)
    lengths = torch.randint(1, 13, (P * G,), generator=g).tolist()
    rewards = torch.randn(P * G, generator=g)
    k = P // world
    rows = slice(rank * k * G, (rank + 1) * k * G)
    return prompts[rank * k:(rank + 1) * k], tokens[rows], lengths[rows], rewards[rows], G


def _updates(out_dir, world, rank, fsdp):
    """Two GRPO updates (r1train.train.Trainer.update) on the fixed rollout; returns the losses
    and (rank 0) the whole weights."""
    from r1train.config import Config
    from r1train.train import Trainer

    # (FSDP2 with per-layer activation checkpointing: recomputation changes no number)
    t = Trainer(Config(out_dir=out_dir, fsdp=fsdp, gradient_checkpointing=fsdp, **UPDATE))
    if t.is_main:
        os.makedirs(out_dir, exist_ok=True)
    t.barrier()
    t.setup_model()
    opt = t.make_optimizer(t.cfg.lr)
    prompts, tokens, lengths, rewards, G = _rollout(world, rank)
    losses = []
    for _ in range(2):
        loss, gnorm, _ = t.update(opt, prompts, tokens, lengths, rewards, G)
        losses.append((t.all_sum([loss])[0] / t.grad_divide, gnorm))
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    else:
        sd = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    return losses, sd


def test_fsdp_two_processes_equal_one(tmp_path):
    """The GRPO update under --fsdp on 2 processes (each half of the prompts, a different number
    of micro-batches, the tied lm_head sharded, activation checkpointing) gives the losses,
    gradient norms and weights of 1 process on the whole batch."""
    env = _env(tmp_path)
    cmd = _torchrun(2) + [os.path.abspath(__file__), "update", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=True)
    losses, sd = _updates(str(tmp_path / "one"), 1, 0, fsdp=False)
    assert losses[0][0] != 0 and losses[0][1] > 0  # a real update
    for (l2, g2), (l1, g1) in zip(two["losses"], losses):
        assert abs(l2 - l1) <= 1e-5 * max(1.0, abs(l1)) and abs(g2 - g1) <= 1e-4 * g1
    assert sd.keys() <= two["weights"].keys()
    base = load_file(str(tmp_path / "one" / "base_model" / "model.safetensors"))
    assert any(not torch.equal(sd[k], base[k]) for k in base)
    for k in sd:
        torch.testing.assert_close(two["weights"][k], sd[k], rtol=1e-4, atol=1e-6)


def test_fsdp_compiled_rollout(tmp_path):
    """--fsdp with --rollout_compile: the decode step compiles as one graph on the gathered model
    (FSDP's forward hooks lifted while it is unsharded; before, compiling failed and the rollout
    fell back to eager with a warning), once per shape, and the run equals the eager one: the
    same samples, rewards and weights; the sampling log-probs to float32 rounding."""
    env = dict(_env(tmp_path), TORCH_LOGS="recompiles")
    runs = {}
    for c in ("true", "false"):
        out = tmp_path / c
        cmd = _torchrun(2) + ["-m", "r1train", "--out_dir", str(out), *TINY, "--mode", "r1-zero",
                              "--stages", "rl", "--grpo_steps", "3", "--prompts_per_step", "2",
                              "--group_size", "4", "--checkpoint_every", "0", "--fsdp", "true",
                              "--rewards", '{"accuracy": 1.0, "len_reward:length": 1.0}',
                              "--rollout_compile", c]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "decoding eagerly" not in proc.stderr
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[c] = (rows, load_file(str(out / "model" / "model.safetensors")), proc.stderr)
    (rows_c, sd_c, err_c), (rows_e, sd_e, err_e) = runs["true"], runs["false"]
    # per rank: the evaluation's rows (4) and the rollouts' (8), one compile each, never again
    assert err_c.count("Recompiling function _step") == 2 and "_step" not in err_e
    assert [r["step"] for r in rows_c if r["stage"] == "grpo"] == [1, 2, 3]
    for a, b in zip(rows_c, rows_e, strict=True):
        close = {k for k in a if "second" in k or "per_s" in k or k.startswith("mismatch_")}
        assert {k: v for k, v in a.items() if k not in close} \
            == {k: v for k, v in b.items() if k not in close}
        if "mismatch_logp_abs" in a:  # (the compiled step's logits round differently)
            assert abs(a["mismatch_logp_abs"] - b["mismatch_logp_abs"]) < 1e-5
    assert sd_c.keys() == sd_e.keys() and all(torch.equal(sd_c[k], sd_e[k]) for k in sd_c)


# ---- kill -9 mid-GRPO, resume with the same and with another process count ---------------------

RUN = TINY + ["--mode", "r1-zero", "--stages", "rl", "--grpo_steps", "3", "--group_size", "4",
              "--rewards", '{"accuracy": 1.0, "len_reward:length": 1.0}', "--checkpoint_every", "1",
              "--eval_every", "0", "--fsdp", "true", "--beta", "0.05"]  # (a sharded KL reference)


def _grpo_rows(out):
    strip = ("step_seconds", "gen_seconds", "reward_seconds", "update_seconds", "gen_tokens_per_s")
    return [{k: v for k, v in json.loads(r).items() if k not in strip}
            for r in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(r)["stage"] == "grpo"]


def _pids_with_arg(arg: str) -> list[int]:
    """The processes with `arg` among their command-line arguments."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if arg.encode() in args and int(d) != os.getpid():
                pids.append(int(d))
    return pids


def test_fsdp_kill9_and_resume(tmp_path):
    env = _env(tmp_path)

    def run(n, out, *extra):
        launch = _torchrun(n) if n > 1 else [sys.executable]
        return launch + ["-m", "r1train", "--out_dir", str(out), *RUN, *extra]

    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = subprocess.run(run(2, full, "--prompts_per_step", "2"), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the same run, killed (SIGKILL, every process) once its second GRPO step is logged
    p = subprocess.Popen(run(2, cut, "--prompts_per_step", "2"), env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        m = cut / "metrics.jsonl"
        if m.exists() and sum(r["step"] >= 2 for r in _grpo_rows(m.parent)):
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    # the workers too (found by their --out_dir: one outside the process group would go on
    # writing the checkpoint while it is copied below); wait until every one is gone
    while time.time() < deadline:
        alive = _pids_with_arg(str(cut))
        if not alive:
            break
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    assert not (cut / "summary.json").exists()  # it did not finish
    state = json.loads((cut / "checkpoint" / "state.json").read_text())["state"]
    assert state["stage"] == 1 and state["step"] >= 1
    cut_m = tmp_path / "cut_m"
    shutil.copytree(cut, cut_m)
    # resume on 2 processes: bit-identical to the uninterrupted run
    proc = subprocess.run(run(2, cut, "--prompts_per_step", "2", "--resume", "true"), env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _grpo_rows(cut) == _grpo_rows(full)
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(cut / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resume on 1 process (DCP reshards the FSDP checkpoint): the run continues where it was cut
    # and ends with the uninterrupted run's metrics (each prompt samples from its own stream, so
    # the samples do not depend on the process count; sums in another order: fp32 rounding)
    proc = subprocess.run(run(1, cut_m, "--prompts_per_step", "4", "--resume", "true"), env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, ref_rows = _grpo_rows(cut_m), _grpo_rows(full)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[:state["step"]] == ref_rows[:state["step"]]
    for r, q in zip(rows, ref_rows):
        assert r.keys() == q.keys()
        for k in r:
            if isinstance(r[k], float):
                assert r[k] == pytest.approx(q[k], rel=1e-4, abs=1e-6), (r["step"], k, r[k], q[k])
            else:
                assert r[k] == q[k], (r["step"], k)
    assert json.loads((cut_m / "summary.json").read_text())["world_size"] == 1


def test_resume_checks_the_settings(tmp_path):
    """--resume with settings that change what the run computes is an error naming each one;
    the global batch (prompts_per_step x processes) is what counts."""
    from r1train.checkpoint import check_config

    meta = {"config": {"group_size": 4, "prompts_per_step": 2, "seed": 0, "threads": 1},
            "world_size": 2}
    check_config(meta, {"group_size": 4, "prompts_per_step": 4, "seed": 0, "threads": 2}, 1, "ck")
    with pytest.raises(ValueError, match=r"group_size=4 in the checkpoint, 2 now; seed=0 in the "
                                         r"checkpoint, 1 now"):
        check_config(meta, {"group_size": 2, "prompts_per_step": 2, "seed": 1}, 2, "ck")
    with pytest.raises(ValueError, match=r"prompts_per_step x processes = 2 x 2 = 4 in the "
                                         r"checkpoint, 2 x 1 = 2 now"):
        check_config(meta, {"group_size": 4, "prompts_per_step": 2, "seed": 0}, 1, "ck")


def test_resume_without_checkpoint_is_an_error(tmp_path):
    from r1train.config import Config
    from r1train.train import train

    with pytest.raises(ValueError, match="no checkpoint in"):
        train(Config(out_dir=str(tmp_path / "none"), resume=True, mode="r1-zero", grpo_steps=1,
                     eval_examples=2, **UPDATE))


if __name__ == "__main__":  # worker of test_fsdp_two_processes_equal_one, under torchrun
    import torch.distributed as dist

    out_dir = sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    losses, sd = _updates(out_dir, world, rank, fsdp=True)
    if rank == 0:
        torch.save({"losses": losses, "weights": sd}, os.path.join(out_dir, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()
