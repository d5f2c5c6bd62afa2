"""NIAH and passkey prompts: exact token lengths, needles where they are said to be, one needle
per queried key in multi-key, scoring against the model's own log-likelihoods, "not run"
entries, and streaming 64k tokens with bounded state."""

import os
import random
import re
import time

import pytest
import torch

from nested_learning.eval.loglik import score_rows
from nested_learning.eval.needle import (
    PASSKEY_FILLER,
    VARIANTS,
    Haystack,
    NeedleTask,
    parse_depths,
    parse_lengths,
    score_item,
    stream_prompt,
)
from nested_learning.eval.retrieval import evaluate_grid
from nested_learning.models import build_model
from nested_learning.runs import load_run
from nested_learning.runs.load import held_out_documents


@pytest.fixture(scope="module")
def hope(tiny_runs):
    return load_run(tiny_runs["hope"], device="cpu")


@pytest.fixture(scope="module")
def task(hope):
    model, tok = hope
    name, docs = held_out_documents(model, None)
    return NeedleTask(tok, Haystack.from_texts(tok, [t for _, t in docs], name), distractors=5)


def test_series_parsing():
    assert parse_lengths("2k,4k,...,32k") == [2048, 4096, 8192, 16384, 32768]
    assert parse_lengths("1000,1500") == [1000, 1500]
    assert parse_depths("0,10,...,100") == [float(x) for x in range(0, 101, 10)]
    for bad in ("2k,...,8k", "4k,2k,...,1k"):
        with pytest.raises(ValueError):
            parse_lengths(bad)
    with pytest.raises(ValueError, match="percentages"):
        parse_depths("0,50,150")


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_has_the_requested_token_count_and_its_needles(task, variant):
    for length in (700, 1024, 2049, 5000):
        for depth in (0, 33, 50, 100):
            it = task.item(variant, length, depth, seed=1)
            assert len(it.ids) == length
            for n in it.needles:  # each needle's tokens are where the record says
                want = task._enc(task.needle_text(n["key"], n["value"]))
                assert it.ids[n["position"]:n["position"] + n["tokens"]] == want
            assert [n["value"] for n in it.needles if n["queried"]] == it.expected
            assert not set(it.expected) & set(it.distractor_values)
            # the first queried needle sits at the sentence boundary nearest to the depth
            room = length - len(task._enc(task._plan(variant, random.Random(0))[1])) - sum(
                n["tokens"] for n in it.needles)
            assert abs(it.needles[0]["position"] - depth / 100 * room) <= max(
                len(s) for s in task.haystack.sentences) + sum(n["tokens"] for n in it.needles)


def test_multikey_has_exactly_one_needle_with_the_queried_key(task):
    for seed in range(5):
        it = task.item("multikey", 1500, 50, seed)
        text = task.tok.decode(it.ids)
        (queried,) = [n["key"] for n in it.needles if n["queried"]]
        assert text.count(f"magic numbers for {queried} is:") == 1
        assert len({n["key"] for n in it.needles}) == len(it.needles) == 3
        it = task.item("multivalue", 1500, 50, seed)
        assert len({n["key"] for n in it.needles}) == 1 and len(it.expected) == 3


def test_passkey_prompt_and_too_short_lengths(hope):
    _, tok = hope
    pk = NeedleTask(tok, Haystack.from_texts(tok, [PASSKEY_FILLER], "filler"), "passkey", digits=5)
    it = pk.item("single", 777, 40, 0)
    assert len(it.ids) == 777 and re.search(rf"The pass key is {it.expected[0]}\.", tok.decode(it.ids))
    assert it.haystack_wraps > 0  # the filler repeats
    with pytest.raises(ValueError, match="cannot hold"):
        pk.item("single", 20, 0, 0)


def test_score_item_ranks_the_models_own_logliks(hope, task):
    model, tok = hope
    it = task.item("multivalue", 400, 50, 3)
    rec = score_item(task, model, it, segment=model.prefill_segment())
    state = stream_prompt(model, it.ids, model.prefill_segment())
    ll = [s.loglik for s in score_rows(model, state, [it.ids[-1]],
                                       [(0, tok.encode(" " + v).ids) for v in it.expected + it.distractor_values])]
    assert rec["loglik_true"] == pytest.approx(ll[:3], abs=1e-5)
    for i, r in enumerate(rec["ranks"]):  # 1 + the distractors scoring above the true value
        assert r == 1 + sum(d > ll[i] for d in ll[3:])
    assert rec["rank1"] == sum(r == 1 for r in rec["ranks"]) / 3
    assert rec["exact"] == all(v in re.findall(r"\d+", rec["generated"]) for v in it.expected)
    assert rec["prompt_tokens"] == 400


def test_grid_records_not_run_lengths_with_reasons(tiny_runs, task):
    model, _ = load_run(tiny_runs["transformer"], device="cpu")
    # the KV caches of 900 keys (2 layers, K and V, d_model 32, float32) for the 10 rows of scoring
    # (the prompt's state, its copy, and one per candidate: 5 distractors and up to 3 values)
    kv = 900 * 2 * 2 * 32 * 4 * 10 / 2**30
    block = evaluate_grid(task, model, "single", [16, 600, 1200], [0, 100], 1, 64, None, max_kv_gib=kv,
                          time_budget=None, seed=0)
    rows = {e["length"]: e for e in block["extra"]["by_length"]}
    assert rows[16]["status"] == "not run" and "cannot hold" in rows[16]["reason"]
    assert rows[1200]["status"] == "not run" and "KV cache" in rows[1200]["reason"]
    assert rows[600]["status"] == "run" and not rows[600]["windowed"] and rows[600]["items"] == 2
    assert block["n_items"] == 2 and {r["prompt_tokens"] for r in block["records"]} == {600}
    block = evaluate_grid(task, model, "single", [600, 1200], [50], 1, 64, 128, 8.0, None, seed=0)
    assert all(e["windowed"] and e["attended_keys"] == 128 for e in block["extra"]["by_length"])
    block = evaluate_grid(task, model, "single", [600, 4096], [50], 1, 64, 128, 8.0, time_budget=1e-6, seed=0)
    rows = {e["length"]: e for e in block["extra"]["by_length"]}
    assert rows[600]["status"] == "run" and "time-budget" in rows[4096]["reason"]


