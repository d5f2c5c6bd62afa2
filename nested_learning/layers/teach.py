"""Teach signals (MATH section 1): gradients of the summed loss at chosen activations, taken
in the same backward pass as the outer gradients (tensor hooks), or alone (memorisation)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch
from torch import Tensor


class TeachCapture:
    """Pass one to `model(tokens, state, capture=...)`; then either call `loss.backward()`
    (training: hooks store the gradients next to the parameter gradients) or
    `capture.backward_from(loss)` (memorisation: only these gradients are computed; the slow
    weights' .grad is untouched). `scale` turns the gradient of the loss into the gradient of
    the SUMMED per-token loss: the number of averaged tokens for a mean loss, 1 for a sum."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.tensors: dict[Hashable, Tensor] = {}
        self.inputs: dict[Hashable, Tensor] = {}
        self.grads: dict[Hashable, Tensor] = {}
        self.position = 0

    def watch(self, key: Hashable, t: Tensor, layer_input: Tensor | None = None) -> Tensor:
        """Record activation t (and the input of the layer that produced it, if any)."""
        if layer_input is not None:
            self.inputs[key] = layer_input
        if t.requires_grad:
            self.tensors[key] = t
            t.register_hook(_store_hook(weakref.ref(self), key))
        return t

    def _store(self, key: Hashable, g: Tensor) -> None:
        self.grads[key] = g.detach() * self.scale

    def backward_from(self, loss: Tensor) -> None:
        keys = list(self.tensors)
        got = torch.autograd.grad(loss, [self.tensors[k] for k in keys], allow_unused=True)
        for k, g in zip(keys, got):
            self.grads[k] = (torch.zeros_like(self.tensors[k]) if g is None else g.detach()) * self.scale

    def signal(self, key: Hashable) -> Tensor:
        if key not in self.grads:
            raise KeyError(f"no teach signal for {key!r}: run the backward pass of the loss first "
                           f"(watched: {list(self.tensors)})")
        return self.grads[key]


def _store_hook(capture: weakref.ref, key: Hashable) -> Callable[[Tensor], None]:
    """The gradient hook of a watched activation. It holds the capture weakly: the capture
    holds the activation, the activation's autograd node holds the hook in C++ storage that
    Python's garbage collector cannot traverse, so a strong reference here would make a
    cycle that is never freed (every training step's activations, inputs and signals)."""

    def store(g: Tensor) -> None:
        c = capture()
        if c is not None:
            c._store(key, g)

    return store
