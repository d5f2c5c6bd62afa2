"""ops.linear_cross_entropy: tied-head cross-entropy with the teach signal (MATH section 1)."""

from __future__ import annotations

from torch import Tensor

from ..reference.cross_entropy import REDUCTIONS, linear_cross_entropy_reference
from . import _backend, _checks
from ._define import define_op


def _fake(h, weight, targets, ignore_index, reduction):
    loss = h.new_empty(targets.shape) if reduction == "none" else h.new_empty(())
    return loss, h.new_empty(h.shape)


_op = define_op(
    "linear_cross_entropy",
    "Tensor h, Tensor weight, Tensor targets",
    "int ignore_index, str reduction",
    n_out=2,
    fake=_fake,
    reference=linear_cross_entropy_reference,
)


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of logits = h @ weight^T against aligned targets, and the teach signal.

    h [..., D]; weight [V, D] (the tied embedding); targets [...] integer, targets[t] being
    the next token of position t, ignore_index where there is none. Returns the loss (mean
    over non-ignored positions, 0 when none; or "sum" / "none") and delta [..., D], the
    gradient of the SUMMED per-token loss w.r.t. h (zero rows where ignored). The loss is
    differentiable w.r.t. h and weight; delta is a constant (stop-gradient)."""
    _checks.tensor("h", h)
    if h.dim() < 1:
        raise ValueError("h must have at least one dimension [..., D]")
    _checks.tensor("weight", weight, 2)
    _checks.shape("weight", weight, (None, h.shape[-1]), "[V, D] with D = h.shape[-1]")
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        raise TypeError("targets must be an integer tensor")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"targets must have shape {list(h.shape[:-1])} (h without D), got {list(targets.shape)}")
    _checks.same_dtype({"h": h, "weight": weight})
    _checks.choice("reduction", reduction, REDUCTIONS)
    dev = _checks.same_device({"h": h, "weight": weight, "targets": targets})
    if _checks._checks_enabled() and targets.numel():
        ok = (targets == ignore_index) | ((targets >= 0) & (targets < weight.shape[0]))
        if not bool(ok.all()):
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")
    name = _backend.resolve("linear_cross_entropy", dev.type, backend)
    loss, delta = _op(h, weight, targets.long(), int(ignore_index), reduction, name)
    return loss, delta.detach()
