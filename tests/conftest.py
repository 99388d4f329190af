"""Test setup: without a GPU, run the Triton kernels in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton decorates any kernel, i.e. before r1kernels is
imported, so it is set here at collection time.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from r1kernels import dispatch  # noqa: E402

DEVICE = "cuda" if _HAS_CUDA else "cpu"


def backends_for(op: str) -> list:
    """pytest params: every backend that can run `op` on this machine's test device."""
    return [pytest.param(b, id=b) for b in dispatch.available_backends(op, DEVICE)]


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def single_launch(monkeypatch):
    """The segmented kernel's single launch (PHASE 0: cross-program exchange of each row's
    statistics, next-row prefetch, the gradient written from the held segment) in the
    interpreter, its programs run as concurrent threads (tests/concurrent_interpreter.py) so
    that their waits on each other end. On a GPU the tests run the cooperative launch itself."""
    if DEVICE != "cpu":
        pytest.skip("on a GPU the single launch is the cooperative one (the other tests)")
    from concurrent_interpreter import concurrent_programs
    from r1kernels.ops import token_logprobs as tlp_mod

    monkeypatch.setattr(tlp_mod, "SEG_INTERPRETER_SLOTS", 2)
    with concurrent_programs(timeout=120):
        yield
