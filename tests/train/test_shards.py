"""The corpus pipeline: streaming preparation into memory-mapped shards (round trip, several
shards, resume, index, dtype), the split rule in stream order, the bounded tokenizer sample,
the offline Hugging Face path through `datasets`, and DocumentStreams over shards."""

import glob
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from nested_learning.data import shards as S
from nested_learning.data.shards import prepare_corpus
from nested_learning.data.sources import (
    corpus_cache_dir,
    iter_split,
    local_files,
    read_local,
    split_documents,
)
from nested_learning.data.streams import DocumentStreams
from nested_learning.data.tokens import TokenDocs
from tests.train.conftest import WORDS

QUIET = {"log": lambda *a: None}


def local_cfg(path, tmp_path, **kw):
    return {"source": "local", "path": str(path), "text_field": "text", "vocab_size": 300,
            "data_dir": str(tmp_path / "data"), "workers": 1, **kw}


def files_of(cache):
    """name -> bytes of every shard file of a prepared corpus."""
    out = {}
    for f in sorted(os.listdir(cache)):
        if f.startswith(("train-", "val-")):
            with open(os.path.join(cache, f), "rb") as fh:
                out[f] = fh.read()
    return out


def in_memory(path, tok):
    train, val = split_documents(read_local(str(path), log=lambda *a: None))
    return TokenDocs.encode(train, tok), TokenDocs.encode(val, tok)


def test_shards_round_trip_equal_the_in_memory_encoding(corpus_dir, tmp_path):
    cfg = local_cfg(corpus_dir, tmp_path, shard_tokens=3000)  # ~2.6k tokens per document: several shards
    tok, train, val = prepare_corpus(cfg, cfg["data_dir"], **QUIET)
    ref_train, ref_val = in_memory(corpus_dir, tok)
    assert isinstance(train, S.ShardedDocs) and train.n_shards > 1
    for got, ref in ((train, ref_train), (val, ref_val)):
        assert len(got) == len(ref) and got.n_tokens == ref.n_tokens
        assert list(got.names) == list(ref.names)
        for i in range(len(ref)):
            assert np.array_equal(got.doc(i), ref.doc(i)) and got.doc(i).dtype == np.uint16
        assert np.array_equal(got.tokens, ref.tokens) and np.array_equal(got.offsets, ref.offsets)
    # a document never spans two shards: each shard holds whole documents, each ending in <|endoftext|>
    eot = tok.token_to_id("<|endoftext|>")
    index = json.load(open(os.path.join(corpus_cache_dir(cfg), "index.json")))
    for e in index["splits"]["train"]["shards"]:
        bin_ = np.fromfile(os.path.join(corpus_cache_dir(cfg), e["file"] + ".bin"), dtype=np.uint16)
        off = np.load(os.path.join(corpus_cache_dir(cfg), e["file"] + ".offsets.npy"))
        assert off[0] == 0 and off[-1] == len(bin_) == e["n_tokens"] and len(off) == e["n_docs"] + 1
        assert (bin_[off[1:] - 1] == eot).all() and (np.isin(bin_, [eot]).sum() == e["n_docs"])
        assert e["n_tokens"] <= 3000 or e["n_docs"] == 1  # over the bound only as a single document


def test_index_counts_dtype_and_tokenizer_hash(corpus_dir, tmp_path):
    cfg = local_cfg(corpus_dir, tmp_path, shard_tokens=6000)
    tok, train, val = prepare_corpus(cfg, cfg["data_dir"], **QUIET)
    cache = corpus_cache_dir(cfg)
    index = json.load(open(os.path.join(cache, "index.json")))
    assert index["dtype"] == "uint16" and index["vocab_size"] == 300
    assert index["tokenizer_sha256"] == hashlib.sha256(tok.to_str().encode()).hexdigest()
    for split, docs in (("train", train), ("val", val)):
        s = index["splits"][split]
        assert s["n_docs"] == len(docs) == sum(e["n_docs"] for e in s["shards"])
        assert s["n_tokens"] == docs.n_tokens == sum(e["n_tokens"] for e in s["shards"])
        for e in s["shards"]:
            assert os.path.getsize(os.path.join(cache, e["file"] + ".bin")) == 2 * e["n_tokens"]
    assert index["n_docs"] == 12 and index["n_tokens"] == train.n_tokens + val.n_tokens
    assert not os.path.exists(os.path.join(cache, "progress.json"))
    said = []
    again = S.prepare_shards(cfg, cfg["data_dir"], log=said.append)  # a complete corpus: a no-op that says so
    assert again["n_tokens"] == index["n_tokens"] and any("nothing to do" in s for s in said)


