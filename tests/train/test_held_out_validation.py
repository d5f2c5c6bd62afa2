"""Training's validation: fixed held-out streams from distinct validation documents (the same
tokens at the same positions for every model, batch size and world size), each context read
from a fresh state in segments with the fast state carried; the mean loss and its standard
error over the streams."""

import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import nested_learning.train.validation as stream_mod
from nested_learning.constants import IGNORE
from nested_learning.data.streams import held_out_streams
from nested_learning.data.tokens import TokenDocs
from nested_learning.models import build_model
from nested_learning.train.validation import mean_and_se, validation_loss

PAD = 1
CPU = torch.device("cpu")


def docs_of(lengths, seed=0, vocab=60):
    rng = np.random.default_rng(seed)
    toks = [rng.integers(2, vocab, n).astype(np.uint16) for n in lengths]
    offsets = np.zeros(len(lengths) + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    return TokenDocs(np.concatenate(toks), offsets, [f"d{i}" for i in range(len(lengths))])


def info(rank=0, world=1):
    return SimpleNamespace(rank=rank, world=world, device=CPU, main=rank == 0)


def cfg_of(batch=2, seq_len=8, context_len=32, eval_tokens=200):
    return {"train": {"batch_size": batch, "seq_len": seq_len, "context_len": context_len, "eval_tokens": eval_tokens}}


# ---------------------------------------------------------------------------- the streams
def test_streams_hold_distinct_documents_and_the_stated_token_count():
    docs = docs_of([500, 90, 700, 3, 1, 400, 800])
    s = held_out_streams(docs, 1000, context_len=64)
    assert len(set(s.docs)) == len(s.docs) and list(s.docs) == sorted(s.docs)  # no document twice, split order
    assert s.n_tokens == 1000 == sum(s.lengths)
    for d, n in zip(s.docs, s.lengths):
        assert 1 <= n <= len(docs.doc(d)) - 1  # predictions within the document
    # the budget shared as evenly as the lengths allow (water-filling): the short documents whole, the
    # others capped at 228 tokens (89 + 2 + 4 x 228 >= 1000), the last one cut to meet the budget exactly
    assert dict(zip(s.docs, s.lengths)) == {0: 228, 1: 89, 2: 228, 3: 2, 5: 228, 6: 225}
    assert 4 not in s.docs  # a 1-token document has nothing to predict
    # identical for every call (no seed, no model, no batch or world in it)
    assert held_out_streams(docs, 1000, context_len=64) == s


def test_many_short_documents_give_streams_of_at_least_a_context_and_few_documents_share_the_budget():
    many = docs_of([300] * 50)
    s = held_out_streams(many, 1000, context_len=128)
    assert s.docs == tuple(range(8)) and s.lengths == (128,) * 7 + (104,)  # at least a context each
    few = docs_of([5000, 5000, 5000, 5000])  # the Shakespeare shape: 4 long documents
    s = held_out_streams(few, 8192, context_len=1024)
    assert s.docs == (0, 1, 2, 3) and s.lengths == (2048,) * 4
    whole = held_out_streams(few, 10**6, context_len=1024)  # the budget exceeds the split: every prediction
    assert whole.lengths == (4999,) * 4 and whole.n_tokens == 4 * 4999


def test_pieces_are_the_contexts_of_each_stream():
    s = held_out_streams(docs_of([100, 100]), 150, context_len=32)
    assert s.lengths == (75, 75)
    assert s.pieces() == [(0, 0, 32), (0, 32, 64), (0, 64, 75), (1, 0, 32), (1, 32, 64), (1, 64, 75)]
    # context_len null: one piece per stream (the state is never reset), streams capped at no less
    # than MIN_EVAL_STREAM (1024) tokens, so here the first document whole and the rest of the budget
    assert held_out_streams(docs_of([100, 100]), 150, context_len=None).pieces() == [(0, 0, 99), (1, 0, 51)]


# ---------------------------------------------------------------------------- exact positions
class PositionProbe(torch.nn.Module):
    """A stand-in model whose loss at a token is its target id, and whose state counts the tokens
    it has read since a fresh state; it records (token, target, position since the fresh state)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(1, 1)
        self.seen = []

    def has_cms(self):
        return False

    def init_state(self, batch):
        return torch.zeros(batch, dtype=torch.long)

    def forward(self, tokens, state, targets=None, reduction="none"):
        T = tokens.shape[1]
        pos = state[:, None] + torch.arange(T)[None]
        for b in range(tokens.shape[0]):
            for t in range(T):
                if targets[b, t] != IGNORE:
                    self.seen.append((int(tokens[b, t]), int(targets[b, t]), int(pos[b, t])))
        return torch.where(targets != IGNORE, targets.float(), 0.0), state + T


@pytest.mark.parametrize("context_len", [32, None])
@pytest.mark.parametrize("batch,world", [(1, 1), (3, 1), (2, 2), (1, 3)])
def test_every_planned_position_is_scored_once_from_a_fresh_state(batch, world, context_len):
    docs = docs_of([200, 45, 130, 300])
    cfg = cfg_of(batch=batch, seq_len=8, context_len=context_len, eval_tokens=400)
    plan = held_out_streams(docs, 400, context_len)
    expect = sorted((int(docs.doc(d)[i]), int(docs.doc(d)[i + 1]), i % (context_len or 10**9))
                    for d, n in zip(plan.docs, plan.lengths) for i in range(n))
    seen, totals = [], 0
    for rank in range(world):  # the ranks' shares (the all-reduce sums them)
        probe = PositionProbe()
        totals = totals + rank_totals(probe, docs, cfg, rank, world, plan)
        seen += probe.seen
    assert sorted(seen) == expect  # each planned (token, target) once, at its position in its context
    assert totals[:, 1].sum() == 400
    assert math.isclose(totals[:, 0].sum() / 400, statistics.fmean(t for _, t, _ in expect), rel_tol=1e-12)


def rank_totals(model, docs, cfg, rank, world, plan):
    """Rank `rank` of `world`'s per-stream [sum, count] before the all-reduce (world 1: the result's)."""
    if world == 1:
        v = validation_loss(model, docs, cfg, info(), PAD, streams=plan)
        n = np.array(plan.lengths, dtype=np.float64)
        return np.stack([np.array(v.stream_loss) * n, n], 1)
    got = {}
    orig = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda t: got.setdefault("totals", t.clone())
    try:
        validation_loss(model, docs, cfg, info(rank, world), PAD, streams=plan)
    finally:
        torch.distributed.all_reduce = orig
    return got["totals"].numpy()


def test_two_different_models_see_exactly_the_same_tokens(monkeypatch):
    docs = docs_of([150, 120, 90], vocab=64)
    cfg = cfg_of(batch=2, seq_len=8, context_len=32, eval_tokens=240)
    calls = {}
    real = stream_mod.segment_losses

    def spy(model, tokens, targets, state, *a, **k):
        calls.setdefault(type(model).__name__, []).append((tokens.clone(), targets.clone()))
        return real(model, tokens, targets, state, *a, **k)

    monkeypatch.setattr(stream_mod, "segment_losses", spy)
    torch.manual_seed(0)
    hope = build_model("hope", "tiny", proj_chunk=4, memory_chunk=8, cms_periods=(1, 4, 8))
    transformer = build_model("transformer", "tiny")
    vh = validation_loss(hope, docs, cfg, info(), PAD)
    vt = validation_loss(transformer, docs, cfg, info(), PAD)
    a, b = calls["HOPE"], calls["Transformer"]
    assert len(a) == len(b) > 0
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert vh.tokens == vt.tokens == 240 and vh.streams == vt.streams == 3 and vh.loss != vt.loss


# ---------------------------------------------------------------------------- batch and world
@pytest.mark.parametrize("name", ["hope", "titans"])
@pytest.mark.slow
def test_the_result_does_not_depend_on_batch_size_or_world_size(name):
    """A model whose fast state learns (HOPE's CMS levels memorise each segment), batched 1, 3 and
    5 rows, and split over 2 and 3 ranks: the same per-stream losses."""
    docs = docs_of([150, 120, 90, 200], vocab=64)
    over = {"hope": dict(proj_chunk=4, memory_chunk=8, cms_periods=(1, 4, 8)), "titans": dict(chunk_size=4)}[name]
    torch.manual_seed(0)
    m = build_model(name, "tiny", **over)
    base = cfg_of(batch=1, seq_len=8, context_len=32, eval_tokens=400)
    ref = validation_loss(m, docs, base, info(), PAD)
    for batch in (3, 5):
        v = validation_loss(m, docs, cfg_of(batch=batch, seq_len=8, context_len=32, eval_tokens=400), info(), PAD)
        assert v.tokens == ref.tokens == 400
        np.testing.assert_allclose(v.stream_loss, ref.stream_loss, rtol=1e-5)
        assert math.isclose(v.loss, ref.loss, rel_tol=1e-5) and math.isclose(v.se, ref.se, rel_tol=1e-4)
    plan = held_out_streams(docs, 400, 32)
    for world in (2, 3):
        cfg = cfg_of(batch=2, seq_len=8, context_len=32, eval_tokens=400)
        tot = sum(rank_totals(m, docs, cfg, r, world, plan) for r in range(world))
        np.testing.assert_allclose(tot[:, 0] / tot[:, 1], ref.stream_loss, rtol=1e-5)
        assert tot[:, 1].sum() == 400


# ---------------------------------------------------------------------------- the standard error
def test_standard_error_by_hand():
    # stream means 2, 3, 2 over 1, 2, 2 tokens: m = 12 / 5 = 2.4;
    # se^2 = 3/2 * ((1/5)^2 (-0.4)^2 + (2/5)^2 0.6^2 + (2/5)^2 (-0.4)^2) = 1.5 * 0.0896 = 0.1344
    m, se = mean_and_se([2.0, 6.0, 4.0], [1, 2, 2])
    assert math.isclose(m, 2.4) and math.isclose(se, math.sqrt(0.1344))
    # equal lengths: the sample standard deviation of the stream means over sqrt(K)
    means = [1.0, 2.5, 4.0, 3.0]
    m, se = mean_and_se([x * 10 for x in means], [10] * 4)
    assert math.isclose(m, statistics.fmean(means)) and math.isclose(se, statistics.stdev(means) / 2)
    assert mean_and_se([5.0], [2]) == (2.5, None)  # one stream: no standard error
    assert mean_and_se([5.0, 0.0], [2, 0]) == (2.5, None)  # a stream of no token is left out


def test_validation_reports_the_standard_error_of_its_streams():
    docs = docs_of([150, 120, 90, 200], vocab=64)
    torch.manual_seed(0)
    m = build_model("transformer", "tiny")
    v = validation_loss(m, docs, cfg_of(eval_tokens=400), info(), PAD)
    n = list(held_out_streams(docs, 400, 32).lengths)
    assert v.streams == 4 and v.tokens == 400
    want = mean_and_se([x * k for x, k in zip(v.stream_loss, n)], n)
    assert math.isclose(v.loss, want[0], rel_tol=1e-9) and math.isclose(v.se, want[1], rel_tol=1e-9)
