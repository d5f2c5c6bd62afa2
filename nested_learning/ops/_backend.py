"""Backend registry and selection for the public ops.

Order of choice for `backend=None` (docs/ARCHITECTURE.md): triton -> cuda on CUDA tensors, cpu on
CPU tensors, then reference everywhere. Forcing: the `backend=` argument, the
`use_backend(name)` context manager, or the NL_BACKEND environment variable, in that order of
precedence. A forced backend that cannot run raises BackendUnavailableError, never a silent
fallback. The backend that ran is logged at DEBUG level on the "nested_learning.ops" logger
and kept in `last_backend(op)`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("nested_learning.ops")

BACKEND_ORDER = ("triton", "cuda", "cpu", "reference")
_DEFAULT_DEVICES = {"triton": ("cuda",), "cuda": ("cuda",), "cpu": ("cpu",)}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run these inputs here."""


@dataclass(frozen=True)
class Backend:
    """One implementation of one op. forward/backward take the op's custom-op arguments.

    devices: device types it is chosen for automatically. forced_devices: device types it can
    run on when forced by name (e.g. Triton on CPU tensors through TRITON_INTERPRET=1).
    unavailable(device_type): returns None when usable on such tensors, else the reason it is
    not. suits(**hints): whether automatic selection should prefer it for these inputs (hints
    are op-specific, e.g. the number of tokens); a backend that does not suit is still chosen
    when no other compiled backend can run the inputs. forward_with_residuals (optional): the
    forward used when an input requires grad; returns (outputs, residuals), where residuals
    is a list of tensors its backward receives appended to `inputs` (and must do without,
    recomputing, when they are absent: under torch.compile they are)."""

    name: str
    forward: Callable
    backward: Callable
    devices: tuple[str, ...]
    forced_devices: tuple[str, ...] = ()
    unavailable: Callable[[str], str | None] = lambda device_type: None
    suits: Callable[..., bool] = lambda **hints: True
    forward_with_residuals: Callable | None = None


_REGISTRY: dict[str, dict[str, Backend]] = {}
_FORCED: list[str] = []
_LAST: dict[str, str] = {}


def register(op: str, backend: Backend) -> None:
    if backend.name not in BACKEND_ORDER:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_ORDER}")
    _REGISTRY.setdefault(op, {})[backend.name] = backend


def registered_backends(op: str) -> tuple[str, ...]:
    return tuple(n for n in BACKEND_ORDER if n in _REGISTRY.get(op, {}))


def available_backends(op: str, device_type: str = "cpu") -> tuple[str, ...]:
    """Backends of `op` that can run tensors of `device_type` here, fastest first."""
    out = []
    for name in registered_backends(op):
        b = _REGISTRY[op][name]
        if name == "reference" or (
            device_type in b.devices + b.forced_devices and b.unavailable(device_type) is None
        ):
            out.append(name)
    return tuple(out)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force `name` for every op called inside the block (None lifts an outer forcing)."""
    if name is not None and name not in BACKEND_ORDER:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_ORDER}")
    _FORCED.append(name or "")
    try:
        yield
    finally:
        _FORCED.pop()


def forced_backend() -> str | None:
    if _FORCED:
        return _FORCED[-1] or None
    env = os.environ.get("NL_BACKEND", "").strip()
    return env or None


def resolve(op: str, device_type: str, backend: str | None, **hints) -> str:
    """Name of the backend that will run `op` on `device_type` tensors (hints: see Backend)."""
    requested = backend if backend is not None else forced_backend()
    table = _REGISTRY[op]
    if requested is None:
        usable = [name for name in BACKEND_ORDER if name in table and name != "reference"
                  and device_type in table[name].devices and table[name].unavailable(device_type) is None]
        for name in usable:
            if table[name].suits(**hints):
                return name
        return usable[0] if usable else "reference"
    if requested not in BACKEND_ORDER:
        raise ValueError(f"backend must be one of {BACKEND_ORDER} or None, got {requested!r}")
    b = table.get(requested)
    if b is None:
        raise BackendUnavailableError(
            f"{op}: backend {requested!r} is not implemented for this op; "
            f"implemented: {registered_backends(op)}"
        )
    if requested != "reference":
        if device_type not in b.devices + b.forced_devices:
            raise BackendUnavailableError(
                f"{op}: backend {requested!r} cannot run {device_type} tensors "
                f"(it runs on {b.devices + b.forced_devices})"
            )
        reason = b.unavailable(device_type)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {requested!r} is unavailable: {reason}")
    return requested


def triton_unavailable(device_type: str) -> str | None:
    """Backend.unavailable of the Triton backends (imports the kernels package lazily)."""
    from nested_learning.kernels import triton_unavailable_reason

    return triton_unavailable_reason(device_type)


def get(op: str, name: str) -> Backend:
    return _REGISTRY[op][name]


def note_ran(op: str, name: str) -> None:
    _LAST[op] = name
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: backend=%s", op, name)


def last_backend(op: str) -> str | None:
    """The backend that ran the most recent eager call of `op` (None if never called)."""
    return _LAST.get(op)
