"""The typed data config: `DataConfig` is the `data:` section of a run (configs/data/*.yaml extend
it as their schema, so Hydra knows every key), the one place its defaults and checks live.
Functions of `nested_learning.data` accept a DataConfig or a plain dict (a run's config.json, a
test), read through `DataConfig.of`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..checks import ConfigSection, positive_int

__all__ = ["DEFAULT_SHARD_TOKENS", "DEFAULT_TOKENIZER_SAMPLE", "SOURCES", "DataConfig"]

SOURCES = ("shakespeare", "local", "hf")
DEFAULT_TOKENIZER_SAMPLE = 100_000_000  # characters of the training split the tokenizer is trained on
DEFAULT_SHARD_TOKENS = 2**27  # tokens per shard (256 MiB of uint16)


@dataclass
class DataConfig(ConfigSection):
    SECTION = "data"

    source: str = "shakespeare"          # shakespeare | local | hf
    path: str | None = None              # local: a file or folder (.txt: one document; .jsonl: one per line)
    name: str | None = None              # hf: the dataset name (or a generic builder: json, text, ...)
    config: str | None = None            # hf: the dataset config
    data_files: Any = None               # hf: a path (or list) for the generic builders
    split: str = "train"                 # hf: the split streamed
    text_field: str = "text"             # local .jsonl and hf: the field holding the text
    limit: int | None = None             # hf: records read (None: the whole stream)
    vocab_size: int = 4096
    tokenizer_sample: int | None = DEFAULT_TOKENIZER_SAMPLE  # None: the whole training split
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # a document never spans two shards
    workers: int | None = None           # tokenizing processes; None: every core
    data_dir: str | None = None          # None: $NL_DATA_DIR, else ./data

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "local" and not self.path:
            raise ValueError("data=local needs data.path=FILE_OR_DIR (.txt or .jsonl files)")
        if self.source == "hf" and not self.name:
            raise ValueError("data=hf needs data.name=DATASET (or a builder such as json with data.data_files=...)")
        positive_int("data.vocab_size", self.vocab_size)
        positive_int("data.shard_tokens", self.shard_tokens)
        for k in ("workers", "limit"):
            if getattr(self, k) is not None:
                positive_int(f"data.{k}", getattr(self, k))
        v = self.tokenizer_sample
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 1 or int(v) != v:
                raise ValueError(f"data.tokenizer_sample must be a positive number of characters or null, got {v!r}")
            self.tokenizer_sample = int(v)
