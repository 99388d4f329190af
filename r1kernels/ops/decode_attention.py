"""Decode attention: one query token per row against slots kv_start[b] .. kv_len[b] - 1 of a
KV cache (kv_start: 0 unless given; a left-padded prompt's first real slot, as flash-attention's
`cache_leftpad`).

    S = kv_start[b] .. kv_len[b] - 1, G = Hq / Hkv (query head h reads key/value head h // G, as
    `repeat_kv` maps it)
    out[b, h] = softmax(scale * q[b, h] . k[b, h // G, S]^T + mask[b, S]) @ v[b, h // G, S]

A row with no slot (kv_len <= kv_start: kv_len 0 is a finished completion, in a rollout) or whose
slots are all masked (-inf) gets zeros, never NaN. `mask` is an additive [B, L] mask (0 / a large
negative / -inf). What the slots outside S hold changes nothing: the C++ kernel never reads them;
the torch path masks them out, so there they must be finite (as a cache's slots always are).

Backends: a C++ CPU kernel (csrc/decode_attention/: one task per row and key/value head, the
query heads that share the head computed together so each key and value is read from memory
once, nothing repeated or copied, slots outside S not read at all, fp32 accumulation; on
AVX-512 CPUs fp32 scores 16 slots at a time), and a torch path (any device; what CUDA runs, where
SDPA is already a fused decode kernel): SDPA over the whole cache with the slots outside S masked.
"""
from __future__ import annotations

import torch

from r1kernels import dispatch

OP = "decode_attention"
dispatch.register(OP, cuda=("torch",), cpu=("cpp", "torch"))


def decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           kv_len: torch.Tensor, mask: torch.Tensor | None, scale: float,
                           kv_start: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over the whole cache, the slots outside [kv_start, kv_len) masked; rows left
    without a slot: 0."""
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    pos = torch.arange(L, device=q.device)[None, :]
    live = pos < kv_len[:, None]
    if kv_start is not None:
        live &= pos >= kv_start[:, None]
    add = torch.zeros((B, L), dtype=q.dtype, device=q.device)
    if mask is not None:
        add = add + mask.to(q.dtype)
    add = add.masked_fill(~live, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(B, Hkv, Hq // Hkv, D), k, v, attn_mask=add[:, None, None, :], scale=scale)
    has = (add > float("-inf")).any(-1)
    return torch.where(has[:, None, None], out.reshape(B, Hq, D), torch.zeros((), dtype=q.dtype,
                                                                             device=q.device))


def _check(q, k, v, kv_len, mask, kv_start) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"decode_attention: {name} must be a floating-point tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be [B, Hq, D], got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"decode_attention: k and v must be [B, Hkv, L, D] = [{B}, Hkv, L, {D}], "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] < 1 or Hq % k.shape[1]:
        raise ValueError(f"decode_attention: q's heads ({Hq}) must be a multiple of k's "
                         f"({k.shape[1]})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_attention: q, k, v must share one dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not isinstance(kv_len, torch.Tensor) or kv_len.dtype != torch.int64 \
            or tuple(kv_len.shape) != (B,) or kv_len.device != q.device:
        raise ValueError(f"decode_attention: kv_len must be int64 [{B}] on {q.device}, got "
                         f"{getattr(kv_len, 'dtype', type(kv_len).__name__)} "
                         f"{tuple(getattr(kv_len, 'shape', ()))}")
    if kv_start is not None and (not isinstance(kv_start, torch.Tensor)
                                 or kv_start.dtype != torch.int64
                                 or tuple(kv_start.shape) != (B,) or kv_start.device != q.device):
        raise ValueError(f"decode_attention: kv_start must be int64 [{B}] on {q.device}, got "
                         f"{getattr(kv_start, 'dtype', type(kv_start).__name__)} "
                         f"{tuple(getattr(kv_start, 'shape', ()))}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or not mask.is_floating_point()
                             or tuple(mask.shape) != (B, k.shape[2]) or mask.device != q.device):
        raise ValueError(f"decode_attention: mask must be a floating [B, L] = [{B}, {k.shape[2]}] "
                         f"additive mask on {q.device}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(getattr(mask, 'shape', ()))}")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor, *,
                     mask: torch.Tensor | None = None, scale: float | None = None,
                     kv_start: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per row over slots `kv_start[b] .. kv_len[b] - 1` of a KV
    cache.

    q [B, Hq, D]; k, v [B, Hkv, L, D] (transformers' cache layout; Hq a multiple of Hkv);
    kv_len int64 [B] in [0, L]; mask: optional additive [B, L]; scale: default D ** -0.5;
    kv_start: optional int64 [B] in [0, L], the first slot each row reads (default 0).
    Returns [B, Hq, D] in q's dtype. Inference only: no backward (a rollout runs under
    torch.no_grad()). See docs/api.md. On CPU kv_len or kv_start outside [0, L] raises
    IndexError; on CUDA they are not read back (no host sync): they act as clamped to [0, L].
    """
    _check(q, k, v, kv_len, mask, kv_start)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask)):
        raise ValueError("decode_attention: inference only (no backward): call it under "
                         "torch.no_grad() or with inputs that do not require grad")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = dispatch.select(OP, q.device)
    if backend == "cpp":
        return torch.ops.r1kernels.decode_attention(q, k, v, kv_len, mask, scale, kv_start)
    if q.device.type == "cpu" and kv_len.numel() and not torch.compiler.is_compiling():
        for name, t in (("kv_len", kv_len), ("kv_start", kv_start)):
            if t is not None and not bool(((t >= 0) & (t <= k.shape[2])).all()):
                bad = int(torch.nonzero((t < 0) | (t > k.shape[2]))[0, 0])
                raise IndexError(f"decode_attention: {name}[{bad}] = {int(t[bad])} is outside "
                                 f"[0, {k.shape[2]}]")
    return decode_attention_torch(q, k, v, kv_len, mask, scale, kv_start)
