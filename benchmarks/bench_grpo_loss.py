"""GRPO loss, forward + backward, three entry points side by side with their baselines:

1. `grpo_loss` on given log-probs [B, T] (op "grpo_loss"): ours vs the eager TRL 1.16
   `_compute_loss` math and its torch.compile. Bytes: read logps, old, ref (4 B each), mask (1 B),
   write dlogp in forward (4 B), backward reads it and writes the result (8 B): 25 B per token.
   Target on an H100 at B=512, T=8192: <= 60 us (memory floor ~29 us; eager 0.9-1.2 ms).
2. `GRPOLoss.from_logits` on logits [B, T+1, V] bf16 (op "grpo_loss_logits"; the loss uses the
   first T positions, Liger's convention): ours (gradient into a new buffer, or in place) vs
   eager log_softmax + loss, its torch.compile, and Liger's `triton_grpo_loss`. Bytes counted:
   the logits read once and their gradient written once (the floor). Target: <= 4.0 ms at
   [16, 1025, 151936] (Liger ~4.9 ms, eager 36 ms).
3. `GRPOLoss` on hidden states (op "grpo_loss_hidden"): ours vs eager (full logits), its
   torch.compile, TRL 1.16's chunked lm_head + its loss, and Liger's `LigerFusedLinearGRPOLoss`
   (both also on CPU tensors). "r1k" is the default (sweep="auto":
   one sweep of the vocabulary at these shapes), "r1k-two" forces the two-sweep order (8 N H V
   FLOPs of work, grad_weight reduced in fp32). FLOPs counted for every provider: the useful
   6 N' H V (logits GEMM and the two gradient GEMMs), N' the tokens inside the mask (90% of the
   N here): those are the GEMM rows our providers compute (the others reach neither the loss
   nor a gradient); the baselines compute all N. Target: N=16384, H=4096, V=151936 bf16
   <= 95 ms and <= 2.5 GiB peak.

Loss configuration everywhere: dapo, beta=0.04 (k3 KL to given reference log-probs),
epsilon 0.2/0.28, old log-probs given (off-policy ratio), temperature 1.
"""
import pytest
import torch

import r1kernels
from r1kernels import dispatch
from shapes import DEVICE, shape_id, shapes_for

OPTS = dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28)
OURS = [b for b in dispatch.available_backends("grpo_loss", DEVICE)
        if not (b == "triton" and DEVICE == "cpu")]
LOWP = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def trl_style_loss(logps, old, ref, adv, mask, eps_lo=0.2, eps_hi=0.28, beta=0.04):
    """TRL 1.16 GRPOTrainer._compute_loss (dapo, token level), as eager torch."""
    coef_1 = torch.exp(logps - old)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps_lo, 1 + eps_hi)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a) + beta * kl
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def trl_style_logits_loss(logits, ids, old, ref, adv, mask):
    """TRL's selective log-softmax on the logits, then the loss."""
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return trl_style_loss(logps, old, ref, adv, mask)


