"""The task format, the BIG-bench conversion and how --tasks resolves with and without its sdist;
perplexity counts the tokens and bytes it says."""

import io
import json
import math
import tarfile

import pytest
import torch

from nested_learning.eval import perplexity as P
from nested_learning.eval import tasks as T
from nested_learning.models import build_model
from nested_learning.models.streaming import Memorize, stream_document


def test_read_jsonl_checks_every_line(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text(json.dumps({"context": "c", "choices": ["a", "b"], "gold": 1}) + "\n\n"
                    + json.dumps({"id": "x", "context": "", "choices": ["a", "b", "c"], "gold": [0, 2]}) + "\n")
    items = T.read_jsonl(str(good))
    assert [i.gold for i in items] == [[1], [0, 2]] and items[1].id == "x"
    for line, msg in [('{"context": "c", "choices": ["a", "b"]}', "missing field 'gold'"),
                      ('{"context": "c", "choices": ["a"], "gold": 0}', "at least two"),
                      ('{"context": "c", "choices": ["a", "b"], "gold": 2}', "gold must be an index"),
                      ("not json", "not JSON")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:1: .*{msg}"):
            T.read_jsonl(str(bad))


def test_convert_bigbench_prefixes_gold_and_generative_examples():
    task = {"task_prefix": "Answer.\n", "example_output_prefix": "\nAnswer: ", "examples": [
        {"input": "Is ice cold?", "target_scores": {"Yes": 1, "No": 0}},
        {"input": "Pick", "target_scores": {"a": 0.5, "b": 1, "c": 1}},
        {"input": "Say hi", "target": "hi"},  # generative: skipped
        {"input": "None right", "target_scores": {"a": 0, "b": 0}}]}
    items = T.convert_bigbench(task, "t")
    assert [i.id for i in items] == ["t/0", "t/1"]
    assert items[0].context == "Answer.\n\nQ: Is ice cold?\nAnswer: " and items[0].choices == ["Yes", "No"]
    assert items[0].gold == [0] and items[1].gold == [1, 2]
    assert T.convert_bigbench({"examples": task["examples"][:1]}, "d")[0].context == "Q: Is ice cold?\nA: "


def test_prepare_bigbench_from_an_sdist(tmp_path, monkeypatch):
    """The real converter on a tarball laid out as the bigbench sdist is (no download): named
    with --bigbench-sdist, or found at DATA/bigbench-1.0.0.tar.gz by --tasks all."""
    from nested_learning.eval import blimp

    def no_download(*a, **k):
        raise AssertionError("no download: a local sdist is at hand")

    monkeypatch.setattr(T, "download_sdist", no_download)
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, (folder, _) in T.BIGBENCH_TASKS.items():
            data = json.dumps({"examples": [{"input": f"{name}?", "target_scores": {"y": 1, "n": 0}}]}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{folder}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    quiet = lambda *a: None  # noqa: E731
    named = T.resolve_tasks("bigbench", str(tmp_path / "data"), log=quiet, bigbench_sdist=str(sdist))
    paths = T.prepare_bigbench(str(tmp_path / "data"), log=quiet)  # cached now
    assert named == paths and set(paths) == set(T.BIGBENCH_TASKS) and len(paths) >= 8
    assert T.read_jsonl(paths["winowhy"])[0].context == "Q: winowhy?\nA: "
    assert T.resolve_tasks("winowhy", str(tmp_path / "data"), log=quiet) == {"winowhy": paths["winowhy"]}
    assert T.resolve_tasks("all", str(tmp_path / "data"), log=quiet) == {"blimp": blimp.ARCHIVE, **paths}
    # an sdist where --tasks all looks for one: converted, no line about skipping
    said = []
    found = T.resolve_tasks("all", str(tmp_path), log=said.append)  # DATA = tmp_path holds bigbench-1.0.0.tar.gz
    assert set(found) == {"blimp", *T.BIGBENCH_TASKS} and not any("skipped" in s for s in said)
    with pytest.raises(SystemExit, match="unknown task"):
        T.resolve_tasks("nope", str(tmp_path / "data"))
    with pytest.raises(SystemExit, match="no such file"):
        T.resolve_tasks("bigbench", str(tmp_path / "other"), bigbench_sdist=str(tmp_path / "missing.tar.gz"))


def test_bigbench_without_an_sdist_fails_saying_what_to_do(tmp_path, monkeypatch):
    """Where the registry no longer serves bigbench 1.0.0, asking for it fails with the way out;
    --tasks all goes on without it (tests/eval/test_blimp.py)."""
    from nested_learning.data import sources as D

    def registry_without_it(cmd, **kw):
        return type("R", (), {"returncode": 1, "stderr": "No matching distribution found for bigbench==1.0.0"})()

    monkeypatch.setattr(D.subprocess, "run", registry_without_it)
    with pytest.raises(RuntimeError, match="could not download bigbench==1.0.0(.|\n)*--bigbench-sdist PATH"):
        T.resolve_tasks("bigbench", str(tmp_path), log=lambda *a: None)


class ByteTok:
    """One token per byte (+2); id 0 is end-of-text."""

    def encode(self, text):
        return type("E", (), {"ids": [2 + b for b in text.encode()]})()

    def decode(self, ids):
        return bytes(i - 2 for i in ids).decode()

    def token_to_id(self, s):
        return 0

    def get_vocab_size(self):
        return 258


SMALL = dict(hope=dict(proj_chunk=4, memory_chunk=8, cms_periods=(1, 4)), titans=dict(chunk_size=4), transformer={})


@pytest.mark.parametrize("name", list(SMALL))
def test_streamed_document_losses_equal_the_whole_forward(name):
    torch.manual_seed(0)
    m = build_model(name, "tiny", vocab_size=258, **SMALL[name]).eval()
    doc = torch.randint(1, 258, (37,))
    streamed, _ = stream_document(m, doc, segment=8)
    with torch.no_grad():
        whole, _ = m(doc[None, :-1], targets=doc[None, 1:], reduction="none")
    assert streamed.shape == (36,)
    torch.testing.assert_close(streamed, whole[0].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_perplexity_counts_tokens_bytes_and_buckets_by_hand():
    torch.manual_seed(0)
    m = build_model("hope", "tiny", vocab_size=258, **SMALL["hope"]).eval()
    tok = ByteTok()
    texts = [("a", "héllo wörld " * 120), ("b", "short text")]  # 1,680 and 10 tokens (bytes)
    res = P.document_perplexity(m, tok, texts, segment=64)
    n = [len(tok.encode(t).ids) for _, t in texts]
    assert [r["tokens"] for r in res["records"]] == n and res["extra"]["tokens"] == sum(n)
    assert [r["bytes"] for r in res["records"]] == [len(t.encode()) for _, t in texts]
    # every token of each text is predicted once, the first from end-of-text
    ref = []
    for _, t in texts:
        ids = torch.tensor([0, *tok.encode(t).ids])
        with torch.no_grad():
            ref.append(m(ids[None, :-1], targets=ids[None, 1:], reduction="none")[0][0].double())
    total = float(sum(x.sum() for x in ref))
    loss = res["metrics"]["loss"]["value"]
    assert loss == pytest.approx(total / sum(n), rel=1e-5)
    assert res["metrics"]["perplexity"]["value"] == pytest.approx(math.exp(total / sum(n)), rel=1e-5)
    n_bytes = sum(len(t.encode()) for _, t in texts)
    assert res["metrics"]["bits_per_byte"]["value"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)
    buckets = res["extra"]["loss_by_position"]
    assert [b["bucket"] for b in buckets] == ["0-1k", "1k-2k"]
    assert n == [1680, 10] and [b["tokens"] for b in buckets] == [1024 + 10, 1680 - 1024]
    assert buckets[1]["loss"] == pytest.approx(float(ref[0][1024:].mean()), rel=1e-5)
    # max_tokens caps the scored tokens, and the bytes are those of the scored tokens
    cut = P.document_perplexity(m, tok, [("c", "plain ascii " * 20)], segment=64, max_tokens=100)
    assert cut["records"][0]["tokens"] == 100 and cut["records"][0]["bytes"] == 100
    # memorised: prequential (each segment scored before it is memorised), so the first segment is unchanged
    reports = []
    mem = P.document_perplexity(m, tok, texts[:1], segment=64, memorize=Memorize(lr=0.5), reports=reports)
    assert reports and sum(r.updates_applied for r in reports) > 0
    assert mem["metrics"]["loss"]["value"] != pytest.approx(res["records"][0]["loss"], rel=1e-6)
    first = P.document_perplexity(m, tok, [("a", texts[0][1][:40])], segment=64, memorize=Memorize(lr=0.5))
    assert first["metrics"]["loss"]["value"] == pytest.approx(
        P.document_perplexity(m, tok, [("a", texts[0][1][:40])], segment=64)["metrics"]["loss"]["value"], rel=1e-6)
    png = P.plot_loss_by_position({"baseline": res, "memorised": mem}, "/tmp/nl_ppl_test.png", "t")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class Bar:
    def __init__(self):
        self.n, self.updates = 0, 0

    def update(self, k):
        self.n, self.updates = self.n + k, self.updates + 1


def test_perplexity_progress_counts_tokens_by_segment_and_a_killed_run_resumes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = build_model("hope", "tiny", vocab_size=258, **SMALL["hope"]).eval()
    tok = ByteTok()
    texts = [("a", "to be or not " * 30), ("b", "that is the question " * 20), ("c", "whether tis nobler " * 25)]
    bar = Bar()
    whole = P.document_perplexity(m, tok, texts, segment=64, progress=bar)
    n_tokens = sum(len(tok.encode(t).ids) for _, t in texts)
    assert bar.n == n_tokens and bar.updates > len(texts)  # per segment, in tokens, not per document

    partial = str(tmp_path / ".perplexity.partial.pt")
    calls, real = [], P.stream_document

    def dies_on_the_third(model, doc, *a, **k):
        calls.append(len(doc))
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill while the third document streams
        return real(model, doc, *a, **k)

    monkeypatch.setattr(P, "stream_document", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        P.document_perplexity(m, tok, texts, segment=64, partial=partial, key={"checkpoint": "x"})
    monkeypatch.setattr(P, "stream_document", real)
    assert torch.load(partial, weights_only=False)["next"] == 2
    # another key (here another checkpoint) never reuses it
    other = P.document_perplexity(m, tok, texts[:1], segment=64, partial=str(tmp_path / "other.pt"), key={"checkpoint": "y"})
    assert other["n_items"] == 1
    seen = []
    monkeypatch.setattr(P, "stream_document", lambda model, doc, *a, **k: seen.append(len(doc)) or real(model, doc, *a, **k))
    bar = Bar()
    resumed = P.document_perplexity(m, tok, texts, segment=64, progress=bar, partial=partial, key={"checkpoint": "x"})
    assert seen == [len(tok.encode(texts[2][1]).ids) + 1]  # only the third document streams again
    assert bar.n == n_tokens
    assert resumed["metrics"] == whole["metrics"] and resumed["records"] == whole["records"]
    assert not (tmp_path / ".perplexity.partial.pt").exists()  # removed once complete
