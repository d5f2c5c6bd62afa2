"""Token shards: a corpus tokenized once, streaming, into memory-mapped files (docs/DATA.md).

`prepare_shards` reads the documents of a data config one at a time (sources.iter_documents), splits
them as they pass (sources.iter_split: document i of the stream is validation when i % 10 == 5),
trains the tokenizer on the first data.tokenizer_sample characters of the training split,
encodes batches of documents in a pool of worker processes (results taken in order, so the
output does not depend on the number of workers) and appends them to shards of at most
data.shard_tokens tokens (a document never spans two shards; one longer than that is a shard of
its own). Memory is bounded by the batches in flight, never by the corpus. A shard is written
under a temporary name and renamed when complete, then recorded in progress.json: a rerun after
an interruption skips the documents of the recorded shards and writes the rest. index.json,
written last, marks the corpus complete; a rerun is then a no-op.

Files in the cache directory (sources.corpus_cache_dir):

    tokenizer.json             the byte-level BPE tokenizer
    train-00000.bin            tokens of whole documents, each followed by <|endoftext|>, raw
                               uint16 (vocabulary <= 65536) or uint32, native byte order
    train-00000.offsets.npy    int64 [n_docs + 1]: document j is bin[offsets[j]:offsets[j+1]]
    train-00000.names.jsonl    one JSON string per line: the documents' names
    val-00000.*                the same for the validation split
    progress.json              the shards completed so far (while preparing)
    index.json                 dtype, vocabulary, tokenizer SHA-256, the sample the tokenizer was
                               trained on, documents and tokens per shard and per split

`load_corpus` opens them as `ShardedDocs`: the TokenDocs interface (len, doc(i), n_tokens,
names) over np.memmap views, nothing read until a document is.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from array import array
from collections import deque

import numpy as np

from .config import DataConfig
from .sources import (
    SPLIT_EVERY,
    Skips,
    corpus_cache_dir,
    data_dir_of,
    iter_documents,
    iter_split,
    tokenizer_sample,
)
from .tokens import SPECIALS, TOKENIZER_FILE, token_dtype, train_tokenizer

FORMAT = 1
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"
SPLITS = ("train", "val")
BATCH_CHARS = 1 << 20  # characters of text per batch sent to a worker
BATCH_DOCS = 4096  # documents per batch at most
SPLIT_RULE = (f"document i of the stream (name order) is validation when i % {SPLIT_EVERY} == {SPLIT_EVERY // 2}; "
              f"a corpus of fewer than {SPLIT_EVERY // 2 + 1} documents holds out the last 10% of each "
              "document's characters instead")
_LEGACY = [f"{s}.{x}" for s in SPLITS for x in ("tokens.npy", "offsets.npy", "names.json")]


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(cache: str) -> dict | None:
    """The index of a complete corpus in `cache`, or None when it is not (yet) complete."""
    index = _read_json(os.path.join(cache, INDEX_FILE))
    if index is not None and index.get("format") != FORMAT:
        raise ValueError(f"{cache} holds shards of format {index.get('format')}, this code reads format {FORMAT}: "
                         "delete the directory to prepare the corpus again")
    return index


@contextlib.contextmanager
def _lock(cache: str):
    """An exclusive lock on the cache directory while preparing (another process preparing the
    same corpus waits, then finds it complete). Advisory; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(cache, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- encoding workers
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eot: int, dtype: str) -> None:
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), eot=eot, dtype=np.dtype(dtype))


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of a batch of documents, each followed by <|endoftext|>, concatenated, and
    their lengths."""
    tok, eot, dtype = _WORKER["tok"], _WORKER["eot"], _WORKER["dtype"]
    ids = [e.ids for e in tok.encode_batch(texts)]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for x in ids:
        out[pos: pos + len(x)] = x
        pos += len(x)
        out[pos] = eot
        pos += 1
    return out, lengths


@contextlib.contextmanager
def _pool(workers: int, tok, eot: int, dtype: np.dtype):
    """A pool of `workers` encoding processes (forked where the platform can). Each worker runs
    the tokenizer single-threaded: the pool is the parallelism."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # seen by the workers as they start
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_str(), eot, dtype.str))
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------------------- writing
class _Writer:
    """Appends documents of one split to numbered shards of at most shard_tokens tokens; a
    shard is written under temporary names and renamed when complete, then `on_done(entry)`."""

    def __init__(self, cache: str, split: str, dtype: np.dtype, shard_tokens: int, start: int, on_done):
        self.cache, self.split, self.dtype, self.shard_tokens = cache, split, dtype, shard_tokens
        self.k, self.on_done, self.bin = start, on_done, None

    def _base(self) -> str:
        return os.path.join(self.cache, f"{self.split}-{self.k:05d}")

    def add(self, name: str, toks: np.ndarray) -> None:
        if self.bin is not None and self.n + len(toks) > self.shard_tokens:
            self.close()
        if self.bin is None:
            base = self._base()
            self.bin = open(base + ".bin.tmp", "wb")
            self.names = open(base + ".names.jsonl.tmp", "w", encoding="utf-8")
            self.offsets, self.n = array("q", [0]), 0
        self.bin.write(toks.astype(self.dtype, copy=False).tobytes())
        self.names.write(json.dumps(name) + "\n")
        self.n += len(toks)
        self.offsets.append(self.n)

    def close(self) -> None:
        """Completes the current shard (if any)."""
        if self.bin is None:
            return
        base = self._base()
        for f in (self.bin, self.names):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        with open(base + ".offsets.npy.tmp", "wb") as f:
            np.save(f, np.frombuffer(self.offsets, dtype=np.int64))
        for ext in (".bin", ".names.jsonl", ".offsets.npy"):
            os.replace(base + ext + ".tmp", base + ext)
        self.on_done({"file": os.path.basename(base), "n_docs": len(self.offsets) - 1, "n_tokens": self.n})
        self.k, self.bin = self.k + 1, None

    def abandon(self) -> None:
        if self.bin is not None:
            self.bin.close()
            self.names.close()
            self.bin = None


