"""Triton kernels, installed as `nested_learning.kernels` (never as a top-level `kernels`).

Import this package only where Triton kernels are needed: TRITON_INTERPRET must be set before
the kernel modules are imported for them to run on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import os


def triton_unavailable_reason(device_type: str) -> str | None:
    """None when Triton kernels can run tensors of `device_type` here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing"
        return None
    import torch

    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None
