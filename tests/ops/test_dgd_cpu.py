"""The C++ `cpu` backend of dgd_update against the float64 reference: outputs, final state
and every input gradient."""

import pytest
import torch

from nested_learning import ops
from tests.helpers import dgd_inputs, rel_err, run_python

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends("dgd_update", "cpu"),
                                reason="nested_learning._C is not built")

NAMES = ["q", "k", "w", "alpha", "eta", "a", "initial_state"]


def run(x, backend, read, chunk, dtype):
    leaves = {n: (v.to(dtype).detach().requires_grad_() if v is not None else None) for n, v in x.items()}
    o, s = ops.dgd_update(**leaves, read=read, chunk_size=chunk, backend=backend)
    g = torch.Generator().manual_seed(1)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
    ws = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.device, s.dtype)
    ((o * wo).sum() + (s * ws).sum()).backward()
    return o, s, {n: v.grad for n, v in leaves.items() if v is not None}


CASES = [(shape, read, chunk, dtype, tol)
         for shape in [(1, 1, 1, 48, 48), (1, 63, 1, 64, 64), (2, 100, 2, 100, 48)]
         for read in ("after", "before") for chunk in (16, 32, 64)
         for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5))]
CASES += [((1, 1000, 1, 48, 64), read, 64, torch.float32, 1e-5) for read in ("after", "before")]


@pytest.mark.parametrize("shape,read,chunk,dtype,tol", CASES)
def test_cpu_backend_matches_reference(shape, read, chunk, dtype, tol):
    x = dgd_inputs(*shape)
    o_ref, s_ref, g_ref = run(x, "reference", read, chunk, torch.float64)
    o, s, g = run(x, "cpu", read, chunk, dtype)
    assert ops.last_backend("dgd_update") == "cpu"
    assert o.dtype == dtype and rel_err(o, o_ref) < tol and rel_err(s, s_ref) < tol
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) < tol, n


@pytest.mark.parametrize("erase,state", [(False, False), (True, False), (False, True)])
def test_cpu_backend_optional_inputs(erase, state):
    x = dgd_inputs(2, 21, 2, 6, 5, erase=erase, state=state)
    o_ref, s_ref, g_ref = run(x, "reference", "before", 8, torch.float64)
    o, s, g = run(x, "cpu", "before", 8, torch.float64)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12
    assert set(g) == set(g_ref) and all(rel_err(g[n], g_ref[n]) < 1e-12 for n in g)


def test_cpu_backend_gradcheck():
    x = dgd_inputs(1, 6, 2, 3, 2)
    args = [x[n].detach().requires_grad_() for n in NAMES]
    f = lambda *a: ops.dgd_update(*a[:5], a=a[5], initial_state=a[6], read="after", chunk_size=4, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, args)


def test_cpu_backend_is_chosen_automatically_and_bf16_inputs_work():
    x = dgd_inputs(1, 30, 2, 16, 16, state=False)
    xb = {n: (v.bfloat16() if v is not None else None) for n, v in x.items()}
    o, s = ops.dgd_update(**xb)
    assert ops.last_backend("dgd_update") == "cpu" and o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, _ = ops.dgd_update(**{n: (v.double() if v is not None else None) for n, v in xb.items()}, backend="reference")
    assert rel_err(o, o_ref) < 1e-2


