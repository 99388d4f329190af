"""sample_tokens: ours (every backend available here) against the sort-based torch sampler users
write (softmax, sort, cumsum for top-p, multinomial), and FlashInfer's sorting-free sampling when
installed. Each call draws one token per row and (ours) its log-prob.

Bytes: the logits row is read once, B * V * 2 bytes (bf16 on CUDA) or * 4 (fp32 on CPU); %copy is
against that single read, so a kernel that reads the row n times shows at most 1/n of the roofline.
"""
import importlib.util

import pytest
import torch

import r1kernels
from r1kernels import dispatch
from shapes import DEVICE, shape_id, shapes_for

OP = "sample_tokens"
SHAPES = shapes_for(OP, DEVICE)
OURS = [b for b in dispatch.available_backends(OP, DEVICE) if not (b == "triton" and DEVICE == "cpu")]
PROVIDERS = [f"r1k-{b}" for b in OURS] + ["torch-sort"]
if DEVICE == "cuda" and importlib.util.find_spec("flashinfer") is not None:
    PROVIDERS.append("flashinfer")


def torch_sort_sample(logits, top_k, top_p, gen):
    """What TRL / HF logits processors do: sort the vocabulary for top-k / top-p."""
    z = logits.float()
    if top_k > 0:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sz, order = z.sort(dim=-1, descending=False)
        cum = sz.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        z = z.scatter(-1, order, sz.masked_fill(drop, float("-inf")))
    return torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(-1)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sample_tokens(benchmark, bench, provider, shape):
    B, V, top_k, top_p = shape["B"], shape["V"], shape["top_k"], shape["top_p"]
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    logits = (torch.randn(B, V, device=DEVICE) * 3).to(dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if provider.startswith("r1k-"):
        backend = provider[4:]

        def fn():
            with dispatch.use_backend(backend):
                return r1kernels.sample_tokens(logits, top_k=top_k, top_p=top_p, generator=gen)
    elif provider == "torch-sort":
        fn = lambda: torch_sort_sample(logits, top_k, top_p, gen)  # noqa: E731
    else:
        import flashinfer.sampling as fs

        def fn():
            probs = torch.softmax(logits.float(), -1)
            if top_k > 0:
                return fs.top_k_top_p_sampling_from_probs(probs, top_k, top_p, generator=gen)
            return fs.top_p_sampling_from_probs(probs, top_p, generator=gen)
    bench(benchmark, fn, op=OP, shape=shape, provider=provider,
          bytes=B * V * logits.element_size(), baseline="torch-sort")
