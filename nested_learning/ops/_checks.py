"""Input validation shared by the public ops: cheap, and every message names the argument.

Value-range checks on gates cost one reduction per gate; they are skipped while
torch.compile traces (they would need the data) and when NL_SKIP_CHECKS=1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def tensor(name: str, x, ndim: int | None = None, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor {FLOAT_DTYPES}, got {x.dtype}")
    return x


def shape(name: str, x: Tensor, expected: Sequence[int | None], what: str) -> None:
    """expected: sizes, None where any size is fine; `what` names the convention."""
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want} ({what}), got {list(x.shape)}")


def same_device(named: dict[str, Tensor | None]) -> torch.device:
    devs = {n: t.device for n, t in named.items() if t is not None}
    first = next(iter(devs.values()))
    for n, d in devs.items():
        if d != first:
            raise ValueError(f"{n} is on {d} but {next(iter(devs))} is on {first}")
    return first


def same_dtype(named: dict[str, Tensor | None]) -> None:
    dts = {n: t.dtype for n, t in named.items() if t is not None}
    first_name, first = next(iter(dts.items()))
    for n, d in dts.items():
        if d != first:
            raise TypeError(f"{n} has dtype {d} but {first_name} has {first}")


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def choice(name: str, v, options: Sequence[str]) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {v!r}")
    return v


def _checks_enabled() -> bool:
    return os.environ.get("NL_SKIP_CHECKS", "0") != "1" and not torch.compiler.is_compiling()


def in_range(name: str, x: Tensor, lo: float, hi: float, lo_open: bool = False) -> None:
    """lo <= x <= hi (lo < x when lo_open); NaN fails too."""
    if not _checks_enabled() or x.numel() == 0:
        return
    mn, mx = torch.aminmax(x.detach())
    bad_lo = (mn <= lo) if lo_open else (mn < lo)
    if bool(bad_lo | (mx > hi) | torch.isnan(mn) | torch.isnan(mx)):
        lb = "(" if lo_open else "["
        raise ValueError(
            f"{name} must lie in {lb}{lo}, {hi}], got values in [{mn.item():.4g}, {mx.item():.4g}]"
        )


def nonnegative(name: str, x: Tensor) -> None:
    in_range(name, x, 0.0, float("inf"))