def _shard_paths(cache: str, entry: dict) -> dict[str, str]:
    base = os.path.join(cache, entry["file"])
    return {"bin": base + ".bin", "offsets": base + ".offsets.npy", "names": base + ".names.jsonl"}


def _shard_intact(cache: str, entry: dict, itemsize: int) -> bool:
    p = _shard_paths(cache, entry)
    return (all(os.path.exists(x) for x in p.values())
            and os.path.getsize(p["bin"]) == entry["n_tokens"] * itemsize)


def _bar(progress: bool, total: int | None):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=" docs", desc="tokenize", dynamic_ncols=True, mininterval=0.5, leave=True)


def prepare_shards(data_cfg: DataConfig | dict, data_dir: str | None = None, log=print, progress: bool | None = None,
                   workers: int | None = None, quiet_if_done: bool = False) -> dict:
    """Tokenize the corpus of a data config into shards under its cache directory (see the
    module docstring) and return its index (plus "cache": the directory). A complete corpus
    is left alone (a no-op that says so unless quiet_if_done); an interrupted one is resumed.
    progress: a tqdm bar of documents and tokens (default: when stderr is a terminal); workers:
    encoding processes (default data.workers, else every core)."""
    data_cfg = DataConfig.of(data_cfg)
    data_dir = data_dir or data_dir_of(data_cfg)
    cache = corpus_cache_dir(data_cfg, data_dir)
    index = read_index(cache)
    if index is None:
        fresh = outermost_missing(cache)  # the folder this call creates (None: the cache exists)
        os.makedirs(cache, exist_ok=True)
        try:
            with _lock(cache):
                index = read_index(cache)  # another process may have completed it while we waited
                if index is None:
                    return {**_prepare(data_cfg, data_dir, cache, log, progress, workers), "cache": cache}
        except Exception:  # a corpus that cannot be prepared (empty, too small) leaves nothing behind;
            # an interruption (KeyboardInterrupt) or a failure after the first shard keeps what a rerun resumes
            if fresh is not None and not os.path.exists(os.path.join(cache, PROGRESS_FILE)):
                shutil.rmtree(fresh, ignore_errors=True)
            raise
    if not quiet_if_done:
        want = data_cfg.shard_tokens
        log(f"{cache} is complete ({index['n_docs']:,} documents, {index['n_tokens']:,} tokens in "
            f"{sum(len(index['splits'][s]['shards']) for s in SPLITS)} shards): nothing to do"
            + (f" (its shards hold up to {index['shard_tokens']:,} tokens; data.shard_tokens={want:,} applies "
               "to a new preparation)" if want != index["shard_tokens"] else ""))
    return {**index, "cache": cache}


