"""ops.selfmod_projection: the self-modifying projection recurrence (MATH section 6) as one op.

The layer (nested_learning/layers/self_modifying.py) used to advance its projection memory in
a Python loop over projection chunks: per chunk a projection, the normalisations and gates, and
a `dgd_update` call for the write. This op runs that recurrence in one call: the C++ kernel on
the CPU (csrc/cpu/selfmod.cpp), a Triton kernel on CUDA (nested_learning/kernels/selfmod.py),
and the float64-capable reference (nested_learning/reference/selfmod.py: the layer's loop).

Backward. With stop-gradient writes (the layer's default) every chunk's read is y_c = x_c P_c^T
with P_c = P_in + constant, so dx_c = dy_c P_c and dP_in = sum_c dy_c^T x_c + dP_out, from the
chunk-start states, which the forward keeps (or the backward recomputes): in C++ on the CPU,
two batched products in PyTorch on CUDA.
With differentiable writes the backward is the reference's vector-Jacobian product (the cost of
the old loop: that path is for ablations, not for speed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks as _checks
from .._extension import extension_unavailable
from ..reference.selfmod import selfmod_projection_reference
from . import _backend
from ._define import define_op
from ._vjp import reference_vjp

OP = "selfmod_projection"


def _state_dtype(x: Tensor, P: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, P.dtype), torch.float32)


def _fake(x, P, gate_bias, valid, chunk_size, eta_max, residual, stop_writes):
    B, L, H, d = x.shape
    R = P.shape[2]
    return x.new_empty(B, L, H, R), P.new_empty(B, H, R, d, dtype=_state_dtype(x, P))


_op = define_op(
    OP,
    "Tensor x, Tensor P, Tensor gate_bias, Tensor valid",
    "int chunk_size, float eta_max, bool residual, bool stop_writes",
    n_out=2,
    fake=_fake,
    reference=selfmod_projection_reference,
)


def chunk_starts_backward(grads, inputs, chunk_size, checkpoints) -> list[Tensor]:
    """The stop-gradient backward from every chunk's start state `checkpoints` [B, N, H, R, d]:
    dx_c = dy_c P_c, dP_in = sum_c dy_c^T x_c + dP_out; no gradient for the gate bias."""
    x, P, gate_bias, valid = inputs[:4]
    dy, dP_out = grads
    B, L, H, d = x.shape
    N, R = checkpoints.shape[1], P.shape[2]
    cdt = checkpoints.dtype
    dP = torch.zeros(B, H, R, d, dtype=cdt, device=x.device) if dP_out is None else dP_out.to(cdt).clone()
    dx = torch.zeros(B, L, H, d, dtype=x.dtype, device=x.device)
    if dy is not None and L:
        pad = N * chunk_size - L
        dyc = F.pad(dy.to(cdt), (0, 0, 0, 0, 0, pad)).view(B, N, chunk_size, H, R)
        xc = F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad)).view(B, N, chunk_size, H, d)
        dx = torch.einsum("bnchr,bnhri->bnchi", dyc, checkpoints).reshape(B, N * chunk_size, H, d)[:, :L].to(x.dtype)
        dP += torch.einsum("bnchr,bnchi->bhri", dyc, xc)
    return [dx, dP.to(P.dtype), torch.zeros_like(gate_bias), valid.new_empty(0)]


def _fast_backend(name: str, run, stopped_backward=chunk_starts_backward, **kw) -> _backend.Backend:
    """A compiled backend from its forward kernel `run(x, P, gate_bias, valid, chunk_size,
    eta_max, residual, keep) -> (y, P_out, checkpoints)`: the forward keeps the chunk-start
    states when the writes stop gradients and an input requires grad; the backward is
    `stopped_backward` from them (recomputed when absent, as under torch.compile), or with
    differentiable writes the reference's vjp."""

    def outputs(x, P, y, P_out):
        return y.to(x.dtype), P_out.to(_state_dtype(x, P))

    def forward(x, P, gate_bias, valid, chunk_size, eta_max, residual, stop_writes):
        y, P_out, _ = run(x, P, gate_bias, valid, chunk_size, eta_max, residual, False)
        return outputs(x, P, y, P_out)

    def forward_with_residuals(x, P, gate_bias, valid, chunk_size, eta_max, residual, stop_writes):
        y, P_out, ck = run(x, P, gate_bias, valid, chunk_size, eta_max, residual, stop_writes)
        return outputs(x, P, y, P_out), ([ck] if stop_writes else [])

    def backward(grads, inputs, chunk_size, eta_max, residual, stop_writes):
        if not stop_writes:
            return reference_vjp(lambda *xs: selfmod_projection_reference(
                *xs, chunk_size, eta_max, residual, stop_writes), inputs[:4], grads)
        ck = inputs[4] if len(inputs) > 4 else run(*inputs[:4], chunk_size, eta_max, residual, True)[2]
        return stopped_backward(grads, inputs, chunk_size, ck)

    return _backend.Backend(name, forward=forward, backward=backward, forward_with_residuals=forward_with_residuals,
                            **kw)


