"""The training loop: two-pass steps (forward + backward give the loss, the outer gradients
and the teach signals; the CMS update pass consumes them), evaluation, metrics, checkpoints
and exact resume. `run(cfg)` takes the resolved config as a plain dict (train.py builds it
with Hydra; tests pass dicts).

Guards: a step whose loss, gradient norm or new fast state is not finite changes nothing (no
optimizer step, no inner update: the pre-step fast state is kept) and is logged as skipped;
train.max_bad_steps in a row stop the run with TrainingDiverged, leaving the last good
checkpoint as the newest."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import time
import warnings

import numpy as np
import torch

from ..checks import NonFiniteInputError
from ..eval.stream import validation_loss
from ..models import build_model
from . import checkpoint, distributed, run_dir
from .config_checks import validate
from .console import Console
from .data import (
    IGNORE,
    SPECIALS,
    TOKENIZER_FILE,
    DocumentStreams,
    corpus_cache_dir,
    data_dir_of,
    prepare_corpus,
)
from .metrics import MetricsLog, read_records, truncate
from .optim import build_optimizer, lr_factor, set_lr

__all__ = ["TrainingDiverged", "run", "seed_everything", "validate"]


class TrainingDiverged(RuntimeError):
    """train.max_bad_steps consecutive steps had a non-finite loss, gradient or fast state."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: dict) -> dict:
    validate(cfg)
    info = distributed.setup(cfg["train"].get("device", "auto"), cfg["train"].get("dist_backend"))
    try:
        return _run(cfg, info)
    finally:
        distributed.cleanup(info)


def _start_point(out: str, t: dict, console: Console, info) -> str | None:
    """The checkpoint to resume from (None: a fresh run). A fresh run into a directory that
    holds a run is refused unless train.overwrite; a resumable run that never saved starts
    again from step 0."""
    path = checkpoint.resume_point(out, console.warn) if t.get("resume", True) else None
    if path is None and run_dir.holds_run(out):
        if not t.get("resume", True) and not t.get("overwrite"):
            raise run_dir.RunExistsError(
                f"{out} already holds a run (checkpoints or metrics.jsonl): resume it with train.resume=true, "
                "start it again with train.overwrite=true (its checkpoints and metrics are deleted), or choose "
                "another train.out_dir")
        info.barrier()  # every rank has looked before rank 0 deletes
        if info.main:
            run_dir.clear(out)
        if t.get("resume", True):
            console.warn(f"{out} holds a run with no checkpoint; starting it again from step 0")
    info.barrier()
    return path


def _corpus(d: dict, t: dict, info, console: Console):
    data_dir = data_dir_of(d)
    if info.main:
        tok, train_docs, val_docs = prepare_corpus(d, data_dir, log=console.say)
    info.barrier()
    if not info.main:
        tok, train_docs, val_docs = prepare_corpus(d, data_dir, log=lambda *a: None)
    need = t["batch_size"] * t["grad_accum"] * info.world * t["seq_len"]
    if train_docs.n_tokens < need:
        raise ValueError(f"the training split has {train_docs.n_tokens:,} tokens, fewer than one batch needs "
                         f"({need:,} = batch_size x grad_accum x world x seq_len): use more text or a smaller batch")
    if t.get("eval_every") and val_docs.n_tokens < 2:
        raise ValueError(f"the validation split has {val_docs.n_tokens} tokens: nothing to validate on")
    fingerprint = {"tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
                   "corpus": {"cache": os.path.basename(corpus_cache_dir(d, data_dir)),
                              "train_tokens": train_docs.n_tokens, "val_tokens": val_docs.n_tokens}}
    return tok, train_docs, val_docs, fingerprint


def _optimizer_settings(opt) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _resume(path, run_meta, cfg, model, opt, states, streams, info, console):
    ck = checkpoint.load(path, run_meta, info.rank, verified=True)
    model.load_state_dict(ck["model"])
    fresh = _optimizer_settings(opt)
    try:
        opt.load_state_dict(ck["optim"])
    except (ValueError, KeyError) as err:
        raise checkpoint.CheckpointError(f"{path}: the optimizer state does not fit this optimizer ({err})") from err
    for g, settings in zip(opt.param_groups, fresh):  # the config's optimizer settings apply from here on
        g.pop("base_lr", None)
        g.update(settings)
    states = checkpoint.unflatten(states, *ck["fast"], info.device)
    checkpoint.set_rng_state(*ck["rng"])
    streams.load_state_dict(ck["data"])
    changes = run_dir.config_changes(ck["config"], cfg)
    console.say(f"resumed from {path} at step {ck['step']}"
                + ("; accepted changes since it was saved: " + "; ".join(changes) if changes else ""))
    return ck["step"], states


