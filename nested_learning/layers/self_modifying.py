"""Self-modifying Titans (MATH section 6): every projection is an adaptive memory.

Per head (width d), the memories M_q, M_k, M_v ([d, d]) and M_eta, M_alpha ([1, d]) are the
rows of one projection memory P [3d + 2, d]; they produce q, k, v, the learning rate and the
forget gate from the input, and are all updated in context by the DGD rule of section 2 with
self-generated targets. The q, k and v memories are residual, M(x) = x + W x (MATH 6): the
target M_{t-1}(v) = v + W v gives a = 2k - v and the write w = eta (v - k), so the memory
moves towards its own output on v and the target carries the value. The two gate memories
map d -> 1 and cannot be residual: they are plain (a = 2k - v, w = 0) and relax towards the
gate biases. Inside a projection chunk every token is projected by the chunk-start P; the
DGD writes then advance P token by token for the next chunk (projection chunk 1 is the exact
recurrence).

The main memory M_memory [d, d] is residual too and reads before it writes,
o_t = q_t + W_{t-1} q_t, with the same DGD rule (ops.dgd_update, its own chunk size, which
changes only the parallel schedule): self-generated target a = 2k - v, w = eta (v - k);
given values (NL Eq. 28 with the residual) a = 2k, w = eta (v - k).

residual=False restores the plain memories M(x) = W x (w = 0 for self-generated targets,
w = eta v for given values). Measured: they only forget (a product of contractions), the
mixer's output decays to zero within a few hundred tokens of every context, and the outer
gradient through the normalisations of the decayed reads explodes (docs/stability_journal.md).

Gradients: memory initial states are slow parameters, trained through the reads
(stop-gradient writes: w_read = w_slow + sg(w_fast - w_slow)). The main memory's writes are
always differentiated: they are the only path by which k, v and the gates reach the loss.
The projection memory's writes are stop-gradient unless differentiable_writes=True.
Streaming is exact for any split (the unfinished projection chunk is kept and replayed).

The projection memory's recurrence runs as one op, ops.selfmod_projection (every token read by
its chunk-start P, then each complete chunk's writes; C++ on the CPU, Triton on CUDA);
`fused_projection = False` restores the per-chunk Python loop it replaced.

Decoding (decode_begin / decode / decode_end) replays nothing: a token projects itself with the
chunk-start P, reads and writes the main memory by the one-token DGD recurrence, and keeps its
input in a preallocated chunk buffer; the token that completes a projection chunk makes the
chunk's write (`_advance`, the same op as forward's) inside the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..checks import positive_int, range_checks_off
from .common import RMSNorm, dense, fast_weight

MEMORY_TARGETS = ("self", "values")


@dataclass
class SelfModifyingState:
    proj: Tensor  # chunk-start projection memory [B, H, 3d+2, d]
    memory: Tensor  # main memory [B, H, d, d]
    pending: Tensor  # inputs of the unfinished projection chunk [B, P, H, d]
    pending_valid: Tensor  # [B, P] False for tokens dropped by a reset (identity writes)


@dataclass
class SelfModifyingDecode:
    """The decode step's state: the chunk-start projection memory P and the main memory M as
    in SelfModifyingState, the unfinished chunk's inputs x [B, C, H, d] and `valid` [B, C]
    (False for tokens dropped by a reset), of which the first `n` are filled."""

    proj: Tensor
    memory: Tensor
    x: Tensor
    valid: Tensor
    n: int


class SelfModifyingTitans(nn.Module):
    # The projection memory's chunk recurrence: True (the default) runs it as one op
    # (ops.selfmod_projection: C++ on the CPU, Triton on CUDA); False runs the per-chunk Python
    # loop it replaced (one projection, gates and dgd_update write per chunk), kept as the
    # benchmark's baseline and for the campaign that trained with it. The two agree to float
    # rounding (tests/models/test_selfmod_projection_op.py; bench/RESULTS.md 17).
    fused_projection = True

    def __init__(self, d_model: int, n_heads: int, proj_chunk: int = 16, memory_chunk: int = 64,
                 eta_max: float = 0.3, differentiable_writes: bool = False, self_modifying: bool = True,
                 memory_target: str = "self", residual: bool = True, forget_bias: float = 8.0):
        """self_modifying=False: the projections are ordinary slow linear maps (P0, never
        written); memory_target: the main memory's target, "self" (self-generated values,
        a = 2k - v) or "values" (the given values, NL Eq. 28: a = 2k); residual: memories
        read x + W x (the default, MATH 6) or W x; forget_bias: the forget gate's initial
        bias (alpha = sigmoid(forget_bias) per token at init)."""
        super().__init__()
        if memory_target not in MEMORY_TARGETS:
            raise ValueError(f"memory_target must be one of {MEMORY_TARGETS}, got {memory_target!r}")
        self.self_modifying, self.memory_target = bool(self_modifying), memory_target
        self.residual = bool(residual)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        positive_int("proj_chunk", proj_chunk)
        positive_int("memory_chunk", memory_chunk)
        if not 0 < eta_max <= 1:
            raise ValueError(f"eta_max must lie in (0, 1], got {eta_max}")
        self.h, self.d = n_heads, d_model // n_heads
        self.proj_chunk, self.memory_chunk = proj_chunk, memory_chunk
        self.eta_max, self.differentiable_writes = eta_max, differentiable_writes
        d = self.d
        P0 = torch.randn(n_heads, 3 * d + 2, d) / d**0.5
        P0[:, 3 * d:] *= 0.1
        self.P0 = nn.Parameter(P0)
        self.gate_bias = nn.Parameter(torch.tensor([0.0, float(forget_bias)]).repeat(n_heads, 1))  # eta, alpha
        self.M0 = nn.Parameter(torch.randn(n_heads, d, d) / d**0.5)
        self.norm = RMSNorm(d)
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch: int, device, dtype) -> SelfModifyingState:
        sdt = torch.promote_types(dtype, torch.float32)
        b = lambda p: dense(p).to(device, sdt).unsqueeze(0).expand(batch, *p.shape).clone()  # noqa: E731
        return SelfModifyingState(b(self.P0), b(self.M0),
                                  torch.zeros(batch, 0, self.h, self.d, device=device, dtype=dtype),
                                  torch.zeros(batch, 0, dtype=torch.bool, device=device))

    def fast_memories(self, state: SelfModifyingState) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (fast value [B, ...], the slow initial state it started from): for telemetry."""
        return {"proj": (state.proj, self.P0), "memory": (state.memory, self.M0)}

    def _project(self, x: Tensor, P: Tensor):
        """x [B, C, H, d] through P [B, H, 3d+2, d] -> q, k, v [B, C, H, d], eta, alpha [B, C, H]."""
        return self._project_y(torch.einsum("bchi,bhoi->bcho", x, P.to(x.dtype)), x)

    def _project_y(self, y: Tensor, x: Tensor):
        """q, k, v, eta, alpha from the raw projection y [B, C, H, 3d+2] of x [B, C, H, d]. Split,
        view and unbind, not slices: their backward concatenates instead of zero-filling a
        y-sized gradient per slice."""
        d = self.d
        qkv, g = y.split([3 * d, 2], -1)
        qkv = qkv.unflatten(-1, (3, d))
        if self.residual:  # M(x) = x + W x for the q, k and v memories
            qkv = qkv + x.unsqueeze(-2)
        q, k, v = F.normalize(qkv, dim=-1).unbind(-2)
        g_eta, g_alpha = (g + self.gate_bias.to(x.dtype)).unbind(-1)
        eta = self.eta_max * torch.sigmoid(g_eta)
        alpha = torch.sigmoid(g_alpha).clamp(min=1e-4)
        return q, k, v, eta, alpha

    def forward(self, x: Tensor, state: SelfModifyingState) -> tuple[Tensor, SelfModifyingState]:
        B, T, D = x.shape
        xs = torch.cat([state.pending.to(x.dtype), x.view(B, T, self.h, self.d)], 1)
        valid = torch.cat([state.pending_valid, state.pending_valid.new_ones(B, T)], 1)
        Pn, L, C = state.pending.shape[1], xs.shape[1], self.proj_chunk
        P = fast_weight(self.P0, state.proj, self.differentiable_writes)
        if not self.self_modifying:  # static projections: P is never written
            q, k, v, eta, alpha = self._project(xs[:, Pn:], P)
        elif self.fused_projection:
            y, P = ops.selfmod_projection(xs, P, self.gate_bias, valid, C, self.eta_max, self.residual,
                                          stop_writes=not self.differentiable_writes)
            q, k, v, eta, alpha = self._project_y(y[:, Pn:] if Pn else y, xs[:, Pn:] if Pn else xs)
        else:
            q, k, v, eta, alpha, P = self._project_loop(xs, valid, P)
            q, k, v, eta, alpha = (t[:, Pn:] for t in (q, k, v, eta, alpha))
        M = fast_weight(self.M0, state.memory, False)
        a = 2 * k - v if self.memory_target == "self" else 2 * k
        if self.residual:
            w = eta[..., None] * (v - k)
        else:
            w = torch.zeros_like(v) if self.memory_target == "self" else eta[..., None] * v
        o, M = ops.dgd_update(q, k, w, alpha, eta, a=a, initial_state=M, read="before",
                              chunk_size=self.memory_chunk)
        if self.residual:
            o = o + q
        y = self.norm(o).reshape(B, T, D) * torch.sigmoid(self.gate(x))
        full = (L // C) * C
        return self.out(y), SelfModifyingState(P, M, xs[:, full:].clone(), valid[:, full:].clone())

    # ----- the one-token decode step -----------------------------------------------------
    def decode_begin(self, state: SelfModifyingState, pos: int = 0, room: int = 0) -> SelfModifyingDecode:
        B, Pn = state.pending.shape[:2]
        x = state.pending.new_empty(B, self.proj_chunk, self.h, self.d)
        valid = state.pending_valid.new_zeros(B, self.proj_chunk)
        x[:, :Pn], valid[:, :Pn] = state.pending, state.pending_valid
        return SelfModifyingDecode(state.proj, state.memory, x, valid, Pn)

    def decode(self, x: Tensor, buf: SelfModifyingDecode, pos: int = 0) -> Tensor:
        """x [B, D] -> the mixer's output [B, D] for one token: forward's arithmetic, the main
        memory advanced by one token of its recurrence (MATH 2: W <- alpha W + (w - eta W a)
        k^T after the read o = q + W q), the projection memory written when the chunk completes."""
        B, D = x.shape
        d = self.d
        xh = x.view(B, self.h, d)
        y = (buf.proj.to(x.dtype) @ xh[..., None]).squeeze(-1)  # [B, H, 3d+2]
        qkv = y[..., :3 * d].view(B, self.h, 3, d)
        if self.residual:
            qkv = qkv + xh[:, :, None]
        q, k, v = F.normalize(qkv, dim=-1).unbind(2)
        g = y[..., 3 * d:] + self.gate_bias.to(x.dtype)
        eta = self.eta_max * torch.sigmoid(g[..., 0])
        alpha = torch.sigmoid(g[..., 1]).clamp(min=1e-4)
        buf.x[:, buf.n], buf.valid[:, buf.n] = xh, True
        buf.n += 1
        M, cdt = buf.memory, buf.memory.dtype
        q, k, v, eta, alpha = (t.to(cdt) for t in (q, k, v, eta, alpha))
        a = 2 * k - v if self.memory_target == "self" else 2 * k
        read = M @ torch.stack([q, a], -1)  # [B, H, d, 2]: W q and W a
        o = read[..., 0]
        if self.residual:
            w = eta[..., None] * (v - k)
        else:
            w = torch.zeros_like(v) if self.memory_target == "self" else eta[..., None] * v
        u = w - eta[..., None] * read[..., 1]
        buf.memory = torch.baddbmm((M * alpha[..., None, None]).view(-1, d, d), u.reshape(-1, d, 1),
                                   k.reshape(-1, 1, d)).view(M.shape)
        if self.residual:
            o = o + q
        if buf.n == self.proj_chunk:
            if self.self_modifying:
                buf.proj = self._advance(buf.proj, buf.x, buf.valid)
            buf.n = 0
        o = F.rms_norm(o.to(x.dtype), (d,), self.norm.weight, self.norm.eps).reshape(B, D)
        return F.linear(o * torch.sigmoid(F.linear(x, self.gate.weight)), self.out.weight)

    def decode_end(self, buf: SelfModifyingDecode) -> SelfModifyingState:
        return SelfModifyingState(buf.proj, buf.memory, buf.x[:, :buf.n].clone(), buf.valid[:, :buf.n].clone())

    def _project_loop(self, xs: Tensor, valid: Tensor, P: Tensor):
        """The per-chunk loop (fused_projection=False): each chunk projected by its start P, then
        written by _write. Returns q, k, v, eta, alpha of every token of xs and the state's P."""
        C, parts = self.proj_chunk, []
        for s0 in range(0, xs.shape[1], C):
            s1 = min(s0 + C, xs.shape[1])
            q, k, v, eta, alpha = self._project(xs[:, s0:s1], P)
            parts.append((q, k, v, eta, alpha))
            if s1 - s0 == C:  # a complete chunk advances the projection memory
                ok = valid[:, s0:s1, None]
                P = self._write(P, k, v, torch.where(ok, eta, 0.0), torch.where(ok, alpha, 1.0))
        return (*(torch.cat(t, 1) for t in zip(*parts)), P)

    def _advance(self, P: Tensor, x: Tensor, valid: Tensor) -> Tensor:
        """P after one complete chunk x [B, C, H, d] of writes, as forward makes them."""
        if self.fused_projection:
            return ops.selfmod_projection(x, P, self.gate_bias, valid, self.proj_chunk, self.eta_max, self.residual,
                                          stop_writes=not self.differentiable_writes)[1]
        _, k, v, eta, alpha = self._project(x, P)
        ok = valid[..., None]
        return self._write(P, k, v, torch.where(ok, eta, 0.0), torch.where(ok, alpha, 1.0))

    def _write(self, P: Tensor, k, v, eta, alpha) -> Tensor:
        """Advance P [B, H, 3d+2, d] over one chunk: every row block's target is its own output
        on v; the residual q, k, v blocks write eta (v - k), the gate rows nothing."""
        w = torch.zeros(*k.shape[:3], P.shape[2], device=k.device, dtype=k.dtype)
        if self.residual:
            w = torch.cat([(eta[..., None] * (v - k)).repeat(1, 1, 1, 3), w[..., 3 * self.d:]], -1)
        args = (k, k, w, alpha, eta)
        a = 2 * k - v
        if not self.differentiable_writes:
            args, a, P = tuple(t.detach() for t in args), a.detach(), P.detach()
        with range_checks_off():  # the gates are in range by construction (a NaN still reaches the main memory's check)
            _, P_new = ops.dgd_update(*args, a=a, initial_state=P, read="before", chunk_size=self.proj_chunk)
        return P_new if self.differentiable_writes else fast_weight(self.P0, P_new, False)
