"""grpo_loss against the float64 reference (values, gradients, metrics) and against TRL 1.16's own
`GRPOTrainer._compute_loss` when trl is installed."""
import itertools
import math
import types
import zlib

import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.reference import grpo_loss_ref
from conftest import DEVICE, backends_for

OP = "grpo_loss"
BACKENDS = backends_for(OP)
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"]


def make_inputs(B, T, *, seed=0, adv_per_token=False, spread=0.3, p_mask=0.7):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    shape = (B, T) if adv_per_token else (B,)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < p_mask
    rw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return lp, old, ref, adv, mask, rw


def run(backend, lp, adv, mask, dtype=torch.float32, **kw):
    """Our loss on `dtype` copies (on CPU for the C++ CPU kernels, else on DEVICE); returns
    (loss, metrics, grad) as float64 on CPU."""
    dev = "cpu" if backend == "cpp" else DEVICE
    x = lp.to(dtype).to(dev).requires_grad_(True)
    kw = {k: (v.to(dev).to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
          for k, v in kw.items()}
    with dispatch.use_backend(backend):
        out = r1kernels.grpo_loss(x, adv.to(dev).float(), mask.to(dev), **kw)
    assert isinstance(out, r1kernels.GRPOLossOutput)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert x.grad.dtype == dtype
    metrics = {k: v.item() for k, v in out.metrics.items()}
    for v in out.metrics.values():
        assert v.dim() == 0 and not v.requires_grad
    return out.loss.item(), metrics, x.grad.double().cpu()


def reference(lp, adv, mask, **kw):
    x = lp.double().clone().requires_grad_(True)
    kw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    loss, metrics = grpo_loss_ref(x, adv.double(), mask, **kw)
    loss.backward()
    return loss.item(), {k: v.item() for k, v in metrics.items()}, x.grad


def check(backend, lp, adv, mask, *, dtype=torch.float32, rtol=1e-5, atol=1e-6, loss_atol=None,
          **kw):
    """loss_atol: the loss's absolute tolerance (default atol). luspo's loss is a sum over up to
    T tokens per row, not a mean, so its absolute fp32 error grows with the row length: 1e-6 per
    token of the longest row (over 80 random inputs its error reached 1.1x of a flat 1e-6)."""
    if loss_atol is None:
        loss_atol = atol * max(1.0, float(mask.sum(-1).max())) if kw.get("loss_type") == "luspo" \
            else atol
    loss, metrics, grad = run(backend, lp, adv, mask, dtype=dtype, **kw)
    rkw = dict(kw)
    if dtype != torch.float32:  # compare against the reference on the rounded inputs
        lp = lp.to(dtype).double()
        rkw = {k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v)
               for k, v in kw.items()}
    rloss, rmetrics, rgrad = reference(lp, adv, mask, **rkw)
    assert math.isfinite(loss) and torch.isfinite(grad).all()
    assert loss == pytest.approx(rloss, rel=rtol, abs=loss_atol)
    for k in ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio"):
        assert metrics[k] == pytest.approx(rmetrics[k], rel=1e-5, abs=1e-6), k
    scale = rgrad.abs().max().item() + 1e-30
    torch.testing.assert_close(grad, rgrad, rtol=rtol, atol=atol * max(scale, 1.0))
    return loss, metrics, grad


