"""Tied-head cross-entropy and its teach signal (MATH section 1).

    logits_t = W_E h_t,   loss_t = logsumexp(logits_t) - logits_t[y_t]
    delta_t  = d loss_t / d h_t = (softmax(logits_t) - onehot(y_t)) @ W_E

`targets` are already aligned with h (targets[t] is the next token y_{t+1}); positions whose
target is ignore_index (including the last position of a segment, by the caller) get a zero
loss and a zero delta row. delta is the gradient of the SUM of per-token losses, whatever the
reduction of the returned loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..constants import IGNORE

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_reference(
    h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE, reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """h [..., D]; weight [V, D]; targets [...] integer. Returns (loss, delta [..., D]).
    reduction "mean" averages over the non-ignored positions (0 when there are none)."""
    cdt = torch.promote_types(h.dtype, torch.float32)
    hf, wf = h.reshape(-1, h.shape[-1]).to(cdt), weight.to(cdt)
    y = targets.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    logits = hf @ wf.T  # [N, V]
    lse = logits.logsumexp(-1)
    per_tok = (lse - logits.gather(1, y_safe.unsqueeze(1)).squeeze(1)) * valid
    p = (logits - lse.unsqueeze(1)).exp()
    p = p - torch.nn.functional.one_hot(y_safe, wf.shape[0]).to(cdt)
    delta = ((p @ wf) * valid.unsqueeze(1)).reshape(h.shape).to(h.dtype)
    if reduction == "none":
        loss = per_tok.reshape(targets.shape)
    elif reduction == "sum":
        loss = per_tok.sum()
    else:
        loss = per_tok.sum() / valid.sum().clamp(min=1)
    return loss.to(h.dtype), delta
