"""Deep momentum (DMGD) as a CMS inner optimizer: the update of docs/MATH.md section 5.1 by
hand, each write as one gradient step on the memory's objective, the linear limit equal to
momentum, streaming in pieces equal to feeding whole, the factored form (the default path)
against the reference in values and gradients, and the state checks."""

import pytest
import torch

from nested_learning import ops
from nested_learning.ops.cms import deep_momentum_factored
from nested_learning.reference.deep_momentum import deep_momentum_reference, deep_momentum_step, initial_keys

B, DOUT, DIN, H = 2, 5, 7, 3


def _tokens(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, DIN, generator=g, dtype=torch.float64),
            torch.randn(B, T, DOUT, generator=g, dtype=torch.float64))


def _state(period, optimizer="deep_momentum"):
    W = torch.randn(DOUT, DIN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return ops.CMSState.create(W, period, batch_size=B, optimizer=optimizer, hidden=H)


def test_two_chunks_by_hand():
    x, d = _tokens(8)
    st = _state(4)
    K0 = st.deep[0].clone()
    new, rep = ops.cms_update(st, x, d, lr=0.1, optimizer="deep_momentum", beta=0.5)
    G1 = d[:, :4].transpose(1, 2) @ x[:, :4]
    G2 = d[:, 4:].transpose(1, 2) @ x[:, 4:]
    S0 = torch.tanh(K0)
    # chunk 1: V was 0, so K does not move; the step is -lr G1 (I + S0^T S0)
    M0, V, K = -0.1 * G1, -0.1 * G1 @ S0.transpose(1, 2), K0
    W1 = st.weight - 0.1 * G1 - 0.1 * G1 @ S0.transpose(1, 2) @ S0
    # chunk 2, written out term by term
    K2 = K - 0.1 * (V.transpose(1, 2) @ G2) * (1 - S0**2)
    M0 = 0.5 * M0 - 0.1 * G2
    V = 0.5 * V - 0.1 * G2 @ S0.transpose(1, 2)
    W2 = W1 + M0 + V @ torch.tanh(K2)
    torch.testing.assert_close(new.weight, W2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.momentum, M0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.deep[0], K2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.deep[1], V, rtol=1e-12, atol=1e-12)
    assert rep.token_index == (3, 7) and new.updates == 2 and new.filled == 0
    torch.testing.assert_close(rep.update_norms[:, 0], (W1 - st.weight).flatten(1).norm(dim=1))


def test_each_write_is_a_gradient_step_on_the_memory_objective():
    """phi <- (beta, beta, 1) * phi - lr grad_phi <M0 + V tanh(K), G>, the gradient by autograd."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    W, M0, K, V, G = r(1, DOUT, DIN), r(1, DOUT, DIN), r(1, H, DIN), r(1, DOUT, H), r(1, DOUT, DIN)
    phi = [t.clone().requires_grad_() for t in (M0, K, V)]
    objective = ((phi[0] + phi[2] @ torch.tanh(phi[1])) * G).sum()
    gM0, gK, gV = torch.autograd.grad(objective, phi)
    W_new, M0_new, K_new, V_new = deep_momentum_step(W, M0, K, V, G, lr=0.05, beta=0.8)
    torch.testing.assert_close(M0_new, 0.8 * M0 - 0.05 * gM0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(V_new, 0.8 * V - 0.05 * gV, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K_new, K - 0.05 * gK, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W_new, W + M0_new + V_new @ torch.tanh(K_new), rtol=1e-12, atol=1e-12)


def test_zero_keys_are_momentum_exactly():
    x, d = _tokens(24)
    deep, mom = _state(4), _state(4, "momentum")
    deep = ops.CMSState(**{**deep.__dict__, "deep": (torch.zeros_like(deep.deep[0]), deep.deep[1])})
    a, ra = ops.cms_update(deep, x, d, lr=0.1, optimizer="deep_momentum", beta=0.9)
    b, rb = ops.cms_update(mom, x, d, lr=0.1, optimizer="momentum", beta=0.9)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.momentum, b.momentum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ra.update_norms, rb.update_norms, rtol=1e-12, atol=1e-12)
    assert a.deep[1].abs().max() == 0  # V never moves when tanh(K) = 0


def test_streaming_in_pieces_equals_whole():
    x, d = _tokens(23)
    whole, rep = ops.cms_update(_state(5), x, d, lr=0.05, optimizer="deep_momentum")
    st, idx = _state(5), []
    for a, b in [(0, 3), (3, 4), (4, 12), (12, 23)]:
        st, r = ops.cms_update(st, x[:, a:b], d[:, a:b], lr=0.05, optimizer="deep_momentum")
        idx += [a + i for i in r.token_index]
    for f in ("weight", "momentum", "buffer_x", "buffer_delta"):
        torch.testing.assert_close(getattr(st, f), getattr(whole, f), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.deep[0], whole.deep[0], rtol=1e-12, atol=1e-12)
    assert tuple(idx) == rep.token_index and st.updates == whole.updates == 4 and st.filled == 3


def test_initial_keys_are_fixed_and_unit_scale():
    k = initial_keys(16, 256, torch.float32, "cpu")
    assert torch.equal(k, initial_keys(16, 256, torch.float32, "cpu"))
    assert 0.8 < float(k.norm(dim=1).mean()) < 1.2


def test_state_checks():
    x, d = _tokens(4)
    with pytest.raises(ValueError, match="needs state.deep"):
        ops.cms_update(_state(4, "momentum"), x, d, lr=0.1, optimizer="deep_momentum")
    with pytest.raises(ValueError, match="no kernel"):
        ops.cms_update(_state(4), x, d, lr=0.1, optimizer="deep_momentum", backend="cpu")
    with pytest.raises(ValueError, match="hidden"):
        ops.CMSState.create(torch.zeros(3, 3), 4, batch_size=1, optimizer="deep_momentum", hidden=0)


@pytest.mark.parametrize("period,filled,T", [(1, 0, 9), (4, 0, 16), (4, 3, 10), (5, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_factored_form_matches_the_reference(period, filled, T, dtype):
    g = torch.Generator().manual_seed(period * 100 + filled)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    args = (r(B, DOUT, DIN), r(B, T, DIN), r(B, T, DOUT), r(B, period, DIN), r(B, period, DOUT), filled,
            0.1 * r(B, DOUT, DIN), r(B, H, DIN), 0.1 * r(B, DOUT, H), 0.05, 0.9)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    ours, theirs = deep_momentum_factored(*args), deep_momentum_reference(*args)
    assert ours[-1].shape == theirs[-1].shape == (B, (filled + T) // period)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)


def test_the_factored_form_has_the_references_gradients():
    """With differentiable writes the update is differentiated by autograd: through the
    factored products as through the reference's."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    W, x, d, m0, K, V = r(B, DOUT, DIN), r(B, 8, DIN), r(B, 8, DOUT), r(B, DOUT, DIN), r(B, H, DIN), r(B, DOUT, H)
    grads = []
    for fn in (deep_momentum_factored, deep_momentum_reference):
        leaves = [t.clone().requires_grad_() for t in (W, x, d, K, V)]
        out = fn(leaves[0], leaves[1], leaves[2], torch.zeros(B, 2, DIN, dtype=torch.float64),
                 torch.zeros(B, 2, DOUT, dtype=torch.float64), 0, m0, leaves[3], leaves[4], 0.1, 0.9)
        loss = (out[0] ** 2).sum() + out[2].sin().sum() + (out[6] ** 2).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_reference_runs_when_asked_for_or_forced(monkeypatch):
    import nested_learning.ops.cms as cms_op

    x, d = _tokens(8)
    fast, _ = ops.cms_update(_state(4), x, d, lr=0.1, optimizer="deep_momentum")
    calls, real = [], cms_op.deep_momentum_reference
    monkeypatch.setattr(cms_op, "deep_momentum_reference", lambda *a: calls.append(1) or real(*a))
    asked, _ = ops.cms_update(_state(4), x, d, lr=0.1, optimizer="deep_momentum", backend="reference")
    with ops.use_backend("reference"):
        forced, _ = ops.cms_update(_state(4), x, d, lr=0.1, optimizer="deep_momentum")
    assert calls == [1, 1] and torch.equal(asked.weight, forced.weight)
    torch.testing.assert_close(fast.weight, asked.weight, rtol=1e-12, atol=1e-12)
