"""The CMS update pass's per-token teach-signal factor (CMSChain._factor): teach_scale, the
per-token clip teach_clip and the surprise threshold, each against the same chain fed signals
scaled, clipped or zeroed by hand; and the unscaled case, which skips the multiply, bit for
bit equal to the multiplying path."""

import torch

from nested_learning.layers.cms import CMSChain, CMSConfig, UpdateLog
from nested_learning.layers.teach import TeachCapture

B, T, D, H = 2, 6, 4, 8


def chain(**kw) -> CMSChain:
    cfg = dict(d_model=D, periods=(2, 3), hidden_mult=H // D, optimizer="gd", lr=0.1, beta=0.9, dgd_alpha=1.0,
               deep_momentum_hidden=16, teach_scale=1.0, teach_clip=None, differentiable_writes=False)
    torch.manual_seed(0)
    return CMSChain(CMSConfig(**{**cfg, **kw})).double()


def capture(signals=None) -> TeachCapture:
    """Random inputs and signals for both levels; token 1 of row 0 has no signal (an ignored
    target). `signals(key, s)` may rewrite each signal."""
    g = torch.Generator().manual_seed(1)
    cap = TeachCapture()
    for lvl in (0, 1):
        u, a = torch.randn(B, T, D, generator=g, dtype=torch.float64), torch.randn(B, T, H, generator=g, dtype=torch.float64)
        cap.inputs[("cms", 0, lvl, "up")], cap.inputs[("cms", 0, lvl, "down")] = u, a
        for key, shape in ((("cms", 0, lvl, "up"), (B, T, H)), (("cms", 0, lvl, "down"), (B, T, D))):
            s = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, T)[:, None]
            s[0, 1] = 0
            cap.grads[key] = s
    if signals is not None:
        for key in list(cap.grads):
            cap.grads[key] = signals(key, cap.grads[key])
    return cap


def weights(ch: CMSChain, cap: TeachCapture, threshold: float = 0.0) -> list[torch.Tensor]:
    state, _ = ch.update(ch.init_state(B, "cpu", torch.float64), cap, 0, UpdateLog(), surprise_threshold=threshold)
    return [w for st in state for w in (st.up.weight, st.down.weight)]


def _per_token(cap: TeachCapture, lvl: int, fn):
    """fn(||delta_down_t|| [B, T, 1]) -> [B, T, 1]: the factor a level's tokens get (each
    level's factor is computed from its down layer's signal, the surprise, in float32 as the
    chain computes it)."""
    return fn(cap.grads[("cms", 0, lvl, "down")].float().norm(dim=-1, keepdim=True))


def test_teach_scale_clip_and_threshold_match_signals_changed_by_hand():
    base = capture()
    # scale: every signal times 0.5
    got = weights(chain(teach_scale=0.5), capture())
    want = weights(chain(), capture(lambda k, s: s * 0.5))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-14) for a, b in zip(got, want))
    # clip: each token's signals times min(1, c / ||delta_down_t||) of its level
    c = 1.5
    got = weights(chain(teach_clip=c), capture())
    want = weights(chain(), capture(lambda k, s: s * _per_token(base, k[2], lambda n: (c / n.clamp(min=1e-30)).clamp(max=1.0))))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-14) for a, b in zip(got, want))
    # threshold: tokens whose ||delta_down_t|| is at most the threshold give nothing
    th = 2.0
    got = weights(chain(), capture(), threshold=th)
    want = weights(chain(), capture(lambda k, s: s * _per_token(base, k[2], lambda n: (n > th).float())))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-14) for a, b in zip(got, want))
    assert not torch.equal(got[0], weights(chain(), capture())[0])  # the threshold did drop tokens


def test_the_unscaled_path_skips_the_multiply_bit_for_bit():
    ch = chain()
    norm_t = torch.tensor([[[0.0], [2.0]]])
    assert ch._factor(norm_t, norm_t > 0, 0.0) is None
    assert chain(teach_clip=1e30)._factor(norm_t, norm_t > 0, 0.0) is not None
    # the same update through the multiply (a clip no token reaches: factor 1, or 0 where there is no signal)
    plain, clipped = weights(ch, capture()), weights(chain(teach_clip=1e30), capture())
    assert all(torch.equal(a, b) for a, b in zip(plain, clipped))