def outermost_missing(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet (None: path exists)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return None
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def _tokenizer(data_cfg, data_dir: str, cache: str, log) -> tuple[object, dict]:
    """The cache's tokenizer, trained on the first data.tokenizer_sample characters of the
    training split (in stream order; the document that crosses the bound is cut) when missing."""
    vocab = int(data_cfg.vocab_size)
    path = os.path.join(cache, TOKENIZER_FILE)
    sample = tokenizer_sample(data_cfg)
    if os.path.exists(path):
        prog = _read_json(os.path.join(cache, PROGRESS_FILE)) or {}
        return train_tokenizer([], vocab, path), prog.get("tokenizer") or {"sample": sample, "reused": True}
    info = {"sample": sample, "sample_chars": 0, "sample_docs": 0, "whole_split": False}

    def texts():
        for split, _, text in iter_split(iter_documents(data_cfg, data_dir, log=None)):
            if split != "train":
                continue
            if sample is not None and info["sample_chars"] + len(text) >= sample:
                text = text[: sample - info["sample_chars"]]
                info["sample_chars"] += len(text)
                info["sample_docs"] += 1
                yield text
                return
            info["sample_chars"] += len(text)
            info["sample_docs"] += 1
            yield text
        info["whole_split"] = True

    t0 = time.perf_counter()
    stream = texts()
    first = next(stream, None)  # an empty or unreadable corpus fails here, before anything is announced
    if first is None:
        raise ValueError(f"the training split of data.source={data_cfg.source} is empty: nothing to train a "
                         "tokenizer on")
    log(f"data: training a {vocab}-token BPE tokenizer on "
        + ("the training split" if sample is None else f"the first {sample:,} characters of the training split"))
    tok = train_tokenizer(_chain(first, stream), vocab, path)
    log(f"data: tokenizer trained on {info['sample_docs']:,} documents ({info['sample_chars']:,} characters"
        + (", the whole training split" if info["whole_split"] else "") + f") in {time.perf_counter() - t0:.1f} s")
    return tok, info


def _prepare(data_cfg, data_dir: str, cache: str, log, progress, workers) -> dict:
    t0 = time.perf_counter()
    shard_tokens = data_cfg.shard_tokens
    if shard_tokens < 1:
        raise ValueError(f"data.shard_tokens must be positive, got {shard_tokens}")
    workers = int(workers or data_cfg.workers or default_workers())
    progress = progress if progress is not None else _stderr_is_tty()
    for tmp in glob.glob(os.path.join(cache, "*.tmp")):  # a killed run's unfinished files
        os.remove(tmp)
    tok, tok_info = _tokenizer(data_cfg, data_dir, cache, log)
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    sha = hashlib.sha256(tok.to_str().encode()).hexdigest()
    eot = tok.token_to_id(SPECIALS[0])
    prog_path = os.path.join(cache, PROGRESS_FILE)
    fresh = {"format": FORMAT, "tokenizer_sha256": sha, "dtype": dtype.name, "shard_tokens": shard_tokens,
             "tokenizer": tok_info, "splits": {s: [] for s in SPLITS}}
    prog = _read_json(prog_path)
    if prog is not None and all(prog.get(k) == fresh[k] for k in ("format", "tokenizer_sha256", "dtype",
                                                                   "shard_tokens")):
        for s in SPLITS:  # keep the recorded shards up to the first one that is damaged or missing
            ok = []
            for e in prog["splits"][s]:
                if not _shard_intact(cache, e, dtype.itemsize):
                    break
                ok.append(e)
            prog["splits"][s] = ok
    else:
        prog = fresh
    _write_json(prog_path, prog)
    skip = {s: sum(e["n_docs"] for e in prog["splits"][s]) for s in SPLITS}
    if any(skip.values()):
        log(f"data: resuming {cache}: {sum(len(prog['splits'][s]) for s in SPLITS)} complete shard(s) "
            f"({skip['train']:,} train and {skip['val']:,} val documents) kept")
    else:
        log(f"data: tokenizing into {cache} ({workers} worker(s), shards of up to {shard_tokens:,} tokens)")

    def done(split):
        def record(entry):
            prog["splits"][split].append(entry)
            _write_json(prog_path, prog)
        return record

    writers = {s: _Writer(cache, s, dtype, shard_tokens, len(prog["splits"][s]), done(s)) for s in SPLITS}
    skips = Skips()
    limit = data_cfg.limit if data_cfg.source == "hf" else None
    bar = _bar(progress, limit)
    count = {"docs": 0, "tokens": 0, "skipped": 0}

    def batches():
        seen = {s: 0 for s in SPLITS}
        meta, texts, chars = [], [], 0
        for split, name, text in iter_split(iter_documents(data_cfg, data_dir, log=log, skips=skips)):
            k = seen[split]
            seen[split] += 1
            if k < skip[split]:  # in a shard completed before the interruption
                count["skipped"] += 1
                if bar is not None and count["skipped"] % 1000 == 0:
                    bar.set_postfix_str(f"skipping {count['skipped']:,} documents of complete shards")
                continue
            meta.append((split, name))
            texts.append(text)
            chars += len(text)
            if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
                yield meta, texts
                meta, texts, chars = [], [], 0
        if texts:
            yield meta, texts
        for s in SPLITS:  # the stream must give what the recorded shards hold
            if seen[s] < skip[s]:
                raise RuntimeError(f"{cache}: the corpus has {seen[s]} {s} documents, fewer than its complete "
                                   f"shards hold ({skip[s]}): the source changed; delete the directory")

    def write(meta, result):
        toks, lengths = result
        pos = 0
        for (split, name), n in zip(meta, lengths.tolist()):
            writers[split].add(name, toks[pos: pos + n])
            pos += n
        count["docs"] += len(meta)
        count["tokens"] += pos
        if bar is not None:
            bar.update(len(meta))
            rate = count["tokens"] / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{count['tokens']:,} tokens, {rate:,.0f} tokens/s")

    try:
        gen = batches()
        first = next(gen, None)
        second = next(gen, None) if first is not None else None
        if second is None or workers <= 1:  # one batch (a small corpus), or no pool asked for
            _init_worker(tok.to_str(), eot, dtype.str)
            for b in (first, second):
                if b is not None:
                    write(b[0], _encode(b[1]))
            for meta, texts in gen:
                write(meta, _encode(texts))
        else:
            with _pool(workers, tok, eot, dtype) as pool:
                pending = deque()
                for meta, texts in _chain(first, second, gen):
                    pending.append((meta, pool.apply_async(_encode, (texts,))))
                    while len(pending) > 2 * workers:  # bounded: at most 2 batches per worker in flight
                        m, r = pending.popleft()
                        write(m, r.get())
                while pending:
                    m, r = pending.popleft()
                    write(m, r.get())
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abandon()
        raise
    finally:
        if bar is not None:
            bar.close()
    splits = {}
    for s in SPLITS:
        shards = prog["splits"][s]
        if not shards:
            raise ValueError(f"the {s} split of {cache} is empty")
        splits[s] = {"n_docs": sum(e["n_docs"] for e in shards), "n_tokens": sum(e["n_tokens"] for e in shards),
                     "shards": shards}
    index = {"format": FORMAT, "source": data_cfg.source, "vocab_size": vocab, "dtype": dtype.name,
             "eot_id": eot, "tokenizer_sha256": sha, "tokenizer": prog["tokenizer"], "shard_tokens": shard_tokens,
             "split_rule": SPLIT_RULE, "n_docs": sum(splits[s]["n_docs"] for s in SPLITS),
             "n_tokens": sum(splits[s]["n_tokens"] for s in SPLITS), "splits": splits,
             "skipped": dict(skips.count)}
    _write_json(os.path.join(cache, INDEX_FILE), index)
    os.remove(prog_path)
    for old in _LEGACY:  # the single-array cache of earlier versions, superseded by the shards
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cache, old))
    dt = time.perf_counter() - t0
    log(f"data: prepared {cache}: {index['n_docs']:,} documents, {index['n_tokens']:,} tokens "
        f"(train {splits['train']['n_tokens']:,}, val {splits['val']['n_tokens']:,}) in "
        f"{sum(len(splits[s]['shards']) for s in SPLITS)} shard(s), {dtype.name}, in {dt:.1f} s"
        + (f" ({count['tokens'] / dt:,.0f} tokens/s)" if dt > 0 else ""))
    return index


