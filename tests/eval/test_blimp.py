"""BLiMP: the shipped archive is the benchmark (67 paradigms x 1,000 pairs, the authors' summary
beside it); a pair is scored from whole-sentence log-probabilities, checked against a bigram
model whose every probability is known; the aggregation against hand-computed values; and the
command a user runs (`zeroshot.py --tasks all`) on a tiny trained run with the shipped data."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nested_learning.eval import blimp as B
from nested_learning.eval import tasks as T
from nested_learning.eval.loglik import score_requests
from nested_learning.models import build_model
from nested_learning.models.state import ModelState
from tests.helpers import ROOT, run_python

TERMS = {"anaphor_agreement", "argument_structure", "binding", "control_raising", "determiner_noun_agreement",
         "ellipsis", "filler_gap_dependency", "irregular_forms", "island_effects", "npi_licensing", "quantifiers",
         "subject_verb_agreement"}


def test_the_shipped_archive_holds_67_paradigms_of_1000_pairs():
    pairs = B.load_pairs()
    assert len(pairs) == B.PARADIGMS == 67
    assert {len(ps) for ps in pairs.values()} == {1000}
    assert all([p.pair_id for p in ps] == [str(i) for i in range(1000)] for ps in pairs.values())
    assert all(p.uid == uid and p.good and p.bad for uid, ps in pairs.items() for p in ps)
    same = sorted((p.uid, p.pair_id) for ps in pairs.values() for p in ps if p.good == p.bad)  # the data's own
    assert [u for u, _ in same] == ["passive_1"] * 2 + ["principle_A_case_2"] * 5
    assert {p.term for ps in pairs.values() for p in ps} == TERMS
    assert {p.field for ps in pairs.values() for p in ps} == {"morphology", "syntax", "semantics", "syntax_semantics"}
    first = pairs["causative"][0]
    assert (first.good, first.bad) == ("Aaron breaks the glass.", "Aaron appeared the glass.")
    authors = B.authors_results()
    assert set(authors["paradigms"]) == set(pairs) and set(authors["terms"]) == TERMS
    for model in B.AUTHORS.values():  # the published means are means over paradigms
        mean = sum(r[model] for r in authors["paradigms"].values()) / 67
        assert mean == pytest.approx(authors["overall"][model], abs=1e-6)
    assert authors["overall"]["GPT-2"] == pytest.approx(0.830, abs=1e-3)
    assert authors["overall"]["5-gram"] == pytest.approx(0.612, abs=1e-3)
    for name in ("ATTRIBUTION.md", "models_summary.jsonl"):
        assert os.path.exists(os.path.join(B.ROOT, name))
    assert "CC BY 4.0" in open(os.path.join(B.ROOT, "ATTRIBUTION.md")).read()


def test_a_built_package_carries_the_data(tmp_path):
    """What a wheel would hold: setuptools' build_py of this tree (the package-data of pyproject)."""
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    built = tmp_path / "nested_learning" / "eval" / "data" / "blimp"
    assert sorted(os.listdir(built)) == ["ATTRIBUTION.md", "BLiMP.zip", "models_summary.jsonl"]
    assert (built / "BLiMP.zip").read_bytes() == open(B.ARCHIVE, "rb").read()


def test_subsampling_is_seeded_per_paradigm():
    a = B.load_pairs(pairs_per_paradigm=5, seed=1)
    assert {len(ps) for ps in a.values()} == {5} and len(a) == 67
    ids = [int(p.pair_id) for p in a["causative"]]
    assert ids == sorted(ids) and a == B.load_pairs(pairs_per_paradigm=5, seed=1)
    assert a != B.load_pairs(pairs_per_paradigm=5, seed=2)
    assert {len(ps) for ps in B.load_pairs(pairs_per_paradigm=5000).values()} == {1000}
    with pytest.raises(ValueError, match=">= 1"):
        B.load_pairs(pairs_per_paradigm=0)


