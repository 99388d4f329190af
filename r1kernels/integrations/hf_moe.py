"""Swap the MoE router and expert dispatch of transformers' DeepSeek-V3 and Qwen3-MoE for r1kernels ops.

    from r1kernels.integrations.hf_moe import apply_r1kernels_moe_to_deepseek_v3, RoutingReplay
    apply_r1kernels_moe_to_deepseek_v3(model)          # or (None): patch the classes, like Liger

What changes (transformers 5.x modeling_deepseek_v3.py / modeling_qwen3_moe.py):
- Router: `DeepseekV3TopkRouter.forward` (sigmoid, groups, e_score_correction_bias) and
  `Qwen3MoeTopKRouter.forward` (softmax) call `r1kernels.moe_route` on the same fp32 / native
  logits. Same selection (ties to the lower index instead of torch.topk's unspecified order),
  weights through the selected experts only in backward, and routing replay (below).
- Experts: `DeepseekV3Experts.forward` / `Qwen3MoeExperts.forward` dispatch with
  `moe_permute` (rows grouped by expert, deterministic), run each expert on its contiguous
  segment, and combine with `moe_unpermute` (fp32 accumulation) instead of one_hot / where /
  index_add_. One host sync per layer reads the segment offsets (as the eager loop's nonzero does).
- Qwen3MoeSparseMoeBlock.forward passes the [B, S, H] hidden states to the router, so the router
  knows the batch layout for replay.

Routing replay (RL: train on the experts the rollout chose):

    replay = RoutingReplay()
    with replay.record():
        out = model.generate(prompt_ids, ...)          # every router call appends its ids
    with replay.replay():
        logits = model(out).logits                     # the same experts, fresh weights and grads

Recorded ids are kept per router as [B, S_total, k]: decode steps are appended to the prefill;
a call on at least as many positions as recorded (generation without KV cache) replaces them. In replay, a router call on [B, S] tokens uses the recorded ids for the first
min(S, S_total) positions of every row and routes the rest (e.g. the last sampled token, which
generation never forwarded) normally. `replay.select(rows)` keeps a subset of the batch rows
for micro-batched updates; `replay.routing` / `RoutingReplay(routing)` move the ids around (for
example from a vLLM/sglang rollout that returns routed experts).
"""
from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch
import torch.nn.functional as F

from r1kernels.ops.moe import moe_permute, moe_route, moe_unpermute

__all__ = [
    "apply_r1kernels_moe_to_deepseek_v3",
    "apply_r1kernels_moe_to_qwen3_moe",
    "RoutingReplay",
]

_ACTIVE: Optional["RoutingReplay"] = None


class RoutingReplay:
    """Records the expert ids routers choose, and replays them. See the module docstring."""

    def __init__(self, routing: Optional[dict] = None):
        self.routing: dict[str, torch.Tensor] = dict(routing or {})  # router name -> [B, S, k] int32
        self.mode: Optional[str] = None
        self._cursor: dict[str, int] = {}

    @contextlib.contextmanager
    def _activate(self, mode: str):
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("RoutingReplay: another record/replay context is active")
        self.mode, _ACTIVE = mode, self
        self._cursor = {}
        try:
            yield self
        finally:
            self.mode, _ACTIVE = None, None

    def record(self):
        """Context: every patched router appends the ids it chose (clears earlier records)."""
        self.routing = {}
        return self._activate("record")

    def replay(self):
        """Context: every patched router uses the recorded ids (a missing router raises)."""
        return self._activate("replay")

    def select(self, rows) -> "RoutingReplay":
        """A RoutingReplay over a subset of the batch rows (an index tensor, list or slice)."""
        return RoutingReplay({name: ids[rows] for name, ids in self.routing.items()})

    # called by the patched routers --------------------------------------------------------------

    def _record(self, name: str, ids: torch.Tensor, batch_shape) -> None:
        B, S = batch_shape
        ids = ids.detach().to(torch.int32).view(B, S, -1)
        prev = self.routing.get(name)
        if prev is None or prev.shape[0] != B or (S > 1 and S >= prev.shape[1]):
            # a new sequence, or a call that re-runs it from position 0 (generation without KV cache)
            self.routing[name] = ids.clone()
        else:  # a decode step (or the next chunk) of the sequence recorded so far
            self.routing[name] = torch.cat([prev, ids], dim=1)

    def _replay_ids(self, name: str, fresh_ids: torch.Tensor, batch_shape) -> torch.Tensor:
        if name not in self.routing:
            raise KeyError(f"RoutingReplay: nothing recorded for router {name!r}")
        B, S = batch_shape
        rec = self.routing[name]
        if rec.shape[0] != B:
            raise ValueError(f"RoutingReplay: router {name!r} recorded {rec.shape[0]} rows, the update has {B} "
                             "(use replay.select(rows) for micro-batches)")
        # consecutive calls (e.g. gradient checkpointing recompute) restart at position 0 unless
        # they continue a chunked forward; a call covering the whole sequence always starts at 0
        start = self._cursor.get(name, 0)
        if start + S > rec.shape[1] or S >= rec.shape[1]:
            start = 0
        ids = fresh_ids.view(B, S, -1).clone()
        n = max(0, min(S, rec.shape[1] - start))
        ids[:, :n] = rec[:, start:start + n].to(device=ids.device, dtype=ids.dtype)
        self._cursor[name] = start + S
        return ids.view(B * S, -1)


