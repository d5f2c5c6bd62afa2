"""The chunked backends of titan_mlp_update (ops/_titan_mlp.py: batched matrix products per
chunk, hand-derived backward recomputing each chunk from chunk-start checkpoints; `cpu` with
the elementwise work in ATen, `triton` with it fused in nested_learning/kernels/titan_mlp.py, run here through
Triton's interpreter) against the float64 reference: outputs, final (W1, W2, S1, S2) and the gradients of q, k, v, theta, eta,
alpha and the initial state, for every activation; chunk sizes 1, 4, 16, 64 with T not a
multiple of the chunk; streamed in segments == whole."""

import importlib.util

import pytest
import torch

from nested_learning import ops
from nested_learning.kernels import triton_unavailable_reason
from tests.helpers import rel_err
from tests.ops.test_titan import mlp_inputs

NAMES = ("W1", "W2", "S1", "S2")
interpreted = pytest.mark.skipif(importlib.util.find_spec("triton") is None
                                 or triton_unavailable_reason("cpu") is not None,
                                 reason=str(triton_unavailable_reason("cpu")))
BACKENDS = ["cpu", pytest.param("triton", marks=interpreted)]


def run(x, backend, chunk, dtype, act="silu"):
    leaves = {n: v.to(dtype).detach().requires_grad_() for n, v in x.items() if n != "initial_state"}
    init = tuple(s.to(dtype).detach().requires_grad_() for s in x["initial_state"])
    o, state = ops.titan_mlp_update(**leaves, initial_state=init, chunk_size=chunk, activation=act,
                                    backend=backend)
    outs = (o, *state)
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype) for t in outs]
    sum((t * wt).sum() for t, wt in zip(outs, w)).backward()
    grads = {n: v.grad for n, v in leaves.items()}
    grads.update({f"d{n}0": s.grad for n, s in zip(NAMES, init)})
    return outs, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("shape,chunk", [((1, 9, 1, 4, 8), 1), ((2, 37, 2, 6, 10), 4),
                                         ((1, 70, 2, 16, 32), 16), ((1, 100, 1, 24, 48), 64)])
def test_backend_matches_reference(shape, chunk, act, backend):
    x = mlp_inputs(*shape)
    ref_out, ref_g = run(x, "reference", chunk, torch.float64, act)
    out, g = run(x, backend, chunk, torch.float32, act)
    assert ops.last_backend("titan_mlp_update") == backend
    assert ref_out[0].abs().max() < 10  # a meaningful comparison, not two overflows
    for a, b in zip(out, ref_out):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-5
    assert set(g) == set(ref_g)
    for n in ref_g:
        assert rel_err(g[n], ref_g[n]) < 1e-5, n


def test_cpu_float64_exact_and_chosen_automatically():
    x = mlp_inputs(2, 21, 2, 8, 12)
    ref_out, ref_g = run(x, "reference", 8, torch.float64, "gelu")
    out, g = run(x, None, 8, torch.float64, "gelu")
    assert ops.last_backend("titan_mlp_update") == "cpu"
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(out, ref_out))
    assert all(rel_err(g[n], ref_g[n]) < 1e-12 for n in ref_g)


def test_cpu_gradcheck_float64():
    x = mlp_inputs(1, 7, 1, 3, 5)
    names = ("q", "k", "v", "theta", "eta", "alpha")
    leaves = [x[n].clone().requires_grad_() for n in names]
    init = [s.clone().requires_grad_() for s in x["initial_state"]]

    def f(*args):
        o, st = ops.titan_mlp_update(*args[:6], initial_state=tuple(args[6:]), chunk_size=3, backend="cpu")
        return (o, *st)

    assert torch.autograd.gradcheck(f, (*leaves, *init), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_equals_whole_and_leaves_inputs_alone(backend):
    x = {n: (v.float() if n != "initial_state" else tuple(s.float() for s in v)) for n, v in mlp_inputs(2, 50, 2, 8, 16).items()}
    before = {n: (v.clone() if n != "initial_state" else tuple(s.clone() for s in v)) for n, v in x.items()}
    o_whole, st_whole = ops.titan_mlp_update(**x, chunk_size=8, backend=backend)
    st, outs = x["initial_state"], []
    for t0, t1 in ((0, 8), (8, 40), (40, 50)):  # segment boundaries on chunk boundaries
        seg = {n: v[:, t0:t1] for n, v in x.items() if n != "initial_state"}
        o, st = ops.titan_mlp_update(**seg, initial_state=st, chunk_size=8, backend=backend)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), o_whole) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(st, st_whole))
    for n, v in before.items():
        for a, b in zip(v if n == "initial_state" else (v,), x[n] if n == "initial_state" else (x[n],)):
            assert torch.equal(a, b), n


@interpreted
def test_triton_float64_states():
    x = mlp_inputs(1, 21, 2, 8, 12)
    ref_out, ref_g = run(x, "reference", 8, torch.float64, "silu")
    out, g = run(x, "triton", 8, torch.float64, "silu")
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(out, ref_out))
    assert all(rel_err(g[n], ref_g[n]) < 1e-12 for n in ref_g)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_on_gpu_matches_reference(dtype, tol):
    x = mlp_inputs(2, 200, 4, 64, 128)
    x = {n: (v.to(dtype).double() if n != "initial_state" else tuple(s.to(dtype).double() for s in v))
         for n, v in x.items()}
    ref_out, ref_g = run(x, "reference", 16, torch.float64, "silu")
    cuda = {n: (v.cuda() if n != "initial_state" else tuple(s.cuda() for s in v)) for n, v in x.items()}
    out, g = run(cuda, "triton", 16, dtype, "silu")
    assert ops.last_backend("titan_mlp_update") == "triton"
    for a, b in zip(out, ref_out):
        assert rel_err(a.cpu(), b) < tol
    for n in ref_g:
        assert rel_err(g[n].cpu(), ref_g[n]) < 2 * tol, n
