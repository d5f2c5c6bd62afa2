"""Health telemetry (issue 28): fast-memory norms, mixer rms, grouped gradient norms, clipping;
and the tests that would have caught HOPE's decaying memories and the Titans overflow: after
a short training run every fast memory stays within stated bounds over 4x the training
context, and gradient norms do not grow with the position in the context."""

import math
import statistics

import pytest
import torch

from nested_learning.models import build_model
from nested_learning.train import health
from nested_learning.train.loop import run
from tests.train.conftest import read_metrics

CONTEXT, SEG = 256, 32
# The stated bounds: over 4x the training context, from a fresh state, no memory's norm leaves
# [LOW, HIGH] x its initial norm (or exceeds HIGH_ABS where it starts at zero), and the mixer's
# output rms stays above RMS_FLOOR x its value on the first segment.
LOW, HIGH, HIGH_ABS, RMS_FLOOR = 1e-2, 10.0, 1e3, 0.25


def test_param_groups():
    assert health.param_group("blocks.0.mixer.P0") == "layer0.memory_init"
    assert health.param_group("blocks.3.mem.W1") == "layer3.memory_init"
    assert health.param_group("blocks.1.mixer.gate.weight") == "layer1.mixer"
    assert health.param_group("blocks.2.cms.up.0") == "layer2.cms"
    assert health.param_group("blocks.2.n1.weight") == "layer2.norm"
    assert health.param_group("blocks.0.attn.qkv.weight") == "layer0.attn"
    assert health.param_group("embed.weight") == "embed"
    assert health.param_group("norm.weight") == "other"


def test_memory_norms_start_at_one_and_the_monitor_warns_once():
    model = build_model("hope", "tiny")
    norms = health.memory_norms(model, model.init_state(3))
    assert set(norms) == {"layer0", "layer1"}
    assert {"mixer.proj", "mixer.memory", "cms.level0.up"} <= set(norms["layer0"])
    assert all(abs(r["rel"] - 1) < 1e-6 for L in norms.values() for r in L.values())
    said = []
    mon = health.HealthMonitor(said.append)
    bad = {"layer0": {"mixer.memory": {"norm": 1e-5, "init": 1.0, "rel": 1e-5},
                      "mixer.proj": {"norm": 5e3, "init": 1.0, "rel": 5e3}},
           "layer1": {"mem.memory": {"norm": math.nan, "init": 0.0, "rel": None}}}
    mon.check(1, bad)
    mon.check(2, bad)
    assert len(said) == 3 and "collapsed" in said[0] and "exploded" in said[1] and "non-finite" in said[2]


def test_grad_norms_by_group_add_up_to_the_total():
    model = build_model("titans", "tiny")
    tok = torch.randint(0, 64, (2, 32))
    loss, _ = model(tok, targets=tok)
    loss.backward()
    groups = health.grad_norms_by_group(model)
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert math.isclose(math.sqrt(sum(v * v for v in groups.values())), float(total), rel_tol=1e-5)
    assert "layer0.memory_init" in groups and "embed" in groups


def test_mixer_probe_records_each_layer_and_clears():
    model = build_model("hope", "tiny")
    probe = health.MixerProbe(model)
    model(torch.randint(0, 64, (2, 16)))
    got = probe.take()
    assert set(got) == {"layer0", "layer1"} and all(v > 0 for v in got.values())
    assert probe.take() == {}
    probe.remove()


def _train(make_cfg, name, overrides, out):
    cfg = make_cfg(out=out, model={"name": name, "overrides": overrides},
                   train={"steps": 40, "seq_len": SEG, "context_len": CONTEXT, "batch_size": 2, "eval_every": 0,
                          "save_every": 40, "clip": 1.0})
    cfg["optim"]["lr"] = 1e-2
    run(cfg)
    return cfg


def _stream_health(cfg):
    """Memory norms and mixer rms after each segment of 4 x CONTEXT tokens from a fresh state."""
    from nested_learning.runs.load import load_run

    model, tok = load_run(cfg["train"]["out_dir"], device="cpu")
    torch.manual_seed(0)
    text = " ".join(["the king speaks of war and peace and the fool sleeps"] * 400)
    ids = torch.tensor(tok.encode(text).ids[: 4 * CONTEXT]).view(1, -1)
    assert ids.shape[1] == 4 * CONTEXT
    probe = health.MixerProbe(model)
    st, out = model.init_state(1), []
    with torch.no_grad():
        for s in range(0, ids.shape[1], SEG):
            _, st = model(ids[:, s:s + SEG], st)
            out.append((health.memory_norms(model, st), probe.take()))
    probe.remove()
    return out


def _within_bounds(trace) -> list[str]:
    bad = []
    rms0 = trace[0][1]
    for i, (norms, rms) in enumerate(trace):
        for layer, mems in norms.items():
            for name, r in mems.items():
                n, rel = r["norm"], r["rel"]
                if not math.isfinite(n) or (rel is None and n > HIGH_ABS) or (rel is not None and not LOW <= rel <= HIGH):
                    bad.append(f"segment {i} {layer} {name}: norm {n:.3g} rel {rel}")
        for layer, v in rms.items():
            if not v >= RMS_FLOOR * rms0[layer]:
                bad.append(f"segment {i} {layer} mixer rms {v:.3g} < {RMS_FLOOR} x {rms0[layer]:.3g}")
    return bad


def _grad_by_position(out_dir):
    recs = [r for r in read_metrics(out_dir) if r.get("grad_norm") is not None and r["step"] > 8]
    by = {}
    for r in recs:
        by.setdefault(r["context_pos"], []).append(r["grad_norm"])
    med = {p: statistics.median(v) for p, v in by.items()}
    return max(med.values()) / min(med.values()), recs


@pytest.mark.parametrize("name,overrides", [
    ("hope", {"proj_chunk": 4, "memory_chunk": 8, "cms_periods": [1, 4, 8]}),
    ("hope", {"proj_chunk": 4, "memory_chunk": 8, "cms_periods": [1, 4, 8], "memory_target": "values"}),
    ("titans", {}),
])
@pytest.mark.slow
def test_after_training_memories_stay_bounded_over_4x_the_context_and_gradients_do_not_grow_with_position(
        make_cfg, name, overrides):
    cfg = _train(make_cfg, name, overrides, f"{name}-health")
    recs = read_metrics(cfg["train"]["out_dir"])
    assert all("health" in r and "clip_frac" in r and "context_pos" in r for r in recs)
    assert {r["context_pos"] for r in recs} == {float(p) for p in range(0, CONTEXT, SEG)}
    problems = _within_bounds(_stream_health(cfg))
    assert not problems, problems[:5]
    ratio, _ = _grad_by_position(cfg["train"]["out_dir"])
    assert ratio < 3, ratio


@pytest.mark.slow
def test_the_plain_memories_fail_those_bounds(make_cfg):
    """The control: HOPE with the memories before the fix (no residual, forget bias 4) decays below
    the bound within 4x the context: the test above would have caught it."""
    cfg = _train(make_cfg, "hope", {"proj_chunk": 4, "memory_chunk": 8, "cms_periods": [1, 4, 8],
                                    "residual_memories": False, "forget_bias": 4.0}, "hope-plain")
    problems = _within_bounds(_stream_health(cfg))
    assert any("mixer.memory" in p or "mixer rms" in p for p in problems)
