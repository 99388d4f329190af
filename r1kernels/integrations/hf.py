"""One call puts r1kernels' lm_head into a Hugging Face causal LM: no [B, L, V] logits.

    from r1kernels.integrations.hf import apply_r1kernels, remove_r1kernels
    apply_r1kernels(model)                       # patches this instance's forward only
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    out.loss                                     # HF's causal-LM loss, by the fused NLL
    out = model(input_ids, attention_mask=attention_mask, labels=labels,
                return_token_logprobs=True, temperature=0.7)
    out.token_logprobs, out.entropy              # [B, L - 1] fp32, see below
    remove_r1kernels(model)                      # the original forward again

Works for any decoder-only model whose output embedding (`get_output_embeddings()`) is a
`torch.nn.Linear`, tied to the input embedding or not: the backbone (`model.base_model`) runs as
usual (gradient checkpointing, attention implementation, MoE router outputs), then the head runs
through `r1kernels.linear_token_logprobs` on the labelled positions only. A PEFT model may be
passed (its base model is patched; adapters on the backbone train as usual; an adapter on
lm_head itself is refused, since the head's weight is read directly). Under FSDP2 the head's
DTensor weight is passed to the ops as it is.

Calls, after `apply_r1kernels(model)`:
  - without `labels` / `shift_labels` (and without `return_token_logprobs`): the original forward
    (logits, generation unchanged).
  - `labels [B, L]`: `loss` equals HF's `ForCausalLMLoss` on the model's own logits: the labels
    are shifted (position t predicts labels[:, t + 1]; or pass HF's pre-shifted `shift_labels`),
    `ignore_index` (-100) positions are left out, the reduction is the mean over the labelled
    positions, or the sum divided by `num_items_in_batch` when given (all positions ignored
    without num_items_in_batch: NaN, as HF's mean). MoE models add `router_aux_loss_coef *
    aux_loss` when router logits are requested, as HF does. When gradients are needed the loss's
    forward pass also computes them (linear_token_logprobs_fwd_bwd: one sweep of the
    vocabulary); backward then only scales them (a second backward through the same graph is
    refused). `logits` is None: they are never built.
  - `return_token_logprobs=True` (with `labels`): also `token_logprobs` and `entropy`, fp32
    [B, L - 1] (the alignment of TRL's fused head, HF's loss and `logits[:, :-1]` against
    `labels[:, 1:]`): `token_logprobs[:, t] = log softmax(logits[:, t] / temperature)
    [labels[:, t + 1]]` and `entropy[:, t]` the entropy of that distribution; both 0 where the
    label is ignore_index, both differentiable. With `shift_labels` they are [B, L], aligned
    with shift_labels. `loss` is then -sum(token_logprobs) / (labelled positions or
    num_items_in_batch), at the given temperature (default `apply_r1kernels`'s, 1.0).
    TRL's `fused_lm_head=True` is accepted as a synonym, with `log_probs` as an alias of
    `token_logprobs` (TRL 1.16 trainers call their models that way).
  - `lm_head_fn=f` (with `labels`): `head_output = f(hidden, weight, bias, labels)` with the
    head's inputs after the shift (hidden [B, L - 1, H] in the dtype the head runs in), for a
    custom fused loss such as `r1kernels.GRPOLoss`; nothing else is computed from the head.
Heads that transform their logits (`head_transform`: read from the config as TRL 1.16 and
transformers' modeling code read them): Gemma's `final_logit_softcapping` (softcap), Cohere's
`logit_scale`, Granite's `logits_scaling` (the logits are divided by it), Falcon-H1's
`lm_head_multiplier`, Muse's `output_multiplier`: passed to the ops as `softcap=` and
`logit_scale=`.
Dtypes: under autocast the head runs in the autocast dtype (as `lm_head(hidden)` would), products
accumulated in fp32 and never rounded to bf16 logits; without autocast hidden is cast to the
weight's dtype; `cast_lm_head_to_fp32=True` runs it in fp32.
"""
from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass

