"""The context-length curriculum (stages, constant tokens per step, exact resume inside a stage
and at a stage boundary), checkpoints by wall time, token budgets, the typed train config's
checks and the dry-run plan of the plan's runs."""

import json
import math
import os
import shutil

import pytest

from nested_learning.runs import checkpoint
from nested_learning.train import trainer
from nested_learning.train.config import TrainConfig, compose_config
from nested_learning.train.loop import run
from tests.train.conftest import read_metrics

CURRICULUM = {"steps": 8, "batch_size": 4, "seq_len": 16, "context_len": 64, "curriculum": [[0, 16], [4, 32]],
              "save_every": 2, "eval_every": 4, "keep_last": None}


def losses(out):
    return [r["loss"] for r in read_metrics(out)]


def test_curriculum_stages_keep_the_tokens_per_step_and_are_logged(make_cfg):
    cfg = make_cfg(train=CURRICULUM)
    summary = run(cfg)
    recs = read_metrics(cfg["train"]["out_dir"])
    assert [r["seq_len"] for r in recs] == [16] * 4 + [32] * 4
    assert "curriculum_stage" not in recs[3]
    assert recs[4]["curriculum_stage"] == {"stage": 1, "seq_len": 32, "batch_size": 2}  # 4 x 16 = 2 x 32 tokens
    assert all("curriculum_stage" not in r for r in recs[5:])
    with open(os.path.join(cfg["train"]["out_dir"], "train.log")) as f:
        assert "step 5: curriculum stage 1: seq_len 32, batch_size 2" in f.read()
    assert all(math.isfinite(v) for _, v in summary["val_loss"])
    # stage 0 reads four rows; stage 1 keeps rows 0-1, each from the start of its next document
    # (two 32-token segments read by step 6: offset 64), and rows 2-3 wait as dormant rows
    at4 = checkpoint.data_positions(checkpoint.checkpoint_dir(cfg["train"]["out_dir"], 4))
    ck6 = checkpoint.checkpoint_dir(cfg["train"]["out_dir"], 6)
    at6 = checkpoint.data_positions(ck6)
    assert sorted(at4) == sorted(at6) == [0, 1, 2, 3]
    for row in (0, 1):
        assert at6[row]["offset"] == 64 and at6[row]["index"] == at4[row]["index"] + 1
    for row in (2, 3):
        assert at6[row] == at4[row]
    rank0 = json.load(open(os.path.join(ck6, "rank0.json")))["data"]
    assert rank0["rows"] == [0, 1] and sorted(rank0["dormant"]) == ["2", "3"]


@pytest.mark.parametrize("at", [4, 6])  # at the stage boundary (saved in stage 0, resumed into 1), inside stage 1
def test_curriculum_resume_gives_the_uninterrupted_trace(make_cfg, at):
    full = make_cfg("full", train=CURRICULUM)
    run(full)
    part = make_cfg("part", train=CURRICULUM)
    src = checkpoint.checkpoint_dir(full["train"]["out_dir"], at)
    os.makedirs(os.path.join(part["train"]["out_dir"], "checkpoints"))
    shutil.copytree(src, checkpoint.checkpoint_dir(part["train"]["out_dir"], at))
    run(part)
    assert losses(part["train"]["out_dir"]) == losses(full["train"]["out_dir"])[at:]
    assert [r["seq_len"] for r in read_metrics(part["train"]["out_dir"])] == ([16] * 4 + [32] * 4)[at:]


def test_checkpoints_by_wall_time(make_cfg, monkeypatch):
    now = [0.0]

    def clock():  # every look at the clock is 25 s later
        now[0] += 25.0
        return now[0]

    monkeypatch.setattr(trainer, "_clock", clock)
    cfg = make_cfg(train={"steps": 6, "save_every": 0, "save_every_minutes": 1, "eval_every": 0, "keep_last": None})
    run(cfg)
    # 25 s at the start; steps 1-2 see 50 and 75 s since (under a minute); step 3 sees 75 s: saved;
    # steps 4-5 under a minute again; the last step is always saved
    assert sorted(s for s, _ in checkpoint.step_dirs(cfg["train"]["out_dir"])) == [3, 6]


