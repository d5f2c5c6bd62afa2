"""Every repository path that the documentation names exists: README.md, CONTRIBUTING.md,
CHANGELOG.md, TODO.md, reports/ablations.md, docs/**/*.md,
bench/RESULTS.md and studies/README.md, and the docstrings and comments of the code (paths from
a top-level folder there).

A path is a token with a `/` that starts at a top-level folder of the repository
(`nested_learning/`, `scripts/`, `bench/`, ...) or ends in .py, .md, .yaml, .sh or .json
(`train/trainer.py` names nested_learning/train/trainer.py). Braces expand (`run{1..3}.json`,
`niah_{hope,titans}.json`) and a `*` must match something. Not checked: where a command writes
(the path after --json, --out, -o, > or tee), placeholders (`DIR/...`, `<name>/...`, `$OUT/...`),
URLs and absolute paths, and the folders of NOT_REPOSITORY. A path at a commit, `abc1234:PATH`
(output that is no longer tracked, cited where it was), must exist in that commit where the clone
has it."""

from __future__ import annotations

import ast
import fnmatch
import functools
import glob
import io
import os
import re
import subprocess
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md", "CONTRIBUTING.md", "CHANGELOG.md", "TODO.md", "bench/RESULTS.md", "studies/README.md",
        "reports/ablations.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
CODE_FOLDERS = ["nested_learning", "scripts", "bench", "studies"]
TOP = ("nested_learning", "scripts", "bench", "studies", "configs", "tests", "docs", "csrc", "reports")
EXTENSIONS = (".py", ".md", ".yaml", ".sh", ".json")
# where runs, results, exports and corpora go (not the repository's); a user's own texts
NOT_REPOSITORY = ("runs/", "results/", "outputs/", "exports/", "data/", "my_texts/")

SEGMENT = r"(?:[\w.*-]|\{[^{}\s`]*\})+"
PATH = rf"{SEGMENT}(?:/{SEGMENT})+/?"
TOKEN = re.compile(rf"(?<![\w/.:~$<>{{@=-]){PATH}")
AT_COMMIT = re.compile(rf"(?<![\w/])([0-9a-f]{{7,40}}):({SEGMENT}(?:/{SEGMENT})*/?)")
WRITES_TO = re.compile(r"(?:--json|--out|--output|-o|>|>>|tee)[\s=]+$")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")


def expand(path: str) -> list[str]:
    """Shell brace expansion: a{b,c}d, a{1..3}b."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    inner = m.group(1)
    if re.fullmatch(r"\d+\.\.\d+", inner):
        lo, hi = map(int, inner.split(".."))
        options = [str(i) for i in range(lo, hi + 1)]
    else:
        options = inner.split(",")
    return [q for o in options for q in expand(path[: m.start()] + o + path[m.end():])]


def is_candidate(token: str) -> bool:
    segments = token.rstrip("/").split("/")
    if any(PLACEHOLDER.match(s) for s in segments):
        return False
    return segments[0] in TOP or token.endswith(EXTENSIONS)


def exists(path: str) -> bool:
    """path in the repository, or in nested_learning/ (module-relative names such as
    train/trainer.py); nested_learning/kernels/ is nested_learning/kernels/ (installed under the package)."""
    path = path.rstrip("/")
    if path.startswith("nested_learning/kernels/"):
        path = path.replace("nested_learning/", "", 1)
    for base in (ROOT, os.path.join(ROOT, "nested_learning")):
        full = os.path.join(base, path)
        if glob.glob(full) if "*" in path else os.path.exists(full):
            return True
    return False


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def paths_in(text: str, module_relative: bool = True) -> list[tuple[int, str]]:
    """(line, path) of every repository path in text that is a citation (not an output)."""
    found = []
    for m in TOKEN.finditer(text):
        token = m.group(0).rstrip(".,")
        if not is_candidate(token) or WRITES_TO.search(text[max(0, m.start() - 12): m.start()]):
            continue
        if not module_relative and token.split("/")[0] not in TOP:
            continue
        found.append((line_of(text, m.start()), token))
    return found


def missing_paths(text: str, module_relative: bool = True, folder: str = "") -> list[str]:
    """The paths of text that do not exist; a link that starts with ../ is relative to the
    document's folder (docs/releases/v0.2.0.md links ../../CHANGELOG.md)."""
    bad = []
    for line, token in paths_in(text, module_relative):
        for path in expand(token):
            if path.startswith("../"):
                path = os.path.normpath(os.path.join(folder, path))
            if not exists(path) and not path.startswith(NOT_REPOSITORY):
                bad.append(f"line {line}: {path}")
    return bad


