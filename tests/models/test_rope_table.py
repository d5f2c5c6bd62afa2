"""The rotary angles come from a table for the first positions: the same float32 products as
computing them afresh, so rope's output is bit for bit the same inside and beyond the table."""

import torch

from nested_learning.layers import common as C


def _fresh(x, start, theta):
    T, d = x.shape[1], x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(start, start + T, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos()[None, :, None, :].to(x.dtype), ang.sin()[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def test_rope_from_the_table_equals_rope_computed_afresh():
    x = torch.randn(2, 5, 3, 16)
    n = C.ROPE_TABLE_POSITIONS
    for start in (0, 1, 7, 1000, n - 5, n - 3, n, 10 * n):  # inside, across and beyond the table
        for theta in (10000.0, 500.0):
            assert torch.equal(C.rope(x, start, theta), _fresh(x, start, theta)), (start, theta)
    assert torch.equal(C.rope(x.double(), 3, 10000.0), _fresh(x.double(), 3, 10000.0))
