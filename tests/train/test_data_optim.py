import numpy as np
import pytest
import torch

from nested_learning.constants import IGNORE
from nested_learning.data.shards import prepare_corpus
from nested_learning.data.sources import read_local, split_documents
from nested_learning.data.streams import DocumentStreams
from nested_learning.data.tokens import TokenDocs
from nested_learning.models import build_model
from nested_learning.train.optim import (
    NewtonSchulzMuon,
    build_optimizer,
    lr_factor,
    muon_parameters,
    zeropower_newton_schulz,
)


def test_split_is_by_document_and_never_overlaps(corpus_dir):
    docs = read_local(corpus_dir)
    train, val = split_documents(docs)
    assert {n for n, _ in train}.isdisjoint({n for n, _ in val}) and len(train) + len(val) == len(docs)


def test_corpus_cache_tokenizer_and_dtype(corpus_dir, tmp_path):
    cfg = {"source": "local", "path": corpus_dir, "vocab_size": 300}
    tok, tr, va = prepare_corpus(cfg, str(tmp_path), log=lambda *a: None)
    assert tok.get_vocab_size() == 300 and tr.tokens.dtype == np.uint16
    tok2, tr2, _ = prepare_corpus(cfg, str(tmp_path), log=lambda *a: None)  # from the cache
    assert np.array_equal(np.asarray(tr.tokens), np.asarray(tr2.tokens))
    text = read_local(corpus_dir)[0][1][:200]
    assert tok.decode(tok.encode(text).ids) == text


def make_docs(lengths):
    toks = np.concatenate([np.arange(100 * i, 100 * i + n) for i, n in enumerate(lengths)]).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenDocs(toks, offsets, [f"d{i}" for i in range(len(lengths))])


def test_streams_cover_documents_flag_resets_and_resume():
    docs = make_docs([10, 23, 7])
    s = DocumentStreams(docs, batch=2, seq_len=8, seed=0, pad_id=0)
    seen = {0: [], 1: []}
    for _ in range(12):
        tok, tgt, reset = s.next()
        for b in range(2):
            valid = tgt[b] != IGNORE
            # targets are the next token of the same document
            assert torch.equal(tgt[b][valid][:-1], tok[b][valid][1:]) or valid.sum() <= 1
            seen[b].append((bool(reset[b]), tok[b].tolist()))
    for b in range(2):  # a row restarts exactly when a segment starts a document
        starts = [toks[0] for r, toks in seen[b] if r]
        assert all(t % 100 == 0 for t in starts) and len(starts) >= 3
    pos = s.state_dict()
    a = [s.next() for _ in range(3)]
    s2 = DocumentStreams(docs, batch=2, seq_len=8, seed=0, pad_id=0)
    s2.load_state_dict(pos)
    b = [s2.next() for _ in range(3)]
    assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_ranks_get_disjoint_rows():
    docs = make_docs([50, 60, 70, 80])
    r0 = DocumentStreams(docs, 2, 8, 0, 0, rank=0, world=2)
    r1 = DocumentStreams(docs, 2, 8, 0, 0, rank=1, world=2)
    assert r0.rows == [0, 1] and r1.rows == [2, 3]


def test_muon_gets_matrices_only():
    m = build_model("titans", "tiny")
    ids = muon_parameters(m)
    names = {n for n, p in m.named_parameters() if id(p) in ids}
    assert "blocks.0.attn.qkv.weight" in names and "embed.weight" not in names
    assert not any("conv" in n or "norm" in n or n.endswith("M0") for n in names)
    opt = build_optimizer(m, {"name": "mixed_muon_adamw", "lr": 1e-3})
    muon = opt.optimizers["muon"]
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    hope = build_model("hope", "tiny")
    hn = {n for n, p in hope.named_parameters() if id(p) in muon_parameters(hope)}
    assert "blocks.0.cms.up.0" in hn and "blocks.0.mixer.P0" not in hn  # 3-D memory init stays on AdamW


def test_newton_schulz_muon_fallback():
    G = torch.randn(32, 16)
    s = torch.linalg.svdvals(zeropower_newton_schulz(G))
    assert s.min() > 0.5 and s.max() < 1.3  # roughly orthogonal
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = NewtonSchulzMuon([w], lr=0.1)
    w.grad = torch.randn(8, 4)
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(before, w.detach())
    with pytest.raises(ValueError, match="2-D"):
        NewtonSchulzMuon([torch.nn.Parameter(torch.randn(2, 2, 2))])
    m = build_model("transformer", "tiny")
    opt = build_optimizer(m, {"name": "mixed_muon_adamw", "lr": 1e-3, "muon_impl": "newton_schulz"})
    assert isinstance(opt.optimizers["muon"], NewtonSchulzMuon)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=1e-3)


def test_context_len_resets_the_fast_state_inside_long_documents():
    docs = make_docs([40])
    s = DocumentStreams(docs, batch=1, seq_len=8, seed=0, pad_id=0, context_len=16)
    flags = [bool(s.next()[2][0]) for _ in range(5)]
    assert flags == [True, False, True, False, True]  # offsets 0, 8, 16, 24, 32
    with pytest.raises(ValueError, match="multiple of seq_len"):
        DocumentStreams(docs, 1, 8, 0, 0, context_len=12)
