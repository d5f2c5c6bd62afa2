"""Export a training run's model as one safetensors file plus its config (from single-file or
DCP checkpoints alike), readable by nested_learning.runs.load_run.

    python scripts/export.py runs/hope-mid                 # the latest checkpoint -> runs/hope-mid/export
    python scripts/export.py runs/hope-mid --step 50000 --out exports/hope-mid-50k
"""

import argparse

from nested_learning.cli._common import command
from nested_learning.runs.export import export_run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run directory (its train.out_dir) or one checkpoint directory")
    ap.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the latest)")
    ap.add_argument("--out", default=None, help="the export directory (default: RUN/export)")
    a = ap.parse_args(argv)
    print(export_run(a.run, a.step, a.out))


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()
