"""Bad input gets a clear ValueError/TypeError naming the argument."""

import pytest
import torch

from nested_learning import ops
from tests.helpers import dgd_inputs, titan_inputs


def dgd_bad(**change):
    x = dgd_inputs(2, 6, 2, 4, 3)
    x.update(change)
    return lambda: ops.dgd_update(**x)


D = dgd_inputs(2, 6, 2, 4, 3)
DGD_CASES = [
    ({"q": D["q"][0]}, ValueError, "q must have 4 dimensions"),
    ({"k": D["k"][:, :5]}, ValueError, r"k must have shape \[2, 6, 2, 4\]"),
    ({"w": D["w"][:, :, :1]}, ValueError, "w must have shape"),
    ({"alpha": D["alpha"][..., None]}, ValueError, "alpha must have 3 dimensions"),
    ({"eta": D["eta"][:1]}, ValueError, "eta must have shape"),
    ({"a": D["a"][..., :3]}, ValueError, "a must have shape"),
    ({"initial_state": D["initial_state"].transpose(-1, -2)}, ValueError, "initial_state must have shape"),
    ({"k": D["k"].float()}, TypeError, "k has dtype torch.float32 but q has torch.float64"),
    ({"q": D["q"].long()}, TypeError, "q must be a floating tensor"),
    ({"w": D["w"].numpy()}, TypeError, "w must be a torch.Tensor"),
    ({"alpha": torch.zeros_like(D["alpha"])}, ValueError, r"alpha must lie in \(0.0, 1.0\]"),
    ({"alpha": D["alpha"] + 1}, ValueError, "alpha must lie in"),
    ({"eta": -D["eta"]}, ValueError, r"eta must lie in \[0.0, inf\]"),
    ({"eta": D["eta"].clone().fill_(float("nan"))}, ValueError, "eta must lie in"),
    ({"read": "during"}, ValueError, "read must be one of"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ({"chunk_size": 16.0}, ValueError, "chunk_size must be a positive int"),
]


@pytest.mark.parametrize("change,exc,msg", DGD_CASES, ids=[c[2][:30] for c in DGD_CASES])
def test_dgd_bad_input(change, exc, msg):
    with pytest.raises(exc, match=msg):
        dgd_bad(**change)()


T = titan_inputs(2, 6, 2, 4, 3)
TITAN_CASES = [
    ({"theta": T["theta"] + 1}, ValueError, r"theta must lie in \[0.0, 1.0\]"),
    ({"alpha": -T["alpha"]}, ValueError, "alpha must lie in"),
    ({"v": T["v"][:, :, :1, :]}, ValueError, "v must have shape"),
    ({"initial_state": T["initial_state"][0]}, TypeError, r"initial_state must be an \(M, S\) pair"),
    ({"initial_state": (T["initial_state"][0][:1], T["initial_state"][1])}, ValueError, r"initial_state\[0\] \(M\) must have shape"),
]


@pytest.mark.parametrize("change,exc,msg", TITAN_CASES, ids=[c[2][:30] for c in TITAN_CASES])
def test_titan_bad_input(change, exc, msg):
    x = titan_inputs(2, 6, 2, 4, 3)
    x.update(change)
    with pytest.raises(exc, match=msg):
        ops.titan_update(**x)


def test_titan_mlp_bad_input():
    x = titan_inputs(1, 4, 1, 4, 4, state=False)
    del x["initial_state"]
    W1, W2 = torch.randn(1, 1, 4, 8, dtype=torch.float64), torch.randn(1, 1, 8, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="initial_state must be"):
        ops.titan_mlp_update(**x, initial_state=None)
    with pytest.raises(ValueError, match=r"W2 must have shape \[1, 1, 8, 4\]"):
        ops.titan_mlp_update(**x, initial_state=(W1, W2[..., :3]))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.titan_mlp_update(**x, initial_state=(W1, W2), activation="tanh")
    x["v"] = x["v"][..., :3]
    with pytest.raises(ValueError, match="v must have shape"):
        ops.titan_mlp_update(**x, initial_state=(W1, W2))


def test_cms_bad_input():
    st = ops.CMSState.create(torch.randn(3, 4), 4, batch_size=2)
    x, d = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="period must be a positive int"):
        ops.CMSState.create(torch.randn(3, 4), 0, batch_size=2)
    with pytest.raises(ValueError, match="batch_size is required"):
        ops.CMSState.create(torch.randn(3, 4), 4)
    with pytest.raises(ValueError, match=r"x must have shape \[2, \*, 4\]"):
        ops.cms_update(st, x[..., :3], d, lr=0.1)
    with pytest.raises(ValueError, match="delta must have shape"):
        ops.cms_update(st, x, d[:, :4], lr=0.1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ops.cms_update(st, x, d, lr=0.1, optimizer="adam")
    with pytest.raises(ValueError, match="needs state.momentum"):
        ops.cms_update(st, x, d, lr=0.1, optimizer="momentum")
    with pytest.raises(ValueError, match="lr must be a non-negative"):
        ops.cms_update(st, x, d, lr=-1.0)
    with pytest.raises(TypeError, match="state must be a CMSState"):
        ops.cms_update(st.weight, x, d, lr=0.1)


def test_cross_entropy_bad_input():
    h, W, y = torch.randn(2, 5, 4), torch.randn(9, 4), torch.randint(0, 9, (2, 5))
    with pytest.raises(ValueError, match=r"weight must have shape \[\*, 4\]"):
        ops.linear_cross_entropy(h, W[:, :3], y)
    with pytest.raises(ValueError, match="targets must have shape"):
        ops.linear_cross_entropy(h, W, y[:, :4])
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        ops.linear_cross_entropy(h, W, y.float())
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 9\)"):
        ops.linear_cross_entropy(h, W, y + 5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.linear_cross_entropy(h, W, y, reduction="avg")
