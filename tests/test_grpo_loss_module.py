"""GRPOLoss (fused hidden-state path) and GRPOLoss.from_logits against the float64 reference
grpo_loss_ref(linear_token_logprobs_ref(...)): loss, metrics (entropy included) and gradients of
hidden, weight, bias / logits."""
import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.nn import GRPOLoss
from r1kernels.ops import linear_token_logprobs as ltp_mod
from r1kernels.reference import grpo_loss_ref, linear_token_logprobs_ref
from conftest import DEVICE, backends_for
from cpu_memory import peak_extra_bytes

BACKENDS = backends_for("grpo_loss")


def make(B, T, H, V, *, seed=0, bias=True, p_mask=0.75):
    g = torch.Generator().manual_seed(seed)
    d = dict(
        hidden=torch.randn(B, T, H, generator=g, dtype=torch.float64),
        weight=torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2,
        bias=torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if bias else None,
        labels=torch.randint(0, V, (B, T), generator=g),
        mask=torch.rand(B, T, generator=g) < p_mask,
        adv=torch.randn(B, generator=g, dtype=torch.float64),
    )
    with torch.no_grad():
        lp = linear_token_logprobs_ref(d["hidden"], d["weight"], d["labels"], bias=d["bias"])
    d["old"] = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    d["ref"] = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    d["rw"] = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return d


def reference(d, opts, kw, temperature=1.0):
    h = d["hidden"].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(True)
    b = None if d["bias"] is None else d["bias"].clone().requires_grad_(True)
    lp, ent = linear_token_logprobs_ref(h, w, d["labels"], bias=b, temperature=temperature,
                                        with_entropy=True)
    loss, metrics = grpo_loss_ref(lp, d["adv"], d["mask"], **opts, **kw)
    loss.backward()
    m = d["mask"].double()
    metrics["entropy"] = (ent.detach() * m).sum() / m.sum().clamp(min=1)
    return loss.item(), {k: v.item() for k, v in metrics.items()}, (h.grad, w.grad, None if b is None else b.grad)


def kwargs_for(d, *, old=True, beta=0.0, rw=False, dtype=torch.float32):
    kw = {}
    if old:
        kw["old_logps"] = d["old"]
    if beta:
        kw["ref_logps"] = d["ref"]
    if rw:
        kw["rollout_is_weights"] = d["rw"]
    return kw


def to_dev(kw, dtype=torch.float32):
    return {k: v.to(DEVICE).to(dtype) for k, v in kw.items()}


CASES = [
    ("dapo", "token", dict(epsilon_high=0.28), dict()),
    ("grpo", "sequence", dict(beta=0.04, use_bias_correction_kl=True), dict(beta=True, rw=True)),
    ("bnpo", "token", dict(delta=1.5, beta=0.1), dict(beta=True)),
    ("dr_grpo", "token", dict(max_completion_length=16), dict()),
    ("luspo", "sequence", dict(), dict(rw=True)),
    ("cispo", "token", dict(epsilon_high=1.1, beta=0.02), dict(beta=True)),
    ("sapo", "token", dict(), dict(old=False)),
    ("sapo", "sequence", dict(), dict()),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level,opts,kwsel", CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_matches_reference(backend, loss_type, level, opts, kwsel, temperature):
    d = make(3, 7, 16, 50, seed=len(loss_type) + (level == "sequence"))
    d["mask"][1] = False
    opts = dict(loss_type=loss_type, importance_sampling_level=level, **opts)
    kw = kwargs_for(d, old=kwsel.get("old", True), beta=kwsel.get("beta", False), rw=kwsel.get("rw", False))
    fused_vs_reference(backend, d, opts, kw, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("sapo", "token"),
                                             ("cispo", "token"), ("grpo", "sequence")])
def test_ratio_overflow_gives_finite_gradients(backend, loss_type, level):
    """old log-probs 90 below the policy's: c1 = exp(90) overflows fp32; with A > 0 the float64
    gradient is finite (clipped tokens, a saturated sapo gate, cispo's stopped ratio), and the
    fused paths must not form 0 * inf = NaN."""
    d = make(3, 7, 16, 50, seed=3)
    with torch.no_grad():
        lp = linear_token_logprobs_ref(d["hidden"], d["weight"], d["labels"], bias=d["bias"])
    d["old"] = lp - 90.0
    d["adv"] = d["adv"].abs() + 0.1
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                epsilon_high=5.0 if loss_type == "cispo" else None)
    fused_vs_reference(backend, d, opts, kwargs_for(d, beta=True), 1.0)


