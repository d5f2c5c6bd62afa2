"""Per-step metrics to JSONL (rank 0), optionally mirrored to Weights & Biases (offline works).

The log holds one record per step of the run's history: a resumed run first cuts it back to
the checkpoint's step (records of steps the checkpoint does not hold are dropped, and a line
half-written at a crash with them), so steps never repeat across resumes.

`inner_stats` summarises a step's CMS update reports (the inner optimizers' statistics)."""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings


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


def inner_stats(reports) -> dict:
    """The CMS inner optimizers' statistics of one step, per level, JSON-ready:

        {"level0": {"chunks": 24, "updates": 24, "update_norm": 0.013,
                    "alpha": 1.0, "eta_x2": 0.001}, ...}

    `reports` are the step's update reports (`model.apply_updates(...)[1]`, one per
    micro-batch; None entries are skipped). A level's entry pools its UpdateEvents over every
    block (layer) and every report: `chunks` is how many completed chunks it has, `updates`
    how many of them changed a weight (update_norm > 0: the count `inner_updates` logs),
    `update_norm` the mean of the events' update_norm (each ||delta W||_F of the level's two
    linear layers, already averaged over the batch) over all `chunks`. dgd levels add
    `alpha` and `eta_x2`, the means over the same events of UpdateEvent.alpha and .eta_x2
    (eta_x2: eta ||k_t||^2 averaged over each chunk's tokens, batch and both linear layers,
    so the plain mean here weighs every chunk equally); other optimizers have neither key.
    Levels without a completed chunk are absent. Keys are in level order."""
    acc: dict[int, dict] = {}
    for rep in reports:
        for e in (rep.events if rep is not None else ()):
            a = acc.setdefault(e.level, {"norm": [], "alpha": [], "eta_x2": []})
            a["norm"].append(e.update_norm)
            if e.alpha is not None:
                a["alpha"].append(e.alpha)
                a["eta_x2"].append(e.eta_x2)
    out = {}
    for lvl in sorted(acc):
        a = acc[lvl]
        rec = {"chunks": len(a["norm"]), "updates": sum(n > 0 for n in a["norm"]),
               "update_norm": statistics.fmean(a["norm"])}
        if a["alpha"]:
            rec["alpha"], rec["eta_x2"] = statistics.fmean(a["alpha"]), statistics.fmean(a["eta_x2"])
        out[f"level{lvl}"] = rec
    return out


def inner_updates(stats: dict) -> dict:
    """{"levelN": updates} from `inner_stats`, levels with at least one update only (the
    record's `inner_updates` as the loop has always logged it)."""
    return {k: v["updates"] for k, v in stats.items() if v["updates"]}


class MetricsLog:
    """metrics.jsonl of `out_dir` (when `enabled`: rank 0), mirrored to W&B when
    `wandb_cfg["enabled"]` (train.wandb: mode offline | online | disabled, project).

    An offline run is written under out_dir/wandb/offline-run-*/ (`wandb sync` uploads it
    later) and nothing leaves the machine: the mode is passed to wandb.init and its Settings,
    and WANDB_MODE and WANDB_ERROR_REPORTING=false are set for the process (wandb 0.31, told
    only mode="offline", still posts its own usage metrics to its server). A failing
    wandb.init is an error naming the cause; a failing wandb.log stops the mirroring with a
    warning (metrics.jsonl goes on), and close() never raises."""

    def __init__(self, out_dir: str, enabled: bool, wandb_cfg: dict | None = None, run_config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.wandb = None
        if enabled and wandb_cfg and wandb_cfg.get("enabled"):
            self.wandb = _wandb_init(out_dir, wandb_cfg, run_config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = _finite_or_none(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(record, step=record.get("step"))
            except Exception as err:  # noqa: BLE001 (the training run must not die of its mirror)
                warnings.warn(f"wandb.log failed ({type(err).__name__}: {err}); W&B logging stops here, "
                              f"metrics.jsonl goes on ({self.path})", stacklevel=2)
                self.close()

    def close(self) -> None:
        """Finish the W&B run (once; errors become a warning)."""
        run, self.wandb = self.wandb, None
        if run is not None:
            try:
                run.finish()
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"wandb finish failed ({type(err).__name__}: {err}); metrics.jsonl is complete "
                              f"({self.path})", stacklevel=2)


def _wandb_init(out_dir: str, cfg: dict, run_config: dict | None):
    mode = cfg.get("mode", "offline")
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"train.wandb.mode must be 'offline', 'online' or 'disabled', got {mode!r}")
    if mode != "online":  # nothing may reach a network: every switch wandb reads, set before
        os.environ["WANDB_MODE"] = mode  # its import (older versions start error reporting there)
        os.environ["WANDB_ERROR_REPORTING"] = "false"
    try:
        import wandb  # type: ignore
    except ImportError as err:
        raise ImportError("train.wandb.enabled=true needs wandb: pip install -e '.[wandb]' "
                          "(or set train.wandb.enabled=false)") from err
    kw = {"settings": wandb.Settings(mode=mode)} if mode != "online" else {}
    try:
        return wandb.init(project=cfg.get("project", "nested_learning"), mode=mode, dir=out_dir,
                          config=run_config, **kw)
    except Exception as err:
        hint = ("log in first (wandb login) or use train.wandb.mode=offline" if mode == "online"
                else f"is {out_dir} writable?")
        raise RuntimeError(f"train.wandb: wandb.init (mode={mode}, project={cfg.get('project', 'nested_learning')!r}) "
                           f"failed: {type(err).__name__}: {err}; {hint}, or set train.wandb.enabled=false") from err
