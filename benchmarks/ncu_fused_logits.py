"""One launch of the fused logits kernel at the target shape (N=16384, V=151936 bf16, in place),
for Nsight Compute:

    ncu --kernel-name regex:fused_logits --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section SchedulerStats \\
        --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 benchmarks/ncu_fused_logits.py
"""
import torch

import r1kernels

N, V = 16384, 151936
x = torch.randn(N, V, device="cuda").to(torch.bfloat16)
y = torch.randint(0, V, (N,), device="cuda")
glp, gent = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
for _ in range(4):
    r1kernels.token_logprobs_fwd_bwd(x, y, glp, grad_entropy=gent, with_entropy=True, inplace=True)
torch.cuda.synchronize()
