"""Triton kernels of the CMS chunk update of one linear layer y = W x (docs/MATH.md section 4).

The complete chunks c of C tokens (X_c [C, Din], D_c [C, Dout]) are applied in order, every
term at the chunk-start W:

    gd:       G = D_c^T X_c;   W -= lr G
    momentum: G = D_c^T X_c;   m = beta m - lr G;   W += m
    dgd:      G = (W X_c^T + D_c^T) X_c;   W = alpha W - lr G   (= W (alpha I - lr X^T X) - lr D^T X)

The update is row-local in W (element-local for gd and momentum), so one program owns a tile
of W (and m) on chip across all the chunks and writes it back once:

    cms_apply_fwd_kernel       grid (row blocks, column blocks, B): a [BR, BK] tile; dgd needs
                               whole rows (W X^T), so there BK covers Din (Din <= ONCHIP_DGD_DIN)
    cms_dgd_stream_fwd_kernel  grid (row blocks, B): dgd with wider rows; W lives in a global
                               buffer, two passes over column tiles per chunk (P = W X^T + D^T to
                               a scratch; barrier; W = alpha W - lr P X; barrier)

The chunk is walked in tiles of BT tokens (padded to >= 16, masked). Each program writes the
squared Frobenius norm of its tile's update per chunk to a [B, tiles, n] buffer, summed on the
host. Everything is computed in CDT, float32 (float64 for float64 inputs): inputs are upcast
right after loading. bf16/fp16 inputs use tf32 products on the GPU, float32 exact ones.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._common import dot_precision, pow2

ONCHIP_DGD_DIN = 512  # dgd keeps [BR, nextpow2(Din)] rows on chip up to this width
STREAM_BK = 128  # column tile of the streamed dgd kernel
_OPT = {"gd": 0, "momentum": 1, "dgd": 2}


@triton.jit
def _load_tok(ptr, b, sb, tok, tmask, cols, D, CDT: tl.constexpr):
    """[BT, BK] block in CDT (tokens tok, columns cols) of a [B, *, D] tensor with batch stride sb."""
    off = b * sb + tok[:, None] * D + cols[None, :]
    return tl.load(ptr + off, mask=tmask[:, None] & (cols[None, :] < D), other=0.0).to(CDT)


@triton.jit
def _load_tok_t(ptr, b, sb, tok, tmask, rows, D, CDT: tl.constexpr):
    """[BR, BT] block in CDT: the transpose of tokens tok, columns rows of a [B, *, D] tensor."""
    off = b * sb + tok[None, :] * D + rows[:, None]
    return tl.load(ptr + off, mask=tmask[None, :] & (rows[:, None] < D), other=0.0,
                   cache_modifier=".cg").to(CDT)


@triton.jit
def _scalar(hi, lo, CDT: tl.constexpr):
    """hi + lo in CDT: a float64 hyperparameter passed as two float32 arguments (see _pair)."""
    return tl.cast(hi, CDT) + tl.cast(lo, CDT)


@triton.jit
def cms_apply_fwd_kernel(w_ptr, m_ptr, x_ptr, d_ptr, wo_ptr, mo_ptr, sq_ptr, DIN, DOUT, sxb, sdb, C, n,
                         lr_hi, lr_lo, beta_hi, beta_lo, alpha_hi, alpha_lo, OPT: tl.constexpr,
                         BR: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr,
                         CDT: tl.constexpr):
    r, k, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    lr, beta = _scalar(lr_hi, lr_lo, CDT), _scalar(beta_hi, beta_lo, CDT)
    alpha = _scalar(alpha_hi, alpha_lo, CDT)
    rows = r * BR + tl.arange(0, BR)
    cols = k * BK + tl.arange(0, BK)
    wmask = (rows[:, None] < DOUT) & (cols[None, :] < DIN)
    woff = b * DOUT * DIN + rows[:, None] * DIN + cols[None, :]
    W = tl.load(w_ptr + woff, mask=wmask, other=0.0).to(CDT)  # [BR, BK]
    if OPT == 1:
        M = tl.load(m_ptr + woff, mask=wmask, other=0.0).to(CDT)
    sq = sq_ptr + ((b * tl.num_programs(0) + r) * tl.num_programs(1) + k) * n
    for c in range(n):
        G = tl.zeros([BR, BK], dtype=CDT)
        for s in range(0, C, BT):
            t = s + tl.arange(0, BT)
            tok = (c * C + t).to(tl.int64)
            X = _load_tok(x_ptr, b, sxb, tok, t < C, cols, DIN, CDT)  # [BT, BK]
            U = _load_tok_t(d_ptr, b, sdb, tok, t < C, rows, DOUT, CDT)  # [BR, BT]
            if OPT == 2:
                U += tl.dot(W, tl.trans(X), input_precision=PREC)
            G += tl.dot(U, X, input_precision=PREC)
        if OPT == 0:
            step = -lr * G
        elif OPT == 1:
            M = beta * M - lr * G
            step = M
        else:
            step = (alpha - 1.0) * W - lr * G
        W += step
        tl.store(sq + c, tl.sum(tl.sum(step * step, 1), 0))
    tl.store(wo_ptr + woff, W.to(wo_ptr.dtype.element_ty), mask=wmask)
    if OPT == 1:
        tl.store(mo_ptr + woff, M.to(mo_ptr.dtype.element_ty), mask=wmask)


@triton.jit
def cms_dgd_stream_fwd_kernel(w_ptr, x_ptr, d_ptr, p_ptr, sq_ptr, DIN, DOUT, sxb, sdb, C, n, lr_hi, lr_lo,
                              alpha_hi, alpha_lo, BR: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                              PREC: tl.constexpr, CDT: tl.constexpr):
    r, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    lr, alpha = _scalar(lr_hi, lr_lo, CDT), _scalar(alpha_hi, alpha_lo, CDT)
    rows = r * BR + tl.arange(0, BR)
    w_rows = w_ptr + b * DOUT * DIN + rows[:, None] * DIN  # W: CDT [B, DOUT, DIN], updated in place
    for c in range(n):
        for s in range(0, C, BT):  # pass 1: P = W X^T + D^T, [BR, BT] per token tile, to the scratch
            t = s + tl.arange(0, BT)
            tok = (c * C + t).to(tl.int64)
            P = _load_tok_t(d_ptr, b, sdb, tok, t < C, rows, DOUT, CDT)
            for k0 in range(0, DIN, BK):
                cols = k0 + tl.arange(0, BK)
                wmask = (rows[:, None] < DOUT) & (cols[None, :] < DIN)
                Wk = tl.load(w_rows + cols[None, :], mask=wmask, other=0.0, cache_modifier=".cg")  # [BR, BK]
                X = _load_tok(x_ptr, b, sxb, tok, t < C, cols, DIN, CDT)  # [BT, BK]
                P += tl.dot(Wk, tl.trans(X), input_precision=PREC)
            tl.store(p_ptr + (b * C + t[None, :]) * DOUT + rows[:, None], P,
                     mask=(t[None, :] < C) & (rows[:, None] < DOUT))
        tl.debug_barrier()
        acc = tl.zeros([BR], dtype=CDT)
        for k0 in range(0, DIN, BK):  # pass 2: W = alpha W - lr P X, one column tile at a time
            cols = k0 + tl.arange(0, BK)
            wmask = (rows[:, None] < DOUT) & (cols[None, :] < DIN)
            G = tl.zeros([BR, BK], dtype=CDT)
            for s in range(0, C, BT):
                t = s + tl.arange(0, BT)
                P = _load_tok_t(p_ptr, b, C * DOUT, t.to(tl.int64), t < C, rows, DOUT, CDT)  # [BR, BT]
                X = _load_tok(x_ptr, b, sxb, (c * C + t).to(tl.int64), t < C, cols, DIN, CDT)
                G += tl.dot(P, X, input_precision=PREC)
            Wk = tl.load(w_rows + cols[None, :], mask=wmask, other=0.0, cache_modifier=".cg")
            step = (alpha - 1.0) * Wk - lr * G
            tl.store(w_rows + cols[None, :], Wk + step, mask=wmask)
            acc += tl.sum(step * step, 1)
        tl.store(sq_ptr + (b * tl.num_programs(0) + r) * n + c, tl.sum(acc, 0))
        tl.debug_barrier()  # this chunk's W and P reads done before the next chunk's


def _pair(v: float) -> tuple[float, float]:
    """v as float32 hi + lo (float kernel arguments are float32): ~48 bits, enough for float64."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] with contiguous rows (any batch stride, e.g. a prefix of the tokens)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def cms_apply(weight, momentum, x, delta, period: int, lr: float, optimizer: str, beta: float, alpha: float):
    """Applies the n = N / period complete chunks of x [B, N, Din] and delta [B, N, Dout] to
    weight [B, Dout, Din] (and momentum, optimizer "momentum" only; else None). Returns the new
    weight and momentum in their input dtypes and the update norms [B, n] (float32, float64 for
    float64 weights: the compute dtype)."""
    B, Dout, Din = weight.shape
    C, n = period, x.shape[1] // period
    x, delta = _rows(x), _rows(delta)
    opt = _OPT[optimizer]
    f64 = weight.dtype == torch.float64
    cdt, CDT = (torch.float64, tl.float64) if f64 else (torch.float32, tl.float32)
    prec = dot_precision(weight)
    new = dict(device=weight.device, dtype=cdt)
    if opt == 2 and pow2(Din) > ONCHIP_DGD_DIN:
        BR, BK, BT = 32, min(pow2(Din), STREAM_BK), min(pow2(C), 32)
        R = triton.cdiv(Dout, BR)
        W = weight.to(cdt, memory_format=torch.contiguous_format, copy=True)
        scratch = torch.empty(B, C, Dout, **new)
        sq = torch.empty(B, R, n, **new)
        cms_dgd_stream_fwd_kernel[(R, B)](W, x, delta, scratch, sq, Din, Dout, x.stride(0), delta.stride(0), C,
                                          n, *_pair(lr), *_pair(alpha), BR, BK, BT, prec, CDT, num_warps=4)
        return W.to(weight.dtype), None, sq.sum(1).sqrt()
    BK = pow2(Din) if opt == 2 else min(pow2(Din), 128)  # dgd: whole rows
    BR = min(64, max(16, 8192 // BK))  # W tiles of <= 8192 elements up to BK = 512
    BT = min(pow2(C), max(16, 4096 // BK))
    R, K = triton.cdiv(Dout, BR), triton.cdiv(Din, BK)
    W = weight.contiguous()
    m = momentum.contiguous() if opt == 1 else W  # W: a placeholder pointer, never read
    Wo = torch.empty_like(W)
    mo = torch.empty_like(m) if opt == 1 else Wo
    sq = torch.empty(B, R * K, n, **new)
    cms_apply_fwd_kernel[(R, K, B)](W, m, x, delta, Wo, mo, sq, Din, Dout, x.stride(0), delta.stride(0), C, n,
                                    *_pair(lr), *_pair(beta), *_pair(alpha), opt, BR, BK, BT, prec, CDT,
                                    num_warps=4 if BR * BK <= 4096 else 8)
    return Wo, (mo if opt == 1 else None), sq.sum(1).sqrt()
