"""nested_learning: Nested Learning (HOPE, self-modifying Titans, CMS) for PyTorch.

`nested_learning.ops` holds the hot paths (docs/MATH.md), each with a pure-PyTorch reference
backend and fast backends where built; `build_info()` says how the extension was built or why
it is missing.
"""

__version__ = "0.2.0"

from . import ops  # noqa: E402
from ._extension import build_info, extension_available  # noqa: E402

__all__ = ["__version__", "build_info", "extension_available", "ops"]
