"""The lm-evaluation-harness adapter, offline: tasks defined from local files, run through
lm_eval.simple_evaluate; its log-likelihoods checked against the model's own forward."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")

from lm_eval.api.instance import Instance  # noqa: E402

from nested_learning.eval.lm_eval_adapter import NestedLearningLM  # noqa: E402

MC = """task: nl_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
ROLLING = """task: nl_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GEN = """task: nl_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def _task_dir(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": f"The {w} is", "choices": ["good", "bad"], "gold": i % 2}) + "\n"
                          for i, w in enumerate(["king", "queen", "sword", "night"])))
    ppl = tmp_path / "ppl.jsonl"
    ppl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the king and the queen.", "love and war."]))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"context": c, "answer": "x"}) + "\n" for c in ["the king", "a lady"]))
    d = tmp_path / "tasks"
    d.mkdir()
    for name, tpl, data in (("mc", MC, mc), ("ppl", ROLLING, ppl), ("gen", GEN, gen)):
        (d / f"{name}.yaml").write_text(tpl.format(data=data))
    return d


@pytest.mark.slow
def test_simple_evaluate_on_local_tasks(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    lm = NestedLearningLM(tiny_runs["hope"], device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=["nl_local_mc", "nl_local_ppl", "nl_local_gen"],
                                  task_manager=TaskManager(include_path=str(_task_dir(tmp_path))))
    res = out["results"]
    assert 0.0 <= res["nl_local_mc"]["acc,none"] <= 1.0 and "acc_norm,none" in res["nl_local_mc"]
    assert res["nl_local_ppl"]["bits_per_byte,none"] > 0
    assert "exact_match,none" in res["nl_local_gen"]
    assert len(out["samples"]["nl_local_mc"]) == 4 and out["n-samples"]["nl_local_ppl"]["effective"] == 2


def _forward_loglik(model, ids):
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)
    return logp


@pytest.mark.parametrize("name", ["titans", "hope"])
def test_loglikelihoods_match_the_models_forward(tiny_runs, name):
    lm = NestedLearningLM(tiny_runs[name], device="cpu")
    req = [Instance("loglikelihood", {}, ("The king is", " good"), 0),
           Instance("loglikelihood", {}, ("The king is", " bad and"), 0),
           Instance("loglikelihood", {}, ("", "love"), 0)]
    got = lm.loglikelihood(req)
    for r, (ll, _) in zip(req, got):
        ctx, cont = r.args
        ctx_ids = lm.tok_encode(ctx) or [lm.eot]
        ids = ctx_ids + lm.tok_encode(ctx + cont)[len(lm.tok_encode(ctx)):] if ctx else [lm.eot] + lm.tok_encode(cont)
        logp = _forward_loglik(lm.model, ids)
        n = len(ctx_ids)
        ref = sum(float(logp[p - 1, ids[p]]) for p in range(n, len(ids)))
        assert math.isclose(ll, ref, rel_tol=1e-5, abs_tol=1e-5)
    text = "the king and the queen of the night."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.eot] + lm.tok_encode(text)
    logp = _forward_loglik(lm.model, ids)
    assert math.isclose(rolling, sum(float(logp[p - 1, ids[p]]) for p in range(1, len(ids))), rel_tol=1e-5)
    (gen,) = lm.generate_until([Instance("generate_until", {}, ("the king", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert "\n" not in gen
    new, _ = lm.model.generate(torch.tensor(lm.tok_encode("the king")), 5, eos=lm.eot)
    assert lm.tok_decode(t for t in new[0].tolist() if t != lm.eot).split("\n")[0] == gen
