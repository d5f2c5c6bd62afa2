"""Multi-query associative recall (nested_learning/eval/recall.py, scripts/eval/recall.py): the
generator, the accuracy, the train/test separation, the no-writes control and the command line."""

import json

import numpy as np
import pytest
import torch

from nested_learning.eval import recall as RC
from nested_learning.eval.results import SCHEMA
from tests.helpers import run_python

TASK = RC.RecallTask(vocab_size=64, n_filler=8)  # keys 0..27, values 28..55, filler 56..63


def _check_rows(task, tokens, targets, N, L):
    keys, values, filler = set(task.keys), set(task.values), set(task.filler)
    assert tokens.shape == targets.shape and tokens.shape[1] == L and tokens.dtype == torch.int64
    for tok, tgt in zip(tokens.tolist(), targets.tolist()):
        ks, vs = tok[0:2 * N:2], tok[1:2 * N:2]
        assert set(ks) <= keys and set(vs) <= values and len(set(ks)) == N and len(set(vs)) == N
        value_of = dict(zip(ks, vs))
        queries = [t for t in range(L) if tgt[t] != RC.IGNORE]
        assert len(queries) == N and all(t >= 2 * N for t in queries)  # targets only at the N queries
        assert sorted(tok[t] for t in queries) == sorted(ks)  # every key queried once
        for t in queries:
            assert tgt[t] == value_of[tok[t]]  # the value paired with it earlier
            assert (t - 2 * N) % 2 == 0 and tok[t + 1] in filler  # a query slot: [key, filler]
        rest = [tok[t] for t in range(2 * N, L) if t not in queries]
        assert set(rest) <= filler


@pytest.mark.parametrize("N,L", [(1, 4), (4, 16), (4, 23), (8, 64), (28, 112)])
def test_generator_layout(N, L):
    assert not set(TASK.keys) & set(TASK.values) and not set(TASK.values) & set(TASK.filler)
    assert len(TASK.keys) + len(TASK.values) + len(TASK.filler) == TASK.vocab_size
    assert TASK.chance == 1 / 28
    tokens, targets = RC.make_batch(TASK, N, L, 16, np.random.default_rng(0))
    _check_rows(TASK, tokens, targets, N, L)


def test_generator_places_queries_like_zoology():
    """Queries at random later positions (not all right after the pairs), keys in shuffled order."""
    N, L = 8, 128
    tokens, targets = RC.make_batch(TASK, N, L, 256, np.random.default_rng(1))
    pos = (targets != RC.IGNORE).nonzero()[:, 1]
    assert pos.min() == 2 * N and pos.max() > 4 * N  # some queries far from the pairs
    assert (pos - 2 * N).float().mean() < (L - 2 * N) / 2  # the power law favours early slots
    in_pair_order = 0
    for tok, tgt in zip(tokens, targets):
        q = tok[tgt != RC.IGNORE].tolist()
        in_pair_order += q == tok[0:2 * N:2].tolist()
    assert in_pair_order < 5


def test_bad_cells_are_refused_and_listed():
    with pytest.raises(ValueError, match="4 x 8 pairs"):
        RC.make_batch(TASK, 8, 31, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="distinct keys"):
        RC.make_batch(TASK, 29, 256, 2, np.random.default_rng(0))
    ok, skipped = RC.split_cells(TASK, [2, 8], [16, 32])
    assert ok == [(2, 16), (2, 32), (8, 32)] and [c for c, _ in skipped] == [(8, 16)]


def test_accuracy_against_a_hand_made_case():
    V = 5
    targets = torch.tensor([[-100, 3, -100, 1], [2, -100, -100, -100]])
    logits = torch.zeros(2, 4, V)
    logits[0, 1, 3] = 1.0  # right
    logits[0, 3, 4] = 1.0  # wrong (target 1)
    logits[0, 0, 0] = logits[0, 2, 2] = 9.0  # ignored positions
    logits[1, 0, 2] = 1.0  # right
    correct, scored = RC.accuracy(logits.argmax(-1), targets)
    assert correct.tolist() == [1, 1] and scored.tolist() == [2, 1]


