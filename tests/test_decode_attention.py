"""decode_attention against the float64 reference (r1kernels/reference.py) on every backend:
grouped-query and plain heads, odd sizes, the head sizes the C++ kernel specializes, masks,
rows with no slot or every slot masked, kv_len 0 / 1 / L, kv_start (left padding), caches of
several 16-slot blocks with a partial last one, 16-bit inputs, bad input, compile."""
import pytest
import torch

from r1kernels import decode_attention, dispatch
from r1kernels.reference import decode_attention_ref
from conftest import DEVICE, backends_for

OP = "decode_attention"
BACKENDS = backends_for(OP)
NEG = torch.finfo(torch.float32).min


def make(B, Hq, Hkv, L, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    kv_len = torch.randint(0, L + 1, (B,), generator=g)
    return q, k, v, kv_len


def run(backend, q, k, v, kv_len, mask=None, scale=None, dtype=torch.float32, kv_start=None):
    with dispatch.use_backend(backend):
        return decode_attention(q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype),
                                kv_len.to(DEVICE), scale=scale,
                                mask=None if mask is None else mask.to(DEVICE, torch.float32),
                                kv_start=None if kv_start is None else kv_start.to(DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,Hq,Hkv,L,D", [
    (5, 4, 2, 19, 32),    # grouped-query 2:1, a specialized head size
    (3, 14, 2, 40, 64),   # 7:1, as Qwen2.5-0.5B
    (2, 3, 3, 17, 128),   # plain multi-head
    (4, 6, 1, 9, 13),     # one key/value head, an odd head size (the generic loop)
    (1, 2, 2, 1, 8),      # one slot
])
def test_matches_float64(backend, B, Hq, Hkv, L, D):
    q, k, v, kv_len = make(B, Hq, Hkv, L, D)
    kv_len[0] = L  # the whole cache in one row
    mask = torch.zeros(B, L, dtype=torch.float64)
    mask[:, : L // 3] = NEG                         # left padding, as a rollout's prompts have
    mask[-1, 0] = float("-inf")
    got = run(backend, q, k, v, kv_len, mask)
    want = decode_attention_ref(q, k, v, kv_len, mask)
    assert got.shape == (B, Hq, D) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=2e-6)
    # without a mask, and with a scale of our own
    got = run(backend, q, k, v, kv_len, scale=0.3)
    torch.testing.assert_close(got.cpu().double(), decode_attention_ref(q, k, v, kv_len, scale=0.3),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [32, 64, 128, 48])
