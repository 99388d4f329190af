"""Launch-configuration sweep and GPU check of the fused logits kernel (ops/token_logprobs.py,
`_token_logprobs_fused_kernel`, and the cluster kernel of
csrc/token_logprobs/fused_logits_cluster.cu): token_logprobs_fwd_bwd on [16384, 151936] bf16 and
GRPOLoss.from_logits on [16, 1025, 151936] bf16 (in place), for each configuration in CONFIGS.
Every configuration is first checked on the GPU: token_logprobs_fwd_bwd on 1024 rows against
float64, from_logits on 2 sequences against the torch backend. Prints one line per
configuration; the floor is one read + one write of the logits at the measured copy bandwidth.

    python benchmarks/tune_fused_logits.py
    TUNE_DRY_RUN=1 TRITON_INTERPRET=1 python benchmarks/tune_fused_logits.py   # CPU, tiny shapes:
        runs every step once (the script itself is checked; the timings mean nothing)
"""
import os
import sys

import torch
import triton.testing

import r1kernels
from r1kernels import dispatch

# Configurations: ("cluster", CTAs per cluster, threads per CTA[, variant]) for the cluster kernel
# (csrc/token_logprobs/fused_logits_cluster.cu, R1K_FUSED_CLUSTER; variant 0 the default: rows in
# registers, one cluster per row; 1 rows in registers on persistent clusters, the next row
# prefetched into L2, new and not yet measured, so first), then the Triton kernel's defaults FUSED_CONFIG_GRPO and FUSED_CONFIG: (programs per SM
# (0: two launches, one program per row), warps, block, per-lane statistics [, warps and block of
# the two-launch mode's statistics launch]). The settings left out were measured slower on
# 2026-11-23 (BENCHMARKS.md).
# TUNE_N=k times the first k only (run_gpu.sh quick: 2, the persistent variant and the default).
CONFIGS = [("cluster", 8, 256, 1), ("cluster", 8, 256), ("cluster", 4, 512, 1),
           ("cluster", 16, 256, 1), ("cluster", 8, 512), (0, 8, 4096, 0, 1, 2048), (0, 8, 4096, 0)]


def _select(cfg):
    """Environment for one configuration."""
    if cfg[0] == "cluster":
        os.environ["R1K_FUSED_CLUSTER"] = ",".join(map(str, cfg[1:]))
        os.environ.pop("R1K_FUSED_LOGITS", None)
    else:
        os.environ["R1K_FUSED_CLUSTER"] = "0"
        os.environ["R1K_FUSED_LOGITS"] = ",".join(map(str, cfg))


def _path(x3):
    """Which kernel the fused ops take on logits x3 under the current environment."""
    from r1kernels.ops import token_logprobs as tlp

    setting = tlp.cluster_config(x3, x3)
    return f"cluster{setting}" if setting else "triton"


def _rel(a, r):
    r = r.double()
    return ((a.double() - r).norm() / r.norm().clamp(min=1e-30)).item()


DRY = os.environ.get("TUNE_DRY_RUN") == "1"


