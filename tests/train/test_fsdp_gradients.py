"""FSDP2 computes the gradients DDP computes: one step of each model, 2 CPU ranks (gloo), every
parameter's gradient compared; no model's forward returns a view that FSDP2 warns about."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "grad_worker.py")
SMALL = {"hope": {"proj_chunk": 4, "memory_chunk": 8, "cms_periods": [1, 4]}, "titans": {"chunk_size": 4},
         "transformer": {}}


def grads(name: str, kind: str, tmp_path) -> tuple[dict, str]:
    out = tmp_path / f"{name}-{kind}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
                        name, kind, str(out), json.dumps(SMALL[name])], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out, weights_only=False), r.stderr


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.slow
def test_fsdp_gradients_equal_ddp_gradients(name, tmp_path):
    ddp, _ = grads(name, "ddp", tmp_path)
    fsdp, said = grads(name, "fsdp", tmp_path)
    assert ddp["loss"] == pytest.approx(fsdp["loss"], rel=1e-6)
    assert set(ddp["grads"]) == set(fsdp["grads"]) and ddp["grads"]
    for k, g in ddp["grads"].items():
        torch.testing.assert_close(fsdp["grads"][k], g, rtol=1e-5, atol=1e-6, msg=k)
    assert "returned a view tensor" not in said, said[-3000:]  # the fast states hold copies, not views


@pytest.mark.parametrize("name, overrides", [(n, o) for n, o in SMALL.items()] + [
    ("transformer", {"window": 4}), ("hope", {"mixer": "sliding_window", "mixer_window": 4, "memory_chunk": 8,
                                              "cms_periods": [1, 4]})])
def test_model_outputs_hold_no_view_that_requires_grad(name, overrides):
    """FSDP2 drops its pre-backward hook on a module output that is a view; no block or model
    output (the mean loss and the fast state: KV caches, unfinished chunks, conv inputs) is one."""
    from nested_learning.models import build_model

    m = build_model(name, "tiny", **overrides)
    tok = torch.randint(0, 64, (2, 10))
    found = []

    def visit(t, path):
        if isinstance(t, torch.Tensor):
            if t._is_view() and t.requires_grad:
                found.append(path)
        elif isinstance(t, dict):
            for k, v in t.items():
                visit(v, f"{path}.{k}")
        elif isinstance(t, (list, tuple)):
            for k, v in enumerate(t):
                visit(v, f"{path}[{k}]")
        elif hasattr(t, "__dataclass_fields__"):
            for k in t.__dataclass_fields__:
                visit(getattr(t, k), f"{path}.{k}")

    visit(m(tok, m.init_state(2), targets=tok), "model")
    visit(m.blocks[0](m.embed(tok), m.init_state(2).layers[0], 0, None, 0), "block")
    assert not found, found
