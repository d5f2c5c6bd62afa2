"""The fast backends of titan_update (linear memory) against the float64 reference: the Triton
kernels (nested_learning/kernels/titan.py; on the CPU through Triton's interpreter, compiled in the `gpu`
tests) and the C++ `cpu` backend (csrc/cpu/titan.cpp). Outputs, final (M, S) and the
gradients of q, k, v, theta, eta, alpha and the initial state; chunk sizes 1, 4, 16, 64 with
T not a multiple of the chunk; streamed in segments == whole."""

import importlib.util

import pytest
import torch

from nested_learning import ops
from nested_learning.kernels import triton_unavailable_reason
from tests.helpers import rel_err, titan_inputs

interpreted = pytest.mark.skipif(importlib.util.find_spec("triton") is None
                                 or triton_unavailable_reason("cpu") is not None,
                                 reason=str(triton_unavailable_reason("cpu")))
compiled = pytest.mark.skipif("cpu" not in ops.available_backends("titan_update", "cpu"),
                              reason="nested_learning._C is not built")
BACKENDS = [pytest.param("triton", marks=interpreted), pytest.param("cpu", marks=compiled)]
GATES = ("theta", "eta", "alpha")


def run(x, backend, chunk, dtype, device="cpu"):
    leaves = {n: v.to(device, dtype).detach().requires_grad_() for n, v in x.items() if n != "initial_state"}
    init = None
    if x.get("initial_state") is not None:
        init = tuple(s.to(device, dtype).detach().requires_grad_() for s in x["initial_state"])
    o, (M, S) = ops.titan_update(**leaves, initial_state=init, chunk_size=chunk, backend=backend)
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(device, t.dtype) for t in (o, M, S)]
    sum((t * wt).sum() for t, wt in zip((o, M, S), w)).backward()
    grads = {n: v.grad for n, v in leaves.items()}
    if init is not None:
        grads["M0"], grads["S0"] = init[0].grad, init[1].grad
    return o, M, S, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,chunk", [((1, 1, 1, 4, 4), 1), ((2, 37, 3, 5, 7), 4), ((1, 70, 1, 48, 16), 16),
                                         ((1, 100, 2, 64, 64), 64), ((1, 45, 1, 100, 80), 16)])
@pytest.mark.slow
def test_linear_backend_matches_reference(shape, chunk, backend):
    x = titan_inputs(*shape)
    ref = run(x, "reference", chunk, torch.float64)
    got = run(x, backend, chunk, torch.float32)
    assert ops.last_backend("titan_update") == backend
    for a, b in zip(got[:3], ref[:3]):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-5
    assert set(got[3]) == set(ref[3])
    for n in ref[3]:
        assert rel_err(got[3][n], ref[3][n]) < 1e-5, n


@compiled
def test_cpu_backend_float64_and_chosen_automatically():
    x = titan_inputs(2, 41, 2, 12, 9)
    ref = run(x, "reference", 8, torch.float64)
    got = run(x, "cpu", 8, torch.float64)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(got[:3], ref[:3]))
    assert all(rel_err(got[3][n], ref[3][n]) < 1e-12 for n in ref[3])
    before = {n: v.clone() for n, v in x.items() if n != "initial_state"}
    ops.titan_update(**x, chunk_size=8)
    assert ops.last_backend("titan_update") == "cpu"
    assert all(torch.equal(x[n], before[n]) for n in before)  # inputs are never written


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_without_initial_state_and_streamed_equals_whole(backend):
    x = titan_inputs(1, 50, 2, 16, 16, state=False)
    ref = run(x, "reference", 16, torch.float64)
    got = run(x, backend, 16, torch.float32)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got[:3], ref[:3]))
    assert all(rel_err(got[3][n], ref[3][n]) < 1e-5 for n in ref[3])
    xf = {n: v.float() for n, v in x.items() if v is not None}
    o_whole, st_whole = ops.titan_update(**xf, chunk_size=16, backend=backend)
    st, outs = None, []
    for t0, t1 in ((0, 16), (16, 48), (48, 50)):  # segment boundaries on chunk boundaries
        seg = {n: v[:, t0:t1] for n, v in xf.items()}
        o, st = ops.titan_update(**seg, initial_state=st, chunk_size=16, backend=backend)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), o_whole) < 1e-5
    assert rel_err(st[0], st_whole[0]) < 1e-5 and rel_err(st[1], st_whole[1]) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol,gate_tol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 2e-2)])
def test_triton_linear_on_gpu_matches_reference(dtype, tol, gate_tol):
    x = titan_inputs(2, 333, 3, 64, 64)
    x = {n: (v.to(dtype).double() if n != "initial_state" else tuple(s.to(dtype).double() for s in v))
         for n, v in x.items()}
    ref = run(x, "reference", 16, torch.float64)
    got = run(x, "triton", 16, dtype, device="cuda")
    for a, b in zip(got[:3], ref[:3]):
        assert rel_err(a.cpu(), b) < tol
    for n in ref[3]:
        assert rel_err(got[3][n].cpu(), ref[3][n]) < (gate_tol if n in GATES else 2 * tol), n


@interpreted
def test_triton_linear_bf16_inputs_upcast_in_kernel():
    x = titan_inputs(1, 40, 2, 32, 32)
    xb = {n: (v.to(torch.bfloat16).double() if n != "initial_state" else tuple(s.to(torch.bfloat16).double()
                                                                           for s in v)) for n, v in x.items()}
    ref = run(xb, "reference", 16, torch.float64)
    got = run(xb, "triton", 16, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for a, b in zip(got[:3], ref[:3]):
        assert rel_err(a, b) < 1e-2
    for n in ref[3]:
        assert rel_err(got[3][n], ref[3][n]) < 2e-2, n
