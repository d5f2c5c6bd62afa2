"""The self-modifying mixer's two schedules for stop-gradient writes: one autograd graph per
projection chunk (batched_reads=False, the default) and the chunk recurrence without autograd
plus one batched read of every chunk (opt-in). Outputs, states and the input's gradient are equal
bit for bit; the parameters' gradients equal to float rounding (they sum over chunks in
another order), for every memory variant, with pending tokens and partial chunks."""

from __future__ import annotations

import pytest
import torch

from nested_learning.layers.self_modifying import SelfModifyingState, SelfModifyingTitans


def _run(batched: bool, T: int, pending: int, monkeypatch, **kw):
    monkeypatch.setattr(SelfModifyingTitans, "batched_reads", batched)
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
    return y.detach(), st2, y2.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"self_modifying": False}, {"residual": False}, {"memory_target": "values"}])
@pytest.mark.parametrize("T,pending", [(37, 3), (32, 0), (5, 6)])
def test_batched_reads_equal_the_loop(kw, T, pending, monkeypatch):
    a = _run(True, T, pending, monkeypatch, **kw)
    b = _run(False, T, pending, monkeypatch, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    for f in ("proj", "memory", "pending", "pending_valid"):
        assert torch.equal(getattr(a[1], f), getattr(b[1], f)), f
    for n in a[4]:
        torch.testing.assert_close(a[4][n], b[4][n], rtol=1e-5, atol=1e-6)


def test_differentiable_writes_keep_the_loop(monkeypatch):
    """differentiable_writes=True needs the writes in the graph: the per-chunk loop runs."""
    m = SelfModifyingTitans(32, 2, proj_chunk=8, differentiable_writes=True)
    monkeypatch.setattr(SelfModifyingTitans, "batched_reads", True)
    called = []
    monkeypatch.setattr(SelfModifyingTitans, "_project_stopped", lambda *a: called.append(1))
    m(torch.randn(1, 20, 32), m.init_state(1, "cpu", torch.float32))
    assert not called


@pytest.mark.parametrize("grad", [True, False])
def test_batched_reads_equal_the_loop_without_autograd_too(grad, monkeypatch):
    """Under torch.no_grad (evaluation, generation) the loop reads P_c itself, not P0 + (P_c - P0):
    the batched schedule must too, bit for bit."""
    outs = []
    for batched in (True, False):
        monkeypatch.setattr(SelfModifyingTitans, "batched_reads", batched)
        torch.manual_seed(0)
        m = SelfModifyingTitans(32, 2, proj_chunk=8)
        x = torch.randn(2, 45, 32)
        with torch.set_grad_enabled(grad):
            y, st = m(x, m.init_state(2, "cpu", torch.float32))
            y2, _ = m(x, st)
        outs.append((y.detach(), st.proj.detach(), y2.detach()))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
