"""The log-prob ops and GRPOLoss on a distributed lm_head, in real gloo processes on CPU: a
vocabulary split over the ranks (process_group=) and an FSDP2 DTensor weight, each against the
single-process float64 reference (values and every gradient), with plain and transformed heads
(softcap / logit_scale).

pytest spawns this file under torchrun (2 and 4 processes, bounded in time); each process runs
every case and fails with the case's name."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("world,backend", [(2, "cpp"), (4, "torch")])
def test_distributed_ops_match_reference(world, backend):
    env = dict(os.environ, OMP_NUM_THREADS="1", R1K_BACKEND=backend,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # CPU tensors: the C++ / torch backends
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), os.path.abspath(__file__)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("ALL OK") == world


# ---- the worker (one per rank, under torchrun) --------------------------------------------------

F64 = torch.float64


def _close(name, got, want, atol=2e-5, rtol=2e-5):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def _split(V, world):
    """Uneven contiguous slices (sizes differ), in rank order."""
    sizes = [V // world + (1 if r < V % world else 0) for r in range(world)]
    sizes[0] += 2
    sizes[-1] -= 2
    offs = [sum(sizes[:r]) for r in range(world + 1)]
    return sizes, offs


def _inputs(V, seed=0, B=3, T=7, H=12):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # ignored
    labels[1, 0] = V - 1
    labels[1, 1] = 0
    up = torch.randn(B, T, generator=g)
    ue = torch.randn(B, T, generator=g)
    return hidden, weight, bias, labels, up, ue


def _run_cases():
    import torch.distributed as dist

    import r1kernels
    from r1kernels import reference as R

    rank, world = dist.get_rank(), dist.get_world_size()
    grp = dist.group.WORLD
    V = 11 * world + 3
    sizes, offs = _split(V, world)
    lo, hi = offs[rank], offs[rank + 1]
    hidden, weight, bias, labels, up, ue = _inputs(V)
    temp = 0.7

    for head in ({}, dict(softcap=2.0, logit_scale=1.7), dict(logit_scale=0.6)):
        _op_cases(grp, lo, hi, hidden, weight, bias, labels, up, ue, temp, head)
    logits = (hidden @ weight.T + bias).detach()

    # -- GRPOLoss (token and sequence level) and GRPOLoss.from_logits
    B, T = labels.shape
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[2] = False  # a sequence without a live token
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        old = R.linear_token_logprobs_ref(hidden, weight, labels, bias=bias, temperature=temp)
        old = old.float() + 0.3 * torch.randn(B, T, generator=g)
    all_live = torch.ones_like(mask)
    cap = dict(softcap=2.0, logit_scale=1.7)
    for level, sweep, lab, msk, head in (("token", "auto", labels, mask, {}),
                                         ("sequence", "auto", labels, mask, {}),
                                         ("token", "two", labels, mask, {}),
                                         ("sequence", "auto", labels.clamp(min=0), all_live, {}),
                                         ("token", "auto", labels, mask, cap),
                                         ("sequence", "auto", labels, mask, cap),
                                         ("token", "two", labels, mask, dict(logit_scale=0.6))):
        opts = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28,
                    importance_sampling_level=level)
        rh, rw, rb = (t.double().requires_grad_() for t in (hidden, weight, bias))
        rlp = R.linear_token_logprobs_ref(rh, rw, lab, bias=rb, temperature=temp, **head)
        rloss, rmet = R.grpo_loss_ref(rlp, adv, msk, old_logps=old, **opts)
        rloss.backward()
        rent = R.linear_token_logprobs_ref(hidden, weight, lab, bias=bias, temperature=temp,
                                           with_entropy=True, **head)[1]
        rent = (rent * msk).sum() / msk.sum()
        mod = r1kernels.GRPOLoss(temperature=temp, process_group=grp, sweep=sweep, **opts, **head)
        h = hidden.clone().requires_grad_()
        w = weight[lo:hi].clone().requires_grad_()
        b = bias[lo:hi].clone().requires_grad_()
        loss, met = mod(h, w, lab, msk, adv, bias=b, old_logps=old)
        loss.backward()
        tag = f"GRPOLoss[{level}, {sweep}, {int(msk.all())}, {head}]"
        _close(f"{tag} loss", loss, rloss)
        _close(f"{tag} entropy", met["entropy"], rent)
        for k in ("clip_ratio_low", "clip_ratio_high", "clip_ratio"):
            _close(f"{tag} {k}", met[k], rmet[k])
        _close(f"{tag} grad_hidden", h.grad, rh.grad)
        _close(f"{tag} grad_weight", w.grad, rw.grad[lo:hi])
        _close(f"{tag} grad_bias", b.grad, rb.grad[lo:hi])
        # from logits
        rx = logits.double().requires_grad_()
        rloss, _ = R.grpo_loss_ref(R.token_logprobs_ref(rx, lab, temperature=temp, **head), adv,
                                   msk, old_logps=old, **opts)
        rloss.backward()
        x = logits[..., lo:hi].clone().requires_grad_()
        loss, met = mod.from_logits(x, lab, msk, adv, old_logps=old)
        loss.backward()
        _close(f"{tag}.from_logits loss", loss, rloss)
        _close(f"{tag}.from_logits entropy", met["entropy"], rent)
        _close(f"{tag}.from_logits grad", x.grad, rx.grad[..., lo:hi])

    # -- bf16 lm_head: against float64 on the same (rounded) inputs, to bf16 tolerance
    h16, w16 = hidden.bfloat16(), weight[lo:hi].bfloat16()
    rh = h16.double().requires_grad_()
    rw = weight.bfloat16().double().requires_grad_()
    rl, re = R.linear_token_logprobs_ref(rh, rw, labels, with_entropy=True)
    (rl * up + re * ue).sum().backward()
    h = h16.clone().requires_grad_()
    w = w16.clone().requires_grad_()
    lp, en = r1kernels.linear_token_logprobs(h, w, labels, with_entropy=True, process_group=grp)
    (lp * up + en * ue).sum().backward()
    for name, got, want in (("logp", lp, rl), ("entropy", en, re), ("grad_hidden", h.grad, rh.grad),
                            ("grad_weight", w.grad, rw.grad[lo:hi])):
        _close(f"bf16 linear_token_logprobs {name}", got, want, atol=3e-2, rtol=2e-2)

    # -- a label outside [0, sum V_r): IndexError on every rank
    bad = labels.clone()
    bad[2, 3] = V
    for call in (lambda: r1kernels.token_logprobs(logits[..., lo:hi], bad, process_group=grp),
                 lambda: r1kernels.linear_token_logprobs(hidden, weight[lo:hi], bad,
                                                         process_group=grp),
                 lambda: r1kernels.GRPOLoss(process_group=grp)(hidden, weight[lo:hi], bad, mask,
                                                               adv)):
        try:
            call()
        except IndexError as e:
            assert str(V) in str(e), e
        else:
            raise AssertionError("a label = sum V_r was accepted")

    _dtensor_cases(rank, world, temp)
    _fsdp_tied_case(rank, world)


def _op_cases(grp, lo, hi, hidden, weight, bias, labels, up, ue, temp, head):
    """The four log-prob ops on this rank's slice [lo, hi) of the vocabulary, against float64,
    with the head transform `head` (softcap / logit_scale keywords, the same in the reference)."""
    import r1kernels
    from r1kernels import reference as R

    tag = "".join(f"{k}={v} " for k, v in head.items())
    # -- token_logprobs (autograd) and token_logprobs_fwd_bwd
    logits = (hidden @ weight.T + bias).detach()
    ref_x = logits.double().requires_grad_()
    rl, re = R.token_logprobs_ref(ref_x, labels, temperature=temp, **head, with_entropy=True)
    (rl * up + re * ue).sum().backward()
    x = logits[..., lo:hi].clone().requires_grad_()
    lp, en = r1kernels.token_logprobs(x, labels, temperature=temp, **head, with_entropy=True,
                                      process_group=grp)
    (lp * up + en * ue).sum().backward()
    _close(f"{tag}token_logprobs logp", lp, rl)
    _close(f"{tag}token_logprobs entropy", en, re)
    _close(f"{tag}token_logprobs grad", x.grad, ref_x.grad[..., lo:hi])
    lp2 = r1kernels.token_logprobs(logits[..., lo:hi], labels, temperature=temp, **head,
                                   process_group=grp)
    _close(f"{tag}token_logprobs logp (no entropy)", lp2, rl)
    lp, en, g = r1kernels.token_logprobs_fwd_bwd(logits[..., lo:hi].clone(), labels, up,
                                                 grad_entropy=ue, temperature=temp, **head,
                                                 with_entropy=True, process_group=grp)
    _close(f"{tag}token_logprobs_fwd_bwd logp", lp, rl)
    _close(f"{tag}token_logprobs_fwd_bwd entropy", en, re)
    _close(f"{tag}token_logprobs_fwd_bwd grad", g, ref_x.grad[..., lo:hi])

    # -- linear_token_logprobs (autograd) and linear_token_logprobs_fwd_bwd
    rh, rw, rb = (t.double().requires_grad_() for t in (hidden, weight, bias))
    rl, re = R.linear_token_logprobs_ref(rh, rw, labels, bias=rb, temperature=temp, **head,
                                         with_entropy=True)
    (rl * up + re * ue).sum().backward()
    h = hidden.clone().requires_grad_()
    w = weight[lo:hi].clone().requires_grad_()
    b = bias[lo:hi].clone().requires_grad_()
    lp, en = r1kernels.linear_token_logprobs(h, w, labels, bias=b, temperature=temp, **head,
                                             with_entropy=True, process_group=grp)
    (lp * up + en * ue).sum().backward()
    for name, got, want in (("logp", lp, rl), ("entropy", en, re), ("grad_hidden", h.grad, rh.grad),
                            ("grad_weight", w.grad, rw.grad[lo:hi]),
                            ("grad_bias", b.grad, rb.grad[lo:hi])):
        _close(f"{tag}linear_token_logprobs {name}", got, want)
    out = r1kernels.linear_token_logprobs_fwd_bwd(hidden, weight[lo:hi], labels, up,
                                                  grad_entropy=ue, bias=bias[lo:hi],
                                                  temperature=temp, **head, with_entropy=True,
                                                  process_group=grp)
    for name, got, want in zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), out,
                               (rl, re, rh.grad, rw.grad[lo:hi], rb.grad[lo:hi])):
        _close(f"{tag}linear_token_logprobs_fwd_bwd {name}", got, want)


def _dtensor_cases(rank, world, temp):
    """Every rank its own hidden states and labels (data parallel), the lm_head a DTensor: the
    gradient on the DTensor is the sum over ranks of the float64 reference gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import r1kernels
    from r1kernels import reference as R

    mesh = init_device_mesh("cpu", (world,))
    V = 7 * world + 1  # rows do not split evenly
    per_rank = [_inputs(V, seed=10 + r, H=12) for r in range(world)]
    hidden, _, _, labels, up, ue = per_rank[rank]
    weight, bias = per_rank[0][1], per_rank[0][2]  # the same parameter everywhere
    cap = dict(softcap=2.0, logit_scale=1.7)
    for placement, head in ((Shard(0), {}), (Replicate(), {}), (Shard(0), cap)):
        ref_w = weight.double().requires_grad_()
        ref_b = bias.double().requires_grad_()
        ref_h = []
        for h_r, _, _, y_r, u_r, e_r in per_rank:
            h_r = h_r.double().requires_grad_()
            lp, en = R.linear_token_logprobs_ref(h_r, ref_w, y_r, bias=ref_b, temperature=temp,
                                                 with_entropy=True, **head)
            (lp * u_r + en * e_r).sum().backward()
            ref_h.append(h_r)
        mine = R.linear_token_logprobs_ref(hidden, weight, labels, bias=bias, temperature=temp,
                                           with_entropy=True, **head)
        wd = distribute_tensor(weight, mesh, [placement]).requires_grad_()
        bd = distribute_tensor(bias, mesh, [placement]).requires_grad_()
        h = hidden.clone().requires_grad_()
        lp, en = r1kernels.linear_token_logprobs(h, wd, labels, bias=bd, temperature=temp,
                                                 with_entropy=True, **head)
        (lp * up + en * ue).sum().backward()
        tag = f"DTensor[{placement}, {head}] linear_token_logprobs"
        _close(f"{tag} logp", lp, mine[0])
        _close(f"{tag} entropy", en, mine[1])
        _close(f"{tag} grad_hidden", h.grad, ref_h[rank].grad)
        assert wd.grad.placements == (placement,), wd.grad.placements
        _close(f"{tag} grad_weight", wd.grad.full_tensor(), ref_w.grad, atol=1e-4)
        _close(f"{tag} grad_bias", bd.grad.full_tensor(), ref_b.grad, atol=1e-4)
        out = r1kernels.linear_token_logprobs_fwd_bwd(hidden, wd.detach(), labels, up,
                                                      grad_entropy=ue, bias=bd.detach(),
                                                      temperature=temp, with_entropy=True,
                                                      **head)
        tag = f"DTensor[{placement}, {head}] linear_token_logprobs_fwd_bwd"
        _close(f"{tag} grad_hidden", out[2], ref_h[rank].grad)
        assert out[3].placements == (placement,), out[3].placements
        _close(f"{tag} grad_weight", out[3].full_tensor(), ref_w.grad, atol=1e-4)
        _close(f"{tag} grad_bias", out[4].full_tensor(), ref_b.grad, atol=1e-4)

    # GRPOLoss (with the soft-capped head): every rank's loss on its own batch; the weight
    # gradient sums them
    mask = torch.ones(*labels.shape, dtype=torch.bool)
    mask[0, -2:] = False
    ref_w.grad = None
    for r, (h_r, _, _, y_r, _, _) in enumerate(per_rank):
        adv_r = torch.linspace(-1, 1, y_r.shape[0]) * (r + 1)
        lp = R.linear_token_logprobs_ref(h_r.double(), ref_w, y_r, bias=ref_b.detach(),
                                         temperature=temp, **cap)
        R.grpo_loss_ref(lp, adv_r, mask)[0].backward()
    wd = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    adv = torch.linspace(-1, 1, labels.shape[0]) * (rank + 1)
    loss, _ = r1kernels.GRPOLoss(temperature=temp, **cap)(
        hidden, wd, labels, mask, adv, bias=distribute_tensor(bias, mesh, [Shard(0)]))
    loss.backward()
    _close("DTensor GRPOLoss (softcap) grad_weight", wd.grad.full_tensor(), ref_w.grad, atol=1e-4)
    dist.barrier()


