"""Pure-PyTorch reference of every hot path: the specification (docs/MATH.md) in code.

Every function here works in float64, is differentiable with plain autograd, and is the oracle
that each fast backend is tested against. Nothing here is tuned beyond what keeps tests and
benchmarks practical (chunked matrix products instead of per-token loops).
"""

from .cms import cms_update_reference
from .cross_entropy import linear_cross_entropy_reference
from .dgd import dgd_update_reference
from .selfmod import selfmod_projection_reference
from .titan import titan_mlp_reference, titan_update_reference

__all__ = [
    "cms_update_reference",
    "dgd_update_reference",
    "linear_cross_entropy_reference",
    "selfmod_projection_reference",
    "titan_update_reference",
    "titan_mlp_reference",
]
