import os

import pytest
import torch

# Must precede any import of the Triton kernels (DESIGN.md, testing).
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: longer-running test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poisoned_allocations():
    """torch.empty & co. return NaN-filled memory (deterministic mode fills it), so outputs a
    kernel leaves unwritten, or scratch it reads before writing, fail the comparisons."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4, dtype=torch.float64)).all()
    yield
    torch.use_deterministic_algorithms(was_det)
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
