"""ops.selfmod_projection (the self-modifying projection recurrence, MATH 6): the float64
reference against a token-by-token loop written from the specification; the C++ `cpu` backend
and the Triton kernel (through Triton's interpreter on the CPU) against the reference: reads,
final state and the gradients of x, P and the gate bias, with stop-gradient and differentiable
writes, invalid tokens, chunk sizes that do not divide the length, residual and plain memories;
gradcheck; and the argument checks."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from nested_learning import ops
from nested_learning.kernels import triton_unavailable_reason
from nested_learning.reference.selfmod import selfmod_projection_reference
from tests.helpers import rel_err

F64 = torch.float64
interpreted = pytest.mark.skipif(importlib.util.find_spec("triton") is None
                                 or triton_unavailable_reason("cpu") is not None,
                                 reason=str(triton_unavailable_reason("cpu")))
compiled = pytest.mark.skipif("cpu" not in ops.available_backends("selfmod_projection", "cpu"),
                              reason="nested_learning._C is not built (or predates selfmod_fwd)")
BACKENDS = [pytest.param("cpu", marks=compiled), pytest.param("triton", marks=interpreted)]


def inputs(B, L, H, d, seed=0, drop=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, H, d, generator=g, dtype=F64)
    P = torch.randn(B, H, 3 * d + 2, d, generator=g, dtype=F64) / d**0.5
    P[:, :, 3 * d:] *= 0.1
    gate_bias = torch.stack([torch.randn(H, generator=g, dtype=F64), 2 + torch.rand(H, generator=g, dtype=F64)], 1)
    valid = torch.rand(B, L, generator=g) > drop
    return x, P, gate_bias, valid


def token_loop(x, P, gate_bias, valid, chunk, eta_max, residual):
    """The recurrence from MATH 6, one token at a time with an explicit [R, d] matrix per head."""
    B, L, H, d = x.shape
    ys, P = [], P.clone()
    for s0 in range(0, L, chunk):
        xc = x[:, s0:s0 + chunk]
        y = torch.einsum("bchi,bhoi->bcho", xc, P)
        ys.append(y)
        if xc.shape[1] < chunk:
            break
        for t in range(chunk):
            yt, xt = y[:, t], xc[:, t]  # [B, H, R], [B, H, d]
            add = xt if residual else 0
            k, v = F.normalize(yt[..., d:2 * d] + add, dim=-1), F.normalize(yt[..., 2 * d:3 * d] + add, dim=-1)
            ok = valid[:, s0 + t, None]
            eta = torch.where(ok, eta_max * torch.sigmoid(yt[..., 3 * d] + gate_bias[:, 0]), 0.0)
            alpha = torch.where(ok, torch.sigmoid(yt[..., 3 * d + 1] + gate_bias[:, 1]).clamp(min=1e-4), 1.0)
            w = torch.zeros_like(yt)
            if residual:
                w[..., :3 * d] = (eta[..., None] * (v - k)).repeat(1, 1, 3)
            a = 2 * k - v
            u = w - eta[..., None] * torch.einsum("bhoi,bhi->bho", P, a)
            P = alpha[..., None, None] * P + u[..., None] * k[..., None, :]
    return torch.cat(ys, 1), P


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("L,chunk", [(1, 1), (12, 4), (13, 4), (20, 16), (37, 5)])
def test_reference_equals_the_token_loop(L, chunk, residual):
    x, P, gb, valid = inputs(2, L, 3, 6)
    y, Pf = selfmod_projection_reference(x, P, gb, valid, chunk, 0.3, residual, True)
    y_loop, P_loop = token_loop(x, P, gb, valid, chunk, 0.3, residual)
    assert rel_err(y, y_loop) < 1e-12 and rel_err(Pf, P_loop) < 1e-12


def run(x, P, gb, valid, backend, dtype, chunk, residual=True, stop_writes=True, eta_max=0.3, device="cpu"):
    leaves = [t.to(device, dtype).detach().requires_grad_() for t in (x, P, gb)]
    y, Pf = ops.selfmod_projection(*leaves, valid.to(device), chunk_size=chunk, eta_max=eta_max, residual=residual,
                                   stop_writes=stop_writes, backend=backend)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(t.shape, generator=g, dtype=F64).to(device, t.dtype) for t in (y, Pf)]
    ((y * cot[0]).sum() + (Pf * cot[1]).sum()).backward()
    return y, Pf, [t.grad for t in leaves]


CASES = [((1, 1, 1, 4), 1), ((2, 37, 3, 6), 4), ((1, 48, 2, 32), 16), ((2, 45, 1, 20), 16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,chunk", CASES)
@pytest.mark.parametrize("residual", [True, False])
def test_backend_matches_reference_stop_writes(shape, chunk, residual, backend):
    x, P, gb, valid = inputs(*shape)
    ref = run(x, P, gb, valid, "reference", F64, chunk, residual)
    got = run(x, P, gb, valid, backend, torch.float32, chunk, residual)
    assert ops.last_backend("selfmod_projection") == backend
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert rel_err(got[0], ref[0]) < 1e-5 and rel_err(got[1], ref[1]) < 1e-5
    for name, a, b in zip(("x", "P"), got[2], ref[2]):
        assert rel_err(a, b) < 1e-5, name
    assert got[2][2].abs().max() == 0 and ref[2][2].abs().max() == 0  # the gate bias reaches only the writes


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_differentiable_writes(backend):
    x, P, gb, valid = inputs(2, 37, 2, 6)
    ref = run(x, P, gb, valid, "reference", F64, 8, stop_writes=False)
    got = run(x, P, gb, valid, backend, torch.float32, 8, stop_writes=False)
    assert rel_err(got[0], ref[0]) < 1e-5 and rel_err(got[1], ref[1]) < 1e-5
    for name, a, b in zip(("x", "P", "gate_bias"), got[2], ref[2]):
        assert b.abs().max() > 0 and rel_err(a, b) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_on_gpu_matches_reference(dtype, tol):
    x, P, gb, valid = inputs(2, 333, 4, 64)
    x = x.to(dtype).double()  # the same (representable) inputs for both
    ref = run(x, P, gb, valid, "reference", F64, 16)
    got = run(x, P, gb, valid, None, dtype, 16, device="cuda")
    assert ops.last_backend("selfmod_projection") == "triton"
    for a, b in zip([*got[:2], *got[2][:2]], [*ref[:2], *ref[2][:2]]):
        assert rel_err(a.cpu(), b) < tol


@compiled
def test_cpu_backend_in_float64_and_chosen_automatically():
    x, P, gb, valid = inputs(2, 29, 2, 5)
    ref = run(x, P, gb, valid, "reference", F64, 4)
    got = run(x, P, gb, valid, None, F64, 4)
    assert ops.last_backend("selfmod_projection") == "cpu"
    for a, b in zip([*got[:2], *got[2][:2]], [*ref[:2], *ref[2][:2]]):
        assert a.dtype == F64 and rel_err(a, b) < 1e-12


@compiled
def test_cpu_backend_bfloat16_inputs():
    x, P, gb, valid = inputs(1, 40, 2, 16)
    ref = run(x, P, gb, valid, "reference", F64, 16)
    y, Pf = ops.selfmod_projection(x.bfloat16(), P.float(), gb.float(), valid, chunk_size=16, backend="cpu")
    assert y.dtype == torch.bfloat16 and Pf.dtype == torch.float32
    assert rel_err(y, ref[0]) < 2e-2 and rel_err(Pf, ref[1]) < 2e-2


@pytest.mark.parametrize("backend", [pytest.param("reference"), pytest.param("cpu", marks=compiled)])
def test_gradcheck_differentiable_writes(backend):
    x, P, gb, valid = inputs(1, 9, 1, 3, drop=0.3)
    leaves = tuple(t.clone().requires_grad_() for t in (x, P, gb))
    assert torch.autograd.gradcheck(
        lambda *xs: ops.selfmod_projection(*xs, valid, chunk_size=4, stop_writes=False, backend=backend),
        leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_stop_writes_gradient_is_the_straight_through_formula():
    """With stop-gradient writes every chunk's read weight is P_in + constant: dx_c = dy_c P_c and
    dP_in = sum_c dy_c^T x_c + dP_out, the gate bias gets nothing (checked on the reference, which
    the backends match above)."""
    x, P, gb, valid = inputs(1, 9, 1, 3, drop=0.3)
    leaves = tuple(t.clone().requires_grad_() for t in (x, P, gb))
    y, Pf = ops.selfmod_projection(*leaves, valid, chunk_size=4, backend="reference")
    dy, dPf = torch.randn_like(y), torch.randn_like(Pf)
    gx, gP, ggb = torch.autograd.grad((y * dy).sum() + (Pf * dPf).sum(), leaves, allow_unused=True)
    ck = _reference_starts(x, P, gb, valid, 4)
    dyc = F.pad(dy, (0, 0, 0, 0, 0, 3)).view(1, 3, 4, 1, -1)
    xc = F.pad(x, (0, 0, 0, 0, 0, 3)).view(1, 3, 4, 1, 3)
    assert torch.allclose(gx, torch.einsum("bnchr,bnhri->bnchi", dyc, ck).reshape(1, 12, 1, 3)[:, :9])
    assert torch.allclose(gP, dPf + torch.einsum("bnchr,bnchi->bhri", dyc, xc))
    assert ggb is None or ggb.abs().max() == 0


def _reference_starts(x, P, gb, valid, chunk):
    """Every chunk's start state by the reference, chunk by chunk: [B, N, H, R, d]."""
    starts, Pc = [], P
    for s0 in range(0, x.shape[1], chunk):
        starts.append(Pc)
        _, Pc = selfmod_projection_reference(x[:, s0:s0 + chunk], Pc, gb, valid[:, s0:s0 + chunk], chunk, 0.3, True, True)
    return torch.stack(starts, 1)