def test_token_dtype_is_uint32_past_65536_and_shards_read_it_back(tmp_path):
    assert S.token_dtype(4096) == np.uint16 and S.token_dtype(65536) == np.uint16
    assert S.token_dtype(65537) == np.uint32 and S.token_dtype(200_000) == np.uint32
    entries = []
    w = S._Writer(str(tmp_path), "train", np.dtype(np.uint32), 10, 0, entries.append)
    docs = [np.array([70000, 1, 199999], np.uint32), np.arange(65530, 65540, dtype=np.uint32), np.array([5], np.uint32)]
    for i, d in enumerate(docs):
        w.add(f"d{i}", d)
    w.close()
    assert [e["n_docs"] for e in entries] == [1, 1, 1]  # 3 + 10 > 10: the second starts a shard; 10 + 1 > 10 too
    split = {"n_docs": 3, "n_tokens": 14, "shards": entries}
    got = S.ShardedDocs(str(tmp_path), split, "uint32")
    assert [got.doc(i).tolist() for i in range(3)] == [d.tolist() for d in docs] and list(got.names) == ["d0", "d1", "d2"]
    with pytest.raises(IndexError):
        got.doc(3)


def test_resume_after_an_interrupted_preparation(corpus_dir, tmp_path, monkeypatch):
    whole = local_cfg(corpus_dir, tmp_path / "a", shard_tokens=6000)
    S.prepare_shards(whole, whole["data_dir"], **QUIET)
    expected = files_of(corpus_cache_dir(whole))

    cfg = local_cfg(corpus_dir, tmp_path / "b", shard_tokens=6000)
    add = S._Writer.add

    def add_then_die(self, name, toks):  # killed while writing the second shard
        add(self, name, toks)
        if self.k == 1:
            raise KeyboardInterrupt("killed after the first shard")

    monkeypatch.setattr(S._Writer, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        S.prepare_shards(cfg, cfg["data_dir"], **QUIET)
    monkeypatch.setattr(S._Writer, "add", add)
    cache = corpus_cache_dir(cfg)
    progress = json.load(open(os.path.join(cache, "progress.json")))
    assert len(progress["splits"]["train"]) == 1 and not os.path.exists(os.path.join(cache, "index.json"))
    assert glob.glob(os.path.join(cache, "*.tmp"))  # the unfinished shard, under its temporary name
    first = os.stat(os.path.join(cache, "train-00000.bin")).st_mtime_ns
    said = []
    S.prepare_shards(cfg, cfg["data_dir"], log=said.append)
    assert any("resuming" in s and "1 complete shard" in s for s in said)
    assert os.stat(os.path.join(cache, "train-00000.bin")).st_mtime_ns == first  # kept, not rewritten
    assert files_of(cache) == expected and not glob.glob(os.path.join(cache, "*.tmp"))
    assert json.load(open(os.path.join(cache, "index.json")))["splits"] == \
        json.load(open(os.path.join(corpus_cache_dir(whole), "index.json")))["splits"]


def test_the_worker_pool_writes_the_same_shards(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "BATCH_CHARS", 15_000)  # ~1 document per batch: many batches in flight
    one = local_cfg(corpus_dir, tmp_path / "one", shard_tokens=8000)
    two = local_cfg(corpus_dir, tmp_path / "two", shard_tokens=8000, workers=2)
    S.prepare_shards(one, one["data_dir"], **QUIET)
    shutil.copytree(corpus_cache_dir(one), corpus_cache_dir(two))  # the same tokenizer, shards written again
    for f in glob.glob(os.path.join(corpus_cache_dir(two), "*")):
        if not f.endswith("tokenizer.json"):
            os.remove(f)
    S.prepare_shards(two, two["data_dir"], **QUIET)
    assert files_of(corpus_cache_dir(one)) == files_of(corpus_cache_dir(two))


def test_streams_over_shards_equal_streams_over_memory(corpus_dir, tmp_path, monkeypatch):
    cfg = local_cfg(corpus_dir, tmp_path, shard_tokens=3000)
    tok, train, _ = prepare_corpus(cfg, cfg["data_dir"], **QUIET)
    ref, _ = in_memory(corpus_dir, tok)
    a = DocumentStreams(train, 3, 256, seed=5, pad_id=1, context_len=512)
    b = DocumentStreams(ref, 3, 256, seed=5, pad_id=1, context_len=512)
    calls = []
    rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda *x: calls.append(x) or rng(*x))
    for _ in range(300):  # past one epoch of every row (~140 segments per epoch)
        for x, y in zip(a.next(), b.next()):
            assert torch.equal(x, y)
    assert a.state_dict() == b.state_dict() and min(a.pos["epoch"]) >= 1
    # the order is computed once per row and epoch (it was once per row and step), and is unchanged
    assert len(calls) == 2 * sum(e + 1 for e in a.pos["epoch"])
    for b_, row in enumerate(a.rows):
        e = a.pos["epoch"][b_]
        assert np.array_equal(a._order(row, e), rng([5, row, e]).permutation(len(train)))


