"""The generic (non-AVX2) build of the C++ kernels, which CPUs without AVX2+FMA and other
architectures run: NESTED_LEARNING_CPU_ISA=generic makes this machine run it, and the C++
backends' parity tests run again under it in a subprocess."""

import pytest

from nested_learning import build_info, ops
from tests.helpers import run_python

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends("dgd_update", "cpu"),
                                reason="nested_learning._C is not built")


def test_build_info_says_which_cpu_kernels_run():
    assert build_info()["cpu_kernels"] in ("avx2", "generic")
    r = run_python("-c", "from nested_learning import build_info; print(build_info()['cpu_kernels'])",
                   NESTED_LEARNING_CPU_ISA="generic")
    assert r.returncode == 0 and r.stdout.strip() == "generic", r.stderr


@pytest.mark.slow
def test_generic_build_passes_the_cpu_parity_tests():
    r = run_python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/test_dgd_cpu.py",
                   "tests/ops/test_titan_backends.py", "-k", "cpu", timeout=1200, NESTED_LEARNING_CPU_ISA="generic")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
