"""The one training step (nested_learning.train.step): train.py and a continual-learning segment
give the same loss trace on the same data and seed, and a skipped step keeps the pre-step fast
state (and the slow weights) in the trainer, in continual learning and in the recall suite."""

import numpy as np
import pytest
import torch

from nested_learning.data.shards import prepare_corpus
from nested_learning.data.sources import data_dir_of
from nested_learning.data.tokens import SPECIALS
from nested_learning.eval import continual as C
from nested_learning.eval import recall as RC
from nested_learning.models import build_model
from nested_learning.train.loop import run
from nested_learning.train.optim import build_optimizer
from nested_learning.train.step import TrainStep
from tests.train.conftest import read_metrics

STEPS = 6


def _segment_like(cfg, on_step):
    """train_segment on the run's training documents, with the run's model init, seed,
    batch, seq_len, context, optimizer and warm-up."""
    t, o = cfg["train"], cfg["optim"]
    tok, train_docs, _ = prepare_corpus(cfg["data"], data_dir_of(cfg["data"]), log=lambda *a: None)
    torch.manual_seed(t["seed"])  # the trainer seeds the model init the same way
    model = build_model(cfg["model"]["name"], cfg["size"]["name"], vocab_size=tok.get_vocab_size(),
                        **cfg["model"]["overrides"])
    opt = build_optimizer(model, o)
    out = C.train_segment(model, opt, train_docs, t["steps"], t["batch_size"], t["seq_len"], t["context_len"],
                          t["seed"], tok.token_to_id(SPECIALS[1]), t["clip"], warmup=o["warmup"], on_step=on_step)
    return model, out


@pytest.mark.parametrize("name,overrides", [
    ("hope", {"proj_chunk": 4, "memory_chunk": 8, "cms_periods": [1, 4, 8]}),
    ("titans", {"chunk_size": 4}),
])
def test_a_continual_segment_gives_the_loss_trace_of_train_py(make_cfg, name, overrides):
    # continual learning's schedule is a warm-up then a constant rate: min_lr_ratio=1 in train.py
    cfg = make_cfg(model={"name": name, "overrides": overrides}, optim={"warmup": 3, "min_lr_ratio": 1.0},
                   train={"steps": STEPS, "save_every": 0, "eval_every": 0})
    run(cfg)
    recs = read_metrics(cfg["train"]["out_dir"])
    seen = []
    _, out = _segment_like(cfg, lambda k, r: seen.append((r.loss, r.grad_norm, r.updates_applied)))
    assert [r["loss"] for r in recs] == [x[0] for x in seen]  # bit-identical, every step
    assert [r["grad_norm"] for r in recs] == [x[1] for x in seen]
    assert [sum(r["inner_updates"].values()) for r in recs] == [x[2] for x in seen]
    assert out["train_loss_last"] == recs[-1]["loss"] and out["skipped_steps"] == 0
    if name == "hope":
        assert all(x[2] > 0 for x in seen)  # the inner update pass ran on every step


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _keeps_the_pre_step_state(seen):
    """Step 3 was skipped: step 4 starts from step 3's slow weights and fast state (no optimizer
    step, no inner update, no reset to a fresh state); step 4 trained."""
    (w3, s3), (w4, s4), (w5, s5) = seen[2:5]
    assert _same(w3, w4) and _same(s3, s4)
    assert not _same(w4, w5) and not _same(s4, s5)


def test_a_skipped_step_keeps_the_pre_step_fast_state_in_the_trainer(make_cfg, poison):
    seen = poison({3})
    cfg = make_cfg(train={"steps": 5, "save_every": 0, "eval_every": 0})
    run(cfg)
    assert read_metrics(cfg["train"]["out_dir"])[2]["skipped"] == "loss nan"
    _keeps_the_pre_step_state(seen)


def test_a_skipped_step_keeps_the_pre_step_fast_state_in_continual_learning(make_cfg, poison):
    seen = poison({3})
    cfg = make_cfg(train={"steps": 5})
    results = []
    model, out = _segment_like(cfg, lambda k, r: results.append(r))
    assert out["skipped_steps"] == 1 and out["diverged_at_step"] is None
    assert [r.skipped for r in results] == [None, None, "loss nan", None, None]
    assert results[2].reports == [] and results[3].reports  # nothing applied on the skipped step
    _keeps_the_pre_step_state(seen)
    fresh = [x for x in model.init_state(cfg["train"]["batch_size"]).tensors()]
    assert not _same(seen[3][1], fresh)  # the kept state, not a fresh one


def test_a_skipped_recall_step_changes_nothing(poison):
    poison({1})
    task = RC.RecallTask(vocab_size=64, n_filler=8)
    model = RC.build_recall_model("hope", task, d_model=16, n_heads=2, proj_chunk=4, memory_chunk=8,
                                  cms_periods=(1, 4))
    opt = build_optimizer(model, RC.DEFAULT_OPTIM)
    before = [p.detach().clone() for p in model.parameters()]
    tok, tgt = RC.make_batch(task, 4, 16, 4, np.random.default_rng(0))
    rec = RC.train_step(model, opt, tok, tgt)
    assert rec["skipped"] and rec["inner_updates"] == 0
    assert _same(before, [p.detach() for p in model.parameters()])
    rec = RC.train_step(model, opt, tok, tgt)
    assert not rec["skipped"] and rec["inner_updates"] > 0


def test_micro_batches_split_the_rows_and_need_one_state_each():
    torch.manual_seed(0)
    model = build_model("hope", "tiny", vocab_size=50, proj_chunk=4, memory_chunk=8, cms_periods=[1, 4])
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-3})
    tok = torch.randint(0, 50, (4, 8))
    step = TrainStep(model, opt, clip=1.0, grad_accum=2)
    with pytest.raises(ValueError, match="2 equal micro-batches"):
        step(tok, tok, [model.init_state(4)])
    r = step(tok, tok, [model.init_state(2), model.init_state(2)])
    assert r.skipped is None and len(r.states) == 2 and len(r.reports) == 2 and len(r.teach) == 2
    assert all(s.tensors()[0].shape[0] == 2 for s in r.states)