class WordTok:
    """Words as tokens; id 0 is end-of-text."""

    VOCAB = ["<|endoftext|>", "cat", "cats", "sleeps", "sleep"]

    def encode(self, text):
        return type("E", (), {"ids": [self.VOCAB.index(w) for w in text.split()]})()

    def token_to_id(self, s):
        return self.VOCAB.index(s) if s in self.VOCAB else None


# P[prev][next]: the bigram model below predicts exactly these probabilities
P = [[0.1, 0.4, 0.2, 0.2, 0.1],  # after end-of-text: the sentence's first word
     [0.1, 0.1, 0.1, 0.6, 0.1],  # after "cat"
     [0.1, 0.1, 0.1, 0.5, 0.2],  # after "cats": prefers the wrong "sleeps"
     [0.2] * 5, [0.2] * 5]


class Bigram(torch.nn.Module):
    """A language model whose next-token log-probabilities are log P[previous token]."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 5)
        self.embed.weight.data = torch.tensor(P).log()

    def prefill_segment(self):
        return 16

    def init_state(self, batch):
        return ModelState(layers=[])

    def forward(self, inp, state):
        return self.embed(inp), state


def test_pairs_are_scored_from_whole_sentence_log_probabilities_by_hand():
    lg = math.log
    pairs = {"agreement": [B.Pair("agreement", "0", "morphology", "t", "cat sleeps", "cat sleep"),
                           B.Pair("agreement", "1", "morphology", "t", "cats sleep", "cats sleeps")],
             "number": [B.Pair("number", "0", "syntax", "u", "cat sleeps", "cats sleeps")]}
    block = B.score_blimp(Bigram(), WordTok(), pairs, batch_size=2)
    want = [[lg(.4) + lg(.6), lg(.4) + lg(.1)],  # right
            [lg(.2) + lg(.2), lg(.2) + lg(.5)],  # wrong: the bigram prefers "cats sleeps"
            [lg(.4) + lg(.6), lg(.2) + lg(.5)]]  # right
    for rec, w in zip(block["records"], want):
        assert rec["loglik"] == pytest.approx(w, rel=1e-6) and rec["tokens"] == [2, 2]
    assert [r["score"] for r in block["records"]] == [1.0, 0.0, 1.0]
    assert [r["id"] for r in block["records"]] == ["agreement/0", "agreement/1", "number/0"]
    ex = block["extra"]
    assert ex["paradigms"]["agreement"]["metrics"]["acc"] == {"value": 0.5, "stderr": pytest.approx(0.5)}
    assert block["metrics"]["acc"]["value"] == pytest.approx(0.75)  # mean over paradigms, not over pairs (2/3)
    # sentences of one length, batched or one at a time, score alike
    alone = B.score_sentences(Bigram(), WordTok(), ["cat sleeps", "cats", "cats sleep"], batch_size=1)
    batched = B.score_sentences(Bigram(), WordTok(), ["cat sleeps", "cats", "cats sleep"], batch_size=3)
    assert [s.loglik for s in alone] == pytest.approx([s.loglik for s in batched], rel=1e-6)
    assert alone[1].loglik == pytest.approx(lg(.2)) and alone[1].tokens == 1


def test_aggregation_per_paradigm_phenomenon_field_and_overall_by_hand():
    def pair(uid, i, field, term):
        return B.Pair(uid, str(i), field, term, "g", "b")

    # causative is one of BLiMP's paradigms: the authors' accuracies come along
    pairs = {"causative": [pair("causative", i, "syntax", "t1") for i in range(3)],
             "p2": [pair("p2", i, "syntax", "t1") for i in range(4)],
             "p3": [pair("p3", i, "semantics", "t2") for i in range(4)]}
    pairs["causative"][2] = B.Pair("causative", "2", "syntax", "t1", "same", "same")
    logliks = {"causative": [(-1.0, -2.0), (-3.0, -3.0), (-4.0, -4.1)],  # right; a tie; identical sentences
               "p2": [(-1.0, -5.0)] * 4,  # all right
               "p3": [(-1.0, -0.5), (-2.0, -1.0), (-4.0, -3.0), (-1.0, -2.0)]}  # one right
    block = B.aggregate(pairs, logliks)
    ex = block["extra"]
    per = ex["paradigms"]
    # paradigm: mean and sample sd / sqrt(n)
    assert [r["score"] for r in block["records"][:3]] == [1.0, 0.5, 0.5]  # ties and identical pairs count half
    assert per["causative"]["metrics"]["acc"] == {"value": pytest.approx(2 / 3), "stderr": pytest.approx(1 / 6)}
    assert per["p2"]["metrics"]["acc"] == {"value": 1.0, "stderr": 0.0}
    assert per["p3"]["metrics"]["acc"] == {"value": 0.25, "stderr": pytest.approx(0.25)}
    assert per["causative"]["authors"] == {"5-gram": 0.535, "LSTM": 0.684, "Transformer-XL": 0.575, "GPT-2": 0.782}
    # group: mean over paradigms, stderr sqrt(sum se^2) / k, items summed
    t1 = ex["terms"]["t1"]
    assert t1["metrics"]["acc"]["value"] == pytest.approx((2 / 3 + 1) / 2)
    assert t1["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt(1 / 36) / 2)
    assert (t1["n_items"], t1["n_paradigms"], t1["chance"]) == (7, 2, 0.5)
    assert ex["terms"]["t2"]["metrics"]["acc"]["value"] == pytest.approx(0.25) and ex["terms"]["t2"]["n_items"] == 4
    assert ex["fields"]["syntax"]["metrics"]["acc"]["value"] == pytest.approx(5 / 6)
    assert ex["fields"]["semantics"]["n_items"] == 4
    assert block["metrics"]["acc"]["value"] == pytest.approx((2 / 3 + 1.0 + 0.25) / 3)
    assert block["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt(1 / 36 + 0 + 0.0625) / 3)
    assert (block["n_items"], block["chance"], ex["ties"], ex["n_paradigms"]) == (11, 0.5, 2, 3)
    assert ex["pairs_per_paradigm"] == [3, 4]
    assert ex["authors"]["overall"]["GPT-2"] == pytest.approx(0.830238806)
    lines = B.table_lines(block, paradigms=True)
    assert "| **overall** | 3 | 0.639 ± 0.100 | 11 | 0.612 | 0.698 | 0.696 | 0.830 |" in lines
    assert "| causative | t1 | 0.667 ± 0.167 | 3 | 0.535 | 0.684 | 0.575 | 0.782 |" in lines


def test_sentences_score_as_the_models_own_forward_after_end_of_text():
    """On a real (untrained) model: each sentence's score is the sum of its tokens' log-probs in
    one forward over [end-of-text] + sentence, whatever its batch."""
    from tests.eval.test_tasks_and_perplexity import SMALL, ByteTok

    torch.manual_seed(0)
    m = build_model("hope", "tiny", vocab_size=258, **SMALL["hope"]).eval()
    tok = ByteTok()
    sents = ["The cat sleeps.", "Cats sleep.", "A dog barked at them."]
    got = B.score_sentences(m, tok, sents, batch_size=2)
    for s, sc in zip(sents, got):
        ids = torch.tensor([[0, *tok.encode(s).ids]])
        with torch.no_grad():
            logp = torch.log_softmax(m(ids[:, :-1])[0][0].float(), -1)
        want = float(logp.gather(-1, ids[0, 1:, None]).sum())
        assert sc.loglik == pytest.approx(want, rel=1e-5, abs=1e-4) and sc.tokens == len(s)
        assert sc.loglik == pytest.approx(score_requests(m, [([0], tok.encode(s).ids)])[0].loglik, rel=1e-5)


def test_tasks_all_is_blimp_without_bigbench_and_never_downloads(tmp_path, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("--tasks all must not download anything")

    monkeypatch.setattr(T, "download_sdist", no_download)
    said = []
    assert T.resolve_tasks("all", str(tmp_path), log=said.append) == {"blimp": B.ARCHIVE}
    assert len(said) == 1 and "BIG-bench tasks skipped" in said[0]
    assert T.resolve_tasks("blimp", str(tmp_path), log=said.append) == {"blimp": B.ARCHIVE} and len(said) == 1


@pytest.mark.slow
def test_zeroshot_tasks_all_on_a_tiny_run_with_the_shipped_blimp(tiny_runs, tmp_path):
    """The default command, `zeroshot.py --tasks all`, on a tiny trained run: BLiMP from the
    package (3 pairs of each paradigm), no BIG-bench, then the report."""
    out = tmp_path / "zs"
    r = run_python("scripts/eval/zeroshot.py", "--run", tiny_runs["hope"], "--tasks", "all", "--blimp-pairs", "3",
                   "--data-dir", str(tmp_path / "data"), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "BIG-bench tasks skipped" in r.stdout and "| **overall** | 67 |" in r.stdout
    with open(out / "zeroshot.json") as f:
        res = json.load(f)
    assert res["schema"] == "nested_learning.eval/1" and list(res["tasks"]) == ["blimp"]
    block = res["tasks"]["blimp"]
    assert (block["n_items"], block["chance"], block["extra"]["pairs_per_paradigm"]) == (201, 0.5, 3)
    assert len(block["extra"]["paradigms"]) == 67 and set(block["extra"]["terms"]) == TERMS
    assert len(block["records"]) == 201 and all(x["loglik"][0] < 0 and x["loglik"][1] < 0 for x in block["records"])
    acc = block["metrics"]["acc"]
    assert 0 <= acc["value"] <= 1 and acc["stderr"] > 0
    accs = [e["metrics"]["acc"]["value"] for e in block["extra"]["paradigms"].values()]
    assert acc["value"] == pytest.approx(sum(accs) / 67)
    r = run_python("scripts/eval/report.py", str(out))
    assert r.returncode == 0, r.stderr
    assert "**zeroshot**" in r.stdout and "| blimp | 201 |" in r.stdout and "| causative | argument_structure |" in r.stdout


@pytest.mark.slow
def test_zeroshot_blimp_beside_a_memorised_task(tiny_runs, tmp_path):
    task = tmp_path / "mini.jsonl"
    task.write_text(json.dumps({"context": "Q: is the king old?\nA:", "choices": [" yes", " no"], "gold": 0}) + "\n")
    out = tmp_path / "zs"
    r = run_python("scripts/eval/zeroshot.py", "--run", tiny_runs["hope"], "--tasks", f"blimp,{task}",
                   "--blimp-pairs", "1", "--out", str(out), "--memorize", "--memory-lr", "0.1", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    base, mem = (json.load(open(out / f)) for f in ("zeroshot.json", "zeroshot_memorize.json"))
    assert set(mem["tasks"]) == {"blimp", "mini"} and mem["memorize"]["updates_applied"] > 0
    assert mem["tasks"]["blimp"]["baseline_delta"] == {"acc": 0.0} and "not applied" in mem["tasks"]["blimp"]["extra"]["memorize"]
    assert mem["tasks"]["blimp"]["records"] == base["tasks"]["blimp"]["records"]
    r = run_python("scripts/eval/zeroshot.py", "--run", tiny_runs["hope"], "--tasks", "blimp", "--blimp-pairs", "1",
                   "--out", str(tmp_path / "only"), "--memorize", "--no-progress")
    assert r.returncode == 0 and "nothing to memorise" in r.stdout
    assert os.listdir(tmp_path / "only") == ["zeroshot.json"]