def _finite_states(states) -> bool:
    flags = [torch.isfinite(x).all() for s in states for x in s.tensors() if x.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _summary_lines(summary: dict) -> list[str]:
    lines = []
    if summary.get("final_loss") is not None:
        lines.append(f"final training loss {summary['final_loss']:.4f}")
    if summary["val_loss"]:
        lines.append("validation loss by step: " + ", ".join(f"{s}: {v:.4f}" for s, v in summary["val_loss"]))
    return lines


def _run(cfg: dict, info) -> dict:
    t, o, d = cfg["train"], cfg["optim"], cfg["data"]
    out = t["out_dir"]
    os.makedirs(out, exist_ok=True)
    console = Console(out, info.main, t.get("progress", True))
    start_from = _start_point(out, t, console, info)
    seed_everything(t["seed"])
    tok, train_docs, val_docs, fingerprint = _corpus(d, t, info, console)
    if info.main:
        tok.save(os.path.join(out, TOKENIZER_FILE))  # the run carries its tokenizer (eval.load_run)
    pad_id = tok.token_to_id(SPECIALS[1])

    torch.manual_seed(t["seed"])  # the model init depends on the seed only
    model = build_model(cfg["model"]["name"], cfg["size"]["name"], vocab_size=tok.get_vocab_size(),
                        **(cfg["model"].get("overrides") or {}))
    n_params = model.num_parameters()
    console.say(f"model: {cfg['model']['name']} size={cfg['size']['name']} | {n_params:,} parameters | "
                f"world {info.world} on {info.device}")
    if t.get("fsdp") and (t.get("save_every") or start_from):
        raise NotImplementedError("checkpointing an FSDP run (sharded model and optimizer state) is not "
                                  "implemented yet: set train.save_every=0 and train.resume=false with train.fsdp=true")
    model.to(info.device)
    wrapped = distributed.wrap(model, info, bool(t.get("fsdp")))
    opt = build_optimizer(model, o)
    micro, accum, steps = t["batch_size"], t["grad_accum"], t["steps"]
    streams = DocumentStreams(train_docs, micro * accum, t["seq_len"], t["seed"], pad_id, info.rank, info.world,
                              t.get("context_len"))
    states = [model.init_state(micro) for _ in range(accum)]
    run_meta = {"model": cfg["model"]["name"], "size": cfg["size"]["name"],
                "model_config": json.loads(json.dumps(dataclasses.asdict(model.config), default=list)),
                "world": info.world, "batch_size": micro, "grad_accum": accum, "seq_len": t["seq_len"],
                "optimizer": o["name"], **fingerprint}
    start = 0
    if start_from:
        start, states = _resume(start_from, run_meta, cfg, model, opt, states, streams, info, console)
    summary = {"parameters": n_params, "val_loss": [], "tokens_per_s": [], "skipped_steps": []}
    metrics_path = os.path.join(out, "metrics.jsonl")
    if info.main and (dropped := truncate(metrics_path, start)):
        console.say(f"metrics.jsonl cut back to step {start} ({dropped} records of steps after it dropped)")
    if start >= steps:
        recs = read_records(metrics_path)
        summary["final_loss"] = recs[-1].get("loss") if recs else None
        summary["val_loss"] = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        console.say(f"the run is already complete: {start_from} is at step {start} and train.steps={steps}; "
                    "raise train.steps to train further")
        for line in _summary_lines(summary):
            console.say(line)
        return summary
    if info.main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    metrics = MetricsLog(out, info.main, t.get("wandb"), cfg)
    autocast = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if t.get("bf16") else contextlib.nullcontext
    fwd = torch.compile(wrapped) if t.get("compile") else wrapped
    ddp = hasattr(wrapped, "no_sync")
    fsdp = bool(t.get("fsdp")) and info.world > 1
    clip = float(t["clip"]) if t.get("clip") is not None else math.inf
    max_bad, bad_run, loss_acc = int(t.get("max_bad_steps", 3)), 0, None
    for step in console.progress_bar(start, steps):
        t0 = time.perf_counter()
        set_lr(opt, lr_factor(step, o.get("warmup", 0), steps, o.get("min_lr_ratio", 0.1)))
        tokens, targets, reset = (x.to(info.device) for x in streams.next())
        loss_acc, teach, ups, new_states, bad = 0.0, [], {}, list(states), None
        for k in range(accum):
            sl = slice(k * micro, (k + 1) * micro)
            st = states[k]
            fresh = model.init_state(micro) if fsdp else None  # collective under FSDP: every rank
            if reset[sl].any():
                st = model.reset_state(st, reset[sl], fresh)
            sync = wrapped.no_sync() if (ddp and k < accum - 1) else contextlib.nullcontext()
            with sync:
                with autocast():
                    try:
                        loss, cap, st = model.train_forward(tokens[sl], st, targets=targets[sl], module=fwd)
                    except NonFiniteInputError as err:
                        if info.world > 1:  # the other ranks wait in the gradient all-reduce: stop all
                            raise TrainingDiverged(f"step {step + 1}: non-finite values reached an op ({err})") from err
                        bad, loss_acc = f"non-finite values reached an op ({err})", math.nan
                        break
                    except Exception as err:  # noqa: BLE001 (guarded compile: fall back, say why)
                        if fwd is wrapped:
                            raise
                        warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); running eagerly",
                                      stacklevel=1)
                        fwd = wrapped
                        loss, cap, st = model.train_forward(tokens[sl], st, targets=targets[sl], module=fwd)
                cap.scale *= accum
                (loss / accum).backward()
            loss_acc += float(loss.detach()) / accum
            sig = cap.signal(("final",))
            valid = targets[sl] != IGNORE
            teach.append(float(sig.float().norm(dim=-1)[valid].mean()) if valid.any() else 0.0)
            if t.get("inner_updates", True) and math.isfinite(loss_acc):
                st, rep = model.apply_updates(st, cap)
                for e in rep.events:
                    if e.update_norm > 0:
                        ups[f"level{e.level}"] = ups.get(f"level{e.level}", 0) + 1
            new_states[k] = st.detach()
            del loss, cap, sig  # this micro-batch's activations and signals go before the next forward
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) if bad is None else math.nan
        if bad is None and not math.isfinite(loss_acc):
            bad = f"loss {loss_acc}"
        elif bad is None and not math.isfinite(gnorm):
            bad = f"gradient norm {gnorm}"
        elif bad is None and not _finite_states(new_states):
            bad = "the fast state after the inner updates is not finite"
        if info.world > 1:  # every rank takes the same decision, from the mean loss and any rank's flag
            lt = torch.tensor([loss_acc, float(bad is not None)], device=info.device, dtype=torch.float64)
            torch.distributed.all_reduce(lt)
            loss_acc = float(lt[0]) / info.world
            if bad is None and lt[1] > 0:
                bad = "another rank had a non-finite loss, gradient or fast state"
        if bad is None:
            opt.step()
            states, bad_run = new_states, 0
        else:
            bad_run += 1
            summary["skipped_steps"].append(step + 1)
            console.warn(f"step {step + 1} skipped: {bad} (no optimizer step, no inner update; "
                         f"{bad_run} in a row, the run stops at {max_bad})")
        opt.zero_grad(set_to_none=True)
        del new_states
        dt = time.perf_counter() - t0
        tps = micro * accum * t["seq_len"] * info.world / dt
        summary["tokens_per_s"].append(tps)
        rec = {"step": step + 1, "loss": loss_acc, "lr": opt.param_groups[0]["lr"], "tokens_per_s": tps,
               "grad_norm": gnorm, "teach_signal_norm": statistics.fmean(teach) if teach else None,
               "inner_updates": ups}
        if bad is not None:
            rec["skipped"] = bad
        if bad_run >= max_bad:
            metrics.log(rec)
            metrics.close()
            newest = checkpoint.step_dirs(out)
            raise TrainingDiverged(
                f"training diverged: {bad_run} steps in a row (to step {step + 1}) had a non-finite loss, gradient "
                f"or fast state (last: {bad}). The newest checkpoint is "
                f"{newest[0][1] if newest else 'none (no checkpoint was saved)'}; lower optim.lr or raise "
                "train.max_bad_steps")
        last = step + 1 == steps
        if t.get("eval_every") and ((step + 1) % t["eval_every"] == 0 or last):
            rec["val_loss"] = validation_loss(model, val_docs, cfg, info, pad_id)
            summary["val_loss"].append((step + 1, rec["val_loss"]))
            console.say(f"step {step + 1}: val_loss {rec['val_loss']:.4f}")
        metrics.log(rec)
        if console.bar is not None:
            console.bar.set_postfix(loss=f"{loss_acc:.3f}", tok_s=f"{tps:.0f}", updates=sum(ups.values()))
        if t.get("save_every") and ((step + 1) % t["save_every"] == 0 or last) and bad_run == 0:
            model_sd = distributed.full_state_dict(model, wrapped, bool(t.get("fsdp")))
            path = checkpoint.save(out, step + 1, {**run_meta, "config": cfg}, model_sd if info.main else None,
                                   opt.state_dict() if info.main else None, states, streams.state_dict(),
                                   info.rank, info.barrier)
            gone = checkpoint.prune(out, t.get("keep_last")) if info.main else []
            console.say(f"step {step + 1}: saved {path}" + (f" (deleted {len(gone)} older: train.keep_last="
                                                            f"{t.get('keep_last')})" if gone else ""))
    console.close()
    metrics.close()
    summary["final_loss"] = loss_acc
    for line in _summary_lines(summary):
        console.say(line)
    with torch.no_grad():  # identifies the slow weights (ranks of a DDP run must agree)
        flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
        summary["param_checksum"] = [float(flat.sum()), float(flat.square().sum()), float(flat.abs().max())]
    return summary
