"""Train a HOPE, Titans or Transformer language model.

    python train.py                                    # smoke HOPE on the offline default corpus
    python train.py model=titans train.steps=500 train.out_dir=runs/t
    torchrun --standalone --nproc_per_node=2 train.py model=transformer optim=mixed_muon_adamw
    python train.py experiment=plan_mid train.dry_run=true   # the plan: parameters, tokens, steps, memory

`nl-train` is the same command (Hydra overrides as arguments; the configs are the repository's
configs/, so it needs the editable install of a clone).

A config the command line cannot make (a misspelt key, an unknown option, a value that breaks a
rule) is refused in one line before anything is created; NL_TRACEBACK=1 shows the traceback."""

from __future__ import annotations

import os
import shutil
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from nested_learning.cli._common import USER_ERRORS, command, config_dir, user_error
from nested_learning.data.shards import outermost_missing
from nested_learning.train.config import model_overrides, register
from nested_learning.train.config_checks import ConfigError, check_command_line
from nested_learning.train.interrupt import TrainingInterrupted
from nested_learning.train.loop import run

_NEW_RUN_DIR: list[str] = []  # the run directory when this command creates it (Hydra makes it first)


def _train(cfg: DictConfig) -> None:
    try:
        run(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))  # prints its summary (rank 0)
    except TrainingInterrupted as err:  # the step was saved and the run said so, in one line
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:  # before training started (corpus, build) or a second Ctrl-C
        _remove_if_unused()
        if os.environ.get("NL_TRACEBACK"):
            raise
        print(f"{_prog()}: interrupted before a step could be saved", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as err:
        _remove_if_unused()
        user_error(_prog(), err)


def _remove_if_unused() -> None:
    """A run that failed before its first step leaves no folder behind (only one this command
    created, holding no checkpoint and no metrics; rank 0 removes it)."""
    if not _NEW_RUN_DIR or os.environ.get("RANK", "0") != "0":
        return
    new = _NEW_RUN_DIR[0]
    if not any("metrics.jsonl" in files or "checkpoints" in dirs for _, dirs, files in os.walk(new)):
        shutil.rmtree(new, ignore_errors=True)


def _prog() -> str:
    return os.path.basename(sys.argv[0] or "train.py")


def main(argv: list[str] | None = None) -> None:
    """Hydra reads the overrides from sys.argv; argv (a list of overrides) stands in for them."""
    register()  # the schemas and defaults of the train, data and optim sections
    overrides = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = check_command_line(overrides, config_dir())
    except ConfigError as err:
        user_error(_prog(), err)
    _NEW_RUN_DIR.clear()
    if cfg is not None and (new := outermost_missing(cfg["train"]["out_dir"])) is not None:
        _NEW_RUN_DIR.append(new)  # the run directory, or the outermost of its parents this command creates
    app = hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(_train)
    saved = sys.argv
    # model.overrides.K=V: any field of the model's config (configs/model/*.yaml list none)
    sys.argv = [saved[0] if saved else "nl-train", *model_overrides(overrides)]
    try:
        return app()
    finally:
        sys.argv = saved


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()
