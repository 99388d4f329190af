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
