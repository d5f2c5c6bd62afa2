"""Issue 19: the inner rules are stable by construction. The CMS `dgd` preconditioner on unit
keys never expands a weight (on raw RMS-normalised inputs it did), and the Titans memory's
chunk step is bounded by a curvature bound that holds (on the MLP memory it blew up)."""

import torch

from nested_learning import ops
from nested_learning.layers.cms import dgd_inputs, dgd_step
from nested_learning.layers.titans import TitansMemory, bounded_step, mlp_curvature


def rms_inputs(B, T, d, seed=0, shared=1.0):
    """What a level's RMSNorm gives (||x||^2 = d), with a direction shared by all tokens, as in
    a trained model's activations (the smoke model's period-64 chunks measure lr * lambda_max
    = 2.1-2.6 at lr 1e-3; this gives about 4)."""
    g = torch.Generator().manual_seed(seed)
    x = shared * torch.randn(1, 1, d, generator=g, dtype=torch.float64) + torch.randn(B, T, d, generator=g,
                                                                                    dtype=torch.float64)
    return x / x.square().mean(-1, keepdim=True).sqrt()


def run_dgd(W0, x, delta, lr, period):
    st = ops.CMSState.create(W0, period, x.shape[0], "dgd")
    return ops.cms_update(st, x, delta, lr=lr, optimizer="dgd")[0].weight


def test_dgd_on_raw_inputs_expands_the_weight_and_on_unit_keys_never():
    d, C, chunks = 128, 64, 20
    x = rms_inputs(2, C * chunks, d)
    lam = torch.linalg.eigvalsh(x[:, :C].transpose(1, 2) @ x[:, :C]).max()
    assert 2 < 1e-3 * lam < 8  # past the stable range of (I - lr X^T X)
    zero = torch.zeros(2, C * chunks, 16, dtype=torch.float64)  # the preconditioner alone
    W0 = torch.randn(16, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s0 = torch.linalg.matrix_norm(W0, ord=2)
    raw = run_dgd(W0, x, zero, 1e-3, C)  # the rule before the fix: lr * lambda_max(X^T X) > 2
    assert (torch.linalg.matrix_norm(raw, ord=2) > 3 * s0).all()
    xk, dk = dgd_inputs(x, zero, "dgd")
    fixed = run_dgd(W0, xk, dk, dgd_step(1e-3, C), C)
    assert (torch.linalg.matrix_norm(fixed, ord=2) <= s0 * (1 + 1e-12)).all()  # never expanded


def test_dgd_keeps_the_gradient_term_and_caps_the_step():
    x = rms_inputs(2, 32, 8)
    delta = torch.randn(2, 32, 5, dtype=torch.float64)
    xk, dk = dgd_inputs(x, delta, "dgd")
    assert torch.allclose(xk.norm(dim=-1), torch.ones(2, 32, dtype=torch.float64))
    assert torch.allclose(dk.transpose(1, 2) @ xk, delta.transpose(1, 2) @ x)  # sum_t delta_t x_t^T unchanged
    assert dgd_inputs(x, delta, "gd")[0] is x and dgd_inputs(x, delta, "momentum")[1] is delta
    assert dgd_step(1e-3, 64) == 1e-3 and dgd_step(1e-1, 64) == 1 / 64  # the defaults are untouched


def test_the_mlp_curvature_bound_holds():
    """2 ||J||_2^2 of M(k) = k + W1 silu(W2 k) in (W1, W2), by autograd, is below the bound."""
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        d, h = 6, 10
        W1 = torch.randn(1, 1, d, h, generator=g, dtype=torch.float64)
        W2 = torch.randn(1, 1, h, d, generator=g, dtype=torch.float64)
        k = torch.nn.functional.normalize(torch.randn(1, 1, 1, d, generator=g, dtype=torch.float64), dim=-1)

        def memory(w1, w2):
            return k[0, 0, 0] + w1 @ torch.nn.functional.silu(w2 @ k[0, 0, 0])

        J1, J2 = torch.autograd.functional.jacobian(memory, (W1[0, 0], W2[0, 0]))
        J = torch.cat([J1.reshape(d, -1), J2.reshape(d, -1)], 1)
        exact = 2 * torch.linalg.matrix_norm(J, ord=2).square()
        bound = mlp_curvature(k, W1, W2)[0, 0, 0]
        assert exact <= bound + 1e-9 and bound < 10 * exact


def test_bounded_step_is_exactly_one_within_the_bound_and_caps_the_chunk_load():
    theta = torch.full((2, 32, 3), 0.01)
    curv = torch.full((2, 32, 3), 2.0)  # linear memory, unit keys: sum over 16 tokens = 0.32 < 1
    assert torch.equal(bounded_step(theta, curv, 16), torch.ones_like(theta))
    big = theta.clone()
    big[0, 16:, 1] = 0.5  # that sequence-head's second chunk: load 16 * 0.5 * 2 = 16
    s = bounded_step(big, curv, 16)
    assert torch.allclose((big * s * curv)[0, 16:, 1].sum(), torch.tensor(1.0))
    assert (s[0, :16] == 1).all() and (s[1] == 1).all() and (s[0, 16:, [0, 2]] == 1).all()


def test_titans_mlp_memory_blew_up_without_the_bound_and_stays_finite_with_it(monkeypatch):
    torch.manual_seed(0)
    layer = TitansMemory(64, 2, memory="mlp", chunk_size=16)
    with torch.no_grad():  # grown memory weights and a larger learning-rate gate, as training reaches
        layer.W1.mul_(4)
        layer.W2.mul_(4)
        layer.gates.bias[:2].fill_(-3.0)  # theta ~ 0.05
    x = torch.randn(2, 128, 64) * 2

    def final_norm():
        _, st = layer(x, layer.init_state(2, "cpu", torch.float32))
        return max(float(m.norm()) for m in st.memory)

    import nested_learning.layers.titans as titans

    fixed = final_norm()
    monkeypatch.setattr(titans, "bounded_step", lambda th, c, chunk: torch.ones_like(th))
    raw = final_norm()
    assert not (raw < 1e6)  # inf or NaN, or huge: the unbounded rule diverges within one segment
    assert fixed < 1e3
