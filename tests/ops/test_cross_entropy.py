import pytest
import torch
import torch.nn.functional as F

from nested_learning import ops
from tests.helpers import F64, rel_err


def make(N=(2, 9), D=7, V=13, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*N, D, generator=g, dtype=dtype)
    W = 0.5 * torch.randn(V, D, generator=g, dtype=dtype)
    y = torch.randint(0, V, N, generator=g)
    y[..., -1] = -100  # the last position has no next token
    y[0, 2] = -100
    return h, W, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_matches_torch(reduction):
    h, W, y = make()
    loss, _ = ops.linear_cross_entropy(h, W, y, reduction=reduction)
    want = F.cross_entropy((h @ W.T).flatten(0, 1), y.flatten(), reduction=reduction)
    assert rel_err(loss, want.reshape(loss.shape)) < 1e-13


def test_teach_signal_is_a_central_finite_difference_of_the_summed_loss():
    h, W, y = make()
    _, delta = ops.linear_cross_entropy(h, W, y)
    summed = lambda hh: F.cross_entropy(  # noqa: E731
        (hh @ W.T).flatten(0, 1), y.flatten(), reduction="sum", ignore_index=-100)
    eps = 1e-6
    fd = torch.zeros_like(h)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            for i in range(h.shape[2]):
                e = torch.zeros_like(h)
                e[b, t, i] = eps
                fd[b, t, i] = (summed(h + e) - summed(h - e)) / (2 * eps)
    assert rel_err(delta, fd) < 1e-6
    assert torch.count_nonzero(delta[:, -1]) == 0 and torch.count_nonzero(delta[0, 2]) == 0


def test_teach_signal_scale_is_independent_of_the_reduction_and_batch():
    h, W, y = make(N=(4, 6))
    _, d_all = ops.linear_cross_entropy(h, W, y, reduction="mean")
    _, d_one = ops.linear_cross_entropy(h[:1], W, y[:1], reduction="sum")
    assert torch.allclose(d_all[:1], d_one)


def test_gradients_match_torch():
    h, W, y = make()
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    ops.linear_cross_entropy(h1, W1, y)[0].backward()
    h2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    F.cross_entropy((h2 @ W2.T).flatten(0, 1), y.flatten()).backward()
    assert rel_err(h1.grad, h2.grad) < 1e-13 and rel_err(W1.grad, W2.grad) < 1e-13


def test_all_ignored_gives_zero_loss_not_nan():
    h, W, y = make()
    loss, delta = ops.linear_cross_entropy(h, W, torch.full_like(y, -100))
    assert loss.item() == 0.0 and torch.count_nonzero(delta) == 0


def test_float32_and_bfloat16_inputs():
    h, W, y = make(V=50)
    ref_loss, ref_delta = ops.linear_cross_entropy(h, W, y)
    for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        loss, delta = ops.linear_cross_entropy(h.to(dt), W.to(dt), y)
        assert loss.dtype == dt and delta.dtype == dt
        assert rel_err(loss, ref_loss) < tol and rel_err(delta, ref_delta) < 10 * tol