def test_long_cache_and_kv_start(backend, D):
    """Caches of several 16-slot blocks (the C++ kernel's fp32 scores are computed 16 slots at
    a time, the last block partial) and a first slot per row (kv_start, left padding): rows
    from empty to the whole cache, kv_start past kv_len (no slot: zeros)."""
    B, L = 9, 83
    q, k, v, _ = make(B, 6, 2, L, D, seed=D)
    kv_len = torch.tensor([83, 80, 64, 47, 33, 17, 16, 1, 5])
    kv_start = torch.tensor([0, 11, 13, 0, 32, 1, 15, 0, 6])
    mask = torch.zeros(B, L, dtype=torch.float64)
    mask[:, ::7] = NEG
    mask[3, 40] = float("-inf")
    for args in ((mask, None), (mask, kv_start), (None, kv_start)):
        got = run(backend, q, k, v, kv_len, args[0], kv_start=args[1])
        want = decode_attention_ref(q, k, v, kv_len, args[0], kv_start=args[1])
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=2e-6)
    assert torch.equal(got[-1].cpu(), torch.zeros(6, D))  # kv_start 6 > kv_len 5
    # kv_start is the same as masking the slots before it
    before = torch.arange(L)[None, :] < kv_start[:, None]
    torch.testing.assert_close(
        got.cpu().double()[:-1], decode_attention_ref(q, k, v, kv_len, torch.where(
            before, float("-inf"), 0.0).double())[:-1], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slots_before_kv_start_change_nothing(backend):
    q, k, v, _ = make(3, 4, 2, 40, 32)
    kv_len, kv_start = torch.tensor([40, 30, 20]), torch.tensor([7, 20, 3])
    want = run(backend, q, k, v, kv_len, kv_start=kv_start)
    junk = float("nan") if backend == "cpp" else 3e4
    for b, s0 in enumerate(kv_start.tolist()):
        k[b, :, :s0] = junk
        v[b, :, :s0] = -junk
    got = run(backend, q, k, v, kv_len, kv_start=kv_start)
    assert torch.equal(got.cpu(), want.cpu()) and torch.isfinite(got).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_exact(backend):
    q, k, v, kv_len = make(3, 4, 2, 11, 32)
    with dispatch.use_backend(backend):
        got = decode_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kv_len.to(DEVICE))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), decode_attention_ref(q, k, v, kv_len), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slots_past_kv_len_change_nothing(backend):
    """Whatever the slots past kv_len (and their mask) hold changes nothing: the C++ kernel never
    reads them (NaN there), the torch path masks them (finite garbage there, as in a cache)."""
    q, k, v, kv_len = make(4, 4, 2, 12, 32)
    kv_len = torch.tensor([12, 5, 1, 7])
    mask = torch.zeros(4, 12, dtype=torch.float64)
    want = run(backend, q, k, v, kv_len, mask)
    junk = float("nan") if backend == "cpp" else 3e4
    for b, n in enumerate(kv_len.tolist()):
        k[b, :, n:] = junk
        v[b, :, n:] = -junk
        mask[b, n:] = float("nan") if backend == "cpp" else 1e4
    got = run(backend, q, k, v, kv_len, mask)
    assert torch.equal(got.cpu(), want.cpu())
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_fully_masked_rows_are_zero(backend):
    q, k, v, _ = make(4, 4, 2, 6, 32)
    kv_len = torch.tensor([0, 6, 3, 6])
    mask = torch.zeros(4, 6, dtype=torch.float64)
    mask[1] = float("-inf")              # every slot masked
    mask[2, :3] = float("-inf")          # every live slot masked (the rest are past kv_len)
    mask[3, :5] = float("-inf")          # one slot left: its value, exactly
    got = run(backend, q, k, v, kv_len, mask).cpu()
    assert torch.equal(got[:3], torch.zeros(3, 4, 32))
    torch.testing.assert_close(got[3].double(), v[3, torch.tensor([0, 0, 1, 1]), 5], rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    q, k, v, kv_len = make(0, 4, 2, 5, 32)
    assert run(backend, q, k, v, kv_len).shape == (0, 4, 32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    """16-bit inputs, fp32 accumulation: within a few units of the output dtype's rounding of the
    float64 result computed from the same (rounded) inputs."""
    q, k, v, kv_len = make(6, 8, 2, 33, 64)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    got = run(backend, q, k, v, kv_len, dtype=dtype)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.cpu().double(), decode_attention_ref(q, k, v, kv_len),
                               rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_transformers_sdpa_with_repeat_kv(backend):
    """What transformers' own sdpa attention computes from the same cache (repeat_kv, mask)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, Hkv, L, D = 3, 6, 2, 10, 32
    q, k, v, _ = make(B, Hq, Hkv, L, D)
    q, k, v = q.float(), k.float(), v.float()
    mask = torch.zeros(B, L)
    mask[0, :4] = NEG
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = Hq // Hkv, True
    want, _ = sdpa_attention_forward(module, q[:, :, None], k, v, mask[:, None, None, :],
                                     scaling=D ** -0.5)
    got = run(backend, q, k, v, torch.full((B,), L), mask)
    torch.testing.assert_close(got.cpu(), want[:, 0], rtol=1e-5, atol=1e-6)


def test_bad_input():
    q, k, v, kv_len = make(2, 4, 2, 5, 8)
    q, k, v = q.float(), k.float(), v.float()
    with pytest.raises(ValueError, match="q must be"):
        decode_attention(q[:, :, :, None], k, v, kv_len)
    with pytest.raises(ValueError, match="k and v"):
        decode_attention(q, k[:, :, :, :4], v, kv_len)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :3], k, v, kv_len)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q, k.double(), v, kv_len)
    with pytest.raises(ValueError, match="kv_len"):
        decode_attention(q, k, v, kv_len.int())
    with pytest.raises(ValueError, match="mask"):
        decode_attention(q, k, v, kv_len, mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="kv_start"):
        decode_attention(q, k, v, kv_len, kv_start=kv_len.int())
    with pytest.raises(ValueError, match="kv_start"):
        decode_attention(q, k, v, kv_len, kv_start=kv_len[:1])
    with pytest.raises(ValueError, match="inference only"):
        decode_attention(q.requires_grad_(), k, v, kv_len)
    with torch.no_grad():
        decode_attention(q, k, v, kv_len)
    q.requires_grad_(False)
    for backend in dispatch.available_backends(OP, "cpu"):
        with dispatch.use_backend(backend), pytest.raises(IndexError, match=r"kv_len\[1\]"):
            decode_attention(q, k, v, torch.tensor([5, 6]))
        with dispatch.use_backend(backend), pytest.raises(IndexError, match=r"kv_len\[0\]"):
            decode_attention(q, k, v, torch.tensor([-1, 0]))
        with dispatch.use_backend(backend), pytest.raises(IndexError, match=r"kv_start\[1\]"):
            decode_attention(q, k, v, torch.tensor([5, 5]), kv_start=torch.tensor([0, 6]))


def test_opcheck_and_compile():
    # the README's install builds the extension (test_dispatch checks that it loads)
    assert "cpp" in dispatch.available_backends(OP, "cpu"), dispatch.extension_error()
    q, k, v, kv_len = (t.float() if t.is_floating_point() else t for t in make(3, 4, 2, 7, 32))
    mask = torch.zeros(3, 7)
    torch.library.opcheck(torch.ops.r1kernels.decode_attention.default,
                          (q, k, v, kv_len, mask, 0.25))
    torch.library.opcheck(torch.ops.r1kernels.decode_attention.default,
                          (q, k, v, kv_len, mask, 0.25, kv_len // 2))

    def step(q, k, v, n):
        return decode_attention(q * 2, k, v, n + 1, mask=mask, kv_start=n // 2)

    with dispatch.use_backend("cpp"):
        got = torch.compile(step, fullgraph=True)(q, k, v, kv_len.clamp(max=6))
        want = step(q, k, v, kv_len.clamp(max=6))
    assert torch.equal(got, want)