def _chain(*parts):
    for p in parts[:-1]:
        if p is not None:
            yield p
    yield from parts[-1]


def _stderr_is_tty() -> bool:
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------- reading
class LazyNames:
    """The documents' names of a ShardedDocs, read from the shards' names files on demand (one
    shard's names held at a time)."""

    def __init__(self, docs: ShardedDocs):
        self._docs, self._cached = docs, (None, None)

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> str:
        s, j = self._docs._locate(i)
        if self._cached[0] != s:
            with open(self._docs._paths[s]["names"], encoding="utf-8") as f:
                self._cached = (s, [json.loads(line) for line in f])
        return self._cached[1][j]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class ShardedDocs:
    """One split of a prepared corpus: the TokenDocs interface (len, doc(i), n_tokens, names)
    over memory-mapped shards. doc(i) finds its shard by binary search over the shards' first
    document indices and returns a read-only view of the shard's tokens."""

    def __init__(self, cache: str, split: dict, dtype: str):
        self.dtype = np.dtype(dtype)
        self._paths = [_shard_paths(cache, e) for e in split["shards"]]
        for e, p in zip(split["shards"], self._paths):
            if not _shard_intact(cache, e, self.dtype.itemsize):
                raise ValueError(f"shard {p['bin']} is missing or damaged (expected {e['n_tokens']} tokens): "
                                 f"delete {cache} to prepare the corpus again")
        self._tokens = [np.memmap(p["bin"], dtype=self.dtype, mode="r") for p in self._paths]
        self._offsets = [np.load(p["offsets"], mmap_mode="r") for p in self._paths]
        self._first = np.zeros(len(self._paths) + 1, dtype=np.int64)
        self._first[1:] = np.cumsum([e["n_docs"] for e in split["shards"]])
        self._n_tokens = int(split["n_tokens"])
        self.names = LazyNames(self)

    def __len__(self) -> int:
        return int(self._first[-1])

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def n_shards(self) -> int:
        return len(self._paths)

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        s = int(np.searchsorted(self._first, i, side="right")) - 1
        return s, i - int(self._first[s])

    def doc(self, i: int) -> np.ndarray:
        s, j = self._locate(i)
        off = self._offsets[s]
        return self._tokens[s][int(off[j]): int(off[j + 1])]

    @property
    def tokens(self) -> np.ndarray:
        """The split's tokens as one array: the shard's memory map when there is one shard, else
        a concatenation that reads every shard (for small corpora and tests)."""
        return self._tokens[0] if len(self._tokens) == 1 else np.concatenate(self._tokens)

    @property
    def offsets(self) -> np.ndarray:
        """Document offsets into `tokens` (int64 [len + 1]; reads every shard's offsets)."""
        parts, base = [np.zeros(1, np.int64)], 0
        for off in self._offsets:
            parts.append(np.asarray(off[1:]) + base)
            base += int(off[-1])
        return np.concatenate(parts)


