import logging

import pytest
import torch

from nested_learning import ops
from tests.helpers import dgd_inputs


def test_every_op_has_a_reference_backend_on_cpu():
    for op in ops.OPS:
        assert ops.available_backends(op, "cpu")[-1] == "reference"
        assert ops.registered_backends(op)[-1] == "reference"


def test_auto_selection_picks_the_first_available_for_the_device():
    x = dgd_inputs(1, 4, 1, 4, 4)
    ops.dgd_update(**x)
    # CPU tensors: the compiled cpu backend when built (Triton runs them only when forced)
    assert ops.last_backend("dgd_update") == [n for n in ops.available_backends("dgd_update", "cpu")
                                              if n != "triton"][0]


def test_forcing_by_argument_context_and_env(monkeypatch):
    x = dgd_inputs(1, 4, 1, 4, 4)
    ops.dgd_update(**x, backend="reference")
    assert ops.last_backend("dgd_update") == "reference"
    with ops.use_backend("reference"):
        ops.dgd_update(**x)
    assert ops.last_backend("dgd_update") == "reference"
    monkeypatch.setenv("NL_BACKEND", "reference")
    ops.dgd_update(**x)
    assert ops.last_backend("dgd_update") == "reference"


def test_precedence_argument_over_context_over_env(monkeypatch):
    x = dgd_inputs(1, 4, 1, 4, 4)
    monkeypatch.setenv("NL_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.dgd_update(**x)
    with ops.use_backend("reference"):
        ops.dgd_update(**x)  # the context manager wins over the environment
        with pytest.raises(ops.BackendUnavailableError):
            ops.dgd_update(**x, backend="cuda")  # the argument wins over the context


@pytest.mark.parametrize("name", ["triton", "cuda", "cpu"])
def test_unavailable_backend_is_a_clear_error_never_a_fallback(name):
    x = dgd_inputs(1, 4, 1, 4, 4)
    usable = name in ops.available_backends("dgd_update", "cpu")
    if usable:
        ops.dgd_update(**x, backend=name)
        assert ops.last_backend("dgd_update") == name
    else:
        with pytest.raises(ops.BackendUnavailableError, match=f"'{name}'"):
            ops.dgd_update(**x, backend=name)


def test_unknown_backend_names_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("fastest"):
            pass


def test_backend_that_ran_is_logged(caplog):
    x = dgd_inputs(1, 4, 1, 4, 4)
    with caplog.at_level(logging.DEBUG, logger="nested_learning.ops"):
        ops.dgd_update(**x, backend="reference")
    assert "dgd_update: backend=reference" in caplog.text


@pytest.mark.gpu
def test_reference_runs_on_cuda_and_matches_cpu():
    x = dgd_inputs(2, 40, 2, 16, 16)
    o, s = ops.dgd_update(**x, backend="reference")
    xc = {n: v.cuda() for n, v in x.items()}
    oc, sc = ops.dgd_update(**xc, backend="reference")
    assert torch.allclose(oc.cpu(), o) and torch.allclose(sc.cpu(), s)
