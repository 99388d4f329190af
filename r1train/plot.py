"""plot.png: reward, accuracy, format rate, KL (or entropy) and completion length over the RL
steps (rl, then rl2 when it ran), with the held-out greedy evaluations (needs matplotlib)."""
from __future__ import annotations

import sys

RL_STAGES = ("grpo", "rl2")


def plot_metrics(history: list[dict], path: str, summary: dict | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[r1-train] matplotlib not installed: no plot.png (pip install 'r1kernels[plot]')",
              file=sys.stderr)
        return False
    rows = [r for r in history if r.get("stage") in RL_STAGES]
    if not rows:
        return False
    # one x axis over the RL stages: rl2's steps continue after rl's
    offset = {s: 0 for s in RL_STAGES}
    offset["rl2"] = max((r["step"] for r in rows if r["stage"] == "grpo"), default=0)
    steps = [offset[r["stage"]] + r["step"] for r in rows]
    stages = (summary or {}).get("stages", {})
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), dpi=80)
    kl = ("kl", "KL to reference (k3)")
    if all(r.get("kl", 0.0) == 0.0 for r in rows) and any("entropy" in r for r in rows):
        kl = ("entropy", "token entropy (beta = 0: no reference, no KL)")
    panels = [("reward", "reward (sampled completions)", None),
              ("accuracy", "accuracy: samples (blue), held-out greedy (red)", "accuracy"),
              ("format", "format rate: samples (blue), held-out greedy (red)", "format"),
              kl + (None,),
              ("completion_len", "completion length (tokens)", "completion_len")]
    for ax, (key, title, held_key) in zip(axes.flat, panels):
        ys = [r.get(key, 0.0) for r in rows]
        ax.plot(steps, ys, color="tab:gray", alpha=0.35, lw=0.8)
        ax.plot(steps, _smooth(ys), color="tab:blue", lw=1.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
        if offset["rl2"] and any(r["stage"] == "rl2" for r in rows):
            ax.axvline(offset["rl2"], color="tab:green", ls=":", lw=1)
        if held_key is None:
            continue
        held = []
        for before, stage, after in (("after_sft", "grpo", "after_grpo"),
                                     ("after_rs_sft", "rl2", "after_rl2")):
            start = stages.get(before) or (stages.get("base") if stage == "grpo" else None)
            if stage == "grpo" and start is not None:
                held.append((0, start[held_key]))
            elif start is not None:
                held.append((offset["rl2"], start[held_key]))
            held += [(offset[stage] + r["step"], r[f"eval_{held_key}"]) for r in history
                     if r.get("stage") == "eval" and r.get("of") == stage
                     and f"eval_{held_key}" in r]
            last = [s for s, r in zip(steps, rows) if r["stage"] == stage]
            if stages.get(after) is not None and last:
                held.append((last[-1], stages[after][held_key]))
        if held:
            ax.plot([h[0] for h in held], [h[1] for h in held], "o-", color="tab:red", ms=3,
                    label="held-out greedy")
            ax.legend(fontsize=7, loc="best")
    axes.flat[-1].axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _smooth(ys: list[float], k: int = 10) -> list[float]:
    """Mean of the last k values at each step, each window summed afresh: a running sum's
    rounding left 1e-17 where the values return to 0, and matplotlib then drew an axis of that
    width with a 1e-17 offset."""
    return [sum(ys[max(0, i - k + 1):i + 1]) / min(i + 1, k) for i in range(len(ys))]
