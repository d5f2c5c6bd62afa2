"""The self-modifying projection recurrence (MATH section 6), written as the layer's loop over
projection chunks (nested_learning/layers/self_modifying.py before the fused op).

Per sequence and head, the projection memory P [R, d] (R = 3d + 2: the q, k, v memories and the
two gate rows) reads every token of a chunk with the chunk-start P, y_t = P x_t; a complete
chunk then advances P by the DGD rule (MATH 2) token by token with self-generated targets:

    k, v = normalise(y_k + x), normalise(y_v + x)      (the "+ x" only for residual memories)
    eta = eta_max sigmoid(y_eta + b_eta),  alpha = max(sigmoid(y_alpha + b_alpha), 1e-4)
    P <- alpha P + (w - eta P a) k^T,  a = 2k - v,  w = eta (v - k) on the q, k, v rows
                                                     (0 on the gate rows, and everywhere when
                                                      not residual)

with eta = 0 and alpha = 1 (an identity write) for tokens marked invalid. An unfinished last
chunk reads and does not write.

Gradients. stop_writes=True is the layer's default: the writes carry no gradient, and each
chunk's read weight is P_in + sg(P_c - P_in), so the gradient of every read (and of the final
state) reaches the initial state P_in (which the layer routes to its slow parameter P0).
stop_writes=False differentiates through the whole recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dgd import dgd_update_reference


def selfmod_write_inputs(y: Tensor, x: Tensor, gate_bias: Tensor, valid: Tensor, eta_max: float, residual: bool):
    """One chunk's write from its reads y [B, C, H, R] of x [B, C, H, d]: the DGD inputs
    (k, a [B, C, H, d]; w [B, C, H, R]; alpha, eta [B, C, H]) with invalid tokens' eta 0 and alpha 1."""
    d = x.shape[-1]
    qkv = y[..., :3 * d] + x.repeat(1, 1, 1, 3) if residual else y[..., :3 * d]
    k, v = F.normalize(qkv[..., d:2 * d], dim=-1), F.normalize(qkv[..., 2 * d:], dim=-1)
    g = y[..., 3 * d:] + gate_bias.to(y.dtype)
    ok = valid[..., None]
    eta = torch.where(ok, eta_max * torch.sigmoid(g[..., 0]), 0.0)
    alpha = torch.where(ok, torch.sigmoid(g[..., 1]).clamp(min=1e-4), 1.0)
    w = torch.zeros_like(y)
    if residual:
        w = torch.cat([(eta[..., None] * (v - k)).repeat(1, 1, 1, 3), w[..., 3 * d:]], -1)
    return k, 2 * k - v, w, alpha, eta


def selfmod_projection_reference(x: Tensor, P: Tensor, gate_bias: Tensor, valid: Tensor, chunk_size: int,
                                 eta_max: float, residual: bool, stop_writes: bool,
                                 dgd=dgd_update_reference) -> tuple[Tensor, Tensor]:
    """x [B, L, H, d], P [B, H, 3d+2, d], gate_bias [H, 2], valid [B, L] (bool). Returns the reads
    y [B, L, H, 3d+2] in x's dtype and the final P (float32 or wider). Computes in float32 at
    least (float64 stays float64). dgd: the chunk write's DGD (ops.dgd_update gives the layer's
    loop as it ran before the op: bench/cases.py times it beside the op)."""
    B, L, H, d = x.shape
    cdt = torch.promote_types(torch.promote_types(x.dtype, P.dtype), torch.float32)
    xs, P_in, gb = x.to(cdt), P.to(cdt), gate_bias.to(cdt)
    Pc, ys = P_in, []
    for s0 in range(0, L, chunk_size):
        s1 = min(s0 + chunk_size, L)
        read = P_in + (Pc - P_in).detach() if stop_writes else Pc
        y = torch.einsum("bchi,bhoi->bcho", xs[:, s0:s1], read)
        ys.append(y)
        if s1 - s0 == chunk_size:
            src = (y, xs[:, s0:s1], gb, Pc)
            if stop_writes:
                src = tuple(t.detach() for t in src)
            k, a, w, alpha, eta = selfmod_write_inputs(*src[:3], valid[:, s0:s1], eta_max, residual)
            _, Pc = dgd(k, k, w, alpha, eta, a=a, initial_state=src[3], read="before", chunk_size=chunk_size)
    y = torch.cat(ys, 1) if ys else xs.new_zeros(B, 0, H, P.shape[2])
    return y.to(x.dtype), (P_in + (Pc - P_in).detach() if stop_writes else Pc)
