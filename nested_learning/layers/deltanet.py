"""The gated delta rule (DeltaNet with a forget gate; Yang, Kautz & Hatamizadeh, 2024) as a
sequence mixer, on ops.dgd_update with a = k and w = beta v:

    S_t = S_{t-1} (alpha_t I - beta_t k_t k_t^T) + beta_t v_t k_t^T,    o_t = S_t q_t

per head, with L2-normalised q and k (so the transition's eigenvalues lie in
[alpha - beta, alpha] and never expand the state), beta_t = sigmoid(.) the writing strength and
alpha_t = sigmoid(. + 4) the forget gate. The state starts at zero for every sequence. HOPE's
`mixer="deltanet"` ablation; no kernel of its own (MATH section 2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..checks import positive_int
from .common import RMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, d_model: int, n_heads: int, chunk_size: int = 64):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.h, self.d, self.chunk = n_heads, d_model // n_heads, positive_int("chunk_size", chunk_size)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.gates = nn.Linear(d_model, 2 * n_heads)
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([0.0] * n_heads + [4.0] * n_heads))
        self.norm = RMSNorm(self.d)
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def fast_memories(self, state: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (fast value [B, ...], its initial value): the memory starts at zero."""
        return {"memory": (state, torch.zeros_like(state[0]))}

    def init_state(self, batch: int, device, dtype) -> Tensor:
        return torch.zeros(batch, self.h, self.d, self.d, device=device, dtype=torch.promote_types(dtype, torch.float32))

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.d).unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        dt = torch.promote_types(x.dtype, torch.float32)  # the recurrence runs in float32 at least
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        g = torch.sigmoid(self.gates(x).to(dt))
        beta, alpha = g[..., : self.h], g[..., self.h:]
        o, state = ops.dgd_update(q, k, beta[..., None] * v, alpha, beta, a=k, initial_state=state.to(dt),
                                  read="after", chunk_size=self.chunk)
        y = self.norm(o.to(x.dtype)).reshape(B, T, D) * torch.sigmoid(self.gate(x))
        return self.out(y), state

    # ----- the one-token decode step (the state is the memory itself) ---------------------
    def decode_begin(self, state: Tensor, pos: int = 0, room: int = 0) -> list[Tensor]:
        return [state]

    def decode(self, x: Tensor, buf: list[Tensor], pos: int = 0) -> Tensor:
        """x [B, D] -> [B, D]: one token of the recurrence, S <- alpha S + beta (v - S k) k^T,
        then the read o = S q."""
        B, D = x.shape
        S = buf[0]
        dt = S.dtype
        qkv = F.linear(x, self.qkv.weight).view(B, 3, self.h, self.d)
        q, k = F.normalize(qkv[:, :2], dim=-1).to(dt).unbind(1)
        v = qkv[:, 2].to(dt)
        g = torch.sigmoid(F.linear(x, self.gates.weight, self.gates.bias).to(dt))
        beta, alpha = g[:, : self.h], g[:, self.h:]
        u = beta[..., None] * (v - (S @ k[..., None]).squeeze(-1))
        S = torch.baddbmm((S * alpha[..., None, None]).view(-1, self.d, self.d), u.reshape(-1, self.d, 1),
                          k.reshape(-1, 1, self.d)).view(S.shape)
        buf[0] = S
        o = (S @ q[..., None]).squeeze(-1).to(x.dtype)
        y = F.rms_norm(o, (self.d,), self.norm.weight, self.norm.eps).reshape(B, D) * torch.sigmoid(
            F.linear(x, self.gate.weight))
        return F.linear(y, self.out.weight)

    def decode_end(self, buf: list[Tensor]) -> Tensor:
        return buf[0]
