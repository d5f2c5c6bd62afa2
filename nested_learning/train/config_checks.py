"""Checks of a whole training config (and of the command line that makes it) before any work (each message names the key and the
rule): the train section through TrainConfig, the optimizer section, and the model's chunk
rule for every sequence length the run will use."""

from __future__ import annotations

import difflib
import os

import torch

from ..checks import unknown_keys_message
from ..data.config import DataConfig
from ..models import build_model
from .config import OptimConfig, TrainConfig, compose_config

__all__ = ["ConfigError", "check_command_line", "validate"]


def validate(cfg: dict) -> TrainConfig:
    """The typed train config of `cfg`, after everything that can be checked from the config
    alone, plus the model's chunk rule (checked on a meta-device model: no memory, no corpus)."""
    t = TrainConfig.from_dict(cfg["train"])
    OptimConfig.from_dict(cfg["optim"])
    DataConfig.from_dict(cfg["data"])
    _check_lengths(cfg, t)
    t.check_context_len()
    return t


def _check_lengths(cfg: dict, t: TrainConfig) -> None:
    """Every seq_len of the run must be a multiple of every chunk size and CMS period of the
    model (document resets fall on segment starts)."""
    with torch.device("meta"):
        model = build_model(cfg["model"]["name"], cfg["size"]["name"], **(cfg["model"].get("overrides") or {}))
    for sl in t.stage_seq_lens():
        for name, c in model.chunk_sizes().items():
            if sl % c:
                rule = ", ".join(f"{n}={v}" for n, v in model.chunk_sizes().items())
                raise ValueError(f"train.seq_len={sl} must be a multiple of {name}={c}: every segment "
                                 f"starts on a chunk boundary, so seq_len must be a multiple of each of {rule} "
                                 f"(the nearest above is {_next_multiple(sl, model.chunk_multiple())})")


def _next_multiple(n: int, m: int) -> int:
    return m * -(-n // m)


class ConfigError(ValueError):
    """A command line's config cannot be used; the message is one line that says why."""


def _nearest_key(overrides: list[str], config_dir: str | None) -> str | None:
    """The first override that names no key or option of the config, said with the nearest
    known ones (None when every key exists)."""
    root = config_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                      "configs")
    groups = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    choices = []
    for o in overrides:
        key, value = o.split("=", 1)
        key = key.lstrip("+~")
        if "." in key:
            continue
        if key not in groups:
            return unknown_keys_message("config", [key], groups).replace("config.", "").replace(
                "the config section's keys are", "the config groups are")
        options = sorted(f[:-5] for f in os.listdir(os.path.join(root, key)) if f.endswith(".yaml"))
        if value not in options and value != "null":
            near = difflib.get_close_matches(value, options, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(f'{key}={n}' for n in near)}?)" if near else ""
            return f"unknown {key} {value!r}{hint}; the {key} options are {', '.join(options)}"
        choices.append(o)
    try:
        tree = compose_config(choices, config_dir)
    except Exception:  # noqa: BLE001  (nothing more to say than the caller's message)
        return None
    for o in overrides:
        key = o.split("=", 1)[0]
        if key.startswith(("+", "~")) or key.startswith("model.overrides.") or "." not in key:
            continue
        node, path = tree, key.split(".")
        for i, part in enumerate(path):
            if not isinstance(node, dict):
                break
            if part not in node:
                return unknown_keys_message(".".join(path[:i]), [part], node.keys())
            node = node[part]
    return None


def check_command_line(overrides: list[str], config_dir: str | None = None) -> dict | None:
    """The resolved and checked config of `python train.py <overrides>`, before anything is
    created; a user error raises ConfigError with one line (a misspelt key names the nearest
    known ones). A command line with Hydra's own flags (an argument starting with '-') is left to
    Hydra (None); `hydra.*` overrides are not checked."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(o.startswith("-") for o in overrides):  # Hydra's flags (--help, --cfg job, -m, ...): Hydra's own handling
        return None
    mine = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    for o in mine:
        if "=" not in o:
            raise ConfigError(f"{o!r} is not key=value (e.g. train.steps=100, model=titans)")
    try:
        cfg = compose_config(mine, config_dir)
    except (HydraException, OmegaConfBaseException) as err:
        msg = _nearest_key(mine, config_dir)
        if msg is None:  # a bad value: Hydra's first line, and the cause's (the type rule broken)
            lines = [str(err).splitlines()[0].strip()] if str(err).strip() else [type(err).__name__]
            if err.__cause__ is not None and str(err.__cause__).strip():
                lines.append(str(err.__cause__).splitlines()[0].strip())
            msg = ": ".join(lines)
        raise ConfigError(msg) from None
    try:
        validate(cfg)
    except ValueError as err:
        raise ConfigError(str(err).replace("\n", " ")) from None
    return cfg
