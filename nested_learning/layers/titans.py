"""Titans neural memory layer (MATH section 3) on ops.titan_update / ops.titan_mlp_update.

q, k, v: projections with SiLU and a short causal depthwise convolution; q, k L2-normalised;
theta (learning rate), eta (momentum decay), alpha (forget) from a small projection of x
through sigmoids. Output: per-head RMSNorm, a sigmoid output gate, a projection.

The memory's writes are differentiated by the outer loss (this is how the projections and the
gates learn). Streaming is exact for any split: the state keeps the chunk-start memory and the
tokens of the unfinished chunk, which are replayed (reads from the chunk-start memory) until
their chunk is complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops._checks import positive_int
from .common import CausalDepthwiseConv, RMSNorm, dense, fast_weight


@dataclass
class TitansState:
    memory: tuple[Tensor, ...]  # chunk-start (M, S) or (W1, W2, S1, S2), [B, H, ...] each
    pending: tuple[Tensor, ...]  # q, k, v [B, P, H, d] and theta, eta, alpha [B, P, H], P < chunk
    conv: Tensor  # [B, kernel-1, 3D]


class TitansMemory(nn.Module):
    def __init__(self, d_model: int, n_heads: int, memory: str = "linear", chunk_size: int = 16,
                 conv_kernel: int = 4, mlp_hidden: int = 2):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if memory not in ("linear", "mlp"):
            raise ValueError(f"memory must be 'linear' or 'mlp', got {memory!r}")
        positive_int("chunk_size", chunk_size)
        self.h, self.d, self.kind, self.chunk = n_heads, d_model // n_heads, memory, chunk_size
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = CausalDepthwiseConv(3 * d_model, conv_kernel)
        self.gates = nn.Linear(d_model, 3 * n_heads)
        # theta ~ 0.007, eta ~ 0.73, alpha ~ 0.018 at init: a chunk sums up to chunk_size
        # gradients taken at one state, so the inner step must stay small to be stable
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([-5.0, 1.0, -4.0]).repeat_interleave(n_heads))
            self.gates.weight.mul_(0.1)
        if memory == "linear":
            self.M0 = nn.Parameter(torch.zeros(n_heads, self.d, self.d))
        else:
            hid = mlp_hidden * self.d
            self.W1 = nn.Parameter(torch.randn(n_heads, self.d, hid) * 0.5 / hid**0.5)
            self.W2 = nn.Parameter(torch.randn(n_heads, hid, self.d) * 0.5 / self.d**0.5)
        self.norm = RMSNorm(self.d)
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _slow_memory(self) -> tuple[Tensor, ...]:
        return (self.M0,) if self.kind == "linear" else (self.W1, self.W2)

    def init_state(self, batch: int, device, dtype) -> TitansState:
        mem = []
        for p in self._slow_memory():
            w = dense(p).to(device=device, dtype=torch.promote_types(dtype, torch.float32))
            mem.append(w.unsqueeze(0).expand(batch, *p.shape).clone())
        mem += [torch.zeros_like(m) for m in mem]  # momenta
        z = lambda *s: torch.zeros(batch, 0, *s, device=device, dtype=dtype)  # noqa: E731
        pending = (z(self.h, self.d), z(self.h, self.d), z(self.h, self.d), z(self.h), z(self.h), z(self.h))
        return TitansState(tuple(mem), pending, self.conv.init_state(batch, device, dtype))

    def forward(self, x: Tensor, state: TitansState) -> tuple[Tensor, TitansState]:
        B, T, D = x.shape
        qkv, conv = self.conv(F.silu(self.qkv(x)), state.conv)
        q, k, v = qkv.view(B, T, 3, self.h, self.d).unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        theta, eta, alpha = torch.sigmoid(self.gates(x)).view(B, T, 3, self.h).unbind(2)
        new = (q, k, v, theta, eta, alpha)
        seq = [torch.cat([p.to(n.dtype), n], 1) for p, n in zip(state.pending, new)]
        P, L = state.pending[0].shape[1], seq[0].shape[1]
        full = (L // self.chunk) * self.chunk
        n_slow = len(self._slow_memory())
        mem = [fast_weight(s, m, False) for s, m in zip(self._slow_memory(), state.memory[:n_slow])]
        mem += list(state.memory[n_slow:])
        outs = []
        if full:
            o, mem = self._run([t[:, :full] for t in seq], mem)
            outs.append(o)
        if L > full:  # the unfinished chunk reads the chunk-start memory; its writes wait
            o, _ = self._run([t[:, full:] for t in seq], mem)
            outs.append(o)
        o = torch.cat(outs, 1)[:, P:]  # drop the replayed pending tokens
        y = self.norm(o).reshape(B, T, D) * torch.sigmoid(self.gate(x))
        pending = tuple(t[:, full:] for t in seq)
        return self.out(y), TitansState(tuple(mem), pending, conv)

    def _run(self, seq: list[Tensor], mem: list[Tensor]):
        q, k, v, theta, eta, alpha = seq
        if self.kind == "linear":
            o, st = ops.titan_update(q, k, v, theta, eta, alpha, initial_state=tuple(mem), chunk_size=self.chunk)
        else:
            o, st = ops.titan_mlp_update(q, k, v, theta, eta, alpha, initial_state=tuple(mem), chunk_size=self.chunk)
        return o, list(st)
