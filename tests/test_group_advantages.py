import math

import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.reference import group_advantages_ref
from conftest import DEVICE, backends_for

OP = "group_advantages"
BACKENDS = backends_for(OP)


def run(backend, rewards, G, **kw):
    with dispatch.use_backend(backend):
        return r1kernels.group_advantages(rewards, G, **kw)


def check(backend, rewards, G, **kw):
    out = run(backend, rewards.to(DEVICE), G, **kw)
    ref = group_advantages_ref(rewards.double(), G, **kw)
    assert out.dtype == torch.float32 and out.shape == rewards.shape
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("P,G", [(1, 1), (5, 1), (3, 7), (64, 16), (2, 1024), (3, 1500), (0, 4)])
def test_matches_reference(backend, scale, P, G):
    rewards = torch.randn(P * G) * 3 + 1
    check(backend, rewards, G, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,G", [("batch", 16), ("group", 65536)])
def test_long_reductions_keep_fp32_accuracy(backend, scale, G):
    """65536 rewards near 10 that differ in the 3rd decimal: a running fp32 sum loses those
    digits (advantages off by ~1 before the C++ kernel summed in fp64)."""
    rewards = 10 + 0.01 * torch.rand(65536)
    out = run(backend, rewards.to(DEVICE), G, scale=scale)
    ref = group_advantages_ref(rewards.double(), G, scale=scale)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_rewards_and_constant_groups(backend):
    # 0/1 accuracy rewards: constant groups (all right / all wrong) must give exactly 0
    rewards = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0.1, 0.1, 0.1, 0.1])
    for scale in ("group", "batch", "none"):
        out = check(backend, rewards, 4, scale=scale)
        assert (out[:8] == 0).all() and (out[12:] == 0).all()
        assert (out[8:12] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_nan_rewards(backend, scale):
    rewards = torch.randn(6 * 5)
    rewards[[0, 7, 8, 9]] = float("nan")  # group 1 keeps 2 valid rewards
    rewards[10:15] = float("nan")  # group 2: all NaN
    rewards[16:20] = float("nan")  # group 3: one valid reward -> 0
    out = check(backend, rewards, 5, scale=scale)
    assert (out[torch.isnan(rewards)] == 0).all()
    assert (out[15:20] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_and_known_values(backend):
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0])  # mean 1.5, unbiased std sqrt(5/3)
    out = run(backend, rewards.to(DEVICE), 4, eps=0.0).cpu()
    std = math.sqrt(5 / 3)
    torch.testing.assert_close(out, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_and_dtypes(backend):
    rewards = torch.randn(4, 6)
    out = check(backend, rewards, 6)
    assert out.shape == (4, 6)
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64):
        r = (torch.randn(24) * 4).to(dtype)
        out = run(backend, r.to(DEVICE), 6)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.cpu().double(), group_advantages_ref(r.double(), 6), rtol=1e-5, atol=1e-5)
    # non-contiguous
    r = torch.randn(48)[::2]
    check(backend, r, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient(backend):
    for scale in ("group", "batch", "none"):
        r = torch.randn(4 * 6, dtype=torch.float64)
        r[5] = float("nan")
        r[6:12] = 2.0
        x = r.float().to(DEVICE).requires_grad_(True)
        grad = torch.randn(24)
        with dispatch.use_backend(backend):
            r1kernels.group_advantages(x, 6, scale=scale).backward(grad.to(DEVICE))
        xr = r.clone().requires_grad_(True)
        group_advantages_ref(xr, 6, scale=scale).backward(grad.double())
        torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=1e-4, atol=1e-5)
        assert not torch.isnan(x.grad).any()


def test_reference_gradcheck():
    r = torch.randn(3 * 4, dtype=torch.float64, requires_grad=True)
    for scale in ("group", "batch", "none"):
        torch.autograd.gradcheck(lambda x: group_advantages_ref(x, 4, scale=scale), (r,))


@pytest.mark.parametrize("bad", [
    dict(rewards=torch.randn(10), group_size=3),
    dict(rewards=torch.randn(10), group_size=0),
    dict(rewards=torch.randn(10), group_size=2.0),
    dict(rewards=torch.randn(10), group_size=2, scale="std"),
    dict(rewards=torch.randn(10), group_size=2, eps=-1.0),
    dict(rewards=[1.0, 2.0], group_size=2),
    dict(rewards=torch.randn(10), group_size=2, scale=["group"]),
])
def test_bad_input(bad):
    with pytest.raises(ValueError):
        r1kernels.group_advantages(**bad)


def test_cpp_op_validates():
    if "cpp" not in dispatch.available_backends(OP, "cpu"):
        pytest.skip("C++ extension not available (not built)")
    with pytest.raises(ValueError, match="multiple of group_size"):
        torch.ops.r1kernels.group_advantages(torch.randn(10), 3, "group", 1e-4)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.r1kernels.group_advantages(torch.randn(10), 2, "bad", 1e-4)


def test_opcheck():
    if "cpp" not in dispatch.available_backends(OP, "cpu") and not torch.cuda.is_available():
        pytest.skip("C++ extension not available (not built)")
    r = torch.randn(8 * 4, device=DEVICE)
    torch.library.opcheck(torch.ops.r1kernels.group_advantages.default, (r, 4, "group", 1e-4))
    torch.library.opcheck(torch.ops.r1kernels.group_advantages.default, (r, 4, "batch", 1e-4))


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if b in dispatch.available_backends(OP, DEVICE)]
                         + (["cuda", "triton"] if DEVICE == "cuda" else []))
def test_torch_compile_fullgraph(backend):
    r = torch.randn(16 * 8, device=DEVICE)
    with dispatch.use_backend(backend):
        fn = torch.compile(lambda x: r1kernels.group_advantages(x, 8, scale="group"), fullgraph=True)
        out = fn(r)
    torch.testing.assert_close(out.cpu().double(), group_advantages_ref(r.cpu().double(), 8), rtol=1e-5, atol=1e-5)


def test_dispatch_forced_unavailable_raises():
    with dispatch.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cuda"):
            r1kernels.group_advantages(torch.randn(8), 4)
