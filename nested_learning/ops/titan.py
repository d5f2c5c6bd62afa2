"""ops.titan_update and ops.titan_mlp_update: the Titans memory (MATH section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks as _checks
from .._extension import extension_unavailable
from ..reference.titan import ACTIVATIONS, titan_mlp_reference, titan_update_reference
from . import _backend
from ._define import define_op
from ._titan_bound import ACT_SLOPE, bound_factor, bounded_step, chunk_scan, mlp_curvature  # noqa: F401
from ._titan_mlp import Inputs as MLPInputs
from ._titan_mlp import TorchElementwise, TritonElementwise, mlp_backward, mlp_forward
from ._titan_scan import scan_coefficients, scan_coefficients_backward

GATES = "Tensor theta, Tensor eta, Tensor alpha"


def _linear_fake(q, k, v, theta, eta, alpha, M0, S0, chunk_size):
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    sdt = torch.promote_types(q.dtype, torch.float32)
    state = [q.new_empty(B, H, dv, dk, dtype=sdt) for _ in range(2)]
    return (q.new_empty(B, T, H, dv), *state)


def _linear_reference(q, k, v, theta, eta, alpha, M0, S0, chunk_size):
    init = None if M0 is None else (M0, S0)  # the public wrapper passes both or neither
    return titan_update_reference(q, k, v, theta, eta, alpha, init, chunk_size)


_linear = define_op(
    "titan_update",
    f"Tensor q, Tensor k, Tensor v, {GATES}, Tensor? M0, Tensor? S0",
    "int chunk_size",
    n_out=3,
    fake=_linear_fake,
    reference=_linear_reference,
)


def _final_state_grads(dM, dS, q, v, dtype):
    """dM, dS of the final state for the kernels: None when neither reached it, else both
    (zeros for the missing one)."""
    if dM is None and dS is None:
        return [None, None]
    shape = (q.shape[0], q.shape[2], v.shape[-1], q.shape[-1])
    return [torch.zeros(shape, dtype=dtype, device=q.device) if g is None else g.to(dtype).contiguous()
            for g in (dM, dS)]


def _linear_grads_out(inputs, chunk_size, dq, dk, dv, dth, dcoef, dM0, dS0):
    """The backend-convention gradient list: the gate gradients from the scan coefficients'
    gradients, everything in the inputs' dtypes, empty tensors for an absent initial state."""
    q, k, v, theta, eta, alpha, M0, S0 = inputs
    deta, dalpha = scan_coefficients_backward(eta, alpha, chunk_size, dcoef)
    out = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dth.to(theta.dtype), deta.to(eta.dtype),
           dalpha.to(alpha.dtype)]
    out += [q.new_empty(0), q.new_empty(0)] if M0 is None else [dM0.to(M0.dtype), dS0.to(S0.dtype)]
    return out


def _linear_triton_forward(q, k, v, theta, eta, alpha, M0, S0, chunk_size):
    from nested_learning.kernels.titan import titan_fwd

    coef = [c.float().contiguous() for c in scan_coefficients(eta, alpha, chunk_size)]
    init = [None, None] if M0 is None else [x.float().contiguous() for x in (M0, S0)]
    o, M, S, _ = titan_fwd(q.contiguous(), k.contiguous(), v.contiguous(), theta.contiguous(), coef, *init,
                           chunk_size)
    sdt = torch.promote_types(q.dtype, torch.float32)
    return o, M.to(sdt), S.to(sdt)


def _linear_triton_backward(grads, inputs, chunk_size):
    from nested_learning.kernels.titan import titan_bwd, titan_fwd

    q, k, v, theta, eta, alpha, M0, S0 = inputs
    do, dM, dS = grads
    x = [t.contiguous() for t in (q, k, v, theta)]
    coef = [c.float().contiguous() for c in scan_coefficients(eta, alpha, chunk_size)]
    init = [None, None] if M0 is None else [t.float().contiguous() for t in (M0, S0)]
    *_, ckpt = titan_fwd(*x, coef, *init, chunk_size)  # recompute the chunk-start checkpoints
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dq, dk, dv, dth, dcoef, (dM0, dS0) = titan_bwd(do, *_final_state_grads(dM, dS, q, v, torch.float32), *x, coef,
                                                   ckpt, chunk_size)
    return _linear_grads_out(inputs, chunk_size, dq, dk, dv, dth, dcoef, dM0, dS0)


_backend.register("titan_update", _backend.Backend(
    "triton", forward=_linear_triton_forward, backward=_linear_triton_backward, devices=("cuda",),
    forced_devices=("cpu",), unavailable=_backend.triton_unavailable))


def _cpu_cast(x, cdt):
    return [t.to(cdt).contiguous() for t in x]


