"""Verifiable tasks: procedurally generated arithmetic and countdown, or a user dataset (JSONL,
Parquet or a saved `datasets` directory, with a column mapping).

A task turns an integer seed into an `Example`: the prompt, the answer the verifier checks against,
and a worked solution (`think`) used only to build the cold-start SFT set. Examples are a pure
function of (task, seed), so the data order never needs to be checkpointed: step `s` of rank `r`
always sees the same prompts, which is what makes `--resume` exact.

Held-out evaluation prompts come from a disjoint seed range (`EVAL_SEED_BASE`), so training and
evaluation never share a generated example.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

EVAL_SEED_BASE = 1 << 40  # eval examples use seeds >= this; training seeds stay far below
PRETRAIN_SEED_BASE = 1 << 36  # seeds of the pretraining documents

# R1-Zero's template (DeepSeek-R1 paper, table 1); the model continues after "Assistant:"
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {prompt}. Assistant:")
# The same instruction, condensed for the tiny default model (256 positions, one token a char)
TINY_R1_ZERO_TEMPLATE = ("Think in <think> </think>, then answer in <answer> </answer>. "
                         "User: {prompt} Assistant:")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str          # what the accuracy reward compares against (task-specific meaning)
    think: str = ""      # a worked solution, for the SFT target only
    numbers: tuple = ()  # countdown: the numbers that may be used
    columns: dict = field(default_factory=dict, compare=False)  # a dataset row's other columns


def completion_text(ex: Example) -> str:
    """The SFT target: the R1 format `<think>...</think><answer>...</answer>`."""
    return f"<think>{ex.think}</think><answer>{ex.answer}</answer>"


class Task:
    name = "task"

    def example(self, seed: int) -> Example:
        raise TypeError(f"{type(self).__name__} must define example(seed)")

    def examples(self, seeds) -> list[Example]:
        return [self.example(s) for s in seeds]


class Arithmetic(Task):
    """`a+b=` with `difficulty`-digit operands; the think trace adds column by column.

    difficulty 1..3 uses `+` only; difficulty >= 4 mixes in `-` (results may be negative).
    The trace for 47+38 is `7+8=15,4+3+1=8` (units first, carry included), answer `85`.
    """

    name = "arithmetic"

    def __init__(self, difficulty: int = 2):
        if difficulty < 1:
            raise ValueError(f"arithmetic: difficulty expected >= 1, got {difficulty}")
        self.difficulty = difficulty

    def example(self, seed: int) -> Example:
        rng = random.Random(seed)
        hi = 10 ** self.difficulty - 1
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        op = "-" if self.difficulty >= 4 and rng.random() < 0.5 else "+"
        if op == "+":
            return Example(f"{a}+{b}=", str(a + b), _addition_trace(a, b))
        return Example(f"{a}-{b}=", str(a - b), f"{a}-{b}={a - b}")


def _addition_trace(a: int, b: int) -> str:
    steps, carry, i = [], 0, 0
    da, db = str(a)[::-1], str(b)[::-1]
    while i < max(len(da), len(db)):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        carry, i = s // 10, i + 1
    return ",".join(steps)


class Countdown(Task):
    """Reach a target with `difficulty` numbers (each used at most once) and + - *.

    The prompt is `3 7 25>46:`; the answer is any expression the verifier accepts, e.g.
    `25+3*7`. The generated solution combines the numbers left to right.
    """

    name = "countdown"

    def __init__(self, difficulty: int = 3, max_number: int = 20):
        if difficulty < 2:
            raise ValueError(f"countdown: difficulty expected >= 2, got {difficulty}")
        self.difficulty = difficulty
        self.max_number = max_number

    def example(self, seed: int) -> Example:
        rng = random.Random(seed)
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.difficulty)]
            expr, value, steps = str(nums[0]), nums[0], []
            for n in nums[1:]:
                op = rng.choice("+-*")
                new = value + n if op == "+" else value - n if op == "-" else value * n
                steps.append(f"{value}{op}{n}={new}")
                expr = f"({expr}){op}{n}" if op == "*" and not expr.isdigit() else f"{expr}{op}{n}"
                value = new
            if 0 < value < 1000:
                break
        shown = sorted(nums)
        prompt = " ".join(map(str, shown)) + f">{value}:"
        return Example(prompt, expr, ",".join(steps), tuple(shown))


class DatasetTask(Task):
    """User data: a `.jsonl` file, a `.parquet` file or a directory written by `datasets`'
    `save_to_disk`. `columns` maps our fields to the data's columns (`prompt=question,
    answer=solution`; also `think`, `completion`); every other column is kept in
    `Example.columns` and passed to reward functions with TRL's signature. A saved DatasetDict's
    `test` (or `validation`) split is the held-out set; otherwise the last 10% of the rows.
    Seeds index the rows cyclically."""

    name = "dataset"

    def __init__(self, path: str, columns: str = "", eval_fraction: float = 0.1):
        self.mapping = {"prompt": "prompt", "answer": "answer", "think": "think",
                        "completion": "completion"}
        for kv in filter(None, (c.strip() for c in columns.split(","))):
            ours, _, theirs = kv.partition("=")
            if ours not in self.mapping or not theirs:
                raise ValueError(f"data_columns: expected field=column with field one of "
                                 f"{sorted(self.mapping)}, got {kv!r}")
            self.mapping[ours] = theirs
        rows, held = _load_rows(path)
        if not rows:
            raise ValueError(f"dataset task: {path} holds no examples")
        for i, r in enumerate(rows + held):
            for ours in ("prompt", "answer"):
                if self.mapping[ours] not in r:
                    raise ValueError(f"dataset task: row {i + 1} of {path} has no column "
                                     f"{self.mapping[ours]!r} (the {ours}; see data_columns)")
        if not held:
            n_eval = max(1, int(len(rows) * eval_fraction)) if len(rows) > 1 else 0
            rows, held = rows[: len(rows) - n_eval] or rows, rows[len(rows) - n_eval:] or rows
        self.train_rows, self.eval_rows = rows, held

    def row(self, seed: int) -> dict:
        """The data row behind `example(seed)` (train rows below EVAL_SEED_BASE, else held out)."""
        rows = self.eval_rows if seed >= EVAL_SEED_BASE else self.train_rows
        return rows[(seed - EVAL_SEED_BASE if seed >= EVAL_SEED_BASE else seed) % len(rows)]

    def example(self, seed: int) -> Example:
        r, m = self.row(seed), self.mapping
        prompt = r[m["prompt"]]
        if isinstance(prompt, list):  # conversational data: the user turns' text
            prompt = "\n".join(t["content"] for t in prompt if t.get("role") == "user")
        return Example(str(prompt), str(r[m["answer"]]), str(r.get(m["think"]) or ""),
                       tuple(r.get("numbers") or ()),
                       {k: v for k, v in r.items() if k != m["prompt"]})

    def sft_pairs(self, n: int) -> list[tuple[str, str]]:
        """(prompt, completion) for SFT: the completion column, else built from think/answer."""
        out = []
        for seed in range(min(n, len(self.train_rows))):
            r, ex = self.row(seed), self.example(seed)
            c = r.get(self.mapping["completion"])
            out.append((ex.prompt, str(c) if c is not None else completion_text(ex)))
        return out


def _load_rows(path: str) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows or []) from a JSONL, Parquet or saved `datasets` path."""
    if os.path.isdir(path):
        import datasets

        d = datasets.load_from_disk(path)
        if isinstance(d, datasets.DatasetDict):
            held = next((d[k] for k in ("test", "validation") if k in d), None)
            train = d["train"] if "train" in d else d[next(iter(d))]
            return train.to_list(), held.to_list() if held is not None else []
        return d.to_list(), []
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()], []


def pretrain_text(task: Task, seed: int, template: str, format_share: float) -> str:
    """One document of plain text from the task's domain, for the base model of R1-Zero: a line of
    solved problems, a worked solution, or a question in the template answered in plain words;
    only a `format_share` of the answers use the R1 `<think>`/`<answer>` format (as on the web)."""
    rng = random.Random(seed)
    ex = task.example(seed)
    kind = rng.random()
    if kind < 0.1:
        exs = task.examples(range(seed, seed + 1 + rng.randrange(4)))
        return " ".join(f"{e.prompt}{e.answer}" for e in exs)
    if kind < 0.5:
        return f"{ex.prompt} {ex.think}, so {ex.answer}"
    question = template.replace("{prompt}", ex.prompt)
    if rng.random() < format_share:  # a thought that ends in its result, then the answer
        return f"{question} <think>{ex.think}, so {ex.answer}</think><answer>{ex.answer}</answer>"
    if rng.random() < 0.25:
        return f"{question} {ex.answer}"
    return f"{question} {ex.think}, so {ex.answer}"


def sft_target(row: dict) -> str:
    """Completion text for an SFT JSONL row: `completion` if given, else built from think/answer."""
    if "completion" in row:
        return row["completion"]
    return completion_text(Example(row.get("prompt", ""), str(row["answer"]), row.get("think", "")))


def make_task(name: str, difficulty: int, path: str | None = None,
              columns: str = "") -> Task:
    if name == "arithmetic":
        return Arithmetic(difficulty)
    if name == "countdown":
        return Countdown(difficulty)
    if name in ("dataset", "jsonl"):
        if not path:
            raise ValueError(f"task {name!r} needs data=<a .jsonl, .parquet or datasets dir>")
        return DatasetTask(path, columns)
    raise ValueError(f"task expected 'arithmetic', 'countdown' or 'dataset', got {name!r}")
