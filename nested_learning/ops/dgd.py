"""ops.dgd_update: the DGD rank-1 update (MATH section 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks as _checks
from .._extension import extension_unavailable
from ..reference.dgd import dgd_update_reference
from . import _backend
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


CPU_CHUNK = 32  # tokens per chunk of the C++ kernels (bench/RESULTS.md: chunk-size sweep)


def _grads_out(inputs, dq, dk, dw, dal, det, da, dh0):
    """The backend-convention gradient list, in the inputs' dtypes; when the erase direction
    was k itself (a is None) its gradient is added to k's (unless da is None: already done)."""
    q, k, w, alpha, eta, a, h0 = inputs
    if a is None and da is not None:
        dk = dk + da
    out = [dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype), dal.to(alpha.dtype), det.to(eta.dtype)]
    out.append(q.new_empty(0) if a is None else da.to(a.dtype))
    out.append(q.new_empty(0) if h0 is None else dh0.to(h0.dtype))
    return out


def _cpu_args(q, k, w, alpha, eta, a):
    """Contiguous tensors in one compute dtype (float32, or float64 for float64 inputs)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    a = k if a is None else a
    return [x.to(cdt).contiguous() for x in (q, k, w, alpha, eta, a)]


def _cpu_forward(q, k, w, alpha, eta, a, initial_state, read, chunk_size, keep_residuals=False):
    """The C++ chunk-parallel kernel, at its own chunk length (CPU_CHUNK): chunk_size never
    changes the result. keep_residuals: also the states at chunk starts and the chunks' R."""
    args = _cpu_args(q, k, w, alpha, eta, a)
    h0 = None if initial_state is None else initial_state.to(args[0].dtype).contiguous()
    o, state, ckpt, rbuf = torch.ops.nested_learning_C.dgd_fwd(*args, h0, read == "after", CPU_CHUNK, keep_residuals)
    out = (o.to(q.dtype), state)
    return (out, [ckpt, rbuf]) if keep_residuals else out


def _cpu_forward_with_residuals(*args):
    return _cpu_forward(*args, keep_residuals=True)


def _cpu_backward(grads, inputs, read, chunk_size):
    q, k, w, alpha, eta, a, h0 = inputs[:7]
    args = _cpu_args(q, k, w, alpha, eta, a)
    cdt = args[0].dtype
    if len(inputs) > 7:  # the forward's residuals
        ckpt, rbuf = inputs[7:]
    else:  # recompute the states at chunk starts and the chunks' R (no outputs)
        h0c = None if h0 is None else h0.to(cdt).contiguous()
        ckpt, rbuf = torch.ops.nested_learning_C.dgd_checkpoints(*args, h0c, CPU_CHUNK)
    B, T, H, _ = q.shape
    do, dstate = grads
    do = q.new_zeros(B, T, H, w.shape[-1], dtype=cdt) if do is None else do.to(cdt).contiguous()
    dstate = q.new_zeros(B, H, w.shape[-1], q.shape[-1], dtype=cdt) if dstate is None else dstate.to(cdt).contiguous()
    dq, dk, dw, dal, det, da, dh0 = torch.ops.nested_learning_C.dgd_bwd(
        do, dstate, *args, ckpt, rbuf, read == "after", CPU_CHUNK, a is None)
    return _grads_out(inputs[:7], dq, dk, dw, dal, det, None if a is None else da, dh0)


_backend.register(OP, _backend.Backend("cpu", forward=_cpu_forward, backward=_cpu_backward, devices=("cpu",),
                                       unavailable=extension_unavailable,
                                       forward_with_residuals=_cpu_forward_with_residuals))


def _triton_args(q, k, w, alpha, eta, a, initial_state):
    a = k if a is None else a
    h0 = None if initial_state is None else initial_state.float().contiguous()
    return [x.contiguous() for x in (q, k, w, alpha, eta, a)] + [h0]


def _triton_forward(q, k, w, alpha, eta, a, initial_state, read, chunk_size):
    from nested_learning.kernels.dgd import dgd_fwd

    o, state = dgd_fwd(*_triton_args(q, k, w, alpha, eta, a, initial_state), chunk_size, read == "after")
    return o.to(q.dtype), state.to(torch.promote_types(q.dtype, torch.float32))


def _triton_backward(grads, inputs, read, chunk_size):
    from nested_learning.kernels.dgd import dgd_bwd

    q, k, w, alpha, eta, a, h0 = inputs
    do, dstate = grads
    do = torch.zeros_like(w, dtype=q.dtype) if do is None else do.contiguous()
    dstate = None if dstate is None else dstate.float().contiguous()
    return _grads_out(inputs, *dgd_bwd(do, dstate, *_triton_args(q, k, w, alpha, eta, a, h0), chunk_size,
                                       read == "after"))


STREAM_TOKENS = 64  # up to this many tokens per call, the fused per-token CUDA kernel is preferred

_backend.register(OP, _backend.Backend("triton", forward=_triton_forward, backward=_triton_backward,
                                       devices=("cuda",), forced_devices=("cpu",), unavailable=_backend.triton_unavailable,
                                       suits=lambda tokens=STREAM_TOKENS + 1: tokens > STREAM_TOKENS))


def _cuda_forward(q, k, w, alpha, eta, a, initial_state, read, chunk_size):
    """The fused per-token kernel (csrc/cuda/dgd_recurrent.cu): state in registers, one pass."""
    cdt = q.dtype if q.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    a = k if a is None else a
    x = [t.to(cdt).contiguous() for t in (q, k, w, a)]
    gates = [g.float().contiguous() for g in (alpha, eta)]
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, state = torch.ops.nested_learning_C.dgd_recurrent_fwd(*x, *gates, h0, read == "after")
    return o.to(q.dtype), state.to(torch.promote_types(q.dtype, torch.float32))


def _cuda_backward(grads, inputs, read, chunk_size):
    """The streaming kernel has no backward of its own: the chunk-parallel Triton backward
    (recomputing the forward) where Triton runs, else the reference's."""
    name = "triton" if _backend.triton_unavailable("cuda") is None else "reference"
    return _backend.get(OP, name).backward(grads, inputs, read, chunk_size)


def _cuda_unavailable(device_type):
    reason = extension_unavailable(device_type)
    if reason is not None:
        return reason
    try:
        built = torch._C._dispatch_has_kernel_for_dispatch_key("nested_learning_C::dgd_recurrent_fwd", "CUDA")
    except RuntimeError:  # an extension built before the op existed
        built = False
    if not built:
        return "nested_learning._C was built without CUDA kernels (see nested_learning.build_info())"
    return None


_backend.register(OP, _backend.Backend("cuda", forward=_cuda_forward, backward=_cuda_backward, devices=("cuda",),
                                       unavailable=_cuda_unavailable,
                                       suits=lambda tokens=0: tokens <= STREAM_TOKENS))


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
    _checks.finite({"q": q, "k": k, "w": w, "alpha": alpha, "eta": eta, "a": a, "initial_state": initial_state})
    name = _backend.resolve(OP, dev.type, backend, tokens=T) if T else "reference"
    o, state = _op(q, k, w, alpha, eta, a, initial_state, read, chunk_size, name)
    return o, (state if output_final_state else None)