def fused_vs_reference(backend, d, opts, kw, temperature):
    """GRPOLoss on hidden states and GRPOLoss.from_logits (out of place and in place) against
    the float64 reference: loss, metrics, gradients."""
    rloss, rmetrics, rgrads = reference(d, opts, kw, temperature)

    fn = GRPOLoss(temperature=temperature, **opts)
    h = d["hidden"].float().to(DEVICE).requires_grad_(True)
    w = d["weight"].float().to(DEVICE).requires_grad_(True)
    b = d["bias"].float().to(DEVICE).requires_grad_(True)
    with dispatch.use_backend(backend):
        out = fn(h, w, d["labels"].to(DEVICE), d["mask"].to(DEVICE), d["adv"].float().to(DEVICE),
                 bias=b, **to_dev(kw))
    assert isinstance(out, r1kernels.GRPOLossOutput)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(rloss, rel=1e-5, abs=1e-6)
    for k, v in rmetrics.items():
        assert out.metrics[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for ours, ref in zip((h.grad, w.grad, b.grad), rgrads):
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-4, atol=1e-6)

    # from_logits: the same numbers from materialized logits, with and without the in-place grad
    for inplace in (False, True):
        with torch.no_grad():
            logits = (d["hidden"] @ d["weight"].T + d["bias"]).float().to(DEVICE)
        x = logits.clone().requires_grad_(True)
        ptr = x.data_ptr()
        with dispatch.use_backend(backend):
            out = fn.from_logits(x, d["labels"].to(DEVICE), d["mask"].to(DEVICE),
                                 d["adv"].float().to(DEVICE), inplace=inplace, **to_dev(kw))
        out.loss.backward()
        assert out.loss.item() == pytest.approx(rloss, rel=1e-5, abs=1e-6)
        assert out.metrics["entropy"].item() == pytest.approx(rmetrics["entropy"], rel=1e-5)
        lr = (d["hidden"] @ d["weight"].T + d["bias"]).clone().requires_grad_(True)
        lp = r1kernels.reference.token_logprobs_ref(lr, d["labels"], temperature=temperature)
        grpo_loss_ref(lp, d["adv"], d["mask"], **opts, **kw)[0].backward()
        torch.testing.assert_close(x.grad.double().cpu(), lr.grad, rtol=1e-4, atol=1e-7)
        if inplace:  # the gradient lives in the logits' storage
            assert x.grad.data_ptr() == ptr


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_composition_of_public_ops(backend):
    """GRPOLoss == grpo_loss(linear_token_logprobs(...)) computed unfused by this package."""
    d = make(4, 9, 32, 70, seed=5)
    kw = kwargs_for(d, beta=True)
    opts = dict(loss_type="grpo", beta=0.05, epsilon_high=0.28)
    t = lambda: [x.float().to(DEVICE).requires_grad_(True) for x in (d["hidden"], d["weight"], d["bias"])]  # noqa: E731
    h1, w1, b1 = t()
    h2, w2, b2 = t()
    with dispatch.use_backend(backend):
        out = GRPOLoss(**opts)(h1, w1, d["labels"].to(DEVICE), d["mask"].to(DEVICE),
                               d["adv"].float().to(DEVICE), bias=b1, **to_dev(kw))
        lp = r1kernels.linear_token_logprobs(h2, w2, d["labels"].to(DEVICE), bias=b2)
        out2 = r1kernels.grpo_loss(lp, d["adv"].float().to(DEVICE), d["mask"].to(DEVICE), **opts, **to_dev(kw))
    (out.loss * 2.5).backward()
    (out2.loss * 2.5).backward()
    assert out.loss.item() == pytest.approx(out2.loss.item(), rel=1e-5, abs=1e-7)
    for a, b in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fully_masked_and_empty(backend, level):
    d = make(3, 5, 8, 20)
    d["mask"][:] = False
    fn = GRPOLoss(loss_type="grpo", beta=0.1, importance_sampling_level=level)
    for B, T in ((3, 5), (0, 5), (3, 0)):
        h = d["hidden"][:B, :T].float().to(DEVICE).requires_grad_(True)
        w = d["weight"].float().to(DEVICE).requires_grad_(True)
        with dispatch.use_backend(backend):
            out = fn(h, w, d["labels"][:B, :T].to(DEVICE), d["mask"][:B, :T].to(DEVICE),
                     d["adv"][:B].float().to(DEVICE), ref_logps=d["ref"][:B, :T].float().to(DEVICE))
        out.loss.backward()
        assert out.loss.item() == 0.0
        assert all(v.item() == 0.0 for v in out.metrics.values())
        assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_rows_skip_the_lm_head(backend, level):
    """Only the live rows (in the mask, label not ignore_index) go through the lm_head GEMMs, at
    both importance-sampling levels (sequence level: chunks of whole sequences' live rows): NaN
    hidden states elsewhere leave loss, metrics and gradients as they are with clean ones, and
    those rows' hidden gradient is exactly zero."""
    d = make(3, 6, 8, 40, seed=12)
    d["labels"][0, 1] = -100
    dead = ~d["mask"] | (d["labels"] == -100)
    opts = dict(loss_type="grpo", beta=0.04, importance_sampling_level=level)
    kw = to_dev(kwargs_for(d, beta=True))
    res = []
    for poison in (True, False):
        hid = d["hidden"].float().clone()
        if poison:
            hid[dead] = float("nan")
        h = hid.to(DEVICE).requires_grad_(True)
        w = d["weight"].float().to(DEVICE).requires_grad_(True)
        b = d["bias"].float().to(DEVICE).requires_grad_(True)
        with dispatch.use_backend(backend):
            out = GRPOLoss(**opts)(h, w, d["labels"].to(DEVICE), d["mask"].to(DEVICE),
                                   d["adv"].float().to(DEVICE), bias=b, **kw)
        out.loss.backward()
        res.append((out.loss.item(), {k: v.item() for k, v in out.metrics.items()},
                    h.grad.cpu(), w.grad.cpu(), b.grad.cpu()))
    rloss, rmetrics, rgrads = reference(d, opts, kwargs_for(d, beta=True))
    for loss, metrics, gh, gw, gb in res:
        assert loss == pytest.approx(rloss, rel=1e-5, abs=1e-6)
        for k, v in rmetrics.items():
            assert metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        for ours, ref in zip((gh, gw, gb), rgrads):
            torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-6)
        assert (gh[dead] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
    """bf16 hidden/weight: compared with the same op run on the bf16-rounded inputs in float64;
    gradients are rounded to bf16 (rel 2^-8) and the logits GEMM accumulates in fp32."""
    d = make(2, 6, 32, 40, seed=9, bias=False)
    hb, wb = d["hidden"].bfloat16(), d["weight"].bfloat16()
    d["hidden"], d["weight"] = hb.double(), wb.double()
    opts = dict(loss_type="dapo")
    kw = kwargs_for(d)
    rloss, _, rgrads = reference(d, opts, kw)
    h = hb.to(DEVICE).requires_grad_(True)
    w = wb.to(DEVICE).requires_grad_(True)
    with dispatch.use_backend(backend):
        out = GRPOLoss(**opts)(h, w, d["labels"].to(DEVICE), d["mask"].to(DEVICE),
                               d["adv"].float().to(DEVICE), **to_dev(kw))
    out.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert out.loss.item() == pytest.approx(rloss, rel=1e-4, abs=1e-5)
    for ours, ref in zip((h.grad, w.grad), rgrads):
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())
    # bf16 logits of the same inputs
    with torch.no_grad():
        logits = (d["hidden"] @ d["weight"].T).bfloat16()
    x = logits.to(DEVICE).requires_grad_(True)
    with dispatch.use_backend(backend):
        out = GRPOLoss(**opts).from_logits(x, d["labels"].to(DEVICE), d["mask"].to(DEVICE),
                                           d["adv"].float().to(DEVICE), **to_dev(kw))
    out.loss.backward()
    lr = logits.detach().double().requires_grad_(True)
    lp = r1kernels.reference.token_logprobs_ref(lr, d["labels"])
    rl = grpo_loss_ref(lp, d["adv"], d["mask"], **opts, **kw)[0]
    rl.backward()
    assert x.grad.dtype == torch.bfloat16
    assert out.loss.item() == pytest.approx(rl.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), lr.grad, rtol=2 ** -7, atol=2 ** -7 * lr.grad.abs().max().item())


