"""r1kernels: fused kernels for GRPO training. The public API is that of shared/API.md."""
from r1kernels import _custom_ops  # noqa: F401  (loads the extension, registers fake kernels)
from r1kernels.ops.group_advantages import group_advantages
from r1kernels.ops.grpo_loss import GRPOLossOutput, grpo_loss
from r1kernels.ops.linear_token_logprobs import linear_token_logprobs
from r1kernels.ops.token_logprobs import token_logprobs
from r1kernels.nn import GRPOLoss

__version__ = "0.1.0"

__all__ = ["group_advantages", "grpo_loss", "GRPOLoss", "GRPOLossOutput", "linear_token_logprobs",
           "token_logprobs"]
