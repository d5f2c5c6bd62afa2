"""ops.linear_cross_entropy: tied-head cross-entropy with the teach signal (MATH section 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks as _checks
from ..constants import IGNORE
from ..reference.cross_entropy import REDUCTIONS, linear_cross_entropy_reference
from . import _backend
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
    save_outputs=True,  # the fused backward reuses delta: dL/dh_t = dL/dloss_t * delta_t
)

# Fused backend: the [tokens, vocab] logits are never held whole. Tokens are processed in
# blocks of about CHUNK_ELEMENTS logits; per block the logits are one matrix product, turned
# into softmax - onehot in place, and multiplied back (delta; in the backward, the weight
# gradient). Work: two [N, V, D] products forward, two backward (the loss gradient w.r.t. h is
# delta scaled per token), the same as logits-materialising autograd.
CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 logits per block


def _logit_blocks(hf: Tensor, wf: Tensor):
    """Yields (start, end, logits [end - start, V]) over blocks of tokens; one buffer reused."""
    N, V = hf.shape[0], wf.shape[0]
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    buf = hf.new_empty(min(rows, max(N, 1)), V)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        yield s, e, torch.mm(hf[s:e], wf.T, out=buf[: e - s])


def _prepare(h, weight, targets, ignore_index):
    cdt = torch.promote_types(h.dtype, torch.float32)
    hf = h.reshape(-1, h.shape[-1]).to(cdt)
    y = targets.reshape(-1)
    valid = y != ignore_index
    return hf, weight.to(cdt), torch.where(valid, y, torch.zeros_like(y)), valid


def _reduce(loss_tok: Tensor, valid: Tensor, targets: Tensor, reduction: str) -> Tensor:
    """The per-token losses (0 where ignored) reduced as asked."""
    if reduction == "none":
        return loss_tok.reshape(targets.shape)
    if reduction == "sum":
        return loss_tok.sum()
    return loss_tok.sum() / valid.sum().clamp(min=1)


def _loss_scale(gl: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """dL/dloss_t per token [N] from the loss's gradient gl (0 where ignored)."""
    scale = gl.reshape(-1) * valid.to(gl.dtype)  # "none": per token; else one scalar
    return scale / valid.sum().clamp(min=1) if reduction == "mean" else scale


def _softmax_minus_onehot_(logits: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """In place: scale_t * (softmax(logits_t) - onehot(y_t)); rows with scale 0 become 0.
    Returns the rows' logsumexp. One pass of exp, written into the logits' own buffer
    (logsumexp would allocate a logits-sized temporary and exponentiate a second time)."""
    m = logits.amax(1, keepdim=True)
    total = logits.sub_(m).exp_().sum(1, keepdim=True)
    logits.div_(total)
    logits.scatter_add_(1, y[:, None], torch.full_like(m, -1.0))
    logits.mul_(scale[:, None])
    return (m + total.log()).squeeze(1)


def _fused_forward(h, weight, targets, ignore_index, reduction):
    hf, wf, y, valid = _prepare(h, weight, targets, ignore_index)
    loss_tok = hf.new_empty(hf.shape[0])
    delta = hf.new_empty(hf.shape)
    vf = valid.to(hf.dtype)
    for s, e, logits in _logit_blocks(hf, wf):
        target = logits.gather(1, y[s:e, None]).squeeze(1)
        lse = _softmax_minus_onehot_(logits, y[s:e], vf[s:e])
        loss_tok[s:e] = (lse - target) * vf[s:e]
        torch.mm(logits, wf, out=delta[s:e])
    return _reduce(loss_tok, valid, targets, reduction).to(h.dtype), delta.reshape(h.shape).to(h.dtype)


def _fused_backward(grads, inputs, ignore_index, reduction):
    h, weight, targets, _loss, delta = inputs
    gl = grads[0]
    if gl is None:
        return [torch.zeros_like(h), torch.zeros_like(weight), h.new_empty(0)]
    hf, wf, y, valid = _prepare(h, weight, targets, ignore_index)
    scale = _loss_scale(gl.to(hf.dtype), valid, reduction)
    dh = (delta.reshape(-1, delta.shape[-1]).to(hf.dtype) * scale[:, None]).reshape(h.shape)
    dW = torch.zeros_like(wf)
    for s, e, logits in _logit_blocks(hf, wf):
        _softmax_minus_onehot_(logits, y[s:e], scale[s:e])
        dW.addmm_(logits.T, hf[s:e])
    return [dh.to(h.dtype), dW.to(weight.dtype), h.new_empty(0)]


_backend.register("linear_cross_entropy", _backend.Backend(
    "cpu", forward=_fused_forward, backward=_fused_backward, devices=("cpu",)))


# Triton backend (nested_learning/kernels/cross_entropy.py): float32 kernels; empty inputs take the fused path.
def _triton_forward(h, weight, targets, ignore_index, reduction):
    if h.numel() == 0 or weight.numel() == 0:
        return _fused_forward(h, weight, targets, ignore_index, reduction)
    from nested_learning.kernels.cross_entropy import lce_fwd

    y = targets.reshape(-1).contiguous()
    loss_tok, delta = lce_fwd(h.reshape(-1, h.shape[-1]).contiguous(), weight.contiguous(), y, ignore_index)
    return _reduce(loss_tok, y != ignore_index, targets, reduction).to(h.dtype), delta.reshape(h.shape)


def _triton_backward(grads, inputs, ignore_index, reduction):
    h, weight, targets, _loss, delta = inputs
    if grads[0] is None or h.numel() == 0 or weight.numel() == 0:
        return _fused_backward(grads, inputs, ignore_index, reduction)
    from nested_learning.kernels.cross_entropy import lce_dweight

    y = targets.reshape(-1).contiguous()
    scale = _loss_scale(grads[0].float(), y != ignore_index, reduction)
    dh = delta.reshape(-1, h.shape[-1]).float() * scale[:, None]
    dW = lce_dweight(h.reshape(-1, h.shape[-1]).contiguous(), weight.contiguous(), y, scale.contiguous(),
                     ignore_index)
    return [dh.reshape(h.shape).to(h.dtype), dW, h.new_empty(0)]


_backend.register("linear_cross_entropy", _backend.Backend(
    "triton", forward=_triton_forward, backward=_triton_backward, devices=("cuda",),
    forced_devices=("cpu",), unavailable=_backend.triton_unavailable))


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE,
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
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have at least one row and one column (V >= 1 classes, D >= 1 features), "
                         f"got shape {list(weight.shape)}")
    if (not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex()
            or targets.dtype == torch.bool):
        raise TypeError(f"targets must be an integer tensor of class indices, got "
                        f"{targets.dtype if isinstance(targets, Tensor) else type(targets).__name__}")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"targets must have shape {list(h.shape[:-1])} (h without D), got {list(targets.shape)}")
    _checks.same_dtype({"h": h, "weight": weight})
    _checks.choice("reduction", reduction, REDUCTIONS)
    dev = _checks.same_device({"h": h, "weight": weight, "targets": targets})
    _checks.finite({"h": h, "weight": weight})
    if _checks._checks_enabled() and targets.numel() and _checks._has_data(targets):
        ok = (targets == ignore_index) | ((targets >= 0) & (targets < weight.shape[0]))
        if not bool(ok.all()):
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")
    name = _backend.resolve("linear_cross_entropy", dev.type, backend)
    loss, delta = _op(h, weight, targets.long(), int(ignore_index), reduction, name)
    return loss, delta.detach()
