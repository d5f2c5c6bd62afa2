"""The result file of every evaluation, and the command-line flags all evaluation scripts
share (the run, the output folder, the seed, test-time memorisation).

Schema "nested_learning.eval/1" (one JSON object, written atomically):

    schema     "nested_learning.eval/1"
    evaluation the script's name ("zeroshot", "perplexity", ...)
    run        {run_dir, checkpoint, step, model, size} of the evaluated model
    command    the command line;   versions {nested_learning, torch, python, ...};   seed
    created    UTC time, ISO 8601
    memorize   null, or {settings: {steps, lr, surprise_threshold, levels}, updates: {"layer L
               level K": n, ...} (chunk updates that changed a sequence's fast weights),
               updates_applied (their sum), surprise: {tokens, passed, min, max, mean} (token
               teach signals seen by the update rule, one per token, level and layer: how many
               passed the threshold, the range and mean of their norms), reread (with
               steps > 1, else null: {segments, loss_before, loss_after, change}: the memorised
               tokens' summed loss before memorising them and re-read at the last step, and
               after / before - 1: whether the update stores what it is given)}
    warnings   list of strings (for example: no memorisation update fired)
    tasks      {name: {metrics: {metric: {value, stderr}}, n_items, chance (or null),
               baseline_delta: {metric: memorised - baseline} (memorised runs only),
               extra: {...}, records: [per-item records]}}
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import warnings

import torch

from ..models.streaming import Memorize, MemorizeTally

SCHEMA = "nested_learning.eval/1"


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--run", required=True, help="a run directory of train.py, or one of its checkpoints")
    ap.add_argument("--step", type=int, default=None, help="the run's checkpoint at this step (default: latest)")
    ap.add_argument("--out", required=True, help="folder for the result JSON (and plots)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_memorize_args(ap)


def add_memorize_args(ap: argparse.ArgumentParser) -> None:
    """--memorize and its settings (memorize_settings reads them)."""
    m = ap.add_argument_group("test-time memorisation (model.memorize on each item's context only)")
    m.add_argument("--memorize", action="store_true", help="also run the evaluation with memorisation")
    m.add_argument("--memorize-steps", type=int, default=1)
    m.add_argument("--memory-lr", type=float, default=None, help="CMS learning rate (default: the model's)")
    m.add_argument("--surprise-threshold", type=float, default=0.0,
                   help="tokens whose teach-signal norm is at or below this are not memorised")
    m.add_argument("--memorize-levels", default=None, help="comma-separated CMS levels (default: all)")


def memorize_settings(args) -> Memorize | None:
    if not args.memorize:
        return None
    if args.memorize_steps < 1:
        raise SystemExit(f"--memorize-steps must be >= 1, got {args.memorize_steps}")
    if args.surprise_threshold < 0:
        raise SystemExit(f"--surprise-threshold must be >= 0, got {args.surprise_threshold}")
    levels = None if args.memorize_levels is None else tuple(int(x) for x in args.memorize_levels.split(","))
    return Memorize(args.memorize_steps, args.memory_lr, args.surprise_threshold, levels)


def summarise_memorisation(settings: Memorize, tally: MemorizeTally) -> tuple[dict, list[str]]:
    """The `memorize` block of a result file from the evaluation's memorisation tally, and the
    warnings it calls for (no update fired: the threshold, with the surprise range seen)."""
    block = {"settings": settings.as_dict(), "updates": dict(sorted(tally.updates.items())),
             "updates_applied": sum(tally.updates.values()),
             "surprise": {"tokens": tally.tokens, "passed": tally.passed,
                          "min": tally.lo if tally.tokens else None, "max": tally.hi if tally.tokens else None,
                          "mean": tally.mean_sum / tally.mean_n if tally.mean_n else None},
             "reread": {"segments": tally.loss_reports, "loss_before": tally.loss_before,
                        "loss_after": tally.loss_after,
                        "change": tally.loss_after / tally.loss_before - 1 if tally.loss_before else None}
             if tally.loss_reports else None}
    notes = []
    if not tally.reports:
        notes.append("memorisation changed nothing: this model has no CMS levels (its memories learn in the "
                     "forward pass), so the memorised run equals the baseline")
    elif not block["updates_applied"]:
        rng = f"[{tally.lo:.4g}, {tally.hi:.4g}]" if tally.tokens else "(no token had a signal)"
        notes.append(f"no memorisation update fired: surprise threshold {settings.surprise_threshold} vs "
                     f"observed teach-signal norms {rng} over {tally.tokens} tokens")
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return block, notes


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports."""
    n = len(values)
    if n == 0:
        return math.nan, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("nested-learning", "triton", "lm-eval", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def result(evaluation: str, model, seed: int, tasks: dict, memorize: dict | None = None,
           notes: list[str] | None = None) -> dict:
    info = getattr(model, "run_info", None)
    return {"schema": SCHEMA, "evaluation": evaluation, "run": info.as_dict() if info else None,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "versions": versions(), "seed": seed,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "memorize": memorize, "warnings": notes or [], "tasks": tasks}


def add_deltas(memorised: dict, baseline: dict) -> None:
    """baseline_delta of every task metric: memorised value - baseline value."""
    for name, task in memorised["tasks"].items():
        base = baseline["tasks"][name]["metrics"]
        task["baseline_delta"] = {m: v["value"] - base[m]["value"] for m, v in task["metrics"].items()
                                  if m in base and v["value"] is not None and base[m]["value"] is not None}


def write(obj: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)
    return path


def _finite(x):
    """NaN and infinities become null (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def baseline_and_memorised(name: str, model, args, evaluate) -> dict[str, dict]:
    """Run `evaluate(memorize, reports) -> {task: block}` as the baseline (memorize=None) and,
    with --memorize, again with memorisation, both from fresh states; write DIR/<name>.json
    and DIR/<name>_memorize.json (with the deltas); return {label: result}. A model without
    CMS levels has nothing to memorise: its memorised file repeats the baseline's numbers
    (deltas 0) with a warning that says why, without running the evaluation twice."""
    settings = memorize_settings(args)
    out: dict[str, dict] = {}
    for label, setting in [(name, None)] + ([(f"{name}_memorize", settings)] if settings else []):
        reports = MemorizeTally()
        torch.manual_seed(args.seed)
        if setting is not None and not model.has_cms():  # nothing to memorise: the same numbers
            blocks = copy.deepcopy(out[name]["tasks"])
        else:
            blocks = evaluate(setting, reports)
        memo, notes = summarise_memorisation(setting, reports) if setting else (None, [])
        res = result(label, model, args.seed, blocks, memo, notes)
        if setting:
            add_deltas(res, out[name])
        out[label] = res
        write(res, os.path.join(args.out, f"{label}.json"))
    return out


def progress_bar(total: int, desc: str, unit: str, off: bool):
    if off:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


# ---------------------------------------------------------------------------- partial results
def load_partial(path: str | None, key: dict) -> dict | None:
    """What a killed evaluation kept in `path` (save_partial), when it was made with the same
    `key` (checkpoint, data, settings); else None: the evaluation starts afresh."""
    if path is None or not os.path.exists(path):
        return None
    saved = torch.load(path, weights_only=False)
    return {k: v for k, v in saved.items() if k != "key"} if saved.get("key") == key else None


def save_partial(path: str | None, key: dict, payload: dict) -> None:
    """Keep an evaluation's finished part in `path`, atomically (a kill leaves the previous one)."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"key": key, **payload}, path + ".tmp")
    os.replace(path + ".tmp", path)

