"""Benchmark harness: device choice, measured ceilings, and one compact report table.

Run: `pytest benchmarks/ --benchmark-only`. On a GPU the realistic shapes of shapes.py are used,
on CPU small ones. Each bench_<op>.py measures every provider of one op side by side with the
`bench` fixture:

    def test_x(benchmark, bench, provider, shape):
        fn = ...                      # a callable doing one forward (+ backward) call
        bench(benchmark, fn, op="x", shape=shape, provider=provider, bytes=..., baseline="eager")

The table printed at the end (and written to .benchmarks/r1k-<device>-<date>.json) gives, per
op/shape/provider: median time, GB/s and TFLOP/s with the fraction of this machine's measured
copy bandwidth and matmul rate, the peak extra memory (CUDA), and the speedup over the baseline
provider of the same run.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest
import torch

from shapes import DEVICE, shape_id
_ROWS: list[dict] = []
_CEILINGS: dict[str, float] = {}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time(fn, iters: int) -> float:
    sync()
    if DEVICE == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    import time

    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def ceilings() -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write counted) and matmul rate (TFLOP/s) measured here."""
    if _CEILINGS:
        return _CEILINGS
    n = (1 << 30) // 4 if DEVICE == "cuda" else (1 << 26) // 4
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = min(_time(lambda: dst.copy_(src), 5) for _ in range(3))
    _CEILINGS["copy_GBps"] = 2 * src.numel() * 4 / t / 1e9
    m = 8192 if DEVICE == "cuda" else 1024
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    a = torch.randn(m, m, device=DEVICE, dtype=dtype)
    b = torch.randn(m, m, device=DEVICE, dtype=dtype)
    a @ b
    t = min(_time(lambda: a @ b, 5 if DEVICE == "cuda" else 2) for _ in range(3))
    _CEILINGS["matmul_TFLOPs"] = 2 * m**3 / t / 1e12
    _CEILINGS["matmul_dtype"] = str(dtype).replace("torch.", "")
    del src, dst, a, b
    return _CEILINGS


