"""torch.nn modules: the fused GRPO loss from hidden states (or logits).

`GRPOLoss(...)(hidden, weight, labels, mask, advantages, ...)` equals
`grpo_loss(linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=T), advantages,
mask, ...)` in value and gradients, but:
  - the [B*T, V] logits never exist: the log-prob op walks the vocabulary in tiles;
  - every normalizer of the loss is known before any log-prob is (it depends only on the mask and
    num_items_in_batch), so dL/dlogp is computed by the fused loss kernel as soon as a chunk of
    rows has its log-probs (`grad_fn`, called per chunk), and the log-prob op turns it into the
    gradients of hidden, weight and bias in the same call: by default (sweep="auto") the
    logits of each chunk are computed once for the log-probs and the gradients (one sweep of
    the vocabulary, 6 * N * H * V FLOPs); nothing is left for backward;
  - with token-level importance sampling a token's dL/dlogp needs only that token and its
    sequence's loss scale, so chunks are any run of rows, sized by memory (1024 rows at
    V = 151936 on CUDA) whatever the sequence length; the loss partials are reduced once from
    the whole batch's log-probs after the sweep. Sequence-level importance sampling (GSPO)
    needs whole sequences per chunk (sweep="auto" takes two sweeps when one sequence's live
    rows of fp32 logits exceed the single-sweep chunk limit);
  - only the live rows (inside the mask, label not ignore_index) go through the lm_head GEMMs,
    gathered first (their gradient rows scattered back, zeros elsewhere): a masked token
    reaches neither the loss nor a gradient, and padding is often a large part of a GRPO batch
    (costs one host sync, the live-row count; none under torch.compile). Sequence level: each
    chunk holds the live rows of whole sequences, put back in place for the loss;
  - backward only scales the saved gradients by grad_output (in place, no copy; on CUDA one
    small kernel that returns at once when grad_output is 1, so backward never waits for the
    GPU). A second backward through the same graph is therefore refused.

`GRPOLoss.from_logits(logits, labels, mask, advantages, ...)` does the same for callers that hold
the logits; with `inplace=True` (an explicit opt-in) the logits gradient is written into the
logits buffer, so no second [B*T, V] tensor is allocated: the caller must not read the logits
afterwards (autograd refuses, via the version counter, if some other node saved them).
"""
from __future__ import annotations

import functools

import torch

from r1kernels import dispatch
from r1kernels.dispatch import HAS_TRITON
from r1kernels.ops import grpo_loss as G
from r1kernels.ops import token_logprobs as TLP
from r1kernels.ops._triton import next_power_of_2, tl, triton
from r1kernels.ops.grpo_loss import GRPOLossOutput


def _fused_loss_step(fwd, cfg, B, T, adv, mask, old, ref, rw, scale, parts, ent_acc, live=None,
                     chunks=None):
    """The grad_fn handed to the log-prob ops for sequence-level importance sampling (GSPO: a
    token's derivative depends on its whole sequence): loss partials and dL/dlogp for chunks of
    whole sequences. Without `live` the log-prob rows are the B * T tokens; with it, only the
    live tokens (`live`: their indices), and `chunks` maps each chunk's rows (start, end) to its
    sequences (b0, b1): the chunk's log-probs are put back in place (zeros elsewhere) for the
    loss, and the derivative is taken at the live tokens."""
    n_live = None if live is None else live.numel()

    def grad_fn(start, end, logp, ent):
        if live is None:
            if start % T or end % T:
                raise RuntimeError(f"GRPOLoss: log-prob chunk [{start}, {end}) does not hold "
                                   f"whole sequences of length {T}")
            b0, b1, pos = start // T, end // T, None
        else:
            b0, b1 = (0, B) if (start, end) == (0, n_live) else chunks[(start, end)]
            pos = live[start:end] - b0 * T  # the chunk's rows within its sequences
            nt = (b1 - b0) * T
            logp = logp.new_zeros(nt).index_copy_(0, pos, logp.float())
            ent = None if ent is None else ent.new_zeros(nt).index_copy_(0, pos, ent.float())
        sl = slice(b0, b1)
        g, part = fwd(logp.view(b1 - b0, T), adv[sl], mask[sl],
                      None if old is None else old[sl], None if ref is None else ref[sl],
                      None if rw is None else rw[sl], cfg, write_grad=True)
        parts.append((b0, part))
        if ent is not None:
            ent_acc.append(_entropy_sum(ent.view(b1 - b0, T), mask[sl]))
        g = (g * scale[sl].unsqueeze(1)).reshape(-1)
        return g if pos is None else g[pos]

    return grad_fn


