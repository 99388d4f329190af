"""Verifiable tasks: procedurally generated arithmetic and countdown, or a user JSONL.

A task turns an integer seed into an `Example`: the prompt, the answer the verifier checks against,
and a worked solution (`think`) used only to build the cold-start SFT set. Examples are a pure
function of (task, seed), so the data order never needs to be checkpointed: step `s` of rank `r`
always sees the same prompts, which is what makes `--resume` exact.

Held-out evaluation prompts come from a disjoint seed range (`EVAL_SEED_BASE`), so training and
evaluation never share a generated example.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

EVAL_SEED_BASE = 1 << 40  # eval examples use seeds >= this; training seeds stay far below


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str          # what the accuracy reward compares against (task-specific meaning)
    think: str = ""      # a worked solution, for the SFT target only
    numbers: tuple = ()  # countdown: the numbers that may be used


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


class JsonlTask(Task):
    """User data: one JSON object per line with `prompt` and `answer` (and optional `completion`
    or `think` for SFT). Seeds index the file cyclically; eval uses a held-out tail of the file."""

    name = "jsonl"

    def __init__(self, path: str, eval_fraction: float = 0.1):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError(f"jsonl task: {path} holds no examples")
        for i, r in enumerate(rows):
            if "prompt" not in r or "answer" not in r:
                raise ValueError(f"jsonl task: line {i + 1} of {path} lacks 'prompt' or 'answer'")
        n_eval = max(1, int(len(rows) * eval_fraction)) if len(rows) > 1 else 0
        self.train_rows = rows[: len(rows) - n_eval] or rows
        self.eval_rows = rows[len(rows) - n_eval:] or rows

    def example(self, seed: int) -> Example:
        rows = self.eval_rows if seed >= EVAL_SEED_BASE else self.train_rows
        r = rows[(seed - EVAL_SEED_BASE if seed >= EVAL_SEED_BASE else seed) % len(rows)]
        think = r.get("think", "")
        return Example(str(r["prompt"]), str(r["answer"]), think,
                       tuple(r.get("numbers", ())))


def sft_target(row: dict) -> str:
    """Completion text for an SFT JSONL row: `completion` if given, else built from think/answer."""
    if "completion" in row:
        return row["completion"]
    return completion_text(Example(row.get("prompt", ""), str(row["answer"]), row.get("think", "")))


def make_task(name: str, difficulty: int, path: str | None = None) -> Task:
    if name == "arithmetic":
        return Arithmetic(difficulty)
    if name == "countdown":
        return Countdown(difficulty)
    if name == "jsonl":
        if not path:
            raise ValueError("task 'jsonl' needs data=<path to a JSONL of {prompt, answer}>")
        return JsonlTask(path)
    raise ValueError(f"task expected 'arithmetic', 'countdown' or 'jsonl', got {name!r}")
