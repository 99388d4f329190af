"""FSDP2 for the trainer (`--fsdp true` under torchrun): the engine's own `fully_shard`, applied
the way torchtitan does, plus the two things a GRPO trainer adds.

- Sharding: every decoder layer, then the root (the causal LM: embeddings, final norm, lm_head,
  tied or not) with `reshard_after_forward=True`, so outside a forward every parameter is a
  `Shard(0)` DTensor: weights, gradients and AdamW's states are 1/N per rank. Gradients are
  summed, not averaged (divide factor 1 on every group): the trainer divides the loss by the
  token count of the whole global batch, so N processes compute the gradient 1 process would.
- The update: `hidden_states` runs the decoder as a forward method of the root (FSDP gathers
  the root's parameters around it, each layer's around the layer), and the lm_head goes to
  r1kernels' loss as the sharded DTensor it is after that forward: the loss gathers it and its
  gradient comes back reduce-scattered, summed with the tied embedding's.
- Rollout (`gathered`): the whole model is unsharded once (one all-gather per FSDP group) and
  kept unsharded while generating, then resharded: a decode step then runs no collective, so
  ranks may run different numbers of decode steps and batches (their completions end at
  different lengths), which FSDP's per-forward gathers would deadlock on. Cost: the full
  weights (the unsharded parameters, e.g. 2 bytes x parameters in bf16) on every rank during
  rollout, on top of the shards; the KV cache is the rollout's either way.
- Micro-batches: every forward and backward runs collectives, so every rank runs the same
  number of micro-batches (`pad_micro_batches`: ranks with fewer add empty ones that contribute
  zero).
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.distributed as dist

from r1kernels.distributed import is_dtensor  # noqa: F401  (re-exported for the trainer)


def _hidden(self, input_ids, attention_mask):
    from r1train.model import decoder_of

    return decoder_of(self)(input_ids=input_ids, attention_mask=attention_mask,
                            use_cache=False).last_hidden_state


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_model(model, *, activation_checkpointing: bool, mesh=None):
    """fully_shard every decoder layer, then the root; gradients summed over ranks. Activation
    checkpointing (per decoder layer, transformers' own) is turned on first when asked."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from r1train.model import decoder_of

    if activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) \
            or model.gradient_checkpointing_enable
        enable()
    for layer in decoder_of(model).layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for m in fsdp_modules(model):  # a plain SUM reduce-scatter (gloo has no PREMUL_SUM)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    model.r1k_hidden = types.MethodType(_hidden, model)
    register_fsdp_forward_method(model, "r1k_hidden")
    return model


def hidden_states(model, input_ids, attention_mask):
    """The last hidden states [B, L, H] of a sharded model (the decoder, no lm_head)."""
    return model.r1k_hidden(input_ids, attention_mask)


@contextlib.contextmanager
def gathered(model):
    """The whole model unsharded for the duration (rollout): see the module docstring. FSDP's
    forward hooks are lifted meanwhile: with every parameter unsharded and no gradient they have
    nothing to do, and they are functions torch.compile does not trace, so the compiled decode
    step (`--rollout_compile`) runs the model as one graph; an eager step skips their Python."""
    mods = fsdp_modules(model)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    lifted = [_lift_forward_hooks(m) for m in mods]
    try:
        yield model
    finally:
        for m, hooks in zip(mods, lifted):
            _restore_forward_hooks(m, hooks)
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def _lift_forward_hooks(m) -> list:
    """Take FSDP's own pre- and post-forward hooks off module m (a user's hooks stay). FSDP
    keeps their handles in its private state: a torch that names them otherwise keeps the hooks
    (the rollout then runs them, and a compiled step falls back to eager with a warning)."""
    state = m._get_fsdp_state()
    out = []
    for handle, table, kw_table, first in (
            (getattr(state, "_pre_forward_hook_handle", None), m._forward_pre_hooks,
             m._forward_pre_hooks_with_kwargs, True),
            (getattr(state, "_post_forward_hook_handle", None), m._forward_hooks,
             m._forward_hooks_with_kwargs, False)):
        hid = getattr(handle, "id", None)
        if hid is not None and hid in table:
            out.append((table, kw_table, hid, table.pop(hid), kw_table.pop(hid, None), first))
    return out


def _restore_forward_hooks(m, lifted: list) -> None:
    for table, kw_table, hid, hook, kw, first in lifted:
        table[hid] = hook
        table.move_to_end(hid, last=not first)  # FSDP's pre-hook runs first, its post-hook last
        if kw is not None:
            kw_table[hid] = kw


def pad_micro_batches(n_mine: int, device) -> int:
    """How many empty micro-batches this rank adds so that every rank runs as many."""
    t = torch.tensor([n_mine], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t) - n_mine
