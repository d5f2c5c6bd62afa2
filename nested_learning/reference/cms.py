"""One CMS level's chunked update of one linear layer y = W x (MATH sections 4 and 2).

The level's period C: tokens are gathered C at a time (a ring buffer of C slots holds the
inputs x_t and teach signals delta_t of an unfinished chunk, across calls). When a chunk is
full the layer is updated once, with every term evaluated at the chunk-start weight W_c:

    G       = sum_{t in chunk} delta_t x_t^T                 (one matrix product)
    gd:       W <- W - lr G
    momentum: m <- beta m - lr G;   W <- W + m
    dgd:      W <- W (alpha I - lr sum_t x_t x_t^T) - lr G   (section 2 with a = k = x,
                                                              w = -lr delta; period 1 is
                                                              exactly the per-token rule)

and ||W_new - W_c||_F is reported per sequence for each applied update.
"""

from __future__ import annotations

import torch
from torch import Tensor

FUSED_OPTIMIZERS = ("gd", "momentum", "dgd")  # the ones the C++ and Triton kernels fuse
INNER_OPTIMIZERS = FUSED_OPTIMIZERS + ("deep_momentum",)  # deep momentum: reference/deep_momentum.py


def buffered_tokens(buffer_x: Tensor, buffer_delta: Tensor, filled: int, x: Tensor,
                    delta: Tensor) -> tuple[Tensor, Tensor, int]:
    """The buffered then the new tokens (xs, ds) and how many complete chunks they make."""
    xs = torch.cat([buffer_x[:, :filled], x], 1)
    ds = torch.cat([buffer_delta[:, :filled], delta], 1)
    return xs, ds, xs.shape[1] // buffer_x.shape[1]


def leftover(xs: Tensor, ds: Tensor, n_up: int, C: int, norms: list, weight: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
    """The new ring buffers (the tokens after the last complete chunk, then zeros) and the
    per-update norms stacked to [B, n_up]."""
    rest = xs.shape[1] - n_up * C
    bx = torch.cat([xs[:, n_up * C :], xs.new_zeros(xs.shape[0], C - rest, xs.shape[2])], 1)
    bd = torch.cat([ds[:, n_up * C :], ds.new_zeros(ds.shape[0], C - rest, ds.shape[2])], 1)
    return bx, bd, torch.stack(norms, 1) if norms else weight.new_zeros(weight.shape[0], 0)


def cms_update_reference(
    weight: Tensor,
    x: Tensor,
    delta: Tensor,
    buffer_x: Tensor,
    buffer_delta: Tensor,
    filled: int,
    momentum: Tensor | None,
    lr: float,
    optimizer: str = "gd",
    beta: float = 0.9,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """weight [B,Dout,Din]; x [B,T,Din]; delta [B,T,Dout]; buffers [B,C,Din] / [B,C,Dout]
    holding `filled` valid slots; momentum [B,Dout,Din] (optimizer "momentum" only).

    Returns (weight, momentum (empty unless used), buffer_x, buffer_delta, norms [B, n_updates]); the new
    buffers hold the (filled + T) % C leftover tokens in their first slots, zeros after."""
    C = buffer_x.shape[1]
    xs, ds, n_up = buffered_tokens(buffer_x, buffer_delta, filled, x, delta)
    W = weight
    norms = []
    for c in range(n_up):
        xc, dc = xs[:, c * C : (c + 1) * C], ds[:, c * C : (c + 1) * C]
        G = dc.transpose(1, 2) @ xc  # [B,Dout,Din]
        if optimizer == "gd":
            W_new = W - lr * G
        elif optimizer == "momentum":
            momentum = beta * momentum - lr * G
            W_new = W + momentum
        elif optimizer == "dgd":
            W_new = alpha * W - lr * (W @ (xc.transpose(1, 2) @ xc)) - lr * G
        else:
            raise ValueError(f"optimizer must be one of {FUSED_OPTIMIZERS} (deep_momentum: "
                             f"deep_momentum_reference), got {optimizer!r}")
        norms.append((W_new - W).flatten(1).norm(dim=1))
        W = W_new
    bx, bd, norms_t = leftover(xs, ds, n_up, C, norms, weight)
    if momentum is None:
        momentum = weight.new_empty(0)
    return W, momentum, bx, bd, norms_t
