"""The trainer: a run as named steps.

    build()       corpus, model, sharding, optimizer, data streams, fast states
    restore()     the newest intact checkpoint, if any (slow weights, optimizer, fast states,
                  RNG, data position)
    train_step()  one optimizer step: the one training step of step.py (forward + backward over
                  the micro-batches, the CMS update pass, clipping, the guards, the optimizer
                  step or a skip) with this run's sharding hooks, then telemetry and the record
    evaluate()    the validation loss
    save()        a checkpoint (single-file or DCP format, checkpointer.py)

`run()` strings them together with the progress bar, metrics.jsonl, the curriculum's stage
changes and the checkpoint cadence (every train.save_every steps and/or
train.save_every_minutes of wall time).

Guards (step.py): a step whose loss, gradient norm or new fast state is not finite changes
nothing (no optimizer step, no inner update: the pre-step fast state is kept) and is logged
as skipped; train.max_bad_steps in a row stop the run with TrainingDiverged, leaving the last
good checkpoint as the newest. With several ranks every rank takes the same decision
(`_agree`), and a non-finite input reaching an op stops the run at once."""

from __future__ import annotations

import contextlib
import copy
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
from ..data.config import DataConfig
from ..data.shards import prepare_corpus
from ..data.sources import corpus_cache_dir, data_dir_of
from ..data.streams import DocumentStreams
from ..data.tokens import SPECIALS, TOKENIZER_FILE
from ..models import build_model
from ..runs import checkpoint, run_dir
from ..runs.checkpointer import Checkpointer, format_for
from ..runs.export import export_run
from . import health, sharding
from .config import OptimConfig, TrainConfig
from .console import Console
from .interrupt import Interrupts, TrainingInterrupted, signal_name
from .metrics import MetricsLog, inner_stats, inner_updates, read_records, truncate
from .mfu import MFUMeter
from .optim import build_optimizer, lr_factor
from .step import TrainStep
from .validation import validation_loss

__all__ = ["Trainer", "TrainingDiverged", "seed_everything"]

_clock = time.monotonic  # the wall clock of train.save_every_minutes (tests replace it)


