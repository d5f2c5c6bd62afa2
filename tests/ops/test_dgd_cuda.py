"""The `cuda` backend of dgd_update: the fused per-token kernel (csrc/cuda/dgd_recurrent.cu)
for streaming and generation, against the float64 reference. GPU only; the kernel source is
syntax-checked with nvcc on every machine that has it (tests/package/test_install.py)."""

import pytest
import torch

import nested_learning
from nested_learning import ops
from tests.helpers import dgd_inputs, rel_err
from tests.ops.test_dgd_cpu import run

pytestmark = pytest.mark.gpu


def _needs_cuda_backend():
    if "cuda" not in ops.available_backends("dgd_update", "cuda"):
        pytest.fail(f"the cuda backend is not available on this GPU machine: {nested_learning.build_info()}")


@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("dk,dv", [(64, 64), (48, 100), (128, 32), (200, 64)])
@pytest.mark.parametrize("read", ["after", "before"])
def test_streaming_kernel_matches_reference_float32(T, dk, dv, read):
    _needs_cuda_backend()
    x = dgd_inputs(2, T, 3, dk, dv)
    o_ref, s_ref = ops.dgd_update(**x, read=read, backend="reference")
    xc = {n: v.float().cuda() for n, v in x.items()}
    o, s = ops.dgd_update(**xc, read=read, backend="cuda")
    assert ops.last_backend("dgd_update") == "cuda"
    assert rel_err(o.cpu(), o_ref) < 1e-5 and rel_err(s.cpu(), s_ref) < 1e-5


def test_streaming_kernel_bf16_and_gradients():
    _needs_cuda_backend()
    x = dgd_inputs(2, 40, 2, 64, 64)
    xb = {n: v.to(torch.bfloat16).double() for n, v in x.items()}
    o_ref, s_ref, g_ref = run(xb, "reference", "before", 64, torch.float64)
    o, s, g = run({n: v.cuda() for n, v in xb.items()}, "cuda", "before", 64, torch.bfloat16)
    assert rel_err(o.cpu(), o_ref) < 1e-2 and rel_err(s.cpu(), s_ref) < 1e-2
    for n in g_ref:  # the backward of the cuda backend is the chunk-parallel Triton one
        assert rel_err(g[n].cpu(), g_ref[n]) < 2e-2, n


def test_token_by_token_equals_whole_and_auto_choice():
    _needs_cuda_backend()
    x = {n: v.float().cuda() for n, v in dgd_inputs(2, 300, 2, 64, 64).items()}
    o_whole, s_whole = ops.dgd_update(**x, read="before")
    assert ops.last_backend("dgd_update") == "triton"  # long sequences: chunk-parallel
    S, outs = x["initial_state"], []
    for t0 in range(0, 300, 50):
        seg = {n: x[n][:, t0:t0 + 50] for n in ("q", "k", "w", "alpha", "eta", "a")}
        o, S = ops.dgd_update(**seg, initial_state=S, read="before")
        assert ops.last_backend("dgd_update") == "cuda"  # short calls: the streaming kernel
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), o_whole) < 1e-5 and rel_err(S, s_whole) < 1e-5
