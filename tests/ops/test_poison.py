"""NaN-poisoned allocations and NaN around the inputs never leak into outputs."""

import torch

from nested_learning import ops
from tests.helpers import dgd_inputs, titan_inputs


def embed_in_nan(x: torch.Tensor) -> torch.Tensor:
    """The same values as a strided view into a larger NaN-filled buffer."""
    if x is None:
        return None
    big = torch.full([2 * s + 3 for s in x.shape], float("nan"), dtype=x.dtype)
    view = big[tuple(slice(1, 1 + 2 * s, 2) for s in x.shape)]
    view.copy_(x)
    return view


def run_all(wrap):
    d = dgd_inputs(2, 37, 2, 5, 6)
    t = titan_inputs(2, 37, 2, 5, 6)
    st = ops.CMSState.create(wrap(torch.randn(3, 4, dtype=torch.float64)), 8, batch_size=2)
    h, W = torch.randn(2, 9, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 9))
    outs = []
    for read in ("after", "before"):
        outs += ops.dgd_update(**{n: wrap(v) for n, v in d.items()}, read=read, chunk_size=16)
    o, (M, S) = ops.titan_update(**{n: wrap(v) for n, v in t.items() if n != "initial_state"},
                                 initial_state=tuple(map(wrap, t["initial_state"])), chunk_size=16)
    outs += [o, M, S]
    st2, up = ops.cms_update(st, wrap(torch.randn(2, 21, 4, dtype=torch.float64)),
                             wrap(torch.randn(2, 21, 3, dtype=torch.float64)), lr=0.1, optimizer="dgd")
    outs += [st2.weight, st2.buffer_x, up.update_norms]
    outs += list(ops.linear_cross_entropy(wrap(h), wrap(W), y))
    g = torch.Generator().manual_seed(2)
    x, P = torch.randn(2, 37, 2, 5, generator=g, dtype=torch.float64), torch.randn(2, 2, 17, 5, generator=g, dtype=torch.float64)
    gb = torch.tensor([[0.0, 3.0], [1.0, 2.0]], dtype=torch.float64)
    xs, Ps = wrap(x).requires_grad_(), wrap(P).requires_grad_()
    ysm, Psm = ops.selfmod_projection(xs, Ps, wrap(gb), chunk_size=8)
    outs += [ysm, Psm, *torch.autograd.grad((ysm.sum() + Psm.sum()), (xs, Ps))]
    return outs


def test_poisoned_allocations_do_not_leak(poisoned_allocations):
    torch.manual_seed(1)
    outs = run_all(lambda x: x)
    assert all(torch.isfinite(o).all() for o in outs)


def test_nan_around_strided_inputs_does_not_leak():
    torch.manual_seed(1)
    clean = run_all(lambda x: x)
    torch.manual_seed(1)
    strided = run_all(embed_in_nan)
    for a, b in zip(clean, strided):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
