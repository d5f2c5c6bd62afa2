"""Checks of a training config before any work: each message names the key and the rule."""

from __future__ import annotations

import math

import torch

from ..checks import positive_int
from ..models import build_model


def _nonneg_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return v


def number(name: str, v, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
           hi_open: bool = False) -> float:
    """v as a float within the bounds; strings that read as numbers are accepted (Hydra and
    YAML sometimes hand numbers over as strings), anything else names the key."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    below = x <= lo if lo_open else x < lo
    above = x >= hi if hi_open else x > hi
    if math.isnan(x) or below or above:
        lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {lb}{lo}, {hi}{hb}, got {v!r}")
    return x


def _flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")


def validate(cfg: dict) -> None:
    """Everything that can be checked from the config alone, plus the model's chunk rule
    (checked on a meta-device model: no memory, no corpus needed)."""
    t, o = cfg["train"], cfg["optim"]
    for k in ("steps", "batch_size", "seq_len", "grad_accum"):
        positive_int(f"train.{k}", t.get(k))
    for k in ("eval_every", "save_every", "eval_batches"):
        _nonneg_int(f"train.{k}", t.get(k, 0))
    _nonneg_int("optim.warmup", o.get("warmup", 0))
    if t.get("keep_last") is not None:
        _nonneg_int("train.keep_last", t["keep_last"])
    positive_int("train.max_bad_steps", t.get("max_bad_steps", 3))
    if isinstance(t.get("seed"), bool) or not isinstance(t.get("seed"), int):
        raise ValueError(f"train.seed must be an int, got {t.get('seed')!r}")
    for k in ("resume", "overwrite", "bf16", "compile", "fsdp", "inner_updates"):
        if k in t:
            _flag(f"train.{k}", t[k])
    if t.get("clip") is not None:
        number("train.clip (the gradient-norm bound; null: no clipping)", t["clip"], 0.0, lo_open=True)
    number("optim.lr", o.get("lr"), 0.0, lo_open=True)
    number("optim.weight_decay", o.get("weight_decay", 0.0), 0.0)
    number("optim.eps", o.get("eps", 1e-8), 0.0, lo_open=True)
    number("optim.min_lr_ratio", o.get("min_lr_ratio", 0.1), 0.0, 1.0)
    betas = o.get("betas", [0.9, 0.95])
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"optim.betas must be a pair [beta1, beta2], got {betas!r}")
    for i, b in enumerate(betas):
        number(f"optim.betas[{i}]", b, 0.0, 1.0, hi_open=True)
    for k in ("muon_lr",):
        if k in o:
            number(f"optim.{k}", o[k], 0.0, lo_open=True)
    if "muon_momentum" in o:
        number("optim.muon_momentum", o["muon_momentum"], 0.0, 1.0, hi_open=True)
    _check_lengths(cfg)


def _check_lengths(cfg: dict) -> None:
    """train.seq_len must be a multiple of every chunk size and CMS period of the model
    (document resets fall on segment starts); train.context_len a multiple of seq_len."""
    t = cfg["train"]
    with torch.device("meta"):
        model = build_model(cfg["model"]["name"], cfg["size"]["name"], **(cfg["model"].get("overrides") or {}))
    for name, c in model.chunk_sizes().items():
        if t["seq_len"] % c:
            rule = ", ".join(f"{n}={v}" for n, v in model.chunk_sizes().items())
            raise ValueError(f"train.seq_len={t['seq_len']} must be a multiple of {name}={c}: every segment "
                             f"starts on a chunk boundary, so seq_len must be a multiple of each of {rule} "
                             f"(the nearest above is {_next_multiple(t['seq_len'], model.chunk_multiple())})")
    ctx = t.get("context_len")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < t["seq_len"]
                            or ctx % t["seq_len"]):
        raise ValueError(f"train.context_len must be null or a multiple of train.seq_len={t['seq_len']}, "
                         f"got {ctx!r}")


def _next_multiple(n: int, m: int) -> int:
    return m * -(-n // m)
