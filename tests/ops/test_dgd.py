import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nested_learning import ops
from tests.helpers import F64, dgd_inputs, dgd_loop, rel_err

SHAPES = [  # B, T, H, dk, dv: T = 1, not a multiple of any chunk, d not a power of two, B*H = 1
    (1, 1, 1, 4, 4),
    (2, 37, 3, 5, 7),
    (1, 63, 1, 48, 16),
    (2, 100, 2, 6, 3),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("erase", [False, True])
def test_reference_matches_token_loop(shape, read, erase):
    x = dgd_inputs(*shape, erase=erase)
    o_ref, s_ref = dgd_loop(**x, read=read)
    for chunk in (1, 16, 32, 64):
        o, s = ops.dgd_update(**x, read=read, chunk_size=chunk, backend="reference")
        assert rel_err(o, o_ref) < 1e-12, chunk
        assert rel_err(s, s_ref) < 1e-12, chunk


def test_zero_initial_state_and_no_final_state():
    x = dgd_inputs(2, 9, 2, 4, 4, state=False)
    o, s = ops.dgd_update(**x, output_final_state=False)
    assert s is None
    o_ref, _ = dgd_loop(**x)
    assert rel_err(o, o_ref) < 1e-12


def test_long_sequence_tiny_forget_gates_stay_finite():
    # cumulative gates underflow within a chunk; the chunked form must not produce inf/NaN
    x = dgd_inputs(1, 200, 1, 8, 8)
    x["alpha"] = torch.full_like(x["alpha"], 1e-3)
    o, s = ops.dgd_update(**x, chunk_size=64)
    o_ref, s_ref = dgd_loop(**x)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10


def gated_delta_rule_loop(q, k, v, g, beta, S0):
    """S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t."""
    S, outs = S0.clone(), []
    for t in range(q.shape[1]):
        kt, vt, qt = k[:, t], v[:, t], q[:, t]
        b = beta[:, t, :, None, None]
        S = torch.exp(g[:, t])[..., None, None] * S
        S = S - b * torch.einsum("bhij,bhj,bhk->bhik", S, kt, kt) + b * torch.einsum("bhi,bhj->bhij", vt, kt)
        outs.append(torch.einsum("bhij,bhj->bhi", S, qt))
    return torch.stack(outs, 1), S


def test_a_equal_k_is_the_gated_delta_rule():
    x = dgd_inputs(2, 50, 2, 8, 6, erase=False)
    x["eta"] = x["eta"].clamp(min=0.05)
    beta = x["eta"] / x["alpha"]
    v = x["w"] / beta.unsqueeze(-1)
    o_g, s_g = gated_delta_rule_loop(x["q"], x["k"], v, x["alpha"].log(), beta, x["initial_state"])
    o, s = ops.dgd_update(**x, chunk_size=16)
    assert rel_err(o, o_g) < 1e-12 and rel_err(s, s_g) < 1e-12


def _one_step_per_token(loss_fn, k, alpha, eta, W0, **extra):
    """Explicit DGD step per token: W <- W (alpha I - eta k k^T) - eta grad_W loss_t(W),
    the gradient from autograd. Returns the per-token states."""
    W, states = W0.clone(), []
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    for t in range(k.shape[1]):
        leaf = W.detach().requires_grad_()
        (grad,) = torch.autograd.grad(loss_fn(leaf, t), leaf)
        pre = alpha[:, t, :, None, None] * eye - eta[:, t, :, None, None] * torch.einsum(
            "bhi,bhj->bhij", k[:, t], k[:, t]
        )
        W = W @ pre - eta[:, t, :, None, None] * grad
        states.append(W)
    return states


@pytest.mark.parametrize("use", ["teach_signal", "given_values", "self_generated", "residual_self_generated",
                                 "residual_given_values"])
def test_uses_are_one_gradient_step_on_their_loss(use):
    B, T, H, d = 2, 12, 2, 6
    x = dgd_inputs(B, T, H, d, d, erase=False)
    k, alpha, eta, W0 = x["k"], x["alpha"], x["eta"], x["initial_state"]
    vals = torch.randn(B, T, H, d, dtype=F64)
    mv = lambda W, u: torch.einsum("bhij,bhj->bhi", W, u)  # noqa: E731
    if use == "teach_signal":  # loss <W k, delta>: dL/dy = delta  (Eq. 29)
        loss = lambda W, t: (mv(W, k[:, t]) * vals[:, t]).sum()  # noqa: E731
        a, w = k, -eta.unsqueeze(-1) * vals
    elif use == "given_values":  # loss 1/2 ||W k - v||^2  (Eq. 28)
        loss = lambda W, t: 0.5 * (mv(W, k[:, t]) - vals[:, t]).pow(2).sum()  # noqa: E731
        a, w = 2 * k, eta.unsqueeze(-1) * vals
    elif use == "self_generated":  # loss 1/2 ||W k - sg(W v)||^2  (Eqs. 83, 93)
        loss = lambda W, t: 0.5 * (mv(W, k[:, t]) - mv(W, vals[:, t]).detach()).pow(2).sum()  # noqa: E731
        a, w = 2 * k - vals, torch.zeros_like(vals)
    elif use == "residual_self_generated":  # M(x) = x + W x: 1/2 ||k + W k - sg(v + W v)||^2  (MATH 6)
        loss = lambda W, t: 0.5 * (k[:, t] + mv(W, k[:, t]) - (vals[:, t] + mv(W, vals[:, t])).detach()).pow(2).sum()  # noqa: E731,E501
        a, w = 2 * k - vals, eta.unsqueeze(-1) * (vals - k)
    else:  # residual, given values: 1/2 ||k + W k - v||^2
        loss = lambda W, t: 0.5 * (k[:, t] + mv(W, k[:, t]) - vals[:, t]).pow(2).sum()  # noqa: E731
        a, w = 2 * k, eta.unsqueeze(-1) * (vals - k)
    states = _one_step_per_token(loss, k, alpha, eta, W0)
    q = torch.randn(B, T, H, d, dtype=F64)
    o, s = ops.dgd_update(q, k, w, alpha, eta, a=a, initial_state=W0, chunk_size=5)
    want_o = torch.stack([mv(W, q[:, t]) for t, W in enumerate(states)], 1)
    assert rel_err(s, states[-1]) < 1e-12
    assert rel_err(o, want_o) < 1e-12


def test_float32_close_to_float64():
    x = dgd_inputs(2, 70, 2, 16, 16)
    o64, s64 = ops.dgd_update(**x, chunk_size=32)
    x32 = {n: (v.float() if v is not None else None) for n, v in x.items()}
    o32, s32 = ops.dgd_update(**x32, chunk_size=32)
    assert o32.dtype == torch.float32 and s32.dtype == torch.float32
    assert rel_err(o32, o64) < 1e-5 and rel_err(s32, s64) < 1e-5


def test_bfloat16_inputs_keep_float32_state():
    x = dgd_inputs(1, 20, 1, 8, 8, state=False)
    xb = {n: (v.bfloat16() if v is not None else None) for n, v in x.items()}
    o, s = ops.dgd_update(**xb)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, _ = ops.dgd_update(**{n: (v.double() if v is not None else None) for n, v in xb.items()})
    assert rel_err(o, o_ref) < 1e-2


def test_keys_need_not_be_normalised_for_the_math():
    x = dgd_inputs(1, 10, 1, 4, 4)
    x["k"] = 0.3 * F.normalize(x["k"], dim=-1)
    o, s = ops.dgd_update(**x, chunk_size=4)
    o_ref, s_ref = dgd_loop(**x)
    assert rel_err(o, o_ref) < 1e-12



@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 40), dk=st.integers(1, 9), dv=st.integers(1, 9), chunk=st.integers(1, 50),
       read=st.sampled_from(["after", "before"]), seed=st.integers(0, 10**6))
def test_property_chunk_size_never_changes_the_result(T, dk, dv, chunk, read, seed):
    x = dgd_inputs(1, T, 2, dk, dv, seed=seed)
    o_ref, s_ref = dgd_loop(**x, read=read)
    o, s = ops.dgd_update(**x, read=read, chunk_size=chunk)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
