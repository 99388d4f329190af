"""token_logprobs (log-prob + entropy from logits): forward and forward+backward, every provider.

Bytes moved (the floor): forward reads the logits once (N * V * itemsize); forward+backward reads
them twice and writes the gradient once (3 * N * V * itemsize: 5.1 ms for N=16384, V=151936 bf16
at 2.9 TB/s). Target on an H100, forward+backward with entropy: <= 4.0 ms.

Providers: ours (each backend available here), eager log_softmax + gather + entropy in fp32 on
the materialized logits, torch.compile of the reference, and when installed Liger-Kernel's
cross entropy (no entropy), TRL's fused log-prob + entropy kernel (trl.kernels).
"""
import contextlib
import sys
import types

import pytest
import torch

import r1kernels
from r1kernels import dispatch
from r1kernels.ops import token_logprobs as tlp
from r1kernels.reference import token_logprobs_ref
from shapes import DEVICE, shape_id, shapes_for

OP = "token_logprobs"
SHAPES = shapes_for(OP, DEVICE)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
OURS = [b for b in dispatch.available_backends(OP, DEVICE) if not (b == "triton" and DEVICE == "cpu")]
# r1k-fwd_bwd*: the default path (on sm_90 with the CUDA build, the thread-block-cluster kernel of
# csrc/token_logprobs/fused_logits_cluster.cu, R1K_FUSED_CLUSTER); r1k-fwd_bwd-inplace-no-cluster:
# in place with it off (the Triton kernel), measured only where the default takes it
PROVIDERS = [f"r1k-{b}" for b in OURS] + ["r1k-fwd_bwd", "r1k-fwd_bwd-inplace",
                                           "r1k-fwd_bwd-inplace-no-cluster", "eager",
                                           "compiled-ref", "liger", "trl"]


def eager_logprobs_entropy(logits, labels):
    """What users write: fp32 log_softmax over the materialized logits, gather, entropy."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _trl_fused():
    """TRL's fused kernel (trl/kernels/logprob_entropy.py); its package __init__ pulls the whole
    trainer, so the one helper it needs from trl.trainer.utils is stubbed, as in shared/anchors."""
    pytest.importorskip("trl")
    stub_t = types.ModuleType("trl.trainer")
    stub_u = types.ModuleType("trl.trainer.utils")
    stub_u.maybe_gather_lm_head_ctx = lambda *a: contextlib.nullcontext()
    stub_t.utils = stub_u
    sys.modules.setdefault("trl.trainer", stub_t)
    sys.modules.setdefault("trl.trainer.utils", stub_u)
    try:
        from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available here
        pytest.skip(f"trl.kernels.logprob_entropy not importable: {exc!r}")
    return selective_log_softmax_and_entropy


def make_fn(provider, logits, labels, mode):
    """callable(x) -> (logp, entropy or None) for one provider."""
    if provider.startswith("r1k-"):
        backend = provider[4:]

        def fn(x):
            with dispatch.use_backend(backend):
                return r1kernels.token_logprobs(x, labels, with_entropy=True)
        return fn
    if provider == "eager":
        return lambda x: eager_logprobs_entropy(x, labels)
    if provider == "compiled-ref":
        compiled = torch.compile(token_logprobs_ref)
        return lambda x: compiled(x, labels, with_entropy=True)
    if provider == "liger":
        pytest.importorskip("liger_kernel")
        if DEVICE != "cuda":
            pytest.skip("Liger-Kernel's Triton kernels need CUDA")
        from liger_kernel.transformers.functional import liger_cross_entropy
        # Liger computes its gradient in the forward pass for a scalar loss: forward+backward
        # is timed on -sum(logp) (reduction="sum"), the forward on per-token values
        reduction = "none" if mode == "fwd" else "sum"
        return lambda x: (-liger_cross_entropy(x, labels, reduction=reduction), None)
    if provider == "trl":
        if DEVICE != "cuda":
            pytest.skip("TRL's Triton kernels need CUDA")
        f = _trl_fused()
        return lambda x: f(x, labels, 1.0)
    raise ValueError(provider)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_token_logprobs(benchmark, bench, monkeypatch, provider, mode, shape):
    N, V = shape["N"], shape["V"]
    logits = torch.randn(N, V, device=DEVICE, dtype=DTYPE) * 2
    labels = torch.randint(0, V, (N,), device=DEVICE)
    w_lp = torch.randn(N, device=DEVICE)
    w_ent = torch.randn(N, device=DEVICE)
    itemsize = logits.element_size()
    if provider.startswith("r1k-fwd_bwd"):
        # forward and backward in one call (token_logprobs_fwd_bwd) for the same loss, whose
        # upstream gradient (w_lp, w_ent) is known up front: one read + one write of the logits
        if mode == "fwd":
            pytest.skip("token_logprobs_fwd_bwd is forward+backward")
        inplace = "inplace" in provider
        x = logits.clone() if inplace else logits  # in place: later calls run on gradients
        if provider.endswith("no-cluster"):
            if tlp.cluster_config(x.view(1, N, V), x.view(1, N, V)) is None:
                pytest.skip("the default path takes no cluster kernel here (CUDA sm_90+ build only)")
            monkeypatch.setenv("R1K_FUSED_CLUSTER", "0")

        def fn():
            return r1kernels.token_logprobs_fwd_bwd(x, labels, w_lp, grad_entropy=w_ent,
                                                    with_entropy=True, inplace=inplace)[2]
        bench(benchmark, fn, op=f"{OP} {mode}", shape=shape, provider=provider,
              bytes=2 * N * V * itemsize, baseline="eager")
        return
    f = make_fn(provider, logits, labels, mode)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return f(logits)
        nbytes = N * V * itemsize
    else:
        def fn():
            x = logits.detach().requires_grad_(True)
            logp, ent = f(x)
            loss = (logp.float() * w_lp).sum() if logp.dim() else logp.float()
            if ent is not None:
                loss = loss + (ent.float() * w_ent).sum()
            loss.backward()
            return x.grad
        nbytes = 3 * N * V * itemsize
    bench(benchmark, fn, op=f"{OP} {mode}", shape=shape, provider=provider, bytes=nbytes,
          baseline="eager")
