"""Deep momentum (DMGD, MATH section 5, Nested Learning Eq. 23) as a CMS level's inner optimizer.

Ordinary momentum is a memory of past gradients with one matrix of parameters m, written
by one gradient step on the dot-product objective <m, G> (step lr, decay beta) and read as
it is: m <- beta m - lr G, W <- W + m. Deep momentum replaces that matrix by a small MLP
memory. MATH section 5 names the memory but not its objective or read-out; this package reads
it as follows (the choice is ours, stated here and in docs/MATH.md section 5.1):

    memory:     m_phi(I) = M0 + V tanh(K)        phi = (M0 [Dout, Din], K [H, Din], V [Dout, H])
    objective:  L2(phi; G) = <m_phi(I), G>       (momentum's own objective, keys = identity)
    write:      M0 <- beta M0 - lr G
                V  <- beta V  - lr G tanh(K)^T
                K  <- K       - lr (V^T G) * (1 - tanh(K)^2)    (all at the old phi)
    read:       W  <- W + m_phi'(I) = W + M0 + V tanh(K)

Read at the identity key, a linear memory (H = 0) is ordinary momentum exactly. The hidden
layer adds a learned preconditioner: after the first chunk the step is
-lr G (I + tanh(K)^T tanh(K)), and K moves with the gradients it sees. The decay beta is the
memory's forgetting of gradient values (M0, V); the hidden keys K are its features and are not
decayed (decaying them would collapse the memory back to momentum within ~1/(1-beta) chunks).
K starts from `initial_keys`: fixed, seeded, rows of norm ~1, the same for every layer and
sequence, so a run is reproducible on any device."""

from __future__ import annotations

import torch
from torch import Tensor

from .cms import buffered_tokens, leftover


def initial_keys(hidden: int, d_in: int, dtype: torch.dtype, device) -> Tensor:
    """K0 [hidden, d_in]: N(0, 1/d_in) entries from a fixed seed (rows of norm ~1), drawn on the
    CPU so every device starts from the same keys."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(hidden, d_in, generator=g, dtype=torch.float64) / d_in**0.5).to(device, dtype)


def deep_momentum_step(W: Tensor, m0: Tensor, keys: Tensor, values: Tensor, G: Tensor, lr: float,
                       beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk's update from its gradient G [B, Dout, Din]: (W, M0, K, V) after it."""
    s = torch.tanh(keys)  # [B, H, Din]
    d_keys = (values.transpose(1, 2) @ G) * (1 - s * s)
    m0 = beta * m0 - lr * G
    values = beta * values - lr * (G @ s.transpose(1, 2))
    keys = keys - lr * d_keys
    return W + m0 + values @ torch.tanh(keys), m0, keys, values


def deep_momentum_reference(
    weight: Tensor, x: Tensor, delta: Tensor, buffer_x: Tensor, buffer_delta: Tensor, filled: int,
    m0: Tensor, keys: Tensor, values: Tensor, lr: float, beta: float = 0.9,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """weight, m0 [B,Dout,Din]; keys [B,H,Din]; values [B,Dout,H]; x [B,T,Din]; delta [B,T,Dout];
    buffers [B,C,Din] / [B,C,Dout] with `filled` valid slots (as cms_update_reference).

    Returns (weight, m0, keys, values, buffer_x, buffer_delta, norms [B, n_updates]), G of each
    chunk being sum_t delta_t x_t^T at the chunk-start state."""
    C = buffer_x.shape[1]
    xs, ds, n_up = buffered_tokens(buffer_x, buffer_delta, filled, x, delta)
    W, norms = weight, []
    for c in range(n_up):
        G = ds[:, c * C:(c + 1) * C].transpose(1, 2) @ xs[:, c * C:(c + 1) * C]
        W_new, m0, keys, values = deep_momentum_step(W, m0, keys, values, G, lr, beta)
        norms.append((W_new - W).flatten(1).norm(dim=1))
        W = W_new
    bx, bd, norms_t = leftover(xs, ds, n_up, C, norms, weight)
    return W, m0, keys, values, bx, bd, norms_t