class _Lookup(torch.nn.Module):
    """Logits that recall the value of each key seen earlier (oracle), or always the first
    pair's value (right on exactly one query of N)."""

    def __init__(self, vocab, first_only=False):
        super().__init__()
        self.vocab, self.first_only = vocab, first_only

    def forward(self, tokens):
        B, L = tokens.shape
        logits = torch.zeros(B, L, self.vocab)
        for b in range(B):
            seen = {}
            for t in range(L - 1):
                tok = int(tokens[b, t])
                if t % 2 == 0 and int(tokens[b, t + 1]) in TASK.values and tok not in seen:
                    seen[tok] = int(tokens[b, t + 1])
                if tok in seen:
                    logits[b, t, int(tokens[b, 1]) if self.first_only else seen[tok]] = 1.0
        return logits, None


def test_evaluate_scores_an_oracle_and_a_first_value_guesser():
    cells = [(4, 32), (8, 64)]
    test = RC.make_test_set(TASK, cells, 10, seed=3)
    exact = RC.evaluate(_Lookup(TASK.vocab_size), test)
    assert all(r["acc"] == 1.0 and r["stderr"] == 0.0 and r["sequences"] == 10 for r in exact.values())
    first = RC.evaluate(_Lookup(TASK.vocab_size, first_only=True), test)
    assert first[(4, 32)]["acc"] == pytest.approx(1 / 4) and first[(8, 64)]["acc"] == pytest.approx(1 / 8)
    assert first[(8, 64)]["queries"] == 80


def test_training_never_sees_a_test_sequence():
    cells = [(4, 32), (8, 64)]
    test = RC.make_test_set(TASK, cells, 64, seed=0)
    batches = RC.TrainBatches(TASK, cells, 32, seed=0, test=test)
    for _ in range(20):
        _, tok, _ = batches.next()
        assert not any(row in test for row in tok)
    # a cell with only 3 keys x 3 values x 2 fillers = 18 distinct sequences: collisions are
    # certain, and every one is drawn again
    tiny = RC.RecallTask(vocab_size=8, n_filler=2)
    test = RC.make_test_set(tiny, [(1, 4)], 12, seed=0)
    assert len(test.digests) >= 6
    batches = RC.TrainBatches(tiny, [(1, 4)], 64, seed=0, test=test)
    for _ in range(5):
        _, tok, tgt = batches.next()
        assert not any(row in test for row in tok)
        _check_rows(tiny, tok, tgt, 1, 4)
    assert batches.replaced > 0


def test_data_is_deterministic_and_the_streams_differ():
    cells = [(4, 32), (8, 32)]
    a, b = RC.TrainBatches(TASK, cells, 8, seed=5), RC.TrainBatches(TASK, cells, 8, seed=5)
    for _ in range(4):
        (ca, ta, ga), (cb, tb, gb) = a.next(), b.next()
        assert ca == cb and torch.equal(ta, tb) and torch.equal(ga, gb)
    assert {a.next()[0], a.next()[0]} == set(cells)  # every cell once per round
    t1, t2 = RC.make_test_set(TASK, cells, 8, seed=5), RC.make_test_set(TASK, cells, 8, seed=6)
    assert torch.equal(t1.cells[(4, 32)][0], RC.make_test_set(TASK, cells, 8, seed=5).cells[(4, 32)][0])
    assert not torch.equal(t1.cells[(4, 32)][0], t2.cells[(4, 32)][0])


def test_the_control_never_writes_hopes_memories():
    """hope-nowrites: eta = 0, so the main memory and the projection memory stay their initial
    states up to the forget gate's scalar; HOPE with writes changes both."""
    tok, _ = RC.make_batch(TASK, 4, 32, 2, np.random.default_rng(0))

    def drift(name):
        model = RC.build_recall_model(name, TASK, d_model=16, n_heads=2, seed=0, proj_chunk=4, memory_chunk=8)
        _, state = model(tok)
        out = []
        for blk, st in zip(model.blocks, state.layers):
            mix = blk.mixer
            for now, init in ((st["mixer"].memory, mix.M0), (st["mixer"].proj, mix.P0)):
                now, init = now.detach().flatten(2).double(), init.detach().flatten(1).double().expand(now.shape[0], -1, -1)
                cos = torch.nn.functional.cosine_similarity(now, init, dim=-1)  # [B, H]: 1 = a scalar multiple
                out.append(float((1 - cos).abs().max()))
        return max(out)

    assert drift("hope-nowrites") < 1e-6
    assert drift("hope") > 1e-3
    with pytest.raises(ValueError, match="no self-modifying"):
        RC.build_recall_model("transformer", TASK, d_model=16, n_heads=2).disable_memory_writes()


