"""The self-modifying mixer with its projection recurrence as one op (fused_projection=True, the
default: ops.selfmod_projection) against the per-chunk Python loop it replaced
(fused_projection=False): outputs, states, the input's and the parameters' gradients agree to
float rounding (the op's write is token by token, the loop's dgd_update call chunk-parallel),
for every memory variant, with pending tokens, partial chunks, a state carried on, stop-gradient
and differentiable writes, and without autograd."""

from __future__ import annotations

import pytest
import torch

from nested_learning import ops
from nested_learning.layers.self_modifying import SelfModifyingState, SelfModifyingTitans
from tests.helpers import rel_err


def close(a, b):  # norm-wise relative difference: float32 rounding, accumulated over the chunks
    assert rel_err(a, b) < 1e-5


def _run(fused: bool, T: int, pending: int, monkeypatch, **kw):
    monkeypatch.setattr(SelfModifyingTitans, "fused_projection", fused)
    torch.manual_seed(0)
    m = SelfModifyingTitans(32, 2, proj_chunk=8, **kw)
    st = m.init_state(2, "cpu", torch.float32)
    if pending:
        with torch.no_grad():
            _, st = m(torch.randn(2, pending, 32), st)
    x = torch.randn(2, T, 32, requires_grad=True)
    y, st2 = m(x, st)
    nxt = SelfModifyingState(st2.proj.detach(), st2.memory.detach(), st2.pending, st2.pending_valid)
    y2, _ = m(torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1)), nxt)  # the state carries on
    (y.square().sum() + y2.square().sum()).backward()
    return y.detach(), st2, y2.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"self_modifying": False}, {"residual": False}, {"memory_target": "values"},
                                {"differentiable_writes": True}])
@pytest.mark.parametrize("T,pending", [(37, 3), (32, 0), (5, 6)])
def test_the_op_equals_the_loop(kw, T, pending, monkeypatch):
    a = _run(True, T, pending, monkeypatch, **kw)
    if kw.get("self_modifying", True):
        assert ops.last_backend("selfmod_projection") in ops.available_backends("selfmod_projection", "cpu")
    b = _run(False, T, pending, monkeypatch, **kw)
    for i in (0, 2, 3):
        close(a[i], b[i])
    for f in ("proj", "memory"):
        close(getattr(a[1], f), getattr(b[1], f))
    for f in ("pending", "pending_valid"):
        assert torch.equal(getattr(a[1], f), getattr(b[1], f)), f
    for n in a[4]:  # (P0 has none with differentiable writes from a state made without autograd)
        assert (a[4][n] is None) == (b[4][n] is None), n
        if a[4][n] is not None:
            close(a[4][n], b[4][n])


@pytest.mark.parametrize("grad", [True, False])
def test_the_op_equals_the_loop_without_autograd_too(grad, monkeypatch):
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(SelfModifyingTitans, "fused_projection", fused)
        torch.manual_seed(0)
        m = SelfModifyingTitans(32, 2, proj_chunk=8)
        x = torch.randn(2, 45, 32)
        with torch.set_grad_enabled(grad):
            y, st = m(x, m.init_state(2, "cpu", torch.float32))
            y2, _ = m(x, st)
        outs.append((y.detach(), st.proj.detach(), y2.detach()))
    for a, b in zip(*outs):
        close(a, b)
