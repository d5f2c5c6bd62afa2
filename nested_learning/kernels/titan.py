"""Triton kernels of the Titans linear memory with momentum and forgetting (MATH section 3).

One program per (value tile, sequence-head) walks the chunks in order with the float32 state
(M, S) on chip; rows of M (value index) never interact, so value tiles are independent.
Per chunk of C tokens, with every gradient at the chunk-start memory M:

    o      = Q M^T                                       (reads of the chunk-start state)
    E      = 2 (K M^T - V),  LT = theta o E              (per-token errors, scaled)
    M'     = abar M + rho S - (c_par o LT)^T K
    S'     = ebar S - (c_mom o LT)^T K

The scan coefficients (abar, rho, ebar per chunk; c_par, c_mom per token) come from
`nested_learning/ops/_titan_scan.py`. The forward keeps (M, S) at every chunk start; the
backward walks the chunks in reverse from those checkpoints (never a weight copy per token):

    U      = -(c_par o K dM'^T + c_mom o K dS'^T),  dE = theta o U,  dtheta = rowsum(E o U)
    dV     = -2 dE,  dQ = dO M,  dK = 2 dE M - (c_par o LT) dM' - (c_mom o LT) dS'
    dM     = abar dM' + dO^T Q + 2 dE^T K,   dS = rho dM' + ebar dS'
    dabar  = <dM', M>, drho = <dM', S>, debar = <dS', S>, dc_par = -rowsum(LT o K dM'^T), ...

Sums over the value index (dQ, dK, dtheta, the coefficient gradients) are written per value
tile and added by the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, load_state, pow2, state_ptrs


@triton.jit
def _ld(ptr, b, h, t0, tend, T, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, d0):
    """[BT, BD] float32 block (columns d0..) of a [B, T, H, D] tensor; rows t0.. below tend."""
    t = t0 + tl.arange(0, BT)
    d = d0 + tl.arange(0, BD)
    off = ((b * T + t[:, None]) * H + h) * D + d[None, :]
    return tl.load(ptr + off, mask=(t[:, None] < tend) & (d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _st(ptr, x, b, h, t0, tend, T, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, d0):
    t = t0 + tl.arange(0, BT)
    d = d0 + tl.arange(0, BD)
    off = ((b * T + t[:, None]) * H + h) * D + d[None, :]
    tl.store(ptr + off, x.to(ptr.dtype.element_ty), mask=(t[:, None] < tend) & (d[None, :] < D))


@triton.jit
def _row(ptr, bh, t0, tend, T, BT: tl.constexpr):
    """[BT] float32 of a [B*H, T] coefficient array (zeros from tend)."""
    t = t0 + tl.arange(0, BT)
    return tl.load(ptr + bh * T + t, mask=t < tend, other=0.0)


@triton.jit
def _theta(ptr, b, h, t0, tend, T, H, BT: tl.constexpr):
    t = t0 + tl.arange(0, BT)
    return tl.load(ptr + (b * T + t) * H + h, mask=t < tend, other=0.0).to(tl.float32)


@triton.jit
def titan_fwd_kernel(q_ptr, k_ptr, v_ptr, theta_ptr, cpar_ptr, cmom_ptr, abar_ptr, rho_ptr, ebar_ptr,
                     m0_ptr, s0_ptr, o_ptr, mck_ptr, sck_ptr, mt_ptr, st_ptr, T, H, NT,
                     DK: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    v0 = iv * BV
    M = load_state(m0_ptr, bh, v0, DV, DK, BV, BK, HAS_INIT)  # [BV, BK]
    S = load_state(s0_ptr, bh, v0, DV, DK, BV, BK, HAS_INIT)
    for n in range(NT):
        t0 = n * CH
        te = tl.minimum(t0 + CH, T)
        pm, mm = state_ptrs(mck_ptr, bh * NT + n, v0, DV, DK, BV, BK)
        ps, _ = state_ptrs(sck_ptr, bh * NT + n, v0, DV, DK, BV, BK)
        tl.store(pm, M, mask=mm)
        tl.store(ps, S, mask=mm)
        Q = _ld(q_ptr, b, h, t0, te, T, H, DK, BT, BK, 0)  # [BT, BK]
        K = _ld(k_ptr, b, h, t0, te, T, H, DK, BT, BK, 0)
        V = _ld(v_ptr, b, h, t0, te, T, H, DV, BT, BV, v0)  # [BT, BV]
        _st(o_ptr, tl.dot(Q, tl.trans(M), input_precision=PREC), b, h, t0, te, T, H, DV, BT, BV, v0)
        E = 2.0 * (tl.dot(K, tl.trans(M), input_precision=PREC) - V)
        LT = _theta(theta_ptr, b, h, t0, te, T, H, BT)[:, None] * E
        cp = _row(cpar_ptr, bh, t0, te, T, BT)
        cm = _row(cmom_ptr, bh, t0, te, T, BT)
        Gp = tl.dot(tl.trans(cp[:, None] * LT), K, input_precision=PREC)  # [BV, BK]
        Gm = tl.dot(tl.trans(cm[:, None] * LT), K, input_precision=PREC)
        abar = tl.load(abar_ptr + bh * NT + n)
        rho = tl.load(rho_ptr + bh * NT + n)
        ebar = tl.load(ebar_ptr + bh * NT + n)
        M_new = abar * M + rho * S - Gp
        S = ebar * S - Gm
        M = M_new
    pm, mm = state_ptrs(mt_ptr, bh, v0, DV, DK, BV, BK)
    ps, _ = state_ptrs(st_ptr, bh, v0, DV, DK, BV, BK)
    tl.store(pm, M, mask=mm)
    tl.store(ps, S, mask=mm)


@triton.jit
def titan_bwd_kernel(q_ptr, k_ptr, v_ptr, theta_ptr, cpar_ptr, cmom_ptr, abar_ptr, rho_ptr, ebar_ptr,
                     mck_ptr, sck_ptr, do_ptr, dmt_ptr, dst_ptr,
                     dq_ptr, dk_ptr, dv_ptr, dtheta_ptr, dcpar_ptr, dcmom_ptr, dscal_ptr, dm0_ptr, ds0_ptr,
                     B, T, H, NT, DK: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, HAS_DFINAL: tl.constexpr, PREC: tl.constexpr):
    """Partial outputs (summed over value tiles by the launcher) are indexed by iv first:
    dq, dk [NV, B, T, H, DK]; dtheta [NV, B, T, H]; dcpar, dcmom [NV, B*H, T];
    dscal [NV, B*H, NT, 3] (dabar, drho, debar)."""
    iv, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    v0 = iv * BV
    dM = load_state(dmt_ptr, bh, v0, DV, DK, BV, BK, HAS_DFINAL)
    dS = load_state(dst_ptr, bh, v0, DV, DK, BV, BK, HAS_DFINAL)
    r = tl.arange(0, BT)
    part_tok = iv * B * T * H  # offset of this tile's [B, T, H] slice
    part_bh = iv * B * H * T
    for i in range(NT):
        n = NT - 1 - i
        t0 = n * CH
        te = tl.minimum(t0 + CH, T)
        M = load_state(mck_ptr, bh * NT + n, v0, DV, DK, BV, BK, True)
        S = load_state(sck_ptr, bh * NT + n, v0, DV, DK, BV, BK, True)
        Q = _ld(q_ptr, b, h, t0, te, T, H, DK, BT, BK, 0)
        K = _ld(k_ptr, b, h, t0, te, T, H, DK, BT, BK, 0)
        V = _ld(v_ptr, b, h, t0, te, T, H, DV, BT, BV, v0)
        dO = _ld(do_ptr, b, h, t0, te, T, H, DV, BT, BV, v0)
        th = _theta(theta_ptr, b, h, t0, te, T, H, BT)
        cp = _row(cpar_ptr, bh, t0, te, T, BT)
        cm = _row(cmom_ptr, bh, t0, te, T, BT)
        abar = tl.load(abar_ptr + bh * NT + n)
        rho = tl.load(rho_ptr + bh * NT + n)
        ebar = tl.load(ebar_ptr + bh * NT + n)
        E = 2.0 * (tl.dot(K, tl.trans(M), input_precision=PREC) - V)  # [BT, BV]
        LT = th[:, None] * E
        KdM = tl.dot(K, tl.trans(dM), input_precision=PREC)  # [BT, BV]
        KdS = tl.dot(K, tl.trans(dS), input_precision=PREC)
        U = -(cp[:, None] * KdM + cm[:, None] * KdS)
        dE = th[:, None] * U
        t = t0 + r
        tm = t < te
        tl.store(dtheta_ptr + part_tok + (b * T + t) * H + h, tl.sum(E * U, 1), mask=tm)
        tl.store(dcpar_ptr + part_bh + bh * T + t, -tl.sum(LT * KdM, 1), mask=tm)
        tl.store(dcmom_ptr + part_bh + bh * T + t, -tl.sum(LT * KdS, 1), mask=tm)
        _st(dv_ptr, -2.0 * dE, b, h, t0, te, T, H, DV, BT, BV, v0)
        dK = (2.0 * tl.dot(dE, M, input_precision=PREC) - tl.dot(cp[:, None] * LT, dM, input_precision=PREC)
              - tl.dot(cm[:, None] * LT, dS, input_precision=PREC))
        _st(dk_ptr + iv * B * T * H * DK, dK, b, h, t0, te, T, H, DK, BT, BK, 0)
        _st(dq_ptr + iv * B * T * H * DK, tl.dot(dO, M, input_precision=PREC), b, h, t0, te, T, H, DK, BT, BK, 0)
        sc = dscal_ptr + ((iv * B * H + bh) * NT + n) * 3
        tl.store(sc, tl.sum(tl.sum(dM * M, 1), 0))
        tl.store(sc + 1, tl.sum(tl.sum(dM * S, 1), 0))
        tl.store(sc + 2, tl.sum(tl.sum(dS * S, 1), 0))
        dM_prev = (abar * dM + tl.dot(tl.trans(dO), Q, input_precision=PREC)
                   + 2.0 * tl.dot(tl.trans(dE), K, input_precision=PREC))
        dS = rho * dM + ebar * dS
        dM = dM_prev
    pm, mm = state_ptrs(dm0_ptr, bh, v0, DV, DK, BV, BK)
    ps, _ = state_ptrs(ds0_ptr, bh, v0, DV, DK, BV, BK)
    tl.store(pm, dM, mask=mm)
    tl.store(ps, dS, mask=mm)


def _tiles(q, v, chunk_size):
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    if chunk_size > 64:
        raise ValueError(f"titan_update (triton): chunk_size up to 64 is supported, got {chunk_size}")
    BT = pow2(chunk_size)  # tile rows: the chunk padded to a power of two >= 16 (rows masked)
    BK = pow2(DK)
    BV = min(pow2(DV), 64)
    if BK > 256:
        raise ValueError(f"titan_update (triton): dk up to 256 is supported, got {DK}")
    return B, T, H, DK, DV, BT, BK, BV, triton.cdiv(T, chunk_size), triton.cdiv(DV, BV)


def titan_fwd(q, k, v, theta, coef, M0, S0, chunk_size: int):
    """o [B, T, H, dv] (q's dtype), final (M, S) float32, and the chunk-start checkpoints.
    coef = (abar, rho, ebar [B, H, N], c_par, c_mom [B, H, T]) float32 contiguous."""
    B, T, H, DK, DV, BT, BK, BV, NT, NV = _tiles(q, v, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    o = torch.empty(B, T, H, DV, device=q.device, dtype=q.dtype)
    mck = torch.empty(B * H, NT, DV, DK, **f32)
    sck = torch.empty_like(mck)
    mt = torch.empty(B, H, DV, DK, **f32)
    st = torch.empty_like(mt)
    abar, rho, ebar, cp, cm = coef
    has = M0 is not None
    titan_fwd_kernel[(NV, B * H)](q, k, v, theta, cp, cm, abar, rho, ebar, M0 if has else mt, S0 if has else st,
                                  o, mck, sck, mt, st, T, H, NT, DK, DV, chunk_size, BT, BK, BV, has,
                                  dot_precision(q))
    return o, mt, st, (mck, sck)


def titan_bwd(do, dMt, dSt, q, k, v, theta, coef, ckpt, chunk_size: int):
    """Gradients dq, dk, dv, dtheta (float32, input layouts), dcoef = (dabar, drho, debar,
    dc_par, dc_mom) and (dM0, dS0)."""
    B, T, H, DK, DV, BT, BK, BV, NT, NV = _tiles(q, v, chunk_size)
    f32 = dict(device=q.device, dtype=torch.float32)
    abar, rho, ebar, cp, cm = coef
    mck, sck = ckpt
    dq = torch.empty(NV, B, T, H, DK, **f32)
    dk = torch.empty_like(dq)
    dv = torch.empty(B, T, H, DV, **f32)
    dth = torch.empty(NV, B, T, H, **f32)
    dcp = torch.empty(NV, B * H, T, **f32)
    dcm = torch.empty_like(dcp)
    dsc = torch.empty(NV, B * H, NT, 3, **f32)
    dM0 = torch.empty(B, H, DV, DK, **f32)
    dS0 = torch.empty_like(dM0)
    has = dMt is not None
    titan_bwd_kernel[(NV, B * H)](q, k, v, theta, cp, cm, abar, rho, ebar, mck, sck, do,
                                  dMt if has else dM0, dSt if has else dS0,
                                  dq, dk, dv, dth, dcp, dcm, dsc, dM0, dS0, B, T, H, NT, DK, DV, chunk_size, BT, BK, BV,
                                  has,
                                  dot_precision(q))
    dsc = dsc.sum(0).reshape(B, H, NT, 3)
    dcoef = (dsc[..., 0], dsc[..., 1], dsc[..., 2], dcp.sum(0).reshape(B, H, T), dcm.sum(0).reshape(B, H, T))
    return dq.sum(0), dk.sum(0), dv, dth.sum(0), dcoef, (dM0, dS0)
