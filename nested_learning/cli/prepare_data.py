"""Tokenize a corpus once into memory-mapped token shards (docs/DATA.md).

    python scripts/prepare_data.py                                   # data=shakespeare (the default)
    python scripts/prepare_data.py data=local data.path=my_texts/ data.vocab_size=8192
    python scripts/prepare_data.py data=hf data.name=HuggingFaceFW/fineweb-edu data.limit=null
    python scripts/prepare_data.py data=hf data.name=json data.data_files=corpus.jsonl

The overrides are those of train.py (Hydra, configs/): the same data config prepares the same
cache directory that training reads, so `train.py` with it starts without tokenizing. The corpus
is streamed (memory does not grow with it), encoded by every core (data.workers), written shard
by shard (data.shard_tokens) and can be interrupted: a rerun resumes after the last complete
shard, and a rerun of a complete corpus does nothing. Prints the cache directory and its token
counts (index.json holds them per shard)."""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nested_learning.cli._common import command, config_dir
from nested_learning.data.shards import prepare_shards
from nested_learning.data.sources import data_dir_of
from nested_learning.train.config import register


def compose_data(overrides: list[str]) -> dict:
    """The resolved `data` section of train.py's config with these overrides."""
    register()  # the train section's schema, as train.py registers it (configs/config.yaml names it)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return {}
    progress = True
    if "--no-progress" in argv:
        argv, progress = [a for a in argv if a != "--no-progress"], False
    data = compose_data(argv)
    index = prepare_shards(data, data_dir_of(data), log=print, progress=progress)
    s = index["splits"]
    print(f"{index['cache']}: train {s['train']['n_docs']:,} documents, {s['train']['n_tokens']:,} tokens "
          f"({len(s['train']['shards'])} shard(s)); val {s['val']['n_docs']:,} documents, "
          f"{s['val']['n_tokens']:,} tokens ({len(s['val']['shards'])} shard(s)); {index['dtype']}, "
          f"vocab {index['vocab_size']}, tokenizer sha256 {index['tokenizer_sha256'][:12]}")
    return index


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()
