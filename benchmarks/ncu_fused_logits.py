"""One launch of the fused logits kernel at a target shape, for Nsight Compute:
token_logprobs_fwd_bwd on [16384, 151936] bf16 in place (default), or with NCU_OP=from_logits
GRPOLoss.from_logits on [16, 1025, 151936] bf16 in place (the GRPO mode of the kernel, as
timed by tune_fused_logits.py). The kernel setting is R1K_FUSED_CLUSTER's (e.g. "8,256,1" for
the persistent variant; "0" for the Triton kernels).

    ncu --kernel-name regex:fused_logits --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section SchedulerStats \\
        --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 benchmarks/ncu_fused_logits.py
"""
import os

import torch

import r1kernels

V = 151936
if os.environ.get("NCU_OP", "fwd_bwd") == "from_logits":
    B, T = 16, 1024
    full = torch.randn(B, T + 1, V, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), device="cuda")
    lp0 = -torch.rand(B, T, device="cuda") * 3
    old, ref = lp0 + 0.1 * torch.randn_like(lp0), lp0 + 0.1 * torch.randn_like(lp0)
    adv = torch.randn(B, device="cuda")
    mask = torch.rand(B, T, device="cuda") < 0.9
    loss_fn = r1kernels.GRPOLoss(loss_type="dapo", beta=0.04, epsilon_high=0.28,
                                 with_entropy=False)
    x = full[:, :-1].requires_grad_(True)
    for _ in range(4):
        out = loss_fn.from_logits(x, ids, mask, adv, old_logps=old, ref_logps=ref, inplace=True)
        torch.autograd.grad(out.loss, x)
else:
    N = 16384
    x = torch.randn(N, V, device="cuda").to(torch.bfloat16)
    y = torch.randint(0, V, (N,), device="cuda")
    glp, gent = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    for _ in range(4):
        r1kernels.token_logprobs_fwd_bwd(x, y, glp, grad_entropy=gent, with_entropy=True,
                                         inplace=True)
torch.cuda.synchronize()