class TrainingDiverged(RuntimeError):
    """train.max_bad_steps consecutive steps had a non-finite loss, gradient or fast state."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: dict, t: TrainConfig, info):
        self.steps = t.total_steps(info.world)
        cfg = copy.deepcopy(cfg)
        cfg["train"]["steps"] = self.steps  # config.json and checkpoints record the steps a token budget gave
        self.cfg, self.t, self.info = cfg, t, info
        self.o, self.d = OptimConfig.from_dict(cfg["optim"]), DataConfig.from_dict(cfg["data"])  # typed
        self.out = t.out_dir
        os.makedirs(self.out, exist_ok=True)
        self.console = Console(self.out, info.main, t.progress)
        self.step = 0
        self.summary = {"val_loss": [], "tokens_per_s": [], "skipped_steps": [], "grad_norms": [], "clipped_steps": 0,
                        "mfu": []}
        self.bad_run, self.loss = 0, None
        self.tokens_seen = 0   # training tokens consumed (all ranks), carried in checkpoints
        self.dormant: dict[int, dict] = {}  # positions of rows not read now (curriculum, world size)
        self.last_save = _clock()
        self.trusted: set[str] = set()  # checkpoints written or verified here (retention hashes the others)

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        t, info, console = self.t, self.info, self.console
        self.start_from = self._start_point()
        seed_everything(t.seed)
        self.tok, self.train_docs, self.val_docs, fingerprint = self._corpus()
        if info.main:
            self.tok.save(os.path.join(self.out, TOKENIZER_FILE))  # the run carries its tokenizer (runs.load_run)
        self.pad_id = self.tok.token_to_id(SPECIALS[1])
        torch.manual_seed(t.seed)  # the model init depends on the seed only
        self.model = build_model(self.cfg["model"]["name"], self.cfg["size"]["name"],
                                 vocab_size=self.tok.get_vocab_size(), **(self.cfg["model"].get("overrides") or {}))
        self.summary["parameters"] = n = self.model.num_parameters()
        self.summary["non_embedding_parameters"] = ne = self.model.num_parameters(embedding=False)
        console.say(f"model: {self.cfg['model']['name']} size={self.cfg['size']['name']} | {n:,} parameters "
                    f"({ne:,} non-embedding) | world {info.world} on {info.device}")
        self.model.to(info.device)
        # model FLOP utilisation: FLOPs per token from the layers, against this device's GEMM peak
        self.mfu = MFUMeter(self.model, info.device, torch.bfloat16 if t.bf16 else torch.float32, info.world)
        self.summary["gemm_peak_flops"] = self.mfu.peak
        self.sharded = sharding.wrap(self.model, info, t.fsdp, t.bf16)
        self.opt = build_optimizer(self.model, self.o)
        self.checkpointer = Checkpointer(self.out, format_for(t.checkpoint_format, t.fsdp, info.world), info)
        self.streams = DocumentStreams(self.train_docs, t.batch_size * t.grad_accum, t.seq_len, t.seed, self.pad_id,
                                       info.rank, info.world, t.context_len)
        self.stage = 0
        self._enter_stage(0, announce=False)
        self.run_meta = {"model": self.cfg["model"]["name"], "size": self.cfg["size"]["name"],
                         "model_config": json.loads(json.dumps(dataclasses.asdict(self.model.config), default=list)),
                         "world": info.world, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                         "seq_len": t.seq_len, "optimizer": self.o.name, **fingerprint}
        self.autocast = ((lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if t.bf16
                         else contextlib.nullcontext)
        self.probe = health.MixerProbe(self.model) if t.health_every else None
        self.monitor = health.HealthMonitor(console.warn)
        self.fwd = torch.compile(self.sharded.module) if t.compile else self.sharded.module
        self.one_step = self._make_step()

    def _start_point(self) -> str | None:
        """The checkpoint to resume from (None: a fresh run). A fresh run into a directory that
        holds a run is refused unless train.overwrite; a resumable run that never saved starts
        again from step 0."""
        t, info, out = self.t, self.info, self.out
        path = (checkpoint.resume_point(out, self.console.warn, (info.rank, info.world), info.gather)
                if t.resume else None)
        if path is None and run_dir.holds_run(out):
            if not t.resume and not t.overwrite:
                raise run_dir.RunExistsError(
                    f"{out} already holds a run (checkpoints or metrics.jsonl): resume it with train.resume=true, "
                    "start it again with train.overwrite=true (its checkpoints and metrics are deleted), or choose "
                    "another train.out_dir")
            info.barrier()  # every rank has looked before rank 0 deletes
            if info.main:
                run_dir.clear(out)
            if t.resume:
                self.console.warn(f"{out} holds a run with no checkpoint; starting it again from step 0")
        info.barrier()
        return path

    def _corpus(self):
        t, info, d = self.t, self.info, self.d
        data_dir = data_dir_of(d)
        if info.main:
            tok, train_docs, val_docs = prepare_corpus(d, data_dir, log=self.console.say)
        info.barrier()
        if not info.main:
            tok, train_docs, val_docs = prepare_corpus(d, data_dir, log=lambda *a: None)
        need = t.batch_size * t.grad_accum * info.world * t.seq_len
        if train_docs.n_tokens < need:
            raise ValueError(f"the training split has {train_docs.n_tokens:,} tokens, fewer than one batch needs "
                             f"({need:,} = batch_size x grad_accum x world x seq_len): use more text or a smaller batch")
        if t.eval_every and val_docs.n_tokens < 2:
            raise ValueError(f"the validation split has {val_docs.n_tokens} tokens: nothing to validate on")
        fingerprint = {"tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
                       "corpus": {"cache": os.path.basename(corpus_cache_dir(d, data_dir)),
                                  "train_tokens": train_docs.n_tokens, "val_tokens": val_docs.n_tokens}}
        return tok, train_docs, val_docs, fingerprint

    def _enter_stage(self, index: int, announce: bool = True) -> None:
        """Curriculum stage `index`: the micro-batch and seq_len of the stage, fresh fast
        states; the rows kept move to their next document (DocumentStreams.restage)."""
        t = self.t
        _, self.seq_len, self.micro = t.stages()[index]
        if index != self.stage or self.streams.T != self.seq_len:
            self.dormant.update(self.streams.restage(self.micro * t.grad_accum, self.seq_len))
        self.stage = index
        self.states = [self.model.init_state(self.micro) for _ in range(t.grad_accum)]
        self.stage_change = None
        if announce:
            self.stage_change = {"stage": index, "seq_len": self.seq_len, "batch_size": self.micro}
            self.console.say(f"step {self.step + 1}: curriculum stage {index}: seq_len {self.seq_len}, "
                             f"batch_size {self.micro} per micro-batch (fresh fast states; each row moves to its "
                             "next document)")

    # ------------------------------------------------------------------ restore
    def restore(self) -> None:
        if not self.start_from:
            return
        self.trusted.add(self.start_from)  # verified by resume_point: retention need not hash it again
        info, t = self.info, self.t
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        r = self.checkpointer.restore(self.start_from, self.run_meta, self.model, self.opt)
        for g, settings in zip(self.opt.param_groups, fresh):  # the config's optimizer settings apply from here on
            g.pop("base_lr", None)
            g.update(settings)
        self.step = r.step
        stage = self.t.stage_at(max(r.step - 1, 0))[0] if r.step else 0
        if stage != self.stage:
            self._enter_stage(stage, announce=False)
        if r.fast is not None:
            self.states = checkpoint.unflatten(self.states, *r.fast, info.device)
        pos = r.data
        if "by_row" in pos:  # another layout: each global row's position, where it existed
            zero = {"epoch": 0, "index": 0, "offset": 0}
            by_row = pos["by_row"]
            rows = [by_row.get(row, zero) for row in self.streams.rows]
            read = {rk * t.batch_size * t.grad_accum + b for rk in range(info.world) for b in range(len(self.streams.rows))}
            self.dormant = {row: p for row, p in by_row.items() if row not in read} if info.main else {}
            pos = {k: [p[k] for p in rows] for k in zero}
        else:
            self.dormant = {int(k): v for k, v in pos.get("dormant", {}).items()}
        self.streams.load_state_dict({k: v for k, v in pos.items() if k not in ("rows", "dormant")})
        if r.tokens_seen is not None:
            self.tokens_seen = r.tokens_seen
            if t.tokens is not None:  # what is left of the budget, at this world's tokens per step
                self.steps = t.total_steps(info.world, r.step, r.tokens_seen)
                self.cfg["train"]["steps"] = self.steps
        for note in r.notes:
            self.console.say(f"note: {note}")
        changes = run_dir.config_changes(r.config, self.cfg)
        self.console.say(f"resumed from {self.start_from} at step {r.step}"
                         + ("; accepted changes since it was saved: " + "; ".join(changes) if changes else ""))

    # ------------------------------------------------------------------ one step
    def _make_step(self) -> TrainStep:
        """The one training step (step.py) with this run's settings and the sharded wrapper's
        hooks: DDP's no_sync, FSDP's replicated-gradient sync and mixed clipping, and (several
        ranks) one skip decision for all ranks."""
        t, info, sharded = self.t, self.info, self.sharded
        return TrainStep(self.model, self.opt, clip=t.clip, grad_accum=t.grad_accum, inner_updates=t.inner_updates,
                         autocast=self.autocast, forward=self._forward, no_sync=sharded.no_sync,
                         sync=lambda: sharded.sync_replicated_grads(info.world),
                         clip_norm=sharding.clip_mixed if sharded.replicated else None,
                         agree=self._agree if info.world > 1 else None, raise_op_errors=info.world > 1)

    def train_step(self) -> dict:
        """One optimizer step (step.TrainStep on the next batch of the streams, from the carried
        fast states, the learning rate of optim.lr_factor); the guards' bookkeeping and the
        console message of a skipped step; returns its metrics record."""
        t, info, step = self.t, self.info, self.step
        t0 = time.perf_counter()
        factor = lr_factor(step, self.o.warmup, self.steps, self.o.min_lr_ratio)
        ctx = health.context_position(self.streams.pos["offset"], t.context_len)
        watch = bool(t.health_every) and (step + 1) % t.health_every == 0
        if self.probe is not None:
            self.probe.clear()  # only this step's training forwards count
        tokens, targets, reset = (x.to(info.device) for x in self.streams.next())
        groups = [None]  # the pre-clip gradient norms by group (telemetry), read before clipping
        on_grads = (lambda: groups.__setitem__(0, health.grad_norms_by_group(self.model))) if watch else None
        try:
            r = self.one_step(tokens, targets, self.states, reset, lr_factor=factor, on_grads=on_grads)
        except NonFiniteInputError as err:  # from a forward only with several ranks (one rank skips the step)
            if info.world == 1:
                raise
            # the other ranks wait in the gradient all-reduce: stop all
            raise TrainingDiverged(f"step {step + 1}: non-finite values reached an op ({err})") from err
        micro, accum, bad, gnorm, loss_acc = self.micro, t.grad_accum, r.skipped, r.grad_norm, r.loss
        self.states = r.states  # a skipped step returns the pre-step states
        if bad is None:
            self.bad_run = 0
        else:
            self.bad_run += 1
            self.summary["skipped_steps"].append(step + 1)
            self.console.warn(f"step {step + 1} skipped: {bad} (no optimizer step, no inner update; "
                              f"{self.bad_run} in a row, the run stops at {t.max_bad_steps})")
        dt = time.perf_counter() - t0
        self.tokens_seen += micro * accum * self.seq_len * info.world
        tps = micro * accum * self.seq_len * info.world / dt
        self.summary["tokens_per_s"].append(tps)
        flops_s, mfu = self.mfu(tps, self.seq_len)
        self.summary["mfu"].append(mfu)
        self.step, self.loss = step + 1, loss_acc
        rec = {"step": step + 1, "loss": loss_acc, "lr": self.opt.param_groups[0]["lr"], "tokens_per_s": tps,
               "flops_per_s": flops_s, "mfu": mfu,
               "grad_norm": gnorm, "teach_signal_norm": statistics.fmean(r.teach) if r.teach else None,
               "seq_len": self.seq_len, **_inner_record(r.reports)}
        rec["context_pos"] = ctx
        if math.isfinite(gnorm):
            clipped = t.clip is not None and gnorm > t.clip
            self.summary["grad_norms"].append(gnorm)
            self.summary["clipped_steps"] += clipped
            rec["clipped"] = clipped
            rec["clip_frac"] = self.summary["clipped_steps"] / len(self.summary["grad_norms"])
        if watch:
            norms = health.memory_norms(self.model, self.states[0])
            rec["health"] = {"memory": norms, "mixer_rms": self.probe.take() if self.probe else {},
                             "grad_norm_groups": groups[0]}
            if info.main:
                self.monitor.check(step + 1, norms)
        if self.stage_change:
            rec["curriculum_stage"] = self.stage_change
        if bad is not None:
            rec["skipped"] = bad
        return rec

    def _agree(self, loss: float, bad: str | None) -> tuple[float, str | None]:
        """Every rank takes the same decision, from the mean loss and any rank's flag."""
        lt = torch.tensor([loss, float(bad is not None)], device=self.info.device, dtype=torch.float64)
        torch.distributed.all_reduce(lt)
        loss = float(lt[0]) / self.info.world
        if bad is None and lt[1] > 0:
            bad = "another rank had a non-finite loss, gradient or fast state"
        return loss, bad

    def _forward(self, tokens, targets, st):
        try:
            return self.model.train_forward(tokens, st, targets=targets, module=self.fwd)
        except NonFiniteInputError:
            raise
        except Exception as err:  # noqa: BLE001 (guarded compile: fall back, say why)
            if self.fwd is self.sharded.module:
                raise
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); running eagerly", stacklevel=1)
            self.fwd = self.sharded.module
            return self.model.train_forward(tokens, st, targets=targets, module=self.fwd)

    # ------------------------------------------------------------------ evaluate / save
    def evaluate(self):
        """The validation (train.validation.Validation: mean loss, its standard error over the held-out
        streams, tokens, streams) on train.eval_tokens predictions of fixed held-out streams."""
        return validation_loss(self.model, self.val_docs, self.cfg, self.info, self.pad_id,
                               batch=self.micro, seq_len=self.seq_len)

    def save(self) -> str:
        pos = {**self.streams.state_dict(), "rows": list(self.streams.rows),
               "dormant": {str(k): v for k, v in sorted(self.dormant.items())}}
        path = self.checkpointer.save(self.step, {**self.run_meta, "config": self.cfg, "tokens_seen": self.tokens_seen},
                                      self.model, self.opt, self.states, pos)
        self.trusted.add(path)
        gone = checkpoint.prune(self.out, self.t.keep_last, self.trusted, self.console.warn) if self.info.main else []
        if self.t.keep_fast_state == "newest" and self.info.main:
            for _, older in checkpoint.step_dirs(self.out)[1:]:
                checkpoint.drop_fast_state(older)
        self.last_save = _clock()
        self.console.say(f"step {self.step}: saved {path}" + (f" (deleted {len(gone)} older: train.keep_last="
                                                              f"{self.t.keep_last})" if gone else ""))
        return path

    def _save_due(self, last: bool) -> bool:
        t = self.t
        if self.bad_run and not last:  # the last step saves even if it was skipped: it changed nothing
            return False
        by_steps = bool(t.save_every) and (self.step % t.save_every == 0 or last)
        by_time = t.save_every_minutes is not None and (_clock() - self.last_save) >= 60 * t.save_every_minutes
        if t.save_every_minutes is not None and self.info.world > 1:  # the ranks must agree (clocks differ)
            flag = torch.tensor([float(by_time)], device=self.info.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            by_time = bool(flag.item())
        return by_steps or by_time or (last and t.save_every_minutes is not None)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        t, info, console = self.t, self.info, self.console
        self.build()
        self.restore()
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        if info.main and (dropped := truncate(metrics_path, self.step)):
            console.say(f"metrics.jsonl cut back to step {self.step} ({dropped} records of steps after it dropped)")
        if self.step >= self.steps:
            return self._already_complete(metrics_path)
        if info.main:
            with open(os.path.join(self.out, "config.json"), "w") as f:
                json.dump(self.cfg, f, indent=2)
        metrics = MetricsLog(self.out, info.main, self.cfg["train"].get("wandb"), self.cfg)
        self.last_save = _clock()  # corpus preparation and resume are not time since a save
        try:
            with Interrupts() as interrupts:
                self._loop(metrics, interrupts)
        finally:
            console.close()
            metrics.close()
        if t.export and info.main:
            console.say(f"exported the final model to {export_run(self.out)}")
        info.barrier()
        return self._finish()

    def _loop(self, metrics: MetricsLog, interrupts: Interrupts) -> None:
        t, console = self.t, self.console
        for step in console.progress_bar(self.step, self.steps):
            stage = t.stage_at(step)[0]
            if stage != self.stage:
                self._enter_stage(stage)
            rec = self.train_step()
            self.stage_change = None
            if self.bad_run >= t.max_bad_steps:
                metrics.log(rec)
                newest = checkpoint.step_dirs(self.out)
                raise TrainingDiverged(
                    f"training diverged: {self.bad_run} steps in a row (to step {self.step}) had a non-finite "
                    f"loss, gradient or fast state (last: {rec['skipped']}). The newest checkpoint is "
                    f"{newest[0][1] if newest else 'none (no checkpoint was saved)'}; lower optim.lr or raise "
                    "train.max_bad_steps")
            last = self.step == self.steps
            if t.eval_every and (self.step % t.eval_every == 0 or last):
                v = self.evaluate()
                rec.update(val_loss=v.loss, val_loss_se=v.se, val_tokens=v.tokens, val_streams=v.streams)
                self.summary["val_loss"].append((self.step, rec["val_loss"]))
                console.say(f"step {self.step}: val_loss {v.loss:.4f}"
                            + (f" +- {v.se:.4f}" if v.se is not None else "")
                            + f" ({v.tokens:,} tokens, {v.streams} held-out streams)")
            metrics.log(rec)
            if console.bar is not None:
                console.bar.set_postfix(loss=f"{self.loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                        updates=sum(rec["inner_updates"].values()))
            saved = self._save_due(last)
            if saved:
                self.save()
            if (signum := interrupts.pending(self.info)) is not None and not last:  # the last step ends the run anyway
                self._stop(signum, saved)

    def _stop(self, signum: int, saved: bool) -> None:
        """A signal arrived: the step in flight has finished; save it (unless it was just saved,
        or skipped: the newest checkpoint then holds the last good weights) and stop."""
        name = signal_name(signum)
        if self.bad_run:
            newest = checkpoint.step_dirs(self.out)
            msg = (f"interrupted by {name} at step {self.step}, a skipped step, so nothing new is saved (the newest "
                   f"checkpoint is {newest[0][1] if newest else 'none'}); run the same command again to resume")
        else:
            path = checkpoint.checkpoint_dir(self.out, self.step) if saved else self.save()
            msg = f"interrupted by {name} at step {self.step}: saved {path}; run the same command again to resume"
        self.console.say(msg)
        raise TrainingInterrupted(signum, msg)

    def _already_complete(self, metrics_path: str) -> dict:
        recs = read_records(metrics_path)
        self.summary["final_loss"] = recs[-1].get("loss") if recs else None
        self.summary["val_loss"] = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        self.console.say(f"the run is already complete: {self.start_from} is at step {self.step} and "
                         f"train.steps={self.steps}; raise train.steps (or train.tokens) to train further")
        if self.t.export and self.info.main and not os.path.exists(os.path.join(self.out, "export", "meta.json")):
            self.console.say(f"exported the final model to {export_run(self.out)}")
        return self._finish(log_final=False)

    def _finish(self, log_final: bool = True) -> dict:
        if log_final:
            self.summary["final_loss"] = self.loss
        for line in _summary_lines(self.summary):
            self.console.say(line)
        self.summary["param_checksum"] = sharding.checksum(self.model)  # ranks of a DDP run must agree
        return self.summary


def _inner_record(reports: list) -> dict:
    """inner_updates (CMS updates per level this step) and inner_stats (per level: chunks,
    updates, mean update norm; for dgd levels the preconditioner's mean alpha and eta*|x|^2;
    metrics.inner_stats) for metrics.jsonl."""
    stats = inner_stats(reports)
    return {"inner_updates": inner_updates(stats), "inner_stats": stats}


def _summary_lines(summary: dict) -> list[str]:
    lines = []
    if summary.get("final_loss") is not None:
        lines.append(f"final training loss {summary['final_loss']:.4f}")
    g = summary.get("grad_norms")
    if g:
        lines.append(f"gradient norm before clipping: median {statistics.median(g):.3g}, max {max(g):.3g}; "
                     f"clipped on {summary['clipped_steps']} of {len(g)} steps ({summary['clipped_steps'] / len(g):.0%})")
    if summary.get("mfu"):
        lines.append(f"model FLOP utilisation: median {statistics.median(summary['mfu']):.1%} of the measured GEMM peak "
                     f"({summary['gemm_peak_flops'] / 1e9:.0f} GFLOP/s per device; FLOPs per token: docs/FLOPS.md)")
    if summary["val_loss"]:
        lines.append("validation loss by step: " + ", ".join(f"{s}: {v:.4f}" for s, v in summary["val_loss"]))
    return lines
