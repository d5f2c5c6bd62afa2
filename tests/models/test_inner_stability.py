"""Issue 19: the inner rules are stable by construction. The CMS `dgd` preconditioner on unit
keys never expands a weight (on raw RMS-normalised inputs it did), and the Titans memory's
chunk step is bounded by a curvature bound that holds (on the MLP memory it blew up)."""

import pytest
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


def test_bounded_step_is_exactly_one_within_the_bound_and_caps_the_momentum_inclusive_load():
    theta = torch.full((2, 32, 3), 0.01)
    curv = torch.full((2, 32, 3), 2.0)  # linear memory, unit keys
    eta, alpha = torch.full_like(theta, 0.73), torch.full_like(theta, 0.02)
    abar, _, _, c, _ = ops.titan_chunk_scan(eta, alpha, 16)
    abar = abar.repeat_interleave(16, 1)
    assert float((theta * curv * c)[0, :16, 0].sum()) < 1  # a small load: the factor is exactly one
    assert torch.equal(bounded_step(theta, curv, eta, alpha, 16), torch.ones_like(theta))
    big = theta.clone()
    big[0, 16:, 1] = 0.05  # that sequence-head's second chunk: sum theta kappa = 1.6, with momentum ~5
    s = bounded_step(big, curv, eta, alpha, 16)
    load = (big * s * curv * c)[0, 16:, 1].sum()
    assert torch.allclose(load, 1 + abar[0, 16, 1])  # capped at the stability edge 1 + abar
    assert (s[0, :16] == 1).all() and (s[1] == 1).all() and (s[0, 16:, [0, 2]] == 1).all()
    # the old bound (sum theta kappa <= 1, momentum ignored) let this chunk's real load reach 2.7 x its bound
    assert float((big * curv * c)[0, 16:, 1].sum() / (big * curv)[0, 16:, 1].sum()) > 2.5