def _linear_cpu_forward(q, k, v, theta, eta, alpha, M0, S0, chunk_size):
    cdt = torch.promote_types(q.dtype, torch.float32)
    coef = _cpu_cast(scan_coefficients(eta, alpha, chunk_size), cdt)
    init = [None, None] if M0 is None else _cpu_cast((M0, S0), cdt)
    o, M, S = torch.ops.nested_learning_C.titan_fwd(*_cpu_cast((q, k, v, theta), cdt), *coef, *init, chunk_size,
                                                    False)
    return o.to(q.dtype), M, S


def _linear_cpu_backward(grads, inputs, chunk_size):
    q, k, v, theta, eta, alpha, M0, S0 = inputs
    cdt = torch.promote_types(q.dtype, torch.float32)
    x = _cpu_cast((q, k, v, theta), cdt)
    coef = _cpu_cast(scan_coefficients(eta, alpha, chunk_size), cdt)
    init = [None, None] if M0 is None else _cpu_cast((M0, S0), cdt)
    *_, Mck, Sck = torch.ops.nested_learning_C.titan_fwd(*x, *coef, *init, chunk_size, True)  # recompute
    do, dM, dS = grads
    do = torch.zeros_like(x[2]) if do is None else do.to(cdt).contiguous()
    dq, dk, dv, dth, *dcoef, dM0, dS0 = torch.ops.nested_learning_C.titan_bwd(
        do, *_final_state_grads(dM, dS, q, v, cdt), *x, *coef, Mck, Sck, chunk_size)
    return _linear_grads_out(inputs, chunk_size, dq, dk, dv, dth, dcoef, dM0, dS0)


_backend.register("titan_update", _backend.Backend(
    "cpu", forward=_linear_cpu_forward, backward=_linear_cpu_backward, devices=("cpu",),
    unavailable=extension_unavailable))


def _mlp_fake(q, k, v, theta, eta, alpha, W1, W2, S1, S2, chunk_size, activation, curvature_bound):
    sdt = torch.promote_types(q.dtype, torch.float32)
    return (q.new_empty(q.shape), *(x.new_empty(x.shape, dtype=sdt) for x in (W1, W2, S1, S2)))


class _ChunkBound:
    """The step bound of titan_mlp_update(curvature_bound=True) for the chunk loops: chunk c's
    theta times bounded_step's factor at the chunk's start weights (W1, W2), exactly as a
    call per chunk with the bounded theta computes it (the scan coefficients of every chunk
    are made once; each chunk's equal a one-chunk scan's bit for bit)."""

    def __init__(self, k, theta, eta, alpha, chunk, activation):
        self.k, self.theta, self.chunk, self.activation = k, theta, chunk, activation
        self.coef = tuple(t.double() for t in chunk_scan(eta, alpha, chunk))

    def __call__(self, c: int, rows: slice, W1: Tensor, W2: Tensor) -> tuple[Tensor, Tensor]:
        """(bounded theta, the factor), both [B, Cc, H] in theta's dtype. The factor falls as
        the curvature grows, so where a cheap upper bound on the curvature (no spectral norms)
        already gives exactly 1 for every sequence and head, so would the exact one: the
        spectral norms are computed only for a chunk where the cheap test does not pass."""
        th, k = self.theta[:, rows], self.k[:, rows]
        abar, rho, ebar, c_par, c_mom = self.coef
        coef = (abar[:, c:c + 1], rho[:, c:c + 1], ebar[:, c:c + 1], c_par[:, rows], c_mom[:, rows])
        f = bound_factor(th, mlp_curvature(k, W1, W2, self.activation, exact=False), coef, self.chunk)
        if not bool((f == 1).all()):
            f = bound_factor(th, mlp_curvature(k, W1, W2, self.activation), coef, self.chunk)
        return th * f, f


def _mlp_reference(q, k, v, theta, eta, alpha, W1, W2, S1, S2, chunk_size, activation, curvature_bound):
    if not curvature_bound:
        return titan_mlp_reference(q, k, v, theta, eta, alpha, (W1, W2, S1, S2), chunk_size, activation)
    # one reference call per chunk, with the chunk's theta bounded at its start weights
    bound, state, outs = _ChunkBound(k, theta, eta, alpha, chunk_size, activation), (W1, W2, S1, S2), []
    for c, s in enumerate(range(0, q.shape[1], chunk_size)):
        rows = slice(s, s + chunk_size)
        th, _ = bound(c, rows, *state[:2])
        o, state = titan_mlp_reference(q[:, rows], k[:, rows], v[:, rows], th, eta[:, rows], alpha[:, rows], state,
                                       chunk_size, activation)
        outs.append(o)
    return torch.cat(outs, 1), state


