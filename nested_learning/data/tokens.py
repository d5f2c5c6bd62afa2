"""Tokens: the special tokens, the ignore index, the byte-level BPE tokenizer, the token dtype
and TokenDocs (documents as one token array with offsets)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SPECIALS = ["<|endoftext|>", "<|pad|>"]
TOKENIZER_FILE = "tokenizer.json"  # train.py writes the run's tokenizer into its out_dir


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
