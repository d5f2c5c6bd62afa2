"""What a finished stage leaves in the campaign's report folder (`reports/<campaign>/<entry>/`,
committed): small files a later session and the report generator read, each traceable to the
run folder it came from and the command that made it.

- train.json: the training run in brief (schema "nested_learning.campaign-train/1"): the
  command, parameters, tokens, seconds, the validation curve (step, tokens, loss, standard
  error), the training loss every `TRAIN_EVERY` steps (mean of those steps), clipping, gradient
  norms, tokens/s and the fast-memory norms of the last logged step.
- <stage>/<name>.json: each evaluation result file (schema nested_learning.eval/1) without its
  per-item `records` (which can be megabytes), with `source: {path, sha256, records}`
  naming the full file in the run folder; plus the stage's PNG plots and markdown tables.
- stages.json: each finished stage's command, seconds and finish time (runner.StageLog).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import statistics

from ..eval.results import write
from ..runs.checkpoint import file_sha256

TRAIN_SCHEMA = "nested_learning.campaign-train/1"
TRAIN_EVERY = 10
COPIED = (".png", ".md")



def _memory_summary(health: dict | None) -> dict | None:
    """{state name: {norm, rel}} averaged over layers, from the last health record."""
    mem = (health or {}).get("memory")
    if not mem:
        return None
    acc: dict[str, list] = {}
    for layer in mem.values():
        for name, v in layer.items():
            acc.setdefault(name, []).append(v)
    return {name: {"norm": statistics.fmean(x["norm"] for x in vs),
                   "rel": statistics.fmean(x["rel"] for x in vs if x.get("rel") is not None)
                   if any(x.get("rel") is not None for x in vs) else None}
            for name, vs in sorted(acc.items())}


def train_summary(run_dir: str, command: list[str], seconds: float, rel=os.path.relpath) -> dict:
    """The brief of a finished training run from its metrics.jsonl and config.json."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    recs = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
    by_step: dict[int, dict] = {}
    for r in recs:  # a resumed run logs the steps after its checkpoint again: the last record wins
        if "step" in r:
            by_step[r["step"]] = r
    steps = [by_step[s] for s in sorted(by_step)]
    if not steps:
        raise ValueError(f"{run_dir}/metrics.jsonl has no step records")
    tr = cfg["train"]
    tokens_per_step = tr["batch_size"] * tr["seq_len"] * tr.get("grad_accum", 1)
    val = [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["val_loss"],
            "se": r.get("val_loss_se")} for r in steps if r.get("val_loss") is not None]
    train_curve = []
    for i in range(0, len(steps), TRAIN_EVERY):
        chunk = [r["loss"] for r in steps[i:i + TRAIN_EVERY] if r.get("loss") is not None]
        if chunk:
            train_curve.append([steps[min(i + TRAIN_EVERY, len(steps)) - 1]["step"], statistics.fmean(chunk)])
    grads = [r["grad_norm"] for r in steps if r.get("grad_norm") is not None]
    last_health = next((r["health"] for r in reversed(steps) if r.get("health")), None)
    params = None
    log = os.path.join(run_dir, "train.log")
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                if " parameters (" in line and "non-embedding" in line:
                    head = line.split("|")[1].strip()
                    params = [int(head.split()[0].replace(",", "")),
                              int(head.split("(")[1].split()[0].replace(",", ""))]
    return {"schema": TRAIN_SCHEMA, "run_dir": rel(run_dir), "command": command, "seconds": seconds,
            "model": cfg["model"]["name"], "model_overrides": cfg["model"].get("overrides") or {},
            "size": cfg["size"]["name"], "seed": tr["seed"], "steps": steps[-1]["step"],
            "tokens": steps[-1]["step"] * tokens_per_step, "tokens_per_step": tokens_per_step,
            "parameters": params[0] if params else None, "non_embedding_parameters": params[1] if params else None,
            "val": val, "final_val_loss": val[-1]["loss"] if val else None,
            "final_val_se": val[-1]["se"] if val else None, "train_loss": train_curve,
            "clipped_fraction": sum(bool(r.get("clipped")) for r in steps) / len(steps),
            "grad_norm_median": statistics.median(grads) if grads else None,
            "grad_norm_max": max(grads) if grads else None,
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steps if r.get("tokens_per_s")),
            # the training steps' own time (no validation, checkpoints or start-up): sum of tokens / tokens/s
            "step_seconds": sum(tokens_per_step / r["tokens_per_s"] for r in steps if r.get("tokens_per_s")),
            "skipped_steps": sum(bool(r.get("skipped")) for r in steps),
            "fast_memory": _memory_summary(last_health),
            "wandb": {k: (tr.get("wandb") or {}).get(k) for k in ("enabled", "mode", "project")}}


def final_losses(reports_dir: str) -> dict[str, float]:
    """{entry: final validation loss} of every entry whose train.json is in reports_dir."""
    out = {}
    for name in sorted(os.listdir(reports_dir)) if os.path.isdir(reports_dir) else []:
        path = os.path.join(reports_dir, name, "train.json")
        if os.path.exists(path):
            with open(path) as f:
                v = json.load(f).get("final_val_loss")
            if v is not None:
                out[name] = v
    return out


def collect_train(run_dir: str, dest: str, command: list[str], seconds: float, rel=os.path.relpath) -> str:
    path = os.path.join(dest, "train.json")
    write(train_summary(run_dir, command, seconds, rel), path)
    return path


def compact_result(src: str, rel=os.path.relpath) -> dict:
    """An evaluation result file without its per-item records, naming the full file."""
    with open(src) as f:
        res = json.load(f)
    dropped = 0
    for task in (res.get("tasks") or {}).values():
        if isinstance(task, dict) and "records" in task:
            dropped += len(task["records"] or [])
            task.pop("records")
    res["source"] = {"path": rel(src), "sha256": file_sha256(src), "records": dropped}
    return res


def collect_eval(out_dir: str, dest: str, rel=os.path.relpath) -> list[str]:
    """The stage's result files (compacted) and plots/tables, copied into dest."""
    written = []
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    for src in sorted(glob.glob(os.path.join(out_dir, "*"))):
        name = os.path.basename(src)
        if not os.path.isfile(src) or name.startswith("."):
            continue
        if name.endswith(".json"):
            try:
                res = compact_result(src, rel)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            write(res, os.path.join(dest, name))
            written.append(os.path.join(dest, name))
        elif name.endswith(COPIED):
            shutil.copyfile(src, os.path.join(dest, name))
            written.append(os.path.join(dest, name))
    if not any(w.endswith(".json") for w in written):
        raise ValueError(f"{out_dir} holds no result file")
    return written
