"""Run a campaign: every entry's stages (train, then each evaluation) that have no finished
record, in order, each as a subprocess; killable at any point and rerun without losing or
repeating work.

- A stage is finished when its record is in `reports/<campaign>/<entry>/stages.json`, written
  after the stage exits 0 and its results are collected into the report folder. A finished
  stage never runs again.
- A killed training run resumes from its newest checkpoint (train.py's own resume); the runner
  forwards SIGINT/SIGTERM to the stage (train.py then saves a checkpoint) and the stage dies
  with the runner even on SIGKILL (Linux: the parent-death signal). Perplexity, NIAH and
  passkey keep their finished items in partial files and resume from them; the other
  evaluations restart the stage.
- A stage that fails (nonzero exit) is recorded in `failed` with its log's tail and the runner
  goes on with the next entry; a rerun tries it again.
- Several runners may work on one campaign at once (one per free core, say): each claims the
  next entry no live runner holds (a lock file with its pid, `runs/campaign-<name>/.locks/`),
  so no entry is ever run by two; a dead runner's claim is taken over.
- When an evaluation needs a run whose folder is gone (a fresh clone, say) while its training
  is recorded as finished, the training runs again first.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from ..eval.results import write
from .collect import collect_eval, collect_train, final_losses
from .spec import STAGES_FIRST, Campaign, Entry


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class StageLog:
    """reports/<campaign>/<entry>/stages.json: {"done": {stage: record}, "failed": {stage: record},
    "interrupted": {stage: {seconds, attempts}} (killed attempts of a stage not finished yet)}. A
    record's seconds are the stage's wall time over all its attempts."""

    def __init__(self, path: str):
        self.path = path
        self.data = {"done": {}, "failed": {}}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def mark(self, stage: str, record: dict, ok: bool) -> None:
        (self.data["done"] if ok else self.data["failed"])[stage] = record
        if ok:
            self.data["failed"].pop(stage, None)
        write(self.data, self.path)

    def interrupted(self, stage: str, seconds: float) -> None:
        """A killed attempt: its seconds count towards the stage's time when it finishes."""
        rec = self.data.setdefault("interrupted", {}).setdefault(stage, {"seconds": 0.0, "attempts": 0})
        rec["seconds"] = round(rec["seconds"] + seconds, 1)
        rec["attempts"] += 1
        write(self.data, self.path)

    def forget(self, stage: str) -> None:
        self.data["done"].pop(stage, None)
        write(self.data, self.path)


