"""Triton kernels of the DGD rank-1 update (docs/MATH.md section 2), chunk-parallel (WY/UT).

One program handles one chunk (parallel stages) or one sequence, head and value tile (the
sequential state stages, which keep the float32 state on chip across chunks). Per chunk of C
tokens, with G_t = sum_{r<=t} log alpha_r inside the chunk and Gp_t = G_{t-1}:

    M[t, s]  = eta_t exp(Gp_t - G_s) (a_t . k_s)          s < t
    Wm, U0   = (I + M)^{-1} [diag(eta exp(Gp)) A,  W]     (one triangular solve)
    U        = U0 - Wm S^T                                 (S: chunk-start state [dv, dk])
    o        = diag(exp(G)) Q S^T + (D o Q K^T) U          (D: decays; "before" uses Gp)
    S'       = exp(G_C) S + (diag(exp(G_C - G)) U)^T K

The backward runs dS <- exp(G_C) dS' + dO^T diag(exp(G)) Q - dU^T Wm in reverse
(dU = (D o Q K^T)^T dO + diag(exp(G_C - G)) K dS'^T), then differentiates each chunk's
products; [dA~ | dW] = Ainv^T [-dU S | dU], dM = -(dW U0^T + dA~ Wm^T) on the strict lower
triangle, and the gate gradients return to log alpha through reverse cumsums.

Forward:  dgd_diag_inv_fwd_kernel  inverses of the 16-row diagonal blocks of I + M (substitution)
          dgd_prep_fwd_kernel   G, Ainv = (I + M)^-1 (block merge by matmuls), Wm, U0
          dgd_state_fwd_kernel  chunk-start states h, U = U0 - Wm S^T, final state
          dgd_output_fwd_kernel o = exp(G) Q S^T + (D o Q K^T) U
Backward: dgd_du_bwd_kernel     dU from the outputs: (D o Q K^T)^T dO
          dgd_state_bwd_kernel  chunk-end state gradients dh, total dU, dh0
          dgd_grad_bwd_kernel   dq, dk, da, dw, deta, dalpha of one chunk

Layouts: inputs [B, T, H, d] contiguous; intermediates [B, H, T, *] float32; states
[B, H, (N,) dv, dk] float32. Inputs of any float dtype are upcast right after loading.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, load_state, pow2, state_ptrs

# ----------------------------------------------------------------------------- helpers


@triton.jit
def _load_tok(ptr, b, h, t0, T, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """[BT, BD] float32 block of a [B, T, H, D] tensor (zeros outside)."""
    t = t0 + tl.arange(0, BT)
    d = tl.arange(0, BD)
    off = ((b * T + t[:, None]) * H + h) * D + d[None, :]
    return tl.load(ptr + off, mask=(t[:, None] < T) & (d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _store_tok(ptr, x, b, h, t0, T, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    t = t0 + tl.arange(0, BT)
    d = tl.arange(0, BD)
    off = ((b * T + t[:, None]) * H + h) * D + d[None, :]
    tl.store(ptr + off, x.to(ptr.dtype.element_ty), mask=(t[:, None] < T) & (d[None, :] < D))


@triton.jit
def _load_gate(ptr, b, h, t0, T, H, BT: tl.constexpr, other: tl.constexpr):
    t = t0 + tl.arange(0, BT)
    return tl.load(ptr + (b * T + t) * H + h, mask=t < T, other=other).to(tl.float32)


@triton.jit
def _store_gate(ptr, x, b, h, t0, T, H, BT: tl.constexpr):
    t = t0 + tl.arange(0, BT)
    tl.store(ptr + (b * T + t) * H + h, x.to(ptr.dtype.element_ty), mask=t < T)


@triton.jit
def _load_bh(ptr, bh, t0, T, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, d0):
    """[BT, BD] block (columns d0..d0+BD) of a [B*H, T, D] float32 intermediate."""
    t = t0 + tl.arange(0, BT)
    d = d0 + tl.arange(0, BD)
    return tl.load(ptr + (bh * T + t[:, None]) * D + d[None, :], mask=(t[:, None] < T) & (d[None, :] < D), other=0.0)


@triton.jit
def _store_bh(ptr, x, bh, t0, T, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, d0):
    t = t0 + tl.arange(0, BT)
    d = d0 + tl.arange(0, BD)
    tl.store(ptr + (bh * T + t[:, None]) * D + d[None, :], x, mask=(t[:, None] < T) & (d[None, :] < D))


@triton.jit
def _chunk_G(g_ptr, bh, t0, T, BT: tl.constexpr):
    """G (in-chunk cumulative log alpha, stored by the prep kernel) of the chunk at t0, zeros
    past T, and G at the chunk's last token."""
    t = t0 + tl.arange(0, BT)
    G = tl.load(g_ptr + bh * T + t, mask=t < T, other=0.0)
    return G, tl.load(g_ptr + bh * T + tl.minimum(t0 + BT, T) - 1)