def load_corpus(cache: str):
    """(tokenizer, train ShardedDocs, val ShardedDocs) of a complete corpus in `cache`."""
    from tokenizers import Tokenizer

    index = read_index(cache)
    if index is None:
        raise FileNotFoundError(f"{cache} holds no complete corpus (no {INDEX_FILE}): prepare it with "
                                "scripts/prepare_data.py")
    tok = Tokenizer.from_file(os.path.join(cache, TOKENIZER_FILE))
    return tok, ShardedDocs(cache, index["splits"]["train"], index["dtype"]), \
        ShardedDocs(cache, index["splits"]["val"], index["dtype"])


def prepare_corpus(data_cfg: DataConfig | dict, data_dir: str, log=print):
    """Tokenizer and train/val documents of a data config: the corpus is tokenized once into
    memory-mapped shards under data_dir (prepare_shards, as scripts/prepare_data.py
    does; a no-op when they are complete) and read from them (shards.ShardedDocs: the TokenDocs
    interface, nothing loaded into memory)."""
    data_cfg = DataConfig.of(data_cfg)
    index = prepare_shards(data_cfg, data_dir, log=log, quiet_if_done=True)
    tok, train, val = load_corpus(index["cache"])
    log(f"data: {data_cfg.source} | {len(train)} train docs ({train.n_tokens:,} tokens), "
        f"{len(val)} val docs ({val.n_tokens:,} tokens) | vocab {int(data_cfg.vocab_size)} | "
        f"cache {index['cache']}")
    return tok, train, val
