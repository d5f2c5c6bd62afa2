"""HOPE's ablation switches: each builds, trains a step, and differs from the default where
it should; every configs/experiment/ entry trains two steps through train.py's config."""

import os

import pytest
import torch

from nested_learning.models import build_model
from tests.train.conftest import corpus_dir  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs", "experiment")) if f.endswith(".yaml"))


def _pair(**switch):
    """The default tiny HOPE and the switched one, from the same seed (same slow weights)."""
    torch.manual_seed(0)
    base = build_model("hope", "tiny")
    torch.manual_seed(0)
    return base, build_model("hope", "tiny", **switch)


def _step(model):
    """One training step (outer step and CMS update pass): the loss, and the new state."""
    tok = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, cap, st = model.train_forward(tok)
    loss.backward()
    opt.step()
    st, rep = model.apply_updates(st, cap)
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in st.tensors() if t.is_floating_point())
    return float(loss), st, rep


def test_self_modification_off_keeps_the_projections_slow():
    base, off = _pair(self_modifying=False)
    P0, M0 = (p.detach().clone() for p in (off.blocks[0].mixer.P0, off.blocks[0].mixer.M0))  # before the step
    _, st_b, _ = _step(base)
    _, st_o, _ = _step(off)
    proj, mem = st_o.layers[0]["mixer"].proj, st_o.layers[0]["mixer"].memory
    assert torch.equal(proj, P0.expand_as(proj))  # never written in context...
    assert not torch.allclose(st_b.layers[0]["mixer"].proj, P0.expand_as(proj))
    assert not torch.allclose(mem, M0.expand_as(mem))  # ...while the main memory still learns in context


def test_memory_target_values_follows_eq_28():
    """One token through the residual main memory with given values:
    W1 = W0 (alpha I - 2 eta k k^T) + eta (v - k) k^T."""
    from nested_learning.layers.self_modifying import SelfModifyingTitans

    torch.manual_seed(0)
    layer = SelfModifyingTitans(8, 1, proj_chunk=1, memory_chunk=1, memory_target="values").double()
    x = torch.randn(1, 1, 8, dtype=torch.float64)
    st = layer.init_state(1, "cpu", torch.float64)
    q, k, v, eta, alpha = layer._project(x.view(1, 1, 1, 8), st.proj)
    _, new = layer(x, st)
    k, v, eta, alpha, W0 = k[0, 0, 0], v[0, 0, 0], eta[0, 0, 0], alpha[0, 0, 0], layer.M0[0].detach()
    want = W0 @ (alpha * torch.eye(8, dtype=torch.float64) - 2 * eta * torch.outer(k, k)) + eta * torch.outer(v - k, k)
    assert torch.allclose(new.memory[0, 0], want, atol=1e-10)
    base, vals = _pair(memory_target="values")
    assert _step(base)[0] != _step(vals)[0]


@pytest.mark.parametrize("periods", [(16,), (1, 8, 64), (1, 4, 16, 64, 128)])
def test_cms_depth(periods):
    base, m = _pair(cms_periods=periods)
    assert all(b.cms.periods == periods and len(b.cms.up) == len(periods) for b in m.blocks)
    _, _, rep = _step(m)
    assert {e.level for e in rep.events} == set(range(len(periods)))


@pytest.mark.parametrize("opt", ["momentum", "dgd", "deep_momentum", ("gd", "momentum", "dgd", "deep_momentum")])
def test_inner_optimizer_per_level(opt):
    base, m = _pair(cms_optimizer=opt)
    want = (opt,) * 4 if isinstance(opt, str) else opt
    assert all(b.cms.optimizers == want for b in m.blocks)
    _, st_b, _ = _step(base)
    _, st_m, _ = _step(m)
    w = lambda st: st.layers[0]["cms"][-1].up.weight  # noqa: E731 (the slowest level's fast weight)
    assert not torch.allclose(w(st_b), w(st_m))


def test_bad_switches_name_the_field():
    with pytest.raises(ValueError, match="HOPEConfig.memory_target"):
        build_model("hope", "tiny", memory_target="given")
    with pytest.raises(ValueError, match="HOPEConfig.cms_optimizer"):
        build_model("hope", "tiny", cms_optimizer=("gd", "dgd"))
    with pytest.raises(ValueError, match="HOPEConfig.cms_optimizer must be one of"):
        build_model("hope", "tiny", cms_optimizer="adam")
    with pytest.raises(ValueError, match="HOPEConfig.self_modifying"):
        build_model("hope", "tiny", self_modifying="no")


