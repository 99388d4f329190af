"""Rollout: G completions per prompt, sampled in one batch from the policy's own weights.

- Prompts are left-padded (to a multiple of 16 tokens, or for a compiled rollout to a power of
  two, so that the decode step's shapes repeat from one batch to the next) and prefilled once
  (batch P, over the longest prompt's length only: the padding every prompt has is not
  computed); the prefilled keys/values are copied G times into the decode cache, so a group's
  prompt is processed once, not G times.
- The KV cache is a transformers `StaticCache`: preallocated to prompt + max_new_tokens and written
  by index, so no tensor grows during decoding.
- One decode step (model forward on the cache, `r1kernels.sample_tokens`, stop bookkeeping) reads
  and writes only preallocated tensors, so it can be compiled once per shape
  (`compile=True`: `torch.compile`, replayed as a CUDA graph on CUDA; on CPU inductor with a C++
  wrapper, and after a rollout's first step the compiled graph is called without dynamo).
  It reads the parameters in place: an optimizer step changes what the next rollout computes,
  with no re-capture and no copy.
  The compiled step and its buffers are kept per (model, shape): a compiled rollout's rows are
  padded to a multiple of 32 (a power of two under 32; the extra rows are finished from the
  start: no attention, no tokens), and on CPU the sampling settings are an input of the step (a
  tensor `r1kernels.sample_tokens_params` reads at run time), so greedy evaluation, GRPO rollouts
  and other settings of nearby batch sizes share one compiled step. On CUDA the settings are
  constants of the CUDA graph: one per (shape, settings).
- Sampling (temperature, top-k, top-p, min-p) runs on the device; the uniforms of the whole rollout
  are drawn from the seeded `torch.Generator` up front. The loop never reads a device value per
  token: it checks "all finished?" once every `sync_every` tokens (on CPU, where reading a value
  costs no device sync, after every token).
- Attention in decode: transformers' `sdpa` attention repeats each key/value head for its query
  heads (`repeat_kv`, a copy of the whole KV cache per layer and step) whenever it is traced by
  torch.compile or given a mask. During rollout the model runs `r1k_sdpa` instead: for a single
  query token on CPU, `r1kernels.decode_attention` (the decode step passes each row's number of
  written slots, 0 for a finished row, and its prompt's first real slot: it reads the slots
  between, not the left padding); on CUDA, SDPA with the query
  heads that share a key/value head folded onto that head's query rows. Otherwise (the prefill)
  it is transformers' `sdpa`. Same math, no copy, compiled or not.
- Each sampled token's log-prob under the unfiltered `softmax(logits / temperature)` is kept
  (`Rollout.logps`): the trainer compares it with the update's own log-probs (mismatch metrics,
  optional importance-sampling correction, `rollout_is_weights`).
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from r1kernels import dispatch
from r1kernels._custom_ops import has_op
from r1kernels.ops.decode_attention import decode_attention
from r1kernels.ops.sample_tokens import sample_tokens_with_uniforms

PAD_MULTIPLE = 16
# dynamo compiles a function for at most 8 shapes by default (then it runs the rest eagerly):
# every compiled decoder (row count, prompt length bucket, completion budget) is one of _step's
RECOMPILE_LIMIT = 64



def _r1k_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' `sdpa` attention, except for a single query token: given `r1k_kv_len` and
    `r1k_kv_start` (the CPU decode step passes them through the model's forward),
    `r1kernels.decode_attention`, which reads each row's slots kv_start .. kv_len - 1 only (not
    its prompt's left padding, none of a finished row's); otherwise SDPA with the
    query heads that share a key/value head folded onto it, instead of the keys and values
    repeated for every query head (also when the values' head size differs from the keys', as in
    multi-head latent attention, which decode_attention does not take)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, Lq, D = query.shape
    Hkv = key.shape[1]
    kv_len = kwargs.pop("r1k_kv_len", None)
    kv_start = kwargs.pop("r1k_kv_start", None)
    if (Lq != 1 or Hq % Hkv or (kv_len is None and Hq == Hkv) or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")
            or (attention_mask is not None and attention_mask.shape[1:3] != (1, 1))
            or dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kv_len is not None and value.shape == key.shape and key.shape[-1] == D:
        mask = None if attention_mask is None else attention_mask[:, 0, 0, :]
        out = decode_attention(query[:, :, 0], key, value, kv_len, mask=mask, scale=scaling,
                               kv_start=kv_start)
        return out[:, None], None
    # query head h uses key/value head h // (Hq / Hkv), as repeat_kv would give it
    q = query.reshape(B, Hkv, Hq // Hkv, D)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, Hq, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("r1k_sdpa", _r1k_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register("r1k_sdpa", sdpa_mask)


@contextmanager
def _decode_attention(model):
    """The model's attention as `r1k_sdpa` for the duration, unless it is `eager`. The rollout
    feeds 4-D additive masks over a static cache, which only `eager` and SDPA read as given:
    flash-attention's and flex attention's integrations take a 2-D padding mask (or a block
    mask) instead, so a model loaded with them samples its rollouts with SDPA (the same math)."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl in (None, "eager", "r1k_sdpa"):
        yield
        return
    _register_attention()
    cfg._attn_implementation = "r1k_sdpa"
    try:
        yield
    finally:
        cfg._attn_implementation = impl


