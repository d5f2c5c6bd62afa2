"""The models through Hugging Face transformers, offline: a run converts in one call
(safetensors, config, tokenizer), loads with the Auto classes, gives this package's logits and
greedy tokens, and lm-evaluation-harness's own `hf` model runs local tasks on the directory with
the log-likelihoods of this package's adapter."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import nested_learning.hf as H  # noqa: E402
from nested_learning.runs import load_run  # noqa: E402


@pytest.fixture(scope="module")
def converted(tiny_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: H.convert_run(run, str(root / name)) for name, run in tiny_runs.items()}


def _streamed_logits(model, ids):
    """The package's own path: the input streamed in prefill segments, the tied head."""
    st, hs = None, []
    seg = model.prefill_segment()
    for s in range(0, ids.shape[1], seg):
        h, st = model.hidden(ids[:, s:s + seg], st)
        hs.append(h)
    return F.linear(torch.cat(hs, 1), model.embed.weight)


@pytest.mark.parametrize("name", ["hope", "titans", "transformer"])
def test_a_converted_run_loads_with_the_auto_classes_and_gives_the_packages_numbers(converted, tiny_runs, name):
    d = converted[name]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(d))
    assert json.load(open(os.path.join(d, "config.json")))["model_type"] == f"nested_learning_{name}"
    cfg = AutoConfig.from_pretrained(d)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    ours, our_tok = load_run(tiny_runs[name], device="cpu")
    assert type(hf).__name__ == f"{name.capitalize()}NLForCausalLM" and cfg.nl_model == name
    assert tok.encode("the king and the queen") == our_tok.encode("the king and the queen").ids
    ids = torch.tensor([tok.encode("the king and the queen of the night. " * 30)])  # longer than a prefill segment
    assert ids.shape[1] > ours.prefill_segment()
    with torch.no_grad():
        got = hf(ids).logits
        assert torch.equal(got, _streamed_logits(ours, ids))
        torch.testing.assert_close(got, ours(ids)[0], rtol=1e-4, atol=1e-4)  # one call over the whole input
        loss = hf(ids, labels=ids).loss
        assert torch.allclose(loss, F.cross_entropy(got[0, :-1], ids[0, 1:]))
    prompt = ids[:, :9]
    mine, _ = ours.generate(prompt, 16)
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(theirs[:, 9:], mine), (theirs[:, 9:], mine)
    two = torch.cat([prompt, prompt.flip(1)])
    assert torch.equal(hf.generate(two, max_new_tokens=6, do_sample=False)[:, 9:], ours.generate(two, 6)[0])
    with pytest.raises(ValueError, match="padding is not supported"):
        hf(two, attention_mask=torch.tensor([[0] + [1] * 8, [1] * 9]))


@pytest.mark.slow
def test_lm_eval_hf_model_runs_local_tasks_on_the_converted_directory(converted, tiny_runs, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")
    import lm_eval.models.huggingface  # noqa: F401 (registers lm-eval's `hf` model)
    from lm_eval.tasks import TaskManager

    from nested_learning.eval.lm_eval_adapter import NestedLearningLM
    from tests.eval.test_lm_eval_adapter import _task_dir

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = TaskManager(include_path=str(_task_dir(tmp_path)))
    hf = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": converted["hope"], "device": "cpu",
                                                          "dtype": "float32", "batch_size": 1},
                                 tasks=["nl_local_mc", "nl_local_ppl"], task_manager=tasks)
    ours = lm_eval.simple_evaluate(model=NestedLearningLM(tiny_runs["hope"], device="cpu"),
                                   tasks=["nl_local_mc", "nl_local_ppl"], task_manager=tasks)
    for task in ("nl_local_mc", "nl_local_ppl"):
        a = [s["resps"] for s in hf["samples"][task]]
        b = [s["resps"] for s in ours["samples"][task]]
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):
            for x, y in zip(ra, rb):
                assert abs(float(x[0][0] if isinstance(x[0], (list, tuple)) else x[0])
                           - float(y[0][0] if isinstance(y[0], (list, tuple)) else y[0])) < 1e-3, (task, x, y)
    assert hf["results"]["nl_local_mc"]["acc,none"] == ours["results"]["nl_local_mc"]["acc,none"]


def test_the_command_line_converts_a_run_in_one_command(tiny_runs, tmp_path):
    from nested_learning.cli.to_hf import main

    out = main(["--run", tiny_runs["transformer"], "--out", str(tmp_path / "tf")])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "TransformerNLForCausalLM"
    from tests.helpers import run_python

    r = run_python("scripts/to_hf.py", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