_mlp = define_op(
    "titan_mlp_update",
    f"Tensor q, Tensor k, Tensor v, {GATES}, Tensor W1, Tensor W2, Tensor S1, Tensor S2",
    "int chunk_size, str activation, bool curvature_bound",
    n_out=5,
    fake=_mlp_fake,
    reference=_mlp_reference,
)


def _mlp_chunked(elementwise):
    """forward, backward of titan_mlp_update's chunked backends (ops/_titan_mlp.py) with the
    elementwise work in `elementwise` (TorchElementwise or TritonElementwise)."""

    def forward_with_residuals(q, k, v, theta, eta, alpha, W1, W2, S1, S2, chunk_size, activation, curvature_bound):
        """The outputs and, with the bound, its factors [B, T, H] (the backward reuses them
        instead of recomputing the spectral norms)."""
        x = MLPInputs(q, k, v, theta, scan_coefficients(eta, alpha, chunk_size))
        bound, factors = None, []
        if curvature_bound:
            chunk_bound = _ChunkBound(k, theta, eta, alpha, chunk_size, activation)

            def bound(c, rows, W1, W2):
                th, f = chunk_bound(c, rows, W1, W2)
                factors.append(f)
                return th, f
        o, state, _ = mlp_forward(x, W1, W2, S1, S2, chunk_size, elementwise(activation), bound=bound)
        return (o, *state), ([torch.cat(factors, 1)] if factors else [])

    def forward(*args):
        return forward_with_residuals(*args)[0]

    def backward(grads, inputs, chunk_size, activation, curvature_bound):
        q, k, v, theta, eta, alpha, *state = inputs[:10]
        ew = elementwise(activation)
        x = MLPInputs(q, k, v, theta, scan_coefficients(eta, alpha, chunk_size))
        bound = None
        if curvature_bound:
            if len(inputs) > 10:  # the forward's factors: theta f exactly as the forward made it
                f_all = inputs[10]
                bound = lambda c, rows, W1, W2: (theta[:, rows] * f_all[:, rows], f_all[:, rows])  # noqa: E731
            else:
                bound = _ChunkBound(k, theta, eta, alpha, chunk_size, activation)
        *_, ckpt = mlp_forward(x, *state, chunk_size, ew, keep_checkpoints=True, bound=bound)
        dq, dk, dv, dth, dcoef, dstate = mlp_backward(grads, x, ckpt, chunk_size, ew)
        deta, dalpha = scan_coefficients_backward(eta, alpha, chunk_size, dcoef)
        got = [dq, dk, dv, dth, deta, dalpha, *dstate]
        return [g.to(x.dtype) for g, x in zip(got, inputs)]

    return forward, backward, forward_with_residuals


_mlp_cpu = _mlp_chunked(TorchElementwise)
_backend.register("titan_mlp_update", _backend.Backend(
    "cpu", forward=_mlp_cpu[0], backward=_mlp_cpu[1], devices=("cpu",), forward_with_residuals=_mlp_cpu[2]))
_mlp_triton = _mlp_chunked(TritonElementwise)
_backend.register("titan_mlp_update", _backend.Backend(
    "triton", forward=_mlp_triton[0], backward=_mlp_triton[1], devices=("cuda",), forced_devices=("cpu",),
    unavailable=_backend.triton_unavailable, forward_with_residuals=_mlp_triton[2]))


def _check_common(q, k, v, theta, eta, alpha, chunk_size):
    _checks.tensor("q", q, 4)
    B, T, H, dk = q.shape
    _checks.tensor("k", k, 4)
    _checks.shape("k", k, (B, T, H, dk), "same as q: [B, T, H, dk]")
    _checks.tensor("v", v, 4)
    _checks.shape("v", v, (B, T, H, None), "[B, T, H, dv]")
    _checks.same_dtype({"q": q, "k": k, "v": v})
    for n, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        _checks.tensor(n, g, 3)
        _checks.shape(n, g, (B, T, H), "one gate per token and head: [B, T, H]")
        _checks.in_range(n, g, 0.0, 1.0)
    _checks.positive_int("chunk_size", chunk_size)


