"""The Triton backend of cms_update (nested_learning/kernels/cms.py) against the float64 reference: the new
weight, momentum, ring buffers and update norms for gd, momentum and dgd, periods 1 to 40 with
the buffer part-filled on entry, awkward Din x Dout, float32 and bf16, the streamed dgd kernel
for wide rows, and streamed in pieces == whole. On the CPU it runs through Triton's
interpreter (allocations poisoned with NaN); the `gpu` tests run the compiled kernels."""

import importlib.util
from dataclasses import replace

import pytest
import torch

from nested_learning import ops
from nested_learning.kernels import triton_unavailable_reason
from tests.helpers import F64, rel_err

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
interpreted = pytest.mark.skipif(triton_unavailable_reason("cpu") is not None,
                                 reason=str(triton_unavailable_reason("cpu")))
OPTIMIZERS = ops.FUSED_OPTIMIZERS  # the inner optimizers the kernels fuse

FIELDS = ("weight", "momentum", "buffer_x", "buffer_delta")


def make(B, T, Din, Dout, period, optimizer, filled, seed=0):
    """A float64 state with `filled` buffered tokens (and a nonzero momentum), and T new tokens."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    bx, bd = torch.zeros(B, period, Din, dtype=F64), torch.zeros(B, period, Dout, dtype=F64)
    bx[:, :filled], bd[:, :filled] = r(B, filled, Din) / Din**0.5, r(B, filled, Dout)
    m = 0.1 * r(B, Dout, Din) / Din**0.5 if optimizer == "momentum" else None
    W = r(B, Dout, Din) / Din**0.5
    st = ops.CMSState(weight=W, buffer_x=bx, buffer_delta=bd, filled=filled, momentum=m)
    return st, r(B, T, Din) / Din**0.5, r(B, T, Dout)


def cast(st, fn):
    return replace(st, **{f: None if getattr(st, f) is None else fn(getattr(st, f)) for f in FIELDS})


def run(st, x, d, optimizer, backend, dtype, device="cpu"):
    st = cast(st, lambda t: t.to(device, dtype))
    st = replace(st, weight=st.weight.transpose(1, 2).contiguous().transpose(1, 2))  # same values, strided
    x, d = x.to(device, dtype), d.to(device, dtype)
    before = [t.clone() for t in (st.weight, st.buffer_x, x)]
    new, up = ops.cms_update(st, x, d, lr=0.05, optimizer=optimizer, beta=0.9, alpha=0.95, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(before, (st.weight, st.buffer_x, x)))  # inputs never written
    return new, up


def check(optimizer, args, dtype, tol, device="cpu"):
    st, x, d = args
    ref, ref_up = run(st, x, d, optimizer, "reference", F64)
    got, up = run(st, x, d, optimizer, "triton", dtype, device)
    assert ops.last_backend("cms_update") == "triton"
    for f in FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype and rel_err(a.cpu(), b) < tol, f
    assert up.update_norms.dtype == dtype and up.update_norms.shape == ref_up.update_norms.shape
    assert rel_err(up.update_norms.cpu(), ref_up.update_norms) < tol
    assert up.token_index == ref_up.token_index
    assert (got.filled, got.updates) == (ref.filled, ref.updates)


@interpreted
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("period", [1, 4, 5, 16])
@pytest.mark.parametrize("Din,Dout", [(24, 40), (100, 48)])
def test_triton_matches_reference_float32(optimizer, period, Din, Dout, poisoned_allocations):
    check(optimizer, make(2, 37, Din, Dout, period, optimizer, filled=period // 2), torch.float32, 1e-5)


@interpreted
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_triton_column_and_token_tiles(optimizer, poisoned_allocations):
    # Din 150: two 128-column tiles (gd, momentum) or 16-token tiles (dgd); period 40: 2+ token tiles
    check(optimizer, make(1, 90, 150, 20, 40, optimizer, filled=7), torch.float32, 1e-5)


@interpreted
@pytest.mark.parametrize("period,T", [(1, 12), (5, 23), (40, 90)])
@pytest.mark.slow
def test_triton_dgd_wide_rows_streamed(period, T, monkeypatch, poisoned_allocations):
    from nested_learning.kernels import cms as kernels

    monkeypatch.setattr(kernels, "ONCHIP_DGD_DIN", 16)  # Din 100: W through memory, 4 column tiles
    monkeypatch.setattr(kernels, "STREAM_BK", 32)
    check("dgd", make(2, T, 100, 40, period, "dgd", filled=period // 2), torch.float32, 1e-5)


@interpreted
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_triton_bf16_inputs(optimizer):
    st, x, d = make(2, 40, 48, 24, 4, optimizer, filled=3)
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731  the bf16-representable values
    check(optimizer, (cast(st, bf), bf(x), bf(d)), torch.bfloat16, 1e-2)


@interpreted
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_triton_streamed_in_pieces_equals_whole(optimizer):
    period = 16
    ref0, xs64, ds64 = make(2, 83, 24, 40, period, optimizer, filled=0)
    st0, xs, ds = cast(ref0, torch.Tensor.float), xs64.float(), ds64.float()
    kw = dict(lr=0.05, optimizer=optimizer, backend="triton")
    whole, up = ops.cms_update(st0, xs, ds, **kw)
    st, applied, seen = st0, [], 0
    for size in (5, 11, 1, 30, 16, 20):  # sums to 83, splits chunks everywhere
        st, u = ops.cms_update(st, xs[:, seen:seen + size], ds[:, seen:seen + size], **kw)
        applied += [seen + i for i in u.token_index]
        seen += size
    assert applied == [15, 31, 47, 63, 79] == list(up.token_index)  # exactly one per period
    assert st.updates == whole.updates == 5 and st.filled == whole.filled == 3
    assert rel_err(st.weight, whole.weight) < 1e-6
    if optimizer == "momentum":
        assert rel_err(st.momentum, whole.momentum) < 1e-6
    assert torch.equal(st.buffer_x, whole.buffer_x) and torch.equal(st.buffer_delta, whole.buffer_delta)
    assert torch.equal(st.buffer_x[:, :3], xs[:, 80:]) and torch.count_nonzero(st.buffer_x[:, 3:]) == 0
    ref, _ = ops.cms_update(ref0, xs64, ds64, lr=0.05, optimizer=optimizer, backend="reference")
    assert rel_err(st.weight, ref.weight) < 1e-5


@interpreted
def test_triton_backward_is_the_references():
    W, xs, ds = (torch.randn(*s, dtype=F64) for s in ((2, 3, 20), (2, 9, 20), (2, 9, 3)))
    w = torch.randn(2, 3, 20, dtype=F64)

    def grads(backend):
        leaves = [t.clone().requires_grad_() for t in (W, xs, ds)]
        st = ops.CMSState.create(leaves[0], 4, optimizer="dgd")
        st, up = ops.cms_update(st, leaves[1], leaves[2], lr=0.1, optimizer="dgd", alpha=0.9, backend=backend)
        return torch.autograd.grad((st.weight * w).sum() + up.update_norms.sum(), leaves)

    for a, b in zip(grads("triton"), grads("reference")):
        assert rel_err(a, b) < 1e-12


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("Din,Dout", [(512, 512), (1024, 256)])  # dgd at Din 1024: the streamed kernel
def test_triton_on_gpu_matches_reference(optimizer, dtype, tol, Din, Dout):
    st, x, d = make(8, 256, Din, Dout, 16, optimizer, filled=5)
    rnd = lambda t: t.to(dtype).double()  # noqa: E731  the values representable in dtype
    check(optimizer, (cast(st, rnd), rnd(x), rnd(d)), dtype, tol, device="cuda")
