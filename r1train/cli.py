"""`r1-train` / `python -m r1train`: parse the configuration and run the pipeline.

`r1-train sample --model DIR [--task ...] [--rs_prompts N --rs_samples K --rs_out F]` writes the
verified-correct samples of any model as SFT JSONL (distillation data for a student)."""
from __future__ import annotations

import json
import sys


def sample(argv) -> int:
    """Rejection sampling alone, from `--model` (or the tiny default) with the run's task."""
    import os

    from r1train.config import parse_args
    from r1train.train import Trainer

    cfg = parse_args(argv, prog="r1-train sample")
    trainer = Trainer(cfg)
    if trainer.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
    trainer.setup_model()
    path, n = trainer.rejection_sample()
    if trainer.is_main:
        print(json.dumps({"path": path, "kept": n, "prompts": trainer.rs_prompts(),
                          "samples": cfg.rs_samples}))
    return 0


def main(argv=None) -> int:
    from transformers.utils import logging as hf_logging

    from r1train.config import parse_args
    from r1train.train import train

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sample"]:
        return sample(argv[1:])
    cfg = parse_args(argv)
    hf_logging.disable_progress_bar()  # the console shows our bars only (not save/load bars)
    summary = train(cfg)
    if summary is None:
        return 130
    if summary.get("world_size", 1) == 1 or _rank() == 0:
        print(json.dumps(summary["eval"] | {"wall_seconds": round(summary["wall_seconds"], 1)}))
        import os

        files = ["summary.json", "metrics.jsonl"]
        files += ["plot.png"] if os.path.exists(os.path.join(cfg.out_dir, "plot.png")) else []
        print(f"[r1-train] wrote {cfg.out_dir}/: {', '.join(files)}, model/", file=sys.stderr)
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


if __name__ == "__main__":
    sys.exit(main())