def _router_name(module) -> str:
    return getattr(module, "_r1k_name", None) or f"router@{id(module):x}"


def _batch_shape(hidden_states: torch.Tensor):
    if hidden_states.dim() == 3:
        return hidden_states.shape[0], hidden_states.shape[1]
    return 1, hidden_states.shape[0]


def _route(module, router_logits, batch_shape, **kw):
    """moe_route with recording / replay of the active RoutingReplay."""
    active = _ACTIVE
    if active is not None and active.mode == "replay":
        with torch.no_grad():
            _, fresh = moe_route(router_logits.detach(), module.top_k, **kw)
        replay_ids = active._replay_ids(_router_name(module), fresh, batch_shape)
        return moe_route(router_logits, module.top_k, replay_ids=replay_ids, **kw)
    w, ids = moe_route(router_logits, module.top_k, **kw)
    if active is not None and active.mode == "record":
        active._record(_router_name(module), ids, batch_shape)
    return w, ids


# ---- replacement forwards ------------------------------------------------------------------------


def _deepseek_v3_router_forward(self, hidden_states):
    shape = _batch_shape(hidden_states)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = _route(self, router_logits, shape, score_func="sigmoid", n_group=self.num_group or 1,
                          topk_group=self.topk_group or 1, correction_bias=self.e_score_correction_bias,
                          norm_topk_prob=bool(self.norm_topk_prob),
                          routed_scaling_factor=float(self.routed_scaling_factor))
    return router_logits, weights, ids.long()


def _qwen3_moe_router_forward(self, hidden_states):
    shape = _batch_shape(hidden_states)
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, shape, score_func="softmax",
                          norm_topk_prob=bool(self.norm_topk_prob))
    return router_logits, weights.to(router_logits.dtype), ids.long()


def _qwen3_moe_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    _, routing_weights, selected_experts = self.gate(hidden_states)  # [B, S, H]: layout for replay
    out = self.experts(hidden_states.view(-1, hidden_dim), selected_experts, routing_weights)
    return out.reshape(batch_size, sequence_length, hidden_dim)


def _experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """Gated MLP experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) on permuted rows."""
    E = self.num_experts
    x, perm = moe_permute(hidden_states, top_k_index, E)
    bounds = perm.offsets.tolist()  # one host sync per layer
    outs = []
    for e in range(E):
        seg = x[bounds[e]:bounds[e + 1]]
        if seg.shape[0] == 0:
            continue
        gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)
        outs.append(F.linear(self.act_fn(gate) * up, self.down_proj[e]))
    expert_out = torch.cat(outs) if outs else x[:0]
    if expert_out.shape[0] < x.shape[0]:  # rows past offsets[E] (none when align == 1)
        expert_out = torch.cat([expert_out, x.new_zeros(x.shape[0] - expert_out.shape[0], x.shape[1])])
    return moe_unpermute(expert_out, perm, top_k_weights)


# ---- patch functions ----------------------------------------------------------------------------


def _patch(model, targets: dict, name_prefix: str) -> int:
    """Bind the replacement forwards on every module of the target classes in `model` (or on the
    classes themselves when model is None). Returns the number of modules/classes patched."""
    n = 0
    if model is None:
        for cls, fn in targets.items():
            cls.forward = fn
            n += 1
        return n
    for name, module in model.named_modules():
        fn = targets.get(type(module))
        if fn is not None:
            module.forward = types.MethodType(fn, module)
            module._r1k_name = f"{name_prefix}{name}"
            n += 1
    return n


def apply_r1kernels_moe_to_deepseek_v3(model=None, *, router: bool = True, experts: bool = True) -> int:
    """Patch DeepSeek-V3's router (moe_route: sigmoid, groups, bias, replay) and experts
    (moe_permute / moe_unpermute) in `model`, or in the transformers classes when model is None."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    targets = {}
    if router:
        targets[m.DeepseekV3TopkRouter] = _deepseek_v3_router_forward
    if experts:
        targets[m.DeepseekV3Experts] = _experts_forward
    return _patch(model, targets, "")


def apply_r1kernels_moe_to_qwen3_moe(model=None, *, router: bool = True, experts: bool = True) -> int:
    """Patch Qwen3-MoE's router (moe_route: softmax, replay) and experts (moe_permute /
    moe_unpermute) in `model`, or in the transformers classes when model is None."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m

    targets = {}
    if router:
        targets[m.Qwen3MoeTopKRouter] = _qwen3_moe_router_forward
        targets[m.Qwen3MoeSparseMoeBlock] = _qwen3_moe_block_forward
    if experts:
        targets[m.Qwen3MoeExperts] = _experts_forward
    return _patch(model, targets, "")