def test_train_step_trains_and_skips_nothing():
    model = RC.build_recall_model("hope", TASK, d_model=16, n_heads=2, seed=0, proj_chunk=4, memory_chunk=8,
                                  cms_periods=(1, 4))
    opt = RC.build_optimizer(model, RC.DEFAULT_OPTIM)
    before = [p.detach().clone() for p in model.parameters()]
    tok, tgt = RC.make_batch(TASK, 4, 16, 4, np.random.default_rng(0))
    rec = RC.train_step(model, opt, tok, tgt)
    assert not rec["skipped"] and rec["inner_updates"] > 0 and np.isfinite(rec["loss"])
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))



def test_input_targets_add_the_inputs_next_tokens_and_keep_the_labels():
    tok = torch.tensor([[1, 30, 2, 31, 57, 58, 2, 59, 1, 60]])  # k1 v1 k2 v2 | filler, queries of k2 then k1
    tgt = torch.full_like(tok, RC.IGNORE)
    tgt[0, 6], tgt[0, 8] = 31, 30
    got = RC.input_targets(tok, tgt)
    assert got.tolist() == [[30, 2, 31, 57, 58, 2, 31, 1, 30, RC.IGNORE]]
    tok, tgt = RC.make_batch(TASK, 4, 32, 16, np.random.default_rng(3))
    got = RC.input_targets(tok, tgt)
    q = tgt != RC.IGNORE
    assert torch.equal(got[q], tgt[q])  # the labels as they were
    assert torch.equal(got[:, :-1][~q[:, :-1]], tok[:, 1:][~q[:, :-1]])  # elsewhere the input's next token
    assert (got[:, -1][~q[:, -1]] == RC.IGNORE).all()


def _segment_model(seed=0):
    return RC.build_recall_model("hope", TASK, d_model=16, n_heads=2, seed=seed, proj_chunk=4, memory_chunk=8,
                                 cms_periods=(1, 4))


def test_training_in_one_segment_is_the_unsegmented_step():
    tok, tgt = RC.make_batch(TASK, 4, 16, 4, np.random.default_rng(0))
    got = []
    for segment in (None, 16, 64):
        model = _segment_model()
        rec = RC.train_step(model, RC.build_optimizer(model, RC.DEFAULT_OPTIM), tok, tgt, segment=segment)
        got.append((rec, [p.detach().clone() for p in model.parameters()]))
    for rec, params in got[1:]:
        assert rec == got[0][0] and rec["steps"] == 1
        assert all(torch.equal(a, b) for a, b in zip(params, got[0][1]))


def test_training_in_segments_steps_per_scored_segment_and_carries_the_state(monkeypatch):
    """One optimizer step per segment that has a scored target; each step starts from the state
    the previous segment left (the CMS levels updated by its teach signal); a segment without a
    target only advances the state through a forward."""
    calls = []
    real = RC.TrainStep.__call__

    def spy(self, tokens, targets, states, **kw):
        r = real(self, tokens, targets, states, **kw)
        calls.append((tokens.shape[1], states[0], r.states[0], r.updates_applied))
        return r

    monkeypatch.setattr(RC.TrainStep, "__call__", spy)
    tok, tgt = RC.make_batch(TASK, 4, 32, 4, np.random.default_rng(0))  # pairs at 0-7, queries from 8 on
    model = _segment_model()
    opt = RC.build_optimizer(model, RC.DEFAULT_OPTIM)
    rec = RC.train_step(model, opt, tok, RC.input_targets(tok, tgt), segment=8)
    assert rec["steps"] == 4 == len(calls) and [c[0] for c in calls] == [8, 8, 8, 8] and rec["skipped"] == 0
    assert all(c[3] > 0 for c in calls) and rec["inner_updates"] == sum(c[3] for c in calls)
    for before, after in zip(calls, calls[1:]):
        assert after[1] is before[2]  # the state carried
    lvl = calls[1][1].tensors()  # the state the second segment read differs from a fresh one
    fresh = model.init_state(4).tensors()
    assert any(a.shape == b.shape and not torch.equal(a, b) for a, b in zip(lvl, fresh))
    calls.clear()
    rec = RC.train_step(model, opt, tok, tgt, segment=8)  # queries only: the pair segment has no loss
    first_query = int((tgt != RC.IGNORE).float().argmax(1).min())
    assert rec["steps"] == len(calls) == 4 - first_query // 8 and np.isfinite(rec["loss"])