def test_stream_split_is_the_name_order_split(tmp_path):
    d = tmp_path / "mix"
    (d / "sub").mkdir(parents=True)
    rng = random.Random(1)

    def text():
        return " ".join(rng.choice(WORDS) for _ in range(30))

    with open(d / "a.jsonl", "w") as f:  # 23 lines: in line order (before: "a.jsonl:10" < "a.jsonl:2")
        for i in range(23):
            f.write(json.dumps({"text": text()} if i != 7 else {"text": ""}) + "\n")
    for n in ("b.txt", "sub/c.txt", "a-z.txt", "sub/d.jsonl"):
        if n.endswith(".jsonl"):
            (d / n).write_text("\n".join(json.dumps({"text": text()}) for _ in range(12)) + "\n")
        else:
            (d / n).write_text(text())
    docs = read_local(str(d), log=lambda *a: None)
    assert [n for n, _ in docs] == sorted(n for n, _ in docs)  # stream order is name order
    assert docs[0][0] == "a-z.txt" and docs[1][0] == "a.jsonl:000000000000" and docs[-1][0] == "sub/d.jsonl:000000000011"
    train, val = split_documents(docs)
    streamed = list(iter_split(iter(docs)))
    assert [(n, t) for s, n, t in streamed if s == "train"] == train
    assert [(n, t) for s, n, t in streamed if s == "val"] == val
    assert [n for n, _ in val][:2] == ["a.jsonl:000000000004", "a.jsonl:000000000015"]  # line 7 is empty: skipped
    few = docs[:4]  # fewer than 6 documents: the tail rule, as split_documents
    tr, va = split_documents(few)
    assert [(n, t) for s, n, t in iter_split(iter(few)) if s == "train"] == tr
    assert [(n, t) for s, n, t in iter_split(iter(few)) if s == "val"] == va