def test_only_weight_grad_and_no_grad():
    d = make(2, 4, 8, 16, bias=False)
    fn = GRPOLoss()
    h = d["hidden"].float()
    w = d["weight"].float().requires_grad_(True)
    out = fn(h, w, d["labels"], d["mask"], d["adv"].float(), old_logps=d["old"].float())
    out.loss.backward()
    rloss, _, rgrads = reference(d, dict(loss_type="dapo"), kwargs_for(d))
    torch.testing.assert_close(w.grad.double(), rgrads[1], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        out = fn(h, w, d["labels"], d["mask"], d["adv"].float(), old_logps=d["old"].float())
    assert out.loss.item() == pytest.approx(rloss, rel=1e-5)


def test_second_backward_is_refused():
    d = make(2, 4, 8, 16)
    h = d["hidden"].float().requires_grad_(True)
    out = GRPOLoss()(h, d["weight"].float(), d["labels"], d["mask"], d["adv"].float())
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level,opts,kwsel", [
    CASES[1], CASES[7], CASES[0], CASES[2], CASES[5], CASES[6]],
    ids=["grpo-sequence", "sapo-sequence", "dapo-token", "bnpo-token", "cispo-token", "sapo-token"])
def test_single_sweep_chunks(backend, loss_type, level, opts, kwsel, monkeypatch):
    """Chunk budget shrunk to 7 rows of logits (sequences of T=3); only the live rows (in the
    mask, label not ignored) are swept. With sequence-level importance sampling (GSPO) a token's
    derivative needs its whole sequence, so each chunk holds the live rows of whole sequences,
    as many as fit 7 rows; token-level losses take any run of rows, so their chunks (7 rows)
    cross sequence boundaries. Loss, metrics and gradients match the float64 reference and the
    two-sweep mode either way, and the chunking is what ran."""
    B, T, H, V = 5, 3, 12, 50
    monkeypatch.setattr(ltp_mod, "TILE_ELEMS_CPU", 7 * V)
    monkeypatch.setattr(ltp_mod, "TILE_ELEMS_CUDA", 7 * V)
    calls = []
    real = ltp_mod.single_sweep

    def spy(*args, **kw):
        inner = args[8]
        args = list(args)
        args[8] = lambda s, e, lp, en: calls.append((s, e)) or inner(s, e, lp, en)
        return real(*args, **kw)

    monkeypatch.setattr(ltp_mod, "single_sweep", spy)
    d = make(B, T, H, V, seed=4)
    d["labels"][1, 2] = -100
    counts = (d["mask"] & (d["labels"] != -100)).sum(1).tolist()  # live rows per sequence
    n_live = sum(counts)
    assert 7 < n_live < B * T
    seq_ends = set(torch.tensor(counts).cumsum(0).tolist())
    kw = kwargs_for(d, **kwsel)
    opts = dict(loss_type=loss_type, importance_sampling_level=level, **opts)
    rloss, rmetrics, rgrads = reference(d, opts, kw, temperature=0.9)
    grads = {}
    for sweep in ("one", "two"):
        calls.clear()
        h = d["hidden"].float().to(DEVICE).requires_grad_(True)
        w = d["weight"].float().to(DEVICE).requires_grad_(True)
        b = d["bias"].float().to(DEVICE).requires_grad_(True)
        with dispatch.use_backend(backend):
            out = GRPOLoss(**opts, temperature=0.9, ignore_index=-100, sweep=sweep)(
                h, w, d["labels"].to(DEVICE), d["mask"].to(DEVICE), d["adv"].float().to(DEVICE),
                bias=b, **to_dev(kw))
        out.loss.backward()
        if sweep == "two":
            assert calls == []
        elif level == "token":  # runs of 7 live rows
            assert calls == [(r, min(r + 7, n_live)) for r in range(0, n_live, 7)]
        else:  # whole sequences, as many as fit 7 rows (a longer one alone), in order
            assert [c[0] for c in calls] == [0] + [c[1] for c in calls[:-1]]
            assert calls[-1][1] == n_live and all(e in seq_ends for _, e in calls)
            assert all(e - s <= 7 or e - s <= max(counts) for s, e in calls)
            assert len(calls) > 1
        assert out.loss.item() == pytest.approx(rloss, rel=1e-5, abs=1e-6)
        for k, v in rmetrics.items():
            assert out.metrics[k].item() == pytest.approx(v, rel=1e-4, abs=1e-6), k
        for ours, ref in zip((h.grad, w.grad, b.grad), rgrads):
            torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-4, atol=1e-6)
        grads[sweep] = (h.grad, w.grad, b.grad)
    for a, c in zip(grads["one"], grads["two"]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICE != "cuda", reason="the design target is for a CUDA GPU")
