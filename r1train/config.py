"""Configuration: one dataclass with documented defaults, overridable from YAML and the CLI.

Precedence: defaults < `--config file.yaml` < `--key value` flags. Every field below is a flag
(`--grpo_steps 100`, `--rewards accuracy=1,format=0.1`, `--gradient_checkpointing true`).
The defaults are the tuned no-argument run: a tiny Qwen2 on 2-digit addition that finishes in a
few minutes on 2 CPU cores and gains >= 10 points of held-out accuracy from GRPO over SFT.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

# DeepSeek-R1's instruction (as open-r1 uses it as the system prompt of a chat template)
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>.")


@dataclass
class Config:
    # ---- run -----------------------------------------------------------------------------------
    out_dir: str = "r1-train-out"   # metrics.jsonl, summary.json, plot.png, checkpoint/, model/
    seed: int = 0                   # seeds model init, data order and sampling
    resume: bool = False            # continue from out_dir/checkpoint/ exactly
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    dtype: str = "float32"          # float32 | bfloat16 (model weights and compute)
    threads: int = 1                # torch CPU threads (tiny models: 1 is fastest); 0 = default
    checkpoint_every: int = 50      # GRPO/SFT steps between checkpoints (also saved at the end)
    fsdp: bool = False              # under torchrun: FSDP2 (shard weights/grads/optimizer), not DDP
    # ---- model ---------------------------------------------------------------------------------
    model: str = ""                 # local HF causal-LM directory; "" = build the tiny default
    attn_implementation: str = "sdpa"  # transformers attention: sdpa | eager | flash_attention_2
    tiny_hidden: int = 128          # tiny default model shape (Qwen2 architecture)
    tiny_layers: int = 2            # tiny default: decoder layers
    tiny_heads: int = 4             # tiny default: attention heads (KV heads = half)
    tiny_intermediate: int = 256    # tiny default: MLP width
    moe_kernels: bool = True        # MoE models (hf_moe.FAMILIES): r1kernels router + expert dispatch
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    # ---- task ----------------------------------------------------------------------------------
    task: str = "arithmetic"        # arithmetic | countdown | dataset (alias: jsonl)
    difficulty: int = 2             # arithmetic: digits per operand; countdown: how many numbers
    data: str = ""                  # task=dataset: a .jsonl, .parquet or saved `datasets` dir
    data_columns: str = ""          # column mapping, e.g. prompt=question,answer=solution
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})  # fn: weight
    language: str = "latin"         # `language` reward: Unicode script(s) of the CoT, e.g. cjk
    prompt_template: str = ""       # "{prompt}" filled in; "" = by mode (r1-zero: R1-Zero's)
    system_prompt: str = R1_SYSTEM_PROMPT  # with a tokenizer that has a chat template (mode r1)
    # ---- recipe --------------------------------------------------------------------------------
    mode: str = "r1"                # r1: stages sft,rl; r1-zero: pretrain,rl (pure RL, R1-Zero)
    stages: str = ""                # in order from pretrain,sft,rl,rs,rs_sft,rl2; "" = by mode
    # pretrain: the tiny default's base model, plain text of the task domain (r1-zero's start)
    pretrain_docs: int = 8000       # generated documents
    pretrain_epochs: int = 8        # passes over them
    pretrain_format_share: float = 0.05  # share of answers written in the R1 format
    # cold-start SFT (also distillation: point sft_data at a JSONL from a stronger model)
    sft_examples: int = 300         # generated cold-start examples (ignored with sft_data)
    sft_data: str = ""              # JSONL of {prompt, completion} or {prompt, answer[, think]}
    sft_epochs: int = 60            # passes over the SFT set (sft, rs_sft)
    sft_batch_size: int = 32        # sequences per SFT or pretrain step (all processes together)
    sft_lr: float = 3e-3            # AdamW learning rate for SFT, rs_sft and pretrain
    # GRPO
    grpo_steps: int = 400           # GRPO steps (one rollout + one optimizer step each)
    prompts_per_step: int = 16      # P prompts per step (per process)
    group_size: int = 8             # G completions per prompt
    max_new_tokens: int = 40        # completion budget per sample
    temperature: float = 1.0        # rollout sampling temperature
    top_p: float = 1.0              # rollout nucleus sampling
    rollout_compile: bool = False   # decode step compiled once per shape (CUDA graphs on CUDA)
    rollout_is: str = ""            # rollout-vs-train importance weights: "" (off) | tis | mis
    rollout_is_cap: float = 2.0     # tis: weights truncated at the cap; mis: tokens above it masked
    lr: float = 3e-4                # AdamW learning rate for GRPO (rl, rl2)
    weight_decay: float = 0.0       # AdamW weight decay (every training stage)
    max_grad_norm: float = 1.0      # gradient clipping (every training stage)
    beta: float = 0.0               # KL coefficient; > 0 computes reference log-probs
    loss_type: str = "dapo"         # any r1kernels.grpo_loss loss_type
    epsilon_low: float = 0.2        # PPO clip range below 1
    epsilon_high: float = 0.28      # PPO clip range above 1 (DAPO clip-higher)
    micro_batch_tokens: int = 8192  # update micro-batch: similar-length rows, <= this many tokens
    # ---- evaluation ----------------------------------------------------------------------------
    eval_examples: int = 500        # held-out prompts (seeds disjoint from training)
    eval_every: int = 25            # GRPO steps between held-out evals; 0 = only at stage ends
    pass_k: int = 0                 # k samples at T 0.6, top-p 0.95: pass@1, cons@k, pass@k
    # ---- rejection sampling (writes an SFT JSONL of verified completions) ------------------------
    rs_prompts: int = 0             # prompts to sample (stage rs, rs_sft); 0 = sft_examples
    rs_samples: int = 8             # N samples per prompt
    rs_out: str = ""                # default: <out_dir>/rejection_sampled.jsonl
    rl2_steps: int = 100            # GRPO steps of the final RL stage (rl2)


def _parse_value(kind, text: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    if kind is dict:
        text = text.strip()
        if text.startswith("{"):
            return json.loads(text)
        return {k: float(v) for k, v in (kv.split("=", 1) for kv in text.split(",") if kv)}
    return kind(text)


def _coerce_yaml(kind, v, where: str):
    """A YAML value as the field's type. YAML 1.1 reads `1e-6` as a string (only `1.0e-6` is a
    float), so strings go through the flags' parser; a value of another type is an error here,
    not a TypeError deep in the run."""
    try:
        if isinstance(v, str):
            return _parse_value(kind, v)
        if kind is float and type(v) in (int, float):
            return float(v)
        if kind is dict and isinstance(v, dict):
            return {str(k): float(x) for k, x in v.items()}
        if type(v) is kind:
            return v
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise SystemExit(f"r1-train: {where}: expected {kind.__name__}, got {v!r} ({e})") from None
    raise SystemExit(f"r1-train: {where}: expected {kind.__name__}, got {v!r}")


def _field_docs() -> dict[str, str]:
    """The trailing comments of the dataclass above, used as --help text."""
    import inspect

    docs = {}
    for line in inspect.getsource(Config).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            docs[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
    return docs


def parse_args(argv=None, prog: str = "r1-train") -> Config:
    docs = _field_docs()
    p = argparse.ArgumentParser(
        prog=prog,
        description="GRPO training, the DeepSeek-R1 recipe (cold-start SFT -> GRPO with rule-based "
                    "rewards -> evaluation), on r1kernels. With no arguments: a tiny model "
                    "learns 2-digit addition on CPU in a few minutes. `r1-train sample ...` "
                    "writes a model's verified samples as SFT data (distillation).")
    p.add_argument("--config", help="YAML file of field: value (flags override it)")
    types = {f.name: (dict if f.name == "rewards" else type(f.default) if f.default is not
                      dataclasses.MISSING else str) for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        p.add_argument(f"--{f.name}", type=lambda s, k=types[f.name]: _parse_value(k, s),
                       default=None, help=f"{docs.get(f.name, '')} (default: {default})")
    args = p.parse_args(argv)
    values = {}
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as fh:
            values.update(yaml.safe_load(fh) or {})
        unknown = set(values) - set(types)
        if unknown:
            raise SystemExit(f"r1-train: unknown keys in {args.config}: {sorted(unknown)}")
        for name, v in values.items():
            values[name] = _coerce_yaml(types[name], v, f"{args.config}: {name}")
    for name in types:
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    return Config(**values)
