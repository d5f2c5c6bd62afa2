"""What several command lines share: where the Hydra configs are, and a description for
argument parsers that take theirs from `__main__`."""

from __future__ import annotations

import contextlib
import os
import sys

# the repository's top level (the Hydra configs live there, beside the package, not in it)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_dir() -> str:
    """The repository's configs/ (train.py's Hydra configs). It is not part of the installed
    package: the commands that compose a config need the editable install of a clone."""
    path = os.path.join(ROOT, "configs")
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        raise SystemExit(f"the Hydra configs are not at {path}: they live in the repository's configs/, "
                         "so this command needs the package installed from a clone (pip install -e .)")
    return path


@contextlib.contextmanager
def main_doc(doc: str | None):
    """`__main__.__doc__` set to doc for the duration (nested_learning.eval.retrieval.main takes its
    --help description from `__main__`, which is the wrapper script or the console script)."""
    main = sys.modules["__main__"]
    saved = main.__doc__
    main.__doc__ = doc
    try:
        yield
    finally:
        main.__doc__ = saved
