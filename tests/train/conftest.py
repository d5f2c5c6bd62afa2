import copy
import os
import random

import pytest
import torch

from nested_learning.models.lm import LanguageModel

WORDS = ("the king queen lord lady sword crown night day love death war peace fool wise old young "
         "speak hear see go come stay fly fight sleep dream heart blood gold fair foul true false").split()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Twelve small deterministic documents (~2k words each) as .txt files."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(12):
        words = [rng.choice(WORDS) for _ in range(2000)]
        text = " ".join(w + ("." if rng.random() < 0.1 else "") for w in words)
        (d / f"doc{i:02d}.txt").write_text(text)
    return str(d)


BASE = {
    "model": {"name": "hope", "overrides": {"proj_chunk": 4, "memory_chunk": 8, "cms_periods": [1, 4, 8]}},
    "size": {"name": "tiny"},
    "data": {"source": "local", "path": None, "text_field": "text", "vocab_size": 300, "data_dir": None},
    "optim": {"name": "adamw", "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "eps": 1e-8,
              "warmup": 2, "min_lr_ratio": 0.1},
    "train": {"steps": 6, "seed": 0, "out_dir": None, "batch_size": 2, "seq_len": 16, "context_len": 64, "grad_accum": 1,
              "clip": 1.0, "bf16": False, "compile": False, "device": "cpu", "dist_backend": None, "fsdp": False,
              "inner_updates": True, "eval_every": 3, "eval_tokens": 128, "save_every": 3, "resume": True,
              "progress": False, "wandb": {"enabled": False}},
}


@pytest.fixture
def make_cfg(corpus_dir, tmp_path):
    def make(out="run", **sections):
        cfg = copy.deepcopy(BASE)
        cfg["data"]["path"] = corpus_dir
        cfg["data"]["data_dir"] = str(tmp_path / "data")
        cfg["train"]["out_dir"] = str(tmp_path / out)
        for sec, vals in sections.items():
            cfg[sec].update(vals)
        return cfg
    return make


def read_metrics(out_dir):
    import json

    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def poison(monkeypatch):
    """poison(steps): train_forward's loss becomes NaN at those (1-based) training steps.
    Returns the record of each training forward's inputs: (slow weights, fast state)."""
    calls = {"n": 0, "bad": set(), "seen": []}
    real = LanguageModel.train_forward

    def forward(self, tokens, state, *a, **k):
        if torch.is_grad_enabled():
            calls["n"] += 1
            calls["seen"].append(([p.detach().clone() for p in self.parameters()],
                                  [x.clone() for x in state.tensors()]))
        loss, cap, st = real(self, tokens, state, *a, **k)
        if torch.is_grad_enabled() and calls["n"] in calls["bad"]:
            loss = loss * float("nan")
        return loss, cap, st

    monkeypatch.setattr(LanguageModel, "train_forward", forward)

    def arm(steps):
        calls["bad"].update(steps)
        return calls["seen"]
    return arm
