"""Export a run's model as one safetensors file plus its config, whatever format its
checkpoints are in (single-file, or DCP shards written by any number of ranks), so an
FSDP-trained model evaluates like any other: `nested_learning.runs.load_run(EXPORT_DIR)`.

    python scripts/export.py RUN [--step N] [--out DIR]      (train.export=true: at the end of a run)

EXPORT_DIR (default RUN/export) holds model.safetensors, meta.json (the model, its config and
the step), config.json (the training config), tokenizer.json and checksums.json. It is
written under a temporary name and renamed into place."""

from __future__ import annotations

import json
import os
import shutil

from ..data.tokens import TOKENIZER_FILE
from . import checkpoint
from .load import load_run

__all__ = ["export_run"]

_META_KEYS = ("model", "size", "model_config", "tokenizer_sha256", "corpus", "step")


def export_run(run: str, step: int | None = None, out: str | None = None) -> str:
    from safetensors.torch import save_file

    net, _ = load_run(run, step, device="cpu")  # verified, either checkpoint format, read in this process
    ck, run_dir = net.run_info.checkpoint, net.run_info.run_dir
    meta = checkpoint.meta_of(ck)
    out = out or os.path.join(run_dir or os.path.dirname(os.path.dirname(ck)), "export")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()},
              os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**{k: meta[k] for k in _META_KEYS if k in meta}, "format": "single", "exported_from": ck}, f)
    if meta.get("config") is not None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta["config"], f, indent=2)
    for d in (run_dir, ck):
        if d and os.path.exists(os.path.join(d, TOKENIZER_FILE)):
            shutil.copy(os.path.join(d, TOKENIZER_FILE), os.path.join(tmp, TOKENIZER_FILE))
            break
    checkpoint.write_checksums(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
