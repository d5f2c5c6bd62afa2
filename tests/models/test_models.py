import pytest
import torch

from nested_learning.models import ModelState, build_model
from nested_learning.models.state import map_tensors

NAMES = ["transformer", "titans", "hope"]
# chunk sizes that a 23-token test sequence cuts in the middle
SMALL = dict(hope=dict(proj_chunk=4, memory_chunk=8, cms_periods=(1, 4, 8)),
             titans=dict(chunk_size=4), transformer={})


def tiny(name, **kw):
    torch.manual_seed(0)
    return build_model(name, "tiny", **{**SMALL[name], **kw})


@pytest.mark.parametrize("name", NAMES)
def test_causality(name):
    m = tiny(name)
    tok = torch.randint(0, 64, (2, 23))
    logits, _ = m(tok)
    for t in (0, 5, 13, 21):
        alt = tok.clone()
        alt[:, t + 1:] = torch.randint(0, 64, alt[:, t + 1:].shape)
        logits2, _ = m(alt)
        assert torch.allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-6), t
        assert not torch.allclose(logits[:, t + 1:], logits2[:, t + 1:])


@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_parameter_gets_a_gradient(name):
    m = tiny(name)
    tok = torch.randint(0, 64, (2, 23))
    state = m.init_state(2)
    for _ in range(2):  # the second segment starts from a carried, detached state
        loss, cap, state = m.train_forward(tok, state)
        m.zero_grad()
        loss.backward()
        state, _ = m.apply_updates(state, cap)
        state = state.detach()
    dead = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().max() == 0)]
    assert not dead, f"parameters that never train: {dead}"


def flat_state(state: ModelState):
    return state.tensors()


@pytest.mark.parametrize("name", NAMES)
def test_streaming_segments_equal_whole(name):
    m = tiny(name).double()
    tok = torch.randint(0, 64, (2, 23))
    whole, st_whole = m(tok)
    st, outs = m.init_state(2), []
    for s0, s1 in [(0, 3), (3, 4), (4, 13), (13, 23)]:
        lg, st = m(tok[:, s0:s1], st)
        outs.append(lg)
    assert torch.allclose(torch.cat(outs, 1), whole, atol=1e-10)
    assert st.position == st_whole.position == 23
    for a, b in zip(flat_state(st), flat_state(st_whole)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_fast_state_is_per_sequence(name):
    m = tiny(name)
    tok = torch.randint(0, 64, (3, 11))
    logits, _ = m(tok)
    one, _ = m(tok[1:2])
    assert torch.allclose(logits[1:2], one, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_reset_rows_restart_those_sequences(name):
    m = tiny(name).double()
    a, b = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    _, st = m(a)
    st = m.reset_state(st, torch.tensor([True, False]))
    lg, _ = m(b, st)
    assert torch.allclose(lg[:1], _shift_free(m, b[:1], 8), atol=1e-8)
    cont, _ = m(b[1:], m(a[1:])[1])
    assert torch.allclose(lg[1:], cont, atol=1e-8)


def _shift_free(m, tok, pos):
    """Logits of a fresh sequence read at absolute position `pos` (RoPE is relative)."""
    st = m.init_state(tok.shape[0])
    st.position = pos
    return m(tok, st)[0]


@pytest.mark.parametrize("name", NAMES)
def test_state_detach_and_position(name):
    m = tiny(name)
    _, st = m(torch.randint(0, 64, (1, 5)))
    d = st.detach()
    assert d.position == 5 and all(not t.requires_grad for t in d.tensors())
    assert map_tensors(d, lambda t: t) is not d


def test_parameter_counts_are_exact_and_tied():
    m = build_model("transformer", "tiny")
    by_hand = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    assert m.num_parameters() == by_hand
    assert m.embed.weight.numel() == 64 * 32  # counted once: the head is the embedding


def test_reset_of_every_row_empties_the_kv_cache():
    m = tiny("transformer")
    _, st = m(torch.randint(0, 64, (2, 9)))
    assert st.layers[0]["attn"].k.shape[1] == 9
    st = m.reset_state(st, torch.tensor([True, True]))
    assert st.layers[0]["attn"].k.shape[1] == 0
    _, st = m(torch.randint(0, 64, (2, 4)), st)
    st = m.reset_state(st, torch.tensor([True, False]))
    assert st.layers[0]["attn"].k.shape[1] == 4  # row 1 still reads its 4 keys