@pytest.fixture(scope="module")
def experiment_data(tmp_path_factory, corpus_dir):  # noqa: F811
    return corpus_dir, str(tmp_path_factory.mktemp("experiment_data"))


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.slow
def test_every_experiment_config_trains_two_steps(name, experiment_data, tmp_path):
    from nested_learning.train.config import compose_config
    from nested_learning.train.loop import run

    corpus, data_dir = experiment_data
    cfg = compose_config([
        f"experiment={name}", "size=tiny", "data=local", f"data.path={corpus}", "data.vocab_size=300",
        f"data.data_dir={data_dir}", "train.steps=2", "train.tokens=null", "train.batch_size=2", "train.eval_every=0",
        "train.save_every=0", f"train.out_dir={tmp_path / name}", "train.progress=false", "train.device=cpu"])
    summary = run(cfg)
    assert len(summary["tokens_per_s"]) == 2 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    with open(tmp_path / name / "config.json") as f:
        import json

        assert json.load(f)["model"]["overrides"] == cfg["model"]["overrides"]


@pytest.mark.parametrize("mixer", ["attention", "sliding_window", "deltanet"])
def test_sequence_mixer_swap(mixer):
    base, m = _pair(mixer=mixer, mixer_window=8)
    tok = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole, _ = m(tok)
        st, parts = m.init_state(2), []
        for s in range(0, 96, 32):  # streaming in segments equals the whole sequence
            o, st = m(tok[:, s:s + 32], st)
            parts.append(o)
        assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-5)
        changed = tok.clone()
        changed[:, 40] = (changed[:, 40] + 1) % 64
        diff = (m(changed)[0] - whole).abs().amax(-1)[0]
        assert diff[:40].max() == 0 and diff[40] > 0  # causal
        if mixer == "sliding_window":  # 2 layers of 8-key windows: position 40 is out of reach from 55 on
            assert diff[55:].max() < 1e-6 and diff[41:55].max() > 0
        else:
            assert diff[60:].max() > 0
        # a reset row streams as from a fresh state (the KV cache or delta state of the mixer too)
        st = m.reset_state(st, torch.tensor([True, False]))
        fresh, _ = m(tok[:1, :32])
        again, _ = m(tok[:, :32], st)
        assert torch.allclose(again[:1], fresh, atol=1e-5) and not torch.allclose(again[1:], whole[1:, :32])
    assert _step(base)[0] != _step(m)[0]


def test_deltanet_follows_the_gated_delta_rule():
    """Two tokens: S_1 = b1 v1 k1^T, S_2 = S_1 (a2 I - b2 k2 k2^T) + b2 v2 k2^T, o_t = S_t q_t."""
    import torch.nn.functional as F

    from nested_learning.layers.deltanet import GatedDeltaNet

    torch.manual_seed(0)
    layer = GatedDeltaNet(8, 1, chunk_size=2).double()
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    _, S = layer(x, layer.init_state(1, "cpu", torch.float64))
    q, k, v = layer.qkv(x).view(1, 2, 3, 1, 8).unbind(2)
    q, k = F.normalize(q, dim=-1)[0, :, 0], F.normalize(k, dim=-1)[0, :, 0]
    b, a = torch.sigmoid(layer.gates(x))[0].unbind(-1)
    v = v[0, :, 0]
    S1 = b[0] * torch.outer(v[0], k[0])
    S2 = S1 @ (a[1] * torch.eye(8, dtype=torch.float64) - b[1] * torch.outer(k[1], k[1])) + b[1] * torch.outer(v[1], k[1])
    assert torch.allclose(S[0, 0], S2, atol=1e-10)


def test_deep_momentum_differs_from_momentum_and_carries_its_memory():
    _, mom = _pair(cms_optimizer="momentum")
    _, deep = _pair(cms_optimizer="deep_momentum", cms_deep_momentum_hidden=8)
    _, st_m, _ = _step(mom)
    _, st_d, _ = _step(deep)
    lvl_m, lvl_d = st_m.layers[0]["cms"][0].up, st_d.layers[0]["cms"][0].up  # period 1: 128 updates
    keys, values = lvl_d.deep
    assert keys.shape[1] == 8 and values.shape[2] == 8 and values.abs().sum() > 0
    assert lvl_m.deep is None and not torch.allclose(lvl_m.weight, lvl_d.weight)