def _data(B, T, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    lp = -torch.rand(B, T, device=DEVICE, generator=g) * 3
    old = lp + torch.randn(B, T, device=DEVICE, generator=g) * 0.1
    ref = lp + torch.randn(B, T, device=DEVICE, generator=g) * 0.1
    adv = torch.randn(B, device=DEVICE, generator=g)
    mask = torch.rand(B, T, device=DEVICE, generator=g) < 0.9
    return lp, old, ref, adv, mask


# ---- 1. on given log-probs ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", shapes_for("grpo_loss", DEVICE), ids=shape_id)
@pytest.mark.parametrize("provider", [f"r1k-{b}" for b in OURS] + ["eager", "compiled-eager"])
def test_grpo_loss(benchmark, bench, provider, shape):
    B, T = shape["B"], shape["T"]
    lp, old, ref, adv, mask = _data(B, T)
    x = lp.requires_grad_(True)
    if provider.startswith("r1k-"):
        backend = provider[4:]

        def fn():
            with dispatch.use_backend(backend):
                out = r1kernels.grpo_loss(x, adv, mask, old_logps=old, ref_logps=ref, **OPTS)
            return torch.autograd.grad(out.loss, x)
    else:
        loss_fn = trl_style_loss if provider == "eager" else torch.compile(trl_style_loss)

        def fn():
            return torch.autograd.grad(loss_fn(x, old, ref, adv, mask), x)
    bench(benchmark, fn, op="grpo_loss", shape=shape, provider=provider, bytes=25 * B * T,
          baseline="eager")


# ---- 2. from logits ------------------------------------------------------------------------------


# r1k*: the default path (on sm_90 with the CUDA build, the thread-block-cluster logits kernel of
# csrc/token_logprobs/fused_logits_cluster.cu, R1K_FUSED_CLUSTER); *-no-cluster: the same with it
# off (the Triton kernels), measured only where the default takes it.


def _no_cluster(monkeypatch, provider, x3, g3):
    """Turn the cluster kernel off for a -no-cluster provider; skip that provider where the
    default would not take it on logits x3 [B, T, V] with gradient buffer g3 (same path)."""
    if not provider.endswith("-no-cluster"):
        return
    from r1kernels.ops import token_logprobs as tlp

    if tlp.cluster_config(x3, g3) is None:
        pytest.skip("the default path takes no cluster kernel here (CUDA sm_90+ build only)")
    monkeypatch.setenv("R1K_FUSED_CLUSTER", "0")


@pytest.mark.parametrize("shape", shapes_for("grpo_loss_logits", DEVICE), ids=shape_id)
@pytest.mark.parametrize("provider", ["r1k", "r1k-inplace", "r1k-inplace-no-cluster", "eager",
                                      "compiled-eager", "liger"])
def test_grpo_loss_logits(benchmark, bench, monkeypatch, provider, shape):
    B, T1, V = shape["B"], shape["T"], shape["V"]
    T = T1 - 1
    _, old, ref, adv, mask = _data(B, T)
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    full = torch.randn(B, T1, V, device=DEVICE, dtype=LOWP).requires_grad_(True)
    if provider.startswith("r1k"):
        loss_fn = r1kernels.GRPOLoss(**OPTS, with_entropy=False)
        inplace = provider.startswith("r1k-inplace")
        _no_cluster(monkeypatch, provider, full[:, :-1], full[:, :-1])
        # inplace: the gradient overwrites the logits (a leaf view here, so autograd.grad returns
        # that buffer); later calls run on those values, which does not change the work done
        x = full.detach()[:, :-1].requires_grad_(True) if inplace else full

        def fn():
            xin = x if inplace else x[:, :-1]
            out = loss_fn.from_logits(xin, ids, mask, adv, old_logps=old, ref_logps=ref, inplace=inplace)
            return torch.autograd.grad(out.loss, x)
    elif provider in ("eager", "compiled-eager"):
        f = trl_style_logits_loss if provider == "eager" else torch.compile(trl_style_logits_loss)

        def fn():
            return torch.autograd.grad(f(full[:, :-1], ids, old, ref, adv, mask), full)
    else:
        if DEVICE != "cuda":
            pytest.skip("Liger's Triton kernels need CUDA")
        liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")

        def fn():
            loss, _ = liger.triton_grpo_loss(full, old, ref, ids, adv, mask, temperature=1.0,
                                             beta=0.04, eps_low=0.2, eps_high=0.28, inplace=True,
                                             loss_type="dapo", reduce=True)
            return torch.autograd.grad(loss, full)
    nbytes = 2 * B * T * V * full.element_size()
    bench(benchmark, fn, op="grpo_loss_logits", shape=shape, provider=provider, bytes=nbytes,
          baseline="eager")


# ---- 3. from hidden states -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", shapes_for("grpo_loss_hidden", DEVICE), ids=shape_id)
@pytest.mark.parametrize("provider", ["r1k", "r1k-no-cluster", "r1k-two", "eager", "compiled-eager",
                                      "trl", "liger"])
def test_grpo_loss_hidden(benchmark, bench, monkeypatch, provider, shape):
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    _, old, ref, adv, mask = _data(B, T)
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    # hidden ~ N(0, 1) and weight ~ N(0, 1/H), as in shared/anchors (until 2026-11-23: hidden * 0.5)
    hidden = torch.randn(B, T, H, device=DEVICE).to(LOWP).requires_grad_(True)
    weight = (torch.randn(V, H, device=DEVICE) / H ** 0.5).to(LOWP).requires_grad_(True)
    if provider.startswith("r1k"):
        # the cluster kernel on the sweep's fp32 logits chunks, G in bf16 over their storage
        z = torch.empty(8, V, device=DEVICE)
        _no_cluster(monkeypatch, provider, z.unsqueeze(1), z.view(LOWP)[:, :V].unsqueeze(1))
        loss_fn = r1kernels.GRPOLoss(**OPTS, sweep="two" if provider == "r1k-two" else "auto")

        def fn():
            out = loss_fn(hidden, weight, ids, mask, adv, old_logps=old, ref_logps=ref)
            return torch.autograd.grad(out.loss, (hidden, weight))
    elif provider in ("eager", "compiled-eager"):
        def eager(h, w):
            return trl_style_logits_loss(h @ w.T, ids, old, ref, adv, mask)

        f = eager if provider == "eager" else torch.compile(eager)

        def fn():
            return torch.autograd.grad(f(hidden, weight), (hidden, weight))
    elif provider == "trl":
        # TRL 1.16's GRPOTrainer: its chunked lm_head log-probs (Triton on CUDA, torch ops on
        # CPU), then its loss
        from bench_linear_token_logprobs import _trl_chunked

        chunked_logp = _trl_chunked()

        def fn():
            logps = chunked_logp.apply(hidden.view(B * T, H), weight, None, ids.view(-1), 1.0,
                                       32768, None, 1.0, ("entropy",))[0].view(B, T)
            return torch.autograd.grad(trl_style_loss(logps, old, ref, adv, mask),
                                       (hidden, weight))
    else:
        # Liger's chunked loss is torch.compile'd torch: it runs on CPU tensors too
        chunked = pytest.importorskip("liger_kernel.chunked_loss")
        # Liger compiles its chunk function; its recompilation for a second shape in the same
        # process failed on an H100 (dynamo: "sources must not be empty for symbol"): start clean
        torch._dynamo.reset()
        loss_fn = chunked.LigerFusedLinearGRPOLoss(beta=0.04, use_ref_model=True, epsilon_low=0.2,
                                                   epsilon_high=0.28, loss_type="dapo")

        def fn():
            out = loss_fn(hidden, weight, ids, mask.long(), adv, ref_per_token_logps=ref,
                          old_per_token_logps=old)
            loss = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(loss, (hidden, weight))
    live = int(mask.sum())  # tokens inside the mask (labels are never ignore_index here)
    bench(benchmark, fn, op="grpo_loss_hidden", shape=shape, provider=provider,
          flops=6 * live * H * V, baseline="eager", rounds=5 if DEVICE == "cuda" else 3)
