"""HOPE's memories are residual (MATH 2 and 6): M(x) = x + W x, read o = q + W_{t-1} q, and one
DGD write is one preconditioned gradient step on the stated loss, W_t = W_{t-1}(alpha I -
eta k k^T) - eta grad_W loss(W_{t-1}), checked against autograd in float64 for the main memory
(self-generated and given targets) and every row block of the projection memory."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.layers.self_modifying import SelfModifyingTitans
from nested_learning.models import build_model

D = 8


def _dgd_step(W0, k, alpha, eta, loss_fn):
    """W0 (alpha I - eta k k^T) - eta d loss / d W at W0 (autograd)."""
    W = W0.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(W), W)
    return W0 @ (alpha * torch.eye(W0.shape[1], dtype=W0.dtype) - eta * torch.outer(k, k)) - eta * g


def _one_token(target):
    torch.manual_seed(0)
    layer = SelfModifyingTitans(D, 1, proj_chunk=1, memory_chunk=1, memory_target=target).double()
    x = torch.randn(1, 1, D, dtype=torch.float64)
    st = layer.init_state(1, "cpu", torch.float64)
    q, k, v, eta, alpha = (t[0, 0, 0] for t in layer._project(x.view(1, 1, 1, D), st.proj))
    y, new = layer(x, st)
    return layer, x, st, y, new, q, k, v, eta, alpha


@pytest.mark.parametrize("target", ["self", "values"])
def test_the_main_memory_write_is_an_autograd_step_on_its_residual_loss(target):
    layer, x, st, y, new, q, k, v, eta, alpha = _one_token(target)
    W0 = st.memory[0, 0]
    goal = (v + W0 @ v).detach() if target == "self" else v  # self-generated: sg(M_{t-1}(v))
    want = _dgd_step(W0, k, alpha, eta, lambda W: 0.5 * (k + W @ k - goal).square().sum())
    assert torch.allclose(new.memory[0, 0], want, atol=1e-12)
    # the read comes before the write and includes the residual: o = q + W0 q
    o = (q + W0 @ q).view(1, 1, 1, D)
    want_y = layer.out(layer.norm(o).reshape(1, 1, D) * torch.sigmoid(layer.gate(x)))
    assert torch.allclose(y, want_y, atol=1e-12)


def test_every_projection_memory_block_write_is_an_autograd_step():
    """q, k, v blocks: residual, target sg(v + W_box v); the two gate rows (d -> 1, no residual):
    target sg(W_box v)."""
    layer, x, st, y, new, q, k, v, eta, alpha = _one_token("self")
    P0, P1 = st.proj[0, 0], new.proj[0, 0]
    for b in range(3):
        W0 = P0[b * D:(b + 1) * D]
        goal = (v + W0 @ v).detach()
        want = _dgd_step(W0, k, alpha, eta, lambda W: 0.5 * (k + W @ k - goal).square().sum())
        assert torch.allclose(P1[b * D:(b + 1) * D], want, atol=1e-12), b
    W0 = P0[3 * D:]
    goal = (W0 @ v).detach()
    want = _dgd_step(W0, k, alpha, eta, lambda W: 0.5 * (W @ k - goal).square().sum())
    assert torch.allclose(P1[3 * D:], want, atol=1e-12)


def test_the_projections_read_through_the_residual():
    layer, x, st, *_ = _one_token("self")
    P = st.proj[0, 0]
    xs = x[0, 0]
    want = [F.normalize(xs + P[b * D:(b + 1) * D] @ xs, dim=-1) for b in range(3)]
    got = layer._project(x.view(1, 1, 1, D), st.proj)[:3]
    for w, g in zip(want, got):
        assert torch.allclose(g[0, 0, 0], w, atol=1e-12)


def test_plain_memories_only_forget_and_residual_memories_keep_the_mixer_alive():
    """The defect this fixes: with residual=False the main memory's write is zero and over a long
    stream the fast memories decay geometrically towards zero (the mixer's output with them);
    with the residual the read keeps the query and the output does not vanish."""
    torch.manual_seed(0)
    x = torch.randn(1, 1024, 32)
    out = {}
    for residual in (False, True):
        torch.manual_seed(1)
        layer = SelfModifyingTitans(32, 2, residual=residual, forget_bias=4.0)  # the old default gate
        st = layer.init_state(1, "cpu", torch.float32)
        rms = []
        with torch.no_grad():
            for s in range(0, 1024, 128):
                y, st = layer(x[:, s:s + 128], st)
                rms.append(float(y.square().mean().sqrt()))
        out[residual] = (rms, float(st.memory.norm()) / float(layer.M0.detach().norm()))
    plain, res = out[False], out[True]
    assert plain[0][-1] < 1e-3 * plain[0][0] and plain[1] < 1e-3  # collapsed
    assert res[0][-1] > 0.3 * res[0][0]  # alive


def test_hope_config_switches_are_checked():
    with pytest.raises(ValueError, match="residual_memories"):
        build_model("hope", "tiny", residual_memories="yes")
    with pytest.raises(ValueError, match="forget_bias"):
        build_model("hope", "tiny", forget_bias=float("nan"))
    m = build_model("hope", "tiny", forget_bias=6.0, residual_memories=False)
    assert not m.blocks[0].mixer.residual and float(m.blocks[0].mixer.gate_bias[0, 1]) == 6.0
