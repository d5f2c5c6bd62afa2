"""Sharded (DCP) checkpoints of FSDP2 runs on 2 CPU processes (gloo): kill-and-resume gives the
uninterrupted loss trace, a checkpoint written by 2 ranks loads into 1 (and 1 into 2) through
DCP's resharding, and export writes one safetensors file that evaluation loads."""

import copy
import json
import os

import pytest
import torch

from nested_learning.runs import checkpoint
from nested_learning.runs.checkpointer import load_whole_model
from tests.train.conftest import read_metrics
from tests.train.test_ddp import torchrun

FSDP = {"fsdp": True, "eval_every": 0, "save_every": 2, "keep_last": None}


def losses(out):
    return [r["loss"] for r in read_metrics(out)]


@pytest.mark.slow
def test_fsdp_kill_after_a_checkpoint_then_resume_gives_the_uninterrupted_trace(make_cfg, tmp_path):
    full = make_cfg("full", train={**FSDP, "steps": 6})
    r = torchrun(full, tmp_path / "a")
    assert r.returncode == 0, r.stderr[-4000:]
    ck = checkpoint.checkpoint_dir(full["train"]["out_dir"], 4)
    files = os.listdir(ck)
    assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2  # one shard file per rank
    assert checkpoint.meta_of(ck)["format"] == "dcp" and "model.safetensors" not in files

    part = make_cfg("part", train={**FSDP, "steps": 6})
    killed = torchrun(part, tmp_path / "b", kill_after=5)  # dies after step 5: the newest checkpoint is step 4
    assert killed.returncode != 0
    assert [s for s, _ in checkpoint.step_dirs(part["train"]["out_dir"])] == [4, 2]
    assert len(read_metrics(part["train"]["out_dir"])) == 5
    again = torchrun(part, tmp_path / "c")  # the same command again
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stdout and "step_00000004" in again.stdout
    assert losses(part["train"]["out_dir"]) == losses(full["train"]["out_dir"])  # identical, bit for bit
    assert [r["step"] for r in read_metrics(part["train"]["out_dir"])] == [1, 2, 3, 4, 5, 6]


def _restored(cfg, path, world_note=True):
    """The slow weights and the AdamW state (flattened: keyed by parameter name) that a
    one-process run restores from a checkpoint, through the trainer's own Checkpointer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from nested_learning.distributed import DistInfo
    from nested_learning.models import build_model
    from nested_learning.runs.checkpointer import Checkpointer
    from nested_learning.train.optim import build_optimizer

    meta = checkpoint.meta_of(path)
    torch.manual_seed(123)  # another init: everything must come from the checkpoint
    model = build_model("hope", "tiny", vocab_size=meta["model_config"]["vocab_size"], **cfg["model"]["overrides"])
    opt = build_optimizer(model, cfg["optim"])
    run_meta = {k: meta[k] for k in ("model", "size", "model_config", "optimizer", "batch_size")}
    r = Checkpointer(os.path.dirname(path), "dcp", DistInfo()).restore(path, run_meta, model, opt)
    assert (r.fast is None) == (meta["world"] != 1)  # another world: fresh fast states
    optim = get_optimizer_state_dict(model, opt.optimizers["adamw"],
                                     options=StateDictOptions(flatten_optimizer_state_dict=True))
    return model.state_dict(), _moments(optim)


def _moments(flat: dict) -> dict:
    """The per-parameter AdamW state of a flattened optimizer state dict (exp_avg, exp_avg_sq,
    step; the group settings are the config's and are not what a checkpoint carries)."""
    return {k: v for k, v in flat.items() if k.startswith("state.")}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x.float(), y.float()), k
        else:
            assert x == y, k


