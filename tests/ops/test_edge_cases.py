"""Issue 16, the ops: no tokens on every backend, an empty vocabulary or feature size, bool
targets, shape propagation on the meta device, and the opt-in finiteness check."""

import pytest
import torch

from nested_learning import ops
from tests.helpers import dgd_inputs, titan_inputs


def mlp_inputs(T, d=4, hid=6, seed=0):
    x = titan_inputs(2, T, 2, d, d, seed=seed, state=False)
    g = torch.Generator().manual_seed(seed)
    x["initial_state"] = tuple(0.1 * torch.randn(2, 2, *s, generator=g, dtype=torch.float64)
                               for s in ((d, hid), (hid, d)))
    return x


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_tokens_returns_the_initial_state_on_every_backend(backend):
    x = titan_inputs(2, 0, 2, 4, 3)
    o, (M, S) = ops.titan_update(**x, backend=backend)
    assert o.shape == (2, 0, 2, 3) and torch.equal(M, x["initial_state"][0]) and torch.equal(S, x["initial_state"][1])
    x = dgd_inputs(2, 0, 2, 4, 3)
    o, W = ops.dgd_update(**x, backend=backend)
    assert o.shape == (2, 0, 2, 3) and torch.equal(W, x["initial_state"])
    x = mlp_inputs(0)
    o, state = ops.titan_mlp_update(**x, backend=backend)
    assert o.shape == (2, 0, 2, 4) and torch.equal(state[0], x["initial_state"][0])


def test_linear_cross_entropy_rejects_an_empty_vocabulary_or_feature_size_and_bool_targets():
    h, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"weight must have at least one row and one column .* got shape \[0, 4\]"):
        ops.linear_cross_entropy(h, torch.randn(0, 4), y)
    with pytest.raises(ValueError, match=r"got shape \[5, 0\]"):
        ops.linear_cross_entropy(torch.randn(3, 0), torch.randn(5, 0), y)
    with pytest.raises(TypeError, match="targets must be an integer tensor of class indices, got torch.bool"):
        ops.linear_cross_entropy(h, torch.randn(5, 4), torch.tensor([True, False, True]))


def test_every_op_propagates_shapes_on_the_meta_device():
    m = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    x = {k: (tuple(map(m, v)) if isinstance(v, tuple) else m(v)) for k, v in titan_inputs(2, 8, 2, 4, 3).items()}
    o, (M, S) = ops.titan_update(**x)
    assert o.device.type == "meta" and o.shape == (2, 8, 2, 3) and M.shape == (2, 2, 3, 4)
    o, W = ops.dgd_update(**{k: m(v) for k, v in dgd_inputs(2, 8, 2, 4, 3).items()})
    assert o.shape == (2, 8, 2, 3) and W.device.type == "meta"
    x = mlp_inputs(8)
    x = {k: (tuple(map(m, v)) if isinstance(v, tuple) else m(v)) for k, v in x.items()}
    o, state = ops.titan_mlp_update(**x)
    assert o.shape == (2, 8, 2, 4) and state[1].shape == (2, 2, 6, 4)
    loss, delta = ops.linear_cross_entropy(torch.randn(3, 4, device="meta"), torch.randn(5, 4, device="meta"),
                                           torch.zeros(3, dtype=torch.long, device="meta"))
    assert loss.shape == () and delta.shape == (3, 4) and delta.device.type == "meta"
    st = ops.CMSState.create(torch.randn(5, 4, device="meta"), period=4, batch_size=2)
    new, rep = ops.cms_update(st, torch.randn(2, 8, 4, device="meta"), torch.randn(2, 8, 5, device="meta"), lr=0.1)
    assert new.weight.shape == (2, 5, 4) and new.weight.device.type == "meta"


def test_non_finite_inputs_pass_silently_by_default_and_are_named_when_asked(monkeypatch):
    x = titan_inputs(2, 8, 2, 4, 3)
    x["v"] = x["v"].clone()
    x["v"][0, 3, 1, 2] = float("nan")
    x["v"][1, 0, 0, 0] = float("inf")
    _, (M, _) = ops.titan_update(**x)
    assert torch.isnan(M).any()  # the documented default: NaN in, NaN out, no check
    with ops.check_finite():
        with pytest.raises(ops.NonFiniteInputError, match=r"^v holds non-finite values \(1 NaN, 1 Inf of 96"):
            ops.titan_update(**x)
    monkeypatch.setenv("NL_CHECK_FINITE", "1")
    d = dgd_inputs(2, 8, 2, 4, 3)
    d["initial_state"] = d["initial_state"].clone().fill_(float("nan"))
    with pytest.raises(ops.NonFiniteInputError, match="initial_state holds non-finite values"):
        ops.dgd_update(**d)
    with pytest.raises(ops.NonFiniteInputError, match="^h holds"):
        ops.linear_cross_entropy(torch.full((3, 4), float("nan")), torch.randn(5, 4), torch.tensor([0, 1, 2]))
    st = ops.CMSState.create(torch.randn(5, 4), period=4, batch_size=2)
    with pytest.raises(ops.NonFiniteInputError, match="^delta holds"):
        ops.cms_update(st, torch.randn(2, 8, 4), torch.full((2, 8, 5), float("inf")), lr=0.1)


def test_a_nan_gate_is_a_non_finite_input_error():
    x = titan_inputs(2, 8, 2, 4, 3)
    x["theta"] = x["theta"].clone().fill_(float("nan"))
    with pytest.raises(ops.NonFiniteInputError, match=r"theta must lie in \[0.0, 1.0\]"):
        ops.titan_update(**x)
    x["theta"] = x["theta"].fill_(2.0)  # out of range but finite: a plain ValueError
    with pytest.raises(ValueError) as err:
        ops.titan_update(**x)
    assert type(err.value) is ValueError
