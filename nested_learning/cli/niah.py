"""Needle in a haystack (RULER's single, multi-key, multi-value and multi-query variants) at
exact token lengths, with the needle at each depth; one or several runs (comma-separated).

    python scripts/eval/niah.py --run runs/hope-smoke --lengths 2k,4k,...,512k --depths 0,10,...,100 \
        --samples 2 --variants single,multikey,multivalue,multiquery --out results/niah
    python scripts/eval/niah.py --run runs/hope-smoke,runs/transformer-smoke --lengths 1k,2k --out DIR --memorize

Each prompt has exactly the requested number of the model's tokens (haystack: the run's
held-out documents, or --haystack). Scores: exact match of the greedy answer, and the rank of
the true value's log-likelihood among --distractors seeded values. Writes DIR/niah_<run>.json
per run (with --memorize also DIR/niah_<run>_memorize.json), a depth x length heatmap per
run and variant, and DIR/niah_<variant>_accuracy_vs_length.png with one line per run."""

from nested_learning.cli._common import command, main_doc
from nested_learning.eval.retrieval import main as retrieval_main


def main(argv=None) -> dict:
    with main_doc(__doc__):  # retrieval_main's --help shows __main__'s docstring: this one
        return retrieval_main("niah", argv)


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()
