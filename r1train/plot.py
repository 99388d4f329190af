"""plot.png: reward, accuracy, KL and completion length over GRPO steps (needs matplotlib)."""
from __future__ import annotations

import sys


def plot_metrics(history: list[dict], path: str, summary: dict | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[r1-train] matplotlib not installed: no plot.png (pip install 'r1kernels[plot]')",
              file=sys.stderr)
        return False
    rows = [r for r in history if r.get("stage") == "grpo"]
    evals = [r for r in history if r.get("stage") == "eval"]
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=80)
    kl = ("kl", "KL to reference (k3)")
    if all(r.get("kl", 0.0) == 0.0 for r in rows) and any("entropy" in r for r in rows):
        kl = ("entropy", "token entropy (beta = 0: no reference, no KL)")
    panels = [("reward", "reward (sampled completions)"),
              ("accuracy", "accuracy: train samples (blue), held-out greedy (red)"),
              kl, ("completion_len", "completion length (tokens)")]
    for ax, (key, title) in zip(axes.flat, panels):
        ys = [r.get(key, 0.0) for r in rows]
        ax.plot(steps, ys, color="tab:gray", alpha=0.35, lw=0.8)
        ax.plot(steps, _smooth(ys), color="tab:blue", lw=1.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step", fontsize=8)
        ax.grid(alpha=0.3)
    ev = (summary or {}).get("eval", {})
    held = [(r["step"], r["eval_accuracy"]) for r in evals]
    if ev.get("after_sft") is not None or ev.get("base") is not None:
        start = ev["after_sft"] if ev.get("after_sft") is not None else ev["base"]
        held.insert(0, (0, start))
        axes[0, 1].axhline(start, color="tab:orange", ls="--", lw=1,
                           label=f"held-out at GRPO start {start:.2f}")
    if ev.get("after_grpo") is not None:
        held.append((steps[-1], ev["after_grpo"]))
    if held:
        axes[0, 1].plot([h[0] for h in held], [h[1] for h in held], "o-", color="tab:red",
                        label="held-out greedy accuracy")
        axes[0, 1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _smooth(ys: list[float], k: int = 10) -> list[float]:
    """Mean of the last k values at each step, each window summed afresh: a running sum's
    rounding left 1e-17 where the values return to 0, and matplotlib then drew an axis of that
    width with a 1e-17 offset."""
    return [sum(ys[max(0, i - k + 1):i + 1]) / min(i + 1, k) for i in range(len(ys))]
