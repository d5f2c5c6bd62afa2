"""The installed package: layout, metadata, the compiled extension and its absence."""

import glob
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import nested_learning

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_extension_is_built_and_registered():
    info = nested_learning.build_info()
    assert info["extension"] == "loaded", info
    assert info["torch"] == torch.__version__.split("+")[0]
    assert info["openmp"] != "none"
    assert info["compiler"].startswith(("gcc-", "clang-")) and int(info["threads"]) >= 1
    assert info["cuda"] == ("1" if torch.cuda.is_available() and torch.version.cuda else info["cuda"])


def test_kernels_install_under_the_package_only():
    import nested_learning.kernels as k

    assert os.path.samefile(os.path.dirname(k.__file__), os.path.join(ROOT, "nested_learning", "kernels"))
    # nothing of ours is importable as `kernels` (a name of another PyPI project, which transformers
    # imports), neither outside the source tree nor from its root (where pytest and scripts run)
    ours = (os.path.join(ROOT, "kernels") + os.sep, os.path.join(ROOT, "nested_learning") + os.sep)
    code = ("import importlib.util,os,sys; s = importlib.util.find_spec('kernels'); "  # PyPI's kernels may be installed
            f"sys.exit(s is not None and os.path.realpath(s.origin or '').startswith({ours!r}))")
    for cwd in ("/", ROOT):  # the current folder on the import path, as pytest's pythonpath puts the root
        env = {**os.environ, "PYTHONPATH": "."}
        assert subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env).returncode == 0, cwd


def test_license_matches_metadata():
    meta = metadata.metadata("nested-learning")
    lic = meta.get("License") or meta.get("License-Expression")
    assert lic == "Apache-2.0"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "Apache License" in f.read(2000)


def test_import_works_and_reports_when_the_extension_cannot_load():
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nested_learning._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import nested_learning as nl\n"
        "assert any('_C could not be loaded' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "assert nl.build_info()['extension'] == 'missing' and not nl.extension_available()\n"
        "import torch\n"
        "x = [torch.randn(1, 5, 1, 4) for _ in range(3)] + [torch.rand(1, 5, 1) * 0.5 + 0.5, torch.rand(1, 5, 1)]\n"
        "nl.ops.dgd_update(*x)  # its fast CPU backend lives in _C\n"
        "loss, d = nl.ops.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3]))\n"
        "print('ok', nl.ops.last_backend('dgd_update'), nl.ops.last_backend('linear_cross_entropy'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    # the fused cross-entropy is ATen only: it does not need the extension
    assert r.stdout.strip() == "ok reference cpu"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("src", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))))
def test_cuda_sources_compile_with_nvcc(src, tmp_path):
    with open(src) as f:
        text = f.read()
        if "#include <torch" in text or "#include <ATen" in text:
            pytest.skip("includes torch headers: compiled only on a CUDA build of torch")
    r = subprocess.run(
        ["nvcc", "-c", "-arch=sm_90", "-std=c++17", f"-I{os.path.join(ROOT, 'csrc')}", src,
         "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr


def test_the_package_version_is_the_metadata_version_and_the_changelogs_newest():
    import re

    import nested_learning as nl

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    meta = re.search(r'^version = "([^"]+)"', open(os.path.join(root, "pyproject.toml")).read(), re.M).group(1)
    newest = re.search(r"^## (\S+) ", open(os.path.join(root, "CHANGELOG.md")).read(), re.M).group(1)
    assert nl.__version__ == meta == newest
