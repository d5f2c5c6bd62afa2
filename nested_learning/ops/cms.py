"""ops.cms_update: one CMS level's chunked update of one linear layer (MATH section 4)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .. import checks as _checks
from .._extension import extension_unavailable
from ..reference.cms import INNER_OPTIMIZERS, buffered_tokens, cms_update_reference, leftover
from ..reference.deep_momentum import deep_momentum_reference, initial_keys
from . import _backend
from ._define import define_op


@dataclass(frozen=True)
class CMSState:
    """Per-sequence state of one linear layer of one CMS level.

    weight [B, Dout, Din]; buffer_x [B, C, Din] and buffer_delta [B, C, Dout] are the ring
    buffer of the unfinished chunk (C = the level's period), `filled` of its slots valid;
    momentum [B, Dout, Din] for "momentum" and "deep_momentum" (its linear part M0), else None;
    deep = (keys [B, H, Din], values [B, Dout, H]), deep momentum's hidden layer, else None;
    `updates` counts the updates applied so far."""

    weight: Tensor
    buffer_x: Tensor
    buffer_delta: Tensor
    filled: int = 0
    momentum: Tensor | None = None
    updates: int = 0
    deep: tuple | None = None

    @classmethod
    def create(cls, weight: Tensor, period: int, batch_size: int | None = None,
               optimizer: str = "gd", hidden: int = 16) -> CMSState:
        """Fresh state from a slow weight [Dout, Din] (broadcast to the batch) or a
        per-sequence weight [B, Dout, Din]. `hidden`: deep momentum's hidden width H."""
        _checks.positive_int("period", period)
        _checks.positive_int("hidden", hidden)
        _checks.choice("optimizer", optimizer, INNER_OPTIMIZERS)
        _checks.tensor("weight", weight)
        if weight.dim() == 2:
            if batch_size is None:
                raise ValueError("batch_size is required when weight is [Dout, Din]")
            weight = weight.unsqueeze(0).expand(batch_size, -1, -1).clone()
        _checks.tensor("weight", weight, 3)
        B, Dout, Din = weight.shape
        return cls(
            weight=weight,
            buffer_x=weight.new_zeros(B, period, Din),
            buffer_delta=weight.new_zeros(B, period, Dout),
            momentum=torch.zeros_like(weight) if optimizer in ("momentum", "deep_momentum") else None,
            deep=(initial_keys(hidden, Din, weight.dtype, weight.device).expand(B, -1, -1).clone(),
                  weight.new_zeros(B, Dout, hidden)) if optimizer == "deep_momentum" else None,
        )

    @property
    def period(self) -> int:
        return self.buffer_x.shape[1]


@dataclass(frozen=True)
class CMSUpdate:
    """What one call did: update_norms [B, n] (||W_new - W_old||_F per applied update, in
    order) and token_index [n] (index, within this call's tokens, of the token that
    completed each chunk)."""

    update_norms: Tensor
    token_index: tuple[int, ...]


def _fake(weight, x, delta, buffer_x, buffer_delta, momentum, filled, lr, optimizer, beta, alpha):
    n_up = (filled + x.shape[1]) // buffer_x.shape[1]
    mom = momentum.new_empty(momentum.shape) if momentum is not None else weight.new_empty(0)
    return (weight.new_empty(weight.shape), mom, buffer_x.new_empty(buffer_x.shape),
            buffer_delta.new_empty(buffer_delta.shape), weight.new_empty(weight.shape[0], n_up))


def _reference(weight, x, delta, buffer_x, buffer_delta, momentum, filled, lr, optimizer, beta,
               alpha):
    return cms_update_reference(
        weight, x, delta, buffer_x, buffer_delta, filled, momentum, lr, optimizer, beta, alpha
    )


_op = define_op(
    "cms_update",
    "Tensor weight, Tensor x, Tensor delta, Tensor buffer_x, Tensor buffer_delta, Tensor? momentum",
    "int filled, float lr, str optimizer, float beta, float alpha",
    n_out=5,
    fake=_fake,
    reference=_reference,
)


_OPT_ID = {"gd": 0, "momentum": 1, "dgd": 2}


def _joined(buffer: Tensor, filled: int, new: Tensor, dtype: torch.dtype) -> Tensor:
    """The buffered tokens then the new ones, in `dtype`; the new tokens themselves (no copy)
    when nothing is buffered, as in training, whose segments are whole chunks of every level."""
    return (new if filled == 0 else torch.cat([buffer[:, :filled], new], 1)).to(dtype)


def _chunked_forward(apply, upcast: bool):
    """A backend forward from apply(weight, momentum, X [B, N, Din], D [B, N, Dout], C, lr,
    optimizer, beta, alpha) -> (W, m, norms [B, n]), which applies the n = N / C >= 1 complete
    chunks. The shared bookkeeping: buffered + new tokens (upcast to float32 or wider when
    `upcast`), split at the last complete chunk, the rest kept in fresh buffers."""

    def forward(weight, x, delta, buffer_x, buffer_delta, momentum, filled, lr, optimizer, beta, alpha):
        C = buffer_x.shape[1]
        cdt = torch.promote_types(weight.dtype, torch.float32) if upcast else weight.dtype
        xs, ds = _joined(buffer_x, filled, x, cdt), _joined(buffer_delta, filled, delta, cdt)
        B, L = xs.shape[:2]
        N = L // C * C
        if N == 0:
            m = momentum.clone() if momentum is not None else None
            W, norms = weight.clone(), weight.new_zeros(B, 0)
        else:
            W, m, norms = apply(weight, momentum, xs[:, :N], ds[:, :N], C, lr, optimizer, beta, alpha)
        bx = torch.zeros_like(buffer_x)
        bd = torch.zeros_like(buffer_delta)
        bx[:, :L - N] = xs[:, N:]
        bd[:, :L - N] = ds[:, N:]
        mom = m.to(momentum.dtype) if momentum is not None else weight.new_empty(0)
        return W.to(weight.dtype), mom, bx, bd, norms.to(weight.dtype)

    return forward


def _cpu_apply(weight, momentum, X, D, C, lr, optimizer, beta, alpha):
    """gd in closed form (one batched matrix product for the whole call; the per-chunk norms
    from C x C Gram matrices), momentum and dgd (sequential by nature) in the C++ kernel
    `cms_apply`, row by row in place."""
    cdt = X.dtype
    B, N = X.shape[:2]
    n = N // C
    m = momentum.to(cdt).clone(memory_format=torch.contiguous_format) if momentum is not None else None
    if optimizer == "gd":  # out of place: the product writes the new weight (no clone to update)
        W = torch.baddbmm(weight.to(cdt), D.transpose(1, 2), X, alpha=-lr)
        Xc, Dc = X.reshape(B, n, C, -1), D.reshape(B, n, C, -1)
        gram = (Xc @ Xc.transpose(-1, -2)) * (Dc @ Dc.transpose(-1, -2))  # <G_c, G_c> termwise
        norms = lr * gram.sum((-1, -2)).clamp(min=0).sqrt()
    else:
        W = weight.to(cdt).clone(memory_format=torch.contiguous_format)
        norms = torch.ops.nested_learning_C.cms_apply(W, m, X.contiguous(), D.contiguous(), C, float(lr),
                                                      _OPT_ID[optimizer], float(beta), float(alpha))
    return W, m, norms


def _reference_backward(grads, inputs, *statics):
    """Writes are differentiated only on request (differentiable_writes): the reference's."""
    return _backend.get("cms_update", "reference").backward(grads, inputs, *statics)


_backend.register("cms_update", _backend.Backend("cpu", forward=_chunked_forward(_cpu_apply, upcast=True),
                                                 backward=_reference_backward, devices=("cpu",),
                                                 unavailable=extension_unavailable))


def _triton_apply(weight, momentum, X, D, C, lr, optimizer, beta, alpha):
    """nested_learning/kernels/cms.py: tiles of W (and m) held on chip in float32 (float64 for float64) across all
    the chunks; the tokens stay in their dtype (upcast in the kernel). dgd with Din > 512 streams
    W through memory instead (two passes per chunk)."""
    from nested_learning.kernels.cms import cms_apply

    return cms_apply(weight, momentum, X, D, C, lr, optimizer, beta, alpha)


_backend.register("cms_update", _backend.Backend(
    "triton", forward=_chunked_forward(_triton_apply, upcast=False), backward=_reference_backward,
    devices=("cuda",), forced_devices=("cpu",), unavailable=_backend.triton_unavailable))


def deep_momentum_factored(
    weight: Tensor, x: Tensor, delta: Tensor, buffer_x: Tensor, buffer_delta: Tensor, filled: int,
    m0: Tensor, keys: Tensor, values: Tensor, lr: float, beta: float = 0.9,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """deep_momentum_reference (same arguments and results, equal up to float rounding) with the
    chunk gradient G = D^T X [B, Dout, Din] of each chunk (C tokens) never formed: it enters
    the hidden layer's write through the factored products V^T G = (V^T D^T) X and
    G tanh(K)^T = D^T (X tanh(K)^T), which cost C H (Din + Dout) instead of Dout Din H, and the
    decayed M0 and the step M0 + V tanh(K) are each one fused batched product (baddbmm).
    Per chunk there remain two products of weight size and the weight's own update and norm,
    against the reference's four products and seven elementwise passes of that size. Pure
    torch: differentiable like the reference, on every device."""
    C = buffer_x.shape[1]
    xs, ds, n_up = buffered_tokens(buffer_x, buffer_delta, filled, x, delta)
    W, norms = weight, []
    s = torch.tanh(keys) if n_up else None  # [B, H, Din], carried: each chunk's new tanh(K) is the next one's
    for c in range(n_up):
        X, Dt = xs[:, c * C:(c + 1) * C], ds[:, c * C:(c + 1) * C].transpose(1, 2)  # [B,C,Din], [B,Dout,C]
        d_keys = ((values.transpose(1, 2) @ Dt) @ X) * (1 - s * s)
        m0 = torch.baddbmm(m0, Dt, X, beta=beta, alpha=-lr)
        values = torch.baddbmm(values, Dt, X @ s.transpose(1, 2), beta=beta, alpha=-lr)
        keys = keys - lr * d_keys
        s = torch.tanh(keys)
        step = torch.baddbmm(m0, values, s)
        W = W + step
        norms.append(step.flatten(1).norm(dim=1))
    bx, bd, norms_t = leftover(xs, ds, n_up, C, norms, weight)
    return W, m0, keys, values, bx, bd, norms_t


def _buffered(state: CMSState, x: Tensor, delta: Tensor) -> CMSState:
    """The state after tokens that complete no chunk: appended to the buffers (differentiably),
    the weight and momentum the same tensors (no weight-sized copy per call)."""
    f, T = state.filled, x.shape[1]
    bx, bd = state.buffer_x.clone(), state.buffer_delta.clone()
    bx[:, f:f + T] = x
    bd[:, f:f + T] = delta
    return replace(state, buffer_x=bx, buffer_delta=bd, filled=f + T)


def cms_update(
    state: CMSState,
    x: Tensor,
    delta: Tensor,
    lr: float,
    optimizer: str = "gd",
    beta: float = 0.9,
    alpha: float = 1.0,
    backend: str | None = None,
) -> tuple[CMSState, CMSUpdate]:
    """Feed tokens to one linear layer y = W x of a CMS level and apply every completed
    chunk's update (MATH section 4): G = sum_t delta_t x_t^T over the chunk's C tokens, then
    gd: W -= lr G; momentum: m = beta m - lr G, W += m; dgd: W = W (alpha I - lr X^T X) - lr G;
    deep_momentum: the MLP memory of reference/deep_momentum.py.

    x [B, T, Din] are the layer's inputs and delta [B, T, Dout] the teach signal at its
    output. Leftover tokens stay in the state's ring buffer for the next call, so streaming a
    sequence in pieces equals feeding it whole. Returns the new state and a CMSUpdate."""
    if not isinstance(state, CMSState):
        raise TypeError(f"state must be a CMSState (see CMSState.create), got {type(state).__name__}")
    B, Dout, Din = state.weight.shape
    _checks.tensor("x", x, 3)
    _checks.shape("x", x, (B, None, Din), "[B, T, Din] matching state.weight [B, Dout, Din]")
    T = x.shape[1]
    _checks.tensor("delta", delta, 3)
    _checks.shape("delta", delta, (B, T, Dout), "[B, T, Dout] matching x and state.weight")
    _checks.same_dtype({"state.weight": state.weight, "x": x, "delta": delta})
    _checks.choice("optimizer", optimizer, INNER_OPTIMIZERS)
    if optimizer in ("momentum", "deep_momentum") and state.momentum is None:
        raise ValueError(f"optimizer={optimizer!r} needs state.momentum (CMSState.create(..., optimizer={optimizer!r}))")
    if optimizer == "deep_momentum" and state.deep is None:
        raise ValueError("optimizer='deep_momentum' needs state.deep (CMSState.create(..., optimizer='deep_momentum'))")
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr must be a non-negative float, got {lr!r}")
    if optimizer == "dgd" and not 0 < alpha <= 1:
        raise ValueError(f"alpha must lie in (0, 1] for optimizer='dgd', got {alpha!r}")
    dev = _checks.same_device({"state.weight": state.weight, "x": x, "delta": delta})
    _checks.finite({"state.weight": state.weight, "state.momentum": state.momentum, "x": x, "delta": delta})
    C = state.period
    if state.filled + T < C:  # no chunk completes: only the buffer changes, the weights are kept
        return _buffered(state, x, delta), CMSUpdate(state.weight.new_zeros(B, 0), ())
    deep = state.deep
    if optimizer == "deep_momentum":  # no kernel: its factored form in torch, or its reference, on every device
        if backend not in (None, "reference"):
            raise ValueError(f"optimizer='deep_momentum' runs as its factored form in torch (backend=None) or as its "
                             f"reference (backend='reference'), no kernel; got backend={backend!r}")
        run = deep_momentum_reference if (backend or _backend.forced_backend()) == "reference" else deep_momentum_factored
        W, m, keys, values, bx, bd, norms = run(
            state.weight, x, delta, state.buffer_x, state.buffer_delta, state.filled, state.momentum, *deep,
            float(lr), float(beta))
        deep = (keys, values)
    else:
        name = _backend.resolve("cms_update", dev.type, backend)
        mom = state.momentum if optimizer == "momentum" else None
        W, m, bx, bd, norms = _op(
            state.weight, x, delta, state.buffer_x, state.buffer_delta, mom, state.filled,
            float(lr), optimizer, float(beta), float(alpha), name,
        )
    n_up = norms.shape[1]
    first = C - state.filled - 1  # index in this call of the token completing the first chunk
    new = replace(
        state,
        weight=W,
        buffer_x=bx,
        buffer_delta=bd,
        filled=(state.filled + T) % C,
        momentum=m if optimizer in ("momentum", "deep_momentum") else state.momentum,
        deep=deep,
        updates=state.updates + n_up,
    )
    return new, CMSUpdate(norms, tuple(first + i * C for i in range(n_up)))
