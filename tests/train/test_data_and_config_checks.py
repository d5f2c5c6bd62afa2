"""Issue 16: a one-file corpus works, the token cache follows the files' content, empty and
binary files are skipped and counted, a too-small corpus is refused, and bad config values
name their key and rule."""

import os
import shutil

import pytest

from nested_learning.data.shards import prepare_corpus
from nested_learning.data.sources import read_local, split_documents
from nested_learning.train.loop import run
from tests.train.conftest import read_metrics


def test_a_single_document_trains_with_a_held_out_tail(make_cfg, corpus_dir, tmp_path):
    one = tmp_path / "one_file.txt"
    one.write_text(open(os.path.join(corpus_dir, "doc00.txt")).read() * 3)
    train, val = split_documents(read_local(str(one)))
    assert [n for n, _ in train] == ["one_file.txt"] and [n for n, _ in val] == ["one_file.txt#tail"]
    text = one.read_text()
    assert train[0][1] + val[0][1] == text  # a cut, no overlap, nothing lost
    assert 0.09 < len(val[0][1]) / len(text) < 0.11 and val[0][1][0].isspace()  # at a white-space boundary
    cfg = make_cfg(data={"path": str(one)}, train={"steps": 3, "eval_every": 3, "save_every": 0})
    summary = run(cfg)
    assert summary["val_loss"] and read_metrics(cfg["train"]["out_dir"])[-1]["val_loss"] > 0


def test_six_or_more_documents_split_by_document():
    docs = [(f"d{i}", f"text {i} " * 50) for i in range(6)]
    train, val = split_documents(docs)
    assert [n for n, _ in val] == ["d5"] and len(train) == 5


def test_the_token_cache_follows_the_files(corpus_dir, tmp_path):
    d = tmp_path / "grow"
    d.mkdir()
    for i in range(9):
        shutil.copy(os.path.join(corpus_dir, f"doc{i:02d}.txt"), d / f"doc{i:02d}.txt")
    cfg = {"source": "local", "path": str(d), "vocab_size": 300, "data_dir": str(tmp_path / "data")}
    _, train9, val9 = prepare_corpus(cfg, cfg["data_dir"], log=lambda *a: None)
    for i in range(9, 12):
        shutil.copy(os.path.join(corpus_dir, f"doc{i:02d}.txt"), d / f"doc{i:02d}.txt")
    _, train12, val12 = prepare_corpus(cfg, cfg["data_dir"], log=lambda *a: None)
    assert len(train9) + len(val9) == 9 and len(train12) + len(val12) == 12
    (d / "doc00.txt").write_text("changed " * 3000)  # same names, new content
    _, changed, _ = prepare_corpus(cfg, cfg["data_dir"], log=lambda *a: None)
    assert changed.n_tokens != train12.n_tokens


def test_empty_and_binary_files_are_skipped_and_counted(corpus_dir, tmp_path):
    d = tmp_path / "mixed"
    shutil.copytree(corpus_dir, d)
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("  \n\n")
    (d / "image.txt").write_bytes(bytes(range(256)) * 4)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    said = []
    docs = read_local(str(d), log=said.append)
    assert len(docs) == 12
    assert any("skipped 2 empty document(s)" in s for s in said)
    assert any("skipped 2 not UTF-8 text" in s and "image.txt" in s for s in said)
    only_empty = tmp_path / "nothing"
    only_empty.mkdir()
    (only_empty / "a.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty .txt or .jsonl documents"):
        read_local(str(only_empty), log=lambda *a: None)


def test_a_corpus_too_small_for_one_batch_is_refused(make_cfg, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("the king " * 30)
    cfg = make_cfg(data={"path": str(small), "vocab_size": 260}, train={"batch_size": 8, "seq_len": 64,
                                                                        "context_len": None})
    with pytest.raises(ValueError, match="fewer than one batch needs"):
        run(cfg)


@pytest.mark.parametrize("section,key,value,msg", [
    ("train", "clip", -1, r"train.clip .* must lie in \(0.0, inf\], got -1"),
    ("train", "clip", "big", r"train.clip .* must be a number, got 'big'"),
    ("optim", "lr", "abc", "optim.lr must be a number, got 'abc'"),
    ("optim", "weight_decay", -0.1, r"optim.weight_decay must lie in \[0.0, inf\]"),
    ("optim", "betas", [0.9, 1.5], r"optim.betas\[1\] must lie in \[0.0, 1.0\)"),
    ("train", "keep_last", -2, r"train.keep_last \(null keeps every checkpoint\) must be a positive int"),
    ("train", "max_bad_steps", 0, "train.max_bad_steps must be a positive int"),
    ("train", "resume", "yes", "train.resume must be true or false"),
    ("train", "seq_len", 100, r"train.seq_len=100 must be a multiple of model.memory_chunk=8.*nearest above is 104"),
])
def test_bad_config_values_name_their_key(make_cfg, section, key, value, msg):
    cfg = make_cfg()
    cfg[section][key] = value
    with pytest.raises(ValueError, match=msg):
        run(cfg)
    assert not os.path.exists(os.path.join(cfg["train"]["out_dir"], "metrics.jsonl"))


def test_seq_len_error_names_the_chunk_rule_not_context_len(make_cfg):
    cfg = make_cfg(model={"name": "hope", "overrides": {"proj_chunk": 16, "memory_chunk": 32, "cms_periods": [1, 4]}})
    cfg["train"].update(seq_len=100, context_len=1024)
    with pytest.raises(ValueError) as err:
        run(cfg)
    assert "model.proj_chunk=16" in str(err.value) and "context_len" not in str(err.value)
    assert "nearest above is 128" in str(err.value)


def test_clip_null_means_no_clipping(make_cfg):
    cfg = make_cfg(train={"clip": None, "steps": 2, "save_every": 0, "eval_every": 0})
    run(cfg)
    assert all(r["grad_norm"] > 0 for r in read_metrics(cfg["train"]["out_dir"]))
