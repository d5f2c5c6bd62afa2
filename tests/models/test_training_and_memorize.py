"""Overfitting a fixed batch, bad configs, and test-time memorisation."""

import pytest
import torch

from nested_learning.models import build_model

SMALL = dict(hope=dict(proj_chunk=4, memory_chunk=16, cms_periods=(1, 4)),
             titans=dict(chunk_size=4), transformer={})


@pytest.mark.parametrize("name", ["transformer", "titans", "hope"])
def test_tiny_model_overfits_a_fixed_batch(name):
    torch.manual_seed(0)
    m = build_model(name, "tiny", **SMALL[name])
    tok = torch.randint(0, 64, (4, 24))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(250):
        loss, cap, st = m.train_forward(tok)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        first = first if first is not None else loss.item()
    final = m.train_forward(tok)[0].item()
    assert final < 0.1 * first, (first, final)


@pytest.mark.parametrize("name,field,value,msg", [
    ("hope", "cms_periods", (1, 0, 4), "cms_periods"),
    ("hope", "cms_periods", (1, 2.5), "cms_periods"),
    ("hope", "cms_optimizer", "adam", "cms_optimizer"),
    ("hope", "proj_chunk", 0, "proj_chunk"),
    ("hope", "teach_clip", -1.0, "teach_clip"),
    ("titans", "memory", "deep", "memory"),
    ("titans", "chunk_size", -2, "chunk_size"),
    ("transformer", "d_model", 33, "d_model=33 must be divisible by n_heads"),
    ("transformer", "d_model", 30, "head dim d_model/n_heads must be even"),
    ("transformer", "n_heads", 0, "n_heads"),
    ("transformer", "window", 0, "window"),
])
def test_bad_configs_fail_at_construction_naming_the_field(name, field, value, msg):
    with pytest.raises(ValueError, match=msg):
        build_model(name, "tiny", **{field: value})


def test_unknown_model_size_and_field():
    with pytest.raises(ValueError, match="unknown model 'gpt'"):
        build_model("gpt")
    with pytest.raises(ValueError, match="unknown size"):
        build_model("hope", "huge")
    with pytest.raises(ValueError, match=r"no field\(s\) \['cms_period'\]"):
        build_model("hope", "tiny", cms_period=(1, 2))


# --- memorisation ---------------------------------------------------------------------
SEP, KEYS, VALUES = 1, range(16, 40), range(40, 64)
MEM = dict(proj_chunk=4, memory_chunk=16, cms_periods=(1, 2, 4), cms_lr=0.0)


def needle_batch(B, g):
    """[filler*8, SEP, key, value, filler*5] = 16-token context; query [SEP, key] -> value."""
    filler = torch.randint(2, 16, (B, 13), generator=g)
    key = torch.randint(KEYS.start, KEYS.stop, (B,), generator=g)
    val = torch.randint(VALUES.start, VALUES.stop, (B,), generator=g)
    ctx = torch.cat([filler[:, :8], torch.full((B, 1), SEP), key[:, None], val[:, None], filler[:, 8:]], 1)
    return ctx, torch.stack([torch.full((B,), SEP), key], 1), val


def p_answer(m, query, val, state):
    logits, _ = m(query, state)
    return logits[:, -1].softmax(-1).gather(1, val[:, None]).squeeze(1)


@pytest.fixture(scope="module")
def trained_hope():
    torch.manual_seed(0)
    m = build_model("hope", "tiny", **MEM)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):  # learn the format: filler, SEP key value, filler
        ctx, query, val = needle_batch(16, g)
        seq = torch.cat([ctx, query, val[:, None]], 1)
        loss = m.train_forward(seq)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def test_memorisation_raises_the_right_answer_and_keeps_slow_weights(trained_hope):
    m = trained_hope
    g = torch.Generator().manual_seed(123)
    ctx, query, val = needle_batch(32, g)
    m.zero_grad(set_to_none=True)
    slow = {k: v.clone() for k, v in m.state_dict().items()}
    _, st = m(ctx)
    base = p_answer(m, query, val, st)
    st_mem, report = m.memorize(ctx, steps=1, lr=1.0, next_token=query[:, 0])
    mem = p_answer(m, query, val, st_mem)
    assert report.updates_applied > 0 and all(s > 0 for s in report.surprise)
    # measured (cpu dgd backend): mean P(answer) 0.0403 -> 0.0503 (x1.25), higher for 32 of 32
    # facts. Several steps at this lr overshoot (the context loss rises): see the note in lm.py.
    assert mem.mean() > 1.15 * base.mean(), (base.mean().item(), mem.mean().item())
    assert (mem > base).float().mean() >= 0.9
    for k, v in m.state_dict().items():
        assert torch.equal(v, slow[k]), k  # slow weights bit-identical
    assert all(p.grad is None for p in m.parameters())


def test_memorize_steps_descend_the_context_loss_at_a_small_lr(trained_hope):
    ctx, query, _ = needle_batch(32, torch.Generator().manual_seed(123))
    _, report = trained_hope.memorize(ctx, steps=4, lr=0.01, next_token=query[:, 0])  # 0.03 overshoots
    assert all(b < a for a, b in zip(report.loss, report.loss[1:])), report.loss


def test_memorize_threshold_levels_and_reset(trained_hope):
    m = trained_hope
    ctx, query, val = needle_batch(4, torch.Generator().manual_seed(5))
    _, rep = m.memorize(ctx, lr=0.5, surprise_threshold=1e9)
    assert rep.updates_applied == 0 and rep.surprise[0] < 1e9  # the signal's real scale is logged
    st, rep = m.memorize(ctx, lr=0.5, levels=[2])
    assert {e.level for e in rep.events} == {2} and all(e.chunk_tokens == 4 for e in rep.events)
    assert [e.token_index for e in rep.events if e.layer == 0] == [3, 7, 11, 15]
    fresh = m.reset_state(st)
    assert all(torch.equal(a, b) for a, b in zip(fresh.tensors(), m.init_state(4).tensors()))


@pytest.mark.parametrize("name", ["transformer", "titans"])
def test_memorize_without_cms_only_consumes_tokens(name):
    m = build_model(name, "tiny", **SMALL[name])
    tok = torch.randint(0, 64, (2, 8))
    st, rep = m.memorize(tok)
    assert rep.updates_applied == 0 and st.position == 8
    _, st2 = m(tok)
    assert all(torch.allclose(a, b) for a, b in zip(st.tensors(), st2.tensors()))
