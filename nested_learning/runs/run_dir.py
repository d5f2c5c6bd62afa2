"""A run directory across invocations: is there a run here, what may change on resume."""

from __future__ import annotations

import os
import shutil

from . import checkpoint

# Run-directory entries a run writes (train.log is a log of every invocation and stays).
RUN_FILES = ("metrics.jsonl", "config.json")


class RunExistsError(RuntimeError):
    """A fresh run was asked for in a directory that already holds one."""


def holds_run(out_dir: str) -> bool:
    """True when out_dir holds a run: checkpoints, or a non-empty metrics log."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    return bool(checkpoint.step_dirs(out_dir)) or (os.path.exists(metrics) and os.path.getsize(metrics) > 0)


def clear(out_dir: str) -> None:
    """Remove a previous run's checkpoints, metrics and config (train.overwrite=true)."""
    shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
    shutil.rmtree(os.path.join(out_dir, "export"), ignore_errors=True)
    for f in RUN_FILES:
        p = os.path.join(out_dir, f)
        if os.path.exists(p):
            os.remove(p)


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


# Keys that do not change what is trained (where it is written, how it is shown).
_COSMETIC = ("train.progress", "train.resume", "train.overwrite")


def config_changes(old: dict | None, new: dict) -> list[str]:
    """'key: old -> new' for every config value that differs from the checkpoint's run (the
    ones resume accepts: what must match was checked against the checkpoint's meta)."""
    if old is None:
        return []
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in _COSMETIC]