def _cpu_run(x, P, gate_bias, valid, chunk_size, eta_max, residual, keep):
    """csrc/cpu/selfmod.cpp in float32 (float64 for float64 inputs)."""
    cdt = torch.float64 if _state_dtype(x, P) == torch.float64 else torch.float32
    xc, Pc, gb = (t.to(cdt).contiguous() for t in (x, P, gate_bias))
    return torch.ops.nested_learning_C.selfmod_fwd(xc, Pc, gb, valid.contiguous(), chunk_size, eta_max, residual, keep)


def _cpu_stopped_backward(grads, inputs, chunk_size, checkpoints):
    """chunk_starts_backward in C++ (csrc/cpu/selfmod.cpp: selfmod_bwd)."""
    x, P, gate_bias, valid = inputs[:4]
    dy, dP_out = grads
    cdt = checkpoints.dtype
    dy = x.new_zeros(*x.shape[:3], P.shape[2], dtype=cdt) if dy is None else dy.to(cdt)
    dx, dP = torch.ops.nested_learning_C.selfmod_bwd(dy, x.to(cdt), checkpoints, chunk_size)
    if dP_out is not None:
        dP += dP_out.to(cdt)
    return [dx.to(x.dtype), dP.to(P.dtype), torch.zeros_like(gate_bias), valid.new_empty(0)]


def _cpu_unavailable(device_type):
    reason = extension_unavailable(device_type)
    if reason is None and not hasattr(torch.ops.nested_learning_C, "selfmod_bwd"):
        return "nested_learning._C was built before selfmod_projection existed: rebuild it (pip install --no-build-isolation -e .)"
    return reason


def _triton_run(x, P, gate_bias, valid, chunk_size, eta_max, residual, keep):
    from nested_learning.kernels.selfmod import selfmod_fwd

    return selfmod_fwd(x, P, gate_bias, valid, chunk_size, eta_max, residual, keep)


_backend.register(OP, _fast_backend("cpu", _cpu_run, _cpu_stopped_backward, devices=("cpu",),
                                    unavailable=_cpu_unavailable))
_backend.register(OP, _fast_backend("triton", _triton_run, devices=("cuda",), forced_devices=("cpu",),
                                    unavailable=_backend.triton_unavailable))


def selfmod_projection(
    x: Tensor,
    P: Tensor,
    gate_bias: Tensor,
    valid: Tensor | None = None,
    chunk_size: int = 16,
    eta_max: float = 0.3,
    residual: bool = True,
    stop_writes: bool = True,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The self-modifying projection memory over a sequence (MATH 6; the recurrence is spelled
    out in nested_learning/reference/selfmod.py).

    x [B, L, H, d]; P [B, H, 3d+2, d], the projection memory at the start (its rows: the q, k, v
    memories, then the eta and alpha gate rows); gate_bias [H, 2] (eta, alpha); valid [B, L]
    bool (None: all valid; an invalid token's write is the identity). Every token is read by its
    chunk's start P; each complete chunk of chunk_size tokens then writes P, token by token.
    residual: the q, k, v memories read x + W x. stop_writes: the writes carry no gradient and
    every read's gradient reaches P (the layer's default); False differentiates through them.
    Returns the reads y [B, L, H, 3d+2] (P x, before the residual, the normalisations and the
    gate bias) in x's dtype and the final P (float32 or wider), after the last complete chunk."""
    _checks.tensor("x", x, 4)
    B, L, H, d = x.shape
    _checks.tensor("P", P, 4)
    _checks.shape("P", P, (B, H, 3 * d + 2, d), "[B, H, 3d+2, d]")
    _checks.tensor("gate_bias", gate_bias, 2)
    _checks.shape("gate_bias", gate_bias, (H, 2), "[H, 2]: (eta, alpha) per head")
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=x.device)
    _checks.tensor("valid", valid, 2, floating=False)
    _checks.shape("valid", valid, (B, L), "[B, L]")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    dev = _checks.same_device({"x": x, "P": P, "gate_bias": gate_bias, "valid": valid})
    _checks.positive_int("chunk_size", chunk_size)
    if not 0 <= eta_max <= 1:  # (0: no writes, the recall study's control)
        raise ValueError(f"eta_max must lie in [0, 1], got {eta_max}")
    _checks.finite({"x": x, "P": P, "gate_bias": gate_bias})
    name = _backend.resolve(OP, dev.type, backend) if L else "reference"
    return _op(x, P, gate_bias, valid, chunk_size, float(eta_max), bool(residual), bool(stop_writes), name)
