"""The per-sequence fast state of a model: one entry per block, plus the stream position."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply fn to every tensor inside nested dataclasses, lists, tuples and dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def zip_tensors(a: Any, b: Any, fn: Callable[[Tensor, Tensor], Tensor]) -> Any:
    """fn over pairs of corresponding tensors of two states of the same structure."""
    if isinstance(a, Tensor):
        return fn(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return dataclasses.replace(a, **{f.name: zip_tensors(getattr(a, f.name), getattr(b, f.name), fn)
                                         for f in dataclasses.fields(a) if f.init})
    if isinstance(a, (list, tuple)):
        return type(a)(zip_tensors(x, y, fn) for x, y in zip(a, b))
    if isinstance(a, dict):
        return {k: zip_tensors(a[k], b[k], fn) for k in a}
    return a


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
        cache = layer.get("attn")
        if cache is not None:
            cache.start = torch.where(mask, torch.full_like(cache.start, state.position), cache.start)
            # drop keys no sequence may attend to any more, so the cache stays bounded
            keep = state.position - int(cache.start.min())
            if keep < cache.k.shape[1]:
                cache.k, cache.v = cache.k[:, cache.k.shape[1] - keep:], cache.v[:, cache.v.shape[1] - keep:]
    return out
