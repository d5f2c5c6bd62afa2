"""The Triton backend of linear_cross_entropy (nested_learning/kernels/cross_entropy.py) against the float64
reference: loss, teach signal and the gradients of h and weight for every reduction, with
ignored targets and D, V not multiples of the tiles; on the CPU through Triton's interpreter,
compiled in the `gpu` tests (which also check that the logits are never held whole)."""

import importlib.util

import pytest
import torch

from nested_learning import ops
from nested_learning.kernels import triton_unavailable_reason
from tests.helpers import rel_err

interpreted = pytest.mark.skipif(importlib.util.find_spec("triton") is None
                                 or triton_unavailable_reason("cpu") is not None,
                                 reason=str(triton_unavailable_reason("cpu")))
OP = "linear_cross_entropy"


def inputs(N, D, V, seed=0, ignore=-100):
    """h [*N, D], W [V, D] float64 and targets with every 5th and the last position ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    y = torch.randint(0, V, N, generator=g)
    if y.numel() > 1:
        y.view(-1)[::5] = ignore
        y.view(-1)[-1] = ignore
    return h, W, y


def run(h, W, y, backend, reduction, dtype, device="cpu", ignore_index=-100):
    h1 = h.detach().to(device, dtype).requires_grad_()
    W1 = W.detach().to(device, dtype).requires_grad_()
    loss, delta = ops.linear_cross_entropy(h1, W1, y.to(device), ignore_index, reduction, backend=backend)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape).to(device, dtype)
    (loss * g).sum().backward()
    return loss, delta, h1.grad, W1.grad


def check(h, W, y, reduction, dtype, tol, device="cpu", ignore_index=-100):
    h, W = h.to(dtype).double(), W.to(dtype).double()  # the reference sees the rounded inputs
    ref = run(h, W, y, "reference", reduction, torch.float64, ignore_index=ignore_index)
    got = run(h, W, y, "triton", reduction, dtype, device, ignore_index)
    assert ops.last_backend(OP) == "triton"
    for name, a, b in zip(("loss", "delta", "dh", "dW"), got, ref):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel_err(a.cpu(), b) < tol, name


@interpreted
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,D,V", [((37,), 48, 1000), ((1,), 16, 17), ((2, 75), 100, 130), ((3, 5), 9, 13)])
def test_triton_matches_reference(poisoned_allocations, N, D, V, reduction):
    check(*inputs(N, D, V), reduction, torch.float32, 1e-5)


@interpreted
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_bf16_inputs_upcast_in_kernel(reduction):
    check(*inputs((37,), 48, 300), reduction, torch.bfloat16, 1e-2)


@interpreted
def test_triton_ignore_index_inside_the_vocabulary_and_strided_inputs():
    h, W, y = inputs((4, 9), 20, 70, ignore=3)
    check(h, W, y, "mean", torch.float32, 1e-5, ignore_index=3)
    hs = torch.randn(9, 4, 40, dtype=torch.float32)[:, :, ::2].transpose(0, 1)  # [4, 9, 20], strided
    Ws = torch.randn(20, 70, dtype=torch.float32).T  # [70, 20], transposed
    assert not hs.is_contiguous() and not Ws.is_contiguous()
    got = ops.linear_cross_entropy(hs, Ws, y, 3, "none", backend="triton")
    ref = ops.linear_cross_entropy(hs.double(), Ws.double(), y, 3, "none", backend="reference")
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, ref))


@interpreted
def test_triton_all_ignored_and_empty():
    assert "triton" in ops.available_backends(OP, "cpu")
    h, W, y = inputs((2, 6), 24, 50)
    loss, delta, dh, dW = run(h, W, torch.full_like(y, -100), "triton", "mean", torch.float32)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(t) == 0 for t in (delta, dh, dW))
    loss, delta, dh, dW = run(h[:, :0], W, y[:, :0], "triton", "mean", torch.float32)
    assert loss.item() == 0.0 and delta.shape == (2, 0, 24) and dh.shape == (2, 0, 24)
    assert dW.shape == W.shape and torch.count_nonzero(dW) == 0


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_on_gpu_matches_reference(dtype, tol, reduction):
    for N, D, V in (((3, 333), 200, 5000), ((37,), 48, 1000), ((1,), 16, 17)):
        check(*inputs(N, D, V), reduction, dtype, tol, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_on_gpu_large_vocabulary_memory(dtype, tol):
    N, D, V = 4096, 512, 32768
    h, W, y = (t.cuda() for t in inputs((N,), D, V))
    h, W = h.to(dtype), W.to(dtype)
    ref = run(h, W, y, "reference", "mean", torch.float64, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = run(h, W, y, "triton", "mean", dtype, "cuda")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * V * 4 / 2, f"{extra / 2**20:.0f} MiB above the inputs"  # fp32 logits: 512 MiB
    for name, a, b in zip(("loss", "delta", "dh", "dW"), got, ref):
        assert rel_err(a, b) < tol, name
