"""Delta gradient descent (MATH section 2) in chunk-parallel (WY / UT) form.

Per sequence and head, per token:

    W_t = W_{t-1} (alpha_t I - eta_t a_t k_t^T) + w_t k_t^T
        = alpha_t W_{t-1} + u_t k_t^T,      u_t = w_t - eta_t W_{t-1} a_t

Inside a chunk, with G_t = sum_{r<=t} log alpha_r (G_0 = 0, relative to the chunk start),

    W_t = exp(G_t) W_0 + sum_{s<=t} exp(G_t - G_s) u_s k_s^T

so the u_s solve one unit lower-triangular system

    u_t + eta_t sum_{s<t} exp(G_{t-1} - G_s) (a_t . k_s) u_s = w_t - eta_t exp(G_{t-1}) W_0 a_t

and the reads and the chunk-end state are matrix products. No [d, d] matrix per token is
ever formed; only the chunk-to-chunk recurrence is sequential.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _decay(G_row: Tensor, G_col: Tensor, mask: Tensor) -> Tensor:
    """exp(G_row[t] - G_col[s]) where mask[t, s], else 0 (masked before exp: never inf*0)."""
    diff = G_row.unsqueeze(-1) - G_col.unsqueeze(-2)
    return torch.where(mask, diff, torch.full_like(diff, float("-inf"))).exp()


def dgd_update_reference(
    q: Tensor,
    k: Tensor,
    w: Tensor,
    alpha: Tensor,
    eta: Tensor,
    a: Tensor | None = None,
    initial_state: Tensor | None = None,
    read: str = "after",
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Reference DGD. Shapes: q, k, a [B,T,H,dk]; w [B,T,H,dv]; alpha, eta [B,T,H];
    initial_state [B,H,dv,dk]. Returns o [B,T,H,dv] and the final state [B,H,dv,dk].

    Computation runs in float32 at least (float64 stays float64); outputs are cast back to
    the dtype of q (o) and float32-or-wider (state)."""
    B, T, H, dk = q.shape
    dv = w.shape[-1]
    cdt = torch.promote_types(q.dtype, torch.float32)
    a = k if a is None else a
    # [B,H,T,d] layout for batched matrix products
    q_, k_, a_, w_ = (x.transpose(1, 2).to(cdt) for x in (q, k, a, w))
    logal = alpha.transpose(1, 2).to(cdt).log()  # [B,H,T]
    et = eta.transpose(1, 2).to(cdt)
    if initial_state is None:
        W = q.new_zeros(B, H, dv, dk, dtype=cdt)
    else:
        W = initial_state.to(cdt)
    outs = []
    for s0 in range(0, T, chunk_size):
        s1 = min(s0 + chunk_size, T)
        C = s1 - s0
        qc, kc, ac, wc = q_[:, :, s0:s1], k_[:, :, s0:s1], a_[:, :, s0:s1], w_[:, :, s0:s1]
        G = logal[:, :, s0:s1].cumsum(-1)  # [B,H,C], G_t
        Gprev = torch.cat([G.new_zeros(B, H, 1), G[..., :-1]], -1)  # G_{t-1}
        ec = et[:, :, s0:s1]
        idx = torch.arange(C, device=q.device)
        strict = idx.unsqueeze(-1) > idx.unsqueeze(0)  # s < t
        incl = idx.unsqueeze(-1) >= idx.unsqueeze(0)  # s <= t
        # L[t, s] = eta_t exp(G_{t-1} - G_s) (a_t . k_s), s < t
        L = ec.unsqueeze(-1) * _decay(Gprev, G, strict) * (ac @ kc.transpose(-1, -2))
        rhs = wc - (ec * Gprev.exp()).unsqueeze(-1) * (ac @ W.transpose(-1, -2))  # [B,H,C,dv]
        eye = torch.eye(C, dtype=cdt, device=q.device)
        U = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
        qk = qc @ kc.transpose(-1, -2)  # [B,H,C,C]: (q_t . k_s)
        if read == "after":
            o = G.exp().unsqueeze(-1) * (qc @ W.transpose(-1, -2)) + (_decay(G, G, incl) * qk) @ U
        else:
            o = Gprev.exp().unsqueeze(-1) * (qc @ W.transpose(-1, -2)) + (
                _decay(Gprev, G, strict) * qk
            ) @ U
        outs.append(o)
        Gend = G[..., -1:]  # [B,H,1]
        tail = (Gend - G).exp().unsqueeze(-1) * U  # exp(G_C - G_s) u_s
        W = Gend.exp().unsqueeze(-1) * W + tail.transpose(-1, -2) @ kc
    o = torch.cat(outs, 2).transpose(1, 2) if outs else q.new_zeros(B, 0, H, dv, dtype=cdt)
    return o.to(q.dtype), W
