"""titan_mlp_update(curvature_bound=True): the Titans MLP memory's step bound (MATH 3.3) inside
the op's chunk loop. It equals, bit for bit, a call per chunk with theta scaled by
bounded_step at the chunk's start weights (what the layer did before), forward and backward,
where the bound binds and where it does not; every backend agrees with the float64 reference;
the cheap curvature test never passes a chunk whose exact factor is below 1."""

from __future__ import annotations

import pytest
import torch

from nested_learning import ops
from nested_learning.ops.titan import bound_factor, bounded_step, chunk_scan, mlp_curvature
from tests.helpers import rel_err
from tests.ops.test_titan import mlp_inputs
from tests.ops.test_titan_mlp_backends import BACKENDS

NAMES = ("q", "k", "v", "theta", "eta", "alpha")


def _inputs(binding: bool, dtype=torch.float32, B=2, T=45, H=2, d=8, hid=16):
    torch.manual_seed(0)  # mlp_inputs draws the momenta from the global generator
    x = mlp_inputs(B, T, H, d, hid)
    if binding:  # grown weights and a large learning rate: the factor falls below 1 in some chunks
        x["initial_state"] = tuple(4 * s for s in x["initial_state"])
        x["theta"] = 0.5 + 0.5 * x["theta"]
    else:  # a small learning rate: the factor is exactly 1 everywhere
        x["theta"] = 0.05 * x["theta"]
    leaves = [x[n].to(dtype).detach().requires_grad_() for n in NAMES]
    init = [s.to(dtype).detach().requires_grad_() for s in x["initial_state"]]
    return leaves, init


def _per_chunk(leaves, init, chunk, backend):
    """The layer before issue 32: one op call per chunk with theta bounded in Python."""
    q, k, v, theta, eta, alpha = leaves
    state, outs = tuple(init), []
    for s in range(0, q.shape[1], chunk):
        c = slice(s, s + chunk)
        th = theta[:, c] * bounded_step(theta[:, c], mlp_curvature(k[:, c], state[0], state[1]), eta[:, c],
                                        alpha[:, c], chunk)
        o, state = ops.titan_mlp_update(q[:, c], k[:, c], v[:, c], th, eta[:, c], alpha[:, c], initial_state=state,
                                        chunk_size=chunk, backend=backend)
        outs.append(o)
    return (torch.cat(outs, 1), *state)


def _one_call(leaves, init, chunk, backend):
    o, state = ops.titan_mlp_update(*leaves, initial_state=tuple(init), chunk_size=chunk, backend=backend,
                                    curvature_bound=True)
    return (o, *state)


def _grads(outs, leaves, init):
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in outs]
    return torch.autograd.grad(sum((t * wt).sum() for t, wt in zip(outs, w)), [*leaves, *init])


@pytest.mark.parametrize("binding", [False, True])
@pytest.mark.parametrize("chunk", [4, 16])
def test_one_call_equals_a_call_per_chunk_bit_for_bit(binding, chunk):
    leaves, init = _inputs(binding)
    if binding:  # the case really binds: some chunk's factor is below 1
        q, k, v, theta, eta, alpha = leaves
        f = bounded_step(theta[:, :chunk], mlp_curvature(k[:, :chunk], init[0], init[1]), eta[:, :chunk],
                         alpha[:, :chunk], chunk)
        assert float(f.min()) < 0.5
    a, b = _one_call(leaves, init, chunk, "cpu"), _per_chunk(leaves, init, chunk, "cpu")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(_grads(a, leaves, init), _grads(b, leaves, init)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("binding", [False, True])
def test_backends_with_the_bound_match_the_reference(backend, binding):
    """float32 backends against the float64 reference, with the factor exactly 1 (the cheap
    test's path) and far below 1 (the spectral norms, the saved factors in the backward)."""
    leaves64, init64 = _inputs(binding, torch.float64)
    ref = _one_call(leaves64, init64, 4, "reference")
    unbounded = ops.titan_mlp_update(*leaves64, initial_state=tuple(init64), chunk_size=4, backend="reference")[0]
    assert torch.equal(ref[0], unbounded) != binding  # the bound binds exactly where it should
    ref_g = _grads(ref, leaves64, init64)
    leaves, init = _inputs(binding, torch.float32)
    out = _one_call(leaves, init, 4, backend)
    assert ops.last_backend("titan_mlp_update") == backend
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(out, ref))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(_grads(out, leaves, init), ref_g))


def test_where_the_bound_binds_the_cpu_backend_matches_the_reference_in_float64():
    """With factors far below 1 (down to 0.002 here), in float64. The factor itself is computed
    in float32 (the spectral norms of the float32 weights, as the layer always did), so a
    last-bit difference of the two backends' states can move it by a float32 rounding:
    the outputs agree to 1e-12 and the gradients to 1e-5."""
    leaves, init = _inputs(True, torch.float64)
    ref = _one_call(leaves, init, 4, "reference")
    out = _one_call(leaves, init, 4, "cpu")
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(out, ref))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(_grads(out, leaves, init), _grads(ref, leaves, init)))


def test_the_cheap_curvature_never_passes_a_chunk_the_exact_one_bounds():
    """The spectral norms are skipped where a larger (cheaper) curvature already gives a factor of
    exactly 1: the cheap one is an upper bound, and the factor falls as the curvature grows."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        B, C, H, d, h = 2, 8, 2, 6, 12
        scale = 0.5 + 3 * trial / 40
        W1, W2 = (scale * torch.randn(B, H, *s, generator=g) / s[1] ** 0.5 for s in ((d, h), (h, d)))
        k = torch.nn.functional.normalize(torch.randn(B, C, H, d, generator=g), dim=-1)
        theta, eta, alpha = (torch.rand(B, C, H, generator=g) for _ in range(3))
        theta = theta * 0.2
        coef = tuple(t.double() for t in chunk_scan(eta, alpha, C))
        cheap, exact = (mlp_curvature(k, W1, W2, exact=e) for e in (False, True))
        assert bool((cheap >= exact).all())
        if bool((bound_factor(theta, cheap, coef, C) == 1).all()):
            assert bool((bound_factor(theta, exact, coef, C) == 1).all())
        assert bool((bound_factor(theta, cheap, coef, C) <= bound_factor(theta, exact, coef, C)).all())