class Bench:
    def __call__(self, benchmark, fn, *, op: str, shape: dict, provider: str, bytes: float = 0.0,
                 flops: float = 0.0, baseline: str | None = None, rounds: int | None = None,
                 cpu_peak=None):
        """Time `fn` with pytest-benchmark (synchronized), record one row of the report.
        R1K_BENCH_SKIP="prov1,prov2" skips those providers (for short GPU sessions).
        The peak column: CUDA's peak extra memory of a call; on CPU only when `cpu_peak` is given,
        a callable returning the bytes `fn` keeps allocated between calls (0 for most), added to
        a call's peak extra bytes (tests/cpu_memory.py: torch.profiler's allocation events)."""
        if provider in os.environ.get("R1K_BENCH_SKIP", "").split(","):
            pytest.skip(f"R1K_BENCH_SKIP names {provider}")
        ceil = ceilings()
        fn()  # warm-up (compilation, autotuning, caches)
        sync()
        peak = None
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            sync()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        elif cpu_peak is not None:
            tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
            if tests not in sys.path:
                sys.path.append(tests)
            from cpu_memory import peak_extra_bytes

            extra, _ = peak_extra_bytes(fn)
            peak = (extra + cpu_peak()) / 2**30

        def timed():
            fn()
            sync()

        if rounds is None:
            # CPU: 15 host-timed rounds (with 5 the medians of the shared 2-core CI machine moved
            # by up to 2.5x between runs)
            rounds = 20 if DEVICE == "cuda" else 15
        graph = None
        if DEVICE == "cuda":
            # device time between CUDA events, L2 flushed before each call, median of the calls
            # (triton.testing.do_bench); pytest-benchmark keeps a few host-timed rounds for its
            # own record. Calls under 1 ms are also timed as CUDA-graph replays ("graph"), which
            # removes the host's launch overhead and shows the kernels' own time (an eager
            # grpo_loss call measured 433 us on an H100, 51 us of it kernels).
            import triton.testing

            benchmark.pedantic(timed, rounds=min(rounds, 3), iterations=1, warmup_rounds=0)
            median = triton.testing.do_bench(fn, warmup=25, rep=max(100, 1000 * rounds // 20),
                                             return_mode="median") / 1e3
            if median < 1e-3:
                try:
                    graph = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
                except Exception:  # noqa: BLE001 - some callables cannot be captured (host syncs)
                    graph = None
        else:
            benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
            median = benchmark.stats.stats.median
        row = dict(op=op, shape=shape_id(shape), provider=provider, median_s=median, graph_s=graph,
                   peak_GiB=peak,
                   GBps=bytes / median / 1e9 if bytes else None,
                   TFLOPs=flops / median / 1e12 if flops else None, baseline=baseline)
        row["frac_copy"] = row["GBps"] / ceil["copy_GBps"] if row["GBps"] else None
        row["frac_matmul"] = row["TFLOPs"] / ceil["matmul_TFLOPs"] if row["TFLOPs"] else None
        benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
        _ROWS.append(row)
        return row


@pytest.fixture(scope="session")
def bench():
    return Bench()


@pytest.fixture(scope="session")
def device():
    return DEVICE


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:9.1f} us" if s < 1e-3 else f"{s * 1e3:9.3f} ms"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own (wide) table: ours is the last
def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    ceil = ceilings()
    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    # FLOP rates in TFLOP/s on a GPU, GFLOP/s on CPU (where TFLOP/s rounds to 0.0)
    unit, per = ("TFLOP/s", 1e12) if DEVICE == "cuda" else ("GFLOP/s", 1e9)
    w = terminalreporter.write_line
    w("")
    w(f"r1kernels benchmarks on {dev}, {datetime.date.today()}, commit {_commit()}, "
      f"torch {torch.__version__}")
    w(f"measured ceilings: copy {ceil['copy_GBps']:.0f} GB/s, {ceil['matmul_dtype']} matmul "
      f"{ceil['matmul_TFLOPs'] * 1e12 / per:.1f} {unit} (%copy, %mm: fractions of them)")
    w("vs base: the baseline's time / this time; graph: CUDA-graph replay (the kernels' own time)")
    w(f"{'provider':24} {'median':>12} {'GB/s':>7} {'%copy':>5} {unit:>8} {'%mm':>4} "
      f"{'peak ' + ('GiB' if DEVICE == 'cuda' else 'MiB'):>8} {'vs base':>8} {'graph':>12}")
    base = {}
    for r in _ROWS:
        if r["baseline"] is not None and r["provider"] == r["baseline"]:
            base[(r["op"], r["shape"])] = r["median_s"]
    group = None
    for r in _ROWS:
        if (r["op"], r["shape"]) != group:
            group = (r["op"], r["shape"])
            w(f"{r['op']} {r['shape']}"[:99])
        b = base.get(group)
        ratio = f"{b / r['median_s']:7.2f}x" if b and r["baseline"] else "-"
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        rate = r["TFLOPs"] and r["TFLOPs"] * 1e12 / per
        w(f"  {r['provider'][:22]:22} {_fmt_time(r['median_s']):>12} "
          f"{fmt(r['GBps'], '7.0f'):>7} {fmt(r['frac_copy'] and 100 * r['frac_copy'], '5.0f'):>5} "
          f"{fmt(rate, '8.1f'):>8} {fmt(r['frac_matmul'] and 100 * r['frac_matmul'], '4.0f'):>4} "
          f"{fmt(r['peak_GiB'] and r['peak_GiB'] * (1 if DEVICE == 'cuda' else 1024), '8.2f'):>8} {ratio:>8} "
          f"{_fmt_time(r['graph_s']) if r.get('graph_s') else '-':>12}")
    out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".benchmarks")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"r1k-{DEVICE}-{datetime.date.today()}.json")
    with open(path, "w") as f:
        json.dump(dict(device=dev, date=str(datetime.date.today()), commit=_commit(),
                       torch=torch.__version__, ceilings=ceil, rows=_ROWS), f, indent=1)
    w(f"written to {path}")
