"""Argument checks shared by the ops, layers, models and training (public: `nested_learning.checks`):
cheap, and every message names the argument.

Value-range checks on gates cost one reduction per gate; they are skipped while
torch.compile traces (they would need the data), on meta and fake tensors (which hold no
data), and when NL_SKIP_CHECKS=1. NaN or Inf in the other inputs propagates silently unless
NL_CHECK_FINITE=1 (or `check_finite()` as a context manager), which checks every tensor input
of every op and names the first one holding a non-finite value (a debugging aid: one
reduction and one host sync per input).
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import ClassVar

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


class NonFiniteInputError(ValueError):
    """An op input holds NaN or Inf (a gate out of range because it is NaN, or any input under
    NL_CHECK_FINITE=1): the training loop treats it as a diverged step."""


_RANGE_CHECKS_OFF = [0]


@contextlib.contextmanager
def range_checks_off():
    """Within the block the ops skip their value checks (gate ranges, target ids), as under
    NL_SKIP_CHECKS=1. For loops whose inputs are checked once outside them: token-by-token
    decoding checks each step's logits for finiteness instead (a NaN anywhere in the state
    reaches them), which costs one reduction per token instead of one per gate and layer."""
    _RANGE_CHECKS_OFF[0] += 1
    try:
        yield
    finally:
        _RANGE_CHECKS_OFF[0] -= 1


def _checks_enabled() -> bool:
    return (os.environ.get("NL_SKIP_CHECKS", "0") != "1" and not _RANGE_CHECKS_OFF[0]
            and not torch.compiler.is_compiling())


def _has_data(x: Tensor) -> bool:
    """False for meta and fake tensors (shape propagation: nothing to read)."""
    if x.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(x)


def in_range(name: str, x: Tensor, lo: float, hi: float, lo_open: bool = False) -> None:
    """lo <= x <= hi (lo < x when lo_open); NaN fails too."""
    if not _checks_enabled() or x.numel() == 0 or not _has_data(x):
        return
    mn, mx = torch.aminmax(x.detach())
    bad_lo = (mn <= lo) if lo_open else (mn < lo)
    if bool(bad_lo | (mx > hi) | torch.isnan(mn) | torch.isnan(mx)):
        lb = "(" if lo_open else "["
        err = NonFiniteInputError if not bool(torch.isfinite(mn) & torch.isfinite(mx)) else ValueError
        raise err(f"{name} must lie in {lb}{lo}, {hi}], got values in [{mn.item():.4g}, {mx.item():.4g}]")


_FINITE_DEPTH = [0]


@contextlib.contextmanager
def check_finite():
    """Within the block every op checks that its tensor inputs are finite (as NL_CHECK_FINITE=1)."""
    _FINITE_DEPTH[0] += 1
    try:
        yield
    finally:
        _FINITE_DEPTH[0] -= 1


def finite(named: dict[str, Tensor | None]) -> None:
    """Opt-in (NL_CHECK_FINITE=1 or check_finite()): NonFiniteInputError naming the first
    floating input that holds NaN or Inf, with how many of each."""
    if not (_FINITE_DEPTH[0] or os.environ.get("NL_CHECK_FINITE", "0") == "1") or torch.compiler.is_compiling():
        return
    for name, x in named.items():
        if x is None or not x.is_floating_point() or x.numel() == 0 or not _has_data(x):
            continue
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            raise NonFiniteInputError(f"{name} holds non-finite values ({n_nan} NaN, {n_inf} Inf of {x.numel()}; "
                                      "checked because NL_CHECK_FINITE=1 or check_finite() is on)")


def nonnegative(name: str, x: Tensor) -> None:
    in_range(name, x, 0.0, float("inf"))


# ----------------------------------------------------------------------------- config sections
def unknown_keys_message(section: str, unknown, known) -> str:
    """One line: the unknown keys of `section`, each with its nearest known keys."""
    parts = []
    for k in sorted(unknown):
        near = difflib.get_close_matches(k, sorted(known), n=3, cutoff=0.5)
        parts.append(f"{section}.{k}" + (f" (did you mean {', '.join(f'{section}.{n}' for n in near)}?)" if near else ""))
    return (f"unknown key{'s' if len(parts) > 1 else ''} {'; '.join(parts)}; the {section} section's keys are "
            f"{', '.join(sorted(known))}")


class ConfigSection:
    """What the typed config sections (TrainConfig, OptimConfig, DataConfig: dataclasses) share:
    built from a plain dict whose unknown keys are refused in one line naming the nearest known
    ones; `of` accepts the section or a dict of its keys."""

    SECTION: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: dict | None):
        known = {f.name for f in fields(cls)}
        unknown = set(d or {}) - known
        if unknown:
            raise ValueError(unknown_keys_message(cls.SECTION, unknown, known))
        return cls(**(d or {}))

    @classmethod
    def of(cls, cfg):
        return cfg if isinstance(cfg, cls) else cls.from_dict(dict(cfg))

    def as_dict(self) -> dict:
        return asdict(self)

