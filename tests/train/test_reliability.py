"""Issue 16: checkpoints verified by checksum with fallback, keep_last, what resume checks and
accepts, a metrics log with one record per step across resumes, and the divergence guard."""

import json
import os
import shutil

import pytest
import torch

from nested_learning.models.lm import LanguageModel
from nested_learning.runs import checkpoint
from nested_learning.runs.load import load_run
from nested_learning.runs.run_dir import RunExistsError
from nested_learning.train.loop import TrainingDiverged, run
from tests.train.conftest import read_metrics


def steps_of(out):
    return [r["step"] for r in read_metrics(out)]


def flip_byte(path, at=0.5, mask=0x01):
    """Flip the low bit of one byte in the middle of a file (inside a tensor's data)."""
    with open(path, "r+b") as f:
        f.seek(0, 2)
        pos = int(f.tell() * at)
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ mask]))


def test_a_flipped_bit_in_a_tensor_is_a_checkpoint_error_naming_the_file(make_cfg):
    cfg = make_cfg(train={"steps": 3, "save_every": 3})
    run(cfg)
    ck = checkpoint.latest(cfg["train"]["out_dir"])
    checkpoint.verify(ck)  # intact
    flip_byte(os.path.join(ck, "model.safetensors"), at=0.9)  # low-order bit: still loads as valid floats
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors does not match the SHA-256"):
        checkpoint.verify(ck)
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors"):
        load_run(ck, device="cpu")
    cfg["train"]["steps"] = 5  # the only checkpoint is damaged: resume says so, it does not train on
    with pytest.raises(checkpoint.CheckpointError, match="every checkpoint of this run is damaged"):
        run(cfg)


@pytest.mark.parametrize("damage", ["truncate optim.safetensors", "delete meta.json", "delete checksums.json"])
@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(make_cfg, capsys, damage):
    cfg = make_cfg(train={"steps": 6, "save_every": 3})
    run(cfg)
    out = cfg["train"]["out_dir"]
    full = read_metrics(out)
    newest = checkpoint.checkpoint_dir(out, 6)
    how, name = damage.split(" ")
    path = os.path.join(newest, name)
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        os.remove(path)
    capsys.readouterr()
    run(cfg)  # the same 6 steps: resumes at step 3 and trains 4-6 again
    said = capsys.readouterr().out
    assert f"skipping damaged checkpoint {newest}" in said and checkpoint.checkpoint_dir(out, 3) in said
    assert f"resumed from {checkpoint.checkpoint_dir(out, 3)} at step 3" in said
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 7))  # one record per step
    assert [r["loss"] for r in recs] == [r["loss"] for r in full]  # steps 4-6 retrained bit for bit


def test_keep_last_bounds_the_checkpoints_kept(make_cfg):
    cfg = make_cfg(train={"steps": 6, "save_every": 1, "keep_last": 2, "eval_every": 0})
    run(cfg)
    out = cfg["train"]["out_dir"]
    assert [s for s, _ in checkpoint.step_dirs(out)] == [6, 5]
    cfg = make_cfg("all", train={"steps": 3, "save_every": 1, "keep_last": None, "eval_every": 0})
    run(cfg)
    assert [s for s, _ in checkpoint.step_dirs(cfg["train"]["out_dir"])] == [3, 2, 1]


def test_resume_refuses_another_corpus_tokenizer_or_optimizer(make_cfg, tmp_path, corpus_dir):
    cfg = make_cfg(train={"steps": 3, "save_every": 3})
    run(cfg)
    other = tmp_path / "other_corpus"
    shutil.copytree(corpus_dir, other)
    (other / "doc00.txt").write_text("a different text entirely, " * 400)
    moved = json.loads(json.dumps(cfg))
    moved["data"]["path"] = str(other)
    moved["train"]["steps"] = 5
    with pytest.raises(checkpoint.CheckpointError, match="tokenizer_sha256.*corpus|corpus"):
        run(moved)
    muon = json.loads(json.dumps(cfg))
    muon["optim"].update(name="mixed_muon_adamw", muon_lr=3e-3, muon_momentum=0.95)
    muon["train"]["steps"] = 5
    with pytest.raises(checkpoint.CheckpointError, match="optimizer: checkpoint 'adamw' vs now 'mixed_muon_adamw'"):
        run(muon)


def test_resume_prints_and_applies_the_changes_it_accepts(make_cfg, capsys):
    cfg = make_cfg(train={"steps": 3, "save_every": 3}, optim={"warmup": 0, "min_lr_ratio": 1.0})
    run(cfg)
    capsys.readouterr()
    cfg["train"].update(steps=5, seed=7)
    cfg["optim"]["lr"] = 1e-3
    run(cfg)
    said = capsys.readouterr().out
    assert "accepted changes since it was saved" in said
    assert "optim.lr: 0.003 -> 0.001" in said and "train.seed: 0 -> 7" in said and "train.steps: 3 -> 5" in said
    lrs = [r["lr"] for r in read_metrics(cfg["train"]["out_dir"])]
    assert lrs[:3] == [3e-3] * 3 and lrs[3:] == [1e-3] * 2  # the new learning rate is used, not the saved one


def test_steps_at_or_below_the_checkpoint_say_the_run_is_complete(make_cfg, capsys):
    cfg = make_cfg(train={"steps": 6, "save_every": 3})
    first = run(cfg)
    capsys.readouterr()
    for steps in (6, 4):
        cfg["train"]["steps"] = steps
        again = run(cfg)
        said = capsys.readouterr().out
        assert "the run is already complete" in said and "at step 6 and train.steps=" + str(steps) in said
        assert "validation loss by step: 3:" in said
        assert again["val_loss"] == [tuple(x) for x in first["val_loss"]]
        assert steps_of(cfg["train"]["out_dir"]) == list(range(1, 7))


