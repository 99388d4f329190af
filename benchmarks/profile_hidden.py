"""Where the hidden-state single sweep spends its time: GRPOLoss on hidden states and
linear_token_logprobs_fwd_bwd at the issues' target shape (N=16384, H=4096, V=151936, bf16),
for several chunk sizes (rows of fp32 logits per chunk) and settings of the cluster kernel on
the chunks (PROFILE_CLUSTER, R1K_FUSED_CLUSTER values separated by ";", default
"0;8,256;8,256,1": off, the default, the persistent variant) and of the G group buffer (PROFILE_GROUP, R1K_SWEEP_GROUP_ROWS values separated by
";", default "0": off). Prints, per variant, the median time
of a call, its peak extra memory, the device time per kernel (torch.profiler) of one call, so
the gap to the three GEMMs (6 N H V FLOPs at the bf16 matmul rate) can be attributed, and where
in the call the GPU waits (idle gaps between kernels, with their neighbours).

    python benchmarks/profile_hidden.py                         # on a GPU
    PROFILE_DRY_RUN=1 python benchmarks/profile_hidden.py       # CPU, tiny shapes: each step once
"""
import os
import statistics
import sys
import time

import torch

import r1kernels
from r1kernels.ops import linear_token_logprobs as ltl

DRY = os.environ.get("PROFILE_DRY_RUN") == "1"
DEV = "cpu" if DRY else "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps):
    fn()  # warm-up (compiles)
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def peak_extra(fn):
    if DEV != "cuda":
        return float("nan")
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def kernel_table(fn, rows=12):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if DEV == "cuda" else [ProfilerActivity.CPU]
    sync()
    with profile(activities=acts) as prof:
        fn()
        sync()
    items = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if DEV == "cpu":
            t = e.self_cpu_time_total
        if t > 0:
            items.append((t / 1e3, e.count, e.key))
    items.sort(reverse=True)
    total = sum(t for t, _, _ in items)
    lines = [f"    device time {total:.2f} ms in {sum(c for _, c, _ in items)} kernels"]
    for t, c, k in items[:rows]:
        lines.append(f"    {t:9.2f} ms {c:5d}x  {k[:90]}")
    if DEV == "cuda":
        lines += idle_gaps(prof)
    return "\n".join(lines)


def idle_gaps(prof, top=5):
    """Where the GPU waits inside the call: the span from the first kernel's start to the last
    one's end, the idle time between kernels in it, and the largest gaps with their neighbours
    (the host's share of a call is its wall time minus that span, plus the idle time)."""
    from torch.autograd import DeviceType

    ev = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == DeviceType.CUDA)
    if not ev:
        return []
    gaps, idle, end, prev = [], 0.0, ev[0][1], ev[0][2]
    for s, e, name in ev[1:]:
        if s > end:
            idle += s - end
            gaps.append((s - end, prev, name))
        if e > end:
            end, prev = e, name
    gaps.sort(reverse=True)
    lines = [f"    kernel span {(end - ev[0][0]) / 1e3:.2f} ms, GPU idle inside it "
             f"{idle / 1e3:.2f} ms in {len(gaps)} gaps; largest:"]
    for g, a, b in gaps[:top]:
        lines.append(f"    {g / 1e3:9.3f} ms after {a[:40]} before {b[:40]}")
    return lines


