"""Runs: a training run on disk, written by `train/` and read by `eval/` and the scripts.

- `run_dir`: a run directory is fresh, resumed or refused;
- `checkpoint`: checkpoint directories, checksums, per-rank files, the resume fallback;
- `checkpointer`: the single-file and DCP formats behind one interface;
- `load`: `load_run` (a model and its tokenizer from a run or one checkpoint), `RunInfo`;
- `export`: one self-contained checkpoint of a run.
"""

from .checkpoint import CheckpointError
from .export import export_run
from .load import RunInfo, find_checkpoint, held_out_documents, load_run, load_tokenizer

__all__ = ["CheckpointError", "RunInfo", "export_run", "find_checkpoint", "held_out_documents", "load_run",
           "load_tokenizer"]