def _fsdp_tied_case(rank, world):
    """FSDP2 as the trainer uses it (r1train/parallel.py): a tiny Qwen2 with tied embeddings,
    every layer and the root fully_shard-ed, the decoder run through the root, GRPOLoss on the
    sharded lm_head: the gradient of the tied weight is the embedding's plus the head's, summed
    over ranks, as one process computes for the sum of every rank's loss."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import r1kernels
    from r1train import parallel

    cfg = Qwen2Config(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(cfg)
    model = Qwen2ForCausalLM(cfg)
    model.load_state_dict(ref.state_dict())
    loss_fn = r1kernels.GRPOLoss()
    batches = []
    for r in range(world):
        g = torch.Generator().manual_seed(100 + r)
        ids = torch.randint(0, 37, (2, 6), generator=g)
        batches.append((ids, torch.ones_like(ids), torch.randn(2, generator=g)))
    total = 0.0
    for ids, attn, adv in batches:  # one process, every rank's batch
        h = ref.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        mask = torch.ones(2, 5, dtype=torch.bool)
        total = total + loss_fn(h, ref.lm_head.weight, ids[:, 1:], mask, adv)[0]
    total.backward()
    parallel.shard_model(model, activation_checkpointing=False)
    ids, attn, adv = batches[rank]
    h = parallel.hidden_states(model, ids, attn)[:, :-1]
    w = model.get_output_embeddings().weight
    assert parallel.is_dtensor(w), type(w)
    loss_fn(h, w, ids[:, 1:], torch.ones(2, 5, dtype=torch.bool), adv)[0].backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        _close(f"FSDP2 tied grad {name}", p.grad.full_tensor(), q.grad, atol=1e-5, rtol=1e-4)


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        _run_cases()
        print(f"rank {dist.get_rank()}: ALL OK", flush=True)
    finally:
        dist.destroy_process_group()
    # Every check passed (a failure raises above, and the rank exits non-zero). Skip the
    # interpreter's teardown: there, about 1 run in 4, a rank aborted with "terminate called
    # without an active exception" (a joinable std::thread destroyed at exit) after ALL OK.
    sys.stdout.flush()
    os._exit(0)
