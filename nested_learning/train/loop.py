"""`run(cfg)`: train from a resolved config (a plain dict: train.py builds it with Hydra, tests
pass dicts). The config is checked first (config_checks.validate: the typed TrainConfig, the
optimizer section, the model's chunk rule); `train.dry_run` prints the plan and stops; then
the process group is set up and the Trainer (trainer.py) runs build, restore, the steps and
the saves."""

from __future__ import annotations

from .. import distributed
from .config_checks import validate
from .plan import print_plan
from .trainer import Trainer, TrainingDiverged, seed_everything

__all__ = ["TrainingDiverged", "run", "seed_everything", "validate"]


def run(cfg: dict) -> dict:
    t = validate(cfg)
    if t.dry_run:
        return print_plan(cfg, t)
    info = distributed.setup(t.device, t.dist_backend)
    try:
        return Trainer(cfg, t, info).run()
    finally:
        distributed.cleanup(info)