def _check_idle_gaps():
    """The dry run's check of idle_gaps (kernels exist only on a GPU): synthetic kernels at
    [0, 100], [150, 300], [290, 400], [1400, 1500] us are idle 50 + 1000 us."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    spans = [(0, 100), (150, 300), (290, 400), (1400, 1500)]
    prof = NS(events=lambda: [NS(time_range=NS(start=a, end=b), name=f"k{i}",
                                 device_type=DeviceType.CUDA) for i, (a, b) in enumerate(spans)])
    lines = idle_gaps(prof)
    assert "span 1.50 ms" in lines[0] and "idle inside it 1.05 ms in 2 gaps" in lines[0], lines
    assert "1.000 ms after k2 before k3" in lines[1], lines


def main():
    torch.manual_seed(0)
    if DRY:
        _check_idle_gaps()
    B, T, H, V = (2, 64, 64, 1000) if DRY else (16, 1024, 4096, 151936)
    dt = torch.float32 if DRY else torch.bfloat16
    N = B * T
    hidden = torch.randn(B, T, H, device=DEV).to(dt).requires_grad_(True)  # as in shared/anchors
    weight = (torch.randn(V, H, device=DEV) / H ** 0.5).to(dt).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), device=DEV)
    lp = -torch.rand(B, T, device=DEV) * 3
    old, ref = lp + torch.randn_like(lp) * 0.1, lp + torch.randn_like(lp) * 0.1
    adv = torch.randn(B, device=DEV)
    mask = torch.rand(B, T, device=DEV) < 0.9
    glp, gent = torch.randn(N, device=DEV), torch.randn(N, device=DEV)
    loss_fn = r1kernels.GRPOLoss(loss_type="dapo", beta=0.04, epsilon_high=0.28)
    h2, y2 = hidden.detach().view(N, H), ids.view(N)

    def grpo():
        out = loss_fn(hidden, weight, ids, mask, adv, old_logps=old, ref_logps=ref)
        return torch.autograd.grad(out.loss, (hidden, weight))

    def fwd_bwd():
        return r1kernels.linear_token_logprobs_fwd_bwd(h2, weight.detach(), y2, glp,
                                                       grad_entropy=gent, with_entropy=True)

    if DEV == "cuda":  # the bf16 matmul rate of this run: the GEMMs' floor
        a = torch.randn(8192, 8192, device=DEV, dtype=dt)
        t = timed(lambda: a @ a, 10)
        rate = 2 * 8192 ** 3 / t / 1e9
        del a
        live = int(mask.sum())
        print(f"bf16 matmul {rate:.1f} TFLOP/s; 6NHV floor: GRPOLoss (N'={live} live) "
              f"{6 * live * H * V / rate / 1e9:.1f} ms, fwd_bwd {6 * N * H * V / rate / 1e9:.1f} ms")
    default_elems = ltl.TILE_ELEMS_CUDA
    rows_list = [64] if DRY else [int(r) for r in os.environ.get("PROFILE_ROWS", "1024,1536,2048").split(",")]
    clusters = os.environ.get("PROFILE_CLUSTER", "0;8,256;8,256,1").split(";")
    groups = os.environ.get("PROFILE_GROUP", "0").split(";")
    variants = [(name, r, c, gr) for c in clusters for gr in groups
                for name in ("GRPOLoss", "fwd_bwd") for r in rows_list]
    summary = []
    for name, r, c, gr in variants:
        fn = grpo if name == "GRPOLoss" else fwd_bwd
        os.environ["R1K_FUSED_CLUSTER"] = c
        os.environ["R1K_SWEEP_GROUP_ROWS"] = gr
        ltl.TILE_ELEMS_CUDA = r * V
        if DRY:
            ltl.TILE_ELEMS_CPU = r * V
        try:
            t = timed(fn, 1 if DRY else 5)
            mem = peak_extra(fn)
            label = f"{name} rows={r} cluster={c} group={gr}"
            print(f"{label}: {t:.2f} ms, peak extra {mem:.2f} GiB", flush=True)
            if (r == rows_list[0] and gr == groups[0]) or DRY:
                print(kernel_table(fn), flush=True)
            summary.append((label, t, mem))
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{name} rows={r} cluster={c} group={gr} failed: {exc!r}"[:300], flush=True)
    ltl.TILE_ELEMS_CUDA = default_elems
    os.environ.pop("R1K_FUSED_CLUSTER", None)
    os.environ.pop("R1K_SWEEP_GROUP_ROWS", None)
    print(f"{'variant':<54} {'ms':>9} {'peak GiB':>9}")
    for label, t, mem in summary:
        print(f"{label:<54} {t:9.2f} {mem:9.2f}")
    return 0 if len(summary) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