@functools.cache
def _git_has(commit: str) -> bool:
    try:
        r = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
    except OSError:
        return False
    return r.returncode == 0


@functools.cache
def _files_at(commit: str) -> frozenset[str]:
    out = subprocess.run(["git", "ls-tree", "-r", "-t", "--name-only", commit], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return frozenset(out.split())


def missing_at_commits(text: str) -> list[str]:
    bad = []
    for m in AT_COMMIT.finditer(text):
        commit, token = m.group(1), m.group(2).rstrip(".,")
        if not is_candidate(token) or not _git_has(commit):  # not in this clone (a shallow one): nothing to check against
            continue
        files = _files_at(commit)
        for path in expand(token):
            path = path.rstrip("/")
            if not (fnmatch.filter(files, path) if "*" in path else path in files):
                bad.append(f"line {line_of(text, m.start())}: {commit}:{path}")
    return bad


def test_the_path_finder_finds_what_it_should():
    text = ("see `nested_learning/train/loop.py`, train/loop.py, scripts/eval/*.py and bench/out/cpu_session5_run{1..2}.json;\n"
            "`python bench/run.py --json bench/out/new.json`, `python x.py --out\nstudies/out/optim`, DIR/x.json, "
            "runs/hope-smoke/config.json, https://github.com/a/b.py, /tmp/x/y.py, $OUT/z.json, `<run>/a.json`;\n"
            "gone: docs/NOPE.md, layers/nope.py, `3769984:bench/out/nope.txt` (`git show 3769984:PATH`)")
    assert [p for _, p in paths_in(text)] == [
        "nested_learning/train/loop.py", "train/loop.py", "scripts/eval/*.py", "bench/out/cpu_session5_run{1..2}.json",
        "bench/run.py", "runs/hope-smoke/config.json", "docs/NOPE.md", "layers/nope.py"]
    assert missing_paths(text) == ["line 4: docs/NOPE.md", "line 4: layers/nope.py"]
    if _git_has("3769984"):
        assert missing_at_commits(text) == ["line 4: 3769984:bench/out/nope.txt"]
        assert missing_at_commits("`3769984:bench/out/cpu_session5_run{1..7}.txt`, 3769984:bench/out/gpu/") == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_a_document_names_exists(doc):
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    bad = missing_paths(text, folder=os.path.dirname(doc)) + missing_at_commits(text)
    assert not bad, f"{doc} names paths that do not exist:\n" + "\n".join(bad)


def docstrings_and_comments(source: str) -> list[tuple[int, str]]:
    """(first line, text) of every docstring and comment of a Python file."""
    out = []
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            out.append((body[0].lineno, body[0].value.value))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    return out


def test_every_path_the_code_names_exists():
    """Docstrings and comments of the code, paths from a top-level folder only (in code, a name
    such as data/x.py is as often a corpus's as the package's)."""
    bad = []
    files = [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "setup.py")]
    for folder in CODE_FOLDERS:
        files += glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
    for path in sorted(files):
        rel = os.path.relpath(path, ROOT)
        for first, text in docstrings_and_comments(open(path, encoding="utf-8").read()):
            for b in missing_paths(text, module_relative=False) + missing_at_commits(text):
                line, what = b.split(": ", 1)
                bad.append(f"{rel}:{first + int(line.split()[1]) - 1}: {what}")
    assert not bad, "the code names paths that do not exist:\n" + "\n".join(bad)
