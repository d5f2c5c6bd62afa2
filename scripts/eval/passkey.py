"""Passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit pass key in repeated filler text,
at exact token lengths and each depth; the NIAH machinery, scoring and streaming.

    python scripts/eval/passkey.py --run runs/hope-smoke --lengths 2k,4k,...,512k --depths 0,50,100 --out results/passkey

Writes DIR/passkey_<run>.json, heatmaps and DIR/passkey_single_accuracy_vs_length.png."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nested_learning.eval.retrieval import main  # noqa: E402

if __name__ == "__main__":
    main("passkey")
