"""Titans neural memory with momentum and forgetting (MATH section 3), chunked form.

Within a chunk every gradient is taken at the chunk-start parameters P_c, and for each
parameter tensor the per-token recurrences

    S_t = eta_t S_{t-1} - theta_t g_t          g_t = L_t R_t^T  (an outer product)
    P_t = (1 - alpha_t) P_{t-1} + S_t

are linear, so the chunk end is closed-form:

    S_C = ebar_C S_c - sum_s D[C, s] theta_s g_s
    P_C = abar_C P_c + rho S_c - sum_s c_s theta_s g_s

with D[t, s] = prod_{s<r<=t} eta_r, A_t = prod_{t<r<=C} (1 - alpha_r), ebar_t = D[t, 0],
abar_C = prod_r (1 - alpha_r), rho = sum_t A_t ebar_t and c_s = sum_{t>=s} A_t D[t, s].
Every sum over s is then one matrix product (the weighted L's times the R's).
Reads use the chunk-start parameters: o_t = M_c(q_t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ChunkScan:
    """Scan coefficients of one chunk, each batched over [B, H]."""

    ebar: Tensor  # [B,H]      prod of eta over the chunk
    abar: Tensor  # [B,H]      prod of (1 - alpha) over the chunk
    rho: Tensor  # [B,H]       weight of the incoming momentum in the parameter
    c_par: Tensor  # [B,H,C]   weight of token s's gradient in the parameter
    c_mom: Tensor  # [B,H,C]   weight of token s's gradient in the momentum

    @classmethod
    def build(cls, eta: Tensor, alpha: Tensor) -> ChunkScan:
        """eta, alpha: [B,H,C] gates of one chunk."""
        C = eta.shape[-1]
        idx = torch.arange(C, device=eta.device)
        later = idx.unsqueeze(-1) > idx.unsqueeze(0)  # r > s, indexed [r, s]
        # D[t, s] = prod_{s<r<=t} eta_r: cumulative product down the rows of X[r, s] =
        # eta_r for r > s else 1; robust to eta = 0 (no logs, no divisions).
        X = torch.where(later, eta.unsqueeze(-1), torch.ones_like(eta).unsqueeze(-1))
        D = X.cumprod(-2) * (~later.T).to(eta.dtype)  # keep t >= s
        ebar_t = eta.cumprod(-1)  # [B,H,C] = D[t, 0] including eta_1
        keep = 1 - alpha
        rev = keep.flip(-1).cumprod(-1).flip(-1)  # prod_{r>=t} (1 - alpha_r)
        A = torch.cat([rev[..., 1:], torch.ones_like(rev[..., :1])], -1)  # prod_{r>t}
        return cls(
            ebar=ebar_t[..., -1],
            abar=rev[..., 0],
            rho=(A * ebar_t).sum(-1),
            c_par=(A.unsqueeze(-1) * D).sum(-2),
            c_mom=D[..., -1, :],
        )

    def step(self, P: Tensor, S: Tensor, theta: Tensor, left: Tensor, right: Tensor):
        """One chunk for one parameter P [B,H,m,n] with momentum S, where token s's
        gradient is left[s] right[s]^T (left [B,H,C,m], right [B,H,C,n])."""
        lt = theta.unsqueeze(-1) * left
        G_par = (self.c_par.unsqueeze(-1) * lt).transpose(-1, -2) @ right
        G_mom = (self.c_mom.unsqueeze(-1) * lt).transpose(-1, -2) @ right
        P_new = self.abar[..., None, None] * P + self.rho[..., None, None] * S - G_par
        S_new = self.ebar[..., None, None] * S - G_mom
        return P_new, S_new


def _split(x: Tensor, cdt) -> Tensor:
    return x.transpose(1, 2).to(cdt)  # [B,T,H,...] -> [B,H,T,...]


def titan_update_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    initial_state: tuple[Tensor, Tensor] | None = None,
    chunk_size: int = 16,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Linear memory M [B,H,dv,dk]: loss_t = ||M k_t - v_t||^2, grad = 2 (M_c k_t - v_t) k_t^T.
    q, k [B,T,H,dk]; v [B,T,H,dv]; gates [B,T,H]. Returns o [B,T,H,dv] and (M, S)."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    cdt = torch.promote_types(q.dtype, torch.float32)
    q_, k_, v_ = _split(q, cdt), _split(k, cdt), _split(v, cdt)
    th, et, al = _split(theta, cdt), _split(eta, cdt), _split(alpha, cdt)
    if initial_state is None:
        M = q.new_zeros(B, H, dv, dk, dtype=cdt)
        S = torch.zeros_like(M)
    else:
        M, S = (x.to(cdt) for x in initial_state)
    outs = []
    for s0 in range(0, T, chunk_size):
        sl = slice(s0, min(s0 + chunk_size, T))
        kc = k_[:, :, sl]
        outs.append(q_[:, :, sl] @ M.transpose(-1, -2))
        err = kc @ M.transpose(-1, -2) - v_[:, :, sl]  # [B,H,C,dv]
        scan = ChunkScan.build(et[:, :, sl], al[:, :, sl])
        M, S = scan.step(M, S, th[:, :, sl], 2 * err, kc)
    o = torch.cat(outs, 2).transpose(1, 2) if outs else q.new_zeros(B, 0, H, dv, dtype=cdt)
    return o.to(q.dtype), (M, S)


_ACTIVATIONS = {
    "silu": (F.silu, lambda z: torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z)))),
    "gelu": (
        lambda z: F.gelu(z, approximate="tanh"),
        lambda z: torch.func.grad(lambda u: F.gelu(u, approximate="tanh").sum())(z),
    ),
    "relu": (F.relu, lambda z: (z > 0).to(z.dtype)),
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def titan_mlp_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    initial_state: tuple[Tensor, Tensor, Tensor, Tensor],
    chunk_size: int = 16,
    activation: str = "silu",
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Residual MLP memory M(x) = x + W1 act(W2 x), W1 [B,H,d,h], W2 [B,H,h,d], momenta
    S1, S2 of the same shapes; initial_state = (W1, W2, S1, S2). q, k, v [B,T,H,d]."""
    B, T, H, d = q.shape
    cdt = torch.promote_types(q.dtype, torch.float32)
    act, dact = _ACTIVATIONS[activation]
    q_, k_, v_ = _split(q, cdt), _split(k, cdt), _split(v, cdt)
    th, et, al = _split(theta, cdt), _split(eta, cdt), _split(alpha, cdt)
    W1, W2, S1, S2 = (x.to(cdt) for x in initial_state)
    outs = []
    for s0 in range(0, T, chunk_size):
        sl = slice(s0, min(s0 + chunk_size, T))
        qc, kc = q_[:, :, sl], k_[:, :, sl]
        outs.append(qc + act(qc @ W2.transpose(-1, -2)) @ W1.transpose(-1, -2))
        z = kc @ W2.transpose(-1, -2)  # [B,H,C,h]
        hid = act(z)
        err2 = 2 * (kc + hid @ W1.transpose(-1, -2) - v_[:, :, sl])  # dloss/dM(k) [B,H,C,d]
        back = (err2 @ W1) * dact(z)  # dloss/dz [B,H,C,h]
        scan = ChunkScan.build(et[:, :, sl], al[:, :, sl])
        W1, S1 = scan.step(W1, S1, th[:, :, sl], err2, hid)
        W2, S2 = scan.step(W2, S2, th[:, :, sl], back, kc)
    o = torch.cat(outs, 2).transpose(1, 2) if outs else q.new_zeros(B, 0, H, d, dtype=cdt)
    return o.to(q.dtype), (W1, W2, S1, S2)
