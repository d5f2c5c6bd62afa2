"""Small shared pieces: RMSNorm, RoPE, the MLP, causal depthwise convolution, and the
stop-gradient-write helper used by every fast state."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rms_norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """norm(x) without the module call (the decode step's per-token overhead)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


class MLP(nn.Module):
    """x -> W_down gelu(W_up x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))

    def decode(self, x: Tensor) -> Tensor:
        """forward without the module calls."""
        return F.linear(F.gelu(F.linear(x, self.up.weight)), self.down.weight)


ROPE_TABLE_POSITIONS = 16384  # positions whose cos/sin are kept per (device, head dim, theta): 4 MB at d=64
_ROPE_TABLES: dict = {}


def rope_angles(start: int, T: int, d: int, theta: float, device) -> tuple[Tensor, Tensor]:
    """cos and sin [T, d/2] (float32) of the rotary angles at positions start .. start+T-1. The
    first ROPE_TABLE_POSITIONS positions come from a table made once (the same float32 products
    as computing them afresh, so the same values), which spares a decoded token the dozen small
    ops that make its angles; later positions are computed each call."""
    inv = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d) if start + T > \
        ROPE_TABLE_POSITIONS else None
    if inv is not None:
        ang = torch.arange(start, start + T, device=device, dtype=torch.float32)[:, None] * inv
        return ang.cos(), ang.sin()
    key = (str(device), d, float(theta))
    table = _ROPE_TABLES.get(key)
    if table is None:
        inv = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        ang = torch.arange(0, ROPE_TABLE_POSITIONS, device=device, dtype=torch.float32)[:, None] * inv
        table = _ROPE_TABLES[key] = (ang.cos(), ang.sin())
    return table[0][start:start + T], table[1][start:start + T]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, d] rotated by the angles cos, sin [T, d/2]."""
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def rope(x: Tensor, start: int, theta: float) -> Tensor:
    """Rotary position embedding of x [B, T, H, d] (d even) at positions start .. start+T-1."""
    return apply_rope(x, *rope_angles(start, x.shape[1], x.shape[-1], theta, x.device))


class CausalDepthwiseConv(nn.Module):
    """Short causal depthwise convolution over time (Titans section 4.4) with a streaming
    state: the last kernel-1 inputs of each sequence."""

    def __init__(self, channels: int, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(channels, kernel))
        with torch.no_grad():
            self.weight[:, -1] = 1.0  # starts as the identity
            self.weight.add_(0.02 * torch.randn_like(self.weight))

    def init_state(self, batch: int, device, dtype) -> Tensor:
        return torch.zeros(batch, self.kernel - 1, self.weight.shape[0], device=device, dtype=dtype)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, C], state [B, kernel-1, C] -> y [B, T, C], new state."""
        full = torch.cat([state.to(x.dtype), x], 1)  # [B, kernel-1+T, C]
        y = F.conv1d(full.transpose(1, 2), self.weight.unsqueeze(1).to(x.dtype), groups=x.shape[-1])
        return y.transpose(1, 2), full[:, full.shape[1] - (self.kernel - 1):].clone()  # a copy, not a view


def dense(p: Tensor) -> Tensor:
    """A parameter's full value, detached (gathers an FSDP2-sharded DTensor: collective)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def fast_weight(slow: Tensor, fast: Tensor, differentiable: bool) -> Tensor:
    """The weight a read uses: the fast state's value, with the outer gradient flowing to the
    slow parameter it started from (stop-gradient writes), or through the writes too. With no
    gradient to route (inference) it is `fast` itself, with no weight-sized work per read;
    with autograd it is slow + sg(fast - slow), which equals `fast` up to one rounding (kept:
    training trajectories, and Titans' stability at the edge, depend on those bits)."""
    if differentiable or not (torch.is_grad_enabled() and slow.requires_grad):
        return fast
    return slow + (fast - slow).detach()