def cache_kw(model) -> str:
    """The forward's name for the KV cache: `cache` in recent transformers, where
    `past_key_values` (and the output's attribute of that name) print a deprecation message."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

@dataclass
class Rollout:
    prompt_ids: list[list[int]]   # P prompts (unpadded)
    tokens: torch.Tensor          # [P*G, T] completion tokens, pad after the end
    lengths: torch.Tensor         # [P*G] completion lengths, eos included when produced
    group_size: int
    logps: torch.Tensor           # [P*G, T] fp32 sampling log-probs of `tokens`, 0 after the end


class _Decoder:
    """The decode state of one shape: the KV cache of B rows x L positions, the token / log-prob /
    length buffers, the step counter, all preallocated; `step()` decodes one token for every row.
    """

    def __init__(self, model, B: int, L: int, T: int, E: int, sampling: dict, compile: bool):
        from transformers import StaticCache

        self.model, self.B, self.L, self.T = model, B, L, T
        dev = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = StaticCache(config=model.config, max_cache_len=L)
        self.cache_kw = cache_kw(model)  # (looked up once: the compiled step reads the name)
        self.tokens = torch.empty((B, T), dtype=torch.long, device=dev)
        self.logps = torch.empty((B, T), dtype=torch.float32, device=dev)
        self.lengths = torch.empty(B, dtype=torch.long, device=dev)
        self.done = torch.empty(B, dtype=torch.bool, device=dev)
        self.key_ok = torch.empty((B, L), dtype=torch.bool, device=dev)
        self.next_pos = torch.empty(B, dtype=torch.long, device=dev)
        self.kv_start = torch.empty(B, dtype=torch.long, device=dev)  # first real prompt slot
        self.uniforms = torch.empty((T, B), dtype=torch.float32, device=dev)
        self.t = torch.zeros((), dtype=torch.long, device=dev)   # index of the token to sample
        self.scalars = torch.empty(1, dtype=torch.long, device=dev)  # Lp
        self.eos_ids = torch.empty(E, dtype=torch.long, device=dev)  # the ids that end a row
        # (CPU, C++ sampler) temperature, top_k, top_p, min_p: read by the step at run time
        self.params = (torch.empty(4, dtype=torch.float64) if runtime_sampling(dev) else None)
        self.pad_id = 0
        for buf in (self.tokens, self.logps, self.lengths, self.done, self.key_ok, self.next_pos,
                    self.kv_start, self.uniforms, self.t, self.scalars, self.eos_ids,
                    self.params):
            if buf is not None:
                torch._dynamo.mark_static_address(buf)
        self.set_sampling(sampling)
        # on CPU, attention by r1kernels.decode_attention's C++ kernel, which skips finished rows
        # and unwritten slots (CUDA keeps SDPA: the torch path of decode_attention is not faster)
        self.kv_len_kernel = (getattr(model.config, "_attn_implementation", None) == "r1k_sdpa"
                              and dispatch.select("decode_attention", dev) == "cpp")
        self.compiled = None
        # (CPU) the inductor graph of the step dynamo last ran, and the tensors it passed
        self.graph, self.graph_args = None, None
        if compile:
            if dev.type == "cuda":  # replayed as a CUDA graph
                self.compiled = torch.compile(self._step, mode="reduce-overhead", dynamic=False)
            else:  # one graph (as transformers' own compiled decoding requires): see `step`
                self.compiled = torch.compile(self._step, backend=self._inductor, dynamic=False,
                                              fullgraph=True)

    def _inductor(self, gm, example_inputs):
        """torch.compile's backend on CPU: inductor, the kernels called from generated C++, not
        Python (1.3x at the tiny model); each call through dynamo records the graph and its
        arguments (the parameters, the cache and the buffers above, always the same tensors),
        which the rollout's later steps call directly (`step`)."""
        from torch._inductor import compile as inductor_compile

        # vec_isa_ok: inductor's check that the compiler builds its AVX-512 / AVX2 code (a test
        # program compiled per instruction set, then loaded in a new Python process) is skipped:
        # it cost 6-9 s of a first compile here and ~0.7 s of every process's; the instruction
        # set is still chosen from the CPU's flags, and a compiler that fails decodes eagerly
        graph = inductor_compile(gm, example_inputs,
                                 options={"cpp_wrapper": True, "cpp.vec_isa_ok": True})

        def run(*args):
            self.graph, self.graph_args = graph, args
            return graph(*args)
        return run

    def set_sampling(self, sampling: dict) -> None:
        self.sampling = sampling
        if self.params is not None:
            self.params.copy_(torch.tensor([sampling["temperature"], sampling["top_k"],
                                            sampling["top_p"], sampling["min_p"]],
                                           dtype=torch.float64))

    def load_prefill(self, prefill_cache, G: int, W: int, Lp: int) -> None:
        """Copy each prompt's prefilled keys/values (the prompt slots W .. Lp - 1) into the rows of
        its G completions (rows 0 .. P*G - 1): one broadcasting copy per tensor. The slots before
        W (left padding of every prompt) and after Lp keep whatever the last rollout left there:
        the mask hides the first for good and a later one until the step that writes it."""
        for src, dst in zip(prefill_cache.layers, self.cache.layers):
            P, H = src.keys.shape[:2]
            if not dst.is_initialized:  # (reads only the shapes, dtype and device)
                dst.lazy_initialization(src.keys.new_empty((self.B, H, 0, src.keys.shape[-1])),
                                        src.values.new_empty((self.B, H, 0, src.values.shape[-1])))
            for s, d in ((src.keys, dst.keys), (src.values, dst.values)):
                d[:P * G].view(P, G, H, self.L, -1)[:, :, :, W:Lp].copy_(s[:, None, :, :Lp - W])
            dst.cumulative_length.fill_(Lp)

    def _commit(self, logits: torch.Tensor) -> None:
        """Sample token t for every row from `logits [B, V]` and do the stop bookkeeping."""
        t = self.t
        u = self.uniforms.index_select(0, t.view(1)).view(-1)
        if self.params is not None:
            tok, logp = torch.ops.r1kernels.sample_tokens_params(logits, u, self.params)
        else:
            tok, logp = sample_tokens_with_uniforms(logits, u, **self.sampling)
        tok = torch.where(self.done, torch.full_like(tok, self.pad_id), tok)
        logp = torch.where(self.done, torch.zeros_like(logp), logp)
        self.tokens.index_copy_(1, t.view(1), tok[:, None])
        self.logps.index_copy_(1, t.view(1), logp[:, None])
        finished_now = (tok[:, None] == self.eos_ids).any(1) & ~self.done
        self.lengths.copy_(torch.where(finished_now, t + 1, self.lengths))
        self.done.logical_or_(finished_now)
        self.t.add_(1)

    def _step(self) -> None:
        """Feed token t-1 (at cache slot Lp + t - 1), sample token t."""
        slot = self.scalars[0] + self.t - 1
        cache_pos = torch.arange(self.L, device=self.t.device)
        allowed = self.key_ok & (cache_pos <= slot)
        neg = torch.finfo(self.dtype).min
        mask = torch.zeros((self.B, 1, 1, self.L), dtype=self.dtype, device=self.t.device)
        mask = mask.masked_fill(~allowed[:, None, None, :], neg)
        prev = self.tokens.index_select(1, (self.t - 1).view(1))
        extra = {}
        if self.kv_len_kernel:
            # decode_attention reads slots Lp - prompt length .. slot of the rows still decoding
            # (not the left padding), none of a finished row's
            extra["r1k_kv_len"] = torch.where(self.done, 0, slot + 1)
            extra["r1k_kv_start"] = self.kv_start
        out = self.model(input_ids=prev, attention_mask=mask,
                         position_ids=(self.next_pos + self.t - 1)[:, None],
                         cache_position=slot.view(1), use_cache=True,
                         **{self.cache_kw: self.cache}, **extra)
        self._commit(out.logits[:, -1])

    def step(self) -> None:
        """One decode step: the compiled one if compiling has not failed, else eager. After the
        first step of a rollout, which dynamo runs (checking its guards, compiling the step if
        it is new), the graph it ran is called with the same arguments without dynamo: the later
        steps run on the same tensors and shapes, and dynamo's guards, its lookup of the 43
        arguments and its replay of the model's Python state (context flags it resets to the
        same values) cost ~9% of a tiny model's step. A model whose step does not trace as one
        graph decodes eagerly (one warning)."""
        if self.compiled is not None:
            try:
                if self.graph_args is not None:
                    self.graph(*self.graph_args)
                else:  # (every shape is one more compile of _step: see RECOMPILE_LIMIT)
                    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                        self.compiled()
                return
            except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly
                self.compiled = None
                _warn_once(f"r1train: compiling the decode step failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); decoding eagerly")
        self._step()


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if "compile" not in _WARNED:
        _WARNED.add("compile")
        warnings.warn(msg, stacklevel=3)


