"""Loads the C++ extension and registers fake (meta) kernels for its ops.

The ops are defined in csrc/torch_bindings.cpp (`TORCH_LIBRARY(r1kernels, m)`). Fake kernels
here give them shapes without running, so they trace under torch.compile(fullgraph=True) and
pass `torch.library.opcheck`. Autograd formulas are registered by each op module in ops/.
"""
from __future__ import annotations

import torch

EXT_ERROR: str | None
try:
    from r1kernels import _C  # noqa: F401  (loading registers the ops)

    EXT_ERROR = None
except ImportError as exc:  # built without the extension, or a torch ABI mismatch
    EXT_ERROR = f"{type(exc).__name__}: {exc}"


def has_op(name: str) -> bool:
    return EXT_ERROR is None and hasattr(torch.ops.r1kernels, name)


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether the extension registered a `dispatch_key` ("CPU"/"CUDA") kernel for op `name`."""
    if not has_op(name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"r1kernels::{name}", dispatch_key)


def register_fake(name: str):
    """Decorator: register a fake kernel for r1kernels::name when the extension defines it."""

    def wrap(fn):
        if has_op(name):
            torch.library.register_fake(f"r1kernels::{name}")(fn)
        return fn

    return wrap


# ---- fake kernels ---------------------------------------------------------------------------


@register_fake("group_advantages")
def _group_advantages_fake(rewards, group_size, scale, eps):
    return torch.empty_like(rewards, dtype=torch.float32)


# token_logprobs tiles (csrc/token_logprobs/): they only write into their arguments.


@register_fake("logprob_tile_stats")
def _logprob_tile_stats_fake(x, labels, bias, state, out, col0, vocab, inv_temp, ignore_index,
                             accum, final, entropy, cap=0.0):
    return None


@register_fake("logprob_tile_grad")
def _logprob_tile_grad_fake(x, g, labels, bias, lse, ent, dlogp, dent, col0, inv_temp,
                            ignore_index, cap=0.0):
    return None


@register_fake("fused_logits_cluster")
def _fused_logits_cluster_fake(x, g, labels, out, glp, gent, adv, mask, old, ref, rw, scale,
                               inv_temp, ignore_index, entropy, loss, eps_lo, eps_hi, delta, beta,
                               bias_kl, tau_pos, tau_neg, cluster, threads, variant, cap=0.0):
    return None


@register_fake("grpo_loss_partials")
def _grpo_loss_partials_fake(logps, adv, mask, old, ref, rw, loss, seq, eps_lo, eps_hi, delta,
                             beta, bias_kl, tau_pos, tau_neg, write_grad):
    B, T = logps.shape
    grad = logps.new_empty((B, T) if write_grad else (0,), dtype=torch.float32)
    return grad, logps.new_empty(6, B, dtype=torch.float32)


@register_fake("grpo_loss_finalize")
def _grpo_loss_finalize_fake(part, nitems, loss, max_len):
    return part.new_empty(5, dtype=torch.float32), part.new_empty(part.shape[-1], dtype=torch.float32)


# MoE (csrc/moe/): shapes only; see r1kernels/ops/moe.py for the semantics.


@register_fake("moe_route")
def _moe_route_fake(logits, top_k, score_func, n_group, topk_group, bias, norm, scale, replay_ids):
    T = logits.shape[0]
    w = logits.new_empty(T, top_k, dtype=torch.float32)
    return w, logits.new_empty(T, top_k, dtype=torch.int32), torch.empty_like(w), logits.new_empty(T, dtype=torch.float32)


@register_fake("moe_route_backward")
def _moe_route_backward_fake(gs, ids, sel, logits, lse, num_experts, dtype, score_func):
    return gs.new_empty(gs.shape[0], num_experts, dtype=dtype)


@register_fake("moe_permute")
def _moe_permute_fake(hidden, ids, num_experts, align):
    T, K = ids.shape
    R = T * K + num_experts * (align - 1)
    i32 = torch.int32
    return (hidden.new_empty(R, hidden.shape[1]), ids.new_empty(num_experts, dtype=i32),
            ids.new_empty(num_experts + 1, dtype=i32), ids.new_empty(T, K, dtype=i32), ids.new_empty(R, dtype=i32))


@register_fake("moe_scatter_rows")
def _moe_scatter_rows_fake(x, row_ids, token_ids, counts, offsets, weights):
    return x.new_empty(token_ids.shape[0], x.shape[1])


@register_fake("moe_unpermute")
def _moe_unpermute_fake(src, row_ids, weights):
    return src.new_empty(row_ids.shape[0], src.shape[1])


@register_fake("moe_rows_dot")
def _moe_rows_dot_fake(gy, src, row_ids):
    return gy.new_empty(row_ids.shape, dtype=torch.float32)


@register_fake("sample_tokens")
def _sample_tokens_fake(logits, uniforms, temperature, top_k, top_p, min_p):
    B = logits.shape[0]
    return logits.new_empty(B, dtype=torch.int64), logits.new_empty(B, dtype=torch.float32)


@register_fake("sample_tokens_params")
def _sample_tokens_params_fake(logits, uniforms, params):
    B = logits.shape[0]
    return logits.new_empty(B, dtype=torch.int64), logits.new_empty(B, dtype=torch.float32)


@register_fake("decode_attention")
def _decode_attention_fake(q, k, v, kv_len, mask, scale, kv_start=None):
    return q.new_empty(q.shape)
