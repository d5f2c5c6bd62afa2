"""Continual learning: the transfer metrics on a hand-made matrix, no memorised token ever
scored, the SOTU eras, and the protocol end to end on tiny models."""

import os

import pytest

from nested_learning.constants import IGNORE
from nested_learning.eval import continual as C
from nested_learning.models.streaming import Memorize, MemorizeTally
from nested_learning.runs import load_run


def test_transfer_metrics_on_a_hand_made_matrix():
    R = [[0.1, 0.2, 0.3],  # the starting model
         [0.5, 0.3, 0.4],  # after segment 1
         [0.4, 0.6, 0.5],  # after segment 2
         [0.3, 0.5, 0.7]]  # after segment 3
    m = C.transfer_metrics(R)
    assert m["ACC"] == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    assert m["BWT"] == pytest.approx(((0.3 - 0.5) + (0.5 - 0.6)) / 2)
    assert m["FWT"] == pytest.approx(((0.3 - 0.2) + (0.5 - 0.3)) / 2)  # R[1][2] - b2, R[2][3] - b3
    assert m["forgetting"] == pytest.approx(((0.5 - 0.3) + (0.6 - 0.5)) / 2)  # best earlier - final
    assert C.transfer_metrics([[1.0], [2.0]]) == {"ACC": 2.0, "BWT": None, "FWT": None, "forgetting": None}
    with pytest.raises(ValueError, match="T\\+1 rows"):
        C.transfer_metrics([[1.0, 2.0], [1.0, 2.0]])


def test_no_memorised_token_is_ever_scored(tiny_runs, monkeypatch):
    model, _ = load_run(tiny_runs["hope"], device="cpu")
    seen = []
    real = C.segment_losses

    def spy(m, tok, tgt, state, memorize=None, reports=None):
        seen.append((memorize is not None, [int(x) for x in tgt[0] if int(x) != IGNORE]))
        return real(m, tok, tgt, state, memorize, reports)

    monkeypatch.setattr(C, "segment_losses", spy)
    ids = list(range(3, 3 + 150))  # distinct ids: a target's value is its position + 3
    total, n, span = C.score_document(model, ids, prefix=40, segment=16, memorize=Memorize(lr=0.1),
                                      reports=MemorizeTally())
    memorised = [t - 3 for is_mem, ts in seen if is_mem for t in ts]
    scored = [t - 3 for is_mem, ts in seen if not is_mem for t in ts]
    assert memorised == list(range(1, 40)) and scored == list(range(40, 150))
    assert not set(memorised) & set(scored) and n == 110 and span == (40, 149)


def test_sotu_eras_and_the_npm_hint(tmp_path, monkeypatch):
    for y in range(1790, 2022, 3):
        (tmp_path / f"{y}_some_president_x.txt").write_text(f"Address of {y}. " * 50)
    segs = C.sotu_segments(str(tmp_path))
    assert [s.name for s in segs] == ["1790-1847", "1850-1898", "1900-1949", "1950-1997", "2000-2021"]
    for s in segs:
        train = {n for n, _ in s.train}
        held = {n.split("#")[0] for n, _ in s.held_out}
        assert s.held_out and (not train & held or all("#" in n for n, _ in s.held_out))
    monkeypatch.setattr(C.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="--segments DIR1,DIR2"):
        C.fetch_sotu(str(tmp_path / "data"))


def _segments(root, corpus_dir):
    names = sorted(os.listdir(corpus_dir))
    dirs = []
    for i in range(3):
        d = root / f"era{i}"
        d.mkdir()
        for n in names[4 * i:4 * i + 4]:
            (d / n).write_text(open(os.path.join(corpus_dir, n)).read())
        dirs.append(str(d))
    return C.local_segments(dirs)


@pytest.mark.parametrize("name", ["hope", "titans"])
@pytest.mark.slow
def test_protocol_end_to_end(tiny_runs, corpus_dir, tmp_path, name):
    model, tok = load_run(tiny_runs[name], device="cpu")
    segs = _segments(tmp_path, corpus_dir)
    optim = {"name": "adamw", "lr": 3e-3}
    out = C.run_protocol(model, tok, segs, optim, steps=2, batch=2, seq_len=16, context_len=None, seed=0,
                         prefix=32, max_docs=2, max_tokens=200, memorize=Memorize(lr=0.1), reports=MemorizeTally())
    base = out["baseline"]
    assert len(base["extra"]["loss_matrix"]) == 4 and all(len(r) == 3 for r in base["extra"]["loss_matrix"])
    assert base["extra"]["R"][2][1] == -base["extra"]["loss_matrix"][2][1]
    assert set(base["metrics"]) == {"ACC", "BWT", "FWT", "forgetting"}
    se = base["extra"]["loss_stderr"]  # the spread over the 2 held-out documents of every entry
    assert len(se) == 4 and all(len(r) == 3 and all(x is not None and x >= 0 for x in r) for r in se)
    assert base["metrics"]["ACC"]["stderr"] == pytest.approx(sum(x * x for x in se[-1]) ** 0.5 / 3)
    assert base["extra"]["loss_matrix"][0] != base["extra"]["loss_matrix"][1]  # training moved the scores
    clocks = [s["level_clock"] for s in base["extra"]["stages"]]
    if name == "hope":  # every level of every layer updates in every era; memorisation changes the scores
        assert all({(c["layer"], c["level"]) for c in cl} == {(i, j) for i in range(2) for j in range(3)}
                   for cl in clocks)
        assert out["memorised"]["extra"]["loss_matrix"][1:] != base["extra"]["loss_matrix"][1:]
    else:
        assert "memorised" not in out and all(cl == [] for cl in clocks) and base["extra"]["level_clocks_note"]


def test_a_diverging_segment_is_skipped_and_recorded(tiny_runs, corpus_dir, tmp_path, monkeypatch):
    from nested_learning.data.tokens import SPECIALS, TokenDocs
    from nested_learning.ops import NonFiniteInputError
    from nested_learning.train.optim import build_optimizer

    model, tok = load_run(tiny_runs["hope"], device="cpu")
    before = [p.detach().clone() for p in model.parameters()]

    def boom(*a, **k):
        raise NonFiniteInputError("theta must lie in [0.0, 1.0], got values in [nan, nan]")

    monkeypatch.setattr(model, "train_forward", boom)
    seg = _segments(tmp_path, corpus_dir)[0]
    opt = build_optimizer(model, {"name": "adamw", "lr": 3e-3})
    out = C.train_segment(model, opt, TokenDocs.encode(seg.train, tok), 10, 2, 16, None, 0,
                          tok.token_to_id(SPECIALS[1]), 1.0)
    assert out["diverged_at_step"] == 3 and out["skipped_steps"] == 3 and out["level_clock"] == []
    assert all((p == b).all() for p, b in zip(model.parameters(), before))  # no update was applied