@pytest.mark.slow
def test_a_two_rank_checkpoint_reshards_into_one_rank_and_back(make_cfg, tmp_path, capsys):
    from nested_learning.train.loop import run

    two = make_cfg("two", train={**FSDP, "steps": 4, "save_every": 4})
    r = torchrun(two, tmp_path / "a", dump=str(tmp_path / "live"))
    assert r.returncode == 0, r.stderr[-4000:]
    ck4 = checkpoint.checkpoint_dir(two["train"]["out_dir"], 4)
    live = torch.load(tmp_path / "live.step4.pt", weights_only=False)
    w4, o4 = _restored(two, ck4)
    _same(w4, live["model"])  # the two ranks' shards, read back whole by one process, bit for bit
    _same(o4, _moments(live["optim"]))  # AdamW's moments and step counts too
    assert all(float(v) == 4.0 for k, v in o4.items() if k.endswith(".step"))

    # 2 -> 1: the same run continued by one process (batch 4 = the old global batch of 2 x 2)
    one = copy.deepcopy(two)
    one["train"].update(steps=5, save_every=1, batch_size=4)
    capsys.readouterr()
    run(one)
    said = capsys.readouterr().out
    assert "written by 2 ranks and this run has 1" in said and "resumed from" in said
    ck5 = checkpoint.checkpoint_dir(two["train"]["out_dir"], 5)
    assert checkpoint.meta_of(ck5)["world"] == 1
    w5, o5 = _restored(two, ck5)
    assert all(float(v) == 5.0 for k, v in o5.items() if k.endswith(".step"))  # went on from step 4's state
    # every global row kept its data position: rows 0-3 of the 1-rank run continue rows 0-1 of
    # rank 0 and 0-1 of rank 1, one segment further
    old, new = checkpoint.data_positions(ck4), checkpoint.data_positions(ck5)
    assert sorted(new) == sorted(old) == [0, 1, 2, 3]
    for row in old:
        o, n = old[row], new[row]
        assert (n["epoch"], n["index"], n["offset"]) > (o["epoch"], o["index"], o["offset"])

    # 1 -> 2: the 1-rank checkpoint of step 5 loads into two ranks; their live state right
    # after a save at step 5 (no step taken: steps=5 is already complete, so save once more
    # through a 6th step and compare the step-5 restore through the step-6 optimizer count)
    back = copy.deepcopy(two)
    back["train"].update(steps=6, save_every=6)
    r = torchrun(back, tmp_path / "b", dump=str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "written by 1 ranks and this run has 2" in r.stdout
    w = [json.load(open(os.path.join(two["train"]["out_dir"], f"worker{i}.json"))) for i in range(2)]
    assert w[0]["checksum"] == w[1]["checksum"]
    live6 = torch.load(tmp_path / "back.step6.pt", weights_only=False)
    w6, o6 = _restored(two, checkpoint.checkpoint_dir(two["train"]["out_dir"], 6))
    _same(w6, live6["model"])
    _same(o6, _moments(live6["optim"]))
    assert all(float(v) == 6.0 for k, v in o6.items() if k.endswith(".step"))  # step 5's state, one step on
    assert any(not torch.equal(w5[k], w6[k]) for k in w5)


def test_a_dcp_checkpoint_restores_exactly_into_the_same_world(make_cfg, tmp_path):
    """The twin check: one process writes a DCP checkpoint, another restores it, and the
    weights and AdamW state are the writer's, bit for bit."""
    from nested_learning.train.loop import run

    cfg = make_cfg("one", train={**FSDP, "steps": 3, "save_every": 3})
    summary = run(cfg)
    ck = checkpoint.checkpoint_dir(cfg["train"]["out_dir"], 3)
    w, o = _restored(cfg, ck)
    from nested_learning.models import build_model
    from nested_learning.train.sharding import checksum

    ref = build_model("hope", "tiny", vocab_size=300, **cfg["model"]["overrides"])
    ref.load_state_dict(w)
    assert checksum(ref) == summary["param_checksum"]
    assert all(float(v) == 3.0 for k, v in o.items() if k.endswith(".step"))


@pytest.mark.slow
def test_export_of_an_fsdp_run_loads_for_evaluation(make_cfg, tmp_path):
    from nested_learning.runs import load_run
    from nested_learning.runs.export import export_run

    cfg = make_cfg("fsdp", train={**FSDP, "steps": 2, "export": True})
    r = torchrun(cfg, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    out = cfg["train"]["out_dir"]
    exp = os.path.join(out, "export")
    assert sorted(os.listdir(exp)) == ["checksums.json", "config.json", "meta.json", "model.safetensors",
                                       "tokenizer.json"]
    model, tok = load_run(exp, device="cpu")
    direct, _ = load_run(out, device="cpu")  # the DCP checkpoint itself, read in one process
    for (n, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), n
    w = json.load(open(os.path.join(out, "worker0.json")))
    from nested_learning.train.sharding import checksum

    # the exported weights are the trained ones (the FSDP run's checksum sums shards: rounding only)
    assert checksum(model) == pytest.approx(w["checksum"], rel=1e-12)
    again = export_run(out, out=str(tmp_path / "again"))
    model2, _ = load_run(again, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert tok.get_vocab_size() == 300


def test_load_whole_model_reads_both_formats(make_cfg, tmp_path):
    from nested_learning.models import build_model
    from nested_learning.train.loop import run

    cfg = make_cfg("single", train={"steps": 2, "save_every": 2, "eval_every": 0})
    run(cfg)
    ck = checkpoint.checkpoint_dir(cfg["train"]["out_dir"], 2)
    assert checkpoint.meta_of(ck)["format"] == "single"
    m = build_model("hope", "tiny", vocab_size=300, **cfg["model"]["overrides"])
    load_whole_model(ck, m)
    sd = checkpoint.read_single_file(ck)[0]
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
