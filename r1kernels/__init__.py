"""r1kernels: fused kernels for GRPO training. The public API: docs/api.md."""
from r1kernels import _custom_ops  # noqa: F401  (loads the extension, registers fake kernels)
from r1kernels.ops.decode_attention import decode_attention
from r1kernels.ops.group_advantages import group_advantages
from r1kernels.ops.grpo_loss import GRPOLossOutput, grpo_loss
from r1kernels.ops.linear_token_logprobs import linear_token_logprobs, linear_token_logprobs_fwd_bwd
from r1kernels.ops.moe import (MoEPermutation, moe_expert_counts, moe_permute, moe_route,
                               moe_sequence_aux_loss, moe_unpermute, moe_update_bias)
from r1kernels.ops.sample_tokens import sample_tokens
from r1kernels.ops.token_logprobs import token_logprobs, token_logprobs_fwd_bwd
from r1kernels.nn import GRPOLoss

__version__ = "0.1.0"

__all__ = [
    "group_advantages",
    "token_logprobs", "token_logprobs_fwd_bwd", "linear_token_logprobs",
    "linear_token_logprobs_fwd_bwd",
    "grpo_loss", "GRPOLoss", "GRPOLossOutput",
    "MoEPermutation", "moe_route", "moe_permute", "moe_unpermute", "moe_expert_counts", "moe_update_bias",
    "moe_sequence_aux_loss",
    "sample_tokens", "decode_attention",
]