@pytest.mark.parametrize("sweep", ["one", "two"])
def test_cuda_memory_target_fused_loss(sweep):
    """Issue 4's target shape (N = 16384 = 16 x 1024, H=4096, V=151936, bf16): GRPOLoss forward +
    backward within 2.5 GiB of extra memory, the gradients included."""
    B, T, H, V = 16, 1024, 4096, 151936
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free GPU memory")
    h = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(V, H, device="cuda") / H ** 0.5).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), device="cuda")
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    adv = torch.randn(B, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    GRPOLoss(sweep=sweep)(h, w, labels, mask, adv).loss.backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert peak <= 2.5, f"peak extra memory {peak:.2f} GiB"


def test_fused_memory_does_not_hold_logits(monkeypatch):
    """The hidden-state path holds no [N, V] buffer: peak extra memory stays well below the fp32
    logits (N * V * 4 bytes) and the materializing composition's peak."""
    monkeypatch.setattr(ltp_mod, "TILE_ELEMS_CPU", 1 << 16)
    B, T, H, V = 16, 64, 32, 4096
    d = make(B, T, H, V, bias=False)
    h = d["hidden"].float().requires_grad_(True)
    w = d["weight"].float().requires_grad_(True)
    args = (d["labels"], d["mask"], d["adv"].float())
    with dispatch.use_backend("torch"):
        peak, _ = peak_extra_bytes(lambda: GRPOLoss()(h, w, *args, old_logps=d["old"].float()).loss.backward())
    logits_bytes = B * T * V * 4
    grads_bytes = (B * T * H + V * H) * 4
    assert peak <= grads_bytes + 8 * (1 << 16) * 4 + 64 * B * T, (peak, logits_bytes)
    assert peak < logits_bytes / 4


def test_token_level_memory_does_not_grow_with_sequence_length(monkeypatch):
    """Token-level losses are chunked by rows, not by sequences: for the same N = B * T tokens,
    sequences 16 times longer use no more memory (a chunk of whole sequences would hold at
    least T * V * 4 bytes of fp32 logits, which grows with T)."""
    monkeypatch.setattr(ltp_mod, "TILE_ELEMS_CPU", 32 * 2048)  # 32 rows of logits per chunk
    monkeypatch.setattr(ltp_mod, "SINGLE_SWEEP_MAX_CHUNK_ELEMS_CPU", 1 << 30)  # one sweep
    N, H, V = 512, 16, 2048
    peaks = {}
    for T in (16, 256):
        d = make(N // T, T, H, V, bias=False, seed=T)
        h = d["hidden"].float().requires_grad_(True)
        w = d["weight"].float().requires_grad_(True)
        args = (d["labels"], d["mask"], d["adv"].float())
        with dispatch.use_backend("torch"):
            peaks[T], _ = peak_extra_bytes(
                lambda: GRPOLoss()(h, w, *args, old_logps=d["old"].float()).loss.backward())
    chunk_bytes = 32 * V * 4
    assert peaks[256] <= peaks[16] + chunk_bytes // 4, peaks
    assert peaks[256] < (N * H + V * H) * 4 + 256 * V * 4, peaks  # no sequence-sized chunk


@pytest.mark.parametrize("level,sweep_ran", [("token", "one"), ("sequence", "two")])
def test_auto_sweep_long_sequences(monkeypatch, level, sweep_ran):
    """sweep="auto" with sequences longer than the single-sweep chunk limit: token-level losses
    still run one sweep (chunks of rows), sequence-level ones need whole sequences per chunk
    and fall back to two sweeps. Both match the float64 reference."""
    B, T, H, V = 2, 9, 8, 40
    monkeypatch.setattr(ltp_mod, "TILE_ELEMS_CPU", 4 * V)
    monkeypatch.setattr(ltp_mod, "TILE_ELEMS_CUDA", 4 * V)
    monkeypatch.setattr(ltp_mod, "SINGLE_SWEEP_MAX_CHUNK_ELEMS_CPU", 5 * V)  # < T * V
    monkeypatch.setattr(ltp_mod, "SINGLE_SWEEP_MAX_CHUNK_ELEMS_CUDA", 5 * V)
    ran = []
    for name in ("single_sweep", "forward_stats"):
        real = getattr(ltp_mod, name)
        monkeypatch.setattr(ltp_mod, name, (lambda f, n: lambda *a, **k: ran.append(n) or f(*a, **k))(
            real, "one" if name == "single_sweep" else "two"))
    d = make(B, T, H, V, seed=5)
    opts = dict(loss_type="grpo", importance_sampling_level=level, beta=0.04)
    kw = kwargs_for(d, beta=True)
    rloss, rmetrics, rgrads = reference(d, opts, kw)
    h = d["hidden"].float().to(DEVICE).requires_grad_(True)
    w = d["weight"].float().to(DEVICE).requires_grad_(True)
    b = d["bias"].float().to(DEVICE).requires_grad_(True)
    out = GRPOLoss(**opts)(h, w, d["labels"].to(DEVICE), d["mask"].to(DEVICE),
                           d["adv"].float().to(DEVICE), bias=b, **to_dev(kw))
    out.loss.backward()
    assert ran == [sweep_ran]
    assert out.loss.item() == pytest.approx(rloss, rel=1e-5, abs=1e-6)
    assert out.metrics["entropy"].item() == pytest.approx(rmetrics["entropy"], rel=1e-5)
    for ours, ref in zip((h.grad, w.grad, b.grad), rgrads):
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(hidden=torch.zeros(2, 3)), "GRPOLoss"),
    (dict(weight=torch.zeros(5, 7)), "weight"),
    (dict(bias=torch.zeros(6)), "bias"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels"),
    (dict(labels=torch.zeros(2, 3)), "labels"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    (dict(advantages=torch.zeros(3)), "advantages"),
    (dict(old_logps=torch.zeros(3, 3)), "old_logps"),
])
def test_bad_input(bad, match):
    args = dict(hidden=torch.zeros(2, 3, 8), weight=torch.zeros(5, 8),
                labels=torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 3, dtype=torch.bool),
                advantages=torch.zeros(2))
    kw = {k: bad.pop(k) for k in list(bad) if k in ("bias", "old_logps")}
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        GRPOLoss()(args["hidden"], args["weight"], args["labels"], args["mask"], args["advantages"], **kw)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_labels_out_of_range(level):
    """A label outside [0, V) is an IndexError naming labels, also inside masked positions
    (which skip the lm_head), and at every importance-sampling level."""
    h, w = torch.zeros(2, 3, 8, device=DEVICE), torch.zeros(5, 8, device=DEVICE)
    mask = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    mask[1, 2] = False
    for bad in (5, -3):
        labels = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
        labels[1, 2] = bad
        with pytest.raises(IndexError, match="labels"):
            GRPOLoss(importance_sampling_level=level)(h, w, labels, mask, torch.zeros(2, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_from_logits_scaled_loss(backend, inplace):
    """GRPOLoss.from_logits under a loss scaled after the call (an upstream gradient other than
    1: the saved logits gradient is scaled in backward) equals 2.5 times the plain call's
    gradient, and the metrics alone carry no gradient (they are detached)."""
    gen = torch.Generator().manual_seed(8)
    B, T, V = 3, 7, 40
    x0 = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.8
    adv = torch.randn(B, generator=gen)
    old = torch.randn(B, T, generator=gen) * 0.1 - 3.5
    fn = GRPOLoss(loss_type="dapo", epsilon_high=0.28)
    grads = []
    for scale in (1.0, 2.5):
        x = x0.float().to(DEVICE).requires_grad_(True)
        with dispatch.use_backend(backend):
            out = fn.from_logits(x, labels.to(DEVICE), mask.to(DEVICE), adv.to(DEVICE),
                                 old_logps=old.to(DEVICE), inplace=inplace)
        assert not any(m.requires_grad for m in out.metrics.values())
        (out.loss * scale).backward()
        grads.append(x.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0] * 2.5, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_from_logits_labels_out_of_range(backend, inplace):
    """GRPOLoss.from_logits: a label outside [0, V) is an IndexError naming labels, also at a
    masked position, on every backend; the fused kernel (checked after its launch) reads no
    logit at such a label, so nothing else fails first."""
    x0 = torch.randn(2, 4, 6, device=DEVICE)
    mask = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    mask[1, 3] = False
    for bad in (6, -3):
        labels = torch.zeros(2, 4, dtype=torch.long, device=DEVICE)
        labels[1, 3] = bad
        x = x0.clone().requires_grad_(True)
        with dispatch.use_backend(backend), pytest.raises(IndexError, match="labels"):
            GRPOLoss().from_logits(x, labels, mask, torch.randn(2, device=DEVICE),
                                   inplace=inplace)


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="ppo"), "loss_type"), (dict(epsilon_low=-1.0), "epsilon_low"),
    (dict(temperature=0.0), "temperature"), (dict(importance_sampling_level="x"), "importance"),
    (dict(sweep="both"), "sweep"),
])
def test_bad_constructor(kw, match):
    with pytest.raises(ValueError, match=match):
        GRPOLoss(**kw)


