"""The Triton backend of dgd_update (nested_learning/kernels/dgd.py) against the float64 reference: outputs,
final state and every input gradient. On the CPU it runs through Triton's interpreter; the
`gpu` tests run the compiled kernels in float32 and bf16, and against flash-linear-attention's
gated delta rule where that is installed."""

import importlib.util

import pytest
import torch

from nested_learning import ops
from nested_learning.kernels import triton_unavailable_reason  # noqa: E402
from tests.helpers import dgd_inputs, rel_err
from tests.ops.test_dgd_cpu import run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
interpreted = pytest.mark.skipif(triton_unavailable_reason("cpu") is not None,
                                 reason=str(triton_unavailable_reason("cpu")))

GATES = ("alpha", "eta")

CASES = [(shape, read, chunk)
         for shape, chunk in [((1, 1, 1, 48, 48), 16), ((1, 63, 1, 64, 64), 32), ((2, 100, 2, 100, 48), 64),
                              ((1, 100, 1, 48, 100), 16)]
         for read in ("after", "before")]
CASES += [((1, 1000, 1, 64, 64), "after", 64), ((1, 1000, 1, 48, 64), "before", 32)]


@pytest.mark.parametrize("shape,read,chunk", CASES)
@interpreted
@pytest.mark.slow
def test_triton_matches_reference_float32(shape, read, chunk):
    x = dgd_inputs(*shape)
    o_ref, s_ref, g_ref = run(x, "reference", read, chunk, torch.float64)
    o, s, g = run(x, "triton", read, chunk, torch.float32)
    assert ops.last_backend("dgd_update") == "triton"
    assert o.dtype == torch.float32 and rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    assert set(g) == set(g_ref)
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) < 1e-5, n


@pytest.mark.parametrize("erase,state", [(False, False), (True, False), (False, True)])
@interpreted
@pytest.mark.slow
def test_triton_optional_inputs(erase, state):
    x = dgd_inputs(2, 21, 2, 6, 5, erase=erase, state=state)
    o_ref, s_ref, g_ref = run(x, "reference", "before", 16, torch.float64)
    o, s, g = run(x, "triton", "before", 16, torch.float32)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    assert set(g) == set(g_ref) and all(rel_err(g[n], g_ref[n]) < 1e-5 for n in g)


@interpreted
def test_triton_bf16_inputs_upcast_in_kernel():
    x = dgd_inputs(1, 70, 2, 32, 32)
    xb = {n: v.to(torch.bfloat16).double() for n, v in x.items()}  # the bf16-representable inputs
    o_ref, s_ref, g_ref = run(xb, "reference", "after", 32, torch.float64)
    o, s, g = run(xb, "triton", "after", 32, torch.bfloat16)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-2 and rel_err(s, s_ref) < 1e-2
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) < 2e-2, n


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol,gate_tol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 2e-2)])
@pytest.mark.parametrize("read", ["after", "before"])
def test_triton_on_gpu_matches_reference(dtype, tol, gate_tol, read):
    x = dgd_inputs(2, 333, 3, 64, 64)
    x = {n: v.to(dtype).double() for n, v in x.items()}
    o_ref, s_ref, g_ref = run(x, "reference", read, 64, torch.float64)
    xc = {n: v.cuda() for n, v in x.items()}
    o, s, g = run(xc, "triton", read, 64, dtype)
    assert ops.last_backend("dgd_update") == "triton"
    assert rel_err(o.cpu(), o_ref) < tol and rel_err(s.cpu(), s_ref) < tol
    for n in g_ref:
        assert rel_err(g[n].cpu(), g_ref[n]) < (gate_tol if n in GATES else 2 * tol), n


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="flash-linear-attention is not installed")
def test_triton_agrees_with_fla_gated_delta_rule():
    """a = k, beta = eta / alpha, g = log alpha, v = w / beta (MATH section 2)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    x = dgd_inputs(2, 256, 4, 64, 64, dtype=torch.float32, erase=False)
    x = {n: (v.cuda() if v is not None else None) for n, v in x.items()}
    o, s = ops.dgd_update(**x, backend="triton")
    beta = x["eta"] / x["alpha"]
    v = x["w"] / beta[..., None]
    # fla's state is [B, H, dk, dv] (S = W^T, o_t = S_t^T q_t)
    h0 = x["initial_state"].transpose(-1, -2).contiguous()
    o_fla, s_fla = chunk_gated_delta_rule(x["q"], x["k"], v, g=x["alpha"].log(), beta=beta, scale=1.0,
                                          initial_state=h0, output_final_state=True)
    s_fla = s_fla.transpose(-1, -2)
    assert rel_err(o, o_fla) < 1e-2 and rel_err(s, s_fla) < 1e-2
