"""Triton kernels of the residual-MLP Titans memory (MATH section 3): the elementwise and
state-recurrence work of each chunk, fused, around the chunk's batched matrix products
(`nested_learning/ops/_titan_mlp.py` holds the chunk loop and the algebra).

    act_derivatives(z)                 act(z), act'(z) and, when asked, act''(z): one pass
    state_step(P, S, G, abar, rho, ebar)
        P' = abar P + rho S - G[:m],  S' = ebar S - G[m:]          (G = [G_par; G_mom])
    state_step_backward(dP', dS', P, S, abar, rho, ebar)
        dP = abar dP',  dS = rho dP' + ebar dS',  and <dP', P>, <dP', S>, <dS', S> per sequence-head

Each replaces 4-6 ATen launches per chunk and parameter; states are [B*H, m, n] in float32 (or
float64), the chunk scalars abar, rho, ebar one per sequence-head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT_ID = {"silu": 0, "gelu": 1, "relu": 2}
BLOCK = 1024
_C0, _K = 0.7978845608028654, 0.044715  # sqrt(2 / pi) and the tanh-GELU cubic coefficient


@triton.jit
def _act_kernel(z_ptr, a_ptr, d_ptr, dd_ptr, n, ACT: tl.constexpr, WANT_DD: tl.constexpr,
                C0: tl.constexpr, KC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    if ACT == 0:  # silu
        s = 1.0 / (1.0 + tl.exp(-z))
        a = z * s
        d = s * (1.0 + z * (1.0 - s))
        dd = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == 1:  # tanh-approximated gelu; tanh(u) = 1 - 2 / (exp(2u) + 1)
        u = C0 * (z + KC * z * z * z)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        du = C0 * (1.0 + 3.0 * KC * z * z)
        a = 0.5 * z * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
        dd = (1.0 - t * t) * (du - z * t * du * du + 3.0 * C0 * KC * z * z)
    else:  # relu
        pos = (z > 0).to(z.dtype)
        a = z * pos
        d = pos
        dd = z * 0.0
    tl.store(a_ptr + offs, a, mask=mask)
    tl.store(d_ptr + offs, d, mask=mask)
    if WANT_DD:
        tl.store(dd_ptr + offs, dd, mask=mask)


def act_derivatives(z: torch.Tensor, activation: str, second: bool = False):
    """(act(z), act'(z), act''(z) or None) in one pass over z (contiguous)."""
    z = z.contiguous()
    a, d = torch.empty_like(z), torch.empty_like(z)
    dd = torch.empty_like(z) if second else d
    n = z.numel()
    if n:
        _act_kernel[(triton.cdiv(n, BLOCK),)](z, a, d, dd, n, ACT=ACT_ID[activation], WANT_DD=second,
                                             C0=_C0, KC=_K, BLOCK=BLOCK)
    return a, d, (dd if second else None)


@triton.jit
def _step_kernel(p_ptr, s_ptr, g_ptr, ab_ptr, rh_ptr, eb_ptr, pn_ptr, sn_ptr, mn, BLOCK: tl.constexpr):
    bh = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < mn
    a = tl.load(ab_ptr + bh)
    r = tl.load(rh_ptr + bh)
    e = tl.load(eb_ptr + bh)
    base = bh.to(tl.int64) * mn
    p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + base + offs, mask=mask, other=0.0)
    gp = tl.load(g_ptr + 2 * base + offs, mask=mask, other=0.0)
    gm = tl.load(g_ptr + 2 * base + mn + offs, mask=mask, other=0.0)
    tl.store(pn_ptr + base + offs, a * p + r * s - gp, mask=mask)
    tl.store(sn_ptr + base + offs, e * s - gm, mask=mask)


def _prepare(tensors, abar, rho, ebar):
    """Contiguous state-sized tensors, the three per-sequence-head scalars flat, the number of
    elements per state (m n), the number of states and the grid."""
    m, n = tensors[-1].shape[-2:]
    BH = tensors[-1].numel() // (m * n)
    coef = [c.reshape(-1).contiguous() for c in (abar, rho, ebar)]
    return [x.contiguous() for x in tensors], coef, m * n, BH, (triton.cdiv(m * n, BLOCK), BH)


def state_step(P, S, G, abar, rho, ebar):
    """P, S [..., m, n]; G [..., 2m, n]; abar, rho, ebar broadcastable to [...] (one per
    sequence-head). Returns (P', S')."""
    (G, P, S), coef, mn, BH, grid = _prepare((G, P, S), abar, rho, ebar)
    Pn, Sn = torch.empty_like(P), torch.empty_like(S)
    if BH:
        _step_kernel[grid](P, S, G, *coef, Pn, Sn, mn, BLOCK=BLOCK)
    return Pn, Sn


@triton.jit
def _step_back_kernel(gpn_ptr, gsn_ptr, p_ptr, s_ptr, ab_ptr, rh_ptr, eb_ptr, gp_ptr, gs_ptr, dots_ptr, mn,
                      NB, BLOCK: tl.constexpr):
    bh = tl.program_id(1)
    blk = tl.program_id(0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < mn
    a = tl.load(ab_ptr + bh)
    r = tl.load(rh_ptr + bh)
    e = tl.load(eb_ptr + bh)
    base = bh.to(tl.int64) * mn
    gpn = tl.load(gpn_ptr + base + offs, mask=mask, other=0.0)
    gsn = tl.load(gsn_ptr + base + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + base + offs, mask=mask, other=0.0)
    tl.store(gp_ptr + base + offs, a * gpn, mask=mask)
    tl.store(gs_ptr + base + offs, r * gpn + e * gsn, mask=mask)
    out = dots_ptr + (bh * NB + blk) * 3
    tl.store(out, tl.sum(gpn * p, axis=0))
    tl.store(out + 1, tl.sum(gpn * s, axis=0))
    tl.store(out + 2, tl.sum(gsn * s, axis=0))


def state_step_backward(gPn, gSn, P, S, abar, rho, ebar):
    """Gradients through state_step's recurrence part: returns dP = abar dP', dS = rho dP' +
    ebar dS' and the per-sequence-head sums <dP', P>, <dP', S>, <dS', S> ([...] each), the
    gradients of abar, rho and ebar."""
    (gPn, gSn, P, S), coef, mn, BH, grid = _prepare((gPn, gSn, P, S), abar, rho, ebar)
    gP, gS = torch.empty_like(P), torch.empty_like(S)
    dots = P.new_empty(BH, grid[0], 3)
    if BH:
        _step_back_kernel[grid](gPn, gSn, P, S, *coef, gP, gS, dots, mn, grid[0], BLOCK=BLOCK)
    d = dots.sum(1).view(*P.shape[:-2], 3)
    return gP, gS, d[..., 0], d[..., 1], d[..., 2]