def test_titan_chunk_scan_matches_a_per_token_loop():
    """c_par, c_mom, abar, rho, ebar against the per-token momentum and decay recurrences (a unit
    impulse gradient at token s, taken once, at the chunk start; a unit incoming momentum)."""
    torch.manual_seed(0)
    B, T, H, C = 2, 21, 3, 8
    eta, alpha = torch.rand(B, T, H, dtype=torch.float64), torch.rand(B, T, H, dtype=torch.float64) * 0.2
    abar, rho, ebar, c_par, c_mom = ops.titan_chunk_scan(eta, alpha, C)
    for s in range(T):
        start = s - s % C
        S, P = torch.zeros(B, H, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
        S0, P0 = torch.ones(B, H, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
        M1 = torch.ones(B, H, dtype=torch.float64)
        for t in range(start, min(start + C, T)):
            S = eta[:, t] * S + (1.0 if t == s else 0.0)
            P = (1 - alpha[:, t]) * P + S
            S0 = eta[:, t] * S0
            P0 = (1 - alpha[:, t]) * P0 + S0
            M1 = (1 - alpha[:, t]) * M1
        assert torch.allclose(c_par[:, s], P) and torch.allclose(c_mom[:, s], S)
        if s == start:
            ch = s // C
            assert torch.allclose(rho[:, ch], P0) and torch.allclose(ebar[:, ch], S0)
            assert torch.allclose(abar[:, ch], M1)


@pytest.mark.parametrize("seed", range(12))
def test_the_bounded_chunk_map_never_expands_the_linear_memory(seed):
    """Property (MATH 3.3): for random gates (theta up to 1, momentum up to 0.99), random unit
    or non-unit keys (spread or aligned) and random states, one bounded chunk of the linear memory with zero
    values and zero momentum (the chunk map's homogeneous part) never increases the memory's
    spectral norm; without the momentum in the bound it does."""
    g = torch.Generator().manual_seed(seed)
    B, H, d, C = 4, 2, 8, 16
    theta = torch.rand(B, C, H, generator=g, dtype=torch.float64)
    eta = 0.99 * torch.rand(B, C, H, generator=g, dtype=torch.float64)
    alpha = 0.1 * torch.rand(B, C, H, generator=g, dtype=torch.float64)
    k = torch.randn(B, C, H, d, generator=g, dtype=torch.float64)
    aligned = seed % 2 == 0  # the worst case: every key of the chunk (nearly) in one direction
    if aligned:
        k = torch.randn(B, 1, H, d, generator=g, dtype=torch.float64) + 0.05 * k
    if seed % 3 == 0:
        k = torch.nn.functional.normalize(k, dim=-1)
    M = torch.randn(B, H, d, d, generator=g, dtype=torch.float64)
    M[0] = torch.eye(d, dtype=torch.float64)  # this row's chunk-end memory is the transition itself
    zero = torch.zeros(B, C, H, d, dtype=torch.float64)
    curv = 2 * k.square().sum(-1)

    def chunk(th):
        _, (M1, _) = ops.titan_update(zero, k, zero, th, eta, alpha, initial_state=(M, torch.zeros_like(M)),
                                      chunk_size=C, backend="reference")
        return torch.linalg.matrix_norm(M1, ord=2) / torch.linalg.matrix_norm(M, ord=2)

    assert float(chunk(theta * bounded_step(theta, curv, eta, alpha, C)).max()) <= 1 + 1e-9
    if aligned and seed % 3 == 0:  # high momentum: the old bound (momentum ignored) expands this chunk
        eta.fill_(0.9)
        load = (theta * curv).view(B, 1, C, H).sum(2)
        old = theta * (1.0 / load.clamp(min=1e-30)).clamp(max=1.0).repeat_interleave(C, 1)
        assert float(chunk(old).max()) > 1.5
        assert float(chunk(theta * bounded_step(theta, curv, eta, alpha, C)).max()) <= 1 + 1e-9


def test_the_bounded_titans_layer_stays_bounded_over_a_long_stream_with_large_gates(monkeypatch):
    """A linear-memory layer with gates pushed to theta ~ 0.5 and momentum up to 0.95 (past what the
    150-step Titans smoke model's worst head learned), on a stream whose keys share a direction
    (as text's do), streams 4096 tokens with a bounded memory; with the old bound (sum theta
    kappa <= 1 per chunk, momentum ignored) the same stream overflows."""
    import nested_learning.layers.titans as titans
    from studies.variant_stability import momentum_blind_bound  # the bound before issue 28

    def stream(bias):
        torch.manual_seed(0)
        layer = TitansMemory(32, 2, memory="linear", chunk_size=16)
        with torch.no_grad():
            layer.gates.bias.copy_(torch.tensor(bias).repeat_interleave(2))
        x = 2 * torch.randn(1, 1, 32) + 0.5 * torch.randn(1, 4096, 32)
        st = layer.init_state(1, "cpu", torch.float32)
        norms = []
        with torch.no_grad():
            for s in range(0, 4096, 256):
                _, st = layer(x[:, s:s + 256], st)
                norms.append(float(st.memory[0].norm()))
        return norms

    for bias in ([0.0, 2.2, -6.0], [0.0, 3.0, -8.0]):
        assert all(n < 50 for n in stream(bias)), bias

    monkeypatch.setattr(titans, "bounded_step", momentum_blind_bound)
    assert not (stream([0.0, 2.2, -6.0])[-1] < 1e6)  # inf, NaN or huge
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
    monkeypatch.setattr(TitansMemory, "mlp_bound_in_op", False)  # the bound through the module's bounded_step
    monkeypatch.setattr(titans, "bounded_step", lambda th, *args: torch.ones_like(th))
    raw = final_norm()
    assert not (raw < 1e6)  # inf or NaN, or huge: the unbounded rule diverges within one segment
    assert fixed < 1e3