# every loss type x IS level x a set of option combinations, on each backend
OPTIONS = {
    "on_policy": dict(),
    "off_policy": dict(old=True),
    "clip_higher_delta": dict(old=True, epsilon_high=0.28, delta=1.5),
    "kl": dict(old=True, beta=0.04),
    "kl_bias_rw": dict(old=True, beta=0.1, use_bias_correction_kl=True, rw=True),
    "rw_nitems_adv_tok": dict(old=True, rw=True, num_items_in_batch=123, adv_per_token=True),
    "maxlen": dict(old=True, max_completion_length=50, epsilon_low=0.1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference(backend, loss_type, level, option):
    opt = dict(OPTIONS[option])
    # a seed fixed per case (str hashes change from one Python process to the next)
    seed = zlib.crc32(f"{loss_type}/{level}/{option}".encode()) % 1000
    lp, old, ref, adv, mask, rw = make_inputs(6, 37, seed=seed,
                                              adv_per_token=opt.pop("adv_per_token", False))
    mask[2] = False  # a fully masked row
    kw = dict(loss_type=loss_type, importance_sampling_level=level)
    if opt.pop("old", False):
        kw["old_logps"] = old
    if opt.pop("rw", False):
        kw["rollout_is_weights"] = rw
    if opt.get("beta", 0.0) != 0.0:
        kw["ref_logps"] = ref
    if loss_type == "cispo" and "epsilon_high" in opt:
        opt["epsilon_high"] = 1.1  # cispo's epsilon_high is a ratio cap
    kw.update(opt)
    check(backend, lp, adv, mask, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "sapo", "cispo"])
def test_clipping_is_exercised(backend, loss_type):
    """Large ratio spread: both clip regions, delta and cispo's cap are hit, metrics nonzero."""
    lp, old, ref, adv, mask, rw = make_inputs(8, 64, seed=3, spread=0.6)
    kw = dict(old_logps=old, loss_type=loss_type, epsilon_high=0.28 if loss_type != "cispo" else 1.2)
    if loss_type != "cispo":
        kw["delta"] = 1.4
    _, metrics, _ = check(backend, lp, adv, mask, **kw)
    if loss_type in ("dapo", "grpo"):
        assert 0 < metrics["clip_ratio_low"] < 1 and 0 < metrics["clip_ratio_high"] < 1
        assert metrics["clip_ratio"] == pytest.approx(metrics["clip_ratio_low"] + metrics["clip_ratio_high"])
    if loss_type == "cispo":
        assert metrics["clip_ratio_high"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_on_policy(backend):
    """On-policy, ratio == 1 exactly: min(c1 A, c2 A) ties; torch splits the gradient, sums to -A."""
    lp, _, _, adv, mask, _ = make_inputs(4, 19, seed=5)
    mask[:] = True
    loss, _, grad = check(backend, lp, adv, mask, loss_type="bnpo")
    expected = -adv.unsqueeze(1).expand(4, 19) / (4 * 19)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)
    assert loss == pytest.approx(-adv.mean().item(), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (1, 1025), (7, 2049), (2, 13), (300, 3)])