def titan_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = True,
    chunk_size: int = 16,
    backend: str | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Linear Titans memory with momentum and forgetting, chunked (Titans Eq. 16).

    loss_t = ||M k_t - v_t||^2 at the chunk-start state M_c; S_t = eta_t S_{t-1} - theta_t
    grad; M_t = (1 - alpha_t) M_{t-1} + S_t; o_t = M_c q_t. q, k [B, T, H, dk]; v
    [B, T, H, dv]; theta (learning rate), eta (momentum decay), alpha (forget) in [0, 1],
    each [B, T, H]; initial_state an (M, S) pair of [B, H, dv, dk] or None (zeros).
    Returns o [B, T, H, dv] and (M, S) (float32 or wider) when output_final_state."""
    _check_common(q, k, v, theta, eta, alpha, chunk_size)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    M0 = S0 = None
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError("initial_state must be an (M, S) pair of tensors or None")
        M0, S0 = initial_state
        for n, x in (("initial_state[0] (M)", M0), ("initial_state[1] (S)", S0)):
            _checks.tensor(n, x, 4)
            _checks.shape(n, x, (B, H, dv, dk), "[B, H, dv, dk]")
    dev = _checks.same_device(
        {"q": q, "k": k, "v": v, "theta": theta, "eta": eta, "alpha": alpha, "M": M0, "S": S0}
    )
    _checks.finite({"q": q, "k": k, "v": v, "theta": theta, "eta": eta, "alpha": alpha, "initial_state[0] (M)": M0,
                    "initial_state[1] (S)": S0})
    # no tokens: nothing for a kernel to do (the reference returns the initial state as is)
    name = _backend.resolve("titan_update", dev.type, backend) if T else "reference"
    o, M, S = _linear(q, k, v, theta, eta, alpha, M0, S0, chunk_size, name)
    return o, ((M, S) if output_final_state else None)


def titan_mlp_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    initial_state: tuple[Tensor, ...],
    output_final_state: bool = True,
    chunk_size: int = 16,
    activation: str = "silu",
    backend: str | None = None,
    curvature_bound: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor] | None]:
    """Residual MLP Titans memory M(x) = x + W1 act(W2 x), chunked, momentum and forgetting
    applied to W1 and W2 alike (same gates as titan_update).

    curvature_bound=True scales each chunk's theta by bounded_step's factor at the chunk's
    start weights (mlp_curvature, MATH section 3.3; a stop-gradient factor, exactly 1 inside
    the stable region): what a call per chunk with the bounded theta gives, bit for bit, in
    one call.

    q, k, v [B, T, H, d]; initial_state (W1 [B, H, d, h], W2 [B, H, h, d]) or
    (W1, W2, S1, S2) with momenta of the same shapes (zeros when only two are given). The
    state is required: zero weights are a fixed point of the update (act(0) = 0).
    Returns o [B, T, H, d] = M_c(q_t) and (W1, W2, S1, S2) when output_final_state."""
    _check_common(q, k, v, theta, eta, alpha, chunk_size)
    B, T, H, d = q.shape
    _checks.shape("v", v, (B, T, H, d), "same as q: the residual MLP memory maps d to d")
    _checks.choice("activation", activation, ACTIVATIONS)
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) not in (2, 4):
        raise TypeError("initial_state must be (W1, W2) or (W1, W2, S1, S2)")
    W1, W2 = initial_state[:2]
    _checks.tensor("W1", W1, 4)
    hid = W1.shape[-1]
    _checks.shape("W1", W1, (B, H, d, None), "[B, H, d, hidden]")
    _checks.tensor("W2", W2, 4)
    _checks.shape("W2", W2, (B, H, hid, d), "[B, H, hidden, d]")
    if len(initial_state) == 4:
        S1, S2 = initial_state[2:]
        _checks.tensor("S1", S1, 4)
        _checks.shape("S1", S1, tuple(W1.shape), "same as W1")
        _checks.tensor("S2", S2, 4)
        _checks.shape("S2", S2, tuple(W2.shape), "same as W2")
    else:
        S1, S2 = torch.zeros_like(W1), torch.zeros_like(W2)
    dev = _checks.same_device(
        {"q": q, "k": k, "v": v, "theta": theta, "eta": eta, "alpha": alpha, "W1": W1, "W2": W2}
    )
    _checks.finite({"q": q, "k": k, "v": v, "theta": theta, "eta": eta, "alpha": alpha, "W1": W1, "W2": W2,
                    "S1": S1, "S2": S2})
    name = _backend.resolve("titan_mlp_update", dev.type, backend) if T else "reference"
    o, *state = _mlp(q, k, v, theta, eta, alpha, W1, W2, S1, S2, chunk_size, activation, bool(curvature_bound), name)
    return o, (tuple(state) if output_final_state else None)


def titan_chunk_scan(eta: Tensor, alpha: Tensor, chunk_size: int) -> tuple[Tensor, ...]:
    """The scan coefficients of the Titans memory's chunks (MATH 3.3), as the ops cut them (the
    last chunk may be shorter), without gradient: per chunk, the chunk-end memory and momentum
    are M' = abar M_c + rho S_c - sum_s c_par[s] theta_s g_s and
    S' = ebar S_c - sum_s c_mom[s] theta_s g_s, every g_s taken at M_c. Returns abar, rho,
    ebar [B, N, H] and c_par, c_mom [B, T, H] from eta, alpha [B, T, H]. c_par[s] counts how
    often the momentum scan re-applies token s's gradient inside its chunk (about 1/(1 - eta)
    early in a long chunk)."""
    return chunk_scan(eta, alpha, chunk_size)
