"""The residual-MLP Titans memory (MATH section 3) as a chunk loop of batched matrix products,
with a hand-derived backward that recomputes each chunk from chunk-start checkpoints.

Memory M(x) = x + W1 act(W2 x), W1 [B,H,d,h], W2 [B,H,h,d]. Per chunk (rows = tokens):

    Z = K W2^T, Hd = act(Z), E = 2 (K + Hd W1^T - V)        (dloss/dM(k))
    Bk = (E W1) * act'(Z)                                     (dloss/dZ)
    W1' = abar W1 + rho S1 - (c_par theta E)^T Hd,  S1' = ebar S1 - (c_mom theta E)^T Hd
    W2' = abar W2 + rho S2 - (c_par theta Bk)^T K,  S2' = ebar S2 - (c_mom theta Bk)^T K
    O = Q + act(Q W2^T) W1^T                                  (read at the chunk start)

The gate algebra (abar, rho, ebar per chunk; c_par, c_mom per token) comes batched from
_titan_scan; the loop does the O(C d h) work with no per-token Python. The c_par / c_mom
pair of each parameter's update is one product (the two weighted left factors side by side).
The backward walks the chunks in reverse from the saved chunk-start (W1, W2, S1, S2),
recomputing Z, Hd, E, Bk; it needs act'' (the update depends on act'(Z)).
The products are ATen; the elementwise and state-recurrence work goes through TorchElementwise
(the `cpu` backend of titan_mlp_update) or TritonElementwise (fused kernels: the `triton`
backend, for CUDA tensors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _silu(z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s)), s


def _silu_dd(z: Tensor, s: Tensor) -> Tensor:
    return s * (1 - s) * (2 + z * (1 - 2 * s))


_C0, _K = math.sqrt(2 / math.pi), 0.044715


def _gelu(z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """tanh-approximated GELU, its derivative, and tanh(u) for the second derivative."""
    t = torch.tanh(_C0 * (z + _K * z ** 3))
    du = _C0 * (1 + 3 * _K * z * z)
    return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * du, t


def _gelu_dd(z: Tensor, t: Tensor) -> Tensor:
    du = _C0 * (1 + 3 * _K * z * z)
    return (1 - t * t) * (du - z * t * du * du + 3 * _C0 * _K * z * z)


def _relu(z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    pos = (z > 0).to(z.dtype)
    return z * pos, pos, None


# name -> (z -> (act, act', aux), (z, aux) -> act'')
_ACT = {
    "silu": (_silu, _silu_dd),
    "gelu": (_gelu, _gelu_dd),
    "relu": (_relu, lambda z, aux: torch.zeros_like(z)),
}


def _T(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _chunk_rows(T: int, C: int):
    for c, s in enumerate(range(0, T, C)):
        yield c, slice(s, min(s + C, T))


def _split_heads(x: Tensor, cdt) -> Tensor:
    return x.transpose(1, 2).to(cdt).contiguous()  # [B,T,H,...] -> [B,H,T,...]


class TorchElementwise:
    """The per-chunk elementwise and state-recurrence work in ATen (any device)."""

    def __init__(self, activation: str):
        self.f, self.f_dd = _ACT[activation]

    def act(self, z: Tensor, second: bool = False):
        """act(z), act'(z) and act''(z) (None unless `second`)."""
        a, d, aux = self.f(z)
        return a, d, (self.f_dd(z, aux) if second else None)

    def step(self, P, S, G, abar, rho, ebar):
        """P' = abar P + rho S - G[:m], S' = ebar S - G[m:] (G = [G_par; G_mom])."""
        m = P.shape[-2]
        P_new = torch.addcmul(G[..., :m, :].neg_().addcmul_(abar, P), rho, S)
        return P_new, G[..., m:, :].neg_().addcmul_(ebar, S)

    def step_backward(self, gPn, gSn, P, S, abar, rho, ebar):
        """abar dP', rho dP' + ebar dS', and <dP', P>, <dP', S>, <dS', S> (the gradients of
        abar, rho, ebar)."""
        return (abar * gPn, torch.addcmul(rho * gPn, ebar, gSn), _dot(gPn, P), _dot(gPn, S), _dot(gSn, S))


class TritonElementwise:
    """The same, fused in Triton kernels (nested_learning/kernels/titan_mlp.py): one launch each."""

    def __init__(self, activation: str):
        from nested_learning.kernels import titan_mlp

        self.k, self.activation = titan_mlp, activation

    def act(self, z: Tensor, second: bool = False):
        return self.k.act_derivatives(z, self.activation, second)

    def step(self, P, S, G, abar, rho, ebar):
        return self.k.state_step(P, S, G, abar, rho, ebar)

    def step_backward(self, gPn, gSn, P, S, abar, rho, ebar):
        gP, gS, *dots = self.k.state_step_backward(gPn, gSn, P, S, abar, rho, ebar)
        return (gP, gS, *(d[..., None, None] for d in dots))