def bench(fn):
    if DRY:
        import time
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    dev = "cpu" if DRY else "cuda"
    torch.manual_seed(0)
    N, V = (24, 5000) if DRY else (16384, 151936)
    x = (torch.randn(N, V, device=dev) * 2).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), device=dev)
    glp, gent = torch.randn(N, device=dev), torch.randn(N, device=dev)
    src = torch.empty(N * V // 2, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 4 / t_copy / 1e6  # GB/s
    floor_ms = 2 * N * V * 2 / copy_bw / 1e6
    del src, dst
    print(f"copy {copy_bw:.0f} GB/s; floor (read + write the logits) {floor_ms:.3f} ms", flush=True)

    # float64 reference on the first 1024 rows, and the autograd path checked against it
    n = 16 if DRY else 1024
    xr = x[:n].double().requires_grad_(True)
    lr, er = r1kernels.reference.token_logprobs_ref(xr, y[:n], with_entropy=True)
    ((lr * glp[:n].double()).sum() + (er * gent[:n].double()).sum()).backward()
    ref_tok = (lr.detach(), er.detach(), xr.grad)
    del xr
    xs = x[:n].clone().requires_grad_(True)
    lp, en = r1kernels.token_logprobs(xs, y[:n], with_entropy=True)
    ((lp * glp[:n]).sum() + (en * gent[:n]).sum()).backward()
    print(f"check autograd path: grad rel err {_rel(xs.grad, ref_tok[2]):.2e}")
    del xs

    B, T1 = (2, 9) if DRY else (16, 1025)
    full = (torch.randn(B, T1, V, device=dev) * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T1 - 1), device=dev)
    lp0 = -torch.rand(B, T1 - 1, device=dev) * 3
    old = lp0 + torch.randn_like(lp0) * 0.1
    ref = lp0 + torch.randn_like(lp0) * 0.1
    adv = torch.randn(B, device=dev)
    mask = torch.rand(B, T1 - 1, device=dev) < 0.9
    loss_fn = r1kernels.GRPOLoss(loss_type="dapo", beta=0.04, epsilon_high=0.28, with_entropy=False)
    # reference for the fused GRPO path: the unfused torch backend on 2 sequences
    sub = full[:2, :-1].clone()  # bf16, as the timed call (the cluster kernel takes 16-bit logits)

    def from_logits_small(be):
        xx = sub.clone().requires_grad_(True)
        with dispatch.use_backend(be):
            o = loss_fn.from_logits(xx, ids[:2], mask[:2], adv[:2], old_logps=old[:2], ref_logps=ref[:2])
        o.loss.backward()
        return o.loss.item(), xx.grad
    ref_fl = from_logits_small("torch")

    def check(cfg):
        """GPU check of one configuration: (rel err of logp, entropy, grad vs float64; loss and
        gradient of from_logits vs the torch backend)."""
        lp2, en2, g2 = r1kernels.token_logprobs_fwd_bwd(x[:n].clone(), y[:n], glp[:n],
                                                        grad_entropy=gent[:n], with_entropy=True)
        errs = [_rel(a, r) for a, r in zip((lp2, en2, g2), ref_tok)]
        loss, g = from_logits_small("triton")
        errs.append(abs(loss - ref_fl[0]) / max(abs(ref_fl[0]), 1e-12))
        errs.append(_rel(g, ref_fl[1]))
        return errs

    xin = full.detach()[:, :-1]
    # baselines of the same run: token_logprobs forward + backward through autograd (three passes)
    # and Liger's triton_grpo_loss (in place), same loss configuration
    xa = x.detach().requires_grad_(True)

    def autograd_step():
        lp, en = r1kernels.token_logprobs(xa, y, with_entropy=True)
        return torch.autograd.grad((lp * glp).sum() + (en * gent).sum(), xa)
    print(f"baseline token_logprobs fwd+bwd (autograd, 3 passes): {bench(autograd_step):.3f} ms")
    print(f"  forward only: {bench(lambda: r1kernels.token_logprobs(x, y, with_entropy=True)):.3f} ms")
    del xa
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        fl = full.detach().clone().requires_grad_(True)

        def liger():
            loss, _ = triton_grpo_loss(fl, old, ref, ids, adv, mask, temperature=1.0, beta=0.04,
                                       eps_low=0.2, eps_high=0.28, inplace=True, loss_type="dapo",
                                       reduce=True)
            return torch.autograd.grad(loss, fl)
        print(f"baseline liger triton_grpo_loss (in place): {bench(liger):.3f} ms")
        del fl
    except Exception as exc:  # noqa: BLE001
        print(f"liger not available: {exc!r}"[:200])
    # from_logits' logits kernel alone (statistics, dL/dlogp, dL/dlogits, in place), so that the
    # op's time splits into the kernel and the rest (input checks, loss reduction, host gaps)
    from r1kernels import nn as rnn
    from r1kernels.ops import grpo_loss as G
    gcfg = G.make_config(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, delta=None, beta=0.04,
                         importance_sampling_level="token", use_bias_correction_kl=False,
                         max_completion_length=None, sapo_temperature_pos=1.0,
                         sapo_temperature_neg=1.05, T=T1 - 1)
    rows = rnn._TokenRows(gcfg, T1 - 1, adv.unsqueeze(1).expand(B, T1 - 1), mask, old, ref, None,
                          G.row_scale(mask.float().sum(-1), None, gcfg), G.forward_impl("triton")[0])
    ids_flat = ids.reshape(-1).contiguous()
    print(f"{'config':>25} {'fwd_bwd ms':>11} {'inplace ms':>11} {'%floor':>7} {'from_logits ms':>15}"
          f" {'its kernel ms':>14}  path  errors (logp, entropy, grad, from_logits loss, grad)")
    failures = 0
    first = int(os.environ.get("TUNE_FROM", "0"))  # TUNE_FROM=k: from the k-th on
    for cfg in CONFIGS[first:first + int(os.environ.get("TUNE_N", len(CONFIGS)))]:
        _select(cfg)
        path = _path(x.view(1, N, V))
        try:
            errs = check(cfg)
            bad = [e for e in errs if not e < 2e-2]  # bf16 logits: ~1e-3; NaN fails
            if bad:
                print(f"{str(cfg):>25} WRONG ({path}): errors {['%.1e' % e for e in errs]}",
                      flush=True)
                failures += 1
                continue
            t1 = bench(lambda: r1kernels.token_logprobs_fwd_bwd(x, y, glp, grad_entropy=gent,
                                                               with_entropy=True))
            xi = x.clone()
            t2 = bench(lambda: r1kernels.token_logprobs_fwd_bwd(xi, y, glp, grad_entropy=gent,
                                                               with_entropy=True, inplace=True))
            del xi
            xg = xin.requires_grad_(True)

            def step():
                out = loss_fn.from_logits(xg, ids, mask, adv, old_logps=old, ref_logps=ref, inplace=True)
                return torch.autograd.grad(out.loss, xg)
            t3 = bench(step)
            xk = xin.detach()
            t4 = bench(lambda: rows.kernel(xk, ids_flat, xk, 1.0, -100, False))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next configuration
            print(f"{str(cfg):>25} failed ({path}): {exc!r}"[:300], flush=True)
            failures += 1
            continue
        print(f"{str(cfg):>25} {t1:11.3f} {t2:11.3f} {100 * floor_ms / t2:6.0f}% {t3:15.3f} "
              f"{t4:14.3f}  "
              f"{path}  {' '.join('%.1e' % e for e in errs)}", flush=True)
    for k in ("R1K_FUSED_CLUSTER", "R1K_FUSED_LOGITS"):
        os.environ.pop(k, None)
    print(f"{failures} configuration(s) wrong or failed" if failures else "all configurations checked")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