import torch

from r1kernels.nn import _scale_by_
from r1kernels.ops.linear_token_logprobs import linear_token_logprobs, linear_token_logprobs_fwd_bwd

try:
    from transformers.utils import ModelOutput
except ImportError:  # (transformers is only needed to build the models this patches)
    ModelOutput = object

__all__ = ["apply_r1kernels", "remove_r1kernels", "head_transform", "R1KCausalLMOutput"]


@dataclass
class R1KCausalLMOutput(ModelOutput):
    """Output of a patched model called with labels (see the module docstring)."""

    loss: torch.Tensor | None = None
    token_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    head_output: object = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple | None = None
    logits: None = None

    @property
    def log_probs(self):
        """TRL's name for token_logprobs."""
        return self.token_logprobs


def head_transform(config) -> dict:
    """The `softcap` / `logit_scale` keywords of the ops for a model config (only those that
    differ from the identity). Read as TRL 1.16's fused head reads them, which is what
    transformers 5.25's modeling code does with them (Gemma-2/3/3n/4, VaultGemma, nanochat:
    final_logit_softcapping; Cohere 1/2: times logit_scale; Granite*, MiniCPM3: divided by
    logits_scaling, HyperCLOVA X: times it; Falcon-H1: times lm_head_multiplier; Muse:
    times output_multiplier, then the softcap), except MPT, whose config's logit_scale its
    modeling code does not apply."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(tc, "model_type", None)

    def number(attr):
        v = getattr(tc, attr, None)
        if v is not None and not isinstance(v, (int, float)):
            raise ValueError(f"apply_r1kernels: config.{attr} = {v!r} is not a number")
        return v

    kw = {}
    softcap = number("final_logit_softcapping")
    if softcap is not None:
        kw["softcap"] = float(softcap)
    scale = None if model_type == "mpt" else number("logit_scale")
    for attr in ("output_multiplier", "lm_head_multiplier"):
        scale = number(attr) if scale is None else scale
    if scale is None and number("logits_scaling") is not None:
        s = tc.logits_scaling
        scale = s if model_type == "hyperclovax" else 1.0 / s
    if scale is not None and float(scale) != 1.0:
        kw["logit_scale"] = float(scale)
    return kw


def _hf_model(model):
    """The transformers model itself (a PEFT model's base model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _FusedNLL(torch.autograd.Function):
    """sum(-logp * c) with c = 1 / n per labelled row (n: a 0-dim tensor): value and gradients
    of hidden, weight, bias in one vocabulary sweep (the forward); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, n, kw):
        g = (-1.0 / n.float()).expand(labels.shape)
        logp, _, gh, gw, gb = linear_token_logprobs_fwd_bwd(hidden, weight, labels, g, bias=bias,
                                                            **kw)
        ctx.grads = (gh, gw, gb)
        return -(logp.sum() / n)

    @staticmethod
    def backward(ctx, gloss):
        if ctx.grads is None:
            raise RuntimeError("apply_r1kernels: backward through the same loss twice is not "
                               "supported (its gradients were computed in the forward pass and "
                               "are scaled in place); run the forward again")
        grads, ctx.grads = ctx.grads, None
        gh, gw, gb = (None if x is None else _scale_by_(x, gloss) for x in grads)
        return gh, gw, gb, None, None, None


def _forward(self, *args, labels=None, shift_labels=None, return_token_logprobs=False,
             fused_lm_head=False, temperature=None, num_items_in_batch=None, ignore_index=-100,
             lm_head_fn=None, **kwargs):
    st = self._r1k_state
    want_logps = bool(return_token_logprobs or fused_lm_head)
    if labels is None and shift_labels is None:
        if want_logps or lm_head_fn is not None:
            raise ValueError("apply_r1kernels: return_token_logprobs / fused_lm_head / "
                             "lm_head_fn need labels (or shift_labels)")
        return st["original"](*args, **kwargs)
    head = self.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"apply_r1kernels: the output embedding must be a torch.nn.Linear, got "
                         f"{type(head).__name__} (an adapter on lm_head is not supported: merge "
                         f"it or leave lm_head out of the adapter's target modules)")
    kwargs.pop("logits_to_keep", None)  # only the labelled positions go through the head anyway
    kwargs.setdefault("use_cache", False)
    tc = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
    router = kwargs.get("output_router_logits")
    if router is None and getattr(tc, "output_router_logits", False):
        router = kwargs["output_router_logits"] = True
    out = self.base_model(*args, **kwargs)
    hidden = out.last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    weight, bias = head.weight, head.bias
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    dev = hidden.device.type
    if st["fp32"]:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    elif torch.is_autocast_enabled(dev):
        amp = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(amp), weight.to(amp)
        bias = None if bias is None else bias.to(amp)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    kw = dict(temperature=st["temperature"] if temperature is None else temperature,
              ignore_index=ignore_index, **st["transform"])
    result = R1KCausalLMOutput()
    with torch.autocast(dev, enabled=False):
        if lm_head_fn is not None:
            result.head_output = lm_head_fn(hidden, weight, bias, labels)
        else:
            n = (labels != ignore_index).sum() if num_items_in_batch is None else \
                torch.as_tensor(num_items_in_batch, device=hidden.device)
            if want_logps:
                logp, ent = linear_token_logprobs(hidden, weight, labels, bias=bias,
                                                  with_entropy=True, **kw)
                result.token_logprobs, result.entropy = logp, ent
                result.loss = -(logp.sum() / n)
            elif torch.is_grad_enabled() and weight.requires_grad:
                result.loss = _FusedNLL.apply(hidden, weight, bias, labels, n, kw)
            else:  # no head gradient wanted (frozen or LoRA-only head, eval): the plain op
                result.loss = -(linear_token_logprobs(hidden, weight, labels, bias=bias, **kw)
                                .sum() / n)
    if router:
        balance = getattr(sys.modules[type(self).__module__], "load_balancing_loss_func")
        result.router_logits = out.router_logits
        result.aux_loss = balance(out.router_logits, self.num_experts, self.num_experts_per_tok,
                                  kwargs.get("attention_mask"))
        if result.loss is not None:
            result.loss = result.loss + self.router_aux_loss_coef * result.aux_loss.to(
                result.loss.device)
    return result


def apply_r1kernels(model, *, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False):
    """Patch `model`'s forward (this instance only; a PEFT model's base model) so that calls
    with labels run the head through r1kernels (module docstring). `temperature`: the default of
    the per-call `temperature=`. Returns the model. Calling it again updates the settings."""
    target = _hf_model(model)
    head = target.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"apply_r1kernels: the output embedding must be a torch.nn.Linear, got "
                         f"{type(head).__name__}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"apply_r1kernels: temperature must be a positive number, got "
                         f"{temperature!r}")
    state = target.__dict__.get("_r1k_state")
    original = state["original"] if state else target.forward
    target._r1k_state = dict(original=original, had_attr="forward" in target.__dict__
                             if state is None else state["had_attr"],
                             temperature=float(temperature), fp32=bool(cast_lm_head_to_fp32),
                             transform=head_transform(target.config))
    # the class's signature for inspect (Trainer's column filter, generate's kwargs check)
    @functools.wraps(type(target).forward)
    def forward(self, *args, **kwargs):
        return _forward(self, *args, **kwargs)

    target.forward = types.MethodType(forward, target)
    return model


def remove_r1kernels(model):
    """Undo apply_r1kernels: the forward the model had before it. Returns the model."""
    target = _hf_model(model)
    state = target.__dict__.pop("_r1k_state", None)
    if state is None:
        return model
    if state["had_attr"]:  # an instance-level forward (e.g. TRL's fused head) put back
        target.forward = state["original"]
    else:
        del target.forward
    return model
