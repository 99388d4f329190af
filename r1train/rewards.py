"""Rule-based rewards: a safe verifier for answers, the accuracy reward and the format reward.

Model output is never given to `eval`: `safe_eval` parses it with `ast` and walks a whitelist
(numbers, + - * /, unary minus, parentheses) with limits on length, depth and magnitude, so a
completion can at worst be rejected. A reward function has the signature
`fn(completion: str, example: Example) -> float`; `resolve_reward("pkg.module:fn")` loads a user's.
"""
from __future__ import annotations

import ast
import importlib
import math
import re
from fractions import Fraction

from r1train.tasks import Example

MAX_EXPR_CHARS = 200
MAX_ABS = 10 ** 12

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
# The body of a block: any text without a <think>, </think>, <answer> or </answer> tag in it.
_BODY = r"(?:(?!</?(?:think|answer)>).)*"
_FORMAT = re.compile(rf"^\s*<think>{_BODY}</think>\s*<answer>{_BODY}</answer>\s*$", re.S)


class UnsafeExpression(ValueError):
    pass


def safe_eval(expr: str) -> Fraction:
    """Exact value of an arithmetic expression, or UnsafeExpression. No names, calls, powers."""
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


def verify(completion: str, ex: Example) -> bool:
    """True iff the completion's <answer> is correct for `ex`.

    Countdown examples (those with `numbers`) need an expression over a sub-multiset of the
    numbers that equals the target (the number after '>' in the prompt); otherwise the answer
    must equal `ex.answer`, numerically when both parse as numbers, else as stripped text.
    """
    ans = extract_answer(completion)
    if ans is None or ans == "":
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
        try:
            return safe_eval(ans) == safe_eval(ex.answer)
        except UnsafeExpression:
            return ans == ex.answer.strip()
    except (UnsafeExpression, ValueError, ZeroDivisionError, OverflowError, RecursionError,
            MemoryError):
        return False


def accuracy_reward(completion: str, ex: Example) -> float:
    return 1.0 if verify(completion, ex) else 0.0


def format_reward(completion: str, ex: Example) -> float:
    return 1.0 if _FORMAT.match(completion) else 0.0


REWARDS = {"accuracy": accuracy_reward, "format": format_reward}


def resolve_reward(name: str):
    """A built-in reward by name, or a user function given as `package.module:function`."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        mod, fn = name.split(":", 1)
        return getattr(importlib.import_module(mod), fn)
    raise ValueError(f"reward expected one of {sorted(REWARDS)} or 'module:function', got {name!r}")


class RewardFn:
    """Weighted sum of reward functions; also reports per-function values for the metrics."""

    def __init__(self, spec: dict[str, float]):
        self.parts = [(name, resolve_reward(name), float(w)) for name, w in spec.items()]

    def __call__(self, completion: str, ex: Example) -> tuple[float, dict[str, float]]:
        values = {name: fn(completion, ex) for name, fn, _ in self.parts}
        total = sum(w * values[name] for name, _, w in self.parts)
        return total, values
