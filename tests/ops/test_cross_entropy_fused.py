"""The fused (`cpu`) backend of linear_cross_entropy: blocks of tokens, logits never whole.
Values, teach signal and gradients against the reference, float64 gradcheck of its backward,
and peak memory that does not grow with the vocabulary the way logits-materialising
cross-entropy does."""

import pytest
import torch

from bench.ce_memory import measure
from nested_learning import ops
from nested_learning.ops import cross_entropy as ce
from tests.helpers import rel_err
from tests.ops.test_cross_entropy import make


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 40)  # 3 tokens per block at V = 13: many blocks


def run(h, W, y, backend, reduction, dtype):
    h1 = h.detach().to(dtype).clone().requires_grad_()
    W1 = W.detach().to(dtype).clone().requires_grad_()
    loss, delta = ops.linear_cross_entropy(h1, W1, y, reduction=reduction, backend=backend)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * g).sum().backward()
    return loss, delta, h1.grad, W1.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_matches_reference(small_blocks, reduction, dtype, tol):
    h, W, y = make(N=(3, 11), D=9, V=13)
    ref = run(h, W, y, "reference", reduction, torch.float64)
    got = run(h, W, y, "cpu", reduction, dtype)
    assert ops.last_backend("linear_cross_entropy") == "cpu"
    for a, b in zip(got, ref):
        assert a.dtype == dtype and rel_err(a, b) < tol


def test_fused_is_chosen_on_cpu_and_all_ignored_is_zero(small_blocks):
    h, W, y = make()
    loss, delta = ops.linear_cross_entropy(h, W, torch.full_like(y, -100))
    assert ops.last_backend("linear_cross_entropy") == "cpu"
    assert loss.item() == 0.0 and torch.count_nonzero(delta) == 0


def test_fused_backward_gradcheck(small_blocks):
    h, W, y = make(N=(2, 5), D=4, V=7)
    for reduction in ("mean", "none"):
        f = lambda hh, ww: ops.linear_cross_entropy(hh, ww, y, reduction=reduction, backend="cpu")[0]  # noqa: E731
        assert torch.autograd.gradcheck(f, (h.clone().requires_grad_(), W.clone().requires_grad_()))


def peak_mib(N, D, V, backend):
    return measure(N, D, V, backend)["peak_mib"]


@pytest.mark.slow
def test_fused_peak_memory_does_not_grow_with_the_vocabulary():
    N, D = 2048, 64
    naive = [peak_mib(N, D, V, "naive") for V in (8192, 32768)]
    fused = [peak_mib(N, D, V, "cpu") for V in (8192, 32768)]
    # logits are N * V * 4 bytes: 64 MiB -> 256 MiB; the naive path holds several such
    assert naive[1] - naive[0] > 300
    # the fused path holds one 16 MiB block of logits plus the weight and its gradient
    assert fused[1] - fused[0] < 64
    assert fused[1] * 4 < naive[1]
