"""gradcheck of every op's autograd formula (float64, tiny shapes) and torch.compile tracing."""

import pytest
import torch

from nested_learning import ops
from tests.helpers import F64, dgd_inputs, titan_inputs


def leaf(x):
    return x.detach().clone().requires_grad_()


def dgd_case(read):
    x = dgd_inputs(1, 5, 2, 3, 2)
    names = ["q", "k", "w", "alpha", "eta", "a", "initial_state"]
    args = [leaf(x[n]) for n in names]
    return (lambda *a: ops.dgd_update(*a[:5], a=a[5], initial_state=a[6], read=read, chunk_size=2)), args


def titan_case():
    x = titan_inputs(1, 5, 2, 3, 2)
    args = [leaf(x[n]) for n in ("q", "k", "v", "theta", "eta", "alpha")]
    args += [leaf(s) for s in x["initial_state"]]
    def f(*a):
        o, (M, S) = ops.titan_update(*a[:6], initial_state=(a[6], a[7]), chunk_size=2)
        return o, M, S

    return f, args


def titan_mlp_case():
    x = titan_inputs(1, 5, 1, 3, 3, state=False)
    args = [leaf(x[n]) for n in ("q", "k", "v", "theta", "eta", "alpha")]
    args += [leaf(0.3 * torch.randn(1, 1, *s, dtype=F64)) for s in ((3, 4), (4, 3), (3, 4), (4, 3))]
    def f(*a):
        o, state = ops.titan_mlp_update(*a[:6], initial_state=a[6:], chunk_size=2)
        return (o, *state)

    return f, args


def selfmod_case(stop_writes):
    g = torch.Generator().manual_seed(0)
    x, P = torch.randn(1, 9, 2, 3, generator=g, dtype=F64), 0.5 * torch.randn(1, 2, 11, 3, generator=g, dtype=F64)
    gb = torch.tensor([[0.0, 2.0], [0.5, 3.0]], dtype=F64)
    valid = torch.rand(1, 9, generator=g) > 0.2

    def f(x, P, gb):
        return ops.selfmod_projection(x, P, gb, valid, chunk_size=4, stop_writes=stop_writes)

    return f, [leaf(x), leaf(P), leaf(gb)]


def cms_case(optimizer):
    W, xs, ds = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 7, 4, dtype=F64), torch.randn(2, 7, 3, dtype=F64)
    args = [leaf(W), leaf(xs), leaf(ds)]

    def f(W, xs, ds):
        st = ops.CMSState.create(W, 3, optimizer=optimizer)
        st, up = ops.cms_update(st, xs, ds, lr=0.1, optimizer=optimizer, alpha=0.9)
        return st.weight, st.buffer_x, st.buffer_delta, up.update_norms

    return f, args


def ce_case(reduction):
    h, W = torch.randn(2, 4, 5, dtype=F64), torch.randn(7, 5, dtype=F64)
    y = torch.tensor([[1, 2, -100, 3], [0, 6, 5, -100]])
    return (lambda h, W: ops.linear_cross_entropy(h, W, y, reduction=reduction)[0]), [leaf(h), leaf(W)]


CASES = {
    "dgd_after": lambda: dgd_case("after"),
    "dgd_before": lambda: dgd_case("before"),
    "titan": titan_case,
    "titan_mlp": titan_mlp_case,
    "selfmod": lambda: selfmod_case(False),
    "cms_gd": lambda: cms_case("gd"),
    "cms_momentum": lambda: cms_case("momentum"),
    "cms_dgd": lambda: cms_case("dgd"),
    "ce_mean": lambda: ce_case("mean"),
    "ce_none": lambda: ce_case("none"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck(case):
    # (selfmod_projection's stop-gradient writes give the straight-through gradient, not the
    # function's derivative: tests/ops/test_selfmod.py checks that formula instead)
    f, args = CASES[case]()
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


def _total(out):
    flat = out if isinstance(out, (tuple, list)) else [out]
    tot = 0
    for o in flat:
        tot = tot + (_total(o) if isinstance(o, (tuple, list)) else o.sum())
    return tot


@pytest.mark.parametrize("case", ["dgd_before", "titan", "titan_mlp", "selfmod", "selfmod_stop_writes", "cms_dgd",
                                  "ce_mean"])
@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward(case):
    # inductor (the default backend) also checks that real outputs match the fakes' strides
    torch._dynamo.reset()
    f, args = selfmod_case(True) if case == "selfmod_stop_writes" else CASES[case]()
    eager = _total(f(*args)) * 2 + 1
    g_eager = torch.autograd.grad(eager, args)
    compiled = torch.compile(lambda *a: _total(f(*a)) * 2 + 1, fullgraph=True)
    got = compiled(*args)
    g_got = torch.autograd.grad(got, args)
    assert torch.allclose(got, eager)
    for a, b in zip(g_got, g_eager):
        assert torch.allclose(a, b)

