"""token_logprobs against the float64 reference: values, gradients (incl. entropy), every backend.

Tolerances: the kernels compute in fp32 on the given (possibly 16-bit) logits, so log-probs and
entropies are compared with the float64 reference run on the same logits at fp32 accuracy.
Gradients come back in the logits' dtype: one rounding to bf16/fp16 (relative 2**-8 / 2**-11),
where torch's own bf16/fp16 log_softmax backward rounds at least as often.
"""
import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.ops import token_logprobs as tlp_mod
from r1kernels.ops.token_logprobs import token_logprobs_with_grad
from r1kernels.reference import token_logprobs_ref
from conftest import DEVICE, backends_for
from cpu_memory import peak_extra_bytes

OP = "token_logprobs"
BACKENDS = backends_for(OP)
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def run(backend, logits, labels, **kw):
    with dispatch.use_backend(backend):
        return r1kernels.token_logprobs(logits, labels, **kw)


def check(backend, logits, labels, *, temperature=1.0, ignore_index=-100, with_entropy=True,
          atol=2e-5):
    """Values and gradients (random upstream weights on logp and entropy) vs float64 autograd."""
    x = logits.detach().to(DEVICE).requires_grad_(True)
    y = labels.to(DEVICE)
    out = run(backend, x, y, temperature=temperature, ignore_index=ignore_index,
              with_entropy=with_entropy)
    xr = logits.detach().double().requires_grad_(True)
    ref = token_logprobs_ref(xr, labels, temperature=temperature, ignore_index=ignore_index,
                             with_entropy=with_entropy)
    outs = out if with_entropy else (out,)
    refs = ref if with_entropy else (ref,)
    for o, r in zip(outs, refs):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        torch.testing.assert_close(o.detach().cpu().double(), r, rtol=1e-5, atol=atol)
    weights = [torch.randn(labels.shape, dtype=torch.float64) for _ in outs]
    sum(((o.double() * w.to(DEVICE)).sum() for o, w in zip(outs, weights))).backward()
    sum(((r * w).sum() for r, w in zip(refs, weights))).backward()
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    # gradient elements are upstream weight * (onehot - p) / temperature: their absolute error
    # scales with the weights, even where the gradient itself is ~0 (V = 1: 1 - p with p from a
    # rounded exp; on a GPU the FMA in z / T - lse leaves ~1e-7 where the interpreter gives 0)
    scale = max(xr.grad.abs().max().item(),
                max(w.abs().max().item() for w in weights) / temperature)
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=GRAD_RTOL[logits.dtype],
                               atol=GRAD_RTOL[logits.dtype] * scale)
    return out, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_matches_reference(backend, V, temperature, with_entropy):
    logits = torch.randn(13, V) * 3
    labels = torch.randint(0, V, (13,))
    labels[[2, 11]] = -100
    check(backend, logits, labels, temperature=temperature, with_entropy=with_entropy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_vocabulary(backend):
    V = 151936  # Qwen2.5
    logits = torch.randn(3, V) * 4
    labels = torch.tensor([0, V - 1, 77777])
    check(backend, logits, labels, temperature=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_logits(backend, dtype):
    # +-100 logits: a naive exp overflows; the winning token has p ~ 1 and entropy ~ 0
    logits = torch.full((6, 300), -100.0)
    logits[:, 5] = 100.0
    logits[1, 6] = 100.0  # tie between two tokens: logp = log(1/2), entropy = log 2
    logits[2] = torch.linspace(-100, 100, 300)
    logits = logits.to(dtype)
    labels = torch.tensor([5, 6, 299, 0, 5, -100])
    out, _ = check(backend, logits, labels)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
    torch.testing.assert_close(out[0][1].cpu(), torch.tensor(-0.6931472), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1][1].cpu(), torch.tensor(0.6931472), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary(backend):
    # -inf logits (a masked vocabulary) are probability 0, contribute 0 entropy and 0 gradient
    logits = torch.randn(4, 50)
    logits[:, 10:20] = float("-inf")
    labels = torch.tensor([1, 2, 3, 49])
    x = logits.to(DEVICE).requires_grad_(True)
    lp, ent = run(backend, x, labels.to(DEVICE), with_entropy=True)
    ref_lp, ref_ent = token_logprobs_ref(logits.double(), labels, with_entropy=True)
    torch.testing.assert_close(lp.cpu().double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), ref_ent, rtol=1e-5, atol=1e-5)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 10:20] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    logits = (torch.randn(9, 777) * 5).to(dtype)
    labels = torch.randint(0, 777, (9,))
    check(backend, logits, labels, temperature=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_non_contiguous(backend):
    base = torch.randn(3, 10, 2 * 64)
    logits = base[:, ::2, ::2]  # [3, 5, 64], strided rows and columns
    assert not logits.is_contiguous()
    labels = torch.randint(0, 64, (3, 5))
    labels[0, 1] = -100
    check(backend, logits, labels)
    logits_t = torch.randn(64, 8).t()  # [8, 64] column-major
    check(backend, logits_t, torch.randint(0, 64, (8,)))
    labels_nc = torch.randint(0, 64, (8, 2))[:, 0]
    check(backend, torch.randn(8, 64), labels_nc)
    check(backend, torch.randn(8, 64), torch.randint(0, 64, (8,), dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_and_fully_masked(backend):
    logits = torch.randn(5, 40)
    labels = torch.full((5,), 7)
    labels[[0, 3]] = 3  # ignore_index=3 is also a valid token id: treated as ignored
    out, grad = check(backend, logits, labels, ignore_index=3)
    assert (out[0][[0, 3]] == 0).all() and (out[1][[0, 3]] == 0).all()
    assert (grad[[0, 3]] == 0).all()
    out, grad = check(backend, logits, torch.full((5,), -100))
    assert (out[0] == 0).all() and (out[1] == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in [(0, 11), (2, 0, 11)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        y = torch.zeros(shape[:-1], dtype=torch.long, device=DEVICE)
        lp, ent = run(backend, x, y, with_entropy=True)
        assert lp.shape == shape[:-1] and ent.shape == shape[:-1] and lp.dtype == torch.float32
        (lp.sum() + ent.sum()).backward()
        assert x.grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    x = torch.randn(4, 10, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    with pytest.raises(IndexError, match="labels"):
        run(backend, x, torch.tensor([0, 10, 1, 2], device=DEVICE))
    with pytest.raises(IndexError, match="labels"):
        run(backend, x, torch.tensor([0, -1, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="labels expected shape"):
        run(backend, x, y[:3])
    with pytest.raises(ValueError, match="labels must be an integer"):
        run(backend, x, y.float())
    with pytest.raises(ValueError, match="logits must be"):
        run(backend, x.long(), y)
    with pytest.raises(ValueError, match="temperature"):
        run(backend, x, y, temperature=0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        run(backend, torch.randn(4, 0, device=DEVICE), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_scalar_arguments(backend):
    import numpy as np

    x = torch.randn(3, 10, device=DEVICE)
    y = torch.randint(0, 10, (3,), device=DEVICE)
    for t in (float("nan"), float("inf"), -1.0, 1e31, 1e-44, 1e-38, 0.0, True, torch.tensor(0.7),
              "1"):
        with pytest.raises(ValueError, match="temperature"):
            run(backend, x, y, temperature=t)
    for ii in (2 ** 63, -2 ** 63 - 1, 1.0, None, True):
        with pytest.raises(ValueError, match="ignore_index"):
            run(backend, x, y, ignore_index=ii)
    # a NumPy scalar is a number; the largest temperature allowed still gives -log V
    torch.testing.assert_close(run(backend, x, y, temperature=np.float32(0.5)),
                               run(backend, x, y, temperature=0.5))
    torch.testing.assert_close(run(backend, x, y, temperature=1e30).cpu(),
                               torch.full((3,), -torch.log(torch.tensor(10.0)).item()))
    # the smallest allowed: logits / temperature near 1e30, finite, as in float64 (1e-38 and
    # 1e-44 gave -inf and NaN: 1 / temperature overflows fp32)
    torch.testing.assert_close(run(backend, x, y, temperature=1e-30).cpu().double(),
                               token_logprobs_ref(x.double(), y, temperature=1e-30).cpu(),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_label_dtypes(backend, dtype):
    """Labels of any integer dtype: ignore_index and V are compared with the labels' values,
    not after torch converts them to the labels' dtype (uint8: -100 would be 156, 300 would be
    44, and int8 would wrap V=200)."""
    V = {torch.uint8: 300, torch.int8: 200, torch.int16: 40000}.get(dtype, 70000)
    hi = min(V - 1, torch.iinfo(dtype).max)  # above 127 for int16: V = 40000 wraps there
    vals = [hi, 3, 0, 156 % (hi + 1)]
    x = torch.randn(len(vals), V)
    y = torch.tensor(vals).to(dtype)
    out = run(backend, x.to(DEVICE), y.to(DEVICE))
    ref = token_logprobs_ref(x.double(), torch.tensor(vals))
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=2e-5)
    assert (out != 0).all()
    if dtype in (torch.int16, torch.int32):  # an ignore_index of the dtype: still ignored
        out = run(backend, x.to(DEVICE), y.to(DEVICE), ignore_index=3)
        assert out[1] == 0 and (out[[0, 2, 3]] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend):
    logits = torch.randn(6, 333)
    labels = torch.randint(0, 333, (6,)).to(DEVICE)
    w = torch.randn(6, device=DEVICE)
    leaf = logits.clone().to(DEVICE).requires_grad_(True)
    buf = leaf * 1.0  # the logits buffer (an lm_head output), dead after the log-probs
    with dispatch.use_backend(backend):
        lp, ent = r1kernels.token_logprobs(buf, labels, with_entropy=True, inplace_backward=True)
    (lp * w + ent).sum().backward()
    x2 = logits.clone().to(DEVICE).requires_grad_(True)
    lp2, ent2 = run(backend, x2, labels, with_entropy=True)
    (lp2 * w + ent2).sum().backward()
    torch.testing.assert_close(leaf.grad, x2.grad, rtol=0, atol=0)
    # the gradient was written into the logits buffer itself
    torch.testing.assert_close(buf.detach(), x2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_with_grad(backend, inplace):
    N, V, T = 12, 257, 0.8
    logits = torch.randn(N, V) * 2
    labels = torch.randint(0, V, (N,))
    labels[4] = -100
    calls = []

    def grad_fn(start, end, logp, ent):  # a loss whose gradient needs the log-probs: sum(logp**2)
        calls.append((start, end))
        assert logp.dtype == torch.float32 and ent.dtype == torch.float32
        return 2 * logp

    x = logits.clone().to(DEVICE)
    with dispatch.use_backend(backend):
        logp, ent, grad = token_logprobs_with_grad(
            x, labels.to(DEVICE), temperature=T, ignore_index=-100, with_entropy=True,
            grad_fn=grad_fn, chunk_multiple=4, inplace=inplace)
    assert calls == [(0, N)]
    xr = logits.double().requires_grad_(True)
    lr, er = token_logprobs_ref(xr, labels, temperature=T, with_entropy=True)
    (lr ** 2).sum().backward()
    torch.testing.assert_close(logp.cpu().double(), lr.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), er.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), xr.grad, rtol=1e-5, atol=1e-6)
    assert (grad.data_ptr() == x.data_ptr()) == inplace


def test_torch_path_memory_is_bounded(monkeypatch):
    """The chunked torch path never holds a [N, V] fp32 copy: its peak extra memory does not grow
    with N, while the materializing reference's does (so this test can fail)."""
    monkeypatch.setattr(tlp_mod, "TORCH_CHUNK_ELEMS", 1 << 16)
    V = 2048
    peaks = {}
    for n in (64, 512):
        x = torch.randn(n, V, dtype=torch.bfloat16)
        y = torch.randint(0, V, (n,))
        with dispatch.use_backend("torch"):
            peaks[n], _ = peak_extra_bytes(lambda: r1kernels.token_logprobs(x, y, with_entropy=True))
        ref_peak, _ = peak_extra_bytes(lambda: token_logprobs_ref(x, y, with_entropy=True))
        assert ref_peak >= n * V * 4  # the reference materializes fp32 logits
    chunk_bytes = (1 << 16) * 4
    assert peaks[512] <= 8 * chunk_bytes, peaks
    assert peaks[512] <= peaks[64] + 64 * 512, peaks  # O(N) bookkeeping only


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_compile_fullgraph(backend, with_entropy):

    def f(x, y):
        out = r1kernels.token_logprobs(x, y, temperature=0.9, with_entropy=with_entropy)
        return (out[0] + 0.5 * out[1]).sum() if with_entropy else out.sum()

    x = torch.randn(2, 5, 97, device=DEVICE)
    y = torch.randint(0, 97, (2, 5), device=DEVICE)
    y[0, 0] = -100
    torch._dynamo.reset()
    with dispatch.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="inductor")
        xa = x.clone().requires_grad_(True)
        compiled(xa, y).backward()
        xb = x.clone().requires_grad_(True)
        f(xb, y).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not tlp_mod.HAS_TRITON or "triton" not in [p.values[0] for p in BACKENDS],
                    reason="Triton cannot run here")
def test_opcheck_triton_ops():
    x = torch.randn(5, 33, device=DEVICE)
    y = torch.tensor([0, 32, -100, 7, 1], device=DEVICE)
    out = tlp_mod._fwd_triton_op(x, y, 1.25, -100, True)
    lse, ent = out[2].contiguous(), out[1].contiguous()
    d = torch.randn(5, device=DEVICE)
    torch.library.opcheck(tlp_mod._fwd_triton_op, (x, y, 1.25, -100, True))
    torch.library.opcheck(tlp_mod._bwd_triton_op, (x, y, lse, ent, d, d, 1.25, -100))
    torch.library.opcheck(tlp_mod._bwd_triton_op, (x, y, lse, None, d, None, 1.25, -100))
    torch.library.opcheck(tlp_mod._bwd_inplace_triton_op, (x.clone(), y, lse, ent, d, d, 1.25, -100))
    # tile-level ops of the hidden-state path: a tile of columns [col0, col0 + 33) of V = 100
    b = torch.randn(33, device=DEVICE)
    state, outs = torch.zeros(4, 5, device=DEVICE), torch.zeros(3, 5, device=DEVICE)
    y2 = torch.tensor([40, 99, -100, 3, 50], device=DEVICE)
    torch.library.opcheck(tlp_mod._tile_stats_op,
                          (x, y2, b, state, outs, 30, 100, 0.5, -100, False, False, True))
    torch.library.opcheck(tlp_mod._tile_stats_op,
                          (x, y2, None, state, outs, 30, 100, 0.5, -100, True, True, False))
    torch.library.opcheck(tlp_mod._tile_grad_op,
                          (x, torch.empty_like(x), y2, b, lse, ent, d, d, 30, 0.5, -100))


def test_double_backward_raises():
    """The backward is not itself differentiable: asking for second derivatives raises rather
    than silently returning wrong ones."""
    x = torch.randn(3, 20, device=DEVICE, requires_grad=True)
    lp = r1kernels.token_logprobs(x, torch.tensor([1, 2, 3], device=DEVICE))
    (g,) = torch.autograd.grad(lp.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


# ---- token_logprobs_fwd_bwd: forward and backward in one call for a known upstream gradient ----


def _use_fused_config(monkeypatch, config):
    """Run the Triton fused logits kernels in launch configuration `config` (skip without them)."""
    if "triton" not in dispatch.available_backends(OP, DEVICE):
        pytest.skip("Triton backend not available here")
    monkeypatch.setattr(tlp_mod, "FUSED_CONFIG", config)
    monkeypatch.setattr(tlp_mod, "FUSED_CONFIG_GRPO", config)
    monkeypatch.delenv("R1K_FUSED_LOGITS", raising=False)


def _fwd_bwd_ref(logits, labels, glp, gent, temperature, ignore_index=-100):
    xr = logits.detach().double().requires_grad_(True)
    lr, er = token_logprobs_ref(xr, labels, temperature=temperature, ignore_index=ignore_index,
                                with_entropy=True)
    loss = (lr * glp.double()).sum()
    if gent is not None:
        loss = loss + (er * gent.double()).sum()
    loss.backward()
    return lr.detach(), er.detach(), xr.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
@pytest.mark.parametrize("with_dent", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_fwd_bwd_matches_reference(backend, V, with_dent, inplace):
    """More rows (11) than the interpreter's programs (4), so each program walks several rows."""
    N, T = 11, 0.7
    logits = torch.randn(N, V) * 3
    labels = torch.randint(0, V, (N,))
    labels[3] = -100
    glp, gent = torch.randn(N), (torch.randn(N) if with_dent else None)
    x = logits.clone().to(DEVICE)
    with dispatch.use_backend(backend):
        logp, ent, grad = r1kernels.token_logprobs_fwd_bwd(
            x, labels.to(DEVICE), glp.to(DEVICE), temperature=T, with_entropy=True,
            grad_entropy=None if gent is None else gent.to(DEVICE), inplace=inplace)
    lr, er, gr = _fwd_bwd_ref(logits, labels, glp, gent, T)
    torch.testing.assert_close(logp.cpu().double(), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), gr, rtol=1e-5, atol=1e-6)
    assert logp[3] == 0 and ent[3] == 0 and (grad[3] == 0).all()
    assert (grad.data_ptr() == x.data_ptr()) == inplace


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fwd_bwd_large_logits_and_batched(backend, dtype):
    """Logits of +-100 (fp16: +-60), a [B, T, V] batch, low-precision gradients rounded once."""
    B, T, V = 2, 3, 777
    big = 60.0 if dtype == torch.float16 else 100.0
    logits = (torch.randn(B, T, V) * 5).clamp(-big, big)
    logits[0, 0, :5] = big
    logits[1, 2, :] = -big
    logits = logits.to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[0, 0] = 2
    glp = torch.randn(B, T)
    with dispatch.use_backend(backend):
        logp, ent, grad = r1kernels.token_logprobs_fwd_bwd(
            logits.to(DEVICE), labels.to(DEVICE), glp.to(DEVICE), with_entropy=True)
    lr, er, gr = _fwd_bwd_ref(logits, labels, glp, None, 1.0)
    assert logp.shape == (B, T) and grad.shape == (B, T, V) and grad.dtype == dtype
    torch.testing.assert_close(logp.cpu().double(), lr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.cpu().double(), er, rtol=1e-5, atol=1e-4)
    tol = GRAD_RTOL[dtype]
    torch.testing.assert_close(grad.cpu().double(), gr, rtol=tol, atol=tol * gr.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fwd_bwd_empty_and_bad_input(backend):
    with dispatch.use_backend(backend):
        logp, ent, grad = r1kernels.token_logprobs_fwd_bwd(
            torch.randn(0, 5, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE),
            torch.zeros(0, device=DEVICE))
        assert logp.shape == (0,) and ent is None and grad.shape == (0, 5)
        x = torch.randn(4, 9, device=DEVICE)
        y = torch.randint(0, 9, (4,), device=DEVICE)
        with pytest.raises(ValueError, match="grad_logp"):
            r1kernels.token_logprobs_fwd_bwd(x, y, torch.zeros(3, device=DEVICE))
        with pytest.raises(ValueError, match="grad_entropy needs with_entropy"):
            r1kernels.token_logprobs_fwd_bwd(x, y, torch.zeros(4, device=DEVICE),
                                             grad_entropy=torch.zeros(4, device=DEVICE))
        with pytest.raises(IndexError, match="labels"):
            r1kernels.token_logprobs_fwd_bwd(x, torch.full((4,), 9, device=DEVICE),
                                             torch.zeros(4, device=DEVICE))
        with pytest.raises(IndexError, match="labels"):  # in place, a negative label
            r1kernels.token_logprobs_fwd_bwd(x.clone(), torch.tensor([0, -2, 1, 3], device=DEVICE),
                                             torch.ones(4, device=DEVICE), inplace=True)


@pytest.mark.parametrize("launch", ["1,64", "2,128"])
def test_stats_launch_override(monkeypatch, launch):
    """R1K_STATS_LAUNCH (warps, block of the statistics kernel) changes the launch, not the
    numbers: forward and backward through autograd against float64."""
    if "triton" not in dispatch.available_backends(OP, DEVICE):
        pytest.skip("Triton backend not available here")
    monkeypatch.setenv("R1K_STATS_LAUNCH", launch)
    g0 = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 999, generator=g0) * 3
    labels = torch.randint(0, 999, (5,), generator=g0)
    x = logits.clone().to(DEVICE).requires_grad_(True)
    with dispatch.use_backend("triton"):
        lp, en = r1kernels.token_logprobs(x, labels.to(DEVICE), with_entropy=True)
    glp, gent = torch.randn(5, generator=g0), torch.randn(5, generator=g0)
    ((lp * glp.to(DEVICE)).sum() + (en * gent.to(DEVICE)).sum()).backward()
    lr, er, gr = _fwd_bwd_ref(logits, labels, glp, gent, 1.0)
    torch.testing.assert_close(lp.detach().cpu().double(), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(en.detach().cpu().double(), er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.cpu().double(), gr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,value", [("R1K_FUSED_LOGITS", "fast"), ("R1K_FUSED_LOGITS", "0,0,4096"),
                                        ("R1K_FUSED_LOGITS", "1"), ("R1K_FUSED_LOGITS", "-1,4,4096,0"),
                                        ("R1K_STATS_LAUNCH", "1"),
                                        ("R1K_STATS_LAUNCH", "0,2048"), ("R1K_STATS_LAUNCH", "1,x")])
def test_bad_launch_env(monkeypatch, name, value):
    """A malformed launch override is a ValueError naming the variable, not a crash."""
    if "triton" not in dispatch.available_backends(OP, DEVICE):
        pytest.skip("Triton backend not available here")
    monkeypatch.setenv(name, value)
    x = torch.randn(3, 50, device=DEVICE)
    y = torch.randint(0, 50, (3,), device=DEVICE)
    with dispatch.use_backend("triton"), pytest.raises(ValueError, match=name):
        if name == "R1K_FUSED_LOGITS":
            r1kernels.token_logprobs_fwd_bwd(x, y, torch.ones(3, device=DEVICE))
        else:
            r1kernels.token_logprobs(x, y)


@pytest.mark.parametrize("value", ["-1,4,4096,0", "-2,8"])
def test_negative_programs_per_sm_rejected(monkeypatch, value):
    """R1K_FUSED_LOGITS with programs_per_sm < 0 (no such launch mode) is a ValueError naming
    the variable, from the token_logprobs and the GRPO variants of the fused kernel alike."""
    monkeypatch.setenv("R1K_FUSED_LOGITS", value)
    for grpo in (False, True):
        with pytest.raises(ValueError, match="R1K_FUSED_LOGITS: programs_per_sm must be >= 0"):
            tlp_mod._fused_config(grpo)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_upstream_rows_not_read(backend):
    """Rows whose upstream gradients are exactly zero (masked tokens) get exactly zero gradient
    rows; the Triton kernels do not read them (poisoned with inf here, which would otherwise make
    NaN: 0 * inf). Both the autograd backward and token_logprobs_fwd_bwd."""
    g0 = torch.Generator().manual_seed(12)
    N, V = 6, 777
    logits = torch.randn(N, V, generator=g0) * 3
    labels = torch.randint(0, V, (N,), generator=g0)
    glp, gent = torch.randn(N, generator=g0), torch.randn(N, generator=g0)
    dead = torch.tensor([False, True, False, False, True, False])
    glp[dead] = 0.0
    gent[dead] = 0.0
    lr, er, gr = _fwd_bwd_ref(logits, labels, glp, gent, 1.0)
    poisoned = logits.clone()
    with dispatch.use_backend(backend):
        # backward through autograd: the forward must read every row (finite logits there)
        x = poisoned.clone().to(DEVICE).requires_grad_(True)
        lp, en = r1kernels.token_logprobs(x, labels.to(DEVICE), with_entropy=True)
        ((lp * glp.to(DEVICE)).sum() + (en * gent.to(DEVICE)).sum()).backward()
        torch.testing.assert_close(x.grad.cpu().double(), gr, rtol=1e-5, atol=1e-6)
        assert (x.grad.cpu()[dead] == 0).all()
    if backend != "triton":
        return
    poisoned[dead, ::7] = float("inf")  # fused: statistics of every row, dead rows not re-read
    with dispatch.use_backend(backend):
        _, _, g = r1kernels.token_logprobs_fwd_bwd(poisoned.clone().to(DEVICE), labels.to(DEVICE),
                                                   glp.to(DEVICE), grad_entropy=gent.to(DEVICE),
                                                   with_entropy=True)
    assert (g.cpu()[dead] == 0).all()
    torch.testing.assert_close(g.cpu().double()[~dead], gr[~dead], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_not_read(backend):
    """Rows labelled ignore_index (prompt or padding tokens) give zero log-prob, entropy and
    gradient; the Triton kernels (autograd path and the fused kernel of token_logprobs_fwd_bwd)
    do not read them, so even NaN logits there change nothing."""
    g0 = torch.Generator().manual_seed(14)
    N, V = 6, 500
    logits = torch.randn(N, V, generator=g0) * 3
    labels = torch.randint(0, V, (N,), generator=g0)
    ign = torch.tensor([True, False, False, True, False, False])
    labels[ign] = -100
    glp, gent = torch.randn(N, generator=g0), torch.randn(N, generator=g0)
    lr, er, gr = _fwd_bwd_ref(logits, labels, glp, gent, 1.0)
    if backend == "triton":
        logits[ign] = float("nan")
    x = logits.clone().to(DEVICE).requires_grad_(True)
    with dispatch.use_backend(backend):
        lp, en = r1kernels.token_logprobs(x, labels.to(DEVICE), with_entropy=True)
    ((lp * glp.to(DEVICE)).sum() + (en * gent.to(DEVICE)).sum()).backward()
    torch.testing.assert_close(lp.detach().cpu().double(), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(en.detach().cpu().double(), er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.cpu().double(), gr, rtol=1e-5, atol=1e-6)
    assert (x.grad.cpu()[ign] == 0).all()
    if backend != "triton":
        return
    # the fused kernel (token_logprobs_fwd_bwd, in place) does not read them either
    xf = logits.clone().to(DEVICE)
    with dispatch.use_backend(backend):
        lpf, enf, gf = r1kernels.token_logprobs_fwd_bwd(
            xf, labels.to(DEVICE), glp.to(DEVICE), grad_entropy=gent.to(DEVICE),
            with_entropy=True, inplace=True)
    torch.testing.assert_close(lpf.cpu().double(), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enf.cpu().double(), er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gf.cpu().double(), gr, rtol=1e-5, atol=1e-6)
    assert (gf.cpu()[ign] == 0).all()
    # and its lse output, which a read of the NaN row would have made NaN, is 0 there
    xf = logits.clone().to(DEVICE)
    y = labels.to(DEVICE)
    out = tlp_mod.fused_triton(xf.view(1, N, V), y, torch.empty_like(xf).view(1, N, V), 1.0,
                               -100, True, grad_logp=glp.to(DEVICE))
    assert (out[2].cpu()[ign] == 0).all() and torch.isfinite(out[2]).all()


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("config", [(2, 16, 4096, 1), (1, 8, 256, 0), (3, 4, 64, 1), (0, 8, 1024, 1),
                                    (0, 8, 1024, 0, 1, 128)],
                         ids=["lanes", "block-stats", "small-blocks", "two-launches",
                              "two-launches-1-warp-stats"])
def test_fwd_bwd_launch_configs(monkeypatch, config, inplace):
    """Every pass-1 variant of the fused kernel (per-lane or block statistics), block width and
    launch mode (persistent, or two launches with their own statistics launch) compute the same
    numbers, also with the gradient written over the logits (Triton backend; on CPU in the
    interpreter)."""
    _use_fused_config(monkeypatch, config)
    N, V = 9, 1500
    logits = torch.randn(N, V) * 4
    logits[1, :] = -30.0
    labels = torch.randint(0, V, (N,))
    labels[5] = -100
    glp, gent = torch.randn(N), torch.randn(N)
    x = logits.clone().to(DEVICE)  # a copy: in place overwrites it
    with dispatch.use_backend("triton"):
        logp, ent, grad = r1kernels.token_logprobs_fwd_bwd(
            x, labels.to(DEVICE), glp.to(DEVICE), grad_entropy=gent.to(DEVICE),
            with_entropy=True, temperature=1.3, inplace=inplace)
    assert (grad.data_ptr() == x.data_ptr()) == inplace
    lr, er, gr = _fwd_bwd_ref(logits, labels, glp, gent, 1.3)
    torch.testing.assert_close(logp.cpu().double(), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), er, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), gr, rtol=1e-5, atol=1e-6)


# ---- the C++ CPU kernels (csrc/token_logprobs/token_logprobs_cpu.cpp) --------------------------

CPP = pytest.mark.skipif("cpp" not in dispatch.available_backends(OP, "cpu"),
                         reason="the C++ extension's CPU kernels are not built here")


@CPP
def test_cpp_exp_elementwise_accuracy():
    """The C++ kernels' polynomial exp, element by element: dL/dlogits = -p_v (dlogp = 1, the
    label aside) over logits spread across exp's whole fp32 range, relative to float64, where the
    other tests' absolute tolerance would hide an error in the small probabilities; exact zeros
    below the kernel's underflow point (p < e^-87.3)."""
    V = 4099
    x = torch.linspace(-95.0, 5.0, V, dtype=torch.float32).unsqueeze(0).requires_grad_(True)
    y = torch.tensor([V // 3])
    with dispatch.use_backend("cpp"):
        lp, ent = r1kernels.token_logprobs(x, y, with_entropy=True)
    (lp + 0.0 * ent).sum().backward()
    xd = x.detach().double()
    p = torch.softmax(xd, -1)[0]
    lse = torch.logsumexp(xd, -1)[0]
    g = x.grad[0].double()
    off = torch.arange(V) != V // 3
    normal = off & (xd[0] - lse > -87.0)
    # 4e-6: what fp32 itself allows here (z - lse rounded to fp32 at |z - lse| ~ 90: 2.7e-6, the
    # same for torch.exp); an error in the polynomial's coefficients shows at ~1e-5
    torch.testing.assert_close(g[normal], -p[normal], rtol=4e-6, atol=0.0)
    assert (g[off & (xd[0] - lse < -87.6)] == 0).all()
    torch.testing.assert_close(lp.double()[0], xd[0, V // 3] - lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.double()[0], -(p * torch.log_softmax(xd, -1)[0]).sum(),
                               rtol=1e-5, atol=1e-6)


@CPP
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_threads_bit_identical(dtype):
    """Rows are split over threads, never a row's sum: one thread and two give the same bits."""
    x = (torch.randn(37, 5003) * 3).to(dtype).requires_grad_(True)
    y = torch.randint(0, 5003, (37,))
    y[5] = -100
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x.grad = None
            with dispatch.use_backend("cpp"):
                lp, ent = r1kernels.token_logprobs(x, y, with_entropy=True, temperature=0.7)
            (lp * torch.linspace(-1, 1, 37) + ent).sum().backward()
            results.append((lp, ent, x.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@CPP
def test_opcheck_cpp_tile_ops():
    """The extension ops of the C++ path: schema, mutation annotations, fake kernels."""
    n, c = 5, 300
    x = torch.randn(n, c) * 2
    y = torch.tensor([3, -100, 299, 0, 150])
    bias = torch.randn(c)
    state, out = torch.zeros(4, n), torch.zeros(3, n)
    torch.library.opcheck(torch.ops.r1kernels.logprob_tile_stats.default,
                          (x, y, bias, state, out, 0, c, 0.5, -100, False, True, True))
    torch.ops.r1kernels.logprob_tile_stats(x, y, bias, state, out, 0, c, 0.5, -100, False, True, True)
    lse, ent = out[2].clone(), out[1].clone()
    dlogp, dent = torch.randn(n), torch.randn(n)
    g = torch.empty(n, c, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.r1kernels.logprob_tile_grad.default,
                          (x, g, y, bias, lse, ent, dlogp, dent, 0, 0.5, -100))
    xr = ((x.double() + bias.double()) * 0.5).requires_grad_(True)
    lp = torch.log_softmax(xr, -1)
    keep = y != -100
    yl = y.clamp(min=0)
    logp = lp.gather(1, yl[:, None]).squeeze(1)
    ent_r = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(out[0][keep].double(), logp[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][keep].double(), ent_r[keep], rtol=1e-5, atol=1e-5)
    assert out[0][1] == 0 and out[1][1] == 0 and out[2][1] == 0
    ((logp * dlogp.double() + ent_r * dent.double()) * keep).sum().backward()
    torch.ops.r1kernels.logprob_tile_grad(x, g, y, bias, lse, ent, dlogp, dent, 0, 0.5, -100)
    torch.testing.assert_close(g.double(), xr.grad * 0.5, rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_grad_into_out(backend):
    """token_logprobs_with_grad writes the logits gradient into a given buffer (a slice of a
    batch's gradient), equal to the one it returns otherwise; a mismatched buffer is a
    ValueError naming `out`."""
    x = (torch.randn(2, 7, 50) * 2).to(DEVICE)
    y = torch.randint(0, 50, (2, 7), device=DEVICE)
    step = lambda s, e, lp, en: torch.linspace(-1, 1, e - s, device=DEVICE)  # noqa: E731
    kw = dict(temperature=0.8, ignore_index=-100, with_entropy=False, grad_fn=step)
    buf = torch.full((2, 7, 50), float("nan"), device=DEVICE)
    with dispatch.use_backend(backend):
        ref = token_logprobs_with_grad(x[1], y[1], **kw)[2]
        got = token_logprobs_with_grad(x[1], y[1], out=buf[1], **kw)[2]
        assert got.data_ptr() == buf[1].data_ptr()
        torch.testing.assert_close(buf[1], ref, rtol=0, atol=0)
        assert torch.isnan(buf[0]).all()  # the other slice untouched
        for bad in (torch.empty(7, 49, device=DEVICE),  # shape
                    torch.empty(7, 50, device=DEVICE, dtype=torch.float16),  # dtype
                    torch.empty(50, 7, device=DEVICE).t()):  # columns not contiguous
            with pytest.raises(ValueError, match="out"):
                token_logprobs_with_grad(x[1], y[1], out=bad, **kw)


@CPP
@pytest.mark.parametrize("gdt", [torch.float32, torch.bfloat16])
def test_cpp_tile_grad_over_its_logits(gdt):
    """The C++ gradient written over its own fp32 logits tile (g = z, or a 16-bit view of z's
    rows, as the hidden-state path does on CUDA) equals the gradient written elsewhere: a block is
    read whole before any of it is written, and its writes only reach bytes already read. Rows
    longer than one block (2048 columns), the label in a later block, an ignored row."""
    n, c = 4, 5000
    z = torch.randn(n, c) * 3
    y = torch.tensor([4321, 7, -100, 2048])
    bias = torch.randn(c)
    out = torch.zeros(3, n)
    torch.ops.r1kernels.logprob_tile_stats(z, y, bias, out, out, 0, c, 0.7, -100, False, True, True)
    lse, ent = out[2].clone(), out[1].clone()
    dlogp, dent = torch.randn(n), torch.randn(n)
    ref = torch.empty(n, c, dtype=gdt)
    torch.ops.r1kernels.logprob_tile_grad(z, ref, y, bias, lse, ent, dlogp, dent, 0, 0.7, -100)
    g = z if gdt == torch.float32 else z.view(gdt)[:, :c]
    torch.ops.r1kernels.logprob_tile_grad(z, g, y, bias, lse, ent, dlogp, dent, 0, 0.7, -100)
    assert torch.equal(g, ref)
    assert (ref[2] == 0).all() and ref[0].abs().max() > 0
