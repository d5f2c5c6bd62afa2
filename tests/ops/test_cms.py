import pytest
import torch

from nested_learning import ops
from tests.helpers import F64, rel_err


def stream(B=2, T=50, Din=6, Dout=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, Din, generator=g, dtype=F64),
            torch.randn(B, T, Dout, generator=g, dtype=F64),
            torch.randn(Dout, Din, generator=g, dtype=F64))


def cms_loop(W, xs, ds, period, lr, optimizer, beta=0.9, alpha=1.0):
    """Token by token: accumulate each chunk's terms at the chunk-start weight, apply at its
    last token. Returns final W, norms [B, n] and the token indices that applied."""
    B = xs.shape[0]
    W = W.unsqueeze(0).expand(B, -1, -1).clone()
    m = torch.zeros_like(W)
    G = torch.zeros_like(W)
    XX = torch.zeros(B, W.shape[2], W.shape[2], dtype=W.dtype)
    norms, idx = [], []
    for t in range(xs.shape[1]):
        G += torch.einsum("bo,bi->boi", ds[:, t], xs[:, t])
        XX += torch.einsum("bi,bj->bij", xs[:, t], xs[:, t])
        if (t + 1) % period == 0:
            if optimizer == "gd":
                new = W - lr * G
            elif optimizer == "momentum":
                m = beta * m - lr * G
                new = W + m
            else:
                new = W @ (alpha * torch.eye(W.shape[2], dtype=W.dtype) - lr * XX) - lr * G
            norms.append((new - W).flatten(1).norm(dim=1))
            idx.append(t)
            W, G, XX = new, torch.zeros_like(G), torch.zeros_like(XX)
    return W, (torch.stack(norms, 1) if norms else torch.zeros(B, 0, dtype=W.dtype)), idx


BACKENDS = ops.available_backends("cms_update", "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["gd", "momentum", "dgd"])
@pytest.mark.parametrize("period", [1, 4, 16, 64])
def test_matches_token_loop(optimizer, period, backend):
    xs, ds, W0 = stream()
    st = ops.CMSState.create(W0, period, batch_size=2, optimizer=optimizer)
    ops._backend._LAST.pop("cms_update", None)
    st, up = ops.cms_update(st, xs, ds, lr=0.05, optimizer=optimizer, alpha=0.9, backend=backend)
    # a call in which no chunk completes only fills the buffer: no backend runs
    assert ops.last_backend("cms_update") == (backend if 50 >= period else None)
    W, norms, idx = cms_loop(W0, xs, ds, period, 0.05, optimizer, alpha=0.9)
    assert rel_err(st.weight, W) < 1e-12
    assert up.update_norms.shape == norms.shape and rel_err(up.update_norms, norms) < 1e-12
    assert list(up.token_index) == idx
    assert st.updates == 50 // period and st.filled == 50 % period


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["gd", "momentum", "dgd"])
@pytest.mark.parametrize("period", [1, 5, 64])
@pytest.mark.slow
def test_float32_backends_match_float64_loop(optimizer, period, backend):
    xs, ds, W0 = stream(B=3, T=131, Din=40, Dout=24)
    st = ops.CMSState.create(W0.float(), period, batch_size=3, optimizer=optimizer)
    st, up = ops.cms_update(st, xs.float(), ds.float(), lr=0.01, optimizer=optimizer, alpha=0.95, backend=backend)
    W, norms, _ = cms_loop(W0, xs, ds, period, 0.01, optimizer, alpha=0.95)
    assert st.weight.dtype == torch.float32 and rel_err(st.weight, W) < 1e-5
    assert rel_err(up.update_norms, norms) < 1e-5


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "dgd"])
def test_streamed_in_pieces_equals_whole_and_one_update_per_period(optimizer):
    xs, ds, W0 = stream(T=83)
    period = 16
    whole, up = ops.cms_update(
        ops.CMSState.create(W0, period, 2, optimizer), xs, ds, lr=0.02, optimizer=optimizer
    )
    st, applied, seen = ops.CMSState.create(W0, period, 2, optimizer), [], 0
    for size in (5, 11, 1, 30, 16, 20):  # sums to 83, splits chunks everywhere
        st, u = ops.cms_update(st, xs[:, seen:seen + size], ds[:, seen:seen + size], lr=0.02,
                               optimizer=optimizer)
        applied += [seen + i for i in u.token_index]
        seen += size
    assert seen == 83
    assert applied == [15, 31, 47, 63, 79] == list(up.token_index)  # exactly one per period
    assert st.updates == whole.updates == 5 and st.filled == whole.filled == 3
    assert rel_err(st.weight, whole.weight) < 1e-12
    assert torch.equal(st.buffer_x, whole.buffer_x) and torch.equal(st.buffer_delta, whole.buffer_delta)
    assert torch.count_nonzero(st.buffer_x[:, 3:]) == 0  # cleared slots


