"""The performance targets (from the issues) and the one table `run_gpu.sh quick` ends with.

    python benchmarks/targets.py [.benchmarks/r1k-cuda-<date>.json]   # default: the newest

Each target names a benchmark row (op, a part of its shape id) and our provider; the table gives
our time (and peak memory where the target has a bound), every other provider of the same op and
shape from the same run (the baselines), and whether the target is met. Rows of benchmarks that
have no target (e.g. bench_rollout.py, bench_sample.py) follow as "report".
"""
from __future__ import annotations

import glob
import json
import os
import sys
import textwrap

# (name, op, shape contains, our provider, time bound in s, memory bound in GiB or None, graph?)
# graph: the bound is on the CUDA-graph replay time (the kernels' own time) of a host-bound op
TARGETS = [
    ("group_advantages P=512 G=16", "group_advantages", "P=512,G=16", "r1k-triton", 10e-6, None, True),
    ("token_logprobs+entropy fwd+bwd N=16384 V=151936", "token_logprobs fwd+bwd",
     "N=16384,V=151936", "r1k-fwd_bwd", 4.0e-3, None, False),
    ("GRPOLoss.from_logits in place [16,1025,151936]", "grpo_loss_logits", "V=151936",
     "r1k-inplace", 4.0e-3, None, False),
    ("linear_token_logprobs_fwd_bwd N=16384 H=4096", "linear_token_logprobs fwd+bwd",
     "N=16384,H=4096,V=151936", "r1k-fwd_bwd", 95e-3, 2.5, False),
    ("GRPOLoss hidden B=16 T=1024 H=4096", "grpo_loss_hidden", "B=16,T=1024", "r1k", 95e-3, 2.5,
     False),
    ("GRPOLoss hidden B=4 T=4096 H=4096", "grpo_loss_hidden", "B=4,T=4096", "r1k", 95e-3, 2.5,
     False),
    ("grpo_loss fwd+bwd B=512 T=8192", "grpo_loss", "B=512,T=8192", "r1k-triton", 60e-6, None, True),
    ("moe_route DeepSeek-V3 T=16384", "moe_route", "E=256", "r1k-cuda", 12e-6, None, True),
    ("moe_route Qwen3 T=16384", "moe_route", "E=128", "r1k-cuda", 8e-6, None, True),
    ("moe_permute+unpermute T=16384 H=7168", "moe_permute+unpermute", "T=16384", "r1k-triton",
     3.4e-3, None, False),
]


def _t(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:.1f}us" if s < 1e-3 else f"{s * 1e3:.2f}ms"


def _time(row: dict, graph: bool) -> float:
    return row["graph_s"] if graph and row.get("graph_s") else row["median_s"]


def table(rows: list[dict]) -> list[str]:
    """Lines of the table (at most 100 columns each)."""
    out = [f"{'target':46} {'bound':>9} {'ours':>16} {'met?':>5}  baselines, same run"]
    used = set()
    for name, op, part, ours, bound, mem, graph in TARGETS:
        same = [r for r in rows if r["op"] == op and part in r["shape"]]
        mine = next((r for r in same if r["provider"] == ours), None)
        bound_s = _t(bound) + (f",{mem:g}G" if mem else "")
        if mine is None:
            out.append(f"{name[:46]:46} {bound_s:>9} {'not measured':>16} {'-':>5}")
            continue
        used.update(id(r) for r in same)
        t = _time(mine, graph)
        peak = mine.get("peak_GiB")
        met = t <= bound and (mem is None or (peak is not None and peak <= mem))
        ours_s = _t(t) + (f" {peak:.2f}G" if mem and peak is not None else "")
        base = ", ".join(f"{r['provider']} {_t(_time(r, graph))}" for r in same if r is not mine)
        out.append(f"{name[:46]:46} {bound_s:>9} {ours_s:>16} {'yes' if met else 'NO':>5}")
        out += textwrap.wrap(base, 96, initial_indent="    ", subsequent_indent="    ")
    extra = [r for r in rows if id(r) not in used]
    for r in extra:
        out.append(f"{(r['op'] + ' ' + r['shape'])[:46]:46} {'report':>9} "
                   f"{r['provider'][:10] + ' ' + _t(r['median_s']):>16}")
    return out


def main(argv: list[str]) -> int:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".benchmarks")
    path = argv[0] if argv else max(glob.glob(os.path.join(root, "r1k-*.json")),
                                    key=os.path.getmtime, default=None)
    if path is None:
        print("no benchmark results in .benchmarks/ (run pytest benchmarks/ --benchmark-only)")
        return 1
    with open(path) as f:
        run = json.load(f)
    print(f"targets on {run['device']}, {run['date']}, commit {run['commit']} ({path})")
    for line in table(run["rows"]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
