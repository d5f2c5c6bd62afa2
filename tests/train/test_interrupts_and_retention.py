"""Nothing lost: SIGINT/SIGTERM during training save the current step and a rerun continues the
same loss trace (one process, two ranks, and the command line); retention counts only verified
checkpoints and moves damaged ones aside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nested_learning.runs import checkpoint
from nested_learning.train import metrics
from nested_learning.train.interrupt import TrainingInterrupted
from nested_learning.train.loop import run
from tests.train.conftest import read_metrics
from tests.train.test_ddp import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def signal_after(monkeypatch, step: int, sig=signal.SIGTERM):
    """The process sends itself `sig` right after step `step` is logged (a step in flight)."""
    log = metrics.MetricsLog.log

    def log_then_signal(self, record):
        log(self, record)
        if record.get("step") == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(metrics.MetricsLog, "log", log_then_signal)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_and_a_rerun_continues_the_same_trace(make_cfg, monkeypatch, capsys, sig):
    full = make_cfg("full", train={"steps": 6, "save_every": 0})
    run(full)
    cfg = make_cfg("cut", train={"steps": 6, "save_every": 0})  # no periodic checkpoint: only the interrupt saves
    out = cfg["train"]["out_dir"]
    signal_after(monkeypatch, 4, sig)
    handler = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted) as err:
        run(cfg)
    assert err.value.exit_code == 128 + sig
    assert [s for s, _ in checkpoint.step_dirs(out)] == [4]
    said = capsys.readouterr().out
    name = signal.Signals(sig).name
    assert f"interrupted by {name} at step 4: saved {checkpoint.checkpoint_dir(out, 4)}" in said
    assert "run the same command again to resume" in said
    assert signal.getsignal(sig) is handler  # the previous handler is back
    monkeypatch.undo()
    run(cfg)
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(full["train"]["out_dir"])]


@pytest.mark.slow
def test_train_py_on_sigint_prints_one_line_exits_130_and_resumes(make_cfg, corpus_dir, tmp_path):
    def cmd(out):
        return [sys.executable, os.path.join(ROOT, "train.py"), "size=tiny", "data=local", f"data.path={corpus_dir}",
                "data.vocab_size=300", f"data.data_dir={tmp_path / 'data'}", "model.overrides.proj_chunk=4",
                "model.overrides.memory_chunk=8", "model.overrides.cms_periods=[1,4,8]", "train.steps=8",
                "train.batch_size=2", "train.seq_len=16", "train.context_len=64", "train.eval_every=0",
                "train.save_every=0", "train.progress=false", "train.device=cpu", f"train.out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    assert subprocess.run(cmd(full), env=env, capture_output=True, timeout=600).returncode == 0
    out = tmp_path / "cut"
    p = subprocess.Popen(cmd(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("interrupted by SIGINT")]
    assert len(lines) == 1 and "run the same command again to resume" in lines[0]
    step = len(read_metrics(out))
    assert [s for s, _ in checkpoint.step_dirs(str(out))] == [step]
    assert subprocess.run(cmd(out), env=env, capture_output=True, timeout=600).returncode == 0
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(full)]


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_saves(make_cfg, tmp_path):
    full = make_cfg("ddp_full", train={"steps": 5, "save_every": 0, "eval_every": 0})
    assert torchrun(full, tmp_path / "a").returncode == 0
    cfg = make_cfg("ddp_cut", train={"steps": 5, "save_every": 0, "eval_every": 0})
    r = torchrun(cfg, tmp_path / "b", signal_after=3)  # rank 0 alone gets SIGTERM after step 3
    assert r.returncode != 0
    out = cfg["train"]["out_dir"]
    assert [s for s, _ in checkpoint.step_dirs(out)] == [3]
    assert {f"fast_rank{i}.safetensors" for i in range(2)} <= set(os.listdir(checkpoint.checkpoint_dir(out, 3)))
    assert "interrupted by SIGTERM at step 3" in r.stdout
    assert torchrun(cfg, tmp_path / "c").returncode == 0
    assert [x["loss"] for x in read_metrics(out)] == [x["loss"] for x in read_metrics(full["train"]["out_dir"])]
    w = [json.load(open(os.path.join(out, f"worker{i}.json"))) for i in range(2)]
    assert w[0]["checksum"] == w[1]["checksum"]


def test_retention_never_keeps_a_damaged_checkpoint_over_a_good_one(make_cfg, capsys):
    """The issue's case: the newest checkpoint damaged, the run resumes from the one before and
    trains on; keep_last=3 keeps three verified checkpoints and the damaged one sits aside."""
    cfg = make_cfg(train={"steps": 6, "save_every": 2, "keep_last": 3, "eval_every": 0})
    run(cfg)
    out = cfg["train"]["out_dir"]
    bad = os.path.join(checkpoint.checkpoint_dir(out, 6), "model.safetensors")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    cfg["train"]["steps"] = 8
    capsys.readouterr()
    run(cfg)
    said = capsys.readouterr().out
    aside = os.path.join(out, "checkpoints", checkpoint.DAMAGED, "step_00000006")
    assert f"moved to {aside}" in said
    assert [s for s, _ in checkpoint.step_dirs(out)] == [8, 6, 4]  # step 6 trained again; step 2 deleted
    for _, p in checkpoint.step_dirs(out):
        checkpoint.verify(p)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.verify(aside)


def test_prune_counts_only_verified_checkpoints(make_cfg):
    cfg = make_cfg(train={"steps": 4, "save_every": 1, "keep_last": None, "eval_every": 0})
    run(cfg)
    out = cfg["train"]["out_dir"]
    os.remove(os.path.join(checkpoint.checkpoint_dir(out, 3), "meta.json"))
    warned = []
    gone = checkpoint.prune(out, 2, warn=warned.append)
    assert [s for s, _ in checkpoint.step_dirs(out)] == [4, 2]
    assert gone == [checkpoint.checkpoint_dir(out, 1)]
    assert len(warned) == 1 and "step_00000003 is damaged" in warned[0]
    assert os.listdir(os.path.join(out, "checkpoints", checkpoint.DAMAGED)) == ["step_00000003"]


def test_older_checkpoints_can_drop_their_fast_state(make_cfg, capsys):
    cfg = make_cfg(train={"steps": 6, "save_every": 2, "keep_last": 3, "eval_every": 0, "keep_fast_state": "newest"})
    run(cfg)
    out = cfg["train"]["out_dir"]
    dirs = checkpoint.step_dirs(out)
    assert [s for s, _ in dirs] == [6, 4, 2]
    sizes = {s: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p)) for s, p in dirs}
    for s, p in dirs:
        checkpoint.verify(p)  # still verifies: the dropped files left checksums.json too
        assert ("fast_rank0.safetensors" in os.listdir(p)) == (s == 6)
    assert sizes[4] < sizes[6]
    os.remove(os.path.join(checkpoint.checkpoint_dir(out, 6), "meta.json"))  # resume must fall back to step 4
    cfg["train"]["steps"] = 7
    capsys.readouterr()
    run(cfg)
    said = capsys.readouterr().out
    assert "fast state was dropped" in said and "resumed from" in said
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 8))
    default = make_cfg("all", train={"steps": 4, "save_every": 2, "eval_every": 0})
    run(default)
    assert all("fast_rank0.safetensors" in os.listdir(p) for _, p in checkpoint.step_dirs(default["train"]["out_dir"]))
