"""Checkpoints, written atomically: model and optimizer (one safetensors file each, or
torch.distributed.checkpoint shards: see checkpointer.py for the two formats), fast state (per
rank), RNG states and data position. A checkpoint is a directory step_XXXXXXXX/ that appears only
once complete (written under a temporary name, then renamed); `latest` names the newest.

Every file's SHA-256 is recorded in checksums.json (written last, before the rename) and
verified on load: a flipped byte, a truncated file or a missing one is a CheckpointError that
names the file, and `resume_point` falls back to the newest checkpoint that verifies."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch
from torch import Tensor

from ..models.state import ModelState, map_structure


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupted, or made for another model or run layout."""


# ----------------------------------------------------------------------- nested leaves
def _leaves(obj) -> list:
    out: list = []

    def take(x):
        if not (isinstance(x, Tensor) or x is None or isinstance(x, (bool, int, float))):
            raise TypeError(f"cannot checkpoint a {type(x).__name__}")
        out.append(x)
        return x

    map_structure(take, obj)
    return out


def flatten(obj) -> tuple[dict[str, Tensor], list]:
    leaves = _leaves(obj)
    tensors = {f"t{i}": t.detach().contiguous().cpu() for i, t in enumerate(leaves) if isinstance(t, Tensor)}
    skeleton = [("T" if isinstance(t, Tensor) else t) for t in leaves]
    return tensors, skeleton


def unflatten(template, tensors: dict[str, Tensor], skeleton: list, device) -> object:
    leaves = _leaves(template)
    if len(leaves) != len(skeleton) or any((x == "T") != isinstance(t, Tensor) for x, t in zip(skeleton, leaves)):
        raise CheckpointError("the saved fast state does not match this model's state layout")
    vals = [tensors[f"t{i}"].to(device) if s == "T" else s for i, s in enumerate(skeleton)]
    it = iter(vals)
    return map_structure(lambda _: next(it), template)


