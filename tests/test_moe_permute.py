"""moe_permute / moe_unpermute against the float64 references (values, layout, gradients)."""
import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.reference import moe_permute_ref, moe_unpermute_ref
from conftest import DEVICE, backends_for

BACKENDS = backends_for("moe_permute")
assert [p.values for p in BACKENDS] == [p.values for p in backends_for("moe_unpermute")]


def permute(backend, h, ids, E, align=1):
    with dispatch.use_backend(backend):
        return r1kernels.moe_permute(h, ids, E, align=align)


def unpermute(backend, eo, perm, w):
    with dispatch.use_backend(backend):
        return r1kernels.moe_unpermute(eo, perm, w)


def check_layout(out, perm, h, ids, E, align):
    """The permutation contract, checked directly (not only against the reference)."""
    T, k = ids.shape
    counts, offsets, row_ids, token_ids = (t.cpu().long() for t in perm)
    assert all(t.dtype == torch.int32 for t in perm)
    assert counts.tolist() == torch.bincount(ids.cpu().reshape(-1).long(), minlength=E).tolist()
    assert offsets[0] == 0 and (offsets % align == 0).all()
    seg = offsets[1:] - offsets[:-1]
    assert ((seg >= counts) & (seg - counts < align)).all()
    R = T * k + E * (align - 1)
    assert out.shape == (R, h.shape[1]) and token_ids.shape == (R,)
    for e in range(E):
        rows = torch.arange(int(offsets[e]), int(offsets[e]) + int(counts[e]))
        toks = token_ids[rows]
        assert (toks[1:] >= toks[:-1]).all()  # stable: by token inside the expert
    for t in range(T):
        for j in range(k):
            r = int(row_ids[t, j])
            assert token_ids[r] == t and offsets[ids[t, j]] <= r < offsets[ids[t, j] + 1]
    pad = token_ids < 0
    assert int((~pad).sum()) == T * k
    assert (out.cpu()[pad] == 0).all()


