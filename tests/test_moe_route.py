"""moe_route, moe_expert_counts, moe_update_bias, moe_sequence_aux_loss against the float64 references."""
import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.reference import (moe_expert_counts_ref, moe_route_ref, moe_sequence_aux_loss_ref,
                                 moe_update_bias_ref)
from conftest import DEVICE, backends_for

OP = "moe_route"
BACKENDS = backends_for(OP)

# (E, top_k, score_func, n_group, topk_group, bias): Mixtral/Qwen/DeepSeek-style routers, odd sizes
CONFIGS = [
    (8, 1, "softmax", 1, 1, False),
    (8, 2, "softmax", 1, 1, False),
    (60, 6, "softmax", 1, 1, False),       # Qwen1.5-MoE: 60 experts
    (60, 2, "sigmoid", 4, 2, True),        # groups of 15 (odd)
    (64, 6, "softmax", 1, 1, False),
    (64, 8, "sigmoid", 1, 1, True),
    (64, 1, "sigmoid", 8, 4, False),       # DeepSeek-V2-style group max
    (128, 8, "softmax", 1, 1, False),      # Qwen3-MoE
    (256, 8, "sigmoid", 8, 4, True),       # DeepSeek-V3
    (256, 6, "softmax", 8, 3, False),
    (256, 6, "sqrtsoftplus", 1, 1, True),  # DeepSeek-V4
    (384, 8, "sigmoid", 1, 1, True),       # Kimi-K2.5: one group, 384 experts
    (512, 10, "softmax", 1, 1, False),     # Qwen3.5-397B-A17B
    (512, 16, "sqrtsoftplus", 8, 4, True),  # the kernels' limits: E=512, top_k=16
]
SCORE_FUNCS = ["softmax", "sigmoid", "sqrtsoftplus"]


def cfg_id(c):
    E, k, sf, ng, tg, b = c
    return f"E{E}-k{k}-{sf}-g{ng}of{tg}" + ("-bias" if b else "")


def route(backend, x, k, **kw):
    with dispatch.use_backend(backend):
        return r1kernels.moe_route(x, k, **kw)


def check(backend, x, k, *, atol=2e-6, **kw):
    """Values and ids against the float64 reference run on the same (upcast) logits."""
    w, ids = route(backend, x.to(DEVICE), k, **kw)
    ref_kw = dict(kw)
    if ref_kw.get("correction_bias") is not None:
        ref_kw["correction_bias"] = ref_kw["correction_bias"].double()
    if ref_kw.get("replay_ids") is not None:
        ref_kw["replay_ids"] = ref_kw["replay_ids"].cpu()
    wr, idr = moe_route_ref(x.cpu().double(), k, **{key: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                              for key, v in ref_kw.items()})
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == (x.shape[0], k) and ids.shape == (x.shape[0], k)
    assert ((ids >= 0) & (ids < x.shape[1])).all()
    assert torch.equal(ids.cpu(), idr), f"ids differ:\n{ids.cpu()}\n{idr}"
    torch.testing.assert_close(w.cpu().double(), wr, rtol=1e-5, atol=atol, equal_nan=True)
    return w, ids


