"""GRPOLoss and GRPOLoss.from_logits under torch.compile(fullgraph=True): forward and backward
traced whole (fullgraph refuses any graph break, and so any host sync in the traced code:
.item(), bool(tensor), data-dependent shapes) and equal to eager. On CUDA the compiled step also
runs under torch.cuda.set_sync_debug_mode("error")."""
import pytest
import torch

from conftest import DEVICE, backends_for
from r1kernels import dispatch
from r1kernels.nn import GRPOLoss
from r1kernels.ops import linear_token_logprobs as lin

BACKENDS = backends_for("grpo_loss")
B, T, H, V = 3, 5, 16, 150


def make_inputs():
    g = torch.Generator().manual_seed(4)
    d = dict(hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g) * 0.3,
             bias=torch.randn(V, generator=g) * 0.1, labels=torch.randint(0, V, (B, T), generator=g),
             mask=torch.rand(B, T, generator=g) < 0.8, adv=torch.randn(B, generator=g),
             old=-torch.rand(B, T, generator=g) * 4 - 3, ref=-torch.rand(B, T, generator=g) * 4 - 3,
             rw=torch.rand(B, T, generator=g) + 0.5)
    d["mask"][1] = False  # an empty row
    d["labels"][2, 1] = -100  # an ignored label
    return {k: v.to(DEVICE) for k, v in d.items()}


def step(module, entry, d, leaves):
    kw = dict(old_logps=d["old"], ref_logps=d["ref"], rollout_is_weights=d["rw"],
              num_items_in_batch=torch.tensor(9.0, device=DEVICE))
    if entry == "forward":
        h, w, b = leaves
        out = module(h, w, d["labels"], d["mask"], d["adv"], bias=b, **kw)
    else:
        logits = leaves[0] * 1.0  # (inplace overwrites this buffer, never the leaf)
        out = module.from_logits(logits, d["labels"], d["mask"], d["adv"],
                                 inplace=entry == "from_logits_inplace", **kw)
    loss = out.loss * 0.5  # backward with grad_output != 1
    return loss, torch.stack([out.metrics[k] for k in ("kl", "clip_ratio", "entropy")])


def run(fn, module, entry, d):
    if entry == "forward":
        leaves = [d["hidden"], d["weight"], d["bias"]]
    else:
        leaves = [torch.nn.functional.linear(d["hidden"], d["weight"], d["bias"])]
    leaves = [t.clone().requires_grad_(True) for t in leaves]
    loss, metrics = fn(module, entry, d, leaves)
    loss.backward()
    return loss.detach(), metrics, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("entry", ["forward", "from_logits", "from_logits_inplace"])
def test_grpo_loss_module_compile_fullgraph(backend, level, entry, monkeypatch):
    """aot_eager: Dynamo and AOTAutograd trace the forward and the backward whole, as inductor's
    would be (the inductor test below runs them too), without compiling C++ on CPU."""
    monkeypatch.setattr(lin, "TILE_ELEMS_CPU", 16 * 64)  # several vocabulary tiles and chunks
    monkeypatch.setattr(lin, "MAX_TILE_ROWS", 4)
    d = make_inputs()
    module = GRPOLoss(loss_type="grpo", beta=0.04, epsilon_high=0.28, delta=1.5,
                      temperature=0.8, importance_sampling_level=level)
    torch._dynamo.reset()
    with dispatch.use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = run(compiled, module, entry, d)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            with torch.cuda.set_sync_debug_mode("error"):
                got = run(compiled, module, entry, d)
        want = run(step, module, entry, d)
    for x, y in zip(got[:2], want[:2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(got[2], want[2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", ["forward", "from_logits"])
def test_grpo_loss_module_compile_inductor(entry):
    """The default compiler (inductor), the default backend of this device."""
    d = make_inputs()
    module = GRPOLoss(loss_type="dapo", epsilon_high=0.28, beta=0.04)
    torch._dynamo.reset()
    got = run(torch.compile(step, fullgraph=True), module, entry, d)
    want = run(step, module, entry, d)
    for x, y in zip(got[:2], want[:2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(got[2], want[2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in dispatch.available_backends("grpo_loss", DEVICE),
                    reason="triton unavailable")
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_opcheck_grpo_loss_step_ops(level):
    """The custom ops GRPOLoss's steps go through on the Triton path under torch.compile (the
    partials of a chunk of rows, their reduction): schema, fake kernels, and the same loss, row
    scale and gradient as the whole forward's op."""
    from r1kernels.ops import grpo_loss as G

    g = torch.Generator().manual_seed(13)
    lp, old, ref = (-torch.rand(3, 10, generator=g).to(DEVICE) * 3 for _ in range(3))
    adv = torch.randn(3, 1, generator=g).to(DEVICE).expand(3, 10)
    mask, rw = (torch.rand(3, 10, generator=g) < 0.8).to(DEVICE), torch.rand(3, 10).to(DEVICE)
    nitems = torch.tensor([7.0], device=DEVICE)
    cfg = G.make_config(loss_type="dapo", epsilon_low=0.2, epsilon_high=None, delta=1.5, beta=0.1,
                        importance_sampling_level=level, use_bias_correction_kl=True,
                        max_completion_length=None, sapo_temperature_pos=1.0,
                        sapo_temperature_neg=1.05, T=10)
    args = (lp, adv, G._mask_view(mask), old, ref, rw, *cfg, True)
    torch.library.opcheck(G._grpo_loss_partials_op, args)
    grad, part = G._grpo_loss_partials_op(*args)
    torch.library.opcheck(G._grpo_loss_finalize_op, (part, nitems, cfg.loss, cfg.max_len))
    out, scale = G._grpo_loss_finalize_op(part, nitems, cfg.loss, cfg.max_len)
    g_all, out_all, scale_all = G._grpo_loss_fwd_op(*args[:6], nitems, *cfg, True)
    torch.testing.assert_close(out, out_all)
    torch.testing.assert_close(scale, scale_all)
    torch.testing.assert_close(grad, g_all)
