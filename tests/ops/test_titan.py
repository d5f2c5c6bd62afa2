import pytest
import torch

from nested_learning import ops
from tests.helpers import F64, memory_loop, rel_err, titan_inputs

mv = lambda W, u: torch.einsum("bhij,bhj->bhi", W, u)  # noqa: E731


def linear_loop(q, k, v, theta, eta, alpha, initial_state, chunk):
    M0, S0 = initial_state
    loss = lambda P, t: (mv(P[0], k[:, t]) - v[:, t]).pow(2).sum()  # noqa: E731
    read = lambda P, t: mv(P[0], q[:, t])  # noqa: E731
    o, P, S = memory_loop([M0], [S0], loss, read, None, theta, eta, alpha, chunk)
    return o, P[0], S[0]


@pytest.mark.parametrize("shape", [(1, 1, 1, 4, 4), (2, 37, 3, 5, 7), (1, 70, 1, 48, 16)])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_linear_matches_token_loop(shape, chunk):
    x = titan_inputs(*shape)
    o, (M, S) = ops.titan_update(**x, chunk_size=chunk)
    o_ref, M_ref, S_ref = linear_loop(**x, chunk=chunk)
    assert rel_err(o, o_ref) < 1e-12
    assert rel_err(M, M_ref) < 1e-12 and rel_err(S, S_ref) < 1e-12


def test_chunk_one_is_the_exact_recurrence():
    # written out by hand: grad = 2 (M_{t-1} k_t - v_t) k_t^T at the previous state
    x = titan_inputs(2, 23, 2, 6, 5)
    M, S = (s.clone() for s in x["initial_state"])
    outs = []
    for t in range(23):
        outs.append(mv(M, x["q"][:, t]))
        err = mv(M, x["k"][:, t]) - x["v"][:, t]
        grad = 2 * torch.einsum("bhi,bhj->bhij", err, x["k"][:, t])
        g = lambda n: x[n][:, t, :, None, None]  # noqa: E731
        S = g("eta") * S - g("theta") * grad
        M = (1 - g("alpha")) * M + S
    o, (M1, S1) = ops.titan_update(**x, chunk_size=1)
    assert rel_err(o, torch.stack(outs, 1)) < 1e-12
    assert rel_err(M1, M) < 1e-12 and rel_err(S1, S) < 1e-12


def test_zero_gates_edge_cases():
    x = titan_inputs(1, 20, 1, 4, 4)
    x["eta"] = torch.zeros_like(x["eta"])  # no momentum carried
    x["alpha"] = torch.ones_like(x["alpha"])  # full forgetting
    o, (M, S) = ops.titan_update(**x, chunk_size=8)
    o_ref, M_ref, S_ref = linear_loop(**x, chunk=8)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(M, M_ref) < 1e-12


@pytest.mark.parametrize("chunk", [4, 16])
def test_linear_streamed_in_chunk_aligned_segments_equals_whole(chunk):
    x = titan_inputs(2, 64, 2, 8, 8)
    o, state = ops.titan_update(**x, chunk_size=chunk)
    outs, st = [], x["initial_state"]
    for s0, s1 in [(0, 16), (16, 48), (48, 64)]:
        part = {n: v[:, s0:s1] for n, v in x.items() if n != "initial_state"}
        o_p, st = ops.titan_update(**part, initial_state=st, chunk_size=chunk)
        outs.append(o_p)
    assert rel_err(torch.cat(outs, 1), o) < 1e-12
    assert rel_err(st[0], state[0]) < 1e-12 and rel_err(st[1], state[1]) < 1e-12


def mlp_inputs(B, T, H, d, hid, seed=0):
    x = titan_inputs(B, T, H, d, d, seed=seed, state=False)
    g = torch.Generator().manual_seed(seed + 1)
    W1 = 0.3 * torch.randn(B, H, d, hid, generator=g, dtype=F64)
    W2 = 0.3 * torch.randn(B, H, hid, d, generator=g, dtype=F64)
    S1, S2 = 0.01 * torch.randn_like(W1), 0.01 * torch.randn_like(W2)
    x["initial_state"] = (W1, W2, S1, S2)
    x["theta"] = 0.1 * x["theta"]  # a stable inner loop: the states stay O(1)
    return x


def mlp_loop(q, k, v, theta, eta, alpha, initial_state, chunk, act):
    W1, W2, S1, S2 = initial_state
    f = {"silu": torch.nn.functional.silu, "relu": torch.relu,
         "gelu": lambda z: torch.nn.functional.gelu(z, approximate="tanh")}[act]
    mem = lambda P, x: x + mv(P[0], f(mv(P[1], x)))  # noqa: E731
    loss = lambda P, t: (mem(P, k[:, t]) - v[:, t]).pow(2).sum()  # noqa: E731
    read = lambda P, t: mem(P, q[:, t])  # noqa: E731
    return memory_loop([W1, W2], [S1, S2], loss, read, None, theta, eta, alpha, chunk)


@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_mlp_matches_token_loop(act, chunk):
    x = mlp_inputs(2, 37, 2, 6, 10)
    o, state = ops.titan_mlp_update(**x, chunk_size=chunk, activation=act)
    o_ref, P, S = mlp_loop(**x, chunk=chunk, act=act)
    assert o_ref.abs().max() < 10  # the comparison is meaningful, not two overflows
    assert rel_err(o, o_ref) < 1e-12
    for got, want in zip(state, (*P, *S)):
        assert rel_err(got, want) < 1e-12


def test_mlp_two_tensor_state_means_zero_momentum():
    x = mlp_inputs(1, 9, 1, 4, 8)
    W1, W2, _, _ = x["initial_state"]
    o2, s2 = ops.titan_mlp_update(**{**x, "initial_state": (W1, W2)}, chunk_size=4)
    o4, s4 = ops.titan_mlp_update(
        **{**x, "initial_state": (W1, W2, torch.zeros_like(W1), torch.zeros_like(W2))}, chunk_size=4
    )
    assert torch.equal(o2, o4) and all(torch.equal(a, b) for a, b in zip(s2, s4))
