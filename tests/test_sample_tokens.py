import math

import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.ops.sample_tokens import sample_tokens_with_uniforms
from r1kernels.reference import sample_tokens_ref
from conftest import DEVICE, backends_for

OP = "sample_tokens"
BACKENDS = backends_for(OP)
INTERPRETED = DEVICE == "cpu"  # the Triton interpreter runs one row at a time: fewer rows there

FILTERS = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.6),
    dict(top_k=1),
    dict(top_k=4),
    dict(top_p=0.3),
    dict(top_p=0.9),
    dict(min_p=0.2),
    dict(top_k=6, top_p=0.8),
    dict(top_k=5, min_p=0.1),
    dict(top_p=0.7, min_p=0.15),
    dict(temperature=0.8, top_k=7, top_p=0.9, min_p=0.05),
]


def fid(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "plain"


def run(backend, logits, u, **kw):
    with dispatch.use_backend(backend):
        return sample_tokens_with_uniforms(logits.to(DEVICE), u.to(DEVICE), **kw)


def check_logp(logits, tok, logp, temperature=1.0):
    """Every returned log-prob against float64 log_softmax(logits / T) of the returned token."""
    z = logits.double() / (temperature or 1.0)
    ref = torch.log_softmax(z, -1).gather(-1, tok.cpu()[:, None]).squeeze(-1)
    torch.testing.assert_close(logp.cpu().double(), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_exact(backend):
    logits = torch.randn(9, 53) * 4
    logits[1, [3, 20, 40]] = 50.0   # equal maxima: the lowest id
    logits[2] = 1.0                  # all equal: token 0
    u = torch.rand(9)
    tok, logp = run(backend, logits, u, temperature=0)
    assert tok.dtype == torch.int64 and logp.dtype == torch.float32
    expect = logits.argmax(-1)
    assert expect[1] == 3 and expect[2] == 0
    assert torch.equal(tok.cpu(), expect)
    check_logp(logits, tok, logp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", FILTERS, ids=fid)
def test_matches_reference(backend, kw):
    """Same uniforms, same tokens as the float64 sort-based reference; logp against float64."""
    g = torch.Generator().manual_seed(1)
    B = 6 if backend == "triton" and INTERPRETED else 64
    logits = torch.randn(B, 37, generator=g) * 2.5
    u = torch.rand(B, generator=g)
    tok, logp = run(backend, logits, u, **kw)
    rtok, rlogp, probs = sample_tokens_ref(logits.double(), u.double(), **kw)
    assert torch.equal(tok.cpu(), rtok)
    assert (probs.gather(-1, rtok[:, None]) > 0).all()
    torch.testing.assert_close(logp.cpu().double(), rlogp, rtol=1e-5, atol=2e-5)
    check_logp(logits, tok, logp, kw.get("temperature", 1.0))


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at p = 1e-4 (z = 3.719)."""
    h = 2.0 / (9.0 * df)
    return df * (1 - h + z * math.sqrt(h)) ** 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", FILTERS[1:], ids=fid)
def test_chi_square(backend, kw):
    """Sampled frequencies against the float64 truncated distribution (fixed seeds: the outcome
    is deterministic; p = 1e-4 critical values). Tokens outside the kept set never appear."""
    if backend == "triton" and INTERPRETED:
        pytest.skip("interpreted Triton runs one row at a time: test_matches_reference shows it "
                    "draws the reference's token for every uniform")
    n = 40000
    row = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -3.0])
    logits = row.expand(n, -1)
    gen = torch.Generator(device=DEVICE).manual_seed(123)
    with dispatch.use_backend(backend):
        tok, logp = r1kernels.sample_tokens(logits.to(DEVICE), generator=gen, **kw)
    _, _, probs = sample_tokens_ref(row[None].double(), torch.zeros(1, dtype=torch.float64), **kw)
    probs = probs[0]
    counts = torch.bincount(tok.cpu(), minlength=row.numel()).double()
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    expected = probs[kept] * n
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    if df > 0:
        assert stat < chi2_critical(df), (stat, df, counts.tolist(), expected.tolist())
    else:
        assert counts[kept].item() == n
    check_logp(row[None].expand(n, -1), tok, logp, kw.get("temperature", 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_boundaries(backend):
    """Equal logits at the top-k and top-p boundaries: the lower ids are kept, exactly."""
    n = 24 if backend == "triton" and INTERPRETED else 400  # spacing 1/24 < the smallest kept mass
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    logits = torch.tensor([0.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, -2.0]).expand(n, -1)
    cases = [
        (dict(top_k=2), {1, 3}),               # three tied maxima, two kept: ids 1 and 3
        (dict(top_k=4), {1, 3, 5, 2}),         # three maxima, then the first of the tied 1.0s
        (dict(top_k=1), {1}),
    ]
    for kw, want in cases:
        tok, _ = run(backend, logits, u, **kw)
        assert set(tok.cpu().tolist()) == want, kw
    # four equal probabilities: top_p = 0.5 reaches its mass with exactly the first two ids
    flat = torch.zeros(n, 6)
    flat[:, 4:] = float("-inf")
    for top_p, want in [(0.5, {0, 1}), (0.25, {0}), (0.26, {0, 1}), (1.0, {0, 1, 2, 3})]:
        tok, _ = run(backend, flat, u, top_p=top_p)
        assert set(tok.cpu().tolist()) == want, top_p
    # top_k then top_p on ties: top_k=3 keeps ids 0-2 of the equal four, top_p=0.6 of their mass
    # needs two of them
    tok, _ = run(backend, flat, u, top_k=3, top_p=0.6)
    assert set(tok.cpu().tolist()) == {0, 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_logits(backend):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([
        [nan, 0.0, 1.0, nan, 0.5],
        [inf, 0.0, 1.0, -inf, 2.0],
        [nan, nan, nan, nan, nan],
        [-inf, -inf, -inf, -inf, -inf],
        [inf, -inf, nan, inf, -inf],
        [nan, nan, 4.0, nan, nan],
    ])
    finite = torch.isfinite(logits)
    draws = 3 if backend == "triton" and INTERPRETED else 20
    for kw in [dict(), dict(temperature=0), dict(top_k=2), dict(top_p=0.5), dict(min_p=0.3)]:
        for s in range(draws):
            u = torch.full((6,), (s + 0.5) / draws)
            tok, logp = run(backend, logits, u, **kw)
            tok, logp = tok.cpu(), logp.cpu()
            for r in (0, 1, 5):
                assert finite[r, tok[r]], (kw, r, tok[r])
                assert torch.isfinite(logp[r])
            assert tok[5] == 2 and logp[5] == 0.0
            for r in (2, 3, 4):  # no finite logit: token 0, logp NaN
                assert tok[r] == 0 and torch.isnan(logp[r])
            rtok, rlogp, _ = sample_tokens_ref(logits.double(), u.double(), **kw)
            assert torch.equal(tok, rtok)
            torch.testing.assert_close(logp.double(), rlogp, equal_nan=True, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,V", [(1, 1), (5, 1), (1, 7), (0, 9)])
def test_degenerate_shapes(backend, B, V):
    logits = torch.randn(B, V)
    u = torch.rand(B)
    for kw in [dict(), dict(temperature=0), dict(top_k=3, top_p=0.5, min_p=0.5)]:
        tok, logp = run(backend, logits, u, **kw)
        assert tok.shape == (B,) and logp.shape == (B,)
        rtok, rlogp, _ = sample_tokens_ref(logits.double(), u.double(), **kw)
        assert torch.equal(tok.cpu(), rtok)
        torch.testing.assert_close(logp.cpu().double(), rlogp, rtol=1e-5, atol=2e-5)
        if V == 1:
            assert (tok == 0).all() and (logp == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(backend, dtype):
    logits = (torch.randn(12, 40) * 3).to(dtype)
    u = torch.rand(12)
    for kw in [dict(), dict(temperature=0), dict(top_k=5, top_p=0.8), dict(min_p=0.1)]:
        tok, logp = run(backend, logits, u, **kw)
        rtok, rlogp, _ = sample_tokens_ref(logits.double(), u.double(), **kw)
        assert torch.equal(tok.cpu(), rtok)
        torch.testing.assert_close(logp.cpu().double(), rlogp, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_generator_state_same_tokens(backend):
    logits = torch.randn(4 if backend == "triton" and INTERPRETED else 64, 30).to(DEVICE)

    def draw(seed):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        with dispatch.use_backend(backend):
            return [r1kernels.sample_tokens(logits, top_p=0.9, generator=gen)[0].cpu()
                    for _ in range(2)]

    a, b, c = draw(5), draw(5), draw(6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])   # the generator advances
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
def test_real_vocabulary(backend):
    """A 151936-wide row: tokens equal the reference's for the same uniforms."""
    logits = torch.randn(3, 151936) * 3
    logits[:, 1000] = 15.0
    u = torch.tensor([0.1, 0.5, 0.97])
    for kw in [dict(), dict(top_k=50), dict(top_p=0.95), dict(top_k=20, top_p=0.9, min_p=0.01)]:
        tok, logp = run(backend, logits, u, **kw)
        rtok, rlogp, _ = sample_tokens_ref(logits.double(), u.double(), **kw)
        assert torch.equal(tok.cpu(), rtok), kw
        torch.testing.assert_close(logp.cpu().double(), rlogp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
def test_many_ties_wide_range(backend):
    """Logits on a coarse grid (hundreds of ties at every value) spanning -3e4 .. 40, so that the
    filters' boundaries fall inside runs of equal logits and the boundary search crosses zero
    and large magnitudes: the reference's tokens, every filter, 2000 uniforms."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(1, 3001, generator=g) * 3).round() / 2
    logits[0, :40] = -3e4
    logits[0, 2999:] = 40.0        # two tied maxima
    logits = logits.expand(2000, -1)
    u = (torch.arange(2000, dtype=torch.float32) + 0.5) / 2000
    for kw in [dict(), dict(top_k=3), dict(top_k=700), dict(top_p=0.9999), dict(top_p=0.55),
               dict(top_k=900, top_p=0.99999), dict(min_p=1e-6), dict(temperature=9.0, top_p=0.3),
               dict(temperature=30.0, top_k=1000, top_p=0.7, min_p=0.3)]:
        tok, logp = run(backend, logits, u, **kw)
        rtok, rlogp, probs = sample_tokens_ref(logits.double(), u.double(), **kw)
        assert torch.equal(tok.cpu(), rtok), kw
        torch.testing.assert_close(logp.cpu().double(), rlogp, rtol=1e-5, atol=1e-4)


def test_triton_many_blocks():
    """The Triton kernel's block loops over a row of several blocks and a ragged tail
    (interpreted: one row of 5003; on a GPU the real vocabulary)."""
    if "triton" not in dispatch.available_backends(OP, DEVICE):
        pytest.skip("no Triton backend here")
    logits = torch.randn(1, 5003 if INTERPRETED else 151936) * 3
    u = torch.tensor([0.37])
    kw = dict(top_k=40, top_p=0.9)
    tok, logp = run("triton", logits, u, **kw)
    rtok, rlogp, _ = sample_tokens_ref(logits.double(), u.double(), **kw)
    assert torch.equal(tok.cpu(), rtok)
    torch.testing.assert_close(logp.cpu().double(), rlogp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.01), "min_p"),
])
def test_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        r1kernels.sample_tokens(torch.randn(2, 5), **kw)


def test_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        r1kernels.sample_tokens(torch.randn(5))
    with pytest.raises(ValueError, match="logits"):
        r1kernels.sample_tokens(torch.randn(2, 0))
    with pytest.raises(ValueError, match="logits"):
        r1kernels.sample_tokens(torch.randint(0, 3, (2, 5)))
    with pytest.raises(ValueError, match="uniforms"):
        sample_tokens_with_uniforms(torch.randn(2, 5), torch.rand(3))


def test_opcheck_and_compile():
    # the README's install builds the extension (test_dispatch checks that it loads)
    assert "cpp" in dispatch.available_backends(OP, "cpu"), dispatch.extension_error()
    logits, u = torch.randn(4, 33), torch.rand(4)
    torch.library.opcheck(torch.ops.r1kernels.sample_tokens.default, (logits, u, 0.9, 5, 0.8, 0.05))

    def step(x, u):
        return sample_tokens_with_uniforms(x * 2, u, temperature=0.9, top_k=5, top_p=0.8)

    with dispatch.use_backend("cpp"):
        got = torch.compile(step, fullgraph=True)(logits, u)
        want = step(logits, u)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_params_op_reads_the_settings_at_run_time():
    """sample_tokens_params (the compiled CPU decode step's sampler) takes the settings as a
    float64 tensor: the same tokens and log-probs as sample_tokens with them as arguments, for
    every filter and greedy, from one compiled function whose settings change between calls."""
    assert "cpp" in dispatch.available_backends(OP, "cpu"), dispatch.extension_error()
    g = torch.Generator().manual_seed(5)
    logits, u = torch.randn(9, 37, generator=g) * 3, torch.rand(9, generator=g)
    op = torch.ops.r1kernels.sample_tokens_params
    params = torch.zeros(4, dtype=torch.float64)
    torch.library.opcheck(op.default, (logits, u, torch.tensor([0.9, 5.0, 0.8, 0.05],
                                                              dtype=torch.float64)))
    compiles = []

    def inductor(gm, example_inputs):
        compiles.append(1)
        return torch._inductor.compile(gm, example_inputs)

    step = torch.compile(lambda x, u, p: op(x * 2, u, p), backend=inductor, fullgraph=True,
                         dynamic=False)
    for kw in FILTERS + [dict(temperature=0.0), dict(temperature=0.0, top_k=3)]:
        s = dict(dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), **kw)
        params.copy_(torch.tensor([s["temperature"], s["top_k"], s["top_p"], s["min_p"]],
                                  dtype=torch.float64))
        want = torch.ops.r1kernels.sample_tokens(logits * 2, u, s["temperature"], s["top_k"],
                                                 s["top_p"], s["min_p"])
        for got in (op(logits * 2, u, params), step(logits, u, params)):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), fid(kw)
    assert len(compiles) == 1  # one graph for every setting


@pytest.mark.parametrize("params,name", [
    (torch.tensor([1.0, 0.0, 1.0]), "params"), (torch.tensor([1.0, 0.0, 1.0, 0.0]), "params"),
    (torch.tensor([1.0, 2.5, 1.0, 0.0], dtype=torch.float64), "top_k"),
    (torch.tensor([1.0, -1.0, 1.0, 0.0], dtype=torch.float64), "top_k"),
    (torch.tensor([-1.0, 0.0, 1.0, 0.0], dtype=torch.float64), "temperature"),
    (torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), "top_p"),
    (torch.tensor([1.0, 0.0, 1.0, 2.0], dtype=torch.float64), "min_p"),
])
def test_params_op_bad_settings(params, name):
    assert "cpp" in dispatch.available_backends(OP, "cpu"), dispatch.extension_error()
    with pytest.raises(ValueError, match=name):
        torch.ops.r1kernels.sample_tokens_params(torch.randn(2, 5), torch.rand(2), params)