def test_a_token_budget_sets_the_steps(make_cfg):
    cfg = make_cfg(train={"steps": None, "tokens": 2 * 16 * 3 - 5, "eval_every": 0, "save_every": 0})
    summary = run(cfg)
    assert len(summary["tokens_per_s"]) == 3  # ceil(91 / 32)
    budget = TrainConfig(steps=None, tokens=1000, batch_size=2, seq_len=16, grad_accum=2)
    assert budget.total_steps(world=4) == 4  # 128 tokens per step
    # resumed on 1 rank (64 tokens per step) after 3 steps of 4 ranks: 384 tokens seen, 616 left
    assert budget.total_steps(world=1, start=3, seen=384) == 3 + 10
    assert budget.total_steps(world=1, start=8, seen=1024) == 8  # the budget is spent


@pytest.mark.parametrize("train, msg", [
    ({"steps": 5, "tokens": 100}, "exactly one of train.steps and train.tokens"),
    ({"steps": None, "tokens": "lots"}, "train.tokens must be a number"),
    ({"curriculum": [[1, 16]]}, "starting at step 0"),
    ({"curriculum": [[0, 16], [5, 32], [3, 64]]}, "increasing steps"),
    ({"curriculum": [[0, 32]]}, "must equal the first curriculum stage's seq_len"),
    ({"curriculum": [[0, 16], [4, 48]]}, "does not divide the tokens of a micro-batch"),
    ({"batch_size": 8, "curriculum": [[0, 16], [4, 128]]}, "train.context_len must be null or a multiple of train.seq_len=128"),
    ({"save_every_minutes": 0}, "train.save_every_minutes must lie in"),
    ({"export": True, "save_every": 0}, "train.export=true exports the final checkpoint"),
    ({"checkpoint_format": "zip"}, "train.checkpoint_format must be"),
    ({"wandb": {"enabled": True, "mode": "cloud"}}, "train.wandb.mode"),
    ({"stepz": 3}, r"unknown key train.stepz \(did you mean train.steps\?\)"),
    ({"batch_size": 2, "seq_len": 32, "curriculum": [[0, 32], [4, 16]]}, "may not be shorter than the one before"),
    ({"keep_last": 0}, "train.keep_last"),
    ({"eval_tokens": 0}, "train.eval_tokens must be positive"),
    ({"seed": -1}, "train.seed must be a non-negative int"),
])
def test_train_config_errors_name_the_key(make_cfg, train, msg):
    cfg = make_cfg(train=train)
    with pytest.raises(ValueError, match=msg):
        run(cfg)


def test_the_train_defaults_live_in_one_place():
    cfg = compose_config([])
    assert cfg["train"] == {**TrainConfig().as_dict(), "out_dir": "runs/hope-smoke"}


@pytest.mark.parametrize("name", ["plan_pilot", "plan_mid", "plan_target"])
def test_the_dry_run_plans_the_plans_runs(name, capsys):
    cfg = compose_config([f"experiment={name}", "train.dry_run=true"])
    p = run(cfg)
    said = capsys.readouterr().out
    assert said.startswith("plan: hope") and "memory per GPU (estimate)" in said
    nominal = {"plan_pilot": 160e6, "plan_mid": 760e6, "plan_target": 1.3e9}[name]
    assert abs(p["parameters"] - nominal) / nominal < 0.1
    budget = {"plan_pilot": 3e9, "plan_mid": 3e10, "plan_target": 1e11}[name]
    assert p["token_budget"] == budget and budget <= p["tokens"] < budget + p["stages"][-1]["tokens_per_step"]
    assert p["steps"] == p["stages"][-1]["to_step"] and p["fits"]
    assert p["checkpoints"] == math.ceil(p["steps"] / p["save_every"])
    if name != "plan_pilot":
        assert p["fsdp"] and cfg["train"]["save_every_minutes"]
    if name == "plan_target":
        assert [s["seq_len"] for s in p["stages"]] == [2048, 4096, 8192]
