"""The training loop: two-pass steps (forward + backward give the loss, the outer gradients
and the teach signals; the CMS update pass consumes them), evaluation, metrics, checkpoints
and exact resume. `run(cfg)` takes the resolved config as a plain dict (train.py builds it
with Hydra; tests pass dicts)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import statistics
import time
import warnings

import numpy as np
import torch

from ..eval.stream import validation_loss
from ..models import build_model
from ..ops._checks import positive_int
from . import checkpoint, distributed
from .data import IGNORE, SPECIALS, TOKENIZER_FILE, DocumentStreams, data_dir_of, prepare_corpus
from .metrics import MetricsLog
from .optim import build_optimizer, lr_factor, set_lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validate(cfg: dict) -> None:
    t = cfg["train"]
    for k in ("steps", "batch_size", "seq_len", "grad_accum"):
        positive_int(f"train.{k}", t.get(k))
    for k in ("eval_every", "save_every", "eval_batches", "warmup"):
        v = t.get(k, 0) if k != "warmup" else cfg["optim"].get("warmup", 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{'optim' if k == 'warmup' else 'train'}.{k} must be a non-negative int, got {v!r}")
    ctx = t.get("context_len")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < t["seq_len"]
                            or ctx % t["seq_len"]):
        raise ValueError(f"train.context_len must be null or a multiple of train.seq_len={t['seq_len']}, got {ctx!r}")
    if not isinstance(t.get("seed"), int):
        raise ValueError(f"train.seed must be an int, got {t.get('seed')!r}")
    if not float(cfg["optim"].get("lr", 0)) > 0:
        raise ValueError(f"optim.lr must be positive, got {cfg['optim'].get('lr')!r}")


def run(cfg: dict) -> dict:
    validate(cfg)
    info = distributed.setup(cfg["train"].get("device", "auto"), cfg["train"].get("dist_backend"))
    try:
        return _run(cfg, info)
    finally:
        distributed.cleanup(info)


def _run(cfg: dict, info) -> dict:
    t, o, d = cfg["train"], cfg["optim"], cfg["data"]
    say = print if info.main else (lambda *a, **k: None)
    out = t["out_dir"]
    os.makedirs(out, exist_ok=True)
    seed_everything(t["seed"])
    data_dir = data_dir_of(d)
    if info.main:
        tok, train_docs, val_docs = prepare_corpus(d, data_dir, log=say)
        tok.save(os.path.join(out, TOKENIZER_FILE))  # the run carries its tokenizer (eval.load_run)
    info.barrier()
    if not info.main:
        tok, train_docs, val_docs = prepare_corpus(d, data_dir, log=lambda *a: None)
    pad_id = tok.token_to_id(SPECIALS[1])

    torch.manual_seed(t["seed"])  # the model init depends on the seed only
    model = build_model(cfg["model"]["name"], cfg["size"]["name"], vocab_size=tok.get_vocab_size(),
                        **(cfg["model"].get("overrides") or {}))
    for name, c in model.chunk_sizes().items():
        if t["seq_len"] % c:
            raise ValueError(f"train.seq_len={t['seq_len']} must be a multiple of {name}={c} "
                             "(document resets fall on segment starts)")
    n_params = model.num_parameters()
    say(f"model: {cfg['model']['name']} size={cfg['size']['name']} | {n_params:,} parameters | "
        f"world {info.world} on {info.device}")
    if t.get("fsdp") and (t.get("save_every") or t.get("resume", True) and checkpoint.latest(out)):
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
                "world": info.world, "batch_size": micro, "grad_accum": accum, "seq_len": t["seq_len"]}
    start = 0
    if t.get("resume", True) and checkpoint.latest(out):
        path = checkpoint.latest(out)
        ck = checkpoint.load(path, run_meta, info.rank)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        states = checkpoint.unflatten(states, *ck["fast"], info.device)
        checkpoint.set_rng_state(*ck["rng"])
        streams.load_state_dict(ck["data"])
        start = ck["step"]
        say(f"resumed from {path} at step {start}")
    if info.main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    metrics = MetricsLog(out, info.main, t.get("wandb"), cfg)
    autocast = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if t.get("bf16") else contextlib.nullcontext
    fwd = wrapped
    if t.get("compile"):
        fwd = torch.compile(wrapped)
    ddp = hasattr(wrapped, "no_sync")
    fsdp = bool(t.get("fsdp")) and info.world > 1
    summary = {"parameters": n_params, "val_loss": [], "tokens_per_s": []}
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a dev nicety, not a requirement
        tqdm = None
    bar = range(start, steps)
    if tqdm is not None and info.main and t.get("progress", True):
        bar = tqdm(bar, initial=start, total=steps, desc="train", dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        set_lr(opt, lr_factor(step, o.get("warmup", 0), steps, o.get("min_lr_ratio", 0.1)))
        tokens, targets, reset = (x.to(info.device) for x in streams.next())
        loss_acc, teach, ups = 0.0, [], {}
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
            if t.get("inner_updates", True):
                st, rep = model.apply_updates(st, cap)
                for e in rep.events:
                    if e.update_norm > 0:
                        ups[f"level{e.level}"] = ups.get(f"level{e.level}", 0) + 1
            states[k] = st.detach()
            del loss, cap, sig  # this micro-batch's activations and signals go before the next forward
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(t.get("clip", 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if info.world > 1:
            lt = torch.tensor([loss_acc], device=info.device)
            torch.distributed.all_reduce(lt)
            loss_acc = float(lt) / info.world
        dt = time.perf_counter() - t0
        tps = micro * accum * t["seq_len"] * info.world / dt
        summary["tokens_per_s"].append(tps)
        rec = {"step": step + 1, "loss": loss_acc, "lr": opt.param_groups[0]["lr"], "tokens_per_s": tps,
               "grad_norm": float(gnorm), "teach_signal_norm": statistics.fmean(teach), "inner_updates": ups}
        last = step + 1 == steps
        if t.get("eval_every") and ((step + 1) % t["eval_every"] == 0 or last):
            rec["val_loss"] = validation_loss(model, val_docs, cfg, info, pad_id)
            summary["val_loss"].append((step + 1, rec["val_loss"]))
            say(f"step {step + 1}: val_loss {rec['val_loss']:.4f}")
        metrics.log(rec)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_acc:.3f}", tok_s=f"{tps:.0f}", updates=sum(ups.values()))
        if t.get("save_every") and ((step + 1) % t["save_every"] == 0 or last):
            model_sd = distributed.full_state_dict(model, wrapped, bool(t.get("fsdp")))
            path = checkpoint.save(out, step + 1, run_meta, model_sd if info.main else None,
                                   opt.state_dict() if info.main else None, states, streams.state_dict(),
                                   info.rank, info.barrier)
            say(f"step {step + 1}: saved {path}")
    metrics.close()
    summary["final_loss"] = loss_acc if steps > start else None
    with torch.no_grad():  # identifies the slow weights (ranks of a DDP run must agree)
        flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
        summary["param_checksum"] = [float(flat.sum()), float(flat.square().sum()), float(flat.abs().max())]
    return summary
