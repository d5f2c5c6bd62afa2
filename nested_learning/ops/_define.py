"""One way to declare an op: a forward and a backward torch.library custom op, each
dispatching to the backend named in its last argument, linked by an autograd formula.

    fwd = define_op("dgd_update", "Tensor q, Tensor k, ..., Tensor? a", "str read, int c",
                    n_out=2, fake=..., reference=dgd_update_reference)

registers `nested_learning::dgd_update(<tensors>, <statics>, str backend) -> (Tensor, ...)`
and `nested_learning::dgd_update_backward(Tensor?[] grads, Tensor?[] inputs, <statics>,
str backend) -> Tensor[]`, plus the reference backend, whose backward is the vjp of its
forward. Both ops are opaque to torch.compile (fake implementations give the shapes), and
the backward op returns an empty tensor for each absent or non-floating input. All
outputs are contiguous, as the fake implementations promise.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from . import _backend
from ._vjp import none_if_empty, reference_vjp

_LIB = torch.library.Library("nested_learning", "DEF")  # noqa: TOR901 (kept alive here)

# Residuals of forwards that ran with inputs requiring grad, until their setup_context takes
# them: id(first output) -> (weak reference to that output, residual tensors). An entry whose
# output dies untaken (a call under torch.no_grad with inputs that require grad, where
# setup_context never runs) is dropped with it.
_RESIDUALS: dict[int, tuple[weakref.ref, list[Tensor]]] = {}


def _stash_residuals(first_output: Tensor, residuals: list[Tensor]) -> None:
    key = id(first_output)
    _RESIDUALS[key] = (weakref.ref(first_output, lambda _, key=key: _RESIDUALS.pop(key, None)), residuals)


def _take_residuals(first_output: Tensor) -> list[Tensor]:
    ref, residuals = _RESIDUALS.pop(id(first_output), (None, []))
    return residuals if ref is not None and ref() is first_output else []


def define_op(
    name: str,
    tensor_args: str,
    static_args: str,
    n_out: int,
    fake: Callable,
    reference: Callable,
    save_outputs: bool = False,
) -> Callable:
    """Returns the forward op, callable as op(*tensors, *statics, backend).

    save_outputs: the forward's outputs are saved too and reach the backends' backward
    appended to `inputs` (for backwards that reuse them instead of recomputing). A backend's
    residuals (Backend.forward_with_residuals) come after them."""
    n_tensors = len(tensor_args.split(","))
    outs = ", ".join(["Tensor"] * n_out)
    statics = f"{static_args}, " if static_args else ""
    _LIB.define(f"{name}({tensor_args}, {statics}str backend) -> ({outs})")
    _LIB.define(f"{name}_backward(Tensor?[] grads, Tensor?[] inputs, {statics}str backend) -> Tensor[]")
    fwd = getattr(torch.ops.nested_learning, name).default
    bwd = getattr(torch.ops.nested_learning, f"{name}_backward").default

    def forward_impl(*args):
        backend = args[-1]
        _backend.note_ran(name, backend)
        impl = _backend.get(name, backend)
        residuals = None
        if impl.forward_with_residuals is not None and any(
                isinstance(x, Tensor) and x.requires_grad for x in args[:n_tensors]):
            out, residuals = impl.forward_with_residuals(*args[:-1])
        else:
            out = impl.forward(*args[:-1])
        out = tuple(o.contiguous() for o in out)  # the fakes promise contiguous outputs
        if residuals is not None:
            _stash_residuals(out[0], residuals)
        return out

    def backward_impl(grads, inputs, *rest):
        got = _backend.get(name, rest[-1]).backward(list(grads), list(inputs), *rest[:-1])
        return [g.contiguous() for g in got]

    def backward_fake(grads, inputs, *rest):
        ref = next(x for x in inputs if x is not None)
        return [x.new_empty(x.shape) if x is not None else ref.new_empty(0) for x in inputs[:n_tensors]]

    _LIB.impl(name, forward_impl, "CompositeExplicitAutograd")
    _LIB.impl(f"{name}_backward", backward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"nested_learning::{name}", lambda *a: tuple(fake(*a[:-1])), lib=_LIB)
    torch.library.register_fake(f"nested_learning::{name}_backward", backward_fake, lib=_LIB)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors], *(output if save_outputs else ()), *_take_residuals(output[0]))
        ctx.statics = inputs[n_tensors:]

    def backward(ctx, *grads):
        saved = list(ctx.saved_tensors)
        got = bwd(list(grads), saved, *ctx.statics)
        return (*none_if_empty(got, saved[:n_tensors]), *([None] * len(ctx.statics)))

    torch.library.register_autograd(
        f"nested_learning::{name}", backward, setup_context=setup_context, lib=_LIB
    )

    def reference_backward(grads, inputs, *statics):
        return reference_vjp(lambda *xs: reference(*xs, *statics), inputs[:n_tensors], grads)

    _backend.register(
        name,
        _backend.Backend(
            "reference",
            forward=lambda *args: _flatten(reference(*args)),
            backward=reference_backward,
            devices=("cpu", "cuda"),
        ),
    )
    return fwd


def _flatten(out) -> tuple[Tensor, ...]:
    flat = []
    for o in out:
        flat.extend(o if isinstance(o, (tuple, list)) else [o])
    return tuple(flat)
