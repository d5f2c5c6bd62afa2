"""Triton kernels of the tied-head cross-entropy and its teach signal (docs/MATH.md section 1).

The [N, V] logits are never held: each kernel recomputes its [BN, BV] tiles of
logits = h @ W^T (tl.dot over D in BK pieces) and turns them into softmax - onehot on chip.

    lce_lse_fwd_kernel    one program per BN tokens: online logsumexp over the vocabulary,
                          loss_t = lse_t - logits_t[y_t] (0 where ignored)
    lce_delta_fwd_kernel  one program per (BN tokens, BD columns of D):
                          delta = (softmax - onehot) @ W, zero rows where ignored
    lce_dw_bwd_kernel     one program per (BV vocabulary rows, BD columns of D):
                          dW = sum_t scale_t (softmax_t - onehot_t)^T h_t (scale 0 where ignored)

Layouts: h [N, D], W [V, D], targets [N] int64, all contiguous; lse and loss float32. Inputs
of any float dtype are upcast right after loading; products accumulate in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, pow2

BN, BV = 64, 64  # token and vocabulary tiles
MAX_BK, MAX_BD = 64, 128  # D pieces of the logits products; D columns of one output tile


@triton.jit
def _load_cols(ptr, r, d, R, D):
    """[len(r), len(d)] float32 block (rows r, columns d) of a [R, D] tensor; zeros outside."""
    return tl.load(ptr + r.to(tl.int64)[:, None] * D + d[None, :], mask=(r[:, None] < R) & (d[None, :] < D),
                   other=0.0).to(tl.float32)


@triton.jit
def _logits(h_ptr, w_ptr, n, v, N, V, D, BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
            PREC: tl.constexpr):
    """[BN, BV] float32 tile of h @ W^T (token rows n, vocabulary columns v); zeros outside."""
    acc = tl.zeros([BN, BV], dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK)
        wt = tl.trans(_load_cols(w_ptr, v, k, V, D))  # [BK, BV]
        acc += tl.dot(_load_cols(h_ptr, n, k, N, D), wt, input_precision=PREC)
    return acc


@triton.jit
def lce_lse_fwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, loss_ptr, N, V, D, ignore_index, BN: tl.constexpr,
                       BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    y = tl.load(y_ptr + n, mask=n < N, other=ignore_index)
    valid = y != ignore_index
    y = tl.where(valid, y, -1)
    m = tl.full([BN], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BN], dtype=tl.float32)
    tgt = tl.zeros([BN], dtype=tl.float32)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        x = tl.where(v[None, :] < V, _logits(h_ptr, w_ptr, n, v, N, V, D, BN, BV, BK, PREC), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))  # finite: every tile has a column < V
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
        tgt += tl.sum(tl.where(v[None, :] == y[:, None], x, 0.0), 1)
    lse = m + tl.log(s)
    tl.store(lse_ptr + n, lse, mask=n < N)
    tl.store(loss_ptr + n, tl.where(valid, lse - tgt, 0.0), mask=n < N)


@triton.jit
def lce_delta_fwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, delta_ptr, N, V, D, ignore_index, BN: tl.constexpr,
                         BV: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    y = tl.load(y_ptr + n, mask=n < N, other=ignore_index)
    valid = y != ignore_index
    y = tl.where(valid, y, -1)
    lse = tl.load(lse_ptr + n, mask=n < N, other=0.0)
    acc = tl.zeros([BN, BD], dtype=tl.float32)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        x = _logits(h_ptr, w_ptr, n, v, N, V, D, BN, BV, BK, PREC)
        p = tl.exp(x - lse[:, None]) - tl.where(v[None, :] == y[:, None], 1.0, 0.0)
        p = tl.where(valid[:, None] & (v[None, :] < V), p, 0.0)
        acc += tl.dot(p, _load_cols(w_ptr, v, d, V, D), input_precision=PREC)
    tl.store(delta_ptr + n.to(tl.int64)[:, None] * D + d[None, :], acc.to(delta_ptr.dtype.element_ty),
             mask=(n[:, None] < N) & (d[None, :] < D))


@triton.jit
def lce_dw_bwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, scale_ptr, dw_ptr, N, V, D, BN: tl.constexpr,
                      BV: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    v = tl.program_id(0) * BV + tl.arange(0, BV)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    acc = tl.zeros([BV, BD], dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        y = tl.load(y_ptr + n, mask=n < N, other=-1)
        lse = tl.load(lse_ptr + n, mask=n < N, other=0.0)
        sc = tl.load(scale_ptr + n, mask=n < N, other=0.0)  # 0 on ignored tokens
        x = _logits(h_ptr, w_ptr, n, v, N, V, D, BN, BV, BK, PREC)
        p = (tl.exp(x - lse[:, None]) - tl.where(v[None, :] == y[:, None], 1.0, 0.0)) * sc[:, None]
        acc += tl.dot(tl.trans(p), _load_cols(h_ptr, n, d, N, D), input_precision=PREC)
    tl.store(dw_ptr + v.to(tl.int64)[:, None] * D + d[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=(v[:, None] < V) & (d[None, :] < D))


def _tiles(D: int) -> tuple[int, int]:
    p = pow2(D)
    return min(MAX_BK, p), min(MAX_BD, p)


def _lse(h, w, y, ignore_index: int):
    N, D = h.shape
    BK, _ = _tiles(D)
    lse = torch.empty(N, device=h.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    lce_lse_fwd_kernel[(triton.cdiv(N, BN),)](h, w, y, lse, loss, N, w.shape[0], D, ignore_index, BN, BV, BK,
                                              dot_precision(h), num_warps=4)
    return lse, loss


def lce_fwd(h, w, y, ignore_index: int):
    """Per-token loss [N] float32 and delta [N, D] in h's dtype. h [N, D], w [V, D], y [N]
    int64, contiguous, N, V, D > 0."""
    N, D = h.shape
    BK, BD = _tiles(D)
    lse, loss = _lse(h, w, y, ignore_index)
    delta = torch.empty_like(h)
    lce_delta_fwd_kernel[(triton.cdiv(N, BN), triton.cdiv(D, BD))](
        h, w, y, lse, delta, N, w.shape[0], D, ignore_index, BN, BV, BK, BD, dot_precision(h), num_warps=8)
    return loss, delta


def lce_dweight(h, w, y, scale, ignore_index: int):
    """dW [V, D] in w's dtype = sum_t scale_t (softmax_t - onehot_t)^T h_t; scale [N] float32
    must be 0 on ignored tokens. Recomputes the logsumexp."""
    N, D = h.shape
    V = w.shape[0]
    BK, BD = _tiles(D)
    lse, _ = _lse(h, w, y, ignore_index)
    dw = torch.empty_like(w)
    lce_dw_bwd_kernel[(triton.cdiv(V, BV), triton.cdiv(D, BD))](
        h, w, y, lse, scale, dw, N, V, D, BN, BV, BK, BD, dot_precision(h), num_warps=8)
    return dw
