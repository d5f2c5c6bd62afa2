"""Model FLOP utilisation: the model's FLOPs per token (models/flops.py) times the tokens per
second, against this device's dense matrix-product peak measured in the same process."""

from __future__ import annotations

import statistics
import time

import torch

from ..models.flops import flops_per_token


def gemm_peak(device, dtype=torch.float32, n: int | None = None, repeat: int = 5) -> float:
    """FLOP/s of an n x n by n x n matrix product (the best of `repeat`, warm) on `device` in
    `dtype` with this process's threads: the peak that MFU is a fraction of. n defaults to 1024
    on a CPU (20 ms at 100 GFLOP/s) and 8192 on a GPU."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / min(times)


class MFUMeter:
    """mfu(tokens_per_s, seq_len) -> (model FLOP/s, fraction of the peak), the FLOPs per token
    cached per segment length (a curriculum changes it). `devices`: how many devices the
    tokens per second are summed over (the peak is per device)."""

    def __init__(self, model, device, dtype=torch.float32, devices: int = 1, peak: float | None = None):
        self.model, self.devices = model, devices
        self.peak = gemm_peak(device, dtype) if peak is None else peak
        self._per_token: dict[int, float] = {}

    def flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self._per_token:
            self._per_token[seq_len] = flops_per_token(self.model, seq_len, training=True)
        return self._per_token[seq_len]

    def __call__(self, tokens_per_s: float, seq_len: int) -> tuple[float, float]:
        achieved = tokens_per_s * self.flops_per_token(seq_len)
        return achieved, achieved / (self.peak * self.devices)


def median_mfu(records: list[dict]) -> float | None:
    """The median `mfu` of a run's step records (None when none has one)."""
    vals = [r["mfu"] for r in records if isinstance(r.get("mfu"), (int, float))]
    return statistics.median(vals) if vals else None