CASES = [(1, 8, 8, 1), (37, 33, 60, 6), (64, 128, 64, 8), (5, 16, 256, 8), (13, 24, 8, 2), (0, 16, 8, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H,E,k", CASES)
@pytest.mark.parametrize("align", [1, 4, 16])
def test_matches_reference(backend, T, H, E, k, align):
    h = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    out, perm = permute(backend, h.to(DEVICE), ids.to(DEVICE), E, align)
    ref, rperm = moe_permute_ref(h.double(), ids, E, align=align)
    assert isinstance(perm, r1kernels.MoEPermutation)
    for a, b in zip(perm, rperm):
        assert torch.equal(a.cpu(), b)
    assert out.dtype == h.dtype
    assert torch.equal(out.cpu().double(), ref)  # a copy: exact
    check_layout(out, perm, h, ids, E, align)
    w = torch.rand(T, k)
    eo = torch.randn(out.shape[0], H)
    y = unpermute(backend, eo.to(DEVICE), perm, w.to(DEVICE))
    yr = moe_unpermute_ref(eo.double(), rperm, w.double())
    assert y.dtype == torch.float32 and y.shape == (T, H)
    torch.testing.assert_close(y.cpu().double(), yr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skewed_and_repeated_ids(backend):
    # every token to expert 3 (one big segment), empty experts, a token choosing an expert twice
    T, H, E, k = 19, 12, 8, 2
    ids = torch.full((T, k), 3)
    ids[5] = torch.tensor([7, 7])
    h = torch.randn(T, H)
    for align in (1, 8):
        out, perm = permute(backend, h.to(DEVICE), ids.to(DEVICE), E, align)
        ref, rperm = moe_permute_ref(h, ids, E, align=align)
        for a, b in zip(perm, rperm):
            assert torch.equal(a.cpu(), b)
        assert torch.equal(out.cpu(), ref)
        check_layout(out, perm, h, ids, E, align)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    T, H, E, k = 23, 40, 16, 4
    h = torch.randn(T, H).to(dtype)
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    out, perm = permute(backend, h.to(DEVICE), ids.to(DEVICE), E, 8)
    ref, _ = moe_permute_ref(h, ids, E, align=8)
    assert out.dtype == dtype and torch.equal(out.cpu(), ref)
    out16, _ = permute(backend, h.to(DEVICE), ids.to(torch.int16).to(DEVICE), E, 8)  # any integer ids
    assert torch.equal(out16.cpu(), ref)
    eo = (torch.randn(out.shape[0], H) * 4).to(dtype)
    w = torch.rand(T, k)
    y = unpermute(backend, eo.to(DEVICE), perm, w.to(DEVICE))
    assert y.dtype == dtype
    yr = moe_unpermute_ref(eo.double(), perm._replace(row_ids=perm.row_ids.cpu()), w.double())
    # fp32 accumulation, one rounding at the end: within 1 ulp of dtype (fp64: fp32 accuracy)
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(y.cpu().double(), yr, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    T, H, E, k = 9, 16, 8, 3
    base = torch.randn(T, 2 * H)
    h = base[:, ::2]
    ids = torch.randint(0, E, (k, T)).t()
    out, perm = permute(backend, h.to(DEVICE), ids.to(DEVICE), E)
    ref, _ = moe_permute_ref(h, ids, E)
    assert torch.equal(out.cpu(), ref)
    eo = torch.randn(2 * out.shape[0], H)[::2]
    w = torch.rand(k, T).t()
    y = unpermute(backend, eo.to(DEVICE), perm, w.to(DEVICE))
    torch.testing.assert_close(y.cpu().double(), moe_unpermute_ref(eo.double(), perm._replace(row_ids=perm.row_ids.cpu()), w.double()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("align", [1, 4])
def test_gradients(backend, align):
    T, H, E, k = 17, 24, 8, 3
    h = torch.randn(T, H, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    W = torch.randn(E, H, H, dtype=torch.float64) / H ** 0.5  # a toy expert: one matrix each
    w = torch.rand(T, k, dtype=torch.float64)
    g = torch.randn(T, H, dtype=torch.float64)

    def forward(perm_fn, unperm_fn, hh, ww, ref):
        x, perm = perm_fn(hh)
        counts, offsets = perm.counts.cpu().tolist(), perm.offsets.cpu().tolist()
        pieces = []
        for e in range(E):
            seg = x[offsets[e]:offsets[e + 1]]
            pieces.append(seg @ (W[e] if ref else W[e].float().to(DEVICE)))
        tail = x[offsets[E]:]
        eo = torch.cat(pieces + [tail])
        return unperm_fn(eo, perm, ww)

    hk = h.float().to(DEVICE).requires_grad_(True)
    wk = w.float().to(DEVICE).requires_grad_(True)
    with dispatch.use_backend(backend):
        y = forward(lambda x: r1kernels.moe_permute(x, ids.to(DEVICE), E, align=align),
                    r1kernels.moe_unpermute, hk, wk, False)
    y.backward(g.float().to(DEVICE))
    hr = h.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    yr = forward(lambda x: moe_permute_ref(x, ids, E, align=align), moe_unpermute_ref, hr, wr, True)
    yr.backward(g)
    torch.testing.assert_close(y.detach().cpu().double(), yr.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hk.grad.cpu().double(), hr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wk.grad.cpu().double(), wr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_gradient_bf16_weights(backend):
    T, H, E, k = 6, 32, 4, 2
    h = torch.randn(T, H).bfloat16().to(DEVICE)
    ids = torch.randint(0, E, (T, k), device=DEVICE)
    out, perm = permute(backend, h, ids, E)
    eo = out.clone().requires_grad_(True)
    w = torch.rand(T, k, device=DEVICE).bfloat16().requires_grad_(True)
    with dispatch.use_backend(backend):
        y = r1kernels.moe_unpermute(eo, perm, w)
    y.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and eo.grad.dtype == torch.bfloat16
    expect = (out.float().cpu()[perm.row_ids.cpu().long()]).sum(-1)
    torch.testing.assert_close(w.grad.float().cpu(), expect, rtol=1e-2, atol=1e-2)


def test_reference_gradcheck():
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 0], [3, 1]])

    def f(hh, ww):
        out, perm = moe_permute_ref(hh, ids, 4, align=2)
        return moe_unpermute_ref(out * 1.5, perm, ww)

    torch.autograd.gradcheck(f, (h, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    h = torch.randn(4, 8, device=DEVICE)
    ids = torch.randint(0, 6, (4, 2), device=DEVICE)
    with dispatch.use_backend(backend):
        for bad in (6, -1):
            b = ids.clone()
            b[2, 1] = bad
            with pytest.raises(IndexError, match="ids"):
                r1kernels.moe_permute(h, b, 6)
        with pytest.raises(ValueError, match="ids"):
            r1kernels.moe_permute(h, ids.float(), 6)
        with pytest.raises(ValueError, match="ids"):
            r1kernels.moe_permute(h, ids[:3], 6)
        with pytest.raises(ValueError, match="hidden"):
            r1kernels.moe_permute(h.long(), ids, 6)
        with pytest.raises(ValueError, match="align"):
            r1kernels.moe_permute(h, ids, 6, align=0)
        with pytest.raises(ValueError, match="num_experts"):
            r1kernels.moe_permute(h, ids, 0)
        out, perm = r1kernels.moe_permute(h, ids, 6, align=2)
        w = torch.rand(4, 2, device=DEVICE)
        with pytest.raises(ValueError, match="rows"):
            r1kernels.moe_unpermute(out[:-1], perm, w)
        with pytest.raises(ValueError, match="weights"):
            r1kernels.moe_unpermute(out, perm, w[:, :1])
        with pytest.raises(ValueError, match="weights"):
            r1kernels.moe_unpermute(out, perm, w.long())
        with pytest.raises(ValueError, match="perm"):
            r1kernels.moe_unpermute(out, tuple(perm), w)
        # a corrupted permutation: rows outside expert_out (-1, R, a huge id) never read anything
        for bad in (-1, out.shape[0], 2**31 - 1):
            rows = perm.row_ids.clone()
            rows[1, 0] = bad
            for eo in (out, out.clone().requires_grad_(True)):
                with pytest.raises(IndexError, match="row_ids"):
                    r1kernels.moe_unpermute(eo, perm._replace(row_ids=rows), w)


def _has_cpp():
    return "cpp" in dispatch.available_backends("moe_permute", "cpu") or torch.cuda.is_available()


def test_cpp_ops_validate():
    if not _has_cpp():
        pytest.skip("C++ extension not available (not built)")
    h = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(IndexError, match="ids"):
        torch.ops.r1kernels.moe_permute(h, torch.full((4, 2), 6, device=DEVICE), 6, 1)
    with pytest.raises(ValueError, match="align"):
        torch.ops.r1kernels.moe_permute(h, torch.zeros(4, 2, dtype=torch.long, device=DEVICE), 6, 0)
    with pytest.raises(ValueError, match="row_ids"):
        torch.ops.r1kernels.moe_unpermute(h, torch.zeros(4, 2, dtype=torch.long, device=DEVICE), None)
    rows = torch.tensor([[0, 99], [-5, 1], [2, 3], [3, 3]], dtype=torch.int32, device=DEVICE)
    if DEVICE == "cpu":  # the CPU op checks (one reduction)
        with pytest.raises(IndexError, match="row_ids"):
            torch.ops.r1kernels.moe_unpermute(h, rows, None)
    else:  # the CUDA op skips rows outside the source, never reads out of bounds (moe_unpermute checks)
        torch.testing.assert_close(torch.ops.r1kernels.moe_unpermute(h, rows, None)[0], h[0])


def test_opcheck():
    if not _has_cpp():
        pytest.skip("C++ extension not available (not built)")
    T, H, E, k = 7, 16, 8, 2
    h = torch.randn(T, H, device=DEVICE)
    ids = torch.randint(0, E, (T, k), device=DEVICE)
    ops = torch.ops.r1kernels
    torch.library.opcheck(ops.moe_permute.default, (h, ids, E, 4))
    torch.library.opcheck(ops.moe_permute.default, (h.bfloat16(), ids.int(), E, 1))
    out, counts, offsets, row_ids, token_ids = ops.moe_permute(h, ids, E, 4)
    w = torch.rand(T, k, device=DEVICE)
    torch.library.opcheck(ops.moe_unpermute.default, (out, row_ids, w))
    torch.library.opcheck(ops.moe_unpermute.default, (out.half(), row_ids, None))
    torch.library.opcheck(ops.moe_scatter_rows.default, (h, row_ids, token_ids, counts, offsets, w))
    torch.library.opcheck(ops.moe_rows_dot.default, (h, out, row_ids))


@pytest.mark.parametrize("backend", BACKENDS)  # Triton too: its launchers are custom ops under compile
def test_torch_compile_fullgraph(backend):
    T, H, E, k = 12, 16, 8, 2
    h = torch.randn(T, H, device=DEVICE, requires_grad=True)
    w = torch.rand(T, k, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, E, (T, k), device=DEVICE)

    def fn(hh, ww):
        x, perm = r1kernels.moe_permute(hh, ids, E, align=4)
        return r1kernels.moe_unpermute(x * 2.0, perm, ww)

    with dispatch.use_backend(backend):
        y = torch.compile(fn, fullgraph=True)(h, w)
        y.sum().backward()
    hr = h.detach().cpu().double().clone().requires_grad_(True)
    wr = w.detach().cpu().double().clone().requires_grad_(True)
    out, perm = moe_permute_ref(hr, ids.cpu(), E, align=4)
    yr = moe_unpermute_ref(out * 2.0, perm, wr)
    yr.sum().backward()
    torch.testing.assert_close(y.detach().cpu().double(), yr.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.cpu().double(), hr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.cpu().double(), wr.grad, rtol=1e-5, atol=1e-5)


def test_permute_saves_only_the_row_map():
    """Autograd keeps only the int32 row map for permute's backward, never a copy of the rows."""
    T, H, E, k = 64, 256, 8, 4
    h = torch.randn(T, H, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, E, (T, k), device=DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, perm = r1kernels.moe_permute(h, ids, E)
    assert saved and all(not t.is_floating_point() and t.numel() == T * k for t in saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_dispatch_combine_compiled(backend):
    """The whole MoE layer path (route -> permute -> expert -> unpermute) in one fullgraph compile."""
    T, H, E, k = 16, 32, 64, 4
    x = torch.randn(T, E, device=DEVICE, requires_grad=True)
    b = torch.randn(E, device=DEVICE) * 0.1
    h = torch.randn(T, H, device=DEVICE, requires_grad=True)

    def fn(t, hh):
        w, ids = r1kernels.moe_route(t, k, score_func="sigmoid", n_group=8, topk_group=4, correction_bias=b)
        xx, perm = r1kernels.moe_permute(hh, ids, E, align=4)
        return r1kernels.moe_unpermute(torch.tanh(xx), perm, w)

    with dispatch.use_backend(backend):
        y = torch.compile(fn, fullgraph=True)(x, h)
        y.square().sum().backward()
    xr = x.detach().cpu().double().clone().requires_grad_(True)
    hr = h.detach().cpu().double().clone().requires_grad_(True)
    from r1kernels.reference import moe_route_ref
    w, ids = moe_route_ref(xr, k, score_func="sigmoid", n_group=8, topk_group=4, correction_bias=b.double().cpu())
    xx, perm = moe_permute_ref(hr, ids, E, align=4)
    yr = moe_unpermute_ref(torch.tanh(xx), perm, w)
    yr.square().sum().backward()
    torch.testing.assert_close(y.detach().cpu().double(), yr.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h.grad.cpu().double(), hr.grad, rtol=1e-4, atol=1e-5)