@pytest.mark.slow
def test_the_command_line_end_to_end(tmp_path):
    """Every model, a tiny width, a few steps, through the script: JSON in the schema, the table
    with standard errors and chance, the not-run cell."""
    out = tmp_path / "recall"
    r = run_python("scripts/eval/recall.py", "--models", ",".join(RC.MODELS), "--pairs", "2,8", "--lengths",
                   "16,32", "--steps", "3", "--seeds", "0,1", "--batch-size", "4", "--test-sequences", "4",
                   "--vocab", "64", "--filler", "8", "--d-model", "16", "--heads", "2",
                   "--out", str(out), "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "chance 1/28" in r.stdout and "±" in r.stdout and "by pairs" in r.stdout and "by length" in r.stdout
    assert "not run: pairs 8 length 16" in r.stderr
    assert (out / "recall_table.md").read_text().strip() in r.stdout
    for name in RC.MODELS:
        res = json.loads((out / f"recall_{name}.json").read_text())
        assert res["schema"] == SCHEMA and res["evaluation"] == "recall" and res["run"] is None
        assert set(res["tasks"]) == {"mqar", "mqar_N2_L16", "mqar_N2_L32", "mqar_N8_L32"}
        for block in res["tasks"].values():
            assert block["chance"] == pytest.approx(1 / 28)
            assert 0 <= block["metrics"]["acc"]["value"] <= 1 and block["metrics"]["acc"]["stderr"] is not None
        ex = res["tasks"]["mqar"]["extra"]
        assert [t["steps"] for t in ex["training"]] == [3, 3] and ex["settings"]["seeds"] == [0, 1]
        assert ex["not_run"] == [{"pairs": 8, "length": 16, "reason": ex["not_run"][0]["reason"]}]
        assert set(ex["by_pairs"]) == {"2", "8"} and set(ex["by_length"]) == {"16", "32"}
        assert res["tasks"]["mqar_N8_L32"]["n_items"] == 8  # 4 test sequences x 2 seeds
    hope = json.loads((out / "recall_hope.json").read_text())["tasks"]["mqar"]["extra"]
    assert hope["training"][0]["inner_updates"] > 0 and hope["model_config"]["d_model"] == 16


def _tiny(name, seed=0):
    model = RC.build_recall_model(name, TASK, d_model=16, n_heads=2, seed=seed)
    return model.eval()


@pytest.mark.parametrize("name", list(RC.MODELS))
def test_reading_in_segments_gives_the_same_predictions(name):
    """Streaming a sequence with the fast state carried is exact, whether or not the segment
    divides the length or the model's chunks."""
    tok, _ = RC.make_batch(TASK, 4, 32, 6, np.random.default_rng(1))
    model = _tiny(name)
    whole = RC.predict(model, tok)
    for seg in (8, 5):
        assert torch.equal(RC.predict(model, tok, seg), whole), (name, seg)


def test_memorisation_scores_a_segment_before_learning_from_it_and_never_sees_the_labels(monkeypatch):
    from nested_learning.models.streaming import Memorize, MemorizeTally

    tok, tgt = RC.make_batch(TASK, 4, 32, 6, np.random.default_rng(2))
    model = _tiny("hope")
    seen = []
    real = model.memorize

    def spy(tokens, state, **kw):
        seen.append((tokens.clone(), kw.get("next_token"), kw.get("targets")))
        return real(tokens, state, **kw)

    monkeypatch.setattr(model, "memorize", spy)
    tally = MemorizeTally()
    plain = RC.predict(model, tok, 8)
    memo = RC.predict(model, tok, 8, Memorize(lr=1.0), tally)
    # the memorised inputs are the segments, their next token the following input token, no labels
    assert [t.shape[1] for t, _, _ in seen] == [8, 8, 8, 8] and all(g is None for _, _, g in seen)
    for i, (t, nxt, _) in enumerate(seen):
        assert torch.equal(t, tok[:, 8 * i:8 * i + 8])
        assert (nxt is None) if i == 3 else torch.equal(nxt, tok[:, 8 * i + 8])
    assert tally.reports == 4 and sum(tally.updates.values()) > 0
    assert torch.equal(memo[:, :8], plain[:, :8])  # the first segment is scored before any update
    assert not torch.equal(memo[:, 8:], plain[:, 8:])  # later segments read the updated levels
    # causal: changing the last segment's tokens changes no earlier prediction
    tok2 = tok.clone()
    tok2[:, 24:] = TASK.filler.start
    assert torch.equal(RC.predict(model, tok2, 8, Memorize(lr=1.0))[:, :24], memo[:, :24])


def test_a_model_without_cms_levels_memorises_nothing():
    from nested_learning.models.streaming import Memorize, MemorizeTally

    tok, _ = RC.make_batch(TASK, 4, 32, 6, np.random.default_rng(3))
    model, tally = _tiny("titans"), MemorizeTally()
    assert torch.equal(RC.predict(model, tok, 8, Memorize(lr=1.0), tally), RC.predict(model, tok))
    assert tally.reports == 0


def test_memorize_without_segments_is_refused(tmp_path):
    from nested_learning.cli import recall as cli

    with pytest.raises(SystemExit, match="--memorize needs --segment"):
        cli.main(["--models", "hope", "--memorize", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--segment must be >= 1"):
        cli.main(["--models", "hope", "--segment", "0", "--out", str(tmp_path)])



def test_config_field_overrides_are_read_as_yaml_and_a_malformed_one_is_refused(tmp_path):
    from nested_learning.cli import recall as cli
    from nested_learning.cli._common import field_overrides

    assert field_overrides(["cms_lr=0.1", "cms_optimizer=gd", " cms_periods=[1,4]", "self_modifying=false"]) == {
        "cms_lr": 0.1, "cms_optimizer": "gd", "cms_periods": [1, 4], "self_modifying": False}
    for bad in ("cms_lr", "=0.1"):
        with pytest.raises(SystemExit, match="expected FIELD=VALUE"):
            cli.main(["--models", "hope", "--override", bad, "--out", str(tmp_path)])

@pytest.mark.slow
def test_the_command_line_memorises_in_segments(tmp_path):
    """--segment and --memorize through the script: the memorised result file beside the
    baseline's, with its deltas and update counts; Titans (no CMS levels) repeats its baseline
    and says why."""
    out = tmp_path / "recall"
    r = run_python("scripts/eval/recall.py", "--models", "hope,titans", "--pairs", "2,4", "--lengths", "32",
                   "--steps", "3", "--seeds", "0", "--batch-size", "4", "--test-sequences", "4", "--vocab", "64",
                   "--filler", "8", "--d-model", "16", "--heads", "2", "--segment", "8", "--memorize",
                   "--memory-lr", "1.0", "--out", str(out), "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "hope memorised" in r.stdout and "titans memorised" in r.stdout
    for name in ("hope", "titans"):
        base = json.loads((out / f"recall_{name}.json").read_text())
        memo = json.loads((out / f"recall_{name}_memorize.json").read_text())
        assert memo["evaluation"] == "recall_memorize" and set(memo["tasks"]) == set(base["tasks"])
        assert base["tasks"]["mqar"]["extra"]["settings"]["segment"] == 8
        for task, block in memo["tasks"].items():
            delta = block["metrics"]["acc"]["value"] - base["tasks"][task]["metrics"]["acc"]["value"]
            assert block["baseline_delta"]["acc"] == pytest.approx(delta)
    hope = json.loads((out / "recall_hope_memorize.json").read_text())
    assert hope["memorize"]["updates_applied"] > 0 and hope["memorize"]["settings"]["lr"] == 1.0
    titans = json.loads((out / "recall_titans_memorize.json").read_text())
    assert titans["memorize"]["updates_applied"] == 0 and "no CMS levels" in titans["warnings"][0]
    assert all(b["baseline_delta"]["acc"] == 0 for b in titans["tasks"].values())


@pytest.mark.slow
def test_the_command_line_trains_in_segments_with_the_input_loss(tmp_path):
    out = tmp_path / "recall"
    r = run_python("scripts/eval/recall.py", "--models", "hope", "--pairs", "2,4", "--lengths", "32",
                   "--steps", "3", "--seeds", "0", "--batch-size", "4", "--test-sequences", "4", "--vocab", "64",
                   "--filler", "8", "--d-model", "16", "--heads", "2", "--train-segment", "8", "--input-loss",
                   "--out", str(out), "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr
    ex = json.loads((out / "recall_hope.json").read_text())["tasks"]["mqar"]["extra"]
    assert ex["settings"]["train_segment"] == 8 and ex["settings"]["input_loss"] is True
    t = ex["training"][0]
    assert t["steps"] == 3 and t["optimizer_steps"] == 12 and t["segment"] == 8 and t["input_loss"] is True
    bad = run_python("scripts/eval/recall.py", "--models", "hope", "--train-segment", "0", "--out", str(out))
    assert bad.returncode != 0 and "--train-segment must be >= 1 token" in bad.stderr