def runtime_sampling(dev: torch.device) -> bool:
    """Whether the decode step reads its sampling settings from a tensor (CPU, C++ sampler)."""
    return (dev.type == "cpu" and dispatch.select("sample_tokens", dev) == "cpp"
            and has_op("sample_tokens_params"))


def prompt_slots(n: int, compile: bool) -> int:
    """The cache slots before the first new token for prompts of up to n tokens: n rounded up to
    a multiple of PAD_MULTIPLE, or for a compiled rollout to a power of two (PAD_MULTIPLE at
    least), so that prompts of every length share a few compiled shapes (a bucket per octave of
    the longest prompt, not per 16 tokens; each shape is a compile and a KV cache kept). The
    extra slots are left padding: the prefill skips the padding every prompt has, and on CPU
    decode_attention the slots before each row's prompt."""
    n = max(n, 1)
    return (max(PAD_MULTIPLE, 1 << (n - 1).bit_length()) if compile
            else -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)


def padded_rows(B: int) -> int:
    """The rows of a compiled step for B rows: B rounded up to a multiple of 32 (to a power of
    two under 32), so that batches of nearby sizes share one compiled step."""
    return -(-B // 32) * 32 if B > 32 else 1 << max(B - 1, 0).bit_length()


def _decoder(model, B, L, T, E, sampling, compile: bool) -> _Decoder:
    """A fresh decoder (eager), or the cached one of this model and shape (compiled; with the
    settings in the key where they are constants of the step)."""
    if not compile:
        return _Decoder(model, B, L, T, E, sampling, False)
    dev = next(model.parameters()).device
    key = (B, L, T, E) + (("params",) if runtime_sampling(dev)
                          else tuple(sorted(sampling.items())))
    per_model = model.__dict__.setdefault("_r1k_decoders", {})  # lives as long as the model
    dec = per_model.get(key)
    if dec is None:
        dec = per_model[key] = _Decoder(model, B, L, T, E, sampling, True)
    else:
        dec.set_sampling(sampling)
    return dec


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], *, group_size: int, max_new_tokens: int,
             eos_id: int | Sequence[int], pad_id: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             generator: torch.Generator | list[torch.Generator] | None = None,
             sync_every: int | None = None, compile: bool = False) -> Rollout:
    """Sample `group_size` completions of up to `max_new_tokens` tokens for each prompt.

    A completion ends at the first token in `eos_id` (one id or several, as transformers'
    `eos_token_id` and vLLM's stop token ids: an instruct model's end of turn and end of text),
    which it keeps.

    `compile=True` compiles the decode step once per shape (see the module docstring); a model
    or device where that fails decodes eagerly after one warning. Same inputs, same generator
    state: same tokens, compiled or not (greedy exactly; sampled up to the rounding of the
    compiled logits). `generator` may be a list of one generator per prompt: each prompt's
    completions then depend on its own generator only, not on which other prompts share the
    batch (how the trainer keeps a run's samples independent of its process count).
    """
    from transformers import StaticCache

    dev = next(model.parameters()).device
    if sync_every is None:  # a CUDA sync stalls the queued steps; a CPU read costs nothing
        sync_every = 8 if dev.type == "cuda" else 1
    P, G, T = len(prompt_ids), group_size, max_new_tokens
    eos = [eos_id] if isinstance(eos_id, int) else (
        list(eos_id) if isinstance(eos_id, (list, tuple)) else [])
    if not eos or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise ValueError(f"generate: eos_id must be a token id or a non-empty list of them, "
                         f"got {eos_id!r}")
    E = -(-len(eos) // 4) * 4  # (repeats of the first fill the rest: up to 4 ids, one shape)
    Lp = prompt_slots(max(len(p) for p in prompt_ids), compile)
    L = Lp + T
    ids = torch.full((P, Lp), pad_id, dtype=torch.long)
    attn = torch.zeros((P, L), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, Lp - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, Lp - len(p):] = 1
    ids, attn = ids.to(dev), attn.to(dev)
    prompt_len = attn[:, :Lp].sum(-1)                       # [P]
    pos = (attn[:, :Lp].cumsum(-1) - 1).clamp(min=0)
    cache_pos = torch.arange(L, device=dev)

    # Attention masks are 4-D additive masks over the whole static cache (which transformers uses
    # as given): no mask construction or host checks inside the model. The prefill runs on the
    # prompt slots W .. Lp - 1 only (the first W are padding in every prompt) and its cache holds
    # those; the decode cache all L.
    W = Lp - max(len(p) for p in prompt_ids)
    dtype = next(model.parameters()).dtype
    neg = torch.finfo(dtype).min
    key_ok = attn.bool()                                    # [P, L] real prompt tokens + new slots
    q_pos = cache_pos[:Lp - W]
    allowed = key_ok[:, None, W:Lp] & (q_pos[None, :] <= q_pos[:, None])[None]  # [P, m, m]
    allowed |= torch.eye(Lp - W, dtype=torch.bool, device=dev)[None]  # pads attend to themselves
    prefill_mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, neg)

    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                    min_p=float(min_p))
    was_training = model.training
    model.eval()
    dec = None
    try:
        with _decode_attention(model):  # (the prefill runs transformers' sdpa through it)
            prefill = StaticCache(config=model.config, max_cache_len=Lp - W)
            out = model(input_ids=ids[:, W:], attention_mask=prefill_mask[:, None],
                        position_ids=pos[:, W:], cache_position=q_pos, use_cache=True,
                        logits_to_keep=1, **{cache_kw(model): prefill})
            B = P * G  # (rows B .. of a compiled step: finished from the start, never read)
            dec = _decoder(model, padded_rows(B) if compile else B, L, T, E, sampling, compile)
            dec.load_prefill(prefill, G, W, Lp)  # (filled in place by the model)
            del prefill
            dec.pad_id = pad_id
            dec.scalars.fill_(Lp)
            dec.eos_ids.copy_(torch.tensor(eos + eos[:1] * (E - len(eos))))
            dec.key_ok.zero_()
            dec.key_ok[:B].copy_(key_ok.repeat_interleave(G, 0))
            # the position id of the first new token
            dec.next_pos.zero_()
            dec.next_pos[:B].copy_(prompt_len.repeat_interleave(G, 0))
            dec.kv_start.zero_()
            dec.kv_start[:B].copy_((Lp - prompt_len).repeat_interleave(G, 0))  # after the left padding
            dec.uniforms.zero_()  # (greedy, and the padding rows)
            if temperature > 0:
                if isinstance(generator, (list, tuple)):  # prompt p's rows p*G .. p*G+G-1
                    if len(generator) != P:
                        raise ValueError(f"generate: generator must be one torch.Generator or one "
                                         f"per prompt ({P}), got a list of {len(generator)}")
                    u = torch.cat([torch.rand((T, G), generator=g, device=dev)
                                   for g in generator], 1)
                else:
                    u = torch.rand((T, P * G), generator=generator, device=dev)
                dec.uniforms[:, :B].copy_(u)
            dec.tokens.fill_(pad_id)
            dec.logps.zero_()
            dec.lengths.fill_(T)
            dec.done.zero_()
            dec.done[B:] = True
            dec.t.zero_()
            first = out.logits[:, -1].repeat_interleave(G, 0)  # token 0, from the prefill
            if dec.B > B:
                first = torch.cat([first, first.new_zeros(dec.B - B, first.shape[1])])
            dec._commit(first)
            del first, out  # (not held through the decode loop: [B, V] logits)
            with ExitStack() as unchecked:
                for t in range(1, T):
                    if t % sync_every == 0 and bool(dec.done.all()):
                        break
                    dec.step()
                    if t == 1 and dec.compiled is not None and dec.graph_args is None:
                        # CUDA: the later steps run on the same objects and shapes, dynamo picks
                        # the CUDA graph without re-checking every guard
                        unchecked.enter_context(torch.compiler.set_stance(
                            "default", skip_guard_eval_unsafe=True))
    finally:
        if dec is not None:
            # (CPU) so that the next rollout's first step runs through dynamo (and the recorded
            # arguments do not hold the parameters until then)
            dec.graph_args = None
        model.train(was_training)
    return Rollout(list(prompt_ids), dec.tokens[:B].clone(), dec.lengths[:B].clone(), G,
                   dec.logps[:B].clone())


@torch.no_grad()
def generate_nocache_greedy(model, prompt: list[int], max_new_tokens: int,
                            eos_id: int) -> list[int]:
    """Reference for tests: recompute the whole sequence each step, no cache, greedy."""
    dev = next(model.parameters()).device
    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([seq], device=dev), use_cache=False).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok == eos_id:
            break
    return out
