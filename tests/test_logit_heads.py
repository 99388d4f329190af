"""Heads that transform their logits (docs/api.md): `logit_scale` (Cohere, Granite) and
`softcap` (Gemma's final_logit_softcapping) in every log-prob op, GRPOLoss and
GRPOLoss.from_logits, every backend, against the float64 references and against the models of
transformers themselves.

Tolerances: as the plain head's tests (fp32 kernels: values at fp32 accuracy, gradients rounded
once to the logits' dtype). The soft-cap adds one fp32 tanh per logit (relative error a few
units of 2**-24) and its derivative sech^2, taken as 4e / (1 + e)^2 from e = exp(-2|y|): no
cancellation where tanh saturates, so a saturated logit's gradient (sech^2 ~ 1e-40 at |y| = 46)
keeps its relative accuracy instead of becoming 1 - t^2 = 0 or 1.2e-7.
"""
import math

import numpy as np
import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.nn import GRPOLoss
from r1kernels.ops import linear_token_logprobs as lin
from r1kernels.ops import token_logprobs as tlp
from r1kernels.reference import (grpo_loss_ref, linear_token_logprobs_ref,
                                 token_logprobs_ref)
from conftest import DEVICE, backends_for

BACKENDS = backends_for("token_logprobs")
LIN_BACKENDS = backends_for("linear_token_logprobs")
GRPO_BACKENDS = backends_for("grpo_loss")

# (softcap, logit_scale, temperature): Gemma-2/3 (30), a cap the logits saturate (2, with a
# scale), Cohere (0.0625), Granite (1 / logits_scaling), negative scales (allowed by the API)
HEADS = [(30.0, 1.0, 1.0), (2.0, 0.5, 0.7), (None, 0.0625, 1.0), (None, 1 / 8.0, 0.6),
         (None, -0.3, 1.0), (5.0, -2.0, 1.3)]
HEAD_IDS = ["cap30", "cap2-scaled-T", "cohere", "granite-T", "negative", "cap-negative"]


def head_kw(head):
    softcap, scale, temperature = head
    return dict(softcap=softcap, logit_scale=scale, temperature=temperature)


