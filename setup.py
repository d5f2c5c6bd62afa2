"""Builds the extension nested_learning._C from csrc/ (see README: install).

    pip install --no-build-isolation -e .

The C++ sources (csrc/ops.cpp, csrc/cpu/*.cpp, OpenMP) are built on every machine; the CUDA
sources (csrc/cuda/*.cu) as well where a CUDA toolkit and a CUDA build of torch are present.
NL_BUILD_CUDA=0/1 overrides that detection. A failed CUDA build prints why and falls back to
the CPU-only extension. Without torch at build time the package installs without _C (the
reference backend still works) and says so.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[nested_learning setup] {msg}", file=sys.stderr, flush=True)


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cxx_flags() -> list[str]:
    flags = ["-O3", "-std=c++17"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
    return flags


def _extension_and_cmdclass():
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        _say("torch is not installed at build time: skipping nested_learning._C "
             "(install torch first, then pip install --no-build-isolation -e .)")
        return [], {}
    cpu_sources = _rel("csrc/ops.cpp") + _rel("csrc/cpu/*.cpp")
    cuda_sources = _rel("csrc/cuda/*.cu")
    link = ["-fopenmp"] if sys.platform.startswith("linux") else []
    flag = os.environ.get("NL_BUILD_CUDA")
    if flag not in (None, "", "0", "1"):
        raise SystemExit(f"NL_BUILD_CUDA must be 0 or 1, got {flag!r}")
    detected = ce.CUDA_HOME is not None and torch.version.cuda is not None
    want_cuda = detected if flag in (None, "") else flag == "1"
    _say(f"torch {torch.__version__}; CUDA toolkit: {ce.CUDA_HOME}; torch CUDA: {torch.version.cuda}; "
         f"building CUDA sources: {want_cuda and bool(cuda_sources)}")

    def cpu_ext():
        return ce.CppExtension(
            "nested_learning._C", cpu_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": _cxx_flags()}, extra_link_args=link)

    def cuda_ext():
        ext = ce.CUDAExtension(
            "nested_learning._C", cpu_sources + cuda_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("NL_WITH_CUDA", None)],
            extra_compile_args={"cxx": _cxx_flags(), "nvcc": ["-O3", "-lineinfo", "-std=c++17"]},
            extra_link_args=link)
        ext._nl_cuda = True
        return ext

    class BuildExt(ce.BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 (any compiler/linker failure)
                if not getattr(ext, "_nl_cuda", False):
                    raise
                _say(f"the CUDA build failed ({type(err).__name__}: {err}); "
                     "building the CPU-only extension instead (set NL_BUILD_CUDA=0 to skip the try)")
                fallback = cpu_ext()
                for attr in ("sources", "define_macros", "extra_compile_args", "libraries",
                             "library_dirs", "include_dirs", "extra_link_args", "runtime_library_dirs"):
                    setattr(ext, attr, getattr(fallback, attr))
                ext._nl_cuda = False
                super().build_extension(ext)

    if want_cuda and not detected:
        _say("NL_BUILD_CUDA=1 but no CUDA toolkit or CUDA torch was detected: the build will try and may fall back")
    ext = cuda_ext() if want_cuda and cuda_sources else cpu_ext()
    return [ext], {"build_ext": BuildExt.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extension_and_cmdclass()
setup(
    # data folders without __init__.py (BLiMP, shipped with the zero-shot pack; its files: pyproject package-data)
    packages=find_packages(include=["nested_learning", "nested_learning.*"])
    + ["nested_learning.eval.data.blimp"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
