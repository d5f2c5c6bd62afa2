"""Per-step metrics to JSONL (rank 0), optionally mirrored to Weights & Biases (offline works)."""

from __future__ import annotations

import json
import os


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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