@triton.jit
def _decay(rows, G, mask):
    """exp(rows[t] - G[s]) where mask, else 0 (masked before the exp)."""
    return tl.exp(tl.where(mask, rows[:, None] - G[None, :], float("-inf")))


@triton.jit
def _unit_lower_inverse(M, BT: tl.constexpr):
    """(I + M)^-1 for strictly lower-triangular M [BT, BT], by forward substitution."""
    r = tl.arange(0, BT)
    Ai = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in range(1, BT):
        m_i = tl.sum(tl.where(r[:, None] == i, M, 0.0), 0)  # row i of M, over columns j
        row = -tl.sum(m_i[:, None] * Ai, 0) + tl.where(r == i, 1.0, 0.0)
        Ai = tl.where(r[:, None] == i, row[None, :], Ai)
    return Ai


# ----------------------------------------------------------------------------- forward

SUB = 16  # rows of the diagonal blocks of (I + M) inverted by forward substitution


@triton.jit
def dgd_diag_inv_fwd_kernel(k_ptr, a_ptr, alpha_ptr, eta_ptr, ainv_ptr, T, H, DK: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr, SB: tl.constexpr, PREC: tl.constexpr):
    """(I + M_jj)^-1 of each SB-row diagonal block of each chunk, written in its place in Ainv.
    Small blocks keep the sequential substitution cheap; the chunk-level merge is matmuls."""
    i, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t0 = i * SB
    r = tl.arange(0, SB)
    la = tl.log(_load_gate(alpha_ptr, b, h, t0, T, H, SB, 1.0))
    G = tl.cumsum(la, 0)  # block-relative: M uses differences of G only
    eta = _load_gate(eta_ptr, b, h, t0, T, H, SB, 0.0)
    K = _load_tok(k_ptr, b, h, t0, T, H, DK, SB, BK)
    A = _load_tok(a_ptr, b, h, t0, T, H, DK, SB, BK)
    M = eta[:, None] * _decay(G - la, G, r[:, None] > r[None, :]) * tl.dot(A, tl.trans(K), input_precision=PREC)
    _store_bh(ainv_ptr, _unit_lower_inverse(M, SB), bh, t0, T, BT, SB, SB, t0 % BT)