def test_beta_needs_ref():
    d = make(2, 3, 8, 5)
    with pytest.raises(ValueError, match="ref_logps"):
        GRPOLoss(beta=0.1)(d["hidden"].float(), d["weight"].float(), d["labels"], d["mask"], d["adv"].float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_from_logits_sliced_like_liger(backend, inplace):
    """logits[:, :-1] of a [B, T + 1, V] buffer (the layout causal LMs return): not viewable as
    [B*T, V]; handled per sequence, in place into the caller's buffer when asked."""
    d = make(3, 5, 8, 30, seed=4)
    with torch.no_grad():
        full = d["hidden"] @ d["weight"].T + d["bias"]
        full = torch.cat([full, full[:, :1]], 1).float().to(DEVICE)  # [B, T + 1, V]
    x = full[:, :-1].requires_grad_(True)  # a leaf view
    opts = dict(loss_type="grpo", beta=0.04)
    kw = kwargs_for(d, beta=True)
    with dispatch.use_backend(backend):
        out = GRPOLoss(**opts).from_logits(x, d["labels"].to(DEVICE), d["mask"].to(DEVICE),
                                           d["adv"].float().to(DEVICE), inplace=inplace, **to_dev(kw))
    out.loss.backward()
    rloss, _, _ = reference(d, opts, kw)
    lr = (d["hidden"] @ d["weight"].T + d["bias"]).clone().requires_grad_(True)
    lp = r1kernels.reference.token_logprobs_ref(lr, d["labels"])
    grpo_loss_ref(lp, d["adv"], d["mask"], **opts, **kw)[0].backward()
    assert out.loss.item() == pytest.approx(rloss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(x.grad.double().cpu(), lr.grad, rtol=1e-4, atol=1e-7)
    if inplace:  # written into the caller's buffer (autograd then copies it into the leaf's .grad,
        # since a gradient with gaps between rows does not meet the leaf gradient layout contract)
        torch.testing.assert_close(full[:, :-1], x.grad)


def _use_fused_config(monkeypatch, config):
    """Run the fused logits kernel in launch configuration `config` (skip without Triton)."""
    if "triton" not in dispatch.available_backends("grpo_loss", DEVICE):
        pytest.skip("Triton backend not available here")
    from r1kernels.ops import token_logprobs as tlp_mod

    monkeypatch.setattr(tlp_mod, "FUSED_CONFIG", config)
    monkeypatch.setattr(tlp_mod, "FUSED_CONFIG_GRPO", config)
    monkeypatch.delenv("R1K_FUSED_LOGITS", raising=False)


@pytest.mark.parametrize("config", [(2, 16, 4096, 1), (1, 8, 256, 0), (0, 8, 1024, 1),
                                    (0, 16, 4096, 0, 1, 64)],
                         ids=["persistent-lanes", "persistent-block-stats", "two-launches",
                              "two-launches-1-warp-stats"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_from_logits_fused_kernel_configs(monkeypatch, config, loss_type, inplace):
    """GRPOLoss.from_logits on the Triton backend (one fused kernel computes the loss's dL/dlogp
    per row) in each launch configuration equals the torch backend, on a sliced [B, T+1, V], also
    with the gradient written over the logits."""
    _use_fused_config(monkeypatch, config)
    d = make(3, 6, 8, 300, seed=7)
    d["mask"][2] = False
    with torch.no_grad():
        full = d["hidden"] @ d["weight"].T + d["bias"]
        full = torch.cat([full, full[:, :1]], 1).float().to(DEVICE) * 3
    opts = dict(loss_type=loss_type, beta=0.04, temperature=0.9,
                epsilon_high=1.2 if loss_type == "cispo" else 0.28)
    kw = kwargs_for(d, beta=True, rw=True)
    res = []
    for be in ("triton", "torch"):
        x = full.clone()[:, :-1].requires_grad_(True)
        with dispatch.use_backend(be):
            out = GRPOLoss(**opts).from_logits(x, d["labels"].to(DEVICE), d["mask"].to(DEVICE),
                                               d["adv"].float().to(DEVICE), inplace=inplace,
                                               **to_dev(kw))
        out.loss.backward()
        res.append((out.loss.item(), {k: v.item() for k, v in out.metrics.items()}, x.grad))
    assert res[0][0] == pytest.approx(res[1][0], rel=1e-5, abs=1e-7)
    for k, v in res[1][1].items():
        assert res[0][1][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("config", [(0, 8, 1024, 1), (2, 16, 4096, 1)],
                         ids=["two-launches", "persistent"])
def test_from_logits_masked_rows_not_read(monkeypatch, config):
    """Tokens outside the loss mask contribute nothing, so the fused kernels neither read their
    logits nor let them reach the result: NaN logits there give the same loss and metrics as
    zeros would, and an exactly zero gradient row (padding is often a large part of a batch)."""
    _use_fused_config(monkeypatch, config)
    d = make(3, 6, 8, 300, seed=9)
    d["mask"][0, 4:] = False
    d["mask"][2] = False
    with torch.no_grad():
        logits = (d["hidden"] @ d["weight"].T + d["bias"]).float() * 2
    poisoned = logits.clone()
    poisoned[~d["mask"]] = float("nan")
    opts = dict(loss_type="grpo", beta=0.04, epsilon_high=0.28)
    kw = to_dev(kwargs_for(d, beta=True))
    res = []
    for x0 in (poisoned, torch.where(d["mask"].unsqueeze(-1), logits, 0.0)):
        x = x0.clone().to(DEVICE).requires_grad_(True)
        with dispatch.use_backend("triton"):
            out = GRPOLoss(**opts).from_logits(x, d["labels"].to(DEVICE), d["mask"].to(DEVICE),
                                               d["adv"].float().to(DEVICE), **kw)
        out.loss.backward()
        res.append((out.loss.item(), {k: v.item() for k, v in out.metrics.items()}, x.grad.cpu()))
    assert res[0][0] == res[1][0] and res[0][1] == res[1][1]
    assert torch.equal(res[0][2], res[1][2])
    assert (res[0][2][~d["mask"]] == 0).all() and res[0][2].isfinite().all()
    rloss, rmetrics, _ = reference(d, dict(opts), kwargs_for(d, beta=True), temperature=0.5)
    assert res[0][0] == pytest.approx(rloss, rel=1e-5, abs=1e-6)  # logits = 2 * (h W^T + b)
    for k, v in rmetrics.items():
        assert res[0][1][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 2.5, 0.3, -1.0])
def test_scale_by_grad_output(dtype, scale):
    """The backward's in-place scaling by grad_output (nn._scale_by_, a Triton kernel on CUDA and
    under the interpreter): t.mul_(s.to(t.dtype)), s == 1 leaving t untouched, on a strided
    view (logits[:, :-1] of [B, T + 1, V]: the extra rows untouched), odd widths, 1-D and 2-D
    tensors. Bit for bit, except bf16 under the Triton interpreter, whose fp32 -> bf16
    conversion truncates where the GPU rounds to nearest: there within two bf16 truncations (of
    the scale and of the product, up to one bf16 unit, 2^-7 relative, each)."""
    from r1kernels.nn import _scale_by_

    gen = torch.Generator().manual_seed(4)
    s = torch.tensor(scale, device=DEVICE)
    full = torch.randn(3, 6, 4100, generator=gen).to(dtype).to(DEVICE)
    ts = [full[:, :-1], torch.randn(5, 7, generator=gen).to(dtype).to(DEVICE),
          torch.randn(33, generator=gen).to(dtype).to(DEVICE)]
    for t in ts:
        before = full.clone() if t.data_ptr() == full.data_ptr() else None
        want = t.clone().mul_(s.to(dtype))
        out = _scale_by_(t, s)
        assert out.data_ptr() == t.data_ptr()
        if dtype == torch.bfloat16 and not t.is_cuda and scale != 1.0:
            torch.testing.assert_close(t.float(), want.float(), rtol=2 ** -6, atol=0)
        else:
            assert torch.equal(t, want)
        if before is not None:
            assert torch.equal(full[:, -1], before[:, -1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_per_sequence_metrics(backend, level, loss_type):
    """per_sequence_metrics=True: each sequence's clipped fraction of its masked tokens (the
    sequence's flag at sequence level, 0 for an empty sequence), from float64 log-probs; the
    scalars are their token-weighted means. Fused and from_logits."""
    d = make(5, 6, 16, 37, seed=4)
    d["mask"][2] = False  # an empty sequence
    d["adv"] = torch.tensor([1.0, -0.5, 0.7, 0.9, -1.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    d["old"] = d["old"] + torch.randn(5, 6, dtype=torch.float64, generator=g) * 0.6
    eps_lo, eps_hi = 0.2, (0.28 if loss_type == "dapo" else 1.02)
    m = d["mask"].double()
    lr = linear_token_logprobs_ref(d["hidden"], d["weight"], d["labels"], bias=d["bias"]) - d["old"]
    if level == "sequence":
        lr = ((lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand(5, 6)
    c1, A = lr.exp(), d["adv"].unsqueeze(1)
    high = (c1 > (eps_hi if loss_type == "cispo" else 1 + eps_hi)) & (A > 0)
    low = (c1 < 1 - eps_lo) & (A < 0) if loss_type == "dapo" else torch.zeros_like(high)
    n = m.sum(-1)
    want = [(f.double() * m).sum(-1) / n.clamp(min=1) for f in (low, high, low | high)]
    assert want[2].max() > 0 and want[2][2] == 0
    fn = GRPOLoss(loss_type=loss_type, epsilon_low=eps_lo, epsilon_high=eps_hi,
                  importance_sampling_level=level, per_sequence_metrics=True)
    f = lambda t: None if t is None else t.float().to(DEVICE)  # noqa: E731
    args = (d["labels"].to(DEVICE), d["mask"].to(DEVICE), f(d["adv"]))
    with dispatch.use_backend(backend):
        outs = [fn(f(d["hidden"]).requires_grad_(True), f(d["weight"]), *args, bias=f(d["bias"]),
                   old_logps=f(d["old"])),
                fn.from_logits(f(d["hidden"] @ d["weight"].T + d["bias"]).requires_grad_(True),
                               *args, old_logps=f(d["old"]))]
        plain = GRPOLoss(loss_type=loss_type, importance_sampling_level=level)(
            f(d["hidden"]), f(d["weight"]), *args, old_logps=f(d["old"]))
    for out in outs:
        for name, w in zip(("clip_ratio_low", "clip_ratio_high", "clip_ratio"), want):
            got = out.metrics[name + "_per_sequence"].double().cpu()
            torch.testing.assert_close(got, w, rtol=0, atol=1e-6, msg=name)
            torch.testing.assert_close(out.metrics[name].double().cpu(),
                                       (got * n).sum() / n.sum(), rtol=1e-6, atol=1e-7)
    assert not any(k.endswith("_per_sequence") for k in plain.metrics)  # off by default