class Lock:
    def __init__(self, path: str):
        self.path = path

    def holder(self) -> int | None:
        try:
            with open(self.path) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def try_acquire(self) -> bool:
        """Claim the lock (atomically); False when a live process other than this one holds it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = self.holder()
                if pid == os.getpid():
                    return True
                if pid is not None:
                    return False
                try:  # its holder is dead: take it over
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return True
        return False

    def release(self) -> None:
        if self.holder() == os.getpid():
            os.remove(self.path)


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Runner:
    def __init__(self, campaign: Campaign, log=print):
        self.c = campaign
        self.log = log
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self.locks_dir = os.path.join(campaign.runs_dir, ".locks")
        self.running_dir = os.path.join(campaign.runs_dir, ".running")
        self.failed_now: set[str] = set()  # entries that failed in this invocation (not retried by it)

    # --- state -----------------------------------------------------------------------------

    def stage_log(self, entry: Entry) -> StageLog:
        return StageLog(os.path.join(self.c.reports_dir, entry.name, "stages.json"))

    def entries(self) -> list[Entry]:
        return self.c.entries(final_losses(self.c.reports_dir))

    def lock(self, entry: Entry) -> Lock:
        return Lock(os.path.join(self.locks_dir, f"{entry.name}.lock"))

    def status_path(self, entry: Entry) -> str:
        return os.path.join(self.running_dir, f"{entry.name}.json")

    def running(self) -> dict[str, dict]:
        """{entry: {pid, stage, started_unix, ...}} of the stages live runners are running now."""
        out = {}
        for e in self.entries():
            path = self.status_path(e)
            if os.path.exists(path) and self.lock(e).holder() is not None:
                try:
                    with open(path) as f:
                        out[e.name] = json.load(f)
                except (OSError, ValueError):
                    pass
        return out

    def has_checkpoint(self, entry: Entry) -> bool:
        ck = os.path.join(self.c.run_dir(entry), "checkpoints")
        return os.path.isdir(ck) and any(n.startswith("step_") for n in os.listdir(ck))

    # --- running ---------------------------------------------------------------------------

    def _env(self) -> dict:
        env = dict(os.environ)
        if self.c.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.c.threads)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    def run_stage(self, entry: Entry, stage: str) -> bool:
        cmd = self.c.command(entry, stage)
        logs = os.path.join(self.c.run_dir(entry), "logs")
        os.makedirs(logs, exist_ok=True)
        log_path = os.path.join(logs, f"{stage}.log")
        write({"pid": os.getpid(), "entry": entry.name, "stage": stage, "started": _now(),
                      "started_unix": time.time()}, self.status_path(entry))
        t0 = time.time()
        with open(log_path, "a") as out:
            out.write(f"\n# {_now()} {' '.join(cmd)}\n")
            out.flush()
            self.child = subprocess.Popen(cmd, cwd=self.c.root, env=self._env(), stdout=out,
                                          stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            rc = self.child.wait()
            self.child = None
        seconds = time.time() - t0
        if os.path.exists(self.status_path(entry)):
            os.remove(self.status_path(entry))
        log = self.stage_log(entry)
        if self.stop_signal is not None:
            log.interrupted(stage, seconds)
            raise Stopped(self.stop_signal)
        earlier = log.data.get("interrupted", {}).pop(stage, None)  # attempts that were killed
        if earlier:
            seconds += earlier["seconds"]
        shown = ["python" if a == sys.executable else a for a in cmd]  # the record names no local path
        record = {"command": shown, "seconds": round(seconds, 1), "attempts": 1 + (earlier or {}).get("attempts", 0),
                  "finished": _now(), "returncode": rc,
                  "threads": self.c.threads, "log": self.c.rel(log_path)}
        if rc == 0:
            try:
                self.collect(entry, stage, shown, round(seconds, 1))
            except (OSError, ValueError, KeyError) as err:
                rc, record["error"] = -1, f"collecting the results failed: {err}"
        if rc != 0:
            with open(log_path, errors="replace") as f:
                record["tail"] = f.read()[-2000:]
        log.mark(stage, record, ok=rc == 0)
        return rc == 0

    def collect(self, entry: Entry, stage: str, command: list[str], seconds: float) -> None:
        dest = os.path.join(self.c.reports_dir, entry.name)
        if stage == STAGES_FIRST:
            collect_train(self.c.run_dir(entry), dest, command, seconds, self.c.rel)
        else:
            collect_eval(self.c.stage_out(entry, stage), os.path.join(dest, stage), self.c.rel)

    def forget_entry(self, entry: Entry) -> None:
        """Mark every stage of `entry` not done and remove what was collected from them."""
        log, dest = self.stage_log(entry), os.path.join(self.c.reports_dir, entry.name)
        for stage in self.c.stages:
            log.forget(stage)
            path = os.path.join(dest, "train.json" if stage == STAGES_FIRST else stage)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def recollect(self) -> list[str]:
        """Collect every finished stage again from its run folder (after the collected format
        changed); stages whose run folder is gone keep their files. Returns what was redone."""
        redone = []
        for e in self.entries():
            log = self.stage_log(e)
            for stage, rec in log.data["done"].items():
                src = self.c.run_dir(e) if stage == STAGES_FIRST else self.c.stage_out(e, stage)
                if os.path.isdir(src):
                    self.collect(e, stage, rec["command"], rec["seconds"])
                    redone.append(f"{e.name}/{stage}")
        return redone

    def run(self, only: list[str] | None = None, max_entries: int | None = None) -> int:
        """Run what is left; returns the number of failed stages (0: all finished)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        failures, ran = 0, 0
        held: Lock | None = None
        try:
            self.log(f"campaign {self.c.name}: {self.c.scale}")
            while True:
                todo = [e for e in self.entries() if (only is None or e.name in only)
                        and not all(self.stage_log(e).done(s) for s in self.c.stages)]
                todo = [e for e in todo if e.name not in self.failed_now]
                if not todo or (max_entries is not None and ran >= max_entries):
                    break
                entry = next((e for e in todo if self.lock(e).try_acquire()), None)
                if entry is None:
                    self.log(f"the {len(todo)} entries left are claimed by other runners: this one stops")
                    break
                held = self.lock(entry)
                ran += 1
                failures += self.run_entry(entry)
                held.release()
                held = None
            self.log(render_status(self, header=False))
        except Stopped as s:
            self.log(f"stopped by {s}: rerun the same command to continue where it stopped")
            return 128 + s.signum
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if held is not None:
                held.release()
        return failures

    def run_entry(self, entry: Entry) -> int:
        log = self.stage_log(entry)
        failures = 0
        if log.done(STAGES_FIRST) and not self.has_checkpoint(entry) and not all(log.done(s) for s in self.c.stages):
            # The model trained again is not the one the finished evaluations scored: training is
            # not bit-reproducible across machines (the same seed's final validation loss moved by
            # 0.015 on a new machine, bench/RESULTS.md 21), so every stage runs again on it.
            done = [s for s in self.c.stages if log.done(s) and s != STAGES_FIRST]
            self.log(f"{entry.name}: its run folder is gone and evaluations are left: training again"
                     + (f", and running again the evaluations of the old checkpoint ({', '.join(done)})" if done else ""))
            self.forget_entry(entry)
        for stage in self.c.stages:
            if self.stage_log(entry).done(stage):
                continue
            left = estimate_left(self)
            self.log(f"[{_now()}] {entry.name}: {stage} (about {fmt_minutes(left)} left in the campaign)")
            ok = self.run_stage(entry, stage)
            if not ok:
                failures += 1
                rec = self.stage_log(entry).data["failed"][stage]
                self.log(f"{entry.name}: {stage} FAILED (exit {rec['returncode']}); log {rec['log']}")
                if stage == STAGES_FIRST:
                    break
        if failures:
            self.failed_now.add(entry.name)
        return failures