@triton.jit
def dgd_prep_fwd_kernel(k_ptr, a_ptr, w_ptr, alpha_ptr, eta_ptr, g_ptr, ainv_ptr, wm_ptr, u0_ptr, T, H,
                        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, SB: tl.constexpr, PREC: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t0 = n * BT
    r = tl.arange(0, BT)
    la = tl.log(_load_gate(alpha_ptr, b, h, t0, T, H, BT, 1.0))
    G = tl.cumsum(la, 0)
    tl.store(g_ptr + bh * T + t0 + r, G, mask=t0 + r < T)
    Gp = G - la
    eta = _load_gate(eta_ptr, b, h, t0, T, H, BT, 0.0)
    K = _load_tok(k_ptr, b, h, t0, T, H, DK, BT, BK)  # [BT, BK]
    A = _load_tok(a_ptr, b, h, t0, T, H, DK, BT, BK)
    W = _load_tok(w_ptr, b, h, t0, T, H, DV, BT, BV)  # [BT, BV]
    AK = tl.dot(A, tl.trans(K), input_precision=PREC)  # [BT, BT]
    M = eta[:, None] * _decay(Gp, G, r[:, None] > r[None, :]) * AK
    # (I + M)^-1 = (I + E)^-1 Dinv with Dinv the inverted diagonal blocks (dgd_diag_inv_fwd_kernel)
    # and E = Dinv N, N the strictly block-lower part of M: E is nilpotent, E^(BT/SB) = 0 exactly
    rb = r // SB
    t = t0 + r
    Dinv = tl.load(ainv_ptr + (bh * T + t[:, None]) * BT + r[None, :],
                   mask=(t[:, None] < T) & (rb[:, None] == rb[None, :]), other=0.0)
    E = tl.dot(Dinv, tl.where(rb[:, None] > rb[None, :], M, 0.0), input_precision=PREC)
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    Sinv = eye - tl.dot(E, eye - tl.dot(E, eye - E, input_precision=PREC), input_precision=PREC)  # up to E^3
    Ai = tl.dot(Sinv, Dinv, input_precision=PREC)
    _store_bh(ainv_ptr, Ai, bh, t0, T, BT, BT, BT, 0)
    At = (eta * tl.exp(Gp))[:, None] * A
    _store_bh(wm_ptr, tl.dot(Ai, At, input_precision=PREC), bh, t0, T, DK, BT, BK, 0)
    _store_bh(u0_ptr, tl.dot(Ai, W, input_precision=PREC), bh, t0, T, DV, BT, BV, 0)


@triton.jit
def dgd_state_fwd_kernel(k_ptr, g_ptr, wm_ptr, u0_ptr, h0_ptr, h_ptr, u_ptr, ht_ptr, T, H, NT,
                         DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    v0 = iv * BV
    r = tl.arange(0, BT)
    S = load_state(h0_ptr, bh, v0, DV, DK, BV, BK, HAS_H0)  # [BV, BK]
    for n in range(NT):
        t0 = n * BT
        ph, mh = state_ptrs(h_ptr, bh * NT + n, v0, DV, DK, BV, BK)
        tl.store(ph, S, mask=mh)
        Wm = _load_bh(wm_ptr, bh, t0, T, DK, BT, BK, 0)
        U = _load_bh(u0_ptr, bh, t0, T, DV, BT, BV, v0) - tl.dot(Wm, tl.trans(S), input_precision=PREC)
        _store_bh(u_ptr, U, bh, t0, T, DV, BT, BV, v0)
        K = _load_tok(k_ptr, b, h, t0, T, H, DK, BT, BK)
        G, GC = _chunk_G(g_ptr, bh, t0, T, BT)
        tail = tl.where(t0 + r < T, tl.exp(GC - G), 0.0)
        S = tl.exp(GC) * S + tl.dot(tl.trans(tail[:, None] * U), K, input_precision=PREC)
    pt, mt = state_ptrs(ht_ptr, bh, v0, DV, DK, BV, BK)
    tl.store(pt, S, mask=mt)


@triton.jit
def dgd_output_fwd_kernel(q_ptr, k_ptr, alpha_ptr, g_ptr, h_ptr, u_ptr, o_ptr, T, H, NT,
                          DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, AFTER: tl.constexpr, PREC: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t0 = n * BT
    r = tl.arange(0, BT)
    G, _ = _chunk_G(g_ptr, bh, t0, T, BT)
    Gp = G - tl.log(_load_gate(alpha_ptr, b, h, t0, T, H, BT, 1.0))
    Q = _load_tok(q_ptr, b, h, t0, T, H, DK, BT, BK)
    K = _load_tok(k_ptr, b, h, t0, T, H, DK, BT, BK)
    ph, mh = state_ptrs(h_ptr, bh * NT + n, 0, DV, DK, BV, BK)
    S = tl.load(ph, mask=mh, other=0.0)
    U = _load_bh(u_ptr, bh, t0, T, DV, BT, BV, 0)
    if AFTER:
        eq = tl.exp(G)
        D = _decay(G, G, r[:, None] >= r[None, :])
    else:
        eq = tl.exp(Gp)
        D = _decay(Gp, G, r[:, None] > r[None, :])
    P = D * tl.dot(Q, tl.trans(K), input_precision=PREC)
    o = eq[:, None] * tl.dot(Q, tl.trans(S), input_precision=PREC) + tl.dot(P, U, input_precision=PREC)
    _store_tok(o_ptr, o, b, h, t0, T, H, DV, BT, BV)


# ----------------------------------------------------------------------------- backward


@triton.jit
def dgd_du_bwd_kernel(q_ptr, k_ptr, alpha_ptr, g_ptr, do_ptr, duo_ptr, T, H,
                      DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, AFTER: tl.constexpr, PREC: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t0 = n * BT
    r = tl.arange(0, BT)
    G, _ = _chunk_G(g_ptr, bh, t0, T, BT)
    if AFTER:
        D = _decay(G, G, r[:, None] >= r[None, :])
    else:
        Gp = G - tl.log(_load_gate(alpha_ptr, b, h, t0, T, H, BT, 1.0))
        D = _decay(Gp, G, r[:, None] > r[None, :])
    Q = _load_tok(q_ptr, b, h, t0, T, H, DK, BT, BK)
    K = _load_tok(k_ptr, b, h, t0, T, H, DK, BT, BK)
    dO = _load_tok(do_ptr, b, h, t0, T, H, DV, BT, BV)
    P = D * tl.dot(Q, tl.trans(K), input_precision=PREC)
    _store_bh(duo_ptr, tl.dot(tl.trans(P), dO, input_precision=PREC), bh, t0, T, DV, BT, BV, 0)


@triton.jit
def dgd_state_bwd_kernel(q_ptr, k_ptr, alpha_ptr, g_ptr, wm_ptr, do_ptr, duo_ptr, dht_ptr, dh_ptr, du_ptr,
                         dh0_ptr, T, H, NT, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr, AFTER: tl.constexpr,
                         PREC: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    v0 = iv * BV
    r = tl.arange(0, BT)
    dS = load_state(dht_ptr, bh, v0, DV, DK, BV, BK, HAS_DHT)  # [BV, BK]
    for i in range(NT):
        n = NT - 1 - i
        t0 = n * BT
        ph, mh = state_ptrs(dh_ptr, bh * NT + n, v0, DV, DK, BV, BK)
        tl.store(ph, dS, mask=mh)
        G, GC = _chunk_G(g_ptr, bh, t0, T, BT)
        if AFTER:
            eq = tl.exp(G)
        else:
            eq = tl.exp(G - tl.log(_load_gate(alpha_ptr, b, h, t0, T, H, BT, 1.0)))
        tail = tl.where(t0 + r < T, tl.exp(GC - G), 0.0)
        K = _load_tok(k_ptr, b, h, t0, T, H, DK, BT, BK)
        dU = _load_bh(duo_ptr, bh, t0, T, DV, BT, BV, v0) + tail[:, None] * tl.dot(K, tl.trans(dS), input_precision=PREC)
        _store_bh(du_ptr, dU, bh, t0, T, DV, BT, BV, v0)
        # dO tile of this program's value rows
        t = t0 + r
        v = v0 + tl.arange(0, BV)
        dO = tl.load(do_ptr + ((b * T + t[:, None]) * H + h) * DV + v[None, :],
                     mask=(t[:, None] < T) & (v[None, :] < DV), other=0.0).to(tl.float32)
        Q = _load_tok(q_ptr, b, h, t0, T, H, DK, BT, BK)
        Wm = _load_bh(wm_ptr, bh, t0, T, DK, BT, BK, 0)
        dS = (tl.exp(GC) * dS + tl.dot(tl.trans(dO), eq[:, None] * Q, input_precision=PREC)
              - tl.dot(tl.trans(dU), Wm, input_precision=PREC))
    p0, m0 = state_ptrs(dh0_ptr, bh, v0, DV, DK, BV, BK)
    tl.store(p0, dS, mask=m0)


@triton.jit
def dgd_grad_bwd_kernel(q_ptr, k_ptr, a_ptr, alpha_ptr, eta_ptr, g_ptr, ainv_ptr, wm_ptr, u0_ptr, h_ptr, u_ptr,
                        do_ptr, dh_ptr, du_ptr, dq_ptr, dk_ptr, da_ptr, dw_ptr, deta_ptr, dalpha_ptr, T, H, NT,
                        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, AFTER: tl.constexpr, PREC: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t0 = n * BT
    r = tl.arange(0, BT)
    valid = t0 + r < T
    alpha = _load_gate(alpha_ptr, b, h, t0, T, H, BT, 1.0)
    eta = _load_gate(eta_ptr, b, h, t0, T, H, BT, 0.0)
    G, GC = _chunk_G(g_ptr, bh, t0, T, BT)
    Gp = G - tl.log(alpha)
    strict = r[:, None] > r[None, :]
    Edec = _decay(Gp, G, strict)
    eGp = tl.exp(Gp)
    if AFTER:
        eq = tl.exp(G)
        D = _decay(G, G, r[:, None] >= r[None, :])
    else:
        eq = eGp
        D = Edec
    tail = tl.where(valid, tl.exp(GC - G), 0.0)
    Q = _load_tok(q_ptr, b, h, t0, T, H, DK, BT, BK)
    K = _load_tok(k_ptr, b, h, t0, T, H, DK, BT, BK)
    A = _load_tok(a_ptr, b, h, t0, T, H, DK, BT, BK)
    dO = _load_tok(do_ptr, b, h, t0, T, H, DV, BT, BV)
    ph, mh = state_ptrs(h_ptr, bh * NT + n, 0, DV, DK, BV, BK)
    S = tl.load(ph, mask=mh, other=0.0)  # [BV, BK]
    ph, mh = state_ptrs(dh_ptr, bh * NT + n, 0, DV, DK, BV, BK)
    dSe = tl.load(ph, mask=mh, other=0.0)
    U = _load_bh(u_ptr, bh, t0, T, DV, BT, BV, 0)
    dU = _load_bh(du_ptr, bh, t0, T, DV, BT, BV, 0)
    U0 = _load_bh(u0_ptr, bh, t0, T, DV, BT, BV, 0)
    Wm = _load_bh(wm_ptr, bh, t0, T, DK, BT, BK, 0)
    Ai = _load_bh(ainv_ptr, bh, t0, T, BT, BT, BT, 0)
    # outputs: o = eq Q S^T + (D o Q K^T) U
    QK = tl.dot(Q, tl.trans(K), input_precision=PREC)
    P = D * QK
    dP = tl.dot(dO, tl.trans(U), input_precision=PREC)  # [BT, BT]
    dPD = dP * D
    dQ = eq[:, None] * tl.dot(dO, S, input_precision=PREC) + tl.dot(dPD, K, input_precision=PREC)
    dK_tail = tail[:, None] * tl.dot(U, dSe, input_precision=PREC)
    dWm = -tl.dot(dU, S, input_precision=PREC)
    # through the triangular solve: [dAt | dWr] = Ainv^T [dWm | dU]
    AiT = tl.trans(Ai)
    dAt = tl.dot(AiT, dWm, input_precision=PREC)
    dWr = tl.dot(AiT, dU, input_precision=PREC)
    dM = -(tl.dot(dWr, tl.trans(U0), input_precision=PREC) + tl.dot(dAt, tl.trans(Wm), input_precision=PREC))
    dM = tl.where(strict, dM, 0.0)
    AK = tl.dot(A, tl.trans(K), input_precision=PREC)
    M = eta[:, None] * Edec * AK
    dAK = dM * eta[:, None] * Edec
    dK = (tl.dot(tl.trans(dPD), Q, input_precision=PREC) + dK_tail
          + tl.dot(tl.trans(dAK), A, input_precision=PREC))
    dA = tl.dot(dAK, K, input_precision=PREC) + (eta * eGp)[:, None] * dAt
    deta = tl.sum(dM * Edec * AK, 1) + tl.sum(dAt * eGp[:, None] * A, 1)
    # gates: gradients w.r.t. G_t and Gp_t, then back to log alpha by reverse cumsums
    dMM = dM * M
    dPP = dP * P
    t1 = tl.sum(dO * (eq[:, None] * tl.dot(Q, tl.trans(S), input_precision=PREC)), 1)
    z = tl.sum(dK_tail * K, 1)
    dG = -tl.sum(dMM, 0) - tl.sum(dPP, 0) - z
    dGp = tl.sum(dMM, 1) + tl.sum(dAt * ((eta * eGp)[:, None] * A), 1)
    if AFTER:
        dG += t1 + tl.sum(dPP, 1)
    else:
        dGp += t1 + tl.sum(dPP, 1)
    dGC = tl.exp(GC) * tl.sum(tl.sum(dSe * S, 1), 0) + tl.sum(z, 0)
    dG += tl.where(r == BT - 1, dGC, 0.0)
    dla = tl.cumsum(dG, 0, reverse=True) + tl.cumsum(dGp, 0, reverse=True) - dGp
    _store_tok(dq_ptr, dQ, b, h, t0, T, H, DK, BT, BK)
    _store_tok(dk_ptr, dK, b, h, t0, T, H, DK, BT, BK)
    _store_tok(da_ptr, dA, b, h, t0, T, H, DK, BT, BK)
    _store_tok(dw_ptr, dWr, b, h, t0, T, H, DV, BT, BV)
    _store_gate(deta_ptr, deta, b, h, t0, T, H, BT)
    _store_gate(dalpha_ptr, dla / alpha, b, h, t0, T, H, BT)


# ----------------------------------------------------------------------------- launchers


def _tiles(q: torch.Tensor, w: torch.Tensor, chunk_size: int):
    B, T, H, DK = q.shape
    DV = w.shape[-1]
    BT = min(64, pow2(chunk_size))
    BK, BV = pow2(DK), pow2(DV)
    if BK > 256 or BV > 256:
        raise ValueError(f"dgd_update (triton): head dims up to 256 are supported, got dk={DK}, dv={DV}")
    BVS = min(BV, 64)  # value tile of the sequential state kernels
    return B, T, H, DK, DV, BT, BK, BV, BVS, triton.cdiv(T, BT)


def _forward_stages(q, k, w, alpha, eta, a, h0, chunk_size, after):
    B, T, H, DK, DV, BT, BK, BV, BVS, NT = _tiles(q, w, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    G = torch.empty(B * H, T, **f32)
    Ai = torch.empty(B * H, T, BT, **f32)
    Wm = torch.empty(B * H, T, DK, **f32)
    U0 = torch.empty(B * H, T, DV, **f32)
    prec = dot_precision(q)
    if BT // SUB > 4:
        raise AssertionError("the block merge of dgd_prep_fwd_kernel handles up to 4 diagonal blocks")
    dgd_diag_inv_fwd_kernel[(triton.cdiv(T, SUB), B * H)](k, a, alpha, eta, Ai, T, H, DK, BT, BK, SUB, prec)
    dgd_prep_fwd_kernel[(NT, B * H)](k, a, w, alpha, eta, G, Ai, Wm, U0, T, H, DK, DV, BT, BK, BV, SUB, prec,
                                     num_warps=4)
    hs = torch.empty(B * H, NT, DV, DK, **f32)
    U = torch.empty(B * H, T, DV, **f32)
    ht = torch.empty(B, H, DV, DK, **f32)
    dgd_state_fwd_kernel[(triton.cdiv(DV, BVS), B * H)](
        k, G, Wm, U0, h0 if h0 is not None else ht, hs, U, ht, T, H, NT, DK, DV, BT, BK, BVS, h0 is not None, prec)
    return dict(G=G, Ai=Ai, Wm=Wm, U0=U0, h=hs, U=U, ht=ht)


def dgd_fwd(q, k, w, alpha, eta, a, h0, chunk_size: int, after: bool):
    """o [B, T, H, dv] in q's dtype and the final state [B, H, dv, dk] float32. Inputs
    contiguous, on one device; a is the erase direction (pass k for a = k)."""
    B, T, H, DK, DV, BT, BK, BV, BVS, NT = _tiles(q, w, chunk_size)
    st = _forward_stages(q, k, w, alpha, eta, a, h0, chunk_size, after)
    o = torch.empty(B, T, H, DV, device=q.device, dtype=q.dtype)
    dgd_output_fwd_kernel[(NT, B * H)](q, k, alpha, st["G"], st["h"], st["U"], o, T, H, NT, DK, DV, BT, BK, BV,
                                       after, dot_precision(q))
    return o, st["ht"]


def dgd_bwd(do, dht, q, k, w, alpha, eta, a, h0, chunk_size: int, after: bool):
    """Gradients (dq, dk, dw, dalpha, deta, da, dh0), float32, recomputing the forward stages."""
    B, T, H, DK, DV, BT, BK, BV, BVS, NT = _tiles(q, w, chunk_size)
    st = _forward_stages(q, k, w, alpha, eta, a, h0, chunk_size, after)
    f32 = dict(device=q.device, dtype=torch.float32)
    prec = dot_precision(q)
    dUo = torch.empty(B * H, T, DV, **f32)
    dgd_du_bwd_kernel[(NT, B * H)](q, k, alpha, st["G"], do, dUo, T, H, DK, DV, BT, BK, BV, after, prec)
    dh = torch.empty(B * H, NT, DV, DK, **f32)
    dU = torch.empty(B * H, T, DV, **f32)
    dh0 = torch.empty(B, H, DV, DK, **f32)
    dgd_state_bwd_kernel[(triton.cdiv(DV, BVS), B * H)](
        q, k, alpha, st["G"], st["Wm"], do, dUo, dht if dht is not None else dh0, dh, dU, dh0, T, H, NT,
        DK, DV, BT, BK, BVS, dht is not None, after, prec)
    dq = torch.empty(B, T, H, DK, **f32)
    dk = torch.empty_like(dq)
    da = torch.empty_like(dq)
    dw = torch.empty(B, T, H, DV, **f32)
    deta = torch.empty(B, T, H, **f32)
    dalpha = torch.empty_like(deta)
    dgd_grad_bwd_kernel[(NT, B * H)](
        q, k, a, alpha, eta, st["G"], st["Ai"], st["Wm"], st["U0"], st["h"], st["U"], do, dh, dU,
        dq, dk, da, dw, deta, dalpha, T, H, NT, DK, DV, BT, BK, BV, after, prec, num_warps=8)
    return dq, dk, dw, dalpha, deta, da, dh0
