"""Titans neural memory layer (MATH section 3) on ops.titan_update / ops.titan_mlp_update.

q, k, v: projections with SiLU and a short causal depthwise convolution; q, k L2-normalised;
theta (learning rate), eta (momentum decay), alpha (forget) from a small projection of x
through sigmoids. Output: per-head RMSNorm, a sigmoid output gate, a projection.

The memory's writes are differentiated by the outer loss (this is how the projections and the
gates learn). Streaming is exact for any split: the state keeps the chunk-start memory and the
tokens of the unfinished chunk, which are replayed (reads from the chunk-start memory) until
their chunk is complete.

Decoding (decode_begin / decode / decode_end) needs no replay: a token of an unfinished chunk
reads the chunk-start memory, so the one-token step reads it directly and stores the token's
q, k, v and gates in a preallocated chunk buffer; the token that completes the chunk runs the
write (the same `_run` as forward, over the whole chunk) inside the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..checks import positive_int
from ..ops.titan import ACT_SLOPE, bounded_step, mlp_curvature  # noqa: F401 (public here too)
from .common import CausalDepthwiseConv, RMSNorm, dense, fast_weight


@dataclass
class TitansState:
    memory: tuple[Tensor, ...]  # chunk-start (M, S) or (W1, W2, S1, S2), [B, H, ...] each
    pending: tuple[Tensor, ...]  # q, k, v [B, P, H, d] and theta, eta, alpha [B, P, H], P < chunk
    conv: Tensor  # [B, kernel-1, 3D]


@dataclass
class TitansDecode:
    """The decode step's state: the chunk-start memory, the unfinished chunk's q, k, v
    [B, C, 3, H, d] and gates theta, eta, alpha [B, C, 3, H] of which `n` are filled, and
    the convolution's last inputs."""

    memory: list[Tensor]
    qkv: Tensor
    gates: Tensor
    n: int
    conv: Tensor


class TitansMemory(nn.Module):
    # The MLP memory's step bound runs inside titan_mlp_update's chunk loop (one call per
    # segment). False: one op call per chunk with this module's `bounded_step`, the same numbers
    # bit for bit (the studies patch `bounded_step` to reproduce older rules, with this False).
    mlp_bound_in_op = True

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

    def fast_memories(self, state: TitansState) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (fast value [B, ...], the slow initial state it started from): for telemetry."""
        names = ("memory",) if self.kind == "linear" else ("W1", "W2")
        return dict(zip(names, zip(state.memory, self._slow_memory())))

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
        pending = tuple(t[:, full:].clone() for t in seq)  # a copy, not a view (FSDP2 drops hooks on views)
        return self.out(y), TitansState(tuple(mem), pending, conv)

    # ----- the one-token decode step -----------------------------------------------------
    def decode_begin(self, state: TitansState, pos: int = 0, room: int = 0) -> TitansDecode:
        q = state.pending[0]
        B, P = q.shape[:2]
        qkv = q.new_empty(B, self.chunk, 3, self.h, self.d)
        gates = q.new_empty(B, self.chunk, 3, self.h)
        qkv[:, :P] = torch.stack(state.pending[:3], 2)
        gates[:, :P] = torch.stack(state.pending[3:], 2)
        return TitansDecode(list(state.memory), qkv, gates, P, state.conv)

    def decode(self, x: Tensor, buf: TitansDecode, pos: int = 0) -> Tensor:
        """x [B, D] -> the layer's output [B, D] for one token (forward's arithmetic: a read of
        the chunk-start memory; the write when the token completes its chunk)."""
        B, D = x.shape
        u = F.silu(F.linear(x, self.qkv.weight))
        full = torch.cat([buf.conv.to(u.dtype), u[:, None]], 1)  # [B, kernel, 3D]
        # the causal convolution at one position: a weighted sum of the last `kernel` inputs (a
        # one-output conv1d costs ~40x more through the convolution library)
        y = (full * self.conv.weight.t().to(u.dtype)).sum(1)
        buf.conv = full[:, 1:]
        qkv = y.view(B, 3, self.h, self.d)
        qk = F.normalize(qkv[:, :2], dim=-1)
        buf.qkv[:, buf.n, :2], buf.qkv[:, buf.n, 2] = qk, qkv[:, 2]
        buf.gates[:, buf.n] = torch.sigmoid(F.linear(x, self.gates.weight, self.gates.bias)).view(B, 3, self.h)
        buf.n += 1
        q = qk[:, 0, :, None].to(buf.memory[0].dtype)  # [B, H, 1, d]
        if self.kind == "linear":
            o = q @ buf.memory[0].transpose(-1, -2)
        else:
            W1, W2 = buf.memory[:2]
            o = q + F.silu(q @ W2.transpose(-1, -2)) @ W1.transpose(-1, -2)
        if buf.n == self.chunk:  # the chunk is complete: its write, as forward makes it
            _, buf.memory = self._run([*buf.qkv.unbind(2), *buf.gates.unbind(2)], buf.memory)
            buf.n = 0
        y = F.rms_norm(o.to(x.dtype).reshape(B, self.h, self.d), (self.d,), self.norm.weight, self.norm.eps)
        y = y.reshape(B, D) * torch.sigmoid(F.linear(x, self.gate.weight))
        return F.linear(y, self.out.weight)

    def decode_end(self, buf: TitansDecode) -> TitansState:
        pending = (*buf.qkv[:, :buf.n].unbind(2), *buf.gates[:, :buf.n].unbind(2))
        return TitansState(tuple(buf.memory), tuple(t.clone() for t in pending), buf.conv.clone())

    def _run(self, seq: list[Tensor], mem: list[Tensor]):
        q, k, v, theta, eta, alpha = seq
        if self.kind == "linear":  # the curvature 2 ||k||^2 does not depend on the state: one call
            theta = theta * bounded_step(theta, 2 * k.float().square().sum(-1), eta, alpha, self.chunk)
            o, st = ops.titan_update(q, k, v, theta, eta, alpha, initial_state=tuple(mem), chunk_size=self.chunk)
            return o, list(st)
        if self.mlp_bound_in_op:  # the bound at each chunk's start weights, inside the op's chunk loop
            o, mem = ops.titan_mlp_update(q, k, v, theta, eta, alpha, initial_state=tuple(mem), chunk_size=self.chunk,
                                          curvature_bound=True)
            return o, list(mem)
        outs, T = [], q.shape[1]
        for s in range(0, T, self.chunk):  # the same, one call per chunk with the module's bounded_step
            c = slice(s, min(s + self.chunk, T))
            th = theta[:, c] * bounded_step(theta[:, c], mlp_curvature(k[:, c], mem[0], mem[1]), eta[:, c],
                                            alpha[:, c], self.chunk)
            o, mem = ops.titan_mlp_update(q[:, c], k[:, c], v[:, c], th, eta[:, c], alpha[:, c],
                                          initial_state=tuple(mem), chunk_size=self.chunk)
            outs.append(o)
        return torch.cat(outs, 1), list(mem)
