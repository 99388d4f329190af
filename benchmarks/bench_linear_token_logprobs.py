"""linear_token_logprobs (log-prob + entropy from hidden states and the lm_head): forward and
forward+backward, every provider, with peak extra memory (CUDA).

FLOPs counted: 2 * N * H * V forward, 6 * N * H * V forward+backward (the useful GEMMs; ours runs
8 * N * H * V: pass 2 recomputes the logits tile by tile, see ops/linear_token_logprobs.py).
Targets on an H100, N=16384, H=4096, V=151936, bf16, forward+backward: <= 95 ms with <= 2.5 GiB
peak extra memory including the gradients (the 6NHV GEMMs alone: 78-82 ms).

Providers: ours (each backend available here, and on CUDA the opt-in fused tl.dot kernels as
r1k-triton-fused), eager (materialized bf16 logits, fp32
log_softmax + gather + entropy), torch.compile of the reference, and when installed
Liger-Kernel's fused linear cross entropy, TRL's chunked log-prob head (trl.kernels) and
cut-cross-entropy.
"""
import contextlib
import sys
import types

import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.ops import linear_token_logprobs as lin
from r1kernels.ops import token_logprobs as tlp
from r1kernels.reference import linear_token_logprobs_ref
from shapes import DEVICE, shape_id, shapes_for

OP = "linear_token_logprobs"
SHAPES = shapes_for(OP, DEVICE)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
OURS = [b for b in dispatch.available_backends(OP, DEVICE) if not (b == "triton" and DEVICE == "cpu")]
# r1k-triton-fused: the opt-in fused tl.dot kernels (linear_token_logprobs.FUSED_GEMM), CUDA only
FUSED = ["r1k-triton-fused"] if DEVICE == "cuda" and "triton" in OURS else []
# r1k-fwd_bwd: the default path (on sm_90 with the CUDA build, the thread-block-cluster kernel of
# csrc/token_logprobs/fused_logits_cluster.cu on the single sweep's fp32 logits chunks,
# R1K_FUSED_CLUSTER); r1k-fwd_bwd-no-cluster: with it off, measured only where the default takes it
PROVIDERS = [f"r1k-{b}" for b in OURS] + FUSED + ["r1k-fwd_bwd", "r1k-fwd_bwd-no-cluster", "eager",
                                                  "compiled-ref", "liger", "trl", "cce"]


def eager_linear_logprobs_entropy(h, w, labels):
    logits = h @ w.t()
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def _trl_chunked():
    pytest.importorskip("trl")
    stub_t = types.ModuleType("trl.trainer")
    stub_u = types.ModuleType("trl.trainer.utils")
    stub_u.maybe_gather_lm_head_ctx = lambda *a: contextlib.nullcontext()
    stub_t.utils = stub_u
    sys.modules.setdefault("trl.trainer", stub_t)
    sys.modules.setdefault("trl.trainer.utils", stub_u)
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available here
        pytest.skip(f"trl.kernels.chunked_logprob not importable: {exc!r}")
    return ChunkedLogProbFunction


