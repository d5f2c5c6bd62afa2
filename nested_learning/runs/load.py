"""Loading a trained run for inference: the model rebuilt from what the run recorded, its
slow weights, and the run's tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..data.sources import corpus_cache_dir, data_dir_of, read_corpus, split_documents
from ..data.tokens import TOKENIZER_FILE
from ..models import MODELS
from . import checkpoint
from .checkpoint import CheckpointError
from .checkpointer import load_whole_model


@dataclass(frozen=True)
class RunInfo:
    """Where a loaded model came from (recorded in every evaluation's result file)."""

    run_dir: str | None  # the run directory (None for a lone checkpoint outside one)
    checkpoint: str
    step: int
    model: str
    size: str
    seq_len: int | None = None  # the training segment (train.seq_len), for memorising evaluations

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, str | None]:
    """(checkpoint directory, run directory or None) for a run directory or one checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist: pass a run directory from train.py (its train.out_dir) "
                              "or one of its checkpoints/step_XXXXXXXX directories")
    if os.path.exists(os.path.join(path, "meta.json")):  # a checkpoint directory
        if step is not None:
            raise ValueError("step= selects a checkpoint of a run directory; a checkpoint path was given")
        parent = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if os.path.exists(os.path.join(parent, "config.json")):  # checkpoints/step_X of a run
            return path, parent
        # an export (runs/export.py) carries its run's config and tokenizer itself
        return path, path if os.path.exists(os.path.join(path, "config.json")) else None
    if step is not None:
        ck = checkpoint.checkpoint_dir(path, step)
        if not os.path.isdir(ck):
            have = sorted(os.path.basename(p) for _, p in checkpoint.step_dirs(path))
            raise CheckpointError(f"{path} has no checkpoint at step {step}; it has {have or 'none'}")
        return ck, path
    found = checkpoint.step_dirs(path)
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint (no checkpoints/step_XXXXXXXX): train with "
                              "train.save_every > 0, or pass a checkpoint directory")
    return found[0][1], path


def load_run(path: str, step: int | None = None, device: str | torch.device | None = None,
             model: str | None = None):
    """(model, tokenizer) of a run directory written by train.py, or of one checkpoint.

    The model config comes from the checkpoint's meta.json, the weights from its
    model.safetensors; the model is in eval mode on `device` (default: CUDA when available)
    and `model.run_info` says where it came from. `step` picks a checkpoint of a run (default:
    the latest); `model` ("hope", ...) asserts which model the checkpoint must hold. A damaged
    checkpoint, or one of another model, raises CheckpointError saying what to do."""
    ck, run_dir = find_checkpoint(path, step)
    try:
        checkpoint.verify(ck)  # every file against the checksums recorded when it was written
    except CheckpointError as err:  # evaluating another step than asked would mislead: say, don't fall back
        older = [s for s, p in checkpoint.step_dirs(run_dir) if p != ck] if run_dir else []
        hint = f"; the run also has steps {older}: pass step=N (--step N) to evaluate one" if older else ""
        raise CheckpointError(f"{err}{hint}") from err
    meta = checkpoint._read_json(os.path.join(ck, "meta.json"))
    name = meta.get("model")
    if name not in MODELS or "model_config" not in meta:
        raise CheckpointError(f"{ck}/meta.json records no known model (model={name!r}); it was not written by "
                              "this package's train.py, or is damaged")
    if model is not None and model != name:
        raise CheckpointError(f"{ck} holds a {name!r} model, not {model!r}: pass the run of a {model} model")
    cls, cfg_cls = MODELS[name]
    try:
        net = cls(cfg_cls(**meta["model_config"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{ck}: the recorded model config does not build with this version of the "
                              f"package ({err}); evaluate it with the version that trained it") from err
    try:
        load_whole_model(ck, net)  # either format: one safetensors file, or DCP shards (read in one process)
    except RuntimeError as err:
        raise CheckpointError(f"{ck}: the weights do not fit the recorded {name} config ({err}); the checkpoint "
                              "is damaged or was edited") from err
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(device).eval()
    net.run_info = RunInfo(run_dir, ck, int(meta["step"]), name, meta.get("size", "?"), meta.get("seq_len"))
    return net, load_tokenizer(run_dir, ck)


def load_tokenizer(run_dir: str | None, ck: str):
    """The run's tokenizer: run_dir/tokenizer.json (train.py writes it), else the corpus cache
    that the run's config.json names."""
    from tokenizers import Tokenizer

    for d in (run_dir, ck):
        if d and os.path.exists(os.path.join(d, TOKENIZER_FILE)):
            return Tokenizer.from_file(os.path.join(d, TOKENIZER_FILE))
    if run_dir and os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        cache = corpus_cache_dir(cfg["data"])
        if os.path.exists(os.path.join(cache, TOKENIZER_FILE)):
            return Tokenizer.from_file(os.path.join(cache, TOKENIZER_FILE))
        raise CheckpointError(f"the tokenizer of {run_dir} is in neither the run directory nor the corpus cache "
                              f"{cache}: set NL_DATA_DIR (or data.data_dir) as for training, or copy the "
                              f"tokenizer.json of the training run into {run_dir}")
    raise CheckpointError(f"no tokenizer for {ck}: put the training run's tokenizer.json beside it")


def held_out_documents(model, data_dir: str | None) -> tuple[str, list[tuple[str, str]]]:
    """The validation split of the run's own corpus, as train.py split it."""
    run_dir = model.run_info.run_dir
    if run_dir is None or not os.path.exists(os.path.join(run_dir, "config.json")):
        raise CheckpointError("this checkpoint has no run directory with config.json, so its corpus is unknown: "
                              "pass local text instead (--data / --haystack)")
    with open(os.path.join(run_dir, "config.json")) as f:
        data_cfg = json.load(f)["data"]
    _, val = split_documents(read_corpus(data_cfg, data_dir or data_dir_of(data_cfg)))
    return f"{data_cfg['source']}-validation", val
