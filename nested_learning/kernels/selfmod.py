"""Triton kernel of the self-modifying projection recurrence (MATH section 6; the op is
nested_learning/ops/selfmod.py, the specification nested_learning/reference/selfmod.py).

One program per sequence-head walks the chunks in order with the projection memory on chip as
four float32 tiles: the q, k and v memories [d, d] and the two gate rows (padded to 16 rows).
Per chunk of C tokens:

    Y_b = X P_b^T for each block b (every token read by the chunk-start P), stored;
    K, V = normalise(Y_k + X), normalise(Y_v + X)   (+ X only when residual)
    eta = eta_max sigmoid(Y_g[:, 0] + b_eta), alpha = max(sigmoid(Y_g[:, 1] + b_alpha), 1e-4)
           (0 and 1 for invalid tokens)
    then, a complete chunk only, per token t:  P_b <- alpha P_b + (w_b - eta P_b a) k^T
           with a = 2k - v, w_b = eta (v - k) for q, k, v (when residual), 0 for the gates.

The forward keeps every chunk's start state for the backward, which (stop-gradient writes) is
two batched products done by the op in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, pow2


@triton.jit
def _block(ptr, base, row0, nrows, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask of rows row0 .. row0 + nrows - 1 of the [R, D] matrix at ptr + base."""
    r = tl.arange(0, BR)
    c = tl.arange(0, BD)
    return ptr + base + (row0 + r[:, None]) * D + c[None, :], (r[:, None] < nrows) & (c[None, :] < D)


@triton.jit
def _store_blocks(ptr, base, Pq, Pk, Pv, Pg, D: tl.constexpr, BD: tl.constexpr):
    """The four tiles back into the [3D + 2, D] matrix at ptr + base."""
    p, m = _block(ptr, base, 0, D, D, BD, BD)
    tl.store(p, Pq, mask=m)
    p, m = _block(ptr, base, D, D, D, BD, BD)
    tl.store(p, Pk, mask=m)
    p, m = _block(ptr, base, 2 * D, D, D, BD, BD)
    tl.store(p, Pv, mask=m)
    p, m = _block(ptr, base, 3 * D, 2, D, 16, BD)
    tl.store(p, Pg, mask=m)


@triton.jit
def _update(Pb, w, a, k, eta, alpha):
    """One token's DGD write of one block: alpha P + (w - eta P a) k^T (w, P a indexed by row)."""
    u = w - eta * tl.sum(Pb * a[None, :], 1)
    return alpha * Pb + u[:, None] * k[None, :]