def test_argument_checks():
    x, P, gb, valid = inputs(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"P must .*\[B, H, 3d\+2, d\]"):
        ops.selfmod_projection(x, P[:, :, :-1], gb)
    with pytest.raises(ValueError, match="gate_bias"):
        ops.selfmod_projection(x, P, gb[:1])
    with pytest.raises(TypeError, match="valid must be a bool"):
        ops.selfmod_projection(x, P, gb, valid.float())
    with pytest.raises(ValueError, match="valid"):
        ops.selfmod_projection(x, P, gb, valid[:, :3])
    with pytest.raises(ValueError, match="eta_max"):
        ops.selfmod_projection(x, P, gb, eta_max=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.selfmod_projection(x, P, gb, chunk_size=0)
    y, Pf = ops.selfmod_projection(x[:, :0], P, gb)  # an empty sequence: no reads, the state unchanged
    assert y.shape == (1, 0, 2, 14) and torch.equal(Pf, P)


def test_fake_implementation_gives_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, P, gb = torch.empty(2, 10, 3, 4), torch.empty(2, 3, 14, 4), torch.empty(3, 2)
        y, Pf = ops.selfmod_projection(x, P, gb, chunk_size=4)
    assert y.shape == (2, 10, 3, 14) and Pf.shape == (2, 3, 14, 4) and Pf.dtype == torch.float32