def logits_for(N, V, dtype=torch.float32, seed=0, neg_inf=True):
    """Random logits with saturating rows: +-1e3 (tanh is +-1 to fp32 and float64 precision
    alike; sech^2 underflows), a row of exact ties at 1e3, a -inf entry (soft-capped: -softcap;
    without a soft-cap its p = 0 makes the reference's entropy gradient NaN, so neg_inf=False),
    and labels with ignore_index rows and a label at the saturated maximum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 20
    x[0, :3] = 1e3
    x[1] = torch.linspace(-1e3, 1e3, V, dtype=torch.float64)
    if neg_inf:
        x[2, 5] = float("-inf")
    y = torch.randint(0, V, (N,), generator=g)
    y[0], y[1] = 1, V - 1
    y[3] = -100
    return x.to(dtype), y


def check_values_and_grads(ours, refs, x, xr, weights, dtype, rtol=1e-5, atol=2e-5):
    for o, r in zip(ours, refs):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.detach().cpu().double(), r.detach(), rtol=rtol, atol=atol)
    sum((o.double() * w.to(o.device)).sum() for o, w in zip(ours, weights)).backward()
    sum((r * w).sum() for r, w in zip(refs, weights)).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    grad_rtol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8}[dtype]
    scale = max(xr.grad.abs().max().item(), 1.0)
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=grad_rtol,
                               atol=grad_rtol * scale)


# ---- token_logprobs -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_token_logprobs(backend, head):
    """logp and entropy and their gradients (entropy's included), saturating logits, -inf,
    ignore_index, against float64 autograd of the reference's head."""
    logits, labels = logits_for(9, 131, neg_inf=head[0] is not None)
    x = logits.to(DEVICE).clone().requires_grad_(True)
    with dispatch.use_backend(backend):
        out = r1kernels.token_logprobs(x, labels.to(DEVICE), with_entropy=True, **head_kw(head))
    xr = logits.double().requires_grad_(True)
    ref = token_logprobs_ref(xr, labels, with_entropy=True, **head_kw(head))
    assert (out[0][3] == 0).all() and (out[1][3] == 0).all()
    weights = [torch.randn(9, dtype=torch.float64) for _ in range(2)]
    # atol: |z| reaches 1e3 * |scale| / T without a soft-cap; fp32 rounds it at 2**-24 relative
    softcap, scale, temperature = head
    zmax = (softcap if softcap else 1e3 * abs(scale)) / temperature
    check_values_and_grads(out, ref, x, xr, weights, torch.float32, atol=max(2e-5, 4e-7 * zmax))
    assert (x.grad[3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_bf16(backend):
    """bf16 logits: the values are compared with the float64 head on the same bf16 logits (fp32
    accuracy: the kernels upcast first), the gradient after its one rounding to bf16."""
    logits, labels = logits_for(6, 300, dtype=torch.bfloat16, seed=1)
    kw = dict(softcap=30.0, logit_scale=1.0, temperature=0.9)
    x = logits.to(DEVICE).clone().requires_grad_(True)
    with dispatch.use_backend(backend):
        out = r1kernels.token_logprobs(x, labels.to(DEVICE), with_entropy=True, **kw)
    xr = logits.double().requires_grad_(True)
    ref = token_logprobs_ref(xr, labels, with_entropy=True, **kw)
    weights = [torch.randn(6, dtype=torch.float64) for _ in range(2)]
    check_values_and_grads(out, ref, x, xr, weights, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", HEADS[:2] + HEADS[4:5], ids=HEAD_IDS[:2] + HEAD_IDS[4:5])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_token_logprobs_fwd_bwd(backend, head, inplace):
    """token_logprobs_fwd_bwd (the fused kernel on Triton) == float64 autograd, in place too."""
    logits, labels = logits_for(2 * 5, 67, seed=2, neg_inf=head[0] is not None)
    logits, labels = logits.view(2, 5, 67), labels.view(2, 5)
    glp, gent = torch.randn(2, 5), torch.randn(2, 5)
    x = logits.to(DEVICE).clone()
    with dispatch.use_backend(backend):
        lp, ent, g = r1kernels.token_logprobs_fwd_bwd(
            x, labels.to(DEVICE), glp.to(DEVICE), grad_entropy=gent.to(DEVICE),
            with_entropy=True, inplace=inplace, **head_kw(head))
    if inplace:
        assert g.data_ptr() == x.data_ptr()
    xr = logits.double().requires_grad_(True)
    lr, er = token_logprobs_ref(xr, labels, with_entropy=True, **head_kw(head))
    ((lr * glp.double()).sum() + (er * gent.double()).sum()).backward()
    zmax = (head[0] if head[0] else 1e3 * abs(head[1])) / head[2]
    torch.testing.assert_close(lp.cpu().double(), lr.detach(), rtol=1e-5, atol=max(2e-5, 4e-7 * zmax))
    torch.testing.assert_close(ent.cpu().double(), er.detach(), rtol=1e-5, atol=2e-5)
    scale = max(xr.grad.abs().max().item(), 1.0)
    torch.testing.assert_close(g.cpu().double(), xr.grad, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.skipif("triton" not in [p.values[0] for p in BACKENDS], reason="Triton cannot run here")
@pytest.mark.parametrize("config", ["2,4,64,1", "1,4,128,0", "0,4,64,0,1,32"],
                         ids=["lanes", "block-stats", "two-launches-1-warp-stats"])
@pytest.mark.parametrize("head", [HEADS[1], HEADS[4]], ids=[HEAD_IDS[1], HEAD_IDS[4]])
def test_fused_kernel_launch_configs(monkeypatch, config, head):
    """The fused Triton kernel's pass-1 variants (per-lane or block statistics, persistent or
    two launches) with a soft-capped and a negatively scaled head: the padding of the last block
    stays -inf after the head (tanh would make it -1, a negative scale +inf)."""
    monkeypatch.setenv("R1K_FUSED_LOGITS", config)
    logits, labels = logits_for(7, 150, seed=7, neg_inf=head[0] is not None)
    glp, gent = torch.randn(7), torch.randn(7)
    with dispatch.use_backend("triton"):
        lp, ent, g = r1kernels.token_logprobs_fwd_bwd(
            logits.to(DEVICE), labels.to(DEVICE), glp.to(DEVICE), grad_entropy=gent.to(DEVICE),
            with_entropy=True, **head_kw(head))
    xr = logits.double().requires_grad_(True)
    lr, er = token_logprobs_ref(xr, labels, with_entropy=True, **head_kw(head))
    ((lr * glp.double()).sum() + (er * gent.double()).sum()).backward()
    zmax = (head[0] if head[0] else 1e3 * abs(head[1])) / head[2]
    torch.testing.assert_close(lp.cpu().double(), lr.detach(), rtol=1e-5, atol=max(2e-5, 4e-7 * zmax))
    torch.testing.assert_close(ent.cpu().double(), er.detach(), rtol=1e-5, atol=2e-5)
    scale = max(xr.grad.abs().max().item(), 1.0)
    torch.testing.assert_close(g.cpu().double(), xr.grad, rtol=1e-5, atol=1e-5 * scale)


def test_softcap_changes_the_result():
    """The head reaches the kernels: without it the numbers differ (a test that could fail)."""
    logits, labels = logits_for(4, 50, seed=3)
    a = r1kernels.token_logprobs(logits, labels, softcap=2.0)
    b = r1kernels.token_logprobs(logits, labels)
    c = r1kernels.token_logprobs(logits, labels, logit_scale=0.5)
    assert (a - b).abs().max() > 1 and (c - b).abs().max() > 1


def test_plain_head_unchanged():
    """softcap=None, logit_scale=1 is the plain head: the same bits as without the keywords."""
    logits, labels = logits_for(5, 77, seed=4)
    for backend in [p.values[0] for p in BACKENDS]:
        with dispatch.use_backend(backend):
            a = r1kernels.token_logprobs(logits, labels, with_entropy=True)
            b = r1kernels.token_logprobs(logits, labels, with_entropy=True, softcap=None,
                                         logit_scale=1.0)
        assert all(torch.equal(u, v) for u, v in zip(a, b)), backend
    assert tlp.head_constants("op", 0.5, None, 1.0) == (2.0, 0.0)


@pytest.mark.parametrize("fn", ["token_logprobs", "linear_token_logprobs", "GRPOLoss"])
@pytest.mark.parametrize("kw,match", [
    (dict(softcap=0.0), "softcap"), (dict(softcap=-30.0), "softcap"),
    (dict(softcap=math.inf), "softcap"), (dict(softcap=math.nan), "softcap"),
    (dict(softcap=True), "softcap"), (dict(softcap="30"), "softcap"),
    (dict(softcap=torch.tensor(30.0)), "softcap"),
    (dict(logit_scale=0.0), "logit_scale"), (dict(logit_scale=math.inf), "logit_scale"),
    (dict(logit_scale=math.nan), "logit_scale"), (dict(logit_scale=None), "logit_scale"),
    (dict(logit_scale=1e300), "logit_scale"), (dict(softcap=1e-300), "logit_scale"),
    (dict(softcap=1e300), "softcap"),
])
def test_bad_head_arguments(fn, kw, match):
    x, y = torch.randn(3, 11), torch.randint(0, 11, (3,))
    with pytest.raises(ValueError, match=match):
        if fn == "token_logprobs":
            r1kernels.token_logprobs(x, y, **kw)
        elif fn == "linear_token_logprobs":
            r1kernels.linear_token_logprobs(torch.randn(3, 4), torch.randn(11, 4), y, **kw)
        else:
            GRPOLoss(**kw)


def test_numpy_scalars_accepted():
    logits, labels = logits_for(5, 20, seed=5)
    a = r1kernels.token_logprobs(logits, labels, softcap=np.float32(2.0), logit_scale=np.float64(0.5))
    b = r1kernels.token_logprobs(logits, labels, softcap=2.0, logit_scale=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_gradcheck():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 6])
    for kw in (dict(softcap=1.5, logit_scale=-0.7, temperature=0.8), dict(logit_scale=3.0)):
        torch.autograd.gradcheck(
            lambda t: token_logprobs_ref(t, y, with_entropy=True, **kw), (x,))


# ---- linear_token_logprobs ----------------------------------------------------------------------


def linear_inputs(N, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 8  # logits ~ +-100: saturates
    b = torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[[1, 6]] = -100
    return h, w, b, y


@pytest.mark.parametrize("backend", LIN_BACKENDS)
@pytest.mark.parametrize("head", HEADS[:2] + HEADS[3:5], ids=HEAD_IDS[:2] + HEAD_IDS[3:5])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_linear_token_logprobs(backend, head, tiles, monkeypatch):
    """Values and the gradients of hidden, weight and bias; "small": several row and vocabulary
    tiles (statistics merged across tiles)."""
    if tiles == "small":
        monkeypatch.setattr(lin, "TILE_ELEMS_CPU", 24 * 128)
        monkeypatch.setattr(lin, "TILE_ELEMS_CUDA", 24 * 128)
        monkeypatch.setattr(lin, "MAX_TILE_ROWS", 5)
    h, w, b, y = linear_inputs(11, 16, 300)
    ours = [t.float().to(DEVICE).requires_grad_(True) for t in (h, w, b)]
    refs = [t.clone().requires_grad_(True) for t in (h, w, b)]
    with dispatch.use_backend(backend):
        out = r1kernels.linear_token_logprobs(ours[0], ours[1], y.to(DEVICE), bias=ours[2],
                                              with_entropy=True, **head_kw(head))
    ref = linear_token_logprobs_ref(refs[0], refs[1], y, bias=refs[2], with_entropy=True,
                                    **head_kw(head))
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.detach().cpu().double(), r.detach(), rtol=1e-5, atol=5e-5)
    weights = [torch.randn(11, dtype=torch.float64) for _ in range(2)]
    sum((o.double() * wt.to(DEVICE)).sum() for o, wt in zip(out, weights)).backward()
    sum((r * wt).sum() for r, wt in zip(ref, weights)).backward()
    for name, a, r in zip(("hidden", "weight", "bias"), ours, refs):
        scale = max(r.grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(a.grad.cpu().double(), r.grad, rtol=1e-4, atol=2e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", LIN_BACKENDS)
def test_linear_token_logprobs_bf16(backend):
    """bf16 hidden and weight: values against the float64 head on the same bf16 inputs (fp32
    GEMM accumulation and statistics: fp32 accuracy), gradients after their one rounding to bf16
    (2**-8 relative, doubled for the fp32 sums over V or N terms before it, as the plain head's
    tests)."""
    h, w, b, y = linear_inputs(9, 16, 257, seed=3)
    h, w = h.to(torch.bfloat16), w.to(torch.bfloat16)
    kw = dict(softcap=30.0, logit_scale=1.0, temperature=0.8)
    ours = [t.to(DEVICE).clone().requires_grad_(True) for t in (h, w)]
    refs = [t.double().requires_grad_(True) for t in (h, w)]
    with dispatch.use_backend(backend):
        lp, en = r1kernels.linear_token_logprobs(*ours, y.to(DEVICE), with_entropy=True, **kw)
    lr, er = linear_token_logprobs_ref(*refs, y, with_entropy=True, **kw)
    torch.testing.assert_close(lp.detach().cpu().double(), lr.detach(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(en.detach().cpu().double(), er.detach(), rtol=1e-5, atol=5e-5)
    (lp.sum() + en.sum()).backward()
    (lr.sum() + er.sum()).backward()
    for a, r in zip(ours, refs):
        assert a.grad.dtype == torch.bfloat16
        scale = r.grad.abs().max().item()
        torch.testing.assert_close(a.grad.cpu().double(), r.grad, rtol=2 ** -7,
                                   atol=2 ** -7 * scale)


@pytest.mark.parametrize("backend", LIN_BACKENDS)
@pytest.mark.parametrize("sweep", ["one", "two"])
def test_linear_token_logprobs_fwd_bwd(backend, sweep, monkeypatch):
    """The single sweep (G written over the chunk's logits) and, forced, the two-sweep order."""
    if sweep == "two":
        monkeypatch.setattr(lin, "SINGLE_SWEEP_MAX_CHUNK_ELEMS_CPU", 1)
        monkeypatch.setattr(lin, "SINGLE_SWEEP_MAX_CHUNK_ELEMS_CUDA", 1)
    h, w, b, y = linear_inputs(10, 16, 203, seed=1)
    glp, gent = torch.randn(10), torch.randn(10)
    kw = dict(softcap=30.0, logit_scale=0.8, temperature=0.9)
    with dispatch.use_backend(backend):
        lp, en, gh, gw, gb = r1kernels.linear_token_logprobs_fwd_bwd(
            h.float().to(DEVICE), w.float().to(DEVICE), y.to(DEVICE), glp.to(DEVICE),
            grad_entropy=gent.to(DEVICE), bias=b.float().to(DEVICE), with_entropy=True, **kw)
    refs = [t.clone().requires_grad_(True) for t in (h, w, b)]
    lr, er = linear_token_logprobs_ref(*refs[:2], y, bias=refs[2], with_entropy=True, **kw)
    ((lr * glp.double()).sum() + (er * gent.double()).sum()).backward()
    torch.testing.assert_close(lp.cpu().double(), lr.detach(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(en.cpu().double(), er.detach(), rtol=1e-5, atol=5e-5)
    for name, a, r in zip(("hidden", "weight", "bias"), (gh, gw, gb), refs):
        scale = max(r.grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(a.cpu().double(), r.grad, rtol=1e-4, atol=2e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif("triton" not in [p.values[0] for p in LIN_BACKENDS],
                    reason="Triton cannot run here")
def test_linear_fused_gemm_kernels(monkeypatch):
    """The opt-in fused tl.dot kernels with a soft-capped head (blocks not dividing the shapes)."""
    monkeypatch.setattr(lin, "FUSED_GEMM", True)
    monkeypatch.setattr(lin, "FUSED_BLOCKS", dict(BM=16, BN=32, BK=16, num_warps=4, num_stages=2))
    h, w, b, y = linear_inputs(13, 16, 75, seed=2)
    kw = dict(softcap=2.0, logit_scale=-1.5, temperature=0.8)
    ours = [t.float().requires_grad_(True) for t in (h, w, b)]
    with dispatch.use_backend("triton"):
        lp, en = r1kernels.linear_token_logprobs(*ours[:2], y, bias=ours[2], with_entropy=True,
                                                 **kw)
    refs = [t.clone().requires_grad_(True) for t in (h, w, b)]
    lr, er = linear_token_logprobs_ref(*refs[:2], y, bias=refs[2], with_entropy=True, **kw)
    torch.testing.assert_close(lp.detach().double(), lr.detach(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(en.detach().double(), er.detach(), rtol=1e-5, atol=5e-5)
    (lp.sum() + en.sum()).backward()
    (lr.sum() + er.sum()).backward()
    for a, r in zip(ours, refs):
        scale = max(r.grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=2e-5 * scale)


# ---- GRPOLoss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GRPO_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("head", [HEADS[0], HEADS[3]], ids=[HEAD_IDS[0], HEAD_IDS[3]])
def test_grpo_loss(backend, level, head):
    """GRPOLoss (hidden states) and GRPOLoss.from_logits (out of place and in place) with the
    head's constructor arguments == grpo_loss_ref(linear_token_logprobs_ref(..., head)): loss,
    entropy metric, gradients; masked rows."""
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 6, 16, 60
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 6
    b = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[1] = False
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    kw = head_kw(head)
    with torch.no_grad():
        old = linear_token_logprobs_ref(h, w, labels, bias=b, **kw) + 0.1 * torch.randn(
            B, T, generator=g, dtype=torch.float64)
    opts = dict(loss_type="dapo", epsilon_high=0.28, importance_sampling_level=level)
    refs = [t.clone().requires_grad_(True) for t in (h, w, b)]
    lp, ent = linear_token_logprobs_ref(*refs[:2], labels, bias=refs[2], with_entropy=True, **kw)
    rloss = grpo_loss_ref(lp, adv, mask, old_logps=old, **opts)[0]
    rloss.backward()
    rent = (ent.detach() * mask).sum() / mask.sum()
    fn = GRPOLoss(**opts, **kw)
    assert "softcap" in repr(fn) or head[0] is None
    f32 = lambda t: t.float().to(DEVICE)  # noqa: E731
    ours = [f32(t).requires_grad_(True) for t in (h, w, b)]
    with dispatch.use_backend(backend):
        out = fn(*ours[:2], labels.to(DEVICE), mask.to(DEVICE), f32(adv), bias=ours[2],
                 old_logps=f32(old))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(rloss.item(), rel=1e-5, abs=1e-6)
    assert out.metrics["entropy"].item() == pytest.approx(rent.item(), rel=1e-5, abs=1e-6)
    for a, r in zip(ours, refs):
        torch.testing.assert_close(a.grad.double().cpu(), r.grad, rtol=1e-4, atol=1e-6)
    for inplace in (False, True):
        logits = (h @ w.T + b).clone().requires_grad_(True)
        lpr = token_logprobs_ref(logits, labels, **kw)
        grpo_loss_ref(lpr, adv, mask, old_logps=old, **opts)[0].backward()
        x = f32(logits.detach()).requires_grad_(True)
        with dispatch.use_backend(backend):
            out = fn.from_logits(x, labels.to(DEVICE), mask.to(DEVICE), f32(adv),
                                 old_logps=f32(old), inplace=inplace)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(rloss.item(), rel=1e-5, abs=1e-6)
        assert out.metrics["entropy"].item() == pytest.approx(rent.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(x.grad.double().cpu(), logits.grad, rtol=1e-4, atol=1e-7)


# ---- the models of transformers -------------------------------------------------------------


def _tiny(kind):
    """(model in float64, head keywords read from its config as the model's code applies them):
    Gemma-2 / Gemma-3 (logits / c, tanh, * c), Cohere (logits * logit_scale), Granite
    (logits / logits_scaling)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(final_logit_softcapping=30.0, **common)
        model = transformers.Gemma3ForCausalLM(cfg)
        kw = dict(softcap=cfg.final_logit_softcapping)
    elif kind == "gemma2":
        cfg = transformers.Gemma2Config(final_logit_softcapping=30.0, **common)
        model = transformers.Gemma2ForCausalLM(cfg)
        kw = dict(softcap=cfg.final_logit_softcapping)
    elif kind == "cohere":
        cfg = transformers.CohereConfig(logit_scale=0.0625, **common)
        model = transformers.CohereForCausalLM(cfg)
        kw = dict(logit_scale=cfg.logit_scale)
    else:
        cfg = transformers.GraniteConfig(logits_scaling=8.0, **common)
        model = transformers.GraniteForCausalLM(cfg)
        kw = dict(logit_scale=1.0 / cfg.logits_scaling)  # Granite divides
    model = model.double().eval()
    with torch.no_grad():  # logits of +-100s: the soft-cap saturates, the scale matters
        model.lm_head.weight.normal_(0.0, 40.0 / cfg.hidden_size ** 0.5)
    return model, kw


@pytest.mark.parametrize("backend", LIN_BACKENDS)
@pytest.mark.parametrize("kind", ["gemma3", "gemma2", "cohere", "granite"])
def test_transformers_heads(backend, kind):
    """The model's own logits (its forward, with its head transform) -> log_softmax at the labels,
    and their gradients with respect to the lm_head's input and weight, against
    linear_token_logprobs(hidden, lm_head.weight, labels, **head from the config)."""
    torch.manual_seed(0)
    model, kw = _tiny(kind)
    ids = torch.randint(0, 96, (2, 9))
    labels = torch.randint(0, 96, (2, 9))
    labels[0, :3] = -100
    captured = []

    def as_leaf(module, args):  # the lm_head's input as a leaf: its gradient, and the weight's
        captured.append(args[0].detach().requires_grad_(True))
        return (captured[0],)

    hook = model.lm_head.register_forward_pre_hook(as_leaf)
    try:
        logits = model(input_ids=ids).logits
    finally:
        hook.remove()
    hidden = captured[0]
    lp_all = logits.double().log_softmax(-1)
    ref = lp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = torch.where(labels == -100, torch.zeros_like(ref), ref)
    gw = torch.randn(2, 9, dtype=torch.float64)
    (ref * gw).sum().backward()
    h = hidden.detach().float().to(DEVICE).requires_grad_(True)
    w = model.lm_head.weight.detach().float().to(DEVICE).requires_grad_(True)
    with dispatch.use_backend(backend):
        lp = r1kernels.linear_token_logprobs(h, w, labels.to(DEVICE), **kw)
        plain = r1kernels.linear_token_logprobs(h.detach(), w.detach(), labels.to(DEVICE))
    assert (plain.cpu().double() - ref.detach()).abs().max() > 1e-2  # the head matters here
    torch.testing.assert_close(lp.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=5e-5)
    (lp.double() * gw.to(DEVICE)).sum().backward()
    for a, r in ((h, hidden), (w, model.lm_head.weight)):
        scale = r.grad.abs().max().item()
        torch.testing.assert_close(a.grad.cpu().double(), r.grad, rtol=1e-4, atol=1e-5 * scale)


# ---- the cluster kernel (sm_90; skipped elsewhere: its host math is checked by
# tests/csrc/fused_logits_math_test.cu, its plumbing by test_fused_logits_cluster.py's emulation) --

ON_SM90 = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
           and r1kernels._custom_ops.has_kernel("fused_logits_cluster", "CUDA"))
SM90 = pytest.mark.skipif(not ON_SM90, reason="needs a GPU of compute capability 9+ and the CUDA "
                                              "build of the extension")


def test_cluster_takes_positive_heads_only():
    assert tlp.cluster_head_ok(*tlp.head_constants("op", 0.7, 30.0, 0.5))
    assert tlp.cluster_head_ok(*tlp.head_constants("op", 1.0, None, 0.0625))
    assert not tlp.cluster_head_ok(*tlp.head_constants("op", 1.0, None, -0.3))
    assert not tlp.cluster_head_ok(*tlp.head_constants("op", 1.0, 30.0, -0.3))


@SM90
@pytest.mark.parametrize("setting", [(8, 256, 0), (1, 256, 0), (16, 512, 0), (8, 256, 1)],
                         ids=str)  # (the last two: soft-capped heads fall back to Triton)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_cluster_kernel_softcap(monkeypatch, setting, dtype, inplace):
    """token_logprobs_fwd_bwd on the cluster kernel's soft-capped instances against float64:
    saturating logits (+-1e3 in bf16, +-6e4 in fp16), -inf (-> -softcap), an ignored row, a
    dead row, labels on the first and last columns."""
    monkeypatch.setenv("R1K_FUSED_CLUSTER", ",".join(map(str, setting)))
    big = 1e3 if dtype == torch.bfloat16 else 6e4
    g = torch.Generator().manual_seed(setting[0])
    N, V = 12, 4096
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 20
    x[0, ::7] = big
    x[1, 1::3] = -big
    x[2, 100:300] = float("-inf")
    y = torch.randint(0, V, (N,), generator=g)
    y[0], y[1], y[4] = 0, V - 1, -100
    x = x.to(dtype)
    glp, gent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    glp[5] = gent[5] = 0.0
    kw = dict(softcap=30.0, logit_scale=0.8, temperature=0.7)
    xd = x.cuda()
    assert tlp.cluster_config(xd.view(1, N, V), xd.view(1, N, V)) == setting
    lp, ent, gx = r1kernels.token_logprobs_fwd_bwd(
        xd, y.cuda(), glp.cuda(), grad_entropy=gent.cuda(), with_entropy=True, inplace=inplace,
        **kw)
    xr = x.double().requires_grad_(True)
    lr, er = token_logprobs_ref(xr, y, with_entropy=True, **kw)
    ((lr * glp.double()).sum() + (er * gent.double()).sum()).backward()
    torch.testing.assert_close(lp.cpu().double(), lr.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), er.detach(), rtol=1e-5, atol=1e-5)
    rtol = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    torch.testing.assert_close(gx.cpu().double(), xr.grad, rtol=rtol, atol=1e-7)
    assert (gx[4] == 0).all() and (gx[5] == 0).all()


@SM90
@pytest.mark.parametrize("level_from_logits", [False, True], ids=["hidden", "from_logits"])
def test_cluster_grpo_softcap(monkeypatch, level_from_logits):
    """GRPOLoss (bf16 hidden states: the single sweep's chunk hook) and GRPOLoss.from_logits
    (bf16 logits) with a soft-capped head: the cluster kernel's result equals the Triton
    kernels' (R1K_FUSED_CLUSTER=0)."""
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 4, 33, 64, 4096
    h = torch.randn(B, T, H, generator=g).to(torch.bfloat16).cuda()
    w = (torch.randn(V, H, generator=g) * 0.5).to(torch.bfloat16).cuda()
    y = torch.randint(0, V, (B, T), generator=g).cuda()
    mask = (torch.rand(B, T, generator=g) < 0.8).cuda()
    adv = torch.randn(B, generator=g).cuda()
    old = (-torch.rand(B, T, generator=g) * 3).cuda()
    fn = GRPOLoss(loss_type="dapo", epsilon_high=0.28, softcap=30.0, temperature=0.9)
    res = []
    for cluster in ("8,256", "0"):
        monkeypatch.setenv("R1K_FUSED_CLUSTER", cluster)
        if level_from_logits:
            x = (h.float() @ w.float().T).to(torch.bfloat16).requires_grad_(True)
            out = fn.from_logits(x, y, mask, adv, old_logps=old)
            out.loss.backward()
            grads = (x.grad.float(),)
        else:
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = fn(hh, ww, y, mask, adv, old_logps=old)
            out.loss.backward()
            grads = (hh.grad.float(), ww.grad.float())
        res.append((out.loss.item(), out.metrics["entropy"].item(), grads))
    (la, ea, ga), (lb, eb, gb) = res
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6) and ea == pytest.approx(eb, rel=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=2 ** -6, atol=1e-3 * b.abs().max().item())


@pytest.mark.skipif("triton" not in [p.values[0] for p in BACKENDS], reason="Triton cannot run here")
def test_opcheck_triton_ops_softcap():
    """The Triton launchers' custom ops (torch.compile's view of them) with a soft-cap."""
    x = torch.randn(5, 33, device=DEVICE) * 10
    y = torch.tensor([0, 32, -100, 7, 1], device=DEVICE)
    out = tlp._fwd_triton_op(x, y, 15.0, -100, True, 0.05)
    lse, ent = out[2].contiguous(), out[1].contiguous()
    d = torch.randn(5, device=DEVICE)
    torch.library.opcheck(tlp._fwd_triton_op, (x, y, 15.0, -100, True, 0.05))
    torch.library.opcheck(tlp._bwd_triton_op, (x, y, lse, ent, d, d, 15.0, -100, 0.05))
    b = torch.randn(33, device=DEVICE)
    state, outs = torch.zeros(4, 5, device=DEVICE), torch.zeros(3, 5, device=DEVICE)
    y2 = torch.tensor([40, 99, -100, 3, 50], device=DEVICE)
    torch.library.opcheck(tlp._tile_stats_op,
                          (x, y2, b, state, outs, 30, 100, 15.0, -100, False, False, True, 0.05))
    torch.library.opcheck(tlp._tile_grad_op,
                          (x, torch.empty_like(x), y2, b, lse, ent, d, d, 30, 15.0, -100, 0.05))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    """token_logprobs with a soft-capped head under torch.compile(fullgraph=True)."""
    logits, labels = logits_for(4, 40, seed=6)
    kw = dict(softcap=30.0, logit_scale=0.5, temperature=0.9)
    with dispatch.use_backend(backend):
        f = torch.compile(lambda x, y: r1kernels.token_logprobs(x, y, with_entropy=True, **kw),
                          fullgraph=True)
        x = logits.to(DEVICE).clone().requires_grad_(True)
        lp, ent = f(x, labels.to(DEVICE))
        (lp.sum() + ent.sum()).backward()
    xr = logits.double().requires_grad_(True)
    lr, er = token_logprobs_ref(xr, labels, with_entropy=True, **kw)
    (lr.sum() + er.sum()).backward()
    torch.testing.assert_close(lp.detach().cpu().double(), lr.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=1e-5, atol=1e-5)
