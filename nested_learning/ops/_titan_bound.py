"""The Titans memory's step bound (MATH section 3.3): the curvature bound of the residual MLP
memory and the factor on theta that keeps a chunk's (memory, momentum) map stable. The layers
apply it to the linear memory; titan_mlp_update(curvature_bound=True) applies it inside its
chunk loop, at each chunk's start weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._titan_scan import scan_coefficients

# Largest |act'(x)| of each memory activation (every one also has |act(x)| <= |x|).
ACT_SLOPE = {"silu": 1.0999, "gelu": 1.13, "relu": 1.0}


def mlp_curvature(k: Tensor, W1: Tensor, W2: Tensor, activation: str = "silu", exact: bool = True) -> Tensor:
    """[B, T, H] upper bound on the Gauss-Newton curvature of token t's memory loss
    ||k + W1 act(W2 k) - v||^2 in (W1, W2) at the given weights: 2 ||k||^2 (||W2||_2^2 +
    L^2 ||W1||_2^2), L = max |act'| (MATH section 3.3). Spectral norms, no gradient.
    exact=False replaces each squared spectral norm by an upper bound on it that needs no
    SVD: ||G^8||_F^(1/8) for the Gram matrix G = W W^T (or W^T W, the smaller), at most
    rank^(1/8) times the exact value, widened by 1e-6 to cover the rounding of both; a larger
    curvature, for the test that spares the spectral norms (titan_mlp_update's bound)."""
    with torch.no_grad():  # (non-finite weights are left for the loss and the training guard to see)
        Ws = [torch.nan_to_num(W.float(), 0.0, 0.0, 0.0) for W in (W1, W2)]
        if exact:
            s1, s2 = (torch.linalg.matrix_norm(W, ord=2).square() for W in Ws)  # [B, H]
        else:
            s1, s2 = (_squared_norm_bound(W) for W in Ws)
        return 2 * k.float().square().sum(-1) * (s2 + ACT_SLOPE[activation] ** 2 * s1)[:, None]


def _squared_norm_bound(W: Tensor) -> Tensor:
    """An upper bound on ||W||_2^2 per matrix of W [..., m, n], in float32: lambda_max(G) <=
    ||G^8||_F^(1/8) for the PSD Gram matrix G (float64: G^8 stays finite for any float32 W)."""
    W = W.double()
    G = W @ W.transpose(-1, -2) if W.shape[-2] <= W.shape[-1] else W.transpose(-1, -2) @ W
    for _ in range(3):
        G = G @ G
    return (G.square().sum((-2, -1)).sqrt() ** 0.125 * (1 + 1e-6)).float()


def bounded_step(theta: Tensor, curvature: Tensor, eta: Tensor, alpha: Tensor, chunk: int) -> Tensor:
    """[B, T, H] factor f in (0, 1] for theta that keeps the chunked memory stable, momentum
    included (MATH section 3.3). Per chunk, sequence and head, with kappa_s a bound on the
    curvature of token s's loss and the scan coefficients of ops.titan_chunk_scan, the loads
    Lp = sum_s c_par[s] theta_s kappa_s and Lm = sum_s c_mom[s] theta_s kappa_s give, along a
    direction that every key of the chunk shares (the worst case), the chunk map of (memory,
    momentum)

        [[abar - f Lp, rho], [-f Lm, ebar]].

    f is the largest value <= 1 for which that map has spectral radius <= 1 (the Jury
    conditions, each linear in f) and its memory part never expands (f Lp <= 1 + abar). It is
    exactly 1, and theta unchanged bit for bit, inside the stable region; a stop-gradient
    factor outside it."""
    with torch.no_grad():
        coef = tuple(t.double() for t in chunk_scan(eta, alpha, chunk))
        return bound_factor(theta, curvature, coef, chunk)


def bound_factor(theta: Tensor, curvature: Tensor, coef: tuple[Tensor, ...], chunk: int) -> Tensor:
    """bounded_step's factor from the chunks' scan coefficients coef = (abar, rho, ebar
    [B, N, H], c_par, c_mom [B, T, H]) in float64, as titan_chunk_scan gives them (the op's
    chunk loop passes one chunk's slices)."""
    with torch.no_grad():
        B, T, H = theta.shape
        abar, rho, ebar, c_par, c_mom = coef
        n = -(-T // chunk) * chunk
        tk = theta.double() * curvature.double()
        load = lambda c: F.pad(tk * c, (0, 0, 0, n - T)).view(B, n // chunk, chunk, H).sum(2)  # noqa: E731
        Lp, Lm = load(c_par), load(c_mom)  # [B, chunks, H]
        a, r, e = abar, rho, ebar
        f = torch.ones_like(Lp)
        for x, y in ((Lp, 1 + a),  # the memory part never expands: |abar - f Lp| <= 1
                     (r * Lm - e * Lp, 1 - a * e),  # det <= 1
                     (e * Lp - r * Lm, 1 + a * e),  # det >= -1
                     (Lp * (1 + e) - r * Lm, (1 + a) * (1 + e))):  # -trace <= 1 + det
            f = torch.where(x > 0, torch.minimum(f, y / x.clamp(min=1e-300)), f)
        return f.clamp(min=0.0).float().repeat_interleave(chunk, 1)[:, :T].to(theta.dtype)


def chunk_scan(eta: Tensor, alpha: Tensor, chunk: int) -> tuple[Tensor, ...]:
    """titan_chunk_scan: abar, rho, ebar [B, N, H] and c_par, c_mom [B, T, H], no gradient."""
    with torch.no_grad():
        return tuple(t.transpose(1, 2) for t in scan_coefficients(eta.detach(), alpha.detach(), chunk))
