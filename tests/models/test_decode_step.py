"""The one-token decode step (models/decode.py) against the streamed forward, token by token:
the same logits to float rounding and the same state at the end, for every model and every
mixer and memory variant, across chunk ends, CMS periods, the window of a sliding attention,
the growth of a KV cache past the room it was given, and rows that a reset restarted."""

from __future__ import annotations

import pytest
import torch

from nested_learning.checks import range_checks_off
from nested_learning.models import build_model
from nested_learning.models.decode import Decoder
from nested_learning.models.state import zip_tensors

# float32 rounding of different matrix-product shapes (the step projects one token where forward
# projects a chunk; the main memory advances by its one-token recurrence where forward solves a
# chunk): measured at most 4e-7 on the logits and 1.3e-6 on the state over 150 tokens
TOL = dict(atol=5e-6, rtol=1e-5)

VARIANTS = {
    "hope": ("hope", dict(proj_chunk=4, memory_chunk=8, cms_periods=[1, 4, 8])),
    "hope-attention": ("hope", dict(mixer="attention", cms_periods=[1, 4])),
    "hope-sliding-window": ("hope", dict(mixer="sliding_window", mixer_window=5, cms_periods=[1])),
    "hope-deltanet": ("hope", dict(mixer="deltanet", cms_periods=[1])),
    "hope-static-projections": ("hope", dict(self_modifying=False, proj_chunk=4)),
    "hope-values": ("hope", dict(memory_target="values", proj_chunk=4)),
    "hope-plain-memories": ("hope", dict(residual_memories=False, proj_chunk=4)),
    "titans": ("titans", dict(chunk_size=4)),
    "titans-mlp": ("titans", dict(chunk_size=4, memory="mlp")),
    "titans-window": ("titans", dict(chunk_size=4, window=6)),
    "transformer": ("transformer", {}),
    "transformer-window": ("transformer", dict(window=7)),
}


def _model(variant):
    name, kw = VARIANTS[variant]
    torch.manual_seed(0)
    return build_model(name, "tiny", **kw).eval()


def _assert_states_close(a, b):
    seen = []

    def check(x, y):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
        if x.dtype == torch.bool or not x.is_floating_point():
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, **TOL)
        seen.append(x)
        return x

    zip_tensors(a, b, check)
    assert a.position == b.position and seen


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_equals_the_streamed_forward(variant):
    m = _model(variant)
    g = torch.Generator().manual_seed(1)
    prompt, toks = torch.randint(0, 64, (3, 7), generator=g), torch.randint(0, 64, (3, 40), generator=g)
    with torch.no_grad(), range_checks_off():
        _, state = m.hidden(prompt)  # 7 tokens: every chunk (4, 8) and CMS period unfinished
        dec, ref_state = Decoder(m, state, room=10), state  # room 10 < 40: the KV caches must grow
        for i in range(toks.shape[1]):
            logits = dec.step(toks[:, i])
            ref, ref_state = m(toks[:, i:i + 1], ref_state)
            torch.testing.assert_close(logits, ref[:, 0], **TOL)
        _assert_states_close(dec.state(), ref_state)
        # the state it gives back carries on through forward as forward's own would
        after = torch.randint(0, 64, (3, 5), generator=g)
        torch.testing.assert_close(m(after, dec.state())[0], m(after, ref_state)[0], **TOL)


@pytest.mark.parametrize("variant", ["hope", "titans", "transformer-window"])
def test_step_after_a_reset_of_some_rows(variant):
    """Rows restarted by reset_state: their KV keys before the reset are masked, their pending
    chunk tokens write nothing (the attention mask path and the invalid-token gates)."""
    m = _model(variant)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad(), range_checks_off():
        _, state = m.hidden(torch.randint(0, 64, (2, 6), generator=g))
        state = m.reset_state(state, torch.tensor([True, False]))
        _, state = m.hidden(torch.randint(0, 64, (2, 2), generator=g), state)
        dec, ref_state = Decoder(m, state, room=4), state
        for t in torch.randint(0, 64, (12, 2), generator=g):
            logits = dec.step(t)
            ref, ref_state = m(t[:, None], ref_state)
            torch.testing.assert_close(logits, ref[:, 0], **TOL)
        _assert_states_close(dec.state(), ref_state)


@pytest.mark.parametrize("name", ["hope", "titans", "transformer"])
def test_generate_picks_what_the_streamed_forward_picks(name):
    """generate (the decode step) picks the tokens the old path (forward one token at a time)
    picks, over chunk ends: greedily, and sampled at temperature 1 with the same generator
    (a draw would differ only where it fell within float rounding of a probability boundary)."""
    m = _model(name)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    for temperature in (0.0, 1.0):
        out, _ = m.generate(prompt, 20, temperature=temperature, generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            h, st = m.hidden(prompt)
            ref = []
            for _ in range(20):
                nxt = m._pick(torch.nn.functional.linear(h[:, -1], m.embed.weight), temperature, None, g)
                ref.append(nxt)
                h, st = m.hidden(nxt[:, None], st)
        assert torch.equal(out, torch.stack(ref, 1)), temperature
    assert len(set(out[0].tolist())) > 1  # sampled: a real sequence, not one token repeated


def test_a_block_without_a_decode_step_decodes_through_its_forward():
    """Block's default decode (for blocks defined outside the package) runs forward on the token."""
    from nested_learning.models.lm import Block
    from nested_learning.models.transformer import TransformerBlock

    class ForwardOnly(TransformerBlock):
        decode_begin, decode, decode_end = Block.decode_begin, Block.decode, Block.decode_end

    m = _model("transformer")
    for blk in m.blocks:
        blk.__class__ = ForwardOnly
    toks = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dec, state = Decoder(m, m.init_state(2)), m.init_state(2)
        for i in range(toks.shape[1]):
            ref, state = m(toks[:, i:i + 1], state)
            assert torch.equal(dec.step(toks[:, i]), ref[:, 0])
        _assert_states_close(dec.state(), state)
