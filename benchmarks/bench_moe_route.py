"""moe_route: ours (every backend here) vs the eager transformers routers, torch.compile of them,
and vLLM's / sglang's routing kernels when installed.

Bytes moved: T*E*elt read (the router logits) + T*k*12 written (weights, ids, selected scores)
+ T*4 (logsumexp). Targets on an H100 (T=16384): DeepSeek-V3 (E=256, k=8, groups 8 keep 4,
sigmoid + bias, fp32 logits) <= 12 us, eager transformers 673-696 us; Qwen3 (E=128, k=8,
softmax) <= 8 us, eager 134-148 us. Forward only (the router's backward is an elementwise pass).
Also measured (benchmarks/shapes.py): gpt-oss-20b (E=32, k=4), Qwen3.5-397B (E=512, k=10) and
Kimi-K2 (E=384, k=8, sigmoid + bias, one group; its eager baseline is DeepSeek-V3's router code).
"""
import pytest
import torch

import r1kernels
from r1kernels import dispatch
from shapes import DEVICE, shape_id, shapes_for

OP = "moe_route"
SHAPES = shapes_for(OP, DEVICE)
OURS = [b for b in dispatch.available_backends(OP, DEVICE) if not (b == "triton" and DEVICE == "cpu")]


def eager_deepseek_v3_route(logits, top_k, n_group, topk_group, bias, scaling=2.5):
    """transformers 5.x DeepseekV3TopkRouter.forward after its linear (fp32 logits)."""
    E = logits.shape[-1]
    scores = logits.sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scaling, ids


def eager_qwen3_route(logits, top_k):
    """transformers 5.x Qwen3MoeTopKRouter.forward after its linear (norm_topk_prob=True)."""
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids


def third_party(provider, logits, shape, bias):
    """vLLM / sglang routing kernels; skipped when not installed or their API does not match."""
    k, ng, tg, sig = shape["top_k"], shape["n_group"], shape["topk_group"], shape["score_func"] == "sigmoid"
    if DEVICE != "cuda":
        pytest.skip(f"{provider} routing kernels need CUDA")
    if provider == "vllm":
        fm = pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe")
        hidden = torch.empty(logits.shape[0], 1, device=DEVICE, dtype=torch.bfloat16)
        if ng > 1 or sig:
            fn = lambda: fm.grouped_topk(hidden, logits, k, True, num_expert_group=ng, topk_group=tg,  # noqa: E731
                                         scoring_func="sigmoid" if sig else "softmax", e_score_correction_bias=bias)
        else:
            fn = lambda: fm.fused_topk(hidden, logits, k, True)  # noqa: E731
    else:
        if ng > 1:
            sk = pytest.importorskip("sgl_kernel")
            fn = lambda: sk.moe_fused_gate(logits, bias, ng, tg, k, 0, 2.5)  # noqa: E731
        else:
            topk = pytest.importorskip("sglang.srt.layers.moe.topk")
            hidden = torch.empty(logits.shape[0], 1, device=DEVICE, dtype=torch.bfloat16)
            fn = lambda: topk.fused_topk(hidden, logits, k, True)  # noqa: E731
    try:
        fn()
    except (TypeError, RuntimeError, AttributeError) as exc:
        pytest.skip(f"{provider}: routing API not callable this way ({type(exc).__name__}: {exc})")
    return fn


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", [f"r1k-{b}" for b in OURS] + ["eager", "compiled-eager", "vllm", "sglang"])
def test_moe_route(benchmark, bench, provider, shape):
    T, E, k = shape["T"], shape["E"], shape["top_k"]
    ng, tg, sf = shape["n_group"], shape["topk_group"], shape["score_func"]
    logits = torch.randn(T, E, device=DEVICE)
    bias = (torch.randn(E, device=DEVICE) * 0.05) if shape["bias"] else None
    if sf == "sigmoid":
        eager = lambda x: eager_deepseek_v3_route(x, k, ng, tg, bias)  # noqa: E731
    else:
        eager = lambda x: eager_qwen3_route(x, k)  # noqa: E731
    if provider.startswith("r1k-"):
        backend = provider[4:]
        kw = dict(score_func=sf, n_group=ng, topk_group=tg, correction_bias=bias,
                  routed_scaling_factor=2.5 if sf == "sigmoid" else 1.0)

        def fn():
            with dispatch.use_backend(backend):
                return r1kernels.moe_route(logits, k, **kw)
    elif provider == "eager":
        fn = lambda: eager(logits)  # noqa: E731
    elif provider == "compiled-eager":
        compiled = torch.compile(eager)
        fn = lambda: compiled(logits)  # noqa: E731
    else:
        fn = third_party(provider, logits, shape, bias)
    bench(benchmark, fn, op=OP, shape=shape, provider=provider, bytes=T * E * 4 + T * k * 12 + T * 4,
          baseline="eager")
