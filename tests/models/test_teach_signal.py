"""Teach signals (MATH section 1) against central finite differences, float64, tiny models."""

import pytest
import torch

from nested_learning.layers import TeachCapture
from nested_learning.models import build_model

CFG = dict(hope=dict(proj_chunk=2, memory_chunk=4, cms_periods=(1, 2), differentiable_writes=True),
           titans=dict(chunk_size=2), transformer={})


def summed_loss(m, tok, targets, perturb=None):
    hooks = []
    if perturb is not None:
        where, delta = perturb
        mod = m.norm if where == ("final",) else m.blocks[where[1]]

        def add(module, inp, out):
            return out + delta if isinstance(out, torch.Tensor) else (out[0] + delta, *out[1:])
        hooks.append(mod.register_forward_hook(add))
    try:
        h, _ = m.hidden(tok)
        return m.loss(h, targets, reduction="sum")[0]
    finally:
        for hk in hooks:
            hk.remove()


@pytest.mark.parametrize("name", ["transformer", "titans", "hope"])
def test_teach_signal_matches_central_finite_difference(name):
    torch.manual_seed(0)
    m = build_model(name, "tiny", d_model=16, n_heads=2, n_layers=2, **CFG[name]).double()
    tok = torch.randint(0, 64, (1, 6))
    targets = m.next_token_targets(tok)
    targets[0, 2] = -100  # an ignored position too
    cap = TeachCapture()
    h, _ = m.hidden(tok, capture=cap)
    loss, delta_head = m.loss(h, targets, reduction="sum")
    loss.backward()
    assert torch.allclose(cap.signal(("final",)), delta_head, atol=1e-12)  # hooks == fused op
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    for key in [("final",)] + [("block", i) for i in range(2)]:
        sig = cap.signal(key)
        idx = torch.randperm(sig.numel(), generator=g)[:20]
        fd = []
        for j in idx.tolist():
            e = torch.zeros(sig.numel(), dtype=sig.dtype)
            e[j] = eps
            e = e.view_as(sig)
            lp = summed_loss(m, tok, targets, (key, e))
            lm = summed_loss(m, tok, targets, (key, -e))
            fd.append(((lp - lm) / (2 * eps)).item())
        fd = torch.tensor(fd, dtype=sig.dtype)
        got = sig.flatten()[idx]
        assert ((got - fd).norm() / fd.norm()).item() < 1e-6, key
    # the last position has no target, so it carries no signal at the final norm
    assert cap.signal(("final",))[0, -1].abs().max() == 0