def test_metrics_are_cut_back_to_the_checkpoint_on_resume(make_cfg):
    """A crash after step 5 (metrics hold 1-5, the newest checkpoint is step 3), then a torn
    line: the resumed run's log holds each step once, equal to an uninterrupted run."""
    ref = make_cfg("ref", train={"steps": 6, "save_every": 3})
    run(ref)
    cfg = make_cfg(train={"steps": 6, "save_every": 3})
    run(cfg)
    out = cfg["train"]["out_dir"]
    shutil.rmtree(checkpoint.checkpoint_dir(out, 6))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "loss": 1.')  # half a line, as a kill mid-write leaves it
    run(cfg)
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in recs] == [r["loss"] for r in read_metrics(ref["train"]["out_dir"])]


def test_a_fresh_run_into_a_folder_holding_a_run_refuses_unless_overwrite(make_cfg):
    cfg = make_cfg(train={"steps": 3, "save_every": 3})
    run(cfg)
    cfg["train"]["resume"] = False
    with pytest.raises(RunExistsError, match="already holds a run"):
        run(cfg)
    assert steps_of(cfg["train"]["out_dir"]) == [1, 2, 3]
    cfg["train"].update(overwrite=True, steps=2)
    run(cfg)
    out = cfg["train"]["out_dir"]
    assert steps_of(out) == [1, 2]
    assert [s for s, _ in checkpoint.step_dirs(out)] == [2]


def test_a_run_that_never_saved_starts_again_with_a_clean_log(make_cfg, capsys):
    cfg = make_cfg(train={"steps": 3, "save_every": 0})
    run(cfg)
    run(cfg)
    assert "holds a run with no checkpoint; starting it again from step 0" in capsys.readouterr().out
    assert steps_of(cfg["train"]["out_dir"]) == [1, 2, 3]


def test_console_lines_reach_train_log(make_cfg):
    cfg = make_cfg(train={"steps": 3, "save_every": 3, "eval_every": 3})
    run(cfg)
    with open(os.path.join(cfg["train"]["out_dir"], "train.log")) as f:
        log = f.read()
    for line in ("data: local", "model: hope", "step 3: val_loss", "saved", "validation loss by step: 3:"):
        assert line in log


# ----------------------------------------------------------------------------- the guard
def test_a_non_finite_step_changes_nothing_and_is_logged_as_skipped(make_cfg, poison, capsys):
    seen = poison({3})
    cfg = make_cfg(train={"steps": 5, "save_every": 1, "keep_last": None, "eval_every": 0})
    run(cfg)
    out = cfg["train"]["out_dir"]
    assert "step 3 skipped: loss nan" in capsys.readouterr().out
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[2]["skipped"] == "loss nan"
    assert recs[2]["loss"] is None and all(isinstance(r["loss"], float) for r in recs[3:])
    (w3, s3), (w4, s4), (w5, _) = seen[2:5]
    assert all(torch.equal(a, b) for a, b in zip(w3, w4))  # no optimizer step at step 3
    assert all(torch.equal(a, b) for a, b in zip(s3, s4))  # no inner update: step 4 starts from step 3's state
    assert not all(torch.equal(a, b) for a, b in zip(w4, w5))  # (step 4 did train)
    assert [s for s, _ in checkpoint.step_dirs(out)] == [5, 4, 2, 1]  # no save on the skipped step


def test_consecutive_bad_steps_stop_the_run_keeping_the_last_good_checkpoint(make_cfg, poison):
    poison({4, 5, 6})
    cfg = make_cfg(train={"steps": 8, "save_every": 1, "keep_last": None, "eval_every": 0, "max_bad_steps": 3})
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(to step 6\).*step_00000003"):
        run(cfg)
    out = cfg["train"]["out_dir"]
    assert [s for s, _ in checkpoint.step_dirs(out)] == [3, 2, 1]  # nothing saved from the bad streak
    assert steps_of(out) == [1, 2, 3, 4, 5, 6]


def test_a_real_divergence_stops_with_training_diverged_not_inside_an_op(make_cfg):
    """optim.lr=1e4 (the issue's reproduction): the run stops with TrainingDiverged or keeps
    finite weights; it never fails inside an op with a NaN gate."""
    cfg = make_cfg(optim={"lr": 1e4, "warmup": 0}, train={"steps": 20, "save_every": 0, "eval_every": 0})
    with pytest.raises(TrainingDiverged, match="training diverged"):
        run(cfg)
    recs = read_metrics(cfg["train"]["out_dir"])
    assert recs[-1]["skipped"] and len(recs) < 20


def test_nan_weights_reaching_an_op_are_a_skipped_step(make_cfg, monkeypatch):
    real = LanguageModel.train_forward

    def forward(self, *a, **k):
        with torch.no_grad():
            next(iter(self.parameters())).fill_(float("nan"))
        return real(self, *a, **k)

    monkeypatch.setattr(LanguageModel, "train_forward", forward)
    cfg = make_cfg(train={"steps": 5, "save_every": 0, "eval_every": 0, "max_bad_steps": 2})
    with pytest.raises(TrainingDiverged, match="2 steps in a row"):
        run(cfg)
    assert "must lie in" in read_metrics(cfg["train"]["out_dir"])[0]["skipped"]
