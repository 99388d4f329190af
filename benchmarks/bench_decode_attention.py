"""decode_attention: ours (every backend available here) against what a decode step runs
without it: transformers' `sdpa` attention (the keys and values repeated for every query head,
`repeat_kv`, then SDPA with the mask over the whole cache) and torch's SDPA with `enable_gqa`.
The shapes are mid-rollout: each row's kv_len is a random fill of the cache and a quarter of the
rows are finished (kv_len 0), which ours skips and the SDPA calls cannot.

Bytes: the keys and values of the live slots, read once (sum of kv_len * Hkv * D * 2 * itemsize);
%copy is against that, for every provider (the baselines also read the dead slots).
"""
import pytest
import torch

from r1kernels import decode_attention, dispatch
from shapes import DEVICE, shape_id, shapes_for

OP = "decode_attention"
SHAPES = shapes_for(OP, DEVICE)
OURS = dispatch.available_backends(OP, DEVICE)
PROVIDERS = [f"r1k-{b}" for b in OURS] + ["hf-sdpa-repeat_kv", "sdpa-enable_gqa"]


def inputs(shape):
    B, Hq, Hkv, L, D = shape["B"], shape["Hq"], shape["Hkv"], shape["L"], shape["D"]
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(DEVICE, dtype)
    kv_len = torch.randint(L // 4, L + 1, (B,), generator=g)
    kv_len[torch.rand(B, generator=g) < 0.25] = 0
    live = torch.arange(L) < kv_len[:, None]
    mask = torch.zeros(B, L).masked_fill(~live, torch.finfo(torch.float32).min)
    return q, k, v, kv_len.to(DEVICE), mask.to(DEVICE, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_decode_attention(benchmark, bench, provider, shape):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, kv_len, mask = inputs(shape)
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    if provider.startswith("r1k-"):
        backend = provider[4:]

        def fn():
            with dispatch.use_backend(backend):
                return decode_attention(q, k, v, kv_len, mask=mask)
    elif provider == "hf-sdpa-repeat_kv":
        module = torch.nn.Module()
        module.num_key_value_groups, module.is_causal = Hq // Hkv, True
        q4, m4 = q[:, :, None], mask[:, None, None, :]
        fn = lambda: sdpa_attention_forward(module, q4, k, v, m4)[0]  # noqa: E731
    else:
        q4, m4 = q[:, :, None], mask[:, None, None, :]
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q4, k, v, attn_mask=m4, enable_gqa=True)
    live_bytes = int(kv_len.sum()) * Hkv * D * 2 * k.element_size()
    bench(benchmark, fn, op=OP, shape=shape, provider=provider, bytes=live_bytes,
          baseline="hf-sdpa-repeat_kv")
