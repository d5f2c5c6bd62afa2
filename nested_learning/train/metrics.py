"""Per-step metrics to JSONL (rank 0), optionally mirrored to Weights & Biases (offline works).

The log holds one record per step of the run's history: a resumed run first cuts it back to
the checkpoint's step (records of steps the checkpoint does not hold are dropped, and a line
half-written at a crash with them), so steps never repeat across resumes."""

from __future__ import annotations

import json
import math
import os


def read_records(path: str) -> list[dict]:
    """The readable records of a metrics.jsonl (a torn last line is skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
    return out


def truncate(path: str, step: int) -> int:
    """Rewrite metrics.jsonl to its records of steps 1..step (in step order, one per step);
    returns how many records were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        n_lines = sum(1 for line in f if line.strip())
    keep: dict[int, dict] = {}
    for rec in read_records(path):
        if rec["step"] <= step:
            keep[rec["step"]] = rec  # a repeated step (an older log) keeps its newest record
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for s in sorted(keep):
            f.write(json.dumps(keep[s]) + "\n")
    os.replace(tmp, path)
    return n_lines - len(keep)


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN: a non-finite value is logged as null
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    return v


class MetricsLog:
    def __init__(self, out_dir: str, enabled: bool, wandb_cfg: dict | None = None, run_config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.wandb = None
        if enabled and wandb_cfg and wandb_cfg.get("enabled"):
            try:
                import wandb  # type: ignore
            except ImportError as err:
                raise ImportError("train.wandb.enabled=true needs `pip install wandb`") from err
            self.wandb = wandb.init(project=wandb_cfg.get("project", "nested_learning"),
                                    mode=wandb_cfg.get("mode", "offline"), dir=out_dir, config=run_config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = _finite_or_none(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
