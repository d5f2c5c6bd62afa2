"""The command lines: each is a module of nested_learning/cli with main(argv=None), installed as a
console entry point (pyproject.toml) and wrapped by a thin file under scripts/ (or train.py)
whose --help is the command's; nothing in the package imports cli; no file edits sys.path."""

from __future__ import annotations

import ast
import glob
import importlib
import os
import re

import pytest

from tests.helpers import ROOT, run_python

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    SCRIPTS = tomllib.load(f)["project"]["scripts"]
WRAPPERS = {os.path.relpath(p, ROOT): p for p in [os.path.join(ROOT, "train.py"),
                                                  *glob.glob(os.path.join(ROOT, "scripts", "*.py")),
                                                  *glob.glob(os.path.join(ROOT, "scripts", "eval", "*.py"))]}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_entry_point_is_a_cli_module_with_main(name):
    module, attr = SCRIPTS[name].split(":")
    assert module.startswith("nested_learning.cli."), SCRIPTS[name]
    mod = importlib.import_module(module)
    assert callable(getattr(mod, attr)) and callable(mod.main)


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_scripts_are_thin_wrappers_of_an_entry_point(wrapper):
    """A docstring, `from nested_learning.cli.X import console` and the __main__ guard (the entry
    point's one-line errors, as nl-X)."""
    tree = ast.parse(open(WRAPPERS[wrapper]).read())
    doc, imp, guard = tree.body
    assert isinstance(doc, ast.Expr) and isinstance(doc.value.value, str)
    assert isinstance(imp, ast.ImportFrom) and [a.name for a in imp.names] == ["console"]
    assert f"{imp.module}:console" in SCRIPTS.values(), imp.module
    assert isinstance(guard, ast.If) and ast.unparse(guard) == "if __name__ == '__main__':\n    console()"


def test_nothing_in_the_package_imports_the_command_lines():
    bad = []
    for path in glob.glob(os.path.join(ROOT, "nested_learning", "**", "*.py"), recursive=True):
        if os.sep + "cli" + os.sep in path:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if isinstance(node, ast.ImportFrom) and node.level and (node.module or "").split(".")[0] == "cli":
                names = ["nested_learning.cli"]
            bad += [f"{os.path.relpath(path, ROOT)}:{node.lineno}" for n in names
                    if n == "nested_learning.cli" or n.startswith("nested_learning.cli.")]
    assert not bad, bad


def test_no_file_edits_sys_path():
    """The package is installed (pip install -e .): scripts, benchmarks, studies and tests import
    it as it is; tests reach bench/ and studies/ through pytest's pythonpath."""
    edit = re.compile(r"sys\.path\s*(\.(insert|append|extend|remove)\s*\(|(\[[^\]]*\])?\s*[+]?=)")
    bad = []
    for folder in ("nested_learning", "scripts", "bench", "studies", "tests"):
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
            for i, line in enumerate(open(path), 1):
                if edit.search(line) and not line.lstrip().startswith("#"):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("command", ["perplexity", "niah"])
@pytest.mark.slow
def test_a_wrapper_shows_the_commands_help(command):
    """scripts/eval/X.py --help prints what `python -m nested_learning.cli.X --help` prints: the
    command's docstring (niah's parser takes it from __main__)."""
    wrapper = run_python(f"scripts/eval/{command}.py", "--help", timeout=300)
    module = run_python("-m", f"nested_learning.cli.{command}", "--help", timeout=300)
    assert wrapper.returncode == 0 and module.returncode == 0, wrapper.stderr + module.stderr
    doc = importlib.import_module(f"nested_learning.cli.{command}").__doc__
    assert doc.splitlines()[0] in wrapper.stdout
    assert wrapper.stdout == module.stdout


def test_console_entry_points_do_not_pass_results_as_an_exit_status(monkeypatch):
    """A console script runs sys.exit(entry()): the entry returns None, whatever main returns."""
    from nested_learning.cli._common import command

    assert command(lambda argv=None: "a result")() is None
