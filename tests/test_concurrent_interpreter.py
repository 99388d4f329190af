"""The test harness that runs a launch's programs concurrently in the interpreter
(tests/concurrent_interpreter.py): programs that wait on each other finish, and a wait that can
never end raises instead of hanging."""
import pytest
import torch

from conftest import DEVICE

from concurrent_interpreter import concurrent_programs
from r1kernels.ops._triton import HAS_TRITON, tl, triton

# the harness patches Triton's interpreter, which runs where the tests run on CPU tensors
pytestmark = pytest.mark.skipif(DEVICE != "cpu" or not HAS_TRITON,
                                reason="the interpreter's harness: CPU tests with Triton")


@triton.jit
def _handoff_kernel(cnt_ptr, out_ptr, WANT: tl.constexpr):
    # program 0 waits until WANT other programs have arrived, then writes how many it saw;
    # the others arrive
    pid = tl.program_id(0)
    if pid == 0:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        while seen < WANT:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        tl.store(out_ptr, seen)
    else:
        tl.atomic_add(cnt_ptr, 1, sem="release")


def test_programs_that_wait_on_each_other_finish():
    cnt = torch.zeros(1, dtype=torch.int32)
    out = torch.full((1,), -1, dtype=torch.int32)
    with concurrent_programs(timeout=60):
        _handoff_kernel[(4,)](cnt, out, WANT=3)
    assert out.item() == 3 and cnt.item() == 3


def test_a_wait_that_cannot_end_raises():
    cnt = torch.zeros(1, dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    # (the interpreter wraps a program's error in its InterpreterError, message kept)
    with concurrent_programs(timeout=2), pytest.raises(Exception, match="TimeoutError.*waiting on each other"):
        _handoff_kernel[(3,)](cnt, out, WANT=3)  # only 2 programs ever arrive


def test_harness_is_removed_afterwards():
    """Outside the block the interpreter runs programs one after another again (program 0 runs
    first and would wait forever, so only a grid without waits is launched here)."""
    cnt = torch.zeros(1, dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    with concurrent_programs(timeout=60):
        _handoff_kernel[(2,)](cnt, out, WANT=1)
    from triton.runtime import interpreter

    assert "grid_idx" not in type(interpreter.interpreter_builder).__dict__
    _handoff_kernel[(1,)](cnt, out, WANT=1)  # cnt is already 1: no wait
    assert out.item() == 1
