"""Swap the MoE routers and expert dispatch of transformers (5.x) models for r1kernels ops.

    from r1kernels.integrations.hf_moe import apply_r1kernels_moe, RoutingReplay
    n = apply_r1kernels_moe(model)       # chooses by config.model_type; returns the modules patched
    apply_r1kernels_moe_to_qwen3_moe()   # per family; model=None patches the classes (before loading)

What changes:
- Router: the family's router forward calls `r1kernels.moe_route` on the same logits (same
  dtype, same bias, groups, normalization and scaling as the modeling code), and returns what the
  original returns (router logits - so `output_router_logits` and the family's load-balancing
  loss see the same values -, weights, int64 ids). Same selection except ties (to the lower index
  instead of torch.topk's unspecified order); gradients reach the router through the selected
  weights only, as in the modeling code; routing replay (below).
- Experts: through transformers' own `experts_implementation` switch: this module registers
  "r1kernels" in transformers' `ALL_EXPERTS_FUNCTIONS` (moe_permute: rows grouped by expert,
  deterministic; each expert on its contiguous segment; moe_unpermute: fp32 accumulation; one
  host sync per layer reads the segment offsets), and the patch calls
  `model.set_experts_implementation("r1kernels")`. It replaces the user's choice: a choice other
  than transformers' defaults ("eager", "grouped_mm") gets a warning; `experts=False` keeps it
  (the router patch works with every experts implementation), and
  `model.set_experts_implementation(...)` switches back at any time. Also selectable directly:
  `from_pretrained(..., experts_implementation="r1kernels")` once this module is imported.

Families (transformers 5.25; `FAMILIES` maps model_type -> router classes; each is tested on a
tiny model from its config against the unpatched model in tests/test_moe_integration.py):
    DeepSeek-style sigmoid + e_score_correction_bias + groups, norm (+1e-20), scaling factor:
        deepseek_v3, deepseek_v32, glm4_moe (GLM-4.5/4.6), glm4_moe_lite, glm_moe_dsa, dots1,
        solar_open, exaone_moe, mimo_v2_flash; kimi_k25 (Kimi-K2.5: its text model is DeepSeek-V3);
        afmoe and minimax_m2 (no groups; the bias comes from the block: expert_bias /
        e_score_correction_bias)
    DeepSeek-V4: sqrt(softplus) + bias, norm, scaling; the hash-routed first layers take their ids
        from tid2eid[input_ids] (moe_route replay_ids), recorded and replayed like the others
    softmax top-k (norm_topk_prob where the family has it): qwen2_moe, qwen3_moe, qwen3_next,
        qwen3_5_moe / qwen3_5_moe_text, olmoe, flex_olmo, mixtral, minimax, hunyuan_v1_moe
    softmax over the top-k logits (= softmax + norm): gpt_oss (router bias in the logits),
        granitemoe, granitemoeshared, granitemoehybrid
    Gemma-4 (gemma4, gemma4_text): normalized, scaled router input, softmax + norm, then
        per_expert_scale (moe_route expert_scale)
Left as they are: phimoe (sparsemixer: a sampled, masked top-2), ernie4_5_moe / ernie4_5_vl_moe
(select on moe_statics-corrected scores, clamp the normalizer at norm_min), lfm2_moe (normalizer
+ 1e-6), longcat_flash (no normalization, zero-computation experts), dbrx (its router returns
logits only; the block normalizes by a p-norm), llama4 (sigmoid of the top-k logits scattered
into [T, E] scores); multimodal wrappers whose text routers have the shapes above (qwen3_vl_moe,
qwen3_omni_moe, glm4v_moe) are not in FAMILIES because no test here builds them.

Routing replay (RL: train on the experts the rollout chose):

    replay = RoutingReplay()
    with replay.record():
        out = model.generate(prompt_ids, ...)          # every router call appends its ids
    with replay.replay():
        logits = model(out).logits                     # the same experts, fresh weights and grads

Routers are named by their module path in the model ("model.layers.3.mlp.gate"), so a recording
replays on any copy of the model (another process, a reloaded checkpoint); with the class-level
patch the names are set when a model of the family is created (the family's PreTrainedModel
post_init). Recorded ids are kept per router as [B, S_total, k]: decode steps are appended to
the prefill; a call on at least as many positions as recorded (generation without KV cache)
replaces them. In replay, a router call on [B, S] tokens uses the recorded ids for the first
min(S, S_total) positions of every row and routes the rest (e.g. the last sampled token, which
generation never forwarded) normally. The batch layout [B, S] comes from the model's input_ids
(or inputs_embeds), read by a forward pre-hook on the patched model. `replay.select(rows)` keeps a
subset of the batch rows for micro-batched updates; `replay.routing` / `RoutingReplay(routing)`
move the ids around (for example from a vLLM/sglang rollout that returns routed experts).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from r1kernels.ops.moe import moe_permute, moe_route, moe_unpermute

_ACTIVE: Optional["RoutingReplay"] = None
_BATCH: Optional[tuple[int, int]] = None  # [B, S] of the running model's input (the pre-hook)
EXPERTS_IMPLEMENTATION = "r1kernels"


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


def _batch_shape(hidden_states: torch.Tensor) -> tuple[int, int]:
    if hidden_states.dim() == 3:
        return hidden_states.shape[0], hidden_states.shape[1]
    T = hidden_states.numel() // max(hidden_states.shape[-1], 1)
    if _BATCH is not None and _BATCH[0] * _BATCH[1] == T:
        return _BATCH
    return 1, T


def _batch_hook(module, args, kwargs):
    """Forward pre-hook on the patched model: remember [B, S] of its input for the routers."""
    global _BATCH
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    _BATCH = tuple(x.shape[:2]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def _route(module, router_logits, batch_shape, top_k, fixed_ids=None, **kw):
    """moe_route with recording / replay of the active RoutingReplay. fixed_ids: ids the model
    chooses by itself (hash routing), routed through replay_ids."""
    active = _ACTIVE
    if active is None:
        return moe_route(router_logits, top_k, replay_ids=fixed_ids, **kw)
    name = getattr(module, "_r1k_name", None)
    if name is None:
        raise RuntimeError(f"RoutingReplay: this {type(module).__name__} has no name: patch the model with "
                           "apply_r1kernels_moe(model), or patch the classes before creating the model")
    if active.mode == "replay":
        fresh = fixed_ids
        if fresh is None:
            with torch.no_grad():
                _, fresh = moe_route(router_logits.detach(), top_k, **kw)
        replay_ids = active._replay_ids(name, fresh, batch_shape)
        return moe_route(router_logits, top_k, replay_ids=replay_ids, **kw)
    w, ids = moe_route(router_logits, top_k, replay_ids=fixed_ids, **kw)
    active._record(name, ids, batch_shape)
    return w, ids


# ---- replacement router forwards ----------------------------------------------------------------


def _deepseek_router_forward(self, hidden_states):
    """DeepseekV3TopkRouter and its copies (GLM-4.5, dots1, ...): fp32 logits, sigmoid, groups, bias."""
    shape = _batch_shape(hidden_states)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = _route(self, router_logits, shape, self.top_k, score_func="sigmoid",
                          n_group=self.num_group or 1, topk_group=self.topk_group or 1,
                          correction_bias=self.e_score_correction_bias,
                          norm_topk_prob=bool(self.norm_topk_prob),
                          routed_scaling_factor=float(self.routed_scaling_factor))
    return router_logits, weights, ids.long()


def _afmoe_router_forward(self, hidden_states, expert_bias):
    """AfmoeTokenChoiceRouter: fp32 logits, sigmoid, the block's expert_bias selects, norm (+1e-20),
    route_scale."""
    shape = _batch_shape(hidden_states)
    router_logits = self.gate(hidden_states.view(-1, hidden_states.shape[-1])).to(torch.float32)
    weights, ids = _route(self, router_logits, shape, self.top_k, score_func="sigmoid", correction_bias=expert_bias,
                          norm_topk_prob=True, routed_scaling_factor=float(self.route_scale))
    return router_logits, weights, ids.long()


def _minimax_m2_router_forward(self, hidden_states, e_score_correction_bias):
    """MiniMaxM2TopKRouter: sigmoid of the fp32 logits, the block's bias selects, norm (the plain
    sum there; + 1e-20 here, the same unless the chosen scores add up to under ~1e-13)."""
    shape = _batch_shape(hidden_states)
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.to(self.weight.dtype), self.weight)
    weights, ids = _route(self, router_logits, shape, self.top_k, score_func="sigmoid",
                          correction_bias=e_score_correction_bias, norm_topk_prob=True)
    return router_logits, weights, ids.long()


def _softmax_router(norm: Optional[bool], cast: bool) -> Callable:
    """Qwen/OLMoE/Mixtral-style router: softmax, top-k, renormalized when `norm` (None: the
    module's norm_topk_prob), weights cast to the logits' dtype when `cast`."""

    def forward(self, hidden_states):
        shape = _batch_shape(hidden_states)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        weights, ids = _route(self, router_logits, shape, self.top_k, score_func="softmax",
                              norm_topk_prob=bool(self.norm_topk_prob) if norm is None else norm)
        return router_logits, (weights.to(router_logits.dtype) if cast else weights), ids.long()

    return forward


def _gpt_oss_router_forward(self, hidden_states):
    """GptOssTopKRouter: top-k of the logits (router bias included), softmax over those k =
    softmax over all experts renormalized over the k."""
    shape = _batch_shape(hidden_states)
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    weights, ids = _route(self, router_logits, shape, self.top_k, score_func="softmax", norm_topk_prob=True)
    return router_logits, weights.to(router_logits.dtype), ids.long()


def _granitemoe_router_forward(self, hidden_states):
    """GraniteMoeTopKRouter: fp32 logits, softmax over the top-k logits, weights in the input's dtype."""
    shape = _batch_shape(hidden_states)
    router_logits = F.linear(hidden_states, self.weight).float()
    weights, ids = _route(self, router_logits, shape, self.top_k, score_func="softmax", norm_topk_prob=True)
    return router_logits, weights.type_as(hidden_states), ids.long()


def _hunyuan_router_forward(self, hidden_states):
    """HunYuanMoEV1Gate: logits of the wg linear (fp32 input when wg is fp32), softmax + norm."""
    shape = _batch_shape(hidden_states)
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    if self.wg.weight.dtype == torch.float32:
        hidden_states = hidden_states.float()
    router_logits = self.wg(hidden_states)
    weights, ids = _route(self, router_logits, shape, self.top_k, score_func="softmax", norm_topk_prob=True)
    return router_logits, weights.to(router_logits.dtype), ids.long()


_SCORE_OF_ACT = {"SqrtSoftplusActivation": "sqrtsoftplus", "Sigmoid": "sigmoid", "SigmoidActivation": "sigmoid"}


def _v4_score(self) -> str:
    name = type(self.score_fn).__name__
    if name not in _SCORE_OF_ACT:
        raise ValueError(f"r1kernels: DeepSeek-V4 router's score_fn {name} has no moe_route "
                         "score_func (it takes sqrtsoftplus, sigmoid and softmax)")
    return _SCORE_OF_ACT[name]


def _deepseek_v4_router_forward(self, hidden_states):
    """DeepseekV4TopKRouter: sqrt(softplus) (config.scoring_func) + bias, norm (+1e-20), scaling."""
    shape = _batch_shape(hidden_states)
    router_logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    weights, ids = _route(self, router_logits, shape, self.top_k, score_func=_v4_score(self),
                          correction_bias=self.e_score_correction_bias, norm_topk_prob=True,
                          routed_scaling_factor=float(self.routed_scaling_factor))
    return router_logits, weights.to(router_logits.dtype), ids.long()


def _deepseek_v4_hash_router_forward(self, hidden_states, input_ids):
    """DeepseekV4HashRouter: the ids are tid2eid[input_ids] (moe_route replay_ids), the weights the
    renormalized scores of those experts."""
    shape = _batch_shape(hidden_states)
    router_logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    fixed = self.tid2eid[input_ids.reshape(-1)]
    weights, ids = _route(self, router_logits, shape, self.top_k, fixed_ids=fixed, score_func=_v4_score(self),
                          norm_topk_prob=True, routed_scaling_factor=float(self.routed_scaling_factor))
    return router_logits, weights.to(router_logits.dtype), ids.long()


def _gemma4_router_forward(self, hidden_states):
    """Gemma4TextRouter: RMS-normalized input times scale / sqrt(H), softmax, top-k, norm, then
    per_expert_scale (moe_route expert_scale). Returns the full softmax like the original."""
    shape = _batch_shape(hidden_states)
    hidden_states = self.norm(hidden_states) * self.scale * self.scalar_root_size
    expert_scores = self.proj(hidden_states)
    probs = F.softmax(expert_scores, dim=-1, dtype=torch.float32)
    weights, ids = _route(self, expert_scores.reshape(-1, expert_scores.shape[-1]), shape, self.config.top_k_experts,
                          score_func="softmax", norm_topk_prob=True, expert_scale=self.per_expert_scale)
    return probs, weights, ids.long()


# ---- experts (transformers' experts_implementation "r1kernels") --------------------------------


def _expert_linear(x, weight, bias, transposed):
    y = x @ weight if transposed else F.linear(x, weight)
    return y if bias is None else y + bias


def r1kernels_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts of any layout transformers' `@use_experts_implementation` describes (gate_up or
    up only, [out, in] or transposed weights, biases, post-expert norm, the class's own gate) on
    the rows moe_permute groups by expert; combined by moe_unpermute. Expert ids must be in
    [0, num_experts) (IndexError otherwise): expert parallelism's sentinel ids are not handled."""
    E = self.num_experts
    x, perm = moe_permute(hidden_states, top_k_index, E)
    bounds = perm.offsets.tolist()  # one host sync per layer
    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    outs = []
    for e in range(E):
        seg = x[bounds[e]:bounds[e + 1]]
        if seg.shape[0] == 0:
            continue
        h = _expert_linear(seg, up[e], up_bias[e] if up_bias is not None else None, self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = _expert_linear(h, self.down_proj[e], self.down_proj_bias[e] if self.has_bias else None,
                           self.is_transposed)
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        outs.append(h)
    expert_out = torch.cat(outs) if outs else x[:0]
    if expert_out.shape[0] < x.shape[0]:  # rows past offsets[E] (none when align == 1)
        expert_out = torch.cat([expert_out, x.new_zeros(x.shape[0] - expert_out.shape[0], x.shape[1])])
    return moe_unpermute(expert_out, perm, top_k_weights)


def _register_experts_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, r1kernels_experts_forward)


_register_experts_implementation()


# ---- families -------------------------------------------------------------------------------------

_DEEPSEEK = "deepseek"
# model_type -> (modeling module, {router class name: replacement forward})
FAMILIES: dict[str, tuple[str, dict[str, Callable]]] = {
    "deepseek_v3": ("deepseek_v3", {"DeepseekV3TopkRouter": _deepseek_router_forward}),
    "deepseek_v32": ("deepseek_v32", {"DeepseekV32TopkRouter": _deepseek_router_forward}),
    "deepseek_v4": ("deepseek_v4", {"DeepseekV4TopKRouter": _deepseek_v4_router_forward,
                                    "DeepseekV4HashRouter": _deepseek_v4_hash_router_forward}),
    "glm4_moe": ("glm4_moe", {"Glm4MoeTopkRouter": _deepseek_router_forward}),
    "glm4_moe_lite": ("glm4_moe_lite", {"Glm4MoeLiteTopkRouter": _deepseek_router_forward}),
    "glm_moe_dsa": ("glm_moe_dsa", {"GlmMoeDsaTopkRouter": _deepseek_router_forward}),
    "dots1": ("dots1", {"Dots1TopkRouter": _deepseek_router_forward}),
    "solar_open": ("solar_open", {"SolarOpenTopkRouter": _deepseek_router_forward}),
    "exaone_moe": ("exaone_moe", {"ExaoneMoeTopkRouter": _deepseek_router_forward}),
    "mimo_v2_flash": ("mimo_v2_flash", {"MiMoV2FlashTopkRouter": _deepseek_router_forward}),
    "qwen2_moe": ("qwen2_moe", {"Qwen2MoeTopKRouter": _softmax_router(None, True)}),
    "qwen3_moe": ("qwen3_moe", {"Qwen3MoeTopKRouter": _softmax_router(None, True)}),
    "qwen3_next": ("qwen3_next", {"Qwen3NextTopKRouter": _softmax_router(None, True)}),
    "qwen3_5_moe": ("qwen3_5_moe", {"Qwen3_5MoeTopKRouter": _softmax_router(True, True)}),
    "olmoe": ("olmoe", {"OlmoeTopKRouter": _softmax_router(None, True)}),
    "flex_olmo": ("flex_olmo", {"FlexOlmoTopKRouter": _softmax_router(None, True)}),
    "mixtral": ("mixtral", {"MixtralTopKRouter": _softmax_router(True, False)}),
    "minimax": ("minimax", {"MiniMaxTopKRouter": _softmax_router(True, False)}),
    "gpt_oss": ("gpt_oss", {"GptOssTopKRouter": _gpt_oss_router_forward}),
    "granitemoe": ("granitemoe", {"GraniteMoeTopKRouter": _granitemoe_router_forward}),
    "granitemoeshared": ("granitemoeshared", {"GraniteMoeSharedTopKRouter": _granitemoe_router_forward}),
    "granitemoehybrid": ("granitemoehybrid", {"GraniteMoeHybridTopKRouter": _granitemoe_router_forward}),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", {"HunYuanMoEV1Gate": _hunyuan_router_forward}),
    "gemma4": ("gemma4", {"Gemma4TextRouter": _gemma4_router_forward}),
    "afmoe": ("afmoe", {"AfmoeTokenChoiceRouter": _afmoe_router_forward}),
    "minimax_m2": ("minimax_m2", {"MiniMaxM2TopKRouter": _minimax_m2_router_forward}),
}
# model types whose routers live in another family's modeling code
ALIASES = {"qwen3_5_moe_text": "qwen3_5_moe", "gemma4_text": "gemma4", "kimi_k25": "deepseek_v3"}


def _module(family: str):
    return importlib.import_module(f"transformers.models.{FAMILIES[family][0]}.modeling_{FAMILIES[family][0]}")


def _router_classes(family: str) -> dict[type, Callable]:
    m = _module(family)
    return {getattr(m, name): fn for name, fn in FAMILIES[family][1].items()}


def families_of(config) -> list[str]:
    """The families of a config and of its sub-configs (text_config of multimodal models)."""
    out = []
    types_ = [getattr(config, "model_type", None)]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        types_.append(getattr(sub, "model_type", None))
    for t in types_:
        fam = ALIASES.get(t, t)
        if fam in FAMILIES and fam not in out:
            out.append(fam)
    return out


def _use_experts_implementation(model) -> int:
    """model.set_experts_implementation("r1kernels"); the number of experts modules it reaches."""
    current = getattr(model.config, "_experts_implementation", None)
    if current not in (None, "eager", "grouped_mm", EXPERTS_IMPLEMENTATION):
        warnings.warn(f"apply_r1kernels_moe: experts_implementation={current!r} is replaced by "
                      f"{EXPERTS_IMPLEMENTATION!r}; pass experts=False to keep it (the router patch works with "
                      "every experts implementation)", stacklevel=3)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return sum(1 for mod in model.modules() if hasattr(mod, "is_transposed") and hasattr(mod, "has_gate"))


def _patch_model(model, targets: dict[type, Callable], experts: bool, bind: bool) -> int:
    """Name the routers by module path, hook the batch layout, bind the forwards (bind=False when
    the classes carry them) and switch the experts. Returns the number of modules patched."""
    n = 0
    for name, module in model.named_modules():
        fn = targets.get(type(module))
        if fn is not None:
            if bind:
                module.forward = types.MethodType(fn, module)
            module._r1k_name = name
            n += 1
    if not getattr(model, "_r1k_batch_hook", False):
        model.register_forward_pre_hook(_batch_hook, with_kwargs=True)
        model._r1k_batch_hook = True
    if experts:
        n += _use_experts_implementation(model)
    return n


def _patch_classes(families: list[str], router: bool, experts: bool) -> int:
    """Class-level patch: the router classes' forward, and the families' PreTrainedModel.post_init
    (names, batch hook, experts implementation of every model created afterwards)."""
    from transformers import PreTrainedModel

    n = 0
    for fam in families:
        targets = _router_classes(fam) if router else {}
        for cls, fn in targets.items():
            cls.forward = fn
            n += 1
        m = _module(fam)
        for obj in vars(m).values():
            if isinstance(obj, type) and obj.__name__.endswith("PreTrainedModel") and issubclass(obj, PreTrainedModel) \
                    and obj.__module__ == m.__name__ and not getattr(obj.post_init, "_r1k_patched", False):
                obj.post_init = _post_init(obj.post_init, _router_classes(fam), router, experts)
            if experts and isinstance(obj, type) and obj.__name__.endswith("Experts") \
                    and hasattr(obj.forward, "__wrapped__"):
                n += 1
    return n


def _post_init(orig, targets, router: bool, experts: bool):
    @functools.wraps(orig)
    def post_init(self):
        orig(self)
        _patch_model(self, targets if router else {}, experts, bind=False)

    post_init._r1k_patched = True
    return post_init


def apply_r1kernels_moe(model=None, *, router: bool = True, experts: bool = True,
                        model_type: Optional[str] = None) -> int:
    """Patch the MoE routers (moe_route, routing replay) and experts (experts_implementation
    "r1kernels") of `model`, chosen by config.model_type (and its sub-configs' model types, e.g.
    Kimi-K2.5's DeepSeek-V3 text model). With model=None, patch the classes of `model_type`
    (every model of that family created afterwards). Returns the number of modules patched
    (classes with model=None). ValueError for a model type no family covers (see FAMILIES)."""
    if model is None:
        fam = ALIASES.get(model_type, model_type)
        if fam not in FAMILIES:
            raise ValueError(f"apply_r1kernels_moe: model_type must be one of {sorted(FAMILIES) + sorted(ALIASES)} "
                             f"with model=None, got {model_type!r}")
        return _patch_classes([fam], router, experts)
    config = getattr(model, "config", None)
    families = families_of(config) if config is not None else []
    if not families:
        raise ValueError(f"apply_r1kernels_moe: no r1kernels patch for model_type "
                         f"{getattr(config, 'model_type', None)!r} (covered: {sorted(FAMILIES) + sorted(ALIASES)})")
    targets = {}
    if router:
        for fam in families:
            targets.update(_router_classes(fam))
    return _patch_model(model, targets, experts, bind=True)


def _family_patch(family: str):
    def apply(model=None, *, router: bool = True, experts: bool = True) -> int:
        if model is None:
            return _patch_classes([family], router, experts)
        targets = _router_classes(family) if router else {}
        return _patch_model(model, targets, experts, bind=True)

    apply.__name__ = apply.__qualname__ = f"apply_r1kernels_moe_to_{family}"
    apply.__doc__ = (f"apply_r1kernels_moe for the {family} family: `model`, or the classes when model is None. "
                     "Returns the number of modules (classes) patched.")
    return apply


for _fam in FAMILIES:
    globals()[f"apply_r1kernels_moe_to_{_fam}"] = _family_patch(_fam)

__all__ = ["apply_r1kernels_moe", "RoutingReplay", "FAMILIES", "families_of", "r1kernels_experts_forward"] + [
    f"apply_r1kernels_moe_to_{f}" for f in FAMILIES]