def test_shapes(backend, B, T):
    lp, old, ref, adv, mask, rw = make_inputs(B, T, seed=B * 31 + T)
    for level in ("token", "sequence"):
        check(backend, lp, adv, mask, old_logps=old, ref_logps=ref, beta=0.02, loss_type="grpo",
              importance_sampling_level=level)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rows_split_into_chunks(backend, loss_type):
    """Long rows: the Triton path splits each row into several programs (T=3000: 3 chunks of 1024
    tokens), whose partial sums the finalize kernel must combine per row (grpo, sapo: row means)."""
    lp, old, ref, adv, mask, rw = make_inputs(3, 3000, seed=11)
    mask[1, 1500:] = False
    mask[2] = False
    check(backend, lp, adv, mask, old_logps=old, ref_logps=ref, beta=0.05, rollout_is_weights=rw,
          loss_type=loss_type, epsilon_high=0.28 if loss_type != "cispo" else 1.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """The partials of many programs are reduced in a fixed order (on the Triton path by whichever
    program finishes last): repeated calls give bit-identical loss, metrics and gradient."""
    lp, old, ref, adv, mask, rw = make_inputs(5, 2100, seed=23)
    kw = dict(old_logps=old, ref_logps=ref, beta=0.05, loss_type="grpo", num_items_in_batch=777)
    first = run(backend, lp, adv, mask, **kw)
    for _ in range(2):
        again = run(backend, lp, adv, mask, **kw)
        assert again[0] == first[0] and again[1] == first[1]
        assert torch.equal(again[2], first[2])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_last_program_finalizes_under_concurrency(level):
    """The Triton forward's last program (by ticket) reduces every program's partials: with the
    interpreter's programs run as concurrent threads (tests/concurrent_interpreter.py), in
    whatever order they finish, the result is bit-identical to the programs run one after
    another, and matches the reference."""
    if DEVICE != "cpu" or "triton" not in dispatch.available_backends("grpo_loss", DEVICE):
        pytest.skip("the interpreter's concurrent programs (CPU, Triton)")
    from concurrent_interpreter import concurrent_programs

    lp, old, ref, adv, mask, rw = make_inputs(5, 2100, seed=29)  # 3 programs per row (token)
    kw = dict(old_logps=old, ref_logps=ref, beta=0.05, loss_type="grpo", rollout_is_weights=rw,
              importance_sampling_level=level)
    one_by_one = run("triton", lp, adv, mask, **kw)
    for _ in range(2):
        with concurrent_programs(timeout=120):
            res = run("triton", lp, adv, mask, **kw)
        assert res[0] == one_by_one[0] and res[1] == one_by_one[1]
        assert torch.equal(res[2], one_by_one[2])
    ref_loss = run("torch", lp, adv, mask, **kw)[0]
    assert res[0] == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fully_masked_batch(backend, loss_type):
    lp, old, ref, adv, mask, rw = make_inputs(4, 9)
    mask[:] = False
    lp[:, ::2] = float("-inf")  # garbage at masked positions must not leak
    old[:, 1::3] = float("nan")
    for level in ("token", "sequence"):
        loss, metrics, grad = run(backend, lp, adv, mask, old_logps=old, ref_logps=ref, beta=0.1,
                                  loss_type=loss_type, importance_sampling_level=level,
                                  rollout_is_weights=rw)
        assert loss == 0.0 and (grad == 0).all() and all(v == 0.0 for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_garbage_does_not_leak(backend):
    lp, old, ref, adv, mask, rw = make_inputs(5, 21, seed=8)
    mask[1] = False
    kw = dict(old_logps=old, ref_logps=ref, beta=0.05, loss_type="grpo", rollout_is_weights=rw)
    rl, rm, rg = reference(lp, adv, mask, **kw)
    dirty = lp.clone()
    dirty[~mask] = float("-inf")
    old_d = old.clone()
    old_d[~mask] = float("nan")
    for level in ("token", "sequence"):
        kw["importance_sampling_level"] = level
        rl, rm, rg = reference(lp, adv, mask, **kw)
        loss, _, grad = run(backend, dirty, adv, mask, **{**kw, "old_logps": old_d})
        assert loss == pytest.approx(rl, rel=1e-5, abs=1e-6)  # fp32 sums of O(1) terms
        torch.testing.assert_close(grad, rg, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", [(0, 5), (3, 0), (0, 0)])
def test_empty(backend, B, T):
    lp, old, ref, adv, mask, rw = make_inputs(B, T)
    loss, metrics, grad = run(backend, lp, adv, mask, old_logps=old, loss_type="grpo")
    assert loss == 0.0 and grad.shape == (B, T) and all(v == 0.0 for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    # inputs are rounded to dtype; the math is fp32, so the loss matches float64 on the rounded
    # inputs to fp32 accuracy and the gradient to its rounding to dtype (rel 2^-8 / 2^-11)
    lp, old, ref, adv, mask, rw = make_inputs(6, 33, seed=11)
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    for level in ("token", "sequence"):
        check(backend, lp, adv, mask, dtype=dtype, rtol=tol, atol=tol, old_logps=old, ref_logps=ref,
              beta=0.04, loss_type="dapo", importance_sampling_level=level)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_mask_dtypes(backend):
    lp, old, ref, adv, mask, rw = make_inputs(12, 40, seed=2)
    # transposed storage for every [B, T] input, strided advantages
    t = lambda x: x.t().contiguous().t()  # noqa: E731
    adv_big = torch.stack([adv, adv], 1)[:, 0]
    kw = dict(old_logps=t(old), ref_logps=t(ref), beta=0.03, rollout_is_weights=rw[:, :],
              loss_type="grpo")
    base = check(backend, t(lp), adv_big, t(mask), **kw)
    for m in (mask.float(), mask.to(torch.int64), mask.to(torch.uint8)):
        loss, _, grad = run(backend, lp, adv, m, **kw)
        assert loss == pytest.approx(base[0], rel=1e-5, abs=1e-6)  # summation order differs
        torch.testing.assert_close(grad, base[2], rtol=1e-5, atol=1e-8)
    # [B, 1] advantages broadcast like [B]
    loss, _, _ = run(backend, lp, adv.unsqueeze(1), mask, **kw)
    assert loss == pytest.approx(base[0], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_log_ratios(backend):
    lp, old, ref, adv, mask, rw = make_inputs(4, 30, seed=4)
    old = lp + torch.linspace(-30, 30, 30)  # ratios from e^-30 to e^30
    for lt in ("dapo", "sapo", "cispo"):
        check(backend, lp, adv, mask, old_logps=old, loss_type=lt, rtol=1e-5, atol=1e-6,
              epsilon_high=5.0 if lt == "cispo" else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ratio_overflow_gives_finite_gradients(backend, level, loss_type):
    """log-ratios of 90 and 120: exp overflows fp32 (c1 = inf). With A > 0 every clipped loss
    has dl/dc1 = 0 there (sapo: a saturated gate; cispo: no c1 term), so the float64 gradient is
    finite and the kernels must not form 0 * inf = NaN."""
    lp, old, ref, adv, mask, rw = make_inputs(3, 9, seed=21)
    mask[:, 0] = True
    old = lp - torch.tensor([90.0, 120.0, 0.5]).repeat_interleave(3).view(3, 3).repeat(1, 3)
    adv = adv.abs() + 0.1
    for beta in (0.0, 0.05):
        check(backend, lp, adv, mask, old_logps=old, ref_logps=ref, beta=beta, loss_type=loss_type,
              importance_sampling_level=level, epsilon_high=5.0 if loss_type == "cispo" else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy", "old"])
def test_bias_corrected_kl_far_from_reference(backend, on_policy):
    """The bias-corrected KL's gradient where the policy is far below the reference (d = ref - lp
    up to 14): the two terms of d(c1 kl)/dlp, beta c1 (1 - e^d) and beta c1 kl, are each ~1e4
    there and cancel to -beta c1 d, and the advantage term cancels most of that in turn. Summed
    apart in fp32 they lost 3-5% of a row's gradient (seen on the GPU); the kernels use the
    closed form. The gradient is held to 1e-4 of each token's own magnitude."""
    B, T = 4, 30
    g = torch.Generator().manual_seed(11)
    lp = -torch.linspace(1.0, 14.0, T, dtype=torch.float64).repeat(B, 1)
    ref = torch.zeros(B, T, dtype=torch.float64) + torch.rand(B, T, generator=g).double() * 0.05
    old = None if on_policy else lp + torch.randn(B, T, generator=g).double() * 0.05
    d = ref - lp
    # advantages that cancel beta c1 d at one token per row, up to a few percent
    adv = -(0.04 * d[:, T - 3] * (1.0 + torch.tensor([0.01, 0.03, -0.02, 0.05]).double()))
    mask = torch.ones(B, T, dtype=torch.bool)
    kw = dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, old_logps=old,
              ref_logps=ref)
    _, _, grad = run(backend, lp, adv, mask, **kw)
    _, _, rgrad = reference(lp, adv, mask, **kw)
    torch.testing.assert_close(grad, rgrad, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_tensor_and_grad_output(backend):
    lp, old, ref, adv, mask, rw = make_inputs(5, 17, seed=6)
    x = lp.float().to(DEVICE).requires_grad_(True)
    with dispatch.use_backend(backend):
        out = r1kernels.grpo_loss(x, adv.float().to(DEVICE), mask.to(DEVICE), old_logps=old.float().to(DEVICE),
                                  num_items_in_batch=torch.tensor(40, device=DEVICE))
        (out.loss * 3.0).backward()
    rl, _, rg = reference(lp, adv, mask, old_logps=old, num_items_in_batch=40)
    assert out.loss.item() == pytest.approx(rl, rel=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), 3.0 * rg, rtol=1e-5, atol=1e-8)
    # repeated backward with retain_graph gives the same gradient (the saved gradient is not mutated)
    x.grad = None
    with dispatch.use_backend(backend):
        out = r1kernels.grpo_loss(x, adv.float().to(DEVICE), mask.to(DEVICE), old_logps=old.float().to(DEVICE))
    out.loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    out.loss.backward()
    torch.testing.assert_close(x.grad, 2 * g1)


def test_no_grad_and_detached():
    lp, old, ref, adv, mask, rw = make_inputs(3, 8)
    with torch.no_grad():
        out = r1kernels.grpo_loss(lp.float(), adv.float(), mask, old_logps=old.float())
    rl, _, _ = reference(lp, adv, mask, old_logps=old)
    assert out.loss.item() == pytest.approx(rl, rel=1e-5)
    out = r1kernels.grpo_loss(lp.float(), adv.float(), mask, old_logps=old.float())
    assert not out.loss.requires_grad


def test_reference_gradcheck():
    lp, old, ref, adv, mask, rw = make_inputs(3, 6, seed=9)
    for lt, level in itertools.product(("grpo", "sapo", "cispo", "dapo"), ("token", "sequence")):
        f = lambda x: grpo_loss_ref(x, adv, mask, old_logps=old, ref_logps=ref, beta=0.1,  # noqa: E731
                                    use_bias_correction_kl=True, loss_type=lt,
                                    importance_sampling_level=level, rollout_is_weights=rw)[0]
        torch.autograd.gradcheck(f, (lp.clone().requires_grad_(True),))


B_, T_ = 3, 5


@pytest.mark.parametrize("bad,match", [
    (dict(beta=0.1), "ref_logps"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(epsilon_low=-0.1), "epsilon_low"),
    (dict(epsilon_high=-0.2), "epsilon_high"),
    (dict(delta=0.0), "delta"),
    (dict(beta=-1.0, ref_logps=torch.zeros(B_, T_)), "beta"),
    (dict(importance_sampling_level="batch"), "importance_sampling_level"),
    (dict(max_completion_length=0), "max_completion_length"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(num_items_in_batch=-3), "num_items_in_batch"),
    (dict(num_items_in_batch=torch.ones(2)), "num_items_in_batch"),
    (dict(old_logps=torch.zeros(B_, T_ + 1)), "old_logps"),
    (dict(ref_logps=torch.zeros(B_ + 1, T_), beta=0.1), "ref_logps"),
    (dict(rollout_is_weights=torch.zeros(T_)), "rollout_is_weights"),
    (dict(advantages=torch.zeros(B_ + 1)), "advantages"),
    (dict(advantages=torch.zeros(B_, T_ + 1)), "advantages"),
    (dict(mask=torch.ones(B_, T_ - 1, dtype=torch.bool)), "mask"),
    (dict(logps=torch.zeros(B_ * T_)), "logps"),
    (dict(logps=torch.zeros(B_, T_, dtype=torch.int64)), "logps"),
])
def test_bad_input(bad, match):
    args = dict(logps=torch.zeros(B_, T_, requires_grad=True), advantages=torch.zeros(B_),
                mask=torch.ones(B_, T_, dtype=torch.bool))
    for k in ("logps", "advantages", "mask"):
        if k in bad:
            args[k] = bad.pop(k)
    with pytest.raises(ValueError, match=match):
        r1kernels.grpo_loss(args["logps"], args["advantages"], args["mask"], **bad)


@pytest.mark.parametrize("backend", BACKENDS)  # triton: its custom ops (interpreted on CPU)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_torch_compile_fullgraph(backend, level):
    lp, old, ref, adv, mask, rw = make_inputs(4, 16, seed=12)

    def f(x, a, m, o, r):
        out = r1kernels.grpo_loss(x, a, m, old_logps=o, ref_logps=r, beta=0.04, loss_type="grpo",
                                  importance_sampling_level=level, epsilon_high=0.28)
        return out.loss, out.metrics["clip_ratio"]

    x = lp.float().to(DEVICE).requires_grad_(True)
    with dispatch.use_backend(backend):
        loss, clip = torch.compile(f, fullgraph=True)(x, adv.float().to(DEVICE), mask.to(DEVICE),
                                                      old.float().to(DEVICE), ref.float().to(DEVICE))
        loss.backward()
    rl, rm, rg = reference(lp, adv, mask, old_logps=old, ref_logps=ref, beta=0.04, loss_type="grpo",
                           importance_sampling_level=level, epsilon_high=0.28)
    assert loss.item() == pytest.approx(rl, rel=1e-5)
    assert clip.item() == pytest.approx(rm["clip_ratio"], abs=1e-6)
    torch.testing.assert_close(x.grad.double().cpu(), rg, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_dynamic(backend):
    """dynamic=True: Dynamo traces the float options as symbolic floats; the option checks must
    still trace (math.isfinite did not), and one graph serves two shapes."""
    def f(x, a, m):
        return r1kernels.grpo_loss(x, a, m, loss_type="sapo", epsilon_low=0.1).loss

    with dispatch.use_backend(backend):
        g = torch.compile(f, fullgraph=True, dynamic=True)
        for B, T in ((3, 5), (4, 7)):
            lp, old, ref, adv, mask, rw = make_inputs(B, T, seed=B)
            x = lp.float().to(DEVICE).requires_grad_(True)
            loss = g(x, adv.float().to(DEVICE), mask.to(DEVICE))
            loss.backward()
            rl, _, rg = reference(lp, adv, mask, loss_type="sapo", epsilon_low=0.1)
            assert loss.item() == pytest.approx(rl, rel=1e-5)
            torch.testing.assert_close(x.grad.double().cpu(), rg, rtol=1e-5, atol=1e-8)


def test_option_checks_do_not_depend_on_earlier_calls():
    """The options' cache keys by type: beta=False after beta=0 is still refused."""
    lp, adv, mask = torch.zeros(2, 3, requires_grad=True), torch.zeros(2), torch.ones(2, 3)
    for good, bad in ((dict(beta=0), dict(beta=False)),
                      (dict(use_bias_correction_kl=True), dict(use_bias_correction_kl=1)),
                      (dict(max_completion_length=4), dict(max_completion_length=4.0))):
        r1kernels.grpo_loss(lp, adv, mask, **good)
        with pytest.raises(ValueError, match=next(iter(bad))):
            r1kernels.grpo_loss(lp, adv, mask, **bad)


def test_dispatch_backends():
    assert "torch" in dispatch.available_backends(OP, "cpu")
    if DEVICE == "cpu" and dispatch.TRITON_INTERPRET:
        assert "triton" in dispatch.available_backends(OP, "cpu")


# ---- TRL 1.16's own _compute_loss ---------------------------------------------------------------


def trl_compute_loss(lp, adv, mask, *, old=None, ref=None, rw=None, loss_type="dapo",
                     epsilon=0.2, epsilon_high=None, delta=None, beta=0.0, level="token",
                     bias_kl=False, max_completion_length=None, num_items=None):
    """Calls trl.GRPOTrainer._compute_loss on a stand-in trainer whose model returns `lp`.
    Returns (loss, grad of lp, logged metrics)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from collections import defaultdict

    B, T = lp.shape
    x = lp.clone().requires_grad_(True)
    acc = types.SimpleNamespace(num_processes=1, gather=lambda t: t, reduce=lambda t, reduction: t,
                                gather_for_metrics=lambda t: t)
    args = types.SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta,
                                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                                 steps_per_generation=1)
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (x, torch.zeros_like(x), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=beta, args=args, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        use_vllm=rw is not None, vllm_importance_sampling_correction=rw is not None,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=acc, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        max_completion_length=T if max_completion_length is None else max_completion_length)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long),
              "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long),
              "completion_mask": mask.to(torch.long), "advantages": adv,
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    if rw is not None:
        inputs["importance_sampling_ratio"] = rw
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.item(), x.grad, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl(backend, loss_type, level):
    lp, old, ref, adv, mask, rw = make_inputs(6, 23, seed=21, spread=0.5)
    mask[0, :] = False
    mask[1, :] = True
    opts = dict(delta=1.3, epsilon_high=0.28) if loss_type != "cispo" else dict(epsilon_high=1.2)
    tl_loss, tl_grad, tl_metrics = trl_compute_loss(
        lp, adv, mask, old=old, ref=ref, rw=rw, loss_type=loss_type, beta=0.04, level=level,
        bias_kl=True, **opts)
    loss, metrics, grad = run(backend, lp, adv, mask, old_logps=old, ref_logps=ref, beta=0.04,
                              rollout_is_weights=rw, loss_type=loss_type,
                              importance_sampling_level=level, use_bias_correction_kl=True, **opts)
    assert loss == pytest.approx(tl_loss, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, tl_grad, rtol=1e-5, atol=1e-8)
    assert metrics["kl"] == pytest.approx(tl_metrics["kl"], rel=1e-5)
    if level == "token":  # TRL averages sequence-level clip flags per sequence, not per token
        if loss_type == "cispo":
            assert metrics["clip_ratio_high"] == pytest.approx(tl_metrics["cispo_clip_ratio"], abs=1e-6)
        elif loss_type != "sapo":
            assert metrics["clip_ratio_low"] == pytest.approx(tl_metrics["clip_ratio/low_mean"], abs=1e-6)
            assert metrics["clip_ratio_high"] == pytest.approx(tl_metrics["clip_ratio/high_mean"], abs=1e-6)
            assert metrics["clip_ratio"] == pytest.approx(tl_metrics["clip_ratio/region_mean"], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_matches_trl_normalizers(loss_type):
    lp, old, ref, adv, mask, rw = make_inputs(4, 11, seed=22)
    kw = dict(num_items=77) if loss_type == "dapo" else dict(max_completion_length=40)
    tl_loss, tl_grad, _ = trl_compute_loss(lp, adv, mask, old=old, loss_type=loss_type, **kw)
    ours = dict(num_items_in_batch=77) if loss_type == "dapo" else dict(max_completion_length=40)
    loss, _, grad = run("torch", lp, adv, mask, old_logps=old, loss_type=loss_type, **ours)
    assert loss == pytest.approx(tl_loss, rel=1e-5)
    torch.testing.assert_close(grad, tl_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.skipif("triton" not in dispatch.available_backends(OP, DEVICE), reason="triton unavailable")
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_opcheck_triton_custom_ops(level):
    """The custom ops torch.compile sees for the Triton path: schema, fake kernels, no mutation."""
    from r1kernels.ops import grpo_loss as G

    lp, old, ref, adv, mask, rw = make_inputs(3, 10, seed=13)
    f = lambda x: x.float().to(DEVICE)  # noqa: E731
    cfg = G.make_config(loss_type="grpo", epsilon_low=0.2, epsilon_high=None, delta=1.5, beta=0.1,
                        importance_sampling_level=level, use_bias_correction_kl=True,
                        max_completion_length=None, sapo_temperature_pos=1.0,
                        sapo_temperature_neg=1.05, T=10)
    a = f(adv).unsqueeze(1).expand(3, 10)
    args = (f(lp), a, mask.to(DEVICE), f(old), f(ref), f(rw), torch.tensor([7.0], device=DEVICE), *cfg, True)
    torch.library.opcheck(G._grpo_loss_fwd_op, args)
    g, out, scale = G._grpo_loss_fwd_op(*args)
    rl, _, rg = reference(lp, adv, mask, old_logps=old, ref_logps=ref, beta=0.1, delta=1.5,
                          use_bias_correction_kl=True, importance_sampling_level=level,
                          rollout_is_weights=rw, loss_type="grpo")
    assert out[0].item() == pytest.approx(rl, rel=1e-5, abs=1e-7)
    torch.testing.assert_close((g * scale.unsqueeze(1)).double().cpu(), rg, rtol=1e-5, atol=1e-8)
    dlp = G.grpo_loss_bwd(g, scale, torch.tensor(2.0, device=DEVICE), torch.bfloat16)
    assert dlp.dtype == torch.bfloat16
    torch.testing.assert_close(dlp.double().cpu(), 2 * rg, rtol=1e-2, atol=1e-6)


# ---- the C++ CPU kernels (csrc/grpo_loss/grpo_loss_cpu.cpp) ------------------------------------

CPP = pytest.mark.skipif("cpp" not in dispatch.available_backends(OP, "cpu"),
                         reason="the C++ extension's CPU kernels are not built here")


@CPP
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cpp_threads_bit_identical(level):
    """Rows are split over threads and the partials reduced in a fixed order: one thread and two
    give the same bits."""
    lp, old, ref, adv, mask, rw = make_inputs(9, 3001, seed=31)
    kw = dict(old_logps=old, ref_logps=ref, beta=0.05, loss_type="grpo", rollout_is_weights=rw,
              importance_sampling_level=level, delta=1.4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpp", lp, adv, mask, **kw)
        torch.set_num_threads(2)
        two = run("cpp", lp, adv, mask, **kw)
    finally:
        torch.set_num_threads(threads)
    assert one[0] == two[0] and one[1] == two[1]
    assert torch.equal(one[2], two[2])


@CPP
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_opcheck_cpp_ops(level):
    """The extension ops the C++ path calls: schema, fake kernels (torch.compile), values."""
    from r1kernels.ops import grpo_loss as G

    lp, old, ref, adv, mask, rw = make_inputs(4, 11, seed=17)
    cfg = G.make_config(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, delta=1.5, beta=0.1,
                        importance_sampling_level=level, use_bias_correction_kl=True,
                        max_completion_length=None, sapo_temperature_pos=1.0,
                        sapo_temperature_neg=1.05, T=11)
    a = adv.float().unsqueeze(1).expand(4, 11)
    args = (lp.float(), a, mask, old.float(), ref.float(), rw.float(), cfg.loss, cfg.seq,
            cfg.eps_lo, cfg.eps_hi, cfg.delta, cfg.beta, cfg.bias_kl, cfg.tau_pos, cfg.tau_neg, True)
    torch.library.opcheck(torch.ops.r1kernels.grpo_loss_partials.default, args)
    g, part = torch.ops.r1kernels.grpo_loss_partials(*args)
    nitems = torch.tensor([13.0])
    torch.library.opcheck(torch.ops.r1kernels.grpo_loss_finalize.default,
                          (part, nitems, cfg.loss, cfg.max_len))
    out, scale = torch.ops.r1kernels.grpo_loss_finalize(part, nitems, cfg.loss, cfg.max_len)
    rl, rm, rg = reference(lp, adv, mask, old_logps=old, ref_logps=ref, beta=0.1, delta=1.5,
                           epsilon_high=0.28, use_bias_correction_kl=True,
                           importance_sampling_level=level, rollout_is_weights=rw,
                           loss_type="dapo", num_items_in_batch=13)
    assert out[0].item() == pytest.approx(rl, rel=1e-5, abs=1e-7)
    assert out[1].item() == pytest.approx(rm["kl"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close((g * scale.unsqueeze(1)).double(), rg, rtol=1e-5, atol=1e-8)
