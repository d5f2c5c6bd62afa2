"""Causal self-attention: fused QKV, RoPE, scaled_dot_product_attention (flash-attn when
installed and asked for), optional sliding window, and a KV cache for streaming; a one-token
decode step over a preallocated cache (decode_begin / decode / decode_end)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .common import apply_rope, rope_angles

try:  # optional extra [flash]
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 (absent, or built for another torch)
    flash_attn_func = None


@dataclass
class KVCache:
    """Keys (after RoPE) and values seen so far, [B, S, H, d]; `start` [B] is the first
    absolute position each sequence may attend to (raised by a reset)."""

    k: Tensor
    v: Tensor
    start: Tensor


DECODE_SLACK = 64  # free slots kept past a window: the windowed buffer is compacted once per this many tokens


@dataclass
class KVBuffer:
    """The decode step's KV cache: keys and values [B, H, capacity, d] of which the first `n`
    slots are filled, slot 0 at absolute position `first`; `start` as in KVCache, `masked`
    whether any sequence's start falls inside the buffer (only then is a mask built)."""

    k: Tensor
    v: Tensor
    n: int
    first: int
    start: Tensor
    masked: bool


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rope_theta: float = 10000.0,
                 window: int | None = None, use_flash: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.h, self.d = n_heads, d_model // n_heads
        if self.d % 2:
            raise ValueError(f"head dim {self.d} must be even for RoPE")
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive int or None, got {window}")
        self.rope_theta, self.window, self.use_flash = rope_theta, window, use_flash
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch: int, device, dtype) -> KVCache:
        z = torch.zeros(batch, 0, self.h, self.d, device=device, dtype=dtype)
        return KVCache(z, z.clone(), torch.zeros(batch, dtype=torch.long, device=device))

    def forward(self, x: Tensor, cache: KVCache, pos: int) -> tuple[Tensor, KVCache]:
        """x [B, T, D] at absolute positions pos .. pos+T-1."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.d).unbind(2)
        cos, sin = rope_angles(pos, T, self.d, self.rope_theta, x.device)  # once for q and k
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        K = torch.cat([cache.k.to(k.dtype), k], 1)
        V = torch.cat([cache.v.to(v.dtype), v], 1)
        S = K.shape[1]
        kpos = torch.arange(pos + T - S, pos + T, device=x.device)  # absolute key positions
        qpos = torch.arange(pos, pos + T, device=x.device)
        if self._flash_ok(x, cache):
            win = (-1, -1) if self.window is None else (self.window - 1, 0)
            o = flash_attn_func(q, K, V, causal=True, window_size=win)
        else:
            allowed = kpos[None, :] <= qpos[:, None]  # [T, S]
            if self.window is not None:
                allowed &= kpos[None, :] > qpos[:, None] - self.window
            mask = allowed[None] & (kpos[None, None, :] >= cache.start[:, None, None])  # [B, T, S]
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), attn_mask=mask[:, None]
            ).transpose(1, 2)
        keep = S if self.window is None else min(S, self.window)
        # the new cache is never a view of this call's tensors (FSDP2 drops its hooks on a returned
        # view): the concatenation itself when it is kept whole, else a copy of the window
        new = KVCache(K, V, cache.start) if keep == S else KVCache(K[:, S - keep:].clone(), V[:, S - keep:].clone(),
                                                                     cache.start)
        return self.out(o.reshape(B, T, D)), new

    # ----- the one-token decode step -----------------------------------------------------
    def decode_begin(self, cache: KVCache, pos: int, room: int) -> KVBuffer:
        """A preallocated buffer holding `cache` (the state at position `pos`) with room for
        `room` more keys (a windowed layer keeps window + DECODE_SLACK slots however many)."""
        B, S = cache.k.shape[:2]
        cap = S + max(room, 1) if self.window is None else max(S, self.window) + DECODE_SLACK
        k, v = (c.new_empty(B, self.h, cap, self.d) for c in (cache.k, cache.v))
        k[:, :, :S], v[:, :, :S] = cache.k.transpose(1, 2), cache.v.transpose(1, 2)
        return KVBuffer(k, v, S, pos - S, cache.start, bool((cache.start > pos - S).any()))

    def decode(self, x: Tensor, buf: KVBuffer, pos: int) -> Tensor:
        """x [B, D], the token at absolute position `pos` -> the layer's output [B, D]; the
        buffer takes its key and value. The same arithmetic as forward on one token."""
        B, D = x.shape
        qkv = F.linear(x, self.qkv.weight).view(B, 3, self.h, self.d)
        qk = apply_rope(qkv[:, :2], *rope_angles(pos, 1, self.d, self.rope_theta, x.device))
        if buf.n == buf.k.shape[2]:
            self._make_room(buf)
        buf.k[:, :, buf.n], buf.v[:, :, buf.n] = qk[:, 1], qkv[:, 2]
        buf.n += 1
        lo = 0 if self.window is None else max(0, buf.n - self.window)
        mask = None
        if buf.masked:
            kpos = torch.arange(buf.first + lo, buf.first + buf.n, device=x.device)
            mask = (kpos[None] >= buf.start[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(qk[:, 0, :, None], buf.k[:, :, lo:buf.n], buf.v[:, :, lo:buf.n],
                                           attn_mask=mask)
        return F.linear(o.reshape(B, D), self.out.weight)

    def _make_room(self, buf: KVBuffer) -> None:
        if self.window is None:  # grow (decode_begin sized it for the tokens asked for)
            grow = lambda t: torch.cat([t, t.new_empty(*t.shape[:2], max(t.shape[2], 64), t.shape[3])], 2)  # noqa: E731
            buf.k, buf.v = grow(buf.k), grow(buf.v)
            return
        keep = self.window - 1  # the keys the next token still attends to
        drop = buf.n - keep
        buf.k[:, :, :keep] = buf.k[:, :, drop:buf.n].clone()
        buf.v[:, :, :keep] = buf.v[:, :, drop:buf.n].clone()
        buf.n, buf.first = keep, buf.first + drop

    def decode_end(self, buf: KVBuffer) -> KVCache:
        """The KVCache that forward would have left: every key, or the last `window`."""
        lo = 0 if self.window is None else max(0, buf.n - self.window)
        k, v = (t[:, :, lo:buf.n].transpose(1, 2).contiguous() for t in (buf.k, buf.v))
        return KVCache(k, v, buf.start)

    def _flash_ok(self, x: Tensor, cache: KVCache) -> bool:
        return (self.use_flash and flash_attn_func is not None and x.is_cuda
                and x.dtype in (torch.float16, torch.bfloat16) and not bool(cache.start.any()))