class _Chunk:
    """One chunk's recomputable quantities at its chunk-start weights."""

    def __init__(self, ew, kc, vc, th, W1, W2, second=False):
        self.z = kc @ _T(W2)
        self.hd, self.dz, self.ddz = ew.act(self.z, second)
        self.e2 = 2 * (kc + self.hd @ _T(W1) - vc)
        self.ew = self.e2 @ W1
        self.bk = self.ew * self.dz
        self.L1 = th * self.e2
        self.L2 = th * self.bk


def _weighted(L: Tensor, cp: Tensor, cm: Tensor) -> Tensor:
    return torch.cat([cp * L, cm * L], -1)  # [.., C, 2m]: the c_par and c_mom left factors


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> over the last two dims, keeping them as size 1."""
    return torch.linalg.vecdot(x.flatten(-2), y.flatten(-2))[..., None, None]


def _addmm_t(acc: Tensor, pairs) -> Tensor:
    """acc + sum_i x_i^T y_i as one product over the rows of all pairs side by side."""
    x = torch.cat([p[0] for p in pairs], -2)
    y = torch.cat([p[1] for p in pairs], -2)
    return acc.flatten(0, -3).baddbmm(_T(x).flatten(0, -3), y.flatten(0, -3)).view(acc.shape)


class Inputs:
    """The op's per-token inputs in the loops' layout and compute dtype (float32 or wider),
    made once per forward or backward: q, k, v [B,H,T,d]; theta, c_par, c_mom [B,H,T,1];
    abar, rho, ebar [B,H,N,1,1]. From q, k, v [B,T,H,d], theta [B,T,H] and coef =
    scan_coefficients(...) (abar, rho, ebar [B,H,N]; c_par, c_mom [B,H,T])."""

    def __init__(self, q, k, v, theta, coef):
        self.dtype, self.cdt = q.dtype, torch.promote_types(q.dtype, torch.float32)
        self.q, self.k, self.v = (_split_heads(x, self.cdt) for x in (q, k, v))
        self.theta = theta.transpose(1, 2).to(self.cdt).unsqueeze(-1)
        self.abar, self.rho, self.ebar = (c.to(self.cdt)[..., None, None] for c in coef[:3])
        self.cp, self.cm = (c.to(self.cdt).unsqueeze(-1) for c in coef[3:])


def mlp_forward(x: Inputs, W1, W2, S1, S2, chunk, ew, keep_checkpoints=False, bound=None):
    """Returns o [B,T,H,d] (None when keeping checkpoints: the backward's recomputation skips
    the reads), (W1, W2, S1, S2) at the end and, when asked, the list of the chunk-start states
    (W1, W2, S1, S2, theta, factor), one tuple per chunk: theta [B,H,C,1] as the chunk used it
    and the step bound's factor on it (None without a bound). ew: TorchElementwise or
    TritonElementwise. bound(c, rows, W1, W2) -> (theta, factor) [B,C,H]: the chunk's bounded
    theta at its start weights (titan_mlp_update's curvature_bound)."""
    q_, k_, v_, th, abar, rho, ebar, cp, cm = x.q, x.k, x.v, x.theta, x.abar, x.rho, x.ebar, x.cp, x.cm
    state = [s.to(x.cdt) for s in (W1, W2, S1, S2)]
    T = q_.shape[2]
    ckpt = [] if keep_checkpoints else None  # the states are never written in place: keep them
    o = None if keep_checkpoints else torch.empty_like(q_)
    for c, sl in _chunk_rows(T, chunk):
        W1, W2, S1, S2 = state
        thc, f = th[:, :, sl], None
        if bound is not None:  # as Inputs lays theta out: [B,H,C,1] in the compute dtype
            thc, f = (t.transpose(1, 2).to(x.cdt).unsqueeze(-1) for t in bound(c, sl, W1, W2))
        if ckpt is not None:
            ckpt.append((*state, thc, f))
        qc, kc = q_[:, :, sl], k_[:, :, sl]
        if ckpt is None:  # the backward's recomputation needs only the states
            torch.add(qc, ew.act(qc @ _T(W2))[0] @ _T(W1), out=o[:, :, sl])
        ch = _Chunk(ew, kc, v_[:, :, sl], thc, W1, W2)
        a, r, e = abar[:, :, c], rho[:, :, c], ebar[:, :, c]
        W1, S1 = ew.step(W1, S1, _T(_weighted(ch.L1, cp[:, :, sl], cm[:, :, sl])) @ ch.hd, a, r, e)
        W2, S2 = ew.step(W2, S2, _T(_weighted(ch.L2, cp[:, :, sl], cm[:, :, sl])) @ kc, a, r, e)
        state = [W1, W2, S1, S2]
    o = None if o is None else o.transpose(1, 2).to(x.dtype)
    return o, tuple(state), ckpt


def mlp_backward(grads, x: Inputs, ckpt, chunk, ew):
    """grads = (do [B,T,H,d] or None, dW1, dW2, dS1, dS2 of the final state, each or None);
    ckpt from mlp_forward(x, ..., keep_checkpoints=True). Returns dq, dk, dv, dtheta (as the
    op's input layouts), the gradients of coef (same shapes) and of the initial (W1, W2, S1, S2)."""
    q_, k_, v_, th, abar, rho, ebar, cp, cm = x.q, x.k, x.v, x.theta, x.abar, x.rho, x.ebar, x.cp, x.cm
    cdt = x.cdt
    T, d = q_.shape[2:]
    do = grads[0]
    do_ = torch.zeros_like(q_) if do is None else _split_heads(do, cdt)
    g = [torch.zeros_like(s) if gs is None else gs.to(cdt) for gs, s in zip(grads[1:], ckpt[0][:4])]
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    dth, dcp, dcm = (torch.empty_like(th) for _ in range(3))
    dabar, drho, debar = (torch.empty_like(abar) for _ in range(3))
    for c, sl in reversed(list(_chunk_rows(T, chunk))):
        W1, W2, S1, S2, thc, f = ckpt[c]  # thc: the chunk's theta as used (bounded), f: the bound's factor
        gW1n, gW2n, gS1n, gS2n = g
        qc, kc, goc = q_[:, :, sl], k_[:, :, sl], do_[:, :, sl]
        cpc, cmc = cp[:, :, sl], cm[:, :, sl]
        a, r, e = abar[:, :, c], rho[:, :, c], ebar[:, :, c]
        ch = _Chunk(ew, kc, v_[:, :, sl], thc, W1, W2, second=True)
        # the state recurrence and the scalars a, r, e
        gW1a, gS1, pp1, ps1, ss1 = ew.step_backward(gW1n, gS1n, W1, S1, a, r, e)
        gW2a, gS2, pp2, ps2, ss2 = ew.step_backward(gW2n, gS2n, W2, S2, a, r, e)
        dabar[:, :, c], drho[:, :, c], debar[:, :, c] = pp1 + pp2, ps1 + ps2, ss1 + ss2
        # the update products: G1 = L1w^T Hd, G2 = L2w^T K with dG = -(d new P ; d new S)
        gG1 = torch.cat([gW1n, gS1n], -2)  # -dG1 [B,H,2d,h]
        gG2 = torch.cat([gW2n, gS2n], -2)  # -dG2 [B,H,2h,d]
        P1 = (ch.hd @ _T(gG1)).neg_()  # [C, 2d]
        P2 = (kc @ _T(gG2)).neg_()  # [C, 2h]
        ghd = (_weighted(ch.L1, cpc, cmc) @ gG1).neg_()  # [C, h]
        gkc = (_weighted(ch.L2, cpc, cmc) @ gG2).neg_()  # [C, d]
        P1p, P1m = P1[..., :d], P1[..., d:]
        hdim = ch.hd.shape[-1]
        P2p, P2m = P2[..., :hdim], P2[..., hdim:]
        gL1 = cpc * P1p + cmc * P1m
        gL2 = cpc * P2p + cmc * P2m
        dcp[:, :, sl] = (ch.L1 * P1p).sum(-1, True) + (ch.L2 * P2p).sum(-1, True)
        dcm[:, :, sl] = (ch.L1 * P1m).sum(-1, True) + (ch.L2 * P2m).sum(-1, True)
        dth[:, :, sl] = (gL1 * ch.e2).sum(-1, True) + (gL2 * ch.bk).sum(-1, True)
        if f is not None:  # theta f with a stop-gradient f
            dth[:, :, sl] *= f
        # through Bk = (E W1) * act'(Z) and E = 2 (K + Hd W1^T - V)
        gbk = thc * gL2
        gew = gbk * ch.dz
        gz = gbk * ch.ew * ch.ddz
        gE = 2 * (thc * gL1 + gew @ _T(W1))  # d/d(K + Hd W1^T - V)
        ghd = ghd + gE @ W1
        gkc = gkc + gE
        dv[:, :, sl] = -gE
        gz = gz + ghd * ch.dz
        gkc = gkc + gz @ W2
        # the read O = Q + act(Q W2^T) W1^T
        aq, dzq, _ = ew.act(qc @ _T(W2))
        gzq = (goc @ W1) * dzq
        dq[:, :, sl] = goc + gzq @ W2
        gW1 = _addmm_t(gW1a, ((ch.e2, gew), (gE, ch.hd), (goc, aq)))
        gW2 = _addmm_t(gW2a, ((gz, kc), (gzq, qc)))
        dk[:, :, sl] = gkc
        g = [gW1, gW2, gS1, gS2]
    back = lambda x: x.transpose(1, 2)  # noqa: E731  [B,H,T,...] -> [B,T,H,...]
    dcoef = (dabar[..., 0, 0], drho[..., 0, 0], debar[..., 0, 0], dcp[..., 0], dcm[..., 0])
    return back(dq), back(dk), back(dv), back(dth[..., 0]), dcoef, g
