"""Which side is off where the cluster kernel and the Triton kernel disagree: both against float64.

    python benchmarks/diag_cluster.py        (a CUDA GPU of compute capability 9+)
"""
import os
import subprocess
import sys

import torch

import r1kernels


def _use(setting):
    os.environ["R1K_FUSED_CLUSTER"] = "0" if setting is None else "%d,%d" % setting


def report(name, got, ref, rtol, atol):
    got, ref = got.double().cpu(), ref.double().cpu()
    err = (got - ref).abs()
    bad = err > atol + rtol * ref.abs()
    print(f"  {name}: max abs err {err.max().item():.3e}, elements over tol {int(bad.sum())}")
    return bad


def grpo_from_logits(case, with_old):
    gen = torch.Generator().manual_seed(3)
    B, T, V = 3, 37, 4104
    full = (torch.randn(B, T + 1, V, generator=gen) * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), generator=gen)
    ids[1, 4] = -100
    mask = torch.rand(B, T, generator=gen) < 0.8
    mask[2] = False
    clean = full[:, :-1].clone()
    full[:, :-1][~mask] = float("nan")
    lp0 = -torch.rand(B, T, generator=gen) * 3
    old = (lp0 + torch.randn(B, T, generator=gen) * 0.2) if with_old else None
    ref = lp0 + torch.randn(B, T, generator=gen) * 0.2
    adv = torch.randn(B, generator=gen)
    rw = torch.rand(B, T, generator=gen) + 0.5
    f = r1kernels.GRPOLoss(**case)
    grads = {}
    for setting in (None, (8, 256)):
        _use(setting)
        x = full.cuda()[:, :-1].requires_grad_(True)
        out = f.from_logits(x, ids.cuda(), mask.cuda(), adv.cuda(),
                            old_logps=None if old is None else old.cuda(),
                            ref_logps=ref.cuda() if case.get("beta") else None,
                            rollout_is_weights=rw.cuda())
        out.loss.backward()
        grads[setting] = x.grad
    xr = clean.double().requires_grad_(True)
    out = f.from_logits(xr, ids, mask, adv.double(), old_logps=None if old is None else old.double(),
                        ref_logps=ref.double() if case.get("beta") else None,
                        rollout_is_weights=rw.double())
    out.loss.backward()
    print(f"from_logits {case} with_old={with_old}")
    bt = report("triton ", grads[None], xr.grad, 2 ** -7, 1e-7)
    bc = report("cluster", grads[(8, 256)], xr.grad, 2 ** -7, 1e-7)
    d = (grads[None].double().cpu() - grads[(8, 256)].double().cpu()).abs()
    idx = (d > 1e-7 + 2 ** -7 * grads[None].double().cpu().abs()).nonzero()[:6]
    for i in idx.tolist():
        i = tuple(i)
        print("   ", i, "ref %.6e triton %.6e cluster %.6e" % (xr.grad[i].item(), grads[None][i].item(),
                                                             grads[(8, 256)][i].item()))
    rows = sorted({tuple(i[:2]) for i in (d > 1e-7 + 2 ** -7 * grads[None].double().cpu().abs())
                   .nonzero().tolist()})
    for r in rows[:3]:
        g64 = xr.grad[r]
        print("    row", r, "ref row grad sum %.3e, max |g| %.3e; triton/ref scale %.6f cluster/ref %.6f"
              % (g64.sum().item(), g64.abs().max().item(),
                 (grads[None][r].double().cpu() @ g64 / (g64 @ g64)).item(),
                 (grads[(8, 256)][r].double().cpu() @ g64 / (g64 @ g64)).item()))


def hidden_chunks():
    gen = torch.Generator().manual_seed(6)
    B, T, H, V = 4, 300, 64, 32000
    h = torch.randn(B, T, H, generator=gen).to(torch.bfloat16)
    w = (torch.randn(V, H, generator=gen) / H ** 0.5 * 2).to(torch.bfloat16)
    y = torch.randint(0, V, (B, T), generator=gen)
    y[0, 2] = -100
    mask = torch.rand(B, T, generator=gen) < 0.8
    adv = torch.randn(B, generator=gen)
    lp0 = -torch.rand(B, T, generator=gen) * 3
    f = r1kernels.GRPOLoss(loss_type="dapo", beta=0.04, epsilon_high=0.28)
    res = {}
    for s in ((8, 256), None):
        _use(s)
        hh, ww = h.cuda().requires_grad_(True), w.cuda().requires_grad_(True)
        out = f(hh, ww, y.cuda(), mask.cuda(), adv.cuda(), old_logps=lp0.cuda() + 0.1,
                ref_logps=lp0.cuda() - 0.1)
        out.loss.backward()
        res[s] = (out.loss.item(), hh.grad, ww.grad)
    hr, wr = h.double().requires_grad_(True), w.double().requires_grad_(True)
    out = f(hr, wr, y, mask, adv.double(), old_logps=lp0.double() + 0.1, ref_logps=lp0.double() - 0.1)
    out.loss.backward()
    print("hidden chunks: loss ref %.8f triton %.8f cluster %.8f" % (out.loss.item(), res[None][0],
                                                                     res[(8, 256)][0]))
    for k, name, ref in ((1, "grad_hidden", hr.grad), (2, "grad_weight", wr.grad)):
        for s, lab in ((None, "triton "), ((8, 256), "cluster")):
            report(f"{name} {lab}", res[s][k], ref, 2 ** -6, 1e-3)


BAD = r'''
import torch, r1kernels, sys
x = torch.randn(1, 4, 64, device="cuda").to(torch.bfloat16)
y = torch.zeros(4, dtype=torch.int64, device="cuda")
out = torch.zeros(3, 4, device="cuda")
glp = torch.zeros(4, device="cuda")
op = torch.ops.r1kernels.fused_logits_cluster
a = dict(inv_temp=1.0, ignore_index=-100, entropy=True, loss=0, eps_lo=0.2, eps_hi=0.2,
         delta=None, beta=0.0, bias_kl=False, tau_pos=1.0, tau_neg=1.05, pipelined=False)
calls = [lambda: op(x, x[:, :2], y, out, glp, None, None, None, None, None, None, None, **a, cluster=8, threads=256),
         lambda: op(x, x, y, out, glp, None, None, None, None, None, None, None, **a, cluster=3, threads=256),
         lambda: op(x, x, y, out, glp[:3], None, None, None, None, None, None, None, **a, cluster=8, threads=256),
         lambda: op(x, x, y, out, None, None, None, None, None, None, None, None, **a, cluster=8, threads=256)]
i = int(sys.argv[1])
try:
    calls[i]()
    print("call", i, "returned")
except Exception as e:
    print("call", i, type(e).__name__, str(e)[:200])
torch.cuda.synchronize()
print("call", i, "synced")
'''


if __name__ == "__main__":
    if len(sys.argv) > 1:  # one bad call in this process (under a debugger)
        exec(BAD.replace("int(sys.argv[1])", sys.argv[1]))
        sys.exit(0)
    for i in range(4):
        r = subprocess.run([sys.executable, "-c", BAD, str(i)], capture_output=True, text=True)
        print("bad call", i, "rc", r.returncode, (r.stdout + r.stderr)[-1500:])
    import traceback
    for case in (dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
                 dict(loss_type="dapo", beta=0.04, epsilon_high=0.28)):
        for with_old in (False, True):
            try:
                grpo_from_logits(case, with_old)
            except Exception:
                traceback.print_exc()
    try:
        hidden_chunks()
    except Exception:
        traceback.print_exc()