def _sequence_chunks(live, B: int, T: int, budget: int):
    """Chunks of whole sequences over the live rows (indices `live` into B * T, ascending): as
    many consecutive sequences as fit `budget` rows (at least one), as (row boundaries
    [0, ..., N'], {(start, end): (b0, b1)}). Sequences without live rows join a neighbour."""
    counts = torch.bincount(live // T, minlength=B).tolist()
    bounds, seqs, chunks = [0], [0], {}
    acc = 0
    for b, c in enumerate(counts):
        if acc > 0 and acc + c > budget:
            bounds.append(bounds[-1] + acc)
            seqs.append(b)
            acc = 0
        acc += c
    bounds.append(bounds[-1] + acc)
    seqs.append(B)
    for i in range(len(bounds) - 1):
        chunks[(bounds[i], bounds[i + 1])] = (seqs[i], seqs[i + 1])
    return bounds, chunks


def _entropy_sum(ent, mask):
    m = mask.float()
    return torch.where(m != 0, ent.float() * m, 0.0).sum()


class _TokenRows:
    """Token-level importance sampling: a token's dL/dlogp depends on that token's inputs and its
    sequence's loss scale only (G.row_scale: every normalizer is known from the mask up front),
    so the log-prob ops may hand over any run of token rows [start, end), across sequence
    boundaries: their chunks are sized by memory, not by the sequence length. The per-token
    inputs are flattened once ([B * T], contiguous); the loss partials and the entropy metric
    are reduced once, from the whole batch's log-probs, by `finish`."""

    def __init__(self, cfg, T, adv, mask, old, ref, rw, scale, fwd, rows=None):
        """rows: the indices of the token rows the log-prob ops will see (the live ones; None:
        all B * T), so that their row r is token rows[r]."""

        def flat(t):
            if t is None:
                return None
            t = t.reshape(-1)
            return t.contiguous() if rows is None else t.index_select(0, rows)

        self.cfg, self.T, self.fwd, self.rows = cfg, T, fwd, rows
        self.seq = (adv, mask, old, ref, rw)
        self.flat = tuple(flat(t) for t in (adv, G._mask_view(mask), old, ref, rw))
        self._flat_rows = flat
        self.scale = scale.float().contiguous()  # per sequence [B]
        self._scale_tok = None

    @property
    def scale_tok(self) -> torch.Tensor:
        """The token rows' loss scales (only the chunked paths need them; the logits kernel
        takes the per-sequence scale). Cached by hand: functools.cached_property takes a lock,
        which torch.compile cannot trace."""
        if self._scale_tok is None:
            self._scale_tok = self._flat_rows(self.scale.repeat_interleave(self.T))
        return self._scale_tok

    def grad_fn(self, start, end, logp, ent):
        """dL/dlogp of token rows [start, end) (the grad_fn of the log-prob ops)."""
        adv, mask, old, ref, rw = (None if t is None else t[start:end].view(1, -1)
                                   for t in self.flat)
        g, _ = self.fwd(logp.view(1, -1), adv, mask, old, ref, rw, self.cfg, write_grad=True)
        return g.view(-1) * self.scale_tok[start:end]

    def chunk_kernel(self, z, yr, g, r0, inv_temp, ignore_index, entropy, cap=0.0):
        """The hidden-state sweep's chunk of token rows [r0, r0 + n) on the cluster kernel
        (token_logprobs.cluster_chunk: statistics, dL/dlogp and G in one read of the fp32
        logits), or None where it does not apply. Each row is passed as its own sequence, with
        its token's loss scale."""
        sl = slice(r0, r0 + z.shape[0])
        adv, mask, old, ref, rw = (None if t is None else t[sl] for t in self.flat)
        return TLP.cluster_chunk(z, yr, g, inv_temp, ignore_index, entropy,
                                 grpo=(self.cfg, adv, mask, old, ref, rw, self.scale_tok[sl]),
                                 cap=cap)

    def kernel(self, x3, labels, g3, inv_temp, ignore_index, with_entropy, cap=0.0):
        """Every token row (built with rows=None; logits x3 [B, T, V], labels [B * T]
        contiguous): the statistics, dL/dlogp and dL/dlogits (into g3) in the fused logits
        kernel (inv_temp, cap: the head's constants, TLP.head_constants); returns its
        out [3, B * T] (logp, entropy, ...)."""
        return TLP.fused_logits(x3, labels, g3, inv_temp, int(ignore_index), bool(with_entropy),
                                grpo=(self.cfg, *self.flat, self.scale), cap=cap)

    def finish(self, logp, ent, parts, ent_acc):
        """The loss partials (and the entropy sum) of the whole batch from its log-probs (and
        entropies) of the token rows seen: one reduction after the sweep."""
        adv, mask, old, ref, rw = self.seq
        B = mask.shape[0]
        if self.rows is not None:  # the rows not seen: outside the mask, or ignored labels
            logp = logp.new_zeros(B * self.T).index_copy_(0, self.rows, logp)
            ent = None if ent is None else ent.new_zeros(B * self.T).index_copy_(0, self.rows, ent)
        _, part = self.fwd(logp.view(B, self.T), adv, mask, old, ref, rw, self.cfg,
                           write_grad=False)
        parts.append((0, part))
        if ent is not None:
            ent_acc.append(_entropy_sum(ent.view(B, self.T), mask))


def _live_rows(labels, mask, vocab: int, ignore_index: int, device):
    """The token rows that reach the loss's gradient and value through their log-probs: inside
    the mask, label not ignore_index; as indices into the B * T rows, or None when that is all
    of them. Only these go through the lm_head GEMMs (a masked token's logits would cost the
    same three GEMMs and give a zero gradient row; padding is often a large part of a GRPO
    batch). Every label is checked first, as the log-prob op would (IndexError). One host sync
    for the labels' check and the number of live rows; none under torch.compile (every row is
    kept)."""
    TLP.check_labels("GRPOLoss", labels, tuple(labels.shape), ignore_index, device)
    return TLP.checked_rows("GRPOLoss", labels, vocab, ignore_index,
                            (G._mask_view(mask) != 0) & (labels != ignore_index))


def _finish(fin, parts, nitems, cfg, B, device, ent_acc, n_tot):
    parts.sort(key=lambda p: p[0])
    part = torch.cat([p for _, p in parts], dim=-1) if parts else \
        torch.zeros(G.NUM_PARTIALS, B, device=device)
    out, _ = fin(part, nitems, cfg)
    ent = torch.stack(ent_acc).sum() / n_tot.clamp(min=1.0) if ent_acc else None
    rows = part if part.dim() == 2 else part.sum(1)  # ([6, C, B]: per row chunk)
    per_seq = rows[3:6] / rows[1].clamp(min=1.0)  # clipped fraction of each sequence's tokens
    return out, ent, per_seq


def _is_one(g: torch.Tensor) -> bool:
    return bool((g == 1).all())


@triton.jit
def _scale_rows_kernel(t_ptr, s_ptr, n_rows, T, C, stride_b, stride_t, BLOCK: tl.constexpr):
    """t[b, t, :] *= s for every row (rows r = b * T + t, the last dim contiguous), s read from
    memory and rounded to t's dtype first (as t.mul_(s.to(t.dtype))); every program returns at
    once when s == 1. Persistent: program p takes blocks p, p + programs, ..."""
    s = tl.load(s_ptr).to(t_ptr.dtype.element_ty).to(tl.float32)
    if s != 1.0:
        n_cb = tl.cdiv(C, BLOCK)
        cols = tl.arange(0, BLOCK)
        for i in range(tl.program_id(0), n_rows * n_cb, tl.num_programs(0)):
            r = i // n_cb
            c = (i % n_cb) * BLOCK + cols
            off = (r // T).to(tl.int64) * stride_b + (r % T).to(tl.int64) * stride_t + c
            x = tl.load(t_ptr + off, mask=c < C)
            tl.store(t_ptr + off, (x.to(tl.float32) * s).to(t_ptr.dtype.element_ty), mask=c < C)


def _scale_by_(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """t *= s in place (s: a backward's 0-dim grad_output), as t.mul_(s.to(t.dtype)). On CUDA
    (and on CPU under the Triton interpreter) without a host sync: one launch of a few programs
    that read s and return at once when it is 1, the backward of a plain `loss.backward()`, so
    the host never waits for the GPU here. Elsewhere (and under torch.compile) a host check of
    s == 1 skips the pass."""
    use_kernel = (HAS_TRITON and (t.is_cuda or dispatch.TRITON_INTERPRET) and t.dim() <= 3
                  and t.numel() > 0 and t.stride(-1) == 1 and s.numel() == 1
                  and s.device == t.device and not torch.compiler.is_compiling())
    if not use_kernel:
        if torch.compiler.is_compiling():  # no host check inside a graph
            return t.mul_(s.to(t.dtype))
        return t if _is_one(s) else t.mul_(s.to(t.dtype))
    t3 = t.view((1,) * (3 - t.dim()) + tuple(t.shape))
    B, T, C = t3.shape
    block = max(16, min(4096, next_power_of_2(C)))
    blocks = B * T * triton.cdiv(C, block)
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 2
    _scale_rows_kernel[(max(1, min(blocks, 8 * sms)),)](
        t3, s.reshape(()), B * T, T, C, t3.stride(0), t3.stride(1), BLOCK=block, num_warps=4)
    return t


class _FusedLinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, adv, mask, old, ref, rw, nitems, cfg, opts):
        from r1kernels.ops.linear_token_logprobs import linear_token_logprobs_with_grad

        (B, T, temperature, ignore_index, with_entropy, backend, sweep, softcap, logit_scale,
         group) = opts
        H = hidden.shape[-1]
        lwg, vocab = linear_token_logprobs_with_grad, weight.shape[0]
        if group is not None:  # a vocabulary split over the group (r1kernels/distributed.py)
            from r1kernels import distributed

            vs = distributed.VocabSlice(group, vocab, hidden.device)
            lwg = functools.partial(distributed.linear_with_grad, group=group, vocab_slice=vs)
            vocab = vs.total
        fwd, fin = G.forward_impl(backend)
        n_rows = mask.sum(-1, dtype=torch.float32) if B * T else torch.zeros(B, device=hidden.device)
        scale = G.row_scale(n_rows, nitems, cfg)
        parts, ent_acc = [], []
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        gh = gw = gb = None
        if B * T > 0:
            h2, y2 = hidden.reshape(B * T, H), labels.reshape(B * T)
            kw = dict(temperature=temperature, ignore_index=ignore_index,
                      with_entropy=with_entropy, need_grads=need, sweep=sweep,
                      labels_checked=True,  # by _live_rows, in its one host sync
                      softcap=softcap, logit_scale=logit_scale)
            live = _live_rows(labels, mask, vocab, ignore_index, hidden.device)
            if cfg.seq and live is None:  # every token live: chunks of whole sequences
                grad_fn = _fused_loss_step(fwd, cfg, B, T, adv, mask, old, ref, rw, scale, parts,
                                           ent_acc)
                _, _, gh, gw, gb = lwg(
                    h2, weight, y2, bias, grad_fn=grad_fn, chunk_multiple=T, **kw)
            elif cfg.seq:  # chunks of whole sequences' live rows
                from r1kernels.ops.linear_token_logprobs import sweep_rows

                bounds, chunks = None, {}  # (no live row: one call of the loss, on zeros)
                if live.numel():
                    budget = sweep_rows(live.numel(), weight.shape[0], 1, hidden.device)
                    bounds, chunks = _sequence_chunks(live, B, T, budget)
                grad_fn = _fused_loss_step(fwd, cfg, B, T, adv, mask, old, ref, rw, scale, parts,
                                           ent_acc, live, chunks)
                _, _, gh, gw, gb = lwg(
                    h2.index_select(0, live), weight, y2.index_select(0, live), bias,
                    grad_fn=grad_fn, chunk_bounds=bounds, **kw)
            else:  # chunks of any rows: sized by memory, whatever the sequence length
                rows = _TokenRows(cfg, T, adv, mask, old, ref, rw, scale, fwd, live)
                if live is not None:
                    h2, y2 = h2.index_select(0, live), y2.index_select(0, live)
                logp, ent, gh, gw, gb = lwg(
                    h2, weight, y2, bias, grad_fn=rows.grad_fn, chunk_kernel=rows.chunk_kernel,
                    **kw)
                rows.finish(logp, ent, parts, ent_acc)
            if live is not None and gh is not None:
                gh = gh.new_zeros(B * T, H).index_copy_(0, live, gh)
        else:  # nothing to score: zero loss, zero gradients
            gh = torch.zeros_like(hidden) if need[0] else None
            gw = torch.zeros_like(weight) if need[1] else None
            gb = torch.zeros_like(bias) if need[2] else None
        out, ent, per_seq = _finish(fin, parts, nitems, cfg, B, hidden.device, ent_acc,
                                    n_rows.sum())
        ctx.grads = (None if gh is None else gh.view(hidden.shape), gw, gb)
        ent = torch.zeros((), device=hidden.device) if ent is None else ent
        ctx.mark_non_differentiable(out, ent, per_seq)
        ctx.set_materialize_grads(False)  # no zero tensors for the metrics' gradients
        return out[0].clone(), out, ent, per_seq

    @staticmethod
    def backward(ctx, gloss, _gout, _gent, _gseq):
        if ctx.grads is None:
            raise RuntimeError("GRPOLoss: backward through the same graph twice is not supported "
                               "(the gradients were computed in the forward pass and are scaled "
                               "in place); run the forward again")
        grads, ctx.grads = ctx.grads, None
        if gloss is None:  # (grads not materialized: no gradient reached the loss)
            return (None,) * 12
        gh, gw, gb = (None if x is None else _scale_by_(x, gloss) for x in grads)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


def _from_logits_fused_triton(logits, labels, adv, mask, old, ref, rw, cfg, scale, fwd, parts,
                              ent_acc, temperature, ignore_index, with_entropy, inplace,
                              softcap=None, logit_scale=1.0):
    """Token-level GRPO loss from logits [B, T, V] with one fused kernel: per row, the
    statistics, the loss's dL/dlogp and dL/dlogits (see ops/token_logprobs.py). Returns the
    logits gradient (the logits buffer itself when `inplace`) and the second half of the
    labels' value check (TLP.start_label_check: the kernel never reads at an out-of-range
    label), for the caller to run once everything is enqueued; appends the loss partials."""
    B, T, V = logits.shape
    op = "GRPOLoss.from_logits"
    TLP.check_labels(op, labels, (B, T), ignore_index, logits.device)
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    g = x if inplace else torch.empty_like(x)
    rows = _TokenRows(cfg, T, adv, mask, old, ref, rw, scale, fwd)
    y = labels.reshape(-1).contiguous()
    label_check = TLP.start_label_check(op, y, V, ignore_index)
    inv_temp, cap = TLP.head_constants(op, temperature, softcap, logit_scale)
    out = rows.kernel(x, y, g, inv_temp, ignore_index, with_entropy, cap)
    rows.finish(out[0], out[1] if with_entropy else None, parts, ent_acc)
    gl = logits.view(logits.shape) if g.data_ptr() == logits.data_ptr() else g  # an alias autograd can hand on
    return gl, label_check


class _FusedLogitsGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, adv, mask, old, ref, rw, nitems, cfg, opts):
        from r1kernels.ops.token_logprobs import token_logprobs_with_grad

        (B, T, temperature, ignore_index, with_entropy, backend, inplace, softcap, logit_scale,
         group) = opts
        V = logits.shape[-1]
        fwd, fin = G.forward_impl(backend)
        n_rows = mask.sum(-1, dtype=torch.float32) if B * T else torch.zeros(B, device=logits.device)
        scale = G.row_scale(n_rows, nitems, cfg)
        parts, ent_acc = [], []
        label_check = None  # the labels' value check, finished at the end
        if B * T > 0 and group is not None:  # a vocabulary split over the group
            from r1kernels import distributed

            grad_fn = _fused_loss_step(fwd, cfg, B, T, adv, mask, old, ref, rw, scale, parts,
                                       ent_acc)
            flat = logits.reshape(B * T, V)
            _, _, gl = distributed.logits_with_grad(
                flat, labels.reshape(B * T), temperature=temperature, ignore_index=ignore_index,
                with_entropy=with_entropy, grad_fn=grad_fn,
                inplace=inplace and flat.data_ptr() == logits.data_ptr(), softcap=softcap,
                logit_scale=logit_scale, group=group)
            gl = gl.view(logits.shape)
        elif B * T > 0 and backend == "triton" and not cfg.seq \
                and not torch.compiler.is_compiling():
            # (the fused logits kernel is eager only; torch.compile traces the chunked path)
            gl, label_check = _from_logits_fused_triton(
                logits, labels, adv, mask, old, ref, rw, cfg, scale, fwd, parts, ent_acc,
                temperature, ignore_index, with_entropy, inplace, softcap, logit_scale)
        elif B * T > 0:
            grad_fn = _fused_loss_step(fwd, cfg, B, T, adv, mask, old, ref, rw, scale, parts, ent_acc)
            kw = dict(temperature=temperature, ignore_index=ignore_index,
                      with_entropy=with_entropy, chunk_multiple=T, inplace=inplace,
                      softcap=softcap, logit_scale=logit_scale)
            try:
                flat = logits.view(B * T, V)
            except RuntimeError:  # e.g. logits[:, :-1] of [B, T + 1, V]: one call per sequence
                flat = None
            if flat is not None:
                _, _, gl = token_logprobs_with_grad(flat, labels.reshape(B * T), grad_fn=grad_fn, **kw)
                gl = gl.view(logits.shape)
            else:
                # one call per sequence; without inplace each writes its slice of one gradient
                # buffer (no stack of per-sequence gradients: one [B, T, V] write less)
                gl = None if inplace else torch.empty(logits.shape, dtype=logits.dtype,
                                                      device=logits.device)
                grads = []
                for b in range(B):
                    off = b * T
                    step = (lambda o: lambda s, e, lp, en: grad_fn(s + o, e + o, lp, en))(off)
                    grads.append(token_logprobs_with_grad(
                        logits[b], labels[b], grad_fn=step, out=None if gl is None else gl[b],
                        **kw)[2])
                if gl is None:
                    in_place = all(g.data_ptr() == logits[b].data_ptr()
                                   for b, g in enumerate(grads))
                    gl = logits if in_place else torch.stack(grads)
        else:
            gl = torch.zeros_like(logits)
        out, ent, per_seq = _finish(fin, parts, nitems, cfg, B, logits.device, ent_acc,
                                    n_rows.sum())
        ctx.grads = gl if ctx.needs_input_grad[0] else None
        ctx.used = False
        ent = torch.zeros((), device=logits.device) if ent is None else ent
        ctx.mark_non_differentiable(out, ent, per_seq)
        ctx.set_materialize_grads(False)  # no zero tensors for the metrics' gradients
        loss = out[0].clone()
        if label_check is not None:
            # the labels' one host sync, once the whole loss is enqueued (on CUDA it waits for
            # the check's kernels only, not for the logits kernel behind them)
            label_check()
        return loss, out, ent, per_seq

    @staticmethod
    def backward(ctx, gloss, _gout, _gent, _gseq):
        if ctx.used:
            raise RuntimeError("GRPOLoss.from_logits: backward through the same graph twice is not "
                               "supported; run the forward again")
        ctx.used = True
        g, ctx.grads = ctx.grads, None
        if gloss is None:  # (grads not materialized: no gradient reached the loss)
            return (None,) * 10
        if g is not None:
            g = _scale_by_(g, gloss)
        return g, None, None, None, None, None, None, None, None, None


class GRPOLoss(torch.nn.Module):
    """GRPO loss fused with the lm_head log-probs (see the module docstring and docs/api.md).

    Extra keyword arguments beyond the API: `with_entropy` (default True: the `entropy` metric,
    computed in the same vocabulary sweep), `ignore_index` (label value whose log-prob is 0) and
    `sweep` ("auto" | "one" | "two", see ops/linear_token_logprobs.py: "auto" computes the
    logits once, chunk of rows by chunk, for token-level importance sampling at any sequence
    length; for sequence-level importance sampling whenever one sequence's fp32 logits fit the
    single-sweep chunk limit, and two sweeps for longer sequences). `softcap` and `logit_scale`
    (docs/api.md): the model's head transform of the logits (Gemma's
    final_logit_softcapping, Cohere's logit_scale, Granite's 1 / logits_scaling), applied by
    forward and from_logits alike.
    `per_sequence_metrics` (default False): `metrics` also holds `clip_ratio_low_per_sequence`,
    `clip_ratio_high_per_sequence` and `clip_ratio_per_sequence`, tensors [B]: the fraction of
    each sequence's masked tokens counted by the scalar of the same name (at
    importance_sampling_level="sequence" 0 or 1, the sequence's flag; 0 for a sequence without
    masked tokens), e.g. for TRL's clip_ratio/low_min and /high_max. They come from the same
    per-sequence sums as the scalars (no extra pass).
    `process_group`: the lm_head (`weight [V_r, H]`, `bias [V_r]`, or the logits of
    `from_logits`) is this rank's contiguous slice of a vocabulary split over the group, in rank
    order; every other input is the same on every rank and every rank returns the whole
    vocabulary's loss and metrics (r1kernels/distributed.py: 12-16 bytes per token per chunk).
    A DTensor `weight` / `bias` (FSDP2) is gathered, its gradient the sum over ranks in its own
    placement.
    """

    def __init__(self, loss_type: str = "dapo", epsilon_low: float = 0.2,
                 epsilon_high: float | None = None, delta: float | None = None, beta: float = 0.0,
                 temperature: float = 1.0, importance_sampling_level: str = "token",
                 use_bias_correction_kl: bool = False, max_completion_length: int | None = None,
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, *,
                 with_entropy: bool = True, ignore_index: int = -100, sweep: str = "auto",
                 softcap: float | None = None, logit_scale: float = 1.0,
                 per_sequence_metrics: bool = False, process_group=None):
        super().__init__()
        self.options = dict(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                            delta=delta, beta=beta, importance_sampling_level=importance_sampling_level,
                            use_bias_correction_kl=use_bias_correction_kl,
                            max_completion_length=max_completion_length,
                            sapo_temperature_pos=sapo_temperature_pos,
                            sapo_temperature_neg=sapo_temperature_neg)
        G.make_config(**self.options, T=1, where="GRPOLoss")  # validate now
        self.temperature = TLP.check_temperature("GRPOLoss", temperature)
        TLP.head_constants("GRPOLoss", self.temperature, softcap, logit_scale)  # validate now
        self.softcap = None if softcap is None else float(softcap)
        self.logit_scale = float(logit_scale)
        self.with_entropy = bool(with_entropy)
        TLP.check_ignore_index("GRPOLoss", ignore_index)
        self.ignore_index = int(ignore_index)
        if sweep not in ("auto", "one", "two"):
            raise ValueError(f"GRPOLoss: sweep expected 'auto', 'one' or 'two', got {sweep!r}")
        self.sweep = sweep
        self.per_sequence_metrics = bool(per_sequence_metrics)
        if process_group is not None:
            from r1kernels import distributed

            distributed.check_group("GRPOLoss", process_group)
        self.process_group = process_group

    def extra_repr(self) -> str:
        head = "" if self.softcap is None else f", softcap={self.softcap}"
        head += "" if self.logit_scale == 1.0 else f", logit_scale={self.logit_scale}"
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + \
            f", temperature={self.temperature}" + head

    def _prepare(self, where, x, labels, mask, advantages, old_logps, ref_logps, rollout_is_weights,
                 num_items_in_batch):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            raise ValueError(f"{where}: expected a floating [B, T, *] tensor, got "
                             f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}")
        B, T = x.shape[:2]
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, T) \
                or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"{where}: labels must be an integer tensor of shape {(B, T)}, got "
                             f"{tuple(getattr(labels, 'shape', ()))} {getattr(labels, 'dtype', '')}")
        shape_only = x.new_empty((), dtype=torch.float32).expand(B, T)
        beta = self.options["beta"]
        adv, mask, nitems = G.check_inputs(shape_only, advantages, mask, old_logps, ref_logps,
                                           rollout_is_weights, num_items_in_batch, beta, where=where)
        cfg = G.make_config(**self.options, T=T, where=where)
        backend = dispatch.select(G.OP, x.device)
        ref = ref_logps if cfg.beta != 0.0 else None
        return B, T, adv, mask, nitems, cfg, backend, ref

    def _output(self, loss, out, ent, per_seq):
        metrics = G.metrics_dict(out)
        if self.with_entropy:
            metrics["entropy"] = ent
        if self.per_sequence_metrics:
            for i, name in enumerate(G.METRIC_NAMES[1:]):
                metrics[name + "_per_sequence"] = per_seq[i]
        return GRPOLossOutput(loss, metrics)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor, advantages: torch.Tensor, *, bias: torch.Tensor | None = None,
                old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                rollout_is_weights: torch.Tensor | None = None,
                num_items_in_batch=None) -> GRPOLossOutput:
        """hidden [B, T, H] (states that predict `labels`), weight [V, H] (lm_head), labels [B, T]."""
        where = "GRPOLoss"
        B, T, adv, mask, nitems, cfg, backend, ref = self._prepare(
            where, hidden, labels, mask, advantages, old_logps, ref_logps, rollout_is_weights,
            num_items_in_batch)
        labels = labels.to(torch.int64)  # (see TLP.flat_labels)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
                or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{where}: weight must be [V, {hidden.shape[-1]}], got "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        if bias is not None and (not isinstance(bias, torch.Tensor)
                                 or tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(f"{where}: bias must be [{weight.shape[0]}], got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        opts = (B, T, self.temperature, self.ignore_index, self.with_entropy, backend, self.sweep,
                self.softcap, self.logit_scale, self.process_group)
        from r1kernels import distributed

        weight, bias = distributed.gather_weight(weight), distributed.gather_weight(bias)
        loss, out, ent, per_seq = _FusedLinearGRPOLoss.apply(
            hidden, weight, bias, labels, adv, mask, old_logps, ref, rollout_is_weights, nitems,
            cfg, opts)
        return self._output(loss, out, ent, per_seq)

    def from_logits(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    advantages: torch.Tensor, *, old_logps: torch.Tensor | None = None,
                    ref_logps: torch.Tensor | None = None,
                    rollout_is_weights: torch.Tensor | None = None, num_items_in_batch=None,
                    inplace: bool = False, process_group=None) -> GRPOLossOutput:
        """The same loss from logits [B, T, V]. `inplace=True`: the logits gradient is written
        into `logits` (the caller must not use the logits afterwards); under torch.compile the
        gradient gets a buffer of its own (a traced function cannot compare data pointers).
        `process_group`: the logits [B, T, V_r] are this rank's slice of the vocabulary
        (default: the constructor's process_group)."""
        group = self.process_group if process_group is None else process_group
        if group is not None:
            from r1kernels import distributed

            distributed.check_group("GRPOLoss.from_logits", group)
        B, T, adv, mask, nitems, cfg, backend, ref = self._prepare(
            "GRPOLoss.from_logits", logits, labels, mask, advantages, old_logps, ref_logps,
            rollout_is_weights, num_items_in_batch)
        labels = labels.to(torch.int64)  # (see TLP.flat_labels)
        inplace = bool(inplace) and not torch.compiler.is_compiling()
        opts = (B, T, self.temperature, self.ignore_index, self.with_entropy, backend,
                inplace, self.softcap, self.logit_scale, group)
        loss, out, ent, per_seq = _FusedLogitsGRPOLoss.apply(
            logits, labels, adv, mask, old_logps, ref, rollout_is_weights, nitems, cfg, opts)
        return self._output(loss, out, ent, per_seq)
