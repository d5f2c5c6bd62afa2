"""ops.dgd_update: the DGD rank-1 update (MATH section 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.dgd import dgd_update_reference
from . import _backend, _checks
from ._define import define_op

OP = "dgd_update"
READ_MODES = ("after", "before")


def _fake(q, k, w, alpha, eta, a, initial_state, read, chunk_size):
    B, T, H, dk = q.shape
    sdt = torch.promote_types(q.dtype, torch.float32)
    return q.new_empty(B, T, H, w.shape[-1]), q.new_empty(B, H, w.shape[-1], dk, dtype=sdt)


_op = define_op(
    OP,
    "Tensor q, Tensor k, Tensor w, Tensor alpha, Tensor eta, Tensor? a, Tensor? initial_state",
    "str read, int chunk_size",
    n_out=2,
    fake=_fake,
    reference=dgd_update_reference,
)


def _cpu_args(q, k, w, alpha, eta, a):
    """Contiguous tensors in one compute dtype (float32, or float64 for float64 inputs)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    a = k if a is None else a
    return [x.to(cdt).contiguous() for x in (q, k, w, alpha, eta, a)]


def _cpu_forward(q, k, w, alpha, eta, a, initial_state, read, chunk_size):
    args = _cpu_args(q, k, w, alpha, eta, a)
    h0 = None if initial_state is None else initial_state.to(args[0].dtype).contiguous()
    o, state, _ = torch.ops.nested_learning_C.dgd_fwd(*args, h0, read == "after", chunk_size)
    return o.to(q.dtype), state


def _cpu_backward(grads, inputs, read, chunk_size):
    q, k, w, alpha, eta, a, h0 = inputs
    args = _cpu_args(q, k, w, alpha, eta, a)
    cdt = args[0].dtype
    h0c = None if h0 is None else h0.to(cdt).contiguous()
    o, state, ckpt = torch.ops.nested_learning_C.dgd_fwd(*args, h0c, read == "after", chunk_size)  # recompute
    do, dstate = (torch.zeros_like(x) if g is None else g.to(cdt).contiguous() for g, x in zip(grads, (o, state)))
    dq, dk, dw, dal, det, da, dh0 = torch.ops.nested_learning_C.dgd_bwd(
        do, dstate, *args, ckpt, read == "after", chunk_size)
    if a is None:  # the erase direction was k itself
        dk, da = dk + da, None
    out = [dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype), dal.to(alpha.dtype), det.to(eta.dtype)]
    out.append(q.new_empty(0) if a is None else da.to(a.dtype))
    out.append(q.new_empty(0) if h0 is None else dh0.to(h0.dtype))
    return out


def _cpu_unavailable():
    from .._extension import EXTENSION_ERROR, extension_available

    return None if extension_available() else f"the extension nested_learning._C is not loaded ({EXTENSION_ERROR})"


_backend.register(OP, _backend.Backend("cpu", forward=_cpu_forward, backward=_cpu_backward, devices=("cpu",),
                                       unavailable=_cpu_unavailable))


def dgd_update(
    q: Tensor,
    k: Tensor,
    w: Tensor,
    alpha: Tensor,
    eta: Tensor,
    a: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    read: str = "after",
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """DGD: W_t = W_{t-1} (alpha_t I - eta_t a_t k_t^T) + w_t k_t^T, per sequence and head.

    q, k, a: [B, T, H, dk] (a defaults to k); w: [B, T, H, dv]; alpha in (0, 1] and eta >= 0:
    [B, T, H]; initial_state: [B, H, dv, dk] (zeros when None). read="after" gives
    o_t = W_t q_t, read="before" gives o_t = W_{t-1} q_t. Returns o [B, T, H, dv] in q's dtype
    and the final state (float32 or wider) when output_final_state, else None. chunk_size
    changes the parallel schedule, never the result (beyond rounding)."""
    _checks.tensor("q", q, 4)
    B, T, H, dk = q.shape
    _checks.tensor("k", k, 4)
    _checks.shape("k", k, (B, T, H, dk), "same as q: [B, T, H, dk]")
    _checks.tensor("w", w, 4)
    _checks.shape("w", w, (B, T, H, None), "[B, T, H, dv]")
    dv = w.shape[-1]
    if a is not None:
        _checks.tensor("a", a, 4)
        _checks.shape("a", a, (B, T, H, dk), "same as k: [B, T, H, dk]")
    for n, g in (("alpha", alpha), ("eta", eta)):
        _checks.tensor(n, g, 3)
        _checks.shape(n, g, (B, T, H), "one gate per token and head: [B, T, H]")
    if initial_state is not None:
        _checks.tensor("initial_state", initial_state, 4)
        _checks.shape("initial_state", initial_state, (B, H, dv, dk), "[B, H, dv, dk]")
    _checks.same_dtype({"q": q, "k": k, "w": w, "a": a})
    dev = _checks.same_device(
        {"q": q, "k": k, "w": w, "alpha": alpha, "eta": eta, "a": a, "initial_state": initial_state}
    )
    _checks.choice("read", read, READ_MODES)
    _checks.positive_int("chunk_size", chunk_size)
    _checks.in_range("alpha", alpha, 0.0, 1.0, lo_open=True)
    _checks.nonnegative("eta", eta)
    name = _backend.resolve(OP, dev.type, backend)
    o, state = _op(q, k, w, alpha, eta, a, initial_state, read, chunk_size, name)
    return o, (state if output_final_state else None)
