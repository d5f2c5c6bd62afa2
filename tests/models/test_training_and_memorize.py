"""Overfitting a fixed batch, bad configs, and test-time memorisation."""

import pytest
import torch

from nested_learning.models import build_model

SMALL = dict(hope=dict(proj_chunk=4, memory_chunk=16, cms_periods=(1, 4)),
             titans=dict(chunk_size=4), transformer={})


@pytest.mark.parametrize("name", ["transformer", "titans", "hope"])
@pytest.mark.slow
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
    with pytest.raises(ValueError, match=r"HOPEConfig has no field cms_period \(did you mean cms_periods"):
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


# The trained model depends on the exact rounding of its 150 training steps: a perturbation
# of 1e-7 of the initial weights, or a kernel that rounds differently, ends in a different
# model, and across such models the summed context loss's gradient norm and curvature in the
# CMS weights differ by ~1000x (one step at lr=1 raises P(answer) x1.5 in one, divides it by 20
# in another). So these tests train several models (seeds) and assert properties that held,
# with a margin, in every one of 18 models measured (12 seeds, 6 perturbations of seed 0):
# the first-order gain at a small lr, and descent at an lr scaled to each model's curvature.
MEM_SEEDS = (0, 1, 2)
MEM_LR = 0.01  # small enough to be first order in every model measured
SEARCH_LRS = [10 ** (-e / 2) for e in range(11)]  # 1, 0.3, ..., 1e-5


def train_needle_model(seed, init_noise=0.0, noise_seed=0):
    torch.manual_seed(seed)
    m = build_model("hope", "tiny", **MEM)
    if init_noise:  # robustness checks: a rounding-level perturbation of the initial weights
        gn = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1 + init_noise * torch.randn(p.shape, generator=gn))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(150):  # learn the format: filler, SEP key value, filler
        ctx, query, val = needle_batch(16, g)
        seq = torch.cat([ctx, query, val[:, None]], 1)
        loss = m.train_forward(seq)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


@pytest.fixture(scope="module")
def trained_hopes():
    return [train_needle_model(s) for s in MEM_SEEDS]


@pytest.fixture(scope="module")
def trained_hope(trained_hopes):
    return trained_hopes[0]


def memorisation_gain(m, ctx, query, val, lr=MEM_LR):
    """Per fact: log P(answer) after one memorize step on the context minus before, the same for
    a wrong value (a control: the next value token), and the report."""
    wrong = VALUES.start + (val - VALUES.start + 1) % len(VALUES)
    with torch.no_grad():
        _, st = m(ctx)
        base, base_wrong = p_answer(m, query, val, st), p_answer(m, query, wrong, st)
    st_mem, report = m.memorize(ctx, steps=1, lr=lr, next_token=query[:, 0])
    with torch.no_grad():
        mem, mem_wrong = p_answer(m, query, val, st_mem), p_answer(m, query, wrong, st_mem)
    return (mem / base).log(), (mem_wrong / base_wrong).log(), report


def descent_lr(m, ctx, next_token):
    """The largest lr of SEARCH_LRS at which one memorize step lowers the context loss, over 10:
    a step size scaled to the model's curvature (None when no lr lowers it)."""
    for lr in SEARCH_LRS:
        loss = m.memorize(ctx, steps=2, lr=lr, next_token=next_token)[1].loss
        if loss[1] < loss[0]:
            return lr / 10
    return None


@pytest.mark.slow
def test_memorisation_raises_the_right_answer_and_keeps_slow_weights(trained_hopes):
    ctx, query, val = needle_batch(64, torch.Generator().manual_seed(123))
    gains, fractions, specific = [], [], []
    for m in trained_hopes:
        m.zero_grad(set_to_none=True)
        slow = {k: v.clone() for k, v in m.state_dict().items()}
        gain, wrong, report = memorisation_gain(m, ctx, query, val)
        assert report.updates_applied > 0 and all(s > 0 for s in report.surprise)
        for k, v in m.state_dict().items():
            assert torch.equal(v, slow[k]), k  # slow weights bit-identical
        assert all(p.grad is None for p in m.parameters())
        gains.append(gain.mean().item())
        fractions.append((gain > 0).float().mean().item())
        specific.append((gain - wrong).mean().item())
    # measured at lr=0.01 in 18 models (seeds 0-11, 6 perturbations of seed 0; these 64 facts):
    # mean log-gain 0.0020-0.0083 (P(answer) x1.002-x1.008), raised for 81%-100% of the facts,
    # answer minus wrong-value gain 0.0021-0.0103. The median over the seeds tolerates one
    # unusual model; without memorisation every one is 0 (test_without_memorisation_...).
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    assert med(gains) > 1e-3 and min(gains) > 0, gains
    assert med(fractions) >= 0.7, fractions
    assert med(specific) > 1e-3, specific  # the answer, not every value token, gains


def test_memorize_steps_descend_the_context_loss(trained_hopes):
    ctx, query, _ = needle_batch(32, torch.Generator().manual_seed(123))
    for m in trained_hopes:
        lr = descent_lr(m, ctx, query[:, 0])
        assert lr is not None, "no lr lowers the context loss"
        loss = m.memorize(ctx, steps=4, lr=lr, next_token=query[:, 0])[1].loss
        # each step lowers the summed loss by well over its rounding (~1e-7 relative): the least
        # relative decrease measured over 21 models was 6.7e-5 (lr 3.2e-5 to 3.2e-2)
        assert all(b < a * (1 - 1e-6) for a, b in zip(loss, loss[1:])), (lr, loss)


def test_without_memorisation_nothing_is_gained(trained_hope):
    """The two tests above discriminate: at lr=0 (the updates do nothing) every gain is 0
    (to rounding) and a memorize step leaves the context loss where it was, so both would fail."""
    ctx, query, val = needle_batch(64, torch.Generator().manual_seed(123))
    gain, wrong, report = memorisation_gain(trained_hope, ctx, query, val, lr=0.0)
    # 0 up to one rounding: the memorised state comes from a pass with autograd on, whose
    # reads of the fast weights round once more than a plain forward's (layers/common.py)
    assert report.updates_applied == 0 and gain.abs().max() < 1e-5
    ctx, query, _ = needle_batch(32, torch.Generator().manual_seed(123))
    loss = trained_hope.memorize(ctx, steps=2, lr=0.0, next_token=query[:, 0])[1].loss
    assert loss[1] == loss[0]


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


def test_the_memorisation_tally_records_the_reread_loss(trained_hope):
    """With steps > 1 a memorising evaluation's result file says how the memorised tokens' loss
    moved when re-read after the updates (falls at a descent lr); with one step it says nothing."""
    from nested_learning.eval.results import summarise_memorisation
    from nested_learning.models.streaming import Memorize, MemorizeTally

    ctx, query, _ = needle_batch(16, torch.Generator().manual_seed(7))
    lr = descent_lr(trained_hope, ctx, query[:, 0])
    tally, setting = MemorizeTally(), Memorize(steps=3, lr=lr)
    for half in (ctx[:8], ctx[8:]):
        rep = trained_hope.memorize(half, steps=3, lr=lr)[1]
        tally.append(rep)
    block, _ = summarise_memorisation(setting, tally)
    r = block["reread"]
    assert r["segments"] == 2 and r["loss_after"] < r["loss_before"]
    assert r["change"] == pytest.approx(r["loss_after"] / r["loss_before"] - 1) and r["change"] < 0
    one = MemorizeTally()
    one.append(trained_hope.memorize(ctx[:8], steps=1, lr=lr)[1])
    assert summarise_memorisation(Memorize(lr=lr), one)[0]["reread"] is None
