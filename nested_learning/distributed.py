"""Process group set-up and tear-down (nccl on CUDA, gloo on CPU, or an override); how the
model is spread over the ranks (DDP, FSDP2) is sharding.py. Fast state stays per sequence and
rank-local; only the slow weights' gradients are reduced."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj` (a small picklable value), on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def setup(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Reads torchrun's environment; a plain `python train.py` is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"train.dist_backend must be 'nccl', 'gloo' or null, got {backend!r}")
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, dev)


def cleanup(info: DistInfo) -> None:
    """End of a distributed run: barrier, then destroy (gloo can abort at exit otherwise)."""
    if info.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
