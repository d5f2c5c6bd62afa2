"""The package's layering as a checked contract (docs/ARCHITECTURE.md, "Who may call whom"):
the import-linter contracts of pyproject.toml hold, and fail on an upward import; no import
cycle between files; no private name imported across packages; no import of the package inside a
function; the Triton kernels import nothing of the package."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "nested_learning")

pytest.importorskip("importlinter", reason="import-linter is a dev dependency (pip install -e '.[dev]')")
grimp = pytest.importorskip("grimp")

# function-level imports of the package that are not there to dodge a cycle (each says why)
LAZY_ALLOWED = {
    # the Triton kernels load triton, which is optional and slow to import: only where they run
    ("nested_learning.ops._backend", "nested_learning.kernels"),
    ("nested_learning.ops._titan_mlp", "nested_learning.kernels"),
    ("nested_learning.ops.cms", "nested_learning.kernels.cms"),
    ("nested_learning.ops.cross_entropy", "nested_learning.kernels.cross_entropy"),
    ("nested_learning.ops.dgd", "nested_learning.kernels.dgd"),
    ("nested_learning.ops.selfmod", "nested_learning.kernels.selfmod"),
    ("nested_learning.ops.titan", "nested_learning.kernels.titan"),
    # the adapter imports the optional lm-evaluation-harness, located only when the command runs
    ("nested_learning.cli.lm_eval", "nested_learning.eval.lm_eval_adapter"),
}


def lint(cwd: str, pythonpath: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_layer_contracts_hold():
    r = lint(ROOT, ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """A copy of the package where a model imports training: lint-imports fails and names it."""
    shutil.copytree(PKG, tmp_path / "nested_learning", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    lm = tmp_path / "nested_learning" / "models" / "lm.py"
    lm.write_text(lm.read_text().replace("from .. import ops\n", "from .. import ops\nfrom ..train import optim  # noqa\n", 1))
    r = lint(str(tmp_path), str(tmp_path))
    assert r.returncode != 0
    assert "nested_learning.models.lm -> nested_learning.train.optim" in r.stdout
    assert "1 broken" in r.stdout


def _modules():
    for dp, _, fs in os.walk(PKG):
        for f in fs:
            if f.endswith(".py"):
                path = os.path.join(dp, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__"), f == "__init__.py"


def _imports(path: str, mod: str, is_pkg: bool):
    """(node, in a function, imported module, names) of every import of the package in a file."""
    tree = ast.parse(open(path).read())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            target, names = None, [a.name for a in node.names]
        else:
            continue
        for t in ([target] if target is not None else names):
            if t == "nested_learning" or t.startswith("nested_learning."):
                yield node, id(node) not in top, t, names if target is not None else []


def test_no_import_cycle_between_files():
    g = grimp.build_graph("nested_learning")
    cycles = []
    for a in sorted(g.modules):
        for b in sorted(g.find_modules_directly_imported_by(a)):
            chain = g.find_shortest_chain(importer=b, imported=a)
            if chain:
                cycles.append(" -> ".join((a, *chain)))
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_packages():
    """`from X import _name` only within one subpackage (ops may use ops._backend)."""
    bad = []
    for path, mod, is_pkg in _modules():
        here = mod.split(".")[:2]
        for node, _, target, names in _imports(path, mod, is_pkg):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target.split(".")[:2] != here:
                    bad.append(f"{mod}:{node.lineno} imports {n} from {target}")
    assert not bad, "\n".join(bad)


def test_no_function_level_import_of_the_package():
    """Imports of the package sit at the top of a file (an import inside a function hides a
    cycle or an upward call); LAZY_ALLOWED lists the exceptions, each with its reason."""
    bad = []
    for path, mod, is_pkg in _modules():
        for node, inner, target, _ in _imports(path, mod, is_pkg):
            if inner and (mod, target) not in LAZY_ALLOWED:
                bad.append(f"{mod}:{node.lineno} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_kernels_import_nothing_of_the_package():
    """nested_learning/kernels/ takes plain tensors: it imports torch, triton, the standard library and itself."""
    allowed = {"torch", "triton", "numpy", "__future__"}
    bad = []
    kdir = os.path.join(ROOT, "nested_learning", "kernels")
    for f in sorted(os.listdir(kdir)):
        if not f.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(kdir, f)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                root = (node.module or "").split(".")[0]
            elif isinstance(node, ast.Import):
                root = node.names[0].name.split(".")[0]
            else:
                continue
            if root not in allowed and root not in sys.stdlib_module_names:
                bad.append(f"nested_learning/kernels/{f}:{node.lineno} imports {root}")
    assert not bad, "\n".join(bad)
