"""The per-sequence fast state of a model: one entry per block, plus the stream position."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..layers.attention import KVCache


def map_structure(fn: Callable, *trees: Any) -> Any:
    """fn over corresponding leaves of trees of one structure (nested dataclasses, lists,
    tuples, dicts; every other value is a leaf), rebuilt in that structure."""
    a = trees[0]
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return dataclasses.replace(a, **{f.name: map_structure(fn, *(getattr(t, f.name) for t in trees))
                                         for f in dataclasses.fields(a) if f.init})
    if isinstance(a, (list, tuple)):
        return type(a)(map_structure(fn, *xs) for xs in zip(*trees))
    if isinstance(a, dict):
        return {k: map_structure(fn, *(t[k] for t in trees)) for k in a}
    return fn(*trees)


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply fn to every tensor of a state."""
    return map_structure(lambda x: fn(x) if isinstance(x, Tensor) else x, obj)


def zip_tensors(a: Any, b: Any, fn: Callable[[Tensor, Tensor], Tensor]) -> Any:
    """fn over pairs of corresponding tensors of two states of the same structure."""
    return map_structure(lambda x, y: fn(x, y) if isinstance(x, Tensor) else x, a, b)


@dataclass
class ModelState:
    layers: list  # one dict of component states per block
    position: int = 0  # tokens consumed so far

    def detach(self) -> ModelState:
        """Cut the autograd history (between training segments)."""
        return map_tensors(self, lambda t: t.detach())

    def tensors(self) -> list[Tensor]:
        out = []
        map_tensors(self, lambda t: out.append(t) or t)
        return out


def reset_rows(state: ModelState, fresh: ModelState, mask: Tensor) -> ModelState:
    """Rows of `state` where mask [B] is True take the fresh value; tensors whose shape differs
    from the fresh one (KV caches, unfinished chunks) are zeroed on those rows instead, and the
    KV cache's `start` moves to the current position so old keys are never attended again
    (and keys older than every sequence's start are dropped)."""

    def pick(old: Tensor, new: Tensor) -> Tensor:
        m = mask.view(-1, *([1] * (old.dim() - 1)))
        if old.shape == new.shape:
            return torch.where(m, new.to(old.dtype), old)
        return torch.where(m, torch.zeros((), dtype=old.dtype, device=old.device), old)

    out = zip_tensors(state, fresh, pick)
    for layer in out.layers:
        for cache in [c for c in layer.values() if isinstance(c, KVCache)]:
            cache.start = torch.where(mask, torch.full_like(cache.start, state.position), cache.start)
            # drop keys no sequence may attend to any more, so the cache stays bounded
            keep = state.position - int(cache.start.min())
            if keep < cache.k.shape[1]:
                cache.k, cache.v = cache.k[:, cache.k.shape[1] - keep:], cache.v[:, cache.v.shape[1] - keep:]
    return out
