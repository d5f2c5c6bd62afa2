"""How a model is spread over the ranks of a run: one process (as is), DDP, or FSDP2
(`fully_shard` per block, then the whole model; PyTorch's counterpart of DeepSpeed ZeRO-3:
parameters, gradients and optimizer state sharded).

Under FSDP the memories' initial states (the parameters a fresh fast state is copied from:
CMS weights, the self-modifying projections' P0 and M0, the Titans memory's initial weights)
are kept whole on every rank (`ignored_params`), so building a fresh fast state at a
document or context boundary is a local copy, not a collective; their gradients are averaged
over the ranks by `Sharded.sync_replicated_grads()` after the backward. The price is their
memory, replicated: `replicated_parameters` counts it (the dry run reports it)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..distributed import DistInfo

__all__ = ["Sharded", "state_init_parameters", "wrap"]


class _DetachedParameters(TorchFunctionMode):
    """Records the parameters that are detached: `layers.common.dense`, which every
    init_state uses to copy a parameter into a fresh fast state, starts with p.detach()."""

    def __init__(self, params: dict[int, nn.Parameter]):
        super().__init__()
        self.params, self.seen = params, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach and args and id(args[0]) in self.params:
            self.seen[id(args[0])] = self.params[id(args[0])]
        return func(*args, **(kwargs or {}))


def state_init_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a fresh fast state is built from (found by building one)."""
    params = {id(p): p for p in model.parameters()}
    mode = _DetachedParameters(params)
    with torch.no_grad(), mode:
        model.init_state(1)
    return list(mode.seen.values())


class Sharded:
    """The wrapped module the forward runs through, and what the loop must do around it."""

    def __init__(self, module: nn.Module, kind: str, replicated: list[nn.Parameter] | None = None):
        self.module, self.kind, self.replicated = module, kind, replicated or []

    def no_sync(self):
        """DDP's gradient-sync suppression for all but the last micro-batch (a no-op context
        otherwise)."""
        import contextlib

        return self.module.no_sync() if self.kind == "ddp" else contextlib.nullcontext()

    def sync_replicated_grads(self, world: int) -> None:
        """Average the replicated parameters' gradients over the ranks (FSDP leaves them alone)."""
        if not self.replicated or world == 1:
            return
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        i = 0
        for g in grads:
            g.copy_(flat[i: i + g.numel()].view_as(g))
            i += g.numel()


def wrap(model: nn.Module, info: DistInfo, fsdp: bool, bf16: bool = False) -> Sharded:
    """The model as the run's world needs it: as is (one process), DDP, or FSDP2 with a
    mixed-precision policy (bf16 parameters in the forward, float32 gradient reduction) when
    train.bf16."""
    if info.world == 1:
        return Sharded(model, "single")
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return Sharded(DDP(model, device_ids=ids), "ddp")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    keep = state_init_parameters(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    ignored = set(keep)
    for blk in model.blocks:
        fully_shard(blk, mp_policy=mp, ignored_params={p for p in blk.parameters() if p in ignored} or None)
    fully_shard(model, mp_policy=mp, ignored_params=ignored or None)
    return Sharded(model, "fsdp", keep)


def replicated_parameters(model: nn.Module) -> int:
    """How many parameters FSDP keeps whole on every rank (the memories' initial states)."""
    return sum(p.numel() for p in state_init_parameters(model))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_mixed(params, clip: float) -> float:
    """clip_grad_norm_ for a model whose parameters are partly sharded (DTensor) and partly
    whole (the replicated memory inits): the norm over both, one reduction for the sharded part."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    whole = [g for g in grads if not hasattr(g, "full_tensor")]
    parts = []
    if sharded:
        parts.append(_local(torch.nn.utils.get_total_norm(sharded)))
    if whole:
        parts.append(torch.nn.utils.get_total_norm(whole))
    total = torch.linalg.vector_norm(torch.stack([x.float() for x in parts])) if parts else torch.zeros(())
    if math.isfinite(clip) and torch.isfinite(total):
        coef = torch.clamp(clip / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device) if not hasattr(g, "full_tensor") else float(coef))
    return float(total)


def checksum(model: nn.Module) -> list[float]:
    """(sum, sum of squares, max |x|) of every slow weight in float64: identifies the slow
    weights across ranks and runs. A sharded parameter contributes its local shard on each
    rank, reduced over the ranks (every rank must call it; nothing is gathered), so an FSDP
    run's figures equal an unsharded run's up to float64 rounding of the sums."""
    sums, peak, sharded = torch.zeros(2, dtype=torch.float64), torch.zeros((), dtype=torch.float64), []
    with torch.no_grad():
        for p in model.parameters():
            x = p.detach()
            if hasattr(x, "to_local"):
                sharded.append(x.to_local().double().flatten().cpu())
                continue
            x = x.double().flatten().cpu()
            sums += torch.stack([x.sum(), x.square().sum()])
            peak = torch.maximum(peak, x.abs().max())
        if sharded:
            part = torch.cat(sharded)
            local = torch.stack([part.sum(), part.square().sum()]) if part.numel() else torch.zeros(2, dtype=torch.float64)
            top = part.abs().max() if part.numel() else torch.zeros((), dtype=torch.float64)
            dist.all_reduce(local)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            sums += local
            peak = torch.maximum(peak, top)
    return [float(sums[0]), float(sums[1]), float(peak)]