def test_period_one_dgd_equals_the_dgd_op():
    # CMS dgd with period 1 is MATH section 2 with a = k = x, w = -lr delta, eta = lr
    xs, ds, W0 = stream(B=2, T=30)
    lr, alpha = 0.05, 0.95
    st, _ = ops.cms_update(ops.CMSState.create(W0, 1, 2), xs, ds, lr=lr, optimizer="dgd", alpha=alpha)
    B, T, _ = xs.shape
    _, W = ops.dgd_update(
        xs.unsqueeze(2), xs.unsqueeze(2), (-lr * ds).unsqueeze(2),
        torch.full((B, T, 1), alpha, dtype=F64), torch.full((B, T, 1), lr, dtype=F64),
        initial_state=W0.expand(B, 1, -1, -1).clone(), chunk_size=8,
    )
    assert rel_err(st.weight, W[:, 0]) < 1e-12


def test_sequences_are_independent():
    xs, ds, W0 = stream(B=3)
    st, _ = ops.cms_update(ops.CMSState.create(W0, 4, 3), xs, ds, lr=0.1)
    one, _ = ops.cms_update(ops.CMSState.create(W0, 4, 1), xs[1:2], ds[1:2], lr=0.1)
    assert rel_err(st.weight[1:2], one.weight) < 1e-14


def test_no_update_before_a_chunk_fills():
    xs, ds, W0 = stream(T=3)
    st0 = ops.CMSState.create(W0, 4, 2)
    st, up = ops.cms_update(st0, xs, ds, lr=0.1)
    assert up.update_norms.shape == (2, 0) and up.token_index == ()
    assert torch.equal(st.weight, st0.weight) and st.filled == 3 and st.updates == 0


def test_call_completing_no_chunk_keeps_the_weight_tensor_and_is_differentiable():
    xall, dall, W0 = stream(B=2, T=16, Din=6, Dout=5)
    xs, ds = xall[:, :7], dall[:, :7]
    st = ops.CMSState.create(W0, 16, batch_size=2, optimizer="momentum")
    x = xs.clone().requires_grad_()
    new, up = ops.cms_update(st, x, ds, lr=0.1, optimizer="momentum")
    assert new.weight is st.weight and new.momentum is st.momentum  # no weight-sized copy
    assert up.update_norms.shape == (2, 0) and up.token_index == () and new.filled == 7
    assert torch.equal(new.buffer_x[:, :7], xs) and torch.equal(new.buffer_delta[:, :7], ds)
    assert not new.buffer_x[:, 7:].any()
    new.buffer_x.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(xs))
    # the next call completes the chunk exactly as one whole call would
    whole, _ = ops.cms_update(st, xall, dall, lr=0.1, optimizer="momentum")
    second, _ = ops.cms_update(new, xall[:, 7:], dall[:, 7:], lr=0.1, optimizer="momentum")
    assert not torch.equal(whole.weight, st.weight)
    assert rel_err(second.weight, whole.weight) < 1e-12 and second.filled == whole.filled == 0