@pytest.mark.parametrize("read", ["after", "before"])
def test_cpu_backward_without_forward_residuals_matches(read):
    """The backward recomputes the chunk-start states and R when the forward kept none (as
    under torch.compile, or when the residuals were not stashed): same gradients."""
    from nested_learning.ops import _backend
    from nested_learning.ops import dgd as dgd_mod

    x = dgd_inputs(2, 77, 2, 24, 40, erase=True, state=True)
    leaves = [x[n].detach().requires_grad_() for n in NAMES]
    o, s = ops.dgd_update(*leaves[:5], a=leaves[5], initial_state=leaves[6], read=read, backend="cpu")
    g = torch.Generator().manual_seed(3)
    do, ds = torch.randn(o.shape, generator=g, dtype=o.dtype), torch.randn(s.shape, generator=g, dtype=s.dtype)
    with_res = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
    backend = _backend.get("dgd_update", "cpu")
    inputs = [v.detach() for v in leaves]
    without = backend.backward([do, ds], inputs, read, 64)
    for n, a, b in zip(NAMES, with_res, without):
        assert rel_err(a, b) < 1e-12, n
    _, res = dgd_mod._cpu_forward_with_residuals(*inputs, read, 64)
    again = backend.backward([do, ds], inputs + res, read, 64)
    for n, a, b in zip(NAMES, with_res, again):
        assert torch.equal(a, b), n


def test_forward_residuals_are_saved_for_the_backward_and_not_kept_elsewhere():
    from nested_learning.ops import _define

    x = dgd_inputs(1, 40, 2, 8, 8)
    q = x["q"].float().requires_grad_()
    o, s = ops.dgd_update(q, *(x[n].float() for n in NAMES[1:5]), backend="cpu")
    assert len(o.grad_fn.saved_tensors) == len(NAMES) + 2  # the inputs, then the checkpoints and R
    assert not _define._RESIDUALS  # taken by the autograd context as the forward returned
    o.sum().backward()
    assert q.grad is not None
    with torch.no_grad():  # nothing kept when no gradient is wanted
        ops.dgd_update(q, *(x[n].float() for n in NAMES[1:5]), backend="cpu")
    assert not _define._RESIDUALS


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_backend_head_groups_at_any_thread_count(threads):
    """A task runs a group of adjacent heads, sized by the thread count (6 heads: groups of 6, 3
    or 2 here); every grouping gives the reference's outputs and gradients."""
    x = dgd_inputs(1, 90, 6, 16, 24, erase=True, state=True)
    o_ref, s_ref, g_ref = run(x, "reference", "after", 32, torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        o, s, g = run(x, "cpu", "after", 32, torch.float64)
    finally:
        torch.set_num_threads(before)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) < 1e-12, n


def test_large_buffers_are_recycled():
    """The output and the checkpoint and R buffers go back to a pool when their tensors die, and
    the next call of the same sizes takes them (no fresh pages), fully rewritten."""
    N = torch.ops.nested_learning_C
    x = dgd_inputs(1, 700, 3, 32, 32)
    args = [x[n].float().contiguous() for n in ("q", "k", "w", "alpha", "eta")]
    args.append(args[1])
    first = N.dgd_fwd(*args, None, True, 32, True)
    pooled = [first[0], first[2], first[3]]  # o, checkpoints, R: all over 128 KiB
    ptrs = sorted(t.data_ptr() for t in pooled)
    kept = [t.clone() for t in first]
    del first, pooled
    second = N.dgd_fwd(*args, None, True, 32, True)
    assert sorted(t.data_ptr() for t in (second[0], second[2], second[3])) == ptrs
    for a, b in zip(kept, second):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_buffer_pool_can_be_turned_off():
    code = ("import torch; from nested_learning import ops; from tests.helpers import dgd_inputs, rel_err\n"
            "x = {n: v.detach().requires_grad_() if v is not None else None for n, v in dgd_inputs(2, 50, 2, 16, 16).items()}\n"
            "o, s = ops.dgd_update(**x, backend='cpu'); (o.sum() + s.sum()).backward()\n"
            "y = {n: v.detach().requires_grad_() if v is not None else None for n, v in dgd_inputs(2, 50, 2, 16, 16).items()}\n"
            "p, t = ops.dgd_update(**y, backend='reference'); (p.sum() + t.sum()).backward()\n"
            "assert rel_err(o, p) < 1e-12 and rel_err(x['q'].grad, y['q'].grad) < 1e-12\n")
    r = run_python("-c", code, timeout=300, NESTED_LEARNING_CPU_POOL_MB="0")
    assert r.returncode == 0, r.stderr
