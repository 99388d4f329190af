"""Rule-based rewards: a safe verifier for answers, the accuracy, format and language rewards.

Model output is never given to `eval`: `safe_eval` parses it with `ast` and walks a whitelist
(numbers, + - * /, unary minus, parentheses) with limits on length, depth and magnitude, so a
completion can at worst be rejected. When `math-verify` is installed, answers are also compared
with its LaTeX parser (fractions, sets, intervals, `\\boxed{}`): an ANTLR grammar tokenizes the
text, and sympy builds the numbers and symbols from the grammar's tokens (`Integer (12 )`,
`Symbol ('x' )`: sympy's parser, which ends in `eval`, sees only such digits and letters; tested).
Its plain-expression parser (sympy's `parse_expr` on the raw text) is never used.

A reward function is either `fn(completion: str, example: Example) -> float` or has TRL's
signature `fn(prompts, completions, **columns) -> list[float | None]` (recognised by a
`completions` parameter): it gets the batch, `answer` and the dataset's other columns as lists.
None means the function does not apply to that sample (as in TRL); a sample for which every
function returns None is skipped (no advantage, no loss). `resolve_reward("pkg.module:fn")` loads
a user's function.
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import math
import re
import threading
import unicodedata
from fractions import Fraction

from r1train.tasks import Example

try:  # optional (`pip install "r1kernels[math]"`); imported here, not while grading
    import math_verify as _mv
except ImportError:
    _mv = None


def verifier_report() -> str:
    """What grades answers in this environment (summary.json's `verifier`): math-verify, when
    installed, accepts some answers the arithmetic verifier rejects, which changes a run."""
    if _mv is None:
        return "arithmetic (math-verify not installed)"
    from importlib.metadata import version

    return f"arithmetic, then math-verify {version('math-verify')} (LaTeX)"


MAX_EXPR_CHARS = 200
MAX_ABS = 10 ** 12

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
# The body of a block: any text without a <think>, </think>, <answer> or </answer> tag in it.
_BODY = r"(?:(?!</?(?:think|answer)>).)*"
_FORMAT = re.compile(rf"^\s*<think>{_BODY}</think>\s*<answer>{_BODY}</answer>\s*$", re.S)


class UnsafeExpression(ValueError):
    pass


@functools.lru_cache(maxsize=4096)
def safe_eval(expr: str) -> Fraction:
    """Exact value of an arithmetic expression, or UnsafeExpression. No names, calls, powers.
    Cached (a pure function of the text; a Fraction is immutable): a group's completions and a
    run's steps repeat answers, and every completion of a prompt is compared with the same gold
    answer (scoring a GRPO step of the trained default model: 1.4 -> 0.4 ms). A rejected text
    is not cached."""
    if len(expr) > MAX_EXPR_CHARS:
        raise UnsafeExpression("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise UnsafeExpression(f"not an expression: {e}") from None
    return _walk(tree.body, 0)


def _walk(node, depth: int) -> Fraction:
    if depth > 50:
        raise UnsafeExpression("expression too deep")
    if isinstance(node, ast.Constant) and type(node.value) is int:
        v = Fraction(node.value)
    elif isinstance(node, ast.Constant) and type(node.value) is float:
        if not math.isfinite(node.value):  # 1e999 parses as inf
            raise UnsafeExpression("value too large")
        # the literal's shortest decimal form, exactly: 0.3 is 3/10 (Fraction(0.3) is not)
        v = Fraction(repr(node.value))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _walk(node.operand, depth + 1)
        v = -v if isinstance(node.op, ast.USub) else v
    elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _walk(node.left, depth + 1), _walk(node.right, depth + 1)
        if isinstance(node.op, ast.Add):
            v = a + b
        elif isinstance(node.op, ast.Sub):
            v = a - b
        elif isinstance(node.op, ast.Mult):
            v = a * b
        else:
            if b == 0:
                raise UnsafeExpression("division by zero")
            v = a / b
    else:
        raise UnsafeExpression(f"disallowed syntax: {type(node).__name__}")
    if abs(v) > MAX_ABS:
        raise UnsafeExpression("value too large")
    return v


def _numbers_used(expr: str) -> list[int]:
    tree = ast.parse(expr.strip(), mode="eval")
    consts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    if any(type(c) is not int for c in consts):
        raise UnsafeExpression("countdown answers use the given integers only")
    return sorted(consts)


def extract_answer(completion: str) -> str | None:
    """The text of the first <answer> block after the last </think> (after the start when there
    is none): an answer written inside the reasoning is not the answer."""
    tail = completion.rsplit("</think>", 1)[-1]
    m = _ANSWER.search(tail)
    return m.group(1).strip() if m else None


def gold_answer(answer: str) -> str:
    """The reference answer to compare with: the text after GSM8K's `####` when present."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def _math_verify(gold: str, ans: str) -> bool | None:
    """math-verify's verdict with its LaTeX parser only; None when it is not installed or cannot
    parse either side."""
    if _mv is None:
        return None
    main = threading.current_thread() is threading.main_thread()  # its timeouts use SIGALRM
    t = 5 if main else None
    cfg = [_mv.LatexExtractionConfig(boxed_match_priority=0)]

    def parsed(text):
        text = text if "$" in text or "\\boxed" in text else f"${text}$"
        return _mv.parse(text, extraction_config=cfg, parsing_timeout=t)

    g, a = parsed(gold), parsed(ans)
    if not g or not a:
        return None
    return bool(_mv.verify(g, a, timeout_seconds=t))


def verify(completion: str, ex: Example) -> bool:
    """True iff the completion's <answer> is correct for `ex`.

    Countdown examples (those with `numbers`) need an expression over a sub-multiset of the
    numbers that equals the target (the number after '>' in the prompt); otherwise the answer
    must equal `gold_answer(ex.answer)`: numerically when both parse as arithmetic, else by
    math-verify when installed and both parse as LaTeX, else as stripped text.
    """
    ans = extract_answer(completion)
    if ans is None or ans == "" or len(ans) > MAX_EXPR_CHARS:
        return False
    try:
        if ex.numbers:
            target = Fraction(ex.prompt.rsplit(">", 1)[1].rstrip(":").strip())
            value = safe_eval(ans)  # validates the syntax before the numbers are read
            used = _numbers_used(ans)
            pool = list(ex.numbers)
            for n in used:
                if n not in pool:
                    return False
                pool.remove(n)
            return value == target
        gold = gold_answer(ex.answer)
        try:
            return safe_eval(ans) == safe_eval(gold)
        except UnsafeExpression:
            pass
        if ans == gold:
            return True
        return bool(_math_verify(gold, ans))
    except (UnsafeExpression, ValueError, ZeroDivisionError, OverflowError, RecursionError,
            MemoryError):
        return False


def accuracy_reward(completion: str, ex: Example) -> float:
    return 1.0 if verify(completion, ex) else 0.0


def format_reward(completion: str, ex: Example) -> float:
    return 1.0 if _FORMAT.match(completion) else 0.0


_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_WORD = re.compile(r"[^\W\d_]+")  # a run of letters (digits, signs and spaces are no language's)


def _script_of(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else ""


def language_reward(completion: str, ex: Example, scripts: str = "latin") -> float:
    """R1's language consistency: the share of the chain of thought's words written in the target
    script(s) (`scripts`: comma-separated Unicode script names, e.g. `latin` or `cjk,hiragana`).
    A word is a run of letters; it counts when all its letters are in a target script. A chain of
    thought with no words (digits and signs only) scores 1, a completion without one scores 0."""
    m = _THINK.search(completion)
    if m is None:
        return 0.0
    targets = {t.strip().upper() for t in scripts.split(",") if t.strip()}
    words = _WORD.findall(m.group(1))
    if not words:
        return 1.0
    ok = sum(all(_script_of(c) in targets for c in w) for w in words)
    return ok / len(words)


REWARDS = {"accuracy": accuracy_reward, "format": format_reward, "language": language_reward}


def resolve_reward(name: str, language: str = "latin"):
    """A built-in reward by name, or a user function given as `package.module:function`."""
    if name == "language":
        return functools.partial(language_reward, scripts=language)
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        mod, fn = name.split(":", 1)
        return getattr(importlib.import_module(mod), fn)
    raise ValueError(f"reward expected one of {sorted(REWARDS)} or 'module:function', got {name!r}")


def is_batched(fn) -> bool:
    """True for TRL's signature `fn(prompts, completions, **columns)`."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class RewardFn:
    """Weighted sum of reward functions over a batch; also reports per-function values."""

    def __init__(self, spec: dict[str, float], language: str = "latin"):
        self.parts = [(name, resolve_reward(name, language), float(w)) for name, w in spec.items()]

    def __call__(self, prompts: list[str], completions: list[str], examples: list[Example]
                 ) -> tuple[list[float | None], dict[str, list[float | None]]]:
        """(total per sample, None where every function returned None; values per function)."""
        n = len(completions)
        values = {}
        for name, fn, _ in self.parts:
            if is_batched(fn):
                cols = {"answer": [e.answer for e in examples]}
                for k in {k for e in examples for k in e.columns}:
                    cols[k] = [e.columns.get(k) for e in examples]
                out = list(fn(prompts=list(prompts), completions=list(completions), **cols))
                if len(out) != n:
                    raise ValueError(f"reward {name}: returned {len(out)} values for {n} "
                                     f"completions")
            else:
                out = [fn(c, e) for c, e in zip(completions, examples)]
            values[name] = [None if v is None else float(v) for v in out]
        totals = []
        for i in range(n):
            got = [(w, values[name][i]) for name, _, w in self.parts if values[name][i] is not None]
            totals.append(sum(w * v for w, v in got) if got else None)
        return totals, values
