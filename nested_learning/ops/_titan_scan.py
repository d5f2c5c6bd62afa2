"""Scan coefficients of the Titans memory's chunks (MATH section 3), for every chunk at once.

The fast backends split the op in two: the kernels do the O(d^2)-per-token work (reads,
errors, the chunk's gradient sums, the state recurrence), and the O(C^2)-per-chunk gate
algebra is done here, batched over all chunks with ATen (no Python work per chunk). Per chunk
(reference/titan.py, ChunkScan):

    M' = abar M + rho S - sum_s c_par[s] theta_s g_s,    S' = ebar S - sum_s c_mom[s] theta_s g_s

The gradients w.r.t. eta and alpha come back through autograd of these coefficients, given the
kernels' gradients of abar, rho, ebar (per chunk) and c_par, c_mom (per token).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.titan import ChunkScan


def _build(eta: Tensor, alpha: Tensor) -> tuple[Tensor, ...]:
    """eta, alpha [B, H, n, L] -> abar, rho, ebar [B, H, n]; c_par, c_mom [B, H, n, L]."""
    s = ChunkScan.build(eta, alpha)
    return s.abar, s.rho, s.ebar, s.c_par, s.c_mom


def scan_coefficients(eta: Tensor, alpha: Tensor, chunk: int) -> tuple[Tensor, ...]:
    """eta, alpha [B, T, H] -> abar, rho, ebar [B, H, N] and c_par, c_mom [B, H, T] (float32
    or wider), N = ceil(T / chunk); the last chunk may be shorter and is scanned on its own."""
    B, T, H = eta.shape
    cdt = torch.promote_types(eta.dtype, torch.float32)
    e, a = eta.transpose(1, 2).to(cdt), alpha.transpose(1, 2).to(cdt)  # [B, H, T]
    nf, tail = divmod(T, chunk)
    parts = []
    if nf:
        parts.append(_build(e[..., :nf * chunk].reshape(B, H, nf, chunk), a[..., :nf * chunk].reshape(B, H, nf, chunk)))
    if tail:
        parts.append(_build(e[..., nf * chunk:].reshape(B, H, 1, tail), a[..., nf * chunk:].reshape(B, H, 1, tail)))
    abar = torch.cat([p[0] for p in parts], 2)
    rho = torch.cat([p[1] for p in parts], 2)
    ebar = torch.cat([p[2] for p in parts], 2)
    c_par = torch.cat([p[3].reshape(B, H, -1) for p in parts], 2)
    c_mom = torch.cat([p[4].reshape(B, H, -1) for p in parts], 2)
    return abar, rho, ebar, c_par, c_mom


def scan_coefficients_backward(eta: Tensor, alpha: Tensor, chunk: int, grads: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. eta and alpha [B, T, H] given those of scan_coefficients' outputs."""
    with torch.enable_grad():
        e = eta.detach().requires_grad_()
        a = alpha.detach().requires_grad_()
        outs = scan_coefficients(e, a, chunk)
        de, da = torch.autograd.grad(outs, (e, a), [g.to(o.dtype) for g, o in zip(grads, outs)])
    return de, da
