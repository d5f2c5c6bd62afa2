"""The reference backends' backward: the vector-Jacobian product of the reference forward.

The reference forward is the specification, so its gradient is the specification's gradient.
It is recomputed inside the backward custom op with torch.func.vjp (plain autograd does not
record inside a custom op's implementation; functorch transforms do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten


def _differentiable(t) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def reference_vjp(
    fn: Callable, inputs: Sequence[Tensor | None], grads: Sequence[Tensor | None]
) -> list[Tensor]:
    """Gradients of fn(*inputs) (a pytree of tensors, flattened in order) with cotangents
    `grads` (None = zero), for every floating input; an empty tensor for the others."""
    idx = [i for i, t in enumerate(inputs) if _differentiable(t)]

    def f(*xs):
        full = list(inputs)
        for i, x in zip(idx, xs):
            full[i] = x
        return fn(*full)

    out, vjp_fn = torch.func.vjp(f, *(inputs[i] for i in idx))
    flat, spec = tree_flatten(out)
    if len(flat) != len(grads):
        raise AssertionError(f"{len(grads)} cotangents for {len(flat)} outputs")
    cot = [torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(flat, grads)]
    got = vjp_fn(tree_unflatten(cot, spec))
    res = [torch.empty(0, device=g.device if g is not None else "cpu") for g in inputs]
    for i, g in zip(idx, got):
        res[i] = g
    return res


def none_if_empty(grads: Sequence[Tensor], inputs: Sequence[Tensor | None]) -> list:
    """Map backward-op outputs back to autograd: None for absent or integer inputs."""
    return [g if _differentiable(x) else None for g, x in zip(grads, inputs)]