@triton.jit
def selfmod_fwd_kernel(x_ptr, p_ptr, gb_ptr, valid_ptr, y_ptr, pout_ptr, ck_ptr, T, H, NT, eta_max,
                       D: tl.constexpr, BD: tl.constexpr, CH: tl.constexpr, BT: tl.constexpr,
                       RESIDUAL: tl.constexpr, KEEP: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    R = 3 * D + 2
    RD = R * D
    base = bh * RD
    pq, mq = _block(p_ptr, base, 0, D, D, BD, BD)
    pk, _ = _block(p_ptr, base, D, D, D, BD, BD)
    pv, _ = _block(p_ptr, base, 2 * D, D, D, BD, BD)
    pg, mg = _block(p_ptr, base, 3 * D, 2, D, 16, BD)
    Pq = tl.load(pq, mask=mq, other=0.0).to(tl.float32)
    Pk = tl.load(pk, mask=mq, other=0.0).to(tl.float32)
    Pv = tl.load(pv, mask=mq, other=0.0).to(tl.float32)
    Pg = tl.load(pg, mask=mg, other=0.0).to(tl.float32)
    b_eta = tl.load(gb_ptr + 2 * h).to(tl.float32)
    b_alpha = tl.load(gb_ptr + 2 * h + 1).to(tl.float32)
    rt = tl.arange(0, BT)
    cd = tl.arange(0, BD)
    c16 = tl.arange(0, 16)
    for n in range(NT):
        if KEEP:
            _store_blocks(ck_ptr, ((b * NT + n) * H + h) * RD, Pq, Pk, Pv, Pg, D, BD)
        t0 = n * CH
        tok = t0 + rt
        tm = (rt < CH) & (tok < T)
        X = tl.load(x_ptr + ((b * T + tok[:, None]) * H + h) * D + cd[None, :],
                    mask=tm[:, None] & (cd[None, :] < D), other=0.0).to(tl.float32)  # [BT, BD]
        Yq = tl.dot(X, tl.trans(Pq), input_precision=PREC)
        Yk = tl.dot(X, tl.trans(Pk), input_precision=PREC)
        Yv = tl.dot(X, tl.trans(Pv), input_precision=PREC)
        Yg = tl.dot(X, tl.trans(Pg), input_precision=PREC)  # [BT, 16]
        yo = y_ptr + ((b * T + tok[:, None]) * H + h) * R
        ym = tm[:, None] & (cd[None, :] < D)
        tl.store(yo + cd[None, :], Yq.to(y_ptr.dtype.element_ty), mask=ym)
        tl.store(yo + D + cd[None, :], Yk.to(y_ptr.dtype.element_ty), mask=ym)
        tl.store(yo + 2 * D + cd[None, :], Yv.to(y_ptr.dtype.element_ty), mask=ym)
        tl.store(yo + 3 * D + c16[None, :], Yg.to(y_ptr.dtype.element_ty), mask=tm[:, None] & (c16[None, :] < 2))
        if t0 + CH <= T:  # a complete chunk writes
            if RESIDUAL:
                Yk += X
                Yv += X
            Kn = Yk / tl.maximum(tl.sqrt(tl.sum(Yk * Yk, 1)), 1e-12)[:, None]
            Vn = Yv / tl.maximum(tl.sqrt(tl.sum(Yv * Yv, 1)), 1e-12)[:, None]
            ok = tl.load(valid_ptr + b * T + tok, mask=tm, other=0) != 0
            g_eta = tl.sum(tl.where(c16[None, :] == 0, Yg, 0.0), 1) + b_eta
            g_alpha = tl.sum(tl.where(c16[None, :] == 1, Yg, 0.0), 1) + b_alpha
            eta_all = tl.where(ok, eta_max * tl.sigmoid(g_eta), 0.0)
            alpha_all = tl.where(ok, tl.maximum(tl.sigmoid(g_alpha), 1e-4), 1.0)
            for t in range(CH):
                sel = rt == t
                k = tl.sum(tl.where(sel[:, None], Kn, 0.0), 0)  # [BD]
                v = tl.sum(tl.where(sel[:, None], Vn, 0.0), 0)
                eta = tl.sum(tl.where(sel, eta_all, 0.0), 0)
                alpha = tl.sum(tl.where(sel, alpha_all, 0.0), 0)
                a = 2.0 * k - v
                if RESIDUAL:
                    w = eta * (v - k)
                else:
                    w = tl.zeros([BD], dtype=tl.float32)
                Pq = _update(Pq, w, a, k, eta, alpha)
                Pk = _update(Pk, w, a, k, eta, alpha)
                Pv = _update(Pv, w, a, k, eta, alpha)
                Pg = _update(Pg, tl.zeros([16], dtype=tl.float32), a, k, eta, alpha)
    _store_blocks(pout_ptr, base, Pq, Pk, Pv, Pg, D, BD)


def selfmod_fwd(x: torch.Tensor, P: torch.Tensor, gate_bias: torch.Tensor, valid: torch.Tensor, chunk: int,
                eta_max: float, residual: bool, keep: bool):
    """x [B, T, H, d] (any float dtype), P [B, H, 3d+2, d], gate_bias [H, 2], valid [B, T] bool.
    Returns y [B, T, H, 3d+2] in x's dtype (float32 for float64 x), the final P float32 and the
    chunk-start states [B, N, H, 3d+2, d] float32 (when keep; else None)."""
    B, T, H, d = x.shape
    R, N = 3 * d + 2, triton.cdiv(T, chunk)
    xk = x.float().contiguous() if x.dtype == torch.float64 else x.contiguous()
    y = torch.empty(B, T, H, R, device=x.device, dtype=xk.dtype)
    Pout = torch.empty(B, H, R, d, device=x.device, dtype=torch.float32)
    ck = torch.empty(B, N, H, R, d, device=x.device, dtype=torch.float32) if keep else Pout
    selfmod_fwd_kernel[(B * H,)](xk, P.float().contiguous(), gate_bias.float().contiguous(),
                                 valid.to(torch.int8).contiguous(), y, Pout, ck, T, H, N, float(eta_max),
                                 D=d, BD=pow2(d), CH=chunk, BT=pow2(chunk), RESIDUAL=bool(residual), KEEP=bool(keep),
                                 PREC=dot_precision(xk), num_warps=4 if d <= 32 else 8)  # P's tiles: 3 d^2 + 16 d floats
    return y, Pout, (ck if keep else None)