def test_local_listing_and_cache_key_are_unchanged_for_text_files(corpus_dir, tmp_path):
    d = tmp_path / "tree"
    for n in ("a.txt", "a-b/c.txt", "a/b.txt", "a/.hidden.txt", ".h/x.txt", "B.txt", "z.jsonl", "a/e.md"):
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        (d / n).write_text("x y z")
    legacy = sorted(glob.glob(os.path.join(d, "**", "*.txt"), recursive=True)
                    + glob.glob(os.path.join(d, "**", "*.jsonl"), recursive=True))
    assert local_files(str(d)) == legacy
    os.remove(d / "z.jsonl")
    files = local_files(str(d))
    listing = [[os.path.relpath(f, d), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    key = hashlib.sha1(json.dumps([os.path.abspath(d), "text", listing]).encode()).hexdigest()[:10]
    cfg = {"source": "local", "path": str(d), "vocab_size": 300, "data_dir": str(tmp_path)}
    assert os.path.basename(corpus_cache_dir(cfg)) == f"local-{key}-v300"  # runs made before still resume


def test_the_tokenizer_learns_only_from_its_sample(tmp_path):
    d = tmp_path / "late"
    d.mkdir()
    rng = random.Random(2)
    for i in range(12):  # the word "xyzzyq" only in the last documents, far past the sample
        words = [rng.choice(WORDS) for _ in range(400)] + (["xyzzyq"] * 400 if i >= 8 else [])
        (d / f"doc{i:02d}.txt").write_text(" ".join(words))
    sample = 3000
    cfg = local_cfg(d, tmp_path, vocab_size=300, tokenizer_sample=sample)
    whole = local_cfg(d, tmp_path, vocab_size=300, tokenizer_sample=None)
    assert corpus_cache_dir(cfg) != corpus_cache_dir(whole)  # the tokenizer depends on the sample
    tok, train, _ = prepare_corpus(cfg, cfg["data_dir"], **QUIET)
    tok_all, _, _ = prepare_corpus(whole, whole["data_dir"], **QUIET)
    assert any("xyzzy" in t for t in tok_all.get_vocab())  # frequent enough to be merged from the whole split
    assert not any("xyz" in t for t in tok.get_vocab())  # never seen by the sampled tokenizer
    info = json.load(open(os.path.join(corpus_cache_dir(cfg), "index.json")))["tokenizer"]
    assert info["sample_chars"] == sample and info["sample_docs"] == 2 and not info["whole_split"]
    assert len(train) == 11  # the whole training split is still tokenized


def test_hugging_face_json_offline_prepares_and_trains(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = random.Random(3)
    path = tmp_path / "corpus.jsonl"
    texts = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(25)]
    texts[3] = ""  # an empty record: skipped and counted
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    data = {"source": "hf", "name": "json", "config": None, "data_files": str(path), "split": "train",
            "text_field": "text", "limit": None, "vocab_size": 300, "data_dir": str(tmp_path / "data")}
    said = []
    tok, train, val = prepare_corpus(data, data["data_dir"], log=said.append)
    kept = [(f"json:train:{i:012d}", t) for i, t in enumerate(texts) if t]
    ref_train = TokenDocs.encode([d for k, d in enumerate(kept) if k % 10 != 5], tok)
    ref_val = TokenDocs.encode([d for k, d in enumerate(kept) if k % 10 == 5], tok)
    assert list(val.names) == ["json:train:000000000006", "json:train:000000000016"]
    assert np.array_equal(np.asarray(train.tokens), ref_train.tokens) and np.array_equal(val.tokens, ref_val.tokens)
    assert any("skipped 1 empty document(s)" in s for s in said)
    cfg = make_cfg(data=data, train={"steps": 2, "eval_every": 2, "save_every": 0})
    from nested_learning.train.loop import run

    assert run(cfg)["val_loss"]


def test_the_script_prepares_what_training_loads(corpus_dir, tmp_path):
    from nested_learning.cli import prepare_data as script  # scripts/prepare_data.py runs its console()

    index = script.main(["data=local", f"data.path={corpus_dir}", f"data.data_dir={tmp_path / 'data'}",
                         "data.vocab_size=300", "data.workers=1", "--no-progress"])
    said = []
    cfg = local_cfg(corpus_dir, tmp_path)
    before = files_of(index["cache"])
    _, train, val = prepare_corpus(cfg, cfg["data_dir"], log=said.append)  # loads; prepares nothing
    assert len(said) == 1 and said[0].startswith("data: local | 11 train docs")
    assert train.n_tokens == index["splits"]["train"]["n_tokens"] and files_of(index["cache"]) == before
