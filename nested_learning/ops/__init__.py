"""The public op API (docs/MATH.md). Every op picks its backend per call: `backend=`,
`use_backend(name)` or NL_BACKEND force one; otherwise the fastest available runs."""

from ..checks import NonFiniteInputError, check_finite
from ..reference.cms import FUSED_OPTIMIZERS, INNER_OPTIMIZERS
from ._backend import (
    BACKEND_ORDER,
    BackendUnavailableError,
    available_backends,
    last_backend,
    registered_backends,
    use_backend,
)
from .cms import CMSState, CMSUpdate, cms_update
from .cross_entropy import linear_cross_entropy
from .dgd import dgd_update
from .selfmod import selfmod_projection
from .titan import titan_chunk_scan, titan_mlp_update, titan_update

OPS = ("dgd_update", "selfmod_projection", "titan_update", "titan_mlp_update", "cms_update", "linear_cross_entropy")

__all__ = [
    "BACKEND_ORDER",
    "OPS",
    "BackendUnavailableError",
    "CMSState",
    "CMSUpdate",
    "FUSED_OPTIMIZERS",
    "INNER_OPTIMIZERS",
    "NonFiniteInputError",
    "available_backends",
    "check_finite",
    "cms_update",
    "dgd_update",
    "last_backend",
    "linear_cross_entropy",
    "registered_backends",
    "selfmod_projection",
    "titan_chunk_scan",
    "titan_mlp_update",
    "titan_update",
    "use_backend",
]
