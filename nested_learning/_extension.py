"""Loading of the compiled extension nested_learning._C, and what to say when it is absent."""

from __future__ import annotations

import importlib
import warnings

import torch  # (also loads libtorch before the extension links against it)

try:  # by name: the compiled module is a submodule, not a source file of the package it could cycle with
    _C = importlib.import_module(f"{__package__}._C")

    EXTENSION_ERROR: str | None = None
except (ImportError, OSError) as err:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = f"{type(err).__name__}: {err}"
    warnings.warn(
        "nested_learning._C could not be loaded, so the compiled 'cpu'/'cuda' backends are "
        f"unavailable (the reference backend works): {EXTENSION_ERROR}. Rebuild it with "
        "`pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_available() -> bool:
    return _C is not None


def extension_unavailable(device_type: str | None = None) -> str | None:
    """None when the compiled backends can be used, else why not (a Backend.unavailable)."""
    return None if _C is not None else f"the extension nested_learning._C is not loaded ({EXTENSION_ERROR})"


def build_info() -> dict[str, str]:
    """How the extension was built (torch, OpenMP, CUDA, compiler) and which build of the CPU
    kernels runs here (cpu_kernels: avx2 or generic), or why it is missing."""
    if _C is None:
        return {"extension": "missing", "error": str(EXTENSION_ERROR)}
    # through the dispatcher, not a pybind11 function: calling the latter segfaulted on the GPU
    # machine (torch 2.11+cu130, Python 3.12) while the dispatcher ops ran fine
    info = dict(kv.split("=", 1) for kv in torch.ops.nested_learning_C.build_info().split(";"))
    return {"extension": "loaded", **info, "threads": str(torch.get_num_threads())}
