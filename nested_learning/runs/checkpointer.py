"""Two checkpoint formats behind one interface (`Checkpointer.save` / `Checkpointer.restore`).

- `single`: the slow weights and the optimizer state as one safetensors file each, gathered
  on rank 0 (one process and DDP runs).
- `dcp`: torch.distributed.checkpoint shards of the model and optimizer state dicts
  (`torch.distributed.checkpoint.state_dict`), every rank writing its own shards in parallel;
  no rank ever holds the whole model (FSDP runs). DCP reshards on load: a checkpoint written
  by N ranks loads into M.

Both share the rest of a checkpoint (checkpoint.py): per-rank fast state, RNG and data
position, meta.json, checksums, the atomic rename, keep_last. What a world-size change does
(dcp only; the single format refuses it):
- slow weights and optimizer state: resharded exactly;
- data position (also when train.batch_size changes): kept per global row (row r of the old
  run continues where it was in row r's document order, dormant rows included); rows that
  never existed start their order at the beginning; rows the new layout does not read are
  kept (rank 0) as dormant rows;
- fast state: not carried (it is per sequence and rank-local); every row starts from a fresh
  fast state, as at a context boundary;
- RNG: rank r takes the saved rank r's state, or rank 0's when there was no rank r."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch.nn as nn

from ..distributed import DistInfo
from . import checkpoint
from .checkpoint import CheckpointError

__all__ = ["Checkpointer", "Restored", "format_for"]

# run_meta keys that may differ when a dcp checkpoint is loaded by another layout of ranks and rows
_LAYOUT = ("world", "batch_size")


def format_for(requested: str, fsdp: bool, world: int) -> str:
    if requested == "auto":  # an FSDP run keeps the format on any world size (so 2 -> 1 -> 2 reshards)
        return "dcp" if fsdp else "single"
    if requested == "single" and fsdp and world > 1:
        raise ValueError("train.checkpoint_format=single cannot save an FSDP run (no rank holds the whole model "
                         "and optimizer state): use dcp or auto")
    return requested


@dataclass
class Restored:
    step: int
    fast: tuple | None  # (tensors, skeleton), or None: start from fresh fast states
    data: dict          # this rank's data position
    config: dict | None
    notes: list[str]    # what changed on the way (world size), for the console
    tokens_seen: int | None = None  # the training tokens before this checkpoint (None: not recorded)


class Checkpointer:
    def __init__(self, out_dir: str, fmt: str, info: DistInfo):
        if fmt not in ("single", "dcp"):
            raise ValueError(f"checkpoint format must be 'single' or 'dcp', got {fmt!r}")
        self.out_dir, self.fmt, self.info = out_dir, fmt, info

    # ----- save
    def save(self, step: int, run_meta: dict, model: nn.Module, opt, fast_states, data_pos: dict) -> str:
        info = self.info
        if self.fmt == "dcp":
            import torch.distributed.checkpoint as dcp

            sd = _dcp_state(model, opt)

            def write(tmp):
                dcp.save(sd, checkpoint_id=tmp)
        else:
            model_sd = _full_model_state(model, info)
            optim_sd = opt.state_dict() if info.main else None

            def write(tmp):
                if info.main:
                    checkpoint.write_single_file(tmp, model_sd, optim_sd)
        return checkpoint.save(self.out_dir, step, {**run_meta, "format": self.fmt}, fast_states, data_pos,
                               write, info.rank, info.barrier, info.gather)

    # ----- restore
    def restore(self, path: str, run_meta: dict, model: nn.Module, opt) -> Restored:
        """Load the slow weights and optimizer state into model and opt (in place), set this
        rank's RNG, and return the rest."""
        info = self.info
        meta = checkpoint.meta_of(path)
        saved_fmt = meta.get("format", "single")
        if saved_fmt != self.fmt:
            raise CheckpointError(f"checkpoint {path} is in the {saved_fmt!r} format and this run writes {self.fmt!r} "
                                  f"(train.checkpoint_format, train.fsdp): resume with the settings it was made with")
        strict = {k: v for k, v in run_meta.items() if not (self.fmt == "dcp" and k in _LAYOUT)}
        checkpoint.check_meta(path, meta, strict)
        if self.fmt == "dcp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            flat = _flat_options()
            sd = _dcp_state(model, opt)
            with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(sd, checkpoint_id=path)
            set_model_state_dict(model, sd["model"])
            for name, o in _optimizers(opt).items():
                set_optimizer_state_dict(model, o, sd[f"optim.{name}"], options=flat)
        else:
            model_sd, optim_sd = checkpoint.read_single_file(path)
            model.load_state_dict(model_sd)
            try:
                opt.load_state_dict(optim_sd)
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{path}: the optimizer state does not fit this optimizer ({err})") from err
        old_world = meta.get("world", info.world)
        notes = []
        if old_world == info.world and meta.get("batch_size") == run_meta.get("batch_size"):
            mine = checkpoint.rank_files(path, info.rank)
            fast, data = mine["fast"], mine["data"]
            checkpoint.set_rng_state(*mine["rng"])
            if fast is None:
                notes.append("this checkpoint's fast state was dropped (train.keep_fast_state=newest, and it was not "
                             "the newest): every row starts a fresh context at the saved data position, so the loss "
                             "trace differs from an uninterrupted run's until the rows' next document")
        else:
            notes.append(f"the checkpoint was written by {old_world} ranks and this run has {info.world} "
                         f"(batch_size {meta.get('batch_size')} -> {run_meta.get('batch_size')}): slow weights and "
                         "optimizer state resharded; fast states start fresh; data positions kept per global row")
            rng_rank = info.rank if info.rank < old_world else 0
            checkpoint.set_rng_state(*checkpoint.rank_files(path, rng_rank)["rng"])
            fast, data = None, {"by_row": checkpoint.data_positions(path)}
        return Restored(meta["step"], fast, data, meta.get("config"), notes, meta.get("tokens_seen"))


def _flat_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _optimizers(opt) -> dict:
    """The named torch optimizers of an OptimizerGroup (or one optimizer)."""
    return dict(opt.optimizers) if hasattr(opt, "optimizers") else {"optim": opt}


def _dcp_state(model: nn.Module, opt) -> dict:
    """The DCP state dict: the model's and each optimizer's, keyed by parameter names (so any
    sharding, and any split of the parameters into groups, loads it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat = _flat_options()  # optimizer state keyed by parameter name, not group index: any grouping loads it
    sd = {"model": get_model_state_dict(model)}
    for name, o in _optimizers(opt).items():
        sd[f"optim.{name}"] = get_optimizer_state_dict(model, o, options=flat)
    return sd


def _full_model_state(model: nn.Module, info: DistInfo) -> dict:
    """The whole model's state dict on rank 0 (gathered from shards if the model is sharded)."""
    if info.world > 1 and any(hasattr(p, "full_tensor") for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def load_whole_model(path: str, model: nn.Module) -> None:
    """Load a checkpoint's slow weights, of either format, into an unsharded `model` in one
    process (no process group needed): what export and evaluation use."""
    checkpoint.verify(path)
    if checkpoint.meta_of(path).get("format", "single") == "single":
        model.load_state_dict(checkpoint._load_tensors(os.path.join(path, "model.safetensors")))
        return
    import torch.distributed.checkpoint as dcp

    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=path, no_dist=True)  # this process alone, even inside a process group
    model.load_state_dict(sd["model"])
