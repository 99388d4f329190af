"""r1kernels: fused kernels for GRPO training. The public API is that of shared/API.md."""
from r1kernels import _custom_ops  # noqa: F401  (loads the extension, registers fake kernels)
from r1kernels.ops.group_advantages import group_advantages
from r1kernels.ops.moe import (MoEPermutation, moe_expert_counts, moe_permute, moe_route,
                               moe_sequence_aux_loss, moe_unpermute, moe_update_bias)

__version__ = "0.1.0"

__all__ = [
    "group_advantages",
    "MoEPermutation", "moe_route", "moe_permute", "moe_unpermute", "moe_expert_counts", "moe_update_bias",
    "moe_sequence_aux_loss",
]
