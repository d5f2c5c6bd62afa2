import gc
import os
import shutil

import pytest

from nested_learning.layers.teach import TeachCapture
from nested_learning.models.flops import flops_per_token
from nested_learning.runs import checkpoint, load_run
from nested_learning.train.loop import run
from tests.train.conftest import read_metrics


def losses(out):
    return [r["loss"] for r in read_metrics(out)]


def test_metrics_have_every_field_and_val_loss(make_cfg):
    cfg = make_cfg()
    summary = run(cfg)
    recs = read_metrics(cfg["train"]["out_dir"])
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        assert {"loss", "lr", "tokens_per_s", "grad_norm", "teach_signal_norm", "inner_updates"} <= set(r)
        assert r["teach_signal_norm"] > 0
        assert set(r["inner_updates"]) == {"level0", "level1", "level2"}  # every level updated
        assert r["seq_len"] == 16 and set(r["inner_stats"]) == {"level0", "level1", "level2"}
        # model FLOP utilisation: the FLOPs per token counted from the model, times tokens/s, over the peak
        assert r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * flops_per_token(load_run(cfg["train"]["out_dir"])[0], 16), rel=1e-9)
        assert 0 < r["mfu"] == pytest.approx(r["flops_per_s"] / summary["gemm_peak_flops"], rel=1e-9)
        for lvl, st in r["inner_stats"].items():
            assert st["updates"] == r["inner_updates"][lvl] and st["update_norm"] > 0
            assert "alpha" not in st  # gd levels: no preconditioner
    assert [s for s, _ in summary["val_loss"]] == [3, 6]
    assert os.path.exists(os.path.join(cfg["train"]["out_dir"], "config.json"))


def test_same_seed_bit_identical_different_seed_differs(make_cfg):
    a, b, c = make_cfg("a"), make_cfg("b"), make_cfg("c", train={"seed": 1})
    for cfg in (a, b, c):
        cfg["train"]["save_every"] = 0
        run(cfg)
    la, lb, lc = (losses(x["train"]["out_dir"]) for x in (a, b, c))
    assert la == lb  # bit-identical floats
    assert la != lc


@pytest.mark.parametrize("name", ["hope", "titans"])
def test_resume_continues_the_identical_loss_trace(make_cfg, name):
    over = {"hope": {"proj_chunk": 4, "memory_chunk": 8, "cms_periods": [1, 4, 8]}, "titans": {"chunk_size": 4}}
    full = make_cfg("full", model={"name": name, "overrides": over[name]})
    run(full)
    part = make_cfg("part", model={"name": name, "overrides": over[name]})
    src = os.path.join(full["train"]["out_dir"], "checkpoints")
    dst = os.path.join(part["train"]["out_dir"], "checkpoints")
    os.makedirs(dst)
    shutil.copytree(os.path.join(src, "step_00000003"), os.path.join(dst, "step_00000003"))
    checkpoint._write_json({"latest": "step_00000003"}, os.path.join(dst, "latest.json"))
    run(part)  # resumes at step 3, as if the first run had crashed there
    assert losses(part["train"]["out_dir"]) == losses(full["train"]["out_dir"])[3:]


def test_corrupted_and_mismatched_checkpoints_are_clear_errors(make_cfg):
    cfg = make_cfg()
    run(cfg)
    other = make_cfg(model={"name": "hope", "overrides": {"proj_chunk": 8, "memory_chunk": 8, "cms_periods": [1, 4, 8]}})
    other["train"]["out_dir"] = cfg["train"]["out_dir"]
    other["train"]["steps"] = 8
    with pytest.raises(checkpoint.CheckpointError, match="made for another model.*proj_chunk"):
        run(other)
    for _, ck in checkpoint.step_dirs(cfg["train"]["out_dir"]):
        with open(os.path.join(ck, "model.safetensors"), "r+b") as f:
            f.write(b"\x00garbage\xff" * 8)
    cfg["train"]["steps"] = 8
    with pytest.raises(checkpoint.CheckpointError, match="(?s)every checkpoint of this run is damaged.*corrupted"):
        run(cfg)


@pytest.mark.parametrize("section,key,value,msg", [
    ("train", "steps", 0, "train.steps must be a positive int"),
    ("train", "seq_len", 12, "train.seq_len=12 must be a multiple of model.memory_chunk=8"),
    ("train", "eval_every", -1, "train.eval_every must be a non-negative int"),
    ("optim", "lr", 0.0, r"optim.lr must lie in \(0.0, inf\], got 0.0"),
    ("optim", "name", "sgd", "optim.name must be one of"),
    ("data", "source", "web", "data.source must be"),
])
def test_config_validation_errors(make_cfg, section, key, value, msg):
    cfg = make_cfg()
    cfg["train"]["context_len"] = None
    cfg[section][key] = value
    with pytest.raises(ValueError, match=msg):
        run(cfg)


def test_context_len_must_be_a_multiple_of_seq_len(make_cfg):
    cfg = make_cfg(train={"context_len": 24})
    with pytest.raises(ValueError, match="train.context_len must be null or a multiple of train.seq_len=16"):
        run(cfg)


def test_bad_model_override_names_the_field(make_cfg):
    cfg = make_cfg(model={"name": "hope", "overrides": {"cms_periods": [1, 0]}})
    with pytest.raises(ValueError, match="cms_periods"):
        run(cfg)


def test_mixed_muon_bf16_and_grad_accum(make_cfg):
    cfg = make_cfg(optim={"name": "mixed_muon_adamw", "muon_lr": 3e-3, "muon_momentum": 0.95},
                   train={"bf16": True, "grad_accum": 2, "save_every": 0, "eval_every": 0, "steps": 3})
    run(cfg)
    recs = read_metrics(cfg["train"]["out_dir"])
    assert len(recs) == 3 and all(r["loss"] == r["loss"] for r in recs)  # finite, no NaN


def test_compile_switch_runs_compiled_and_matches_eager(make_cfg):
    eager = make_cfg("eager", model={"name": "transformer", "overrides": {}},
                     train={"steps": 2, "save_every": 0, "eval_every": 0})
    comp = make_cfg("compiled", model={"name": "transformer", "overrides": {}},
                    train={"steps": 2, "save_every": 0, "eval_every": 0, "compile": True})
    import warnings

    run(eager)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run(comp)
    assert not any("torch.compile failed" in str(x.message) for x in w)
    for a, b in zip(losses(eager["train"]["out_dir"]), losses(comp["train"]["out_dir"])):
        assert abs(a - b) < 1e-4


def test_the_training_loop_leaves_no_capture_behind(make_cfg):
    """Two steps of the real loop (with an evaluation, which memorises for HOPE): once run()
    returns, no TeachCapture object exists anywhere."""
    cfg = make_cfg(train={"steps": 2, "eval_every": 2, "save_every": 2})
    run(cfg)
    gc.collect()
    assert [o for o in gc.get_objects() if type(o) is TeachCapture] == []