# --- the progress view -----------------------------------------------------------------------

def fmt_minutes(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def stage_times(runner: Runner) -> dict[tuple[str, str], list[float]]:
    """Measured seconds of each finished (model, stage), and of ("*", stage)."""
    out: dict[tuple[str, str], list[float]] = {}
    for e in runner.entries():
        for stage, rec in runner.stage_log(e).data["done"].items():
            out.setdefault((e.model, stage), []).append(rec["seconds"])
            out.setdefault(("*", stage), []).append(rec["seconds"])
    return out


def estimate(times, entry: Entry, stage: str) -> float | None:
    vals = times.get((entry.model, stage)) or times.get(("*", stage))
    return sum(vals) / len(vals) if vals else None


def estimate_left(runner: Runner) -> float | None:
    times = stage_times(runner)
    total = 0.0
    for e in runner.entries():
        log = runner.stage_log(e)
        for s in runner.c.stages:
            if not log.done(s):
                est = estimate(times, e, s)
                if est is None:
                    return None
                total += est
    return total


def render_status(runner: Runner, header: bool = True) -> str:
    c = runner.c
    running = runner.running()
    times = stage_times(runner)
    rows, n_done, n_left = [], 0, 0
    for e in runner.entries():
        log = runner.stage_log(e)
        done = [s for s in c.stages if log.done(s)]
        failed = sorted(log.data["failed"])
        if e.name in running:
            r = running[e.name]
            state = f"running {r['stage']} ({fmt_minutes(time.time() - r['started_unix'])}, pid {r['pid']})"
        elif len(done) == len(c.stages):
            state = "done"
        elif failed:
            state = "failed: " + ",".join(failed)
        else:
            state = "partial" if done else "left"
        left = [s for s in c.stages if s not in done]
        ests = [estimate(times, e, s) for s in left]
        est = None if None in ests else sum(ests)
        n_done += len(done) == len(c.stages)
        n_left += len(done) < len(c.stages)
        train = log.data["done"].get(STAGES_FIRST)
        rows.append(f"| {e.name} | {e.group} | {len(done)}/{len(c.stages)} | {state} | "
                    f"{fmt_minutes(train['seconds']) if train else '-'} | {fmt_minutes(est) if left else '-'} |")
    total = estimate_left(runner)
    now = ", ".join(f"{name} {r['stage']}" for name, r in running.items())
    lines = []
    if header:
        lines.append(f"campaign {c.name} ({c.path}): {c.scale}")
    lines += [f"{n_done} entries done, {n_left} left, about {fmt_minutes(total)} of work left"
              + (f"; running: {now}" if running else "; no runner is running"),
              "", "| entry | group | stages done | state | training took | left (estimate) |", "|---|---|---|---|---|---|",
              *rows]
    return "\n".join(lines)


def print_commands(campaign: Campaign, entries: list[Entry], out=sys.stdout) -> None:
    for e in entries:
        out.write(f"# {e.name}\n")
        for s in campaign.stages:
            out.write(" ".join("python" if a == sys.executable else a for a in campaign.command(e, s)) + "\n")
