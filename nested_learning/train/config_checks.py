"""Checks of a whole training config before any work (each message names the key and the
rule): the train section through TrainConfig, the optimizer section, and the model's chunk
rule for every sequence length the run will use."""

from __future__ import annotations

import torch

from ..models import build_model
from .config import TrainConfig, check_optim

__all__ = ["validate"]


def validate(cfg: dict) -> TrainConfig:
    """The typed train config of `cfg`, after everything that can be checked from the config
    alone, plus the model's chunk rule (checked on a meta-device model: no memory, no corpus)."""
    t = TrainConfig.from_dict(cfg["train"])
    check_optim(cfg["optim"])
    _check_lengths(cfg, t)
    t.check_context_len()
    return t


def _check_lengths(cfg: dict, t: TrainConfig) -> None:
    """Every seq_len of the run must be a multiple of every chunk size and CMS period of the
    model (document resets fall on segment starts)."""
    with torch.device("meta"):
        model = build_model(cfg["model"]["name"], cfg["size"]["name"], **(cfg["model"].get("overrides") or {}))
    for sl in t.stage_seq_lens():
        for name, c in model.chunk_sizes().items():
            if sl % c:
                rule = ", ".join(f"{n}={v}" for n, v in model.chunk_sizes().items())
                raise ValueError(f"train.seq_len={sl} must be a multiple of {name}={c}: every segment "
                                 f"starts on a chunk boundary, so seq_len must be a multiple of each of {rule} "
                                 f"(the nearest above is {_next_multiple(sl, model.chunk_multiple())})")


def _next_multiple(n: int, m: int) -> int:
    return m * -(-n // m)
