"""Passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit pass key in repeated filler text,
at exact token lengths and each depth; the NIAH machinery, scoring and streaming.

    python scripts/eval/passkey.py --run runs/hope-smoke --lengths 2k,4k,...,512k --depths 0,50,100 --out results/passkey

Writes DIR/passkey_<run>.json, heatmaps and DIR/passkey_single_accuracy_vs_length.png."""

from nested_learning.cli._common import command, main_doc
from nested_learning.eval.retrieval import main as retrieval_main


def main(argv=None) -> dict:
    with main_doc(__doc__):  # retrieval_main's --help shows __main__'s docstring: this one
        return retrieval_main("passkey", argv)


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()