# ----------------------------------------------------------------------- files
def _save_tensors(tensors: dict[str, Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path)


def _load_tensors(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types)
        raise CheckpointError(f"checkpoint file is corrupted or unreadable: {path} ({err})") from err


def _write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint file missing: {path}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint file is corrupted: {path} ({err})") from err


def rng_state() -> tuple[dict[str, Tensor], dict]:
    t = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"cuda{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    return t, {"python": [py[0], list(py[1]), py[2]],
               "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(t: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(t["torch"])
    if torch.cuda.is_available():
        states = [t[k] for k in sorted(k for k in t if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


def _optimizer_flat(sd: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, meta = {}, {}
    for name, osd in sd.items():
        state = {}
        for pid, st in osd["state"].items():
            state[str(pid)] = {}
            for k, v in st.items():
                if isinstance(v, Tensor):
                    tensors[f"{name}.{pid}.{k}"] = v.detach().contiguous().cpu()
                    state[str(pid)][k] = "T"
                else:
                    state[str(pid)][k] = v
        meta[name] = {"state": state, "param_groups": osd["param_groups"]}
    return tensors, meta


def _optimizer_unflat(tensors: dict[str, Tensor], meta: dict) -> dict:
    out = {}
    for name, m in meta.items():
        state = {}
        for pid, st in m["state"].items():
            state[int(pid)] = {k: (tensors[f"{name}.{pid}.{k}"] if v == "T" else v) for k, v in st.items()}
        out[name] = {"state": state, "param_groups": m["param_groups"]}
    return out


# ----------------------------------------------------------------------- checksums
CHECKSUMS = "checksums.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def file_sha256(path: str) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# the files a rank writes itself (its fast state, RNG and data position; its DCP shards); the
# rest (model and optimizer files, DCP's .metadata, meta.json) belong to rank 0
_RANK_FILE = re.compile(r"^(?:fast_rank|rng_rank|rank)(\d+)\.|^__(\d+)_\d+\.distcp$")


def owner(name: str) -> int:
    """The rank that wrote a checkpoint file (0 for the shared ones)."""
    m = _RANK_FILE.match(name)
    return int(m.group(1) or m.group(2)) if m else 0


def _sums(directory: str, files) -> dict:
    return {f: {"sha256": file_sha256(os.path.join(directory, f)), "bytes": os.path.getsize(os.path.join(directory, f))}
            for f in files}


def _listing(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f != CHECKSUMS and not f.endswith(".tmp"))


def write_checksums(directory: str, gathered: dict | None = None) -> None:
    """SHA-256 and size of every file of a checkpoint directory into checksums.json: the files
    in `gathered` (hashed by the ranks that wrote them) as given, the rest hashed here."""
    gathered = gathered or {}
    sums = {**_sums(directory, [f for f in _listing(directory) if f not in gathered]), **gathered}
    _write_json(dict(sorted(sums.items())), os.path.join(directory, CHECKSUMS))


def verify(path: str, part: tuple[int, int] | None = None) -> None:
    """Raise CheckpointError naming the first file of checkpoint `path` that is missing,
    truncated or altered since it was written (or the checkpoint's lack of checksums.json).
    part=(rank, world): check only this rank's share (the files written by ranks k with
    k % world == rank; rank 0 also the shared ones), so the ranks of a run verify a checkpoint
    together, each reading 1/world of it."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    listing = os.path.join(path, CHECKSUMS)
    if not os.path.exists(listing):
        raise CheckpointError(f"checkpoint {path} has no {CHECKSUMS}: it is incomplete, or was written before "
                              "checksums were recorded, and cannot be verified")
    for name, want in sorted(_read_json(listing).items()):
        if part is not None and name != "meta.json" and owner(name) % part[1] != part[0]:
            continue
        f = os.path.join(path, name)
        if not os.path.exists(f):
            raise CheckpointError(f"checkpoint file missing: {f}")
        size = os.path.getsize(f)
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint file is truncated or altered: {f} has {size} bytes, "
                                  f"{want['bytes']} were written")
        if file_sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint file is corrupted: {f} does not match the SHA-256 recorded "
                                  "when it was written")


# ----------------------------------------------------------------------- save / load
def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step_{step:08d}")


def step_dirs(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint directory of a run, newest first (temporary ones,
    left by a crash mid-save, are not checkpoints)."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return sorted(found, reverse=True)


DAMAGED = "damaged"  # checkpoints/damaged/: where damaged checkpoints are moved, out of every count


def set_aside(path: str) -> str:
    """Move a damaged checkpoint to checkpoints/damaged/ (kept for inspection, never resumed
    from and never counted by retention); returns its new path."""
    root = os.path.join(os.path.dirname(path), DAMAGED)
    os.makedirs(root, exist_ok=True)
    dest, n = os.path.join(root, os.path.basename(path)), 1
    while os.path.exists(dest):
        dest, n = os.path.join(root, f"{os.path.basename(path)}.{n}"), n + 1
    os.replace(path, dest)
    return dest


FAST_FILE = re.compile(r"^fast_rank\d+\.safetensors$")


def drop_fast_state(path: str) -> int:
    """Delete a checkpoint's per-rank fast state (most of a small model's checkpoint) and its
    entries in checksums.json, so the checkpoint still verifies; resuming from it starts every
    row's fast state afresh (rank_files returns fast=None). Returns the bytes freed."""
    listing = os.path.join(path, CHECKSUMS)
    sums = _read_json(listing) or {}
    gone = [f for f in os.listdir(path) if FAST_FILE.match(f)]
    if not gone:
        return 0
    freed = sum(os.path.getsize(os.path.join(path, f)) for f in gone)
    _write_json({k: v for k, v in sums.items() if not FAST_FILE.match(k)}, listing)  # first: never a listed file missing
    for f in gone:
        os.remove(os.path.join(path, f))
    return freed


def prune(out_dir: str, keep_last: int | None, trusted: set[str] | None = None,
          warn=print) -> list[str]:
    """Keep the newest keep_last checkpoints that verify (None or 0: keep all) and delete the
    older ones; a damaged one met on the way is moved aside (set_aside), never counted as kept.
    Paths in `trusted` (written or verified by this process) are not hashed again; the ones
    verified here are added to it. Returns the deleted paths."""
    if not keep_last:
        return []
    trusted = set() if trusted is None else trusted
    kept, gone = 0, []
    for _, path in step_dirs(out_dir):
        if kept >= keep_last:
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
            continue
        if path not in trusted:
            try:
                verify(path)
            except CheckpointError as err:
                warn(f"warning: checkpoint {path} is damaged ({err}); moved to {set_aside(path)}, not counted "
                     f"as one of the {keep_last} kept")
                continue
            trusted.add(path)
        kept += 1
    return gone


def resume_point(out_dir: str, warn=print, part: tuple[int, int] | None = None,
                 gather=lambda obj: [obj]) -> str | None:
    """The newest checkpoint of a run that verifies, or None when the run has none. A newer
    damaged one is skipped with a warning naming it, the reason and the one used instead, and
    moved to checkpoints/damaged/ (by rank 0; set_aside), so retention never counts it; when
    every checkpoint is damaged, CheckpointError lists them and nothing is moved. In a
    multi-rank run each rank verifies its share (`part`) and `gather` (every rank's value, on
    every rank) makes them agree on the verdict, so all pick the same checkpoint."""
    damaged = []
    for _, path in step_dirs(out_dir):
        why = None
        try:
            verify(path, part)
        except CheckpointError as err:
            why = str(err)
        why = next((w for w in gather(why) if w is not None), None)
        if why is not None:
            damaged.append((path, why))
            continue
        for bad, why in damaged:
            moved = set_aside(bad) if part is None or part[0] == 0 else os.path.join(
                os.path.dirname(bad), DAMAGED, os.path.basename(bad))
            warn(f"warning: skipping damaged checkpoint {bad} ({why}); resuming from {path} instead "
                 f"(the damaged one is moved to {moved})")
        return path
    if damaged:
        raise CheckpointError("every checkpoint of this run is damaged:\n" + "\n".join(f"  {p}: {w}" for p, w in damaged)
                              + "\nset train.resume=false with train.overwrite=true to start again")
    return None


def save(out_dir: str, step: int, run_meta: dict, fast_states: list[ModelState], data_pos: dict,
         write_slow, rank: int = 0, barrier=lambda: None, gather=lambda obj: [obj]) -> str:
    """Every rank writes its fast state, RNG and data position, and calls write_slow(tmp_dir)
    (a format's model and optimizer writer: rank 0 alone for the single-file format, every rank
    for DCP); rank 0 then writes meta.json and checksums.json and renames the directory into
    place. A process that dies before the rename leaves only step_X.tmp/, which no resume reads."""
    final = checkpoint_dir(out_dir, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    fast_t, skeleton = flatten(fast_states)
    rng_t, rng_meta = rng_state()
    _save_tensors(fast_t, os.path.join(tmp, f"fast_rank{rank}.safetensors"))
    _save_tensors(rng_t, os.path.join(tmp, f"rng_rank{rank}.safetensors"))
    _write_json({"skeleton": skeleton, "rng": rng_meta, "data": data_pos}, os.path.join(tmp, f"rank{rank}.json"))
    write_slow(tmp)
    barrier()
    # each rank hashes what it wrote; rank 0 gathers them (one rank never reads the whole checkpoint)
    mine = _sums(tmp, [f for f in _listing(tmp) if owner(f) == rank and not (rank == 0 and f == "meta.json")])
    parts = gather(mine)
    if rank == 0:
        _write_json({**run_meta, "step": step}, os.path.join(tmp, "meta.json"))
        write_checksums(tmp, {k: v for p in parts for k, v in p.items()})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_json({"latest": os.path.basename(final)}, os.path.join(out_dir, "checkpoints", "latest.json"))
    barrier()
    return final


def write_single_file(tmp: str, model_sd: dict, optim_sd: dict) -> None:
    """The single-file format's slow part: model.safetensors, optim.safetensors + optim.json."""
    _save_tensors({k: v.detach().contiguous().cpu() for k, v in model_sd.items()}, os.path.join(tmp, "model.safetensors"))
    opt_t, opt_meta = _optimizer_flat(optim_sd)
    _save_tensors(opt_t, os.path.join(tmp, "optim.safetensors"))
    _write_json(opt_meta, os.path.join(tmp, "optim.json"))


def read_single_file(path: str) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) of a single-file checkpoint."""
    return (_load_tensors(os.path.join(path, "model.safetensors")),
            _optimizer_unflat(_load_tensors(os.path.join(path, "optim.safetensors")),
                              _read_json(os.path.join(path, "optim.json"))))


def latest(out_dir: str) -> str | None:
    path = os.path.join(out_dir, "checkpoints", "latest.json")
    if not os.path.exists(path):
        return None
    return os.path.join(out_dir, "checkpoints", _read_json(path)["latest"])


def meta_of(path: str) -> dict:
    return _read_json(os.path.join(path, "meta.json"))


def check_meta(path: str, meta: dict, run_meta: dict) -> None:
    """The checkpoint was made for the same model, config, layout, optimizer, tokenizer and corpus."""
    diffs = {k: (meta.get(k), v) for k, v in run_meta.items() if meta.get(k) != v}
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {_short(a)} vs now {_short(b)}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"checkpoint {path} was made for another model, run layout, optimizer or corpus: "
                              f"{detail}. Resume with the settings it was made with, or start a new run "
                              "(another train.out_dir, or train.resume=false train.overwrite=true)")


def rank_files(path: str, rank: int) -> dict:
    """A rank's own part of a checkpoint: fast state (tensors, skeleton), RNG, data position."""
    mine = _read_json(os.path.join(path, f"rank{rank}.json"))
    fast = os.path.join(path, f"fast_rank{rank}.safetensors")
    return {"fast": (_load_tensors(fast), mine["skeleton"]) if os.path.exists(fast) else None,  # None: dropped
            "rng": (_load_tensors(os.path.join(path, f"rng_rank{rank}.safetensors")), mine["rng"]),
            "data": mine["data"]}


def saved_world(path: str) -> int:
    """How many ranks wrote the checkpoint (one rank{r}.json each)."""
    return sum(1 for f in os.listdir(path) if re.fullmatch(r"rank\d+\.json", f))


def data_positions(path: str) -> dict[int, dict]:
    """Every saved row's data position by global row id: {row: {"epoch", "index", "offset"}},
    the rows being read and the dormant ones (dropped by a curriculum stage or a smaller world,
    kept so that they continue where they were if they come back)."""
    rows = {}
    for r in range(saved_world(path)):
        pos = _read_json(os.path.join(path, f"rank{r}.json"))["data"]
        rows.update({int(k): v for k, v in pos.get("dormant", {}).items()})
        ids = pos.get("rows") or [r * len(pos["epoch"]) + b for b in range(len(pos["epoch"]))]
        for b, row in enumerate(ids):
            rows[row] = {k: pos[k][b] for k in ("epoch", "index", "offset")}
    return rows


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 300 else r[:300] + "..."
