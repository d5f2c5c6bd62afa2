"""Launch-side helpers shared by the Triton kernel modules."""

from __future__ import annotations

import torch
import triton


def pow2(n: int, lo: int = 16) -> int:
    """The next power of two >= n, at least lo (tl.dot needs every dimension >= 16)."""
    return max(lo, triton.next_power_of_2(n))


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot input precision for inputs of x's dtype: exact products for float32/float64,
    tf32 tensor cores for bf16/fp16 (their values are exact in tf32)."""
    return "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"