@pytest.mark.parametrize("name", ["hope", "titans"])
@pytest.mark.slow
def test_streaming_64k_tokens_in_bounded_state(task, name):
    """The tiny size with the models' default chunks (the tiny runs' chunks of 4-8 tokens are
    for fast training tests, and stream 3x slower)."""
    torch.manual_seed(0)
    model = build_model(name, "tiny", vocab_size=task.tok.get_vocab_size()).eval()
    it = task.item("single", 65536, 50, 0)
    size = lambda st: sum(t.numel() for t in st.tensors())  # noqa: E731
    start = size(model.init_state(1))
    t0 = time.process_time()
    with model.attention_window(256):
        state = stream_prompt(model, it.ids, segment=model.prefill_segment())
    # CPU seconds of this process (its threads summed): under a minute of wall time on an idle
    # 2-core machine (about 15-25 s measured), and unaffected by other jobs sharing the cores
    assert time.process_time() - t0 < 120
    assert state.position == 65535 and len(it.ids) == 65536
    c = model.config
    if name == "titans":  # plus a KV cache of at most 256 keys and the memory's unfinished chunk
        bound = start + (2 * 256 + 4 * c.chunk_size) * c.d_model * c.n_layers
    else:  # plus each CMS level's unfinished chunk (inputs and signals of < period tokens)
        bound = start + 2 * sum(c.cms_periods) * c.d_model * c.n_layers
    assert size(state) <= bound  # a constant, whatever the length
    assert all(torch.isfinite(t).all() for t in state.tensors() if t.is_floating_point())


def test_a_prompt_that_makes_the_state_non_finite_is_a_wrong_answer(hope, task, monkeypatch):
    import nested_learning.eval.needle as N
    from nested_learning.ops import NonFiniteInputError

    def boom(*a, **k):
        raise NonFiniteInputError("theta must lie in [0.0, 1.0], got values in [nan, nan]")

    monkeypatch.setattr(N, "stream_prompt", boom)
    it = task.item("single", 700, 50, 0)
    rec = score_item(task, hope[0], it, segment=64)
    assert rec["exact"] is False and rec["ranks"] == [task.k + 1] and "nan" in rec["non_finite"]
    assert rec["prompt_tokens"] == 700


def test_multikey_ranks_the_other_keys_values_and_depths_share_the_haystack(task):
    it = task.item("multikey", 1500, 50, 0)
    others = [n["value"] for n in it.needles if not n["queried"]]
    assert it.distractor_values[:2] == others and len(it.distractor_values) == task.k + 2
    a, b = task.item("single", 1500, 0, 4), task.item("single", 1500, 100, 4)
    strip = lambda it: it.ids[:it.needles[0]["position"]] + it.ids[it.needles[0]["position"] + it.needles[0]["tokens"]:]  # noqa: E731
    assert strip(a)[:1000] == strip(b)[:1000]  # the same prose at both depths, the needle aside


def test_ties_and_non_finite_scores_never_win(hope, task, monkeypatch):
    import nested_learning.eval.needle as N
    from nested_learning.eval.loglik import Scored

    it = task.item("single", 700, 50, 0)
    for true, want in ((float("nan"), task.k + 1), (-1.0, task.k + 1), (0.0, 1)):
        monkeypatch.setattr(N, "score_rows", lambda m, st, last, rows, t=true: [Scored(t, False, 1)] + [
            Scored(-1.0, False, 1)] * (len(rows) - 1))
        assert score_item(task, hope[0], it, segment=64)["ranks"] == [want]


def test_a_killed_grid_resumes_without_scoring_its_prompts_again(hope, task, tmp_path, monkeypatch):
    import nested_learning.eval.retrieval as RT

    model, _ = hope
    args = (task, model, "single", [300, 600], [0, 50, 100], 1, 64, None, 8.0, None, 0)
    whole = evaluate_grid(*args)
    partial = str(tmp_path / ".niah_hope_single.partial.pt")
    calls, real = [], RT.score_item

    def dies_on_the_fourth(*a, **k):
        calls.append(a[2].length)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed while the fourth prompt (the first of 600 tokens) streams
        return real(*a, **k)

    monkeypatch.setattr(RT, "score_item", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        evaluate_grid(*args, partial=partial, key={"checkpoint": "x"})
    calls.clear()
    monkeypatch.setattr(RT, "score_item", lambda *a, **k: calls.append(a[2].length) or real(*a, **k))
    resumed = evaluate_grid(*args, partial=partial, key={"checkpoint": "x"})
    assert calls == [600, 600, 600]  # the three prompts of 300 tokens were kept, not scored again
    drop = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert drop(resumed["records"]) == drop(whole["records"]) and resumed["metrics"] == whole["metrics"]
    assert not os.path.exists(partial)