def make_kw(E, sf, ng, tg, bias):
    kw = dict(score_func=sf, n_group=ng, topk_group=tg)
    if bias:
        kw["correction_bias"] = (torch.randn(E) * 0.05).to(DEVICE)
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
@pytest.mark.parametrize("T", [1, 37])
def test_matches_reference(backend, cfg, T):
    E, k, sf, ng, tg, bias = cfg
    x = torch.randn(T, E) * 2
    check(backend, x, k, **make_kw(E, sf, ng, tg, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm,scale", [(False, 1.0), (True, 2.5), (False, 16.0)])
def test_norm_and_scaling(backend, norm, scale):
    x = torch.randn(9, 64)
    w, _ = check(backend, x, 6, norm_topk_prob=norm, routed_scaling_factor=scale)
    if norm:
        torch.testing.assert_close(w.sum(-1).cpu(), torch.full((9,), scale))
    w, _ = check(backend, x, 4, score_func="sigmoid", n_group=4, topk_group=2,
                 correction_bias=torch.randn(64).to(DEVICE) * 0.1, norm_topk_prob=norm, routed_scaling_factor=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_logits(backend, dtype):
    # bf16/fp16 logits tie often; the selection must still match the reference on the same values
    for cfg in [(128, 8, "softmax", 1, 1, False), (256, 8, "sigmoid", 8, 4, True)]:
        E, k, sf, ng, tg, bias = cfg
        x = (torch.randn(33, E) * 2).to(dtype)
        check(backend, x, k, **make_kw(E, sf, ng, tg, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lower_index(backend):
    x = torch.zeros(3, 16)
    _, ids = check(backend, x, 4)
    assert ids.cpu().tolist() == [[0, 1, 2, 3]] * 3
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 0.0, 3.0]])
    _, ids = check(backend, x, 3)
    assert ids.cpu().tolist() == [[1, 2, 4]]
    # tied groups: the lower groups are kept; tied experts inside them too
    x = torch.zeros(2, 32)
    _, ids = check(backend, x, 4, score_func="sigmoid", n_group=8, topk_group=2,
                   correction_bias=torch.zeros(32, device=DEVICE))
    assert ids.cpu().tolist() == [[0, 1, 2, 3]] * 2
    # -0.0 equals +0.0
    x = torch.tensor([[-0.0, 0.0, -1.0, -0.0]])
    _, ids = check(backend, x, 2, score_func="sigmoid")
    assert ids.cpu().tolist() == [[0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_restrict_selection(backend):
    # group 0 has the single best expert, group 1 the best pair: top-2 group scores pick group 1
    E = 16
    x = torch.full((1, E), -4.0)
    x[0, 0] = 4.0
    x[0, 8:10] = 3.0
    _, ids = check(backend, x, 2, score_func="sigmoid", n_group=2, topk_group=1,
                   correction_bias=torch.zeros(E, device=DEVICE))
    assert ids.cpu().tolist() == [[8, 9]]
    # without a bias the group score is the max: group 0 wins
    _, ids = check(backend, x, 2, score_func="sigmoid", n_group=2, topk_group=1)
    assert ids.cpu().tolist() == [[0, 1]]
    # the bias selects but does not weigh
    b = torch.zeros(E)
    b[5] = 10.0
    w, ids = check(backend, x, 1, score_func="sigmoid", correction_bias=b.to(DEVICE), norm_topk_prob=False)
    assert ids.cpu().tolist() == [[5]]
    torch.testing.assert_close(w.cpu(), torch.sigmoid(torch.tensor([[-4.0]])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores(backend):
    E, k = 16, 4
    x = torch.randn(6, E)
    x[0, [1, 3, 5]] = float("nan")           # a few NaN
    x[1, :14] = float("nan")                 # fewer finite scores than top_k
    x[2, :] = float("nan")                   # all NaN
    x[3, 4] = float("inf")
    x[4, :] = float("-inf")
    _, ids = check(backend, x, k, score_func="sigmoid")
    ids = ids.cpu()
    assert not any(i in (1, 3, 5) for i in ids[0].tolist())
    assert sorted(ids[1, :2].tolist()) == [14, 15] and ids[1, 2:].tolist() == [0, 1]
    assert ids[2].tolist() == [0, 1, 2, 3]
    assert ids[3, 0] == 4
    # softmax: one NaN logit makes the row NaN (as torch.softmax); ids stay in range
    w, ids = check(backend, x, k, score_func="softmax")
    assert ids.cpu()[0].tolist() == [0, 1, 2, 3] and torch.isnan(w[0]).all()
    assert torch.isfinite(w[5]).all()
    # with groups and a bias
    check(backend, x, k, score_func="sigmoid", n_group=4, topk_group=2, correction_bias=torch.randn(E, device=DEVICE))
    check(backend, x, k, score_func="sigmoid", n_group=4, topk_group=2)
    # sqrtsoftplus: NaN like sigmoid (per score), -inf scores 0, +inf scores inf
    w, ids = check(backend, x, k, score_func="sqrtsoftplus", correction_bias=torch.randn(E, device=DEVICE))
    assert not any(i in (1, 3, 5) for i in ids.cpu()[0].tolist())
    check(backend, x, k, score_func="sqrtsoftplus", n_group=4, topk_group=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqrtsoftplus_extremes(backend):
    """sqrt(softplus(x)) over the whole range: softplus underflowing (x < -104 in fp32), tiny
    (log1p matters below x = -17), torch's threshold at 20, overflow. Values and gradients
    against float64 at every selected score (replayed, so each listed logit is selected)."""
    vals = [-200.0, -100.0, -60.0, -30.0, -17.0, -5.0, -1e-3, 0.0, 1e-3, 3.0, 19.9, 20.1, 60.0, 1e30]
    E = len(vals)
    x = torch.tensor([vals, vals[::-1]])
    rep = torch.arange(E).repeat(2, 1)
    check(backend, x, E, score_func="sqrtsoftplus", replay_ids=rep, norm_topk_prob=False, atol=1e-20)
    _grad_check(backend, x, E, score_func="sqrtsoftplus", replay_ids=rep, norm_topk_prob=False, atol=1e-20)
    _grad_check(backend, x, E, score_func="sqrtsoftplus", replay_ids=rep, atol=1e-20)
    # selection: the order of the scores, ties to the lower index, for logits far below 0 too
    xs = torch.tensor([[-90.0, -80.0, -90.0, -85.0, -300.0, -300.0]])
    _, ids = check(backend, xs, 5, score_func="sqrtsoftplus", atol=1e-20)
    assert ids.cpu().tolist() == [[1, 3, 0, 2, 4]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_and_empty(backend):
    # logits of +-100: most fp32 scores underflow to (near) 0 and tie there, so the ids are checked
    # as a valid top-k of the float64 scores (same chosen values) rather than index by index
    x = torch.randn(5, 64) * 100
    for kw in (dict(score_func="softmax"), dict(score_func="sigmoid")):
        w, ids = route(backend, x.to(DEVICE), 8, **kw)
        s = torch.softmax(x.double(), -1) if kw["score_func"] == "softmax" else torch.sigmoid(x.double())
        chosen = s.gather(1, ids.cpu().long()).sort(-1, descending=True).values
        best = s.topk(8, dim=-1).values
        torch.testing.assert_close(chosen, best, rtol=1e-5, atol=1e-30)
        wr = chosen / (chosen.sum(-1, keepdim=True) + 1e-20)
        torch.testing.assert_close(w.cpu().double().sort(-1, descending=True).values, wr, rtol=1e-5, atol=1e-6)
    w, ids = route(backend, torch.randn(0, 64, device=DEVICE), 8)
    assert w.shape == (0, 8) and ids.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    base = torch.randn(64, 40)
    x = base[::2, :32]  # row stride 40
    check(backend, x, 4)
    xt = torch.randn(32, 12).t()  # column-major
    check(backend, xt, 3, score_func="sigmoid")


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay(backend):
    E, k, T = 64, 6, 11
    x = torch.randn(T, E)
    _, ids0 = route(backend, x.to(DEVICE), k)
    # new logits, old ids: weights are the new scores at the replayed ids
    x2 = torch.randn(T, E)
    for rep in (ids0, ids0.long(), torch.flip(ids0, dims=[1])):
        w, ids = check(backend, x2, k, replay_ids=rep)
        assert torch.equal(ids.cpu(), rep.cpu().int())
    # duplicate ids are allowed in a replay
    dup = torch.zeros(T, k, dtype=torch.int64, device=DEVICE)
    check(backend, x2, k, replay_ids=dup, score_func="sigmoid")
    bad = ids0.clone()
    bad[3, 2] = E
    with pytest.raises(IndexError, match="replay_ids"):
        route(backend, x2.to(DEVICE), k, replay_ids=bad)
    bad[3, 2] = -1
    with pytest.raises(IndexError, match="replay_ids"):
        route(backend, x2.to(DEVICE), k, replay_ids=bad)


def _grad_check(backend, x, k, *, atol=1e-6, **kw):
    g = torch.randn(x.shape[0], k, dtype=torch.float64)
    xk = x.float().to(DEVICE).clone().requires_grad_(True)
    kwd = {key: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    with dispatch.use_backend(backend):
        w, ids = r1kernels.moe_route(xk, k, **kwd)
    w.backward(g.float().to(DEVICE))
    xr = x.detach().cpu().double().clone().requires_grad_(True)
    kwr = {key: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in kw.items()}
    wr, idr = moe_route_ref(xr, k, **kwr)
    wr.backward(g)
    assert torch.equal(ids.cpu(), idr)
    torch.testing.assert_close(xk.grad.cpu().double(), xr.grad, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sf", SCORE_FUNCS)
@pytest.mark.parametrize("norm,scale", [(True, 1.0), (False, 2.5), (True, 2.5)])
def test_gradient(backend, sf, norm, scale):
    x = torch.randn(13, 64)
    _grad_check(backend, x, 6, score_func=sf, norm_topk_prob=norm, routed_scaling_factor=scale)
    _grad_check(backend, torch.randn(7, 256), 8, score_func=sf, n_group=8, topk_group=4,
                correction_bias=torch.randn(256) * 0.05, norm_topk_prob=norm, routed_scaling_factor=scale)
    _grad_check(backend, x, 6, score_func=sf, replay_ids=torch.randint(0, 64, (13, 6)), norm_topk_prob=norm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sf", SCORE_FUNCS)
def test_expert_scale(backend, sf):
    """expert_scale (Gemma-4's per-expert scale): after the normalization, before the scaling
    factor; values, and gradients w.r.t. both the logits and expert_scale, at E=512, top_k=16."""
    for E, k, ng, tg, bias in ((64, 6, 1, 1, False), (512, 16, 8, 4, True)):
        x = torch.randn(11, E) * 2
        es = torch.rand(E, dtype=torch.float64) + 0.5
        kw = dict(score_func=sf, n_group=ng, topk_group=tg, routed_scaling_factor=2.5)
        if bias:
            kw["correction_bias"] = torch.randn(E, dtype=torch.float64) * 0.05
        for norm in (True, False):
            g = torch.randn(11, k, dtype=torch.float64)
            xk = x.clone().to(DEVICE).requires_grad_(True)
            esk = es.float().to(DEVICE).requires_grad_(True)
            kwd = {key: (v.float().to(DEVICE) if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
            with dispatch.use_backend(backend):
                w, ids = r1kernels.moe_route(xk, k, norm_topk_prob=norm, expert_scale=esk, **kwd)
            w.backward(g.float().to(DEVICE))
            xr = x.double().requires_grad_(True)
            esr = es.clone().requires_grad_(True)
            wr, idr = moe_route_ref(xr, k, norm_topk_prob=norm, expert_scale=esr, **kw)
            wr.backward(g)
            assert torch.equal(ids.cpu(), idr)
            assert w.dtype == torch.float32
            torch.testing.assert_close(w.detach().cpu().double(), wr.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(xk.grad.cpu().double(), xr.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(esk.grad.cpu().double(), esr.grad, rtol=1e-4, atol=1e-6)
            assert (esk.grad != 0).sum() > k  # the chosen experts' scales get a gradient
    # a bf16 parameter gets its gradient in bf16; without grad on the logits expert_scale still learns
    es16 = torch.ones(64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    with dispatch.use_backend(backend):
        w, _ = r1kernels.moe_route(torch.randn(5, 64, device=DEVICE), 4, score_func=sf, expert_scale=es16)
    w.sum().backward()
    assert es16.grad.dtype == torch.bfloat16 and es16.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_low_precision(backend):
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(9, 64) * 2).to(dtype)
        xk = x.to(DEVICE).clone().requires_grad_(True)
        with dispatch.use_backend(backend):
            w, ids = r1kernels.moe_route(xk, 4)
        w.sum().mul(3).add((w * w).sum()).backward()
        xr = x.double().requires_grad_(True)
        wr, _ = moe_route_ref(xr, 4)
        wr.sum().mul(3).add((wr * wr).sum()).backward()
        assert xk.grad.dtype == dtype
        # the only rounding is the final cast of the gradient to dtype
        torch.testing.assert_close(xk.grad.cpu().double(), xr.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_topk_tensors(backend):
    """Backward keeps [T, k] tensors (plus the logits input for softmax), never a new [T, E] one."""
    T, E, k = 32, 64, 4
    x = torch.randn(T, E, device=DEVICE, requires_grad=True)
    for sf in SCORE_FUNCS:
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with dispatch.use_backend(backend):
                w, _ = r1kernels.moe_route(x, k, score_func=sf)
        big = [t for t in saved if t.numel() >= T * E]
        if sf != "softmax":
            assert big == []
        else:
            assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
        w.sum().backward()


def test_reference_gradcheck():
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    es = (torch.rand(12, dtype=torch.float64) + 0.5).requires_grad_(True)
    for sf in SCORE_FUNCS:
        torch.autograd.gradcheck(lambda t: moe_route_ref(t, 3, score_func=sf, n_group=3, topk_group=2)[0], (x,))
        torch.autograd.gradcheck(lambda t, e: moe_route_ref(t, 3, score_func=sf, expert_scale=e,
                                                            routed_scaling_factor=2.0)[0], (x, es))


@pytest.mark.parametrize("bad,exc", [
    (dict(top_k=9), ValueError),                                        # top_k > E
    (dict(top_k=0), ValueError),
    (dict(top_k=2, n_group=3), ValueError),                             # E not divisible by n_group
    (dict(top_k=2, n_group=4, topk_group=5), ValueError),
    (dict(top_k=5, n_group=4, topk_group=2), ValueError),               # top_k > kept experts
    (dict(top_k=2, score_func="relu"), ValueError),
    (dict(top_k=2, score_func="sqrt_softplus"), ValueError),
    (dict(top_k=2, expert_scale=torch.ones(7)), ValueError),
    (dict(top_k=2, expert_scale=torch.ones(8, dtype=torch.long)), ValueError),
    (dict(top_k=2, expert_scale=torch.ones(1, 8)), ValueError),
    (dict(top_k=2, correction_bias=torch.zeros(7)), ValueError),
    (dict(top_k=2, replay_ids=torch.zeros(4, 3, dtype=torch.long)), ValueError),
    (dict(top_k=2, replay_ids=torch.zeros(4, 2)), ValueError),          # float ids
    (dict(top_k=2, replay_ids=torch.full((4, 2), 8)), IndexError),
    (dict(router_logits=torch.zeros(4, 8, dtype=torch.int32), top_k=2), ValueError),
    (dict(router_logits=torch.zeros(8), top_k=2), ValueError),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend, bad, exc):
    kw = dict(router_logits=torch.randn(4, 8))
    kw.update(bad)
    kw = {key: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    with dispatch.use_backend(backend):
        with pytest.raises(exc):
            r1kernels.moe_route(**kw)


def _has_cpp():
    return "cpp" in dispatch.available_backends(OP, "cpu") or torch.cuda.is_available()


def test_cpp_op_validates():
    if not _has_cpp():
        pytest.skip("C++ extension not available (not built)")
    x = torch.randn(4, 8, device=DEVICE)
    op = torch.ops.r1kernels.moe_route
    with pytest.raises(ValueError, match="top_k"):
        op(x, 9, "softmax", 1, 1, None, True, 1.0, None)
    with pytest.raises(ValueError, match="n_group"):
        op(x, 2, "softmax", 3, 1, None, True, 1.0, None)
    with pytest.raises(ValueError, match="score_func"):
        op(x, 2, "tanh", 1, 1, None, True, 1.0, None)
    with pytest.raises(IndexError, match="replay_ids"):
        op(x, 2, "softmax", 1, 1, None, True, 1.0, torch.full((4, 2), 8, device=DEVICE))


def test_opcheck():
    if not _has_cpp():
        pytest.skip("C++ extension not available (not built)")
    x = torch.randn(6, 32, device=DEVICE)
    b = torch.randn(32, device=DEVICE)
    op = torch.ops.r1kernels.moe_route.default
    torch.library.opcheck(op, (x, 4, "softmax", 1, 1, None, True, 1.0, None))
    torch.library.opcheck(op, (x, 4, "sigmoid", 4, 2, b, False, 2.5, None))
    torch.library.opcheck(op, (x.bfloat16(), 4, "sigmoid", 1, 1, None, True, 1.0,
                               torch.randint(0, 32, (6, 4), device=DEVICE)))
    w, ids, sel, lse = torch.ops.r1kernels.moe_route(x, 4, "softmax", 1, 1, None, True, 1.0, None)
    bop = torch.ops.r1kernels.moe_route_backward.default
    torch.library.opcheck(bop, (torch.randn(6, 4, device=DEVICE), ids, sel, x, lse, 32, torch.float32, "softmax"))
    torch.library.opcheck(bop, (torch.randn(6, 4, device=DEVICE), ids, sel, None, lse, 32, torch.bfloat16, "sigmoid"))
    torch.library.opcheck(op, (x, 4, "sqrtsoftplus", 1, 1, b, True, 1.0, None))
    w, ids, sel, lse = torch.ops.r1kernels.moe_route(x, 4, "sqrtsoftplus", 1, 1, b, True, 1.0, None)
    torch.library.opcheck(bop, (torch.randn(6, 4, device=DEVICE), ids, sel, None, lse, 32, torch.float32,
                                "sqrtsoftplus"))


@pytest.mark.parametrize("backend", BACKENDS)  # Triton too: its launchers are custom ops under compile
def test_torch_compile_fullgraph(backend):
    x = torch.randn(16, 64, device=DEVICE, requires_grad=True)
    b = torch.randn(64, device=DEVICE) * 0.1
    es = (torch.rand(64, device=DEVICE) + 0.5).requires_grad_(True)

    def fn(t, e):
        w, ids = r1kernels.moe_route(t, 4, score_func="sqrtsoftplus", n_group=8, topk_group=4, correction_bias=b,
                                     expert_scale=e)
        return (w * w).sum(), ids

    with dispatch.use_backend(backend):
        loss, ids = torch.compile(fn, fullgraph=True)(x, es)
        loss.backward()
    xr = x.detach().cpu().double().requires_grad_(True)
    er = es.detach().cpu().double().requires_grad_(True)
    wr, idr = moe_route_ref(xr, 4, score_func="sqrtsoftplus", n_group=8, topk_group=4,
                            correction_bias=b.double().cpu(), expert_scale=er)
    (wr * wr).sum().backward()
    assert torch.equal(ids.cpu(), idr)
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(es.grad.cpu().double(), er.grad, rtol=1e-4, atol=1e-6)


def test_dispatch_forced_unavailable_raises():
    with dispatch.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cuda"):
            r1kernels.moe_route(torch.randn(4, 8), 2)


def test_large_expert_count_falls_back():
    # beyond the kernels' register budget (E > 512) the torch path routes
    x = torch.randn(3, 600, device=DEVICE)
    check("torch", x, 40)
    for backend in dispatch.available_backends(OP, DEVICE):
        check(backend, x, 40)


# ---- expert counts, bias update, sequence-wise aux loss ------------------------------------------


def test_expert_counts():
    ids = torch.randint(0, 60, (97, 6), device=DEVICE)
    c = r1kernels.moe_expert_counts(ids, 60)
    assert c.dtype == torch.int32 and c.shape == (60,)
    assert torch.equal(c.cpu(), moe_expert_counts_ref(ids.cpu(), 60))
    assert int(c.sum()) == 97 * 6
    assert torch.equal(r1kernels.moe_expert_counts(ids.int(), 64)[60:].cpu(), torch.zeros(4, dtype=torch.int32))
    assert r1kernels.moe_expert_counts(torch.zeros(0, 4, dtype=torch.long, device=DEVICE), 8).sum() == 0
    for bad in (60, -1):
        b = ids.clone()
        b[5, 1] = bad
        with pytest.raises(IndexError):
            r1kernels.moe_expert_counts(b, 60)
    with pytest.raises(ValueError):
        r1kernels.moe_expert_counts(ids.float(), 60)


def test_update_bias():
    bias = torch.zeros(8, device=DEVICE)
    counts = torch.tensor([1, 5, 3, 3, 0, 10, 2, 0], dtype=torch.int32, device=DEVICE)  # mean 3
    out = r1kernels.moe_update_bias(bias, counts, 0.01)
    assert out is bias  # in place
    expect = moe_update_bias_ref(torch.zeros(8), counts.cpu(), 0.01)
    torch.testing.assert_close(bias.cpu(), expect)
    assert bias.cpu().tolist() == pytest.approx([0.01, -0.01, 0, 0, 0.01, -0.01, 0.01, 0.01])
    with pytest.raises(ValueError):
        r1kernels.moe_update_bias(bias, counts[:4], 0.01)
    # an expanded bias would add E updates into one element
    with pytest.raises(ValueError, match="bias"):
        r1kernels.moe_update_bias(torch.zeros(1, device=DEVICE).expand(8), counts, 0.01)


@pytest.mark.parametrize("seq_len", [16, [5, 11, 16]])
def test_sequence_aux_loss(seq_len):
    T, E, k, alpha = 32, 16, 4, 1e-3
    s = torch.sigmoid(torch.randn(T, E, dtype=torch.float64)).to(DEVICE).requires_grad_(True)
    ids = torch.topk(s.detach(), k, dim=-1).indices
    loss = r1kernels.moe_sequence_aux_loss(s, ids, seq_len, k, alpha)
    sr = s.detach().cpu().requires_grad_(True)
    ref = moe_sequence_aux_loss_ref(sr, ids.cpu(), seq_len, k, alpha)
    torch.testing.assert_close(loss.cpu(), ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s.grad.cpu(), sr.grad)
    # the formula by hand for one sequence: perfectly balanced routing gives alpha (f_i = 1, sum P_i = 1)
    T1 = 8
    ids_b = torch.arange(T1 * 2).view(T1, 2) % 4
    s_b = torch.full((T1, 4), 0.25, dtype=torch.float64)
    out = r1kernels.moe_sequence_aux_loss(s_b.to(DEVICE), ids_b.to(DEVICE), T1, 2, 0.5)
    assert out.item() == pytest.approx(0.5)
    # fp32 scores
    out32 = r1kernels.moe_sequence_aux_loss(s.detach().float(), ids, seq_len, k, alpha)
    torch.testing.assert_close(out32.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError):
        r1kernels.moe_sequence_aux_loss(s, ids, 5, k, alpha)  # 32 % 5
    with pytest.raises(IndexError):
        r1kernels.moe_sequence_aux_loss(s, ids + E, 16, k, alpha)
    for bad in ([16.0, 16.0], [16, 15], [0, 32], "16", torch.tensor([16.0, 16.0])):
        with pytest.raises(ValueError, match="seq_len"):
            r1kernels.moe_sequence_aux_loss(s, ids, bad, k, alpha)


@pytest.mark.parametrize("seq_len", [4, [], torch.zeros(0, dtype=torch.long)])
def test_sequence_aux_loss_empty(seq_len):
    """No token, no sequence: loss 0 (not the NaN of an empty mean), a zero-size gradient."""
    s = torch.rand(0, 4, device=DEVICE, requires_grad=True)
    ids = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    loss = r1kernels.moe_sequence_aux_loss(s, ids, seq_len, 2, 0.01)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.shape == (0, 4)
