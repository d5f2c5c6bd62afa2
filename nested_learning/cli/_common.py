"""What several command lines share: where the Hydra configs are, and a description for
argument parsers that take theirs from `__main__`."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

from nested_learning.runs.checkpoint import CheckpointError
from nested_learning.runs.run_dir import RunExistsError
from nested_learning.train.trainer import TrainingDiverged

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


# what a user can cause and fix (a bad value, a missing or damaged file, a run directory in the
# way, a diverged run): said in one line, without a traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               CheckpointError, RunExistsError, TrainingDiverged)


def user_error(prog: str, err: BaseException) -> NoReturn:
    """Print `prog: message` (one line) and exit 2; NL_TRACEBACK=1 raises instead (the traceback)."""
    if os.environ.get("NL_TRACEBACK"):
        raise err
    msg = " ".join(str(err).split()) or type(err).__name__
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the error: rank 0 says it
        print(f"{prog}: {msg} (NL_TRACEBACK=1 shows the traceback)", file=sys.stderr)
    raise SystemExit(2) from None


def command(main):
    """The entry point of a command line: main() run with a user error said in one line (exit 2,
    user_error) and Ctrl-C in one line (exit 130) instead of a traceback; main's return value
    (its results, for callers in Python) is not passed on as an exit status."""
    def run() -> None:
        prog = os.path.basename(sys.argv[0] or main.__module__)
        try:
            main()
        except KeyboardInterrupt:
            if os.environ.get("NL_TRACEBACK"):
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except USER_ERRORS as err:
            user_error(prog, err)

    run.__doc__ = f"The entry point of {main.__module__}: main() with one-line errors."
    return run


def field_overrides(pairs: list[str], flag: str = "--override") -> dict:
    """{field: value} of FIELD=VALUE strings (a model config's fields; VALUE read as YAML, so
    0.1, true, gd and [1,4] are a float, a bool, a string and a list). SystemExit on a bad one."""
    import yaml

    out = {}
    for o in pairs:
        key, eq, value = o.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"{flag} {o!r}: expected FIELD=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out