def make_fn(provider, labels, mode):
    """callable(h, w) -> (logp or a scalar loss, entropy or None) for one provider."""
    if provider.startswith("r1k-"):
        backend = provider[4:].replace("-fused", "")
        fused = provider.endswith("-fused")

        def fn(h, w):
            lin.FUSED_GEMM = fused
            try:
                with dispatch.use_backend(backend):
                    return r1kernels.linear_token_logprobs(h, w, labels, with_entropy=True)
            finally:
                lin.FUSED_GEMM = False
        return fn
    if provider == "eager":
        return lambda h, w: eager_linear_logprobs_entropy(h, w, labels)
    if provider == "compiled-ref":
        compiled = torch.compile(linear_token_logprobs_ref)
        return lambda h, w: compiled(h, w, labels, with_entropy=True)
    if provider == "trl":  # Triton on CUDA, torch ops on CPU
        fn = _trl_chunked()
        # (hidden, weight, bias, labels, temperature, chunk_size, ..., outputs), as in shared/anchors
        return lambda h, w: tuple(fn.apply(h, w, None, labels, 1.0, 32768, None, 1.0,
                                           ("entropy",)))[:2]
    if DEVICE != "cuda":
        pytest.skip(f"{provider}'s kernels need CUDA")
    if provider == "liger":
        pytest.importorskip("liger_kernel")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        # Liger computes its gradients in the forward pass for a scalar loss: forward+backward is
        # timed on -sum(logp) (reduction="sum"), the forward on per-token values
        reduction = "none" if mode == "fwd" else "sum"
        return lambda h, w: (-liger_fused_linear_cross_entropy(h, w, labels, reduction=reduction),
                             None)
    if provider == "cce":
        pytest.importorskip("cut_cross_entropy")
        from cut_cross_entropy import linear_cross_entropy
        return lambda h, w: (-linear_cross_entropy(h, w, labels, reduction="none"), None)
    raise ValueError(provider)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_token_logprobs(benchmark, bench, monkeypatch, provider, mode, shape):
    N, H, V = shape["N"], shape["H"], shape["V"]
    hidden = torch.randn(N, H, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(V, H, device=DEVICE, dtype=DTYPE) / H ** 0.5
    labels = torch.randint(0, V, (N,), device=DEVICE)
    w_lp = torch.randn(N, device=DEVICE)
    w_ent = torch.randn(N, device=DEVICE)
    if provider.startswith("r1k-fwd_bwd"):
        # the same loss with its upstream gradient (w_lp, w_ent) known up front: one sweep,
        # 6 N H V FLOPs (linear_token_logprobs_fwd_bwd)
        if mode == "fwd":
            pytest.skip("linear_token_logprobs_fwd_bwd is forward+backward")
        if provider.endswith("no-cluster"):
            z = torch.empty(8, V, device=DEVICE)
            if DTYPE == torch.float32 or tlp.cluster_config(
                    z.unsqueeze(1), z.view(DTYPE)[:, :V].unsqueeze(1)) is None:
                pytest.skip("the default path takes no cluster kernel here (CUDA sm_90+ build only)")
            monkeypatch.setenv("R1K_FUSED_CLUSTER", "0")

        def fn():
            return r1kernels.linear_token_logprobs_fwd_bwd(hidden, weight, labels, w_lp,
                                                           grad_entropy=w_ent, with_entropy=True)[2:4]
        bench(benchmark, fn, op=f"{OP} {mode}", shape=shape, provider=provider,
              flops=6 * N * H * V, baseline="eager", rounds=5 if DEVICE == "cuda" else 3)
        return
    f = make_fn(provider, labels, mode)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return f(hidden, weight)
        flops = 2 * N * H * V
    else:
        def fn():
            h = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            logp, ent = f(h, w)
            loss = (logp.float() * w_lp).sum() if logp.dim() else logp.float()
            if ent is not None:
                loss = loss + (ent.float() * w_ent).sum()
            loss.backward()
            return h.grad, w.grad
        flops = 6 * N * H * V
    bench(benchmark, fn, op=f"{OP} {mode}", shape=shape, provider=provider, flops=flops,
          baseline="eager", rounds=5 if DEVICE == "cuda" else 3)


# ---- tensor-parallel vocabulary (process_group=): 2 processes, each half of the lm_head ----------

TP = 2


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_linear_token_logprobs_tensor_parallel(benchmark, shape):
    """forward+backward (logp and entropy, upstream gradients on both) with the vocabulary split
    over TP processes (CPU: gloo; CUDA: nccl, one GPU each), beside the single-process op timed
    in the same run by rank 0 while the others wait. Wire bytes are the payloads the op hands to
    torch.distributed per token (counted by wrapping its collectives), forward + backward."""
    import json
    import os
    import subprocess

    from conftest import _ROWS

    if DEVICE == "cuda" and torch.cuda.device_count() < TP:
        pytest.skip(f"the tensor-parallel case needs {TP} GPUs")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    here = os.path.abspath(__file__)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(TP), here, str(shape["N"]), str(shape["H"]), str(shape["V"])]
    proc = subprocess.run(cmd, env=env, cwd=os.path.dirname(here), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # (timed inside the processes; pytest-benchmark gets the figures, not a timing of its own)
    benchmark.extra_info.update(res)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    N, H, V = shape["N"], shape["H"], shape["V"]
    tag = f"r1k-tp{TP} {res['fwd_bytes']:.0f}+{res['bwd_bytes']:.0f}B/tok"
    for provider, t in (("r1k (1 process)", res["single_s"]), (tag, res["tp_s"])):
        _ROWS.append(dict(op=f"{OP} tp fwd+bwd", shape=shape_id(shape), provider=provider,
                          median_s=t, graph_s=None, peak_GiB=None, GBps=None,
                          TFLOPs=8 * N * H * V / t / 1e12, frac_copy=None, frac_matmul=None,
                          baseline="r1k (1 process)"))


def _tp_worker(N, H, V, rounds=5):
    import json
    import statistics
    import time

    import torch.distributed as dist

    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    dev = torch.device(DEVICE, rank) if DEVICE == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dev, DTYPE)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dev, DTYPE)
    labels = torch.randint(0, V, (N,), generator=g).to(dev)
    w_lp, w_ent = torch.randn(N, generator=g).to(dev), torch.randn(N, generator=g).to(dev)
    lo, hi = rank * V // world, (rank + 1) * V // world
    w_mine = weight[lo:hi].contiguous()

    def step(w, group):
        h = hidden.detach().requires_grad_(True)
        w = w.detach().requires_grad_(True)
        logp, ent = r1kernels.linear_token_logprobs(h, w, labels, with_entropy=True,
                                                    process_group=group)
        ((logp * w_lp).sum() + (ent * w_ent).sum()).backward()

    def median(fn):
        fn()
        times = []
        for _ in range(rounds):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    single = median(lambda: step(weight, None)) if rank == 0 else 0.0
    dist.barrier()
    counted = {"fwd": 0, "bwd": 0}
    phase = ["fwd"]
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def all_reduce(t, *a, **k):
        counted[phase[0]] += t.numel() * t.element_size()
        return real_all_reduce(t, *a, **k)

    def all_gather(ts, t, *a, **k):
        counted[phase[0]] += t.numel() * t.element_size() * len(ts)
        return real_all_gather(ts, t, *a, **k)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    h = hidden.detach().requires_grad_(True)
    w = w_mine.detach().requires_grad_(True)
    logp, ent = r1kernels.linear_token_logprobs(h, w, labels, with_entropy=True,
                                                process_group=dist.group.WORLD)
    phase[0] = "bwd"
    ((logp * w_lp).sum() + (ent * w_ent).sum()).backward()
    dist.all_reduce, dist.all_gather = real_all_reduce, real_all_gather
    tp = median(lambda: step(w_mine, dist.group.WORLD))
    if rank == 0:
        print(json.dumps(dict(single_s=single, tp_s=tp, fwd_bytes=counted["fwd"] / N,
                              bwd_bytes=counted["bwd"] / N)), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _tp_worker(*(int(a) for a in sys.argv[1:4]))
