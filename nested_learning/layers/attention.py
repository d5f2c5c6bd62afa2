"""Causal self-attention: fused QKV, RoPE, scaled_dot_product_attention (flash-attn when
installed and asked for), optional sliding window, and a KV cache for streaming."""

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

    def _flash_ok(self, x: Tensor, cache: KVCache) -> bool:
        return (self.use_flash and flash_attn_func is not None and x.is_cuda
                and x.dtype in (torch.float16, torch.bfloat16) and not bool(cache.start.any()))
