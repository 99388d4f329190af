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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer tiny Qwen2 of r1train's, saved and loaded back, weights spread so that greedy
    decoding varies (one per test module: some tests change the weights)."""
    from r1train.model import build_tiny_model, load_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("m")), hidden_size=32, num_layers=2,
                            num_heads=2, intermediate_size=64, max_positions=128, seed=0)
    model, tok = load_model(path, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random init predicts one token everywhere: spread it out
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5, generator=g)
    return model, tok
