"""Launch-side helpers shared by the Triton kernel modules."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def pow2(n: int, lo: int = 16) -> int:
    """The next power of two >= n, at least lo (tl.dot needs every dimension >= 16)."""
    return max(lo, triton.next_power_of_2(n))


def dot_precision(x: torch.Tensor) -> str:
    """tl.dot input precision for inputs of x's dtype: exact products for float32/float64,
    tf32 tensor cores for bf16/fp16 (their values are exact in tf32)."""
    return "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"


@triton.jit
def state_ptrs(ptr, idx, v0, DV: tl.constexpr, DK: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """Pointers and mask of the [BV, BK] tile (rows v0..) of state number `idx` ([*, DV, DK])."""
    v = v0 + tl.arange(0, BV)
    k = tl.arange(0, BK)
    return ptr + idx * DV * DK + v[:, None] * DK + k[None, :], (v[:, None] < DV) & (k[None, :] < DK)


@triton.jit
def load_state(ptr, idx, v0, DV: tl.constexpr, DK: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                PRESENT: tl.constexpr):
    """The [BV, BK] float32 tile of state `idx`, or zeros when the state is absent."""
    p, m = state_ptrs(ptr, idx, v0, DV, DK, BV, BK)
    if PRESENT:
        x = tl.load(p, mask=m, other=0.0).to(tl.float32)
    else:
        x = tl.zeros([BV, BK], dtype=tl.float32)
    return x
