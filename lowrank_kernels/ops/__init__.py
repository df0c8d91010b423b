"""Public kernels of lowrank_kernels, registered as ``torch.ops.lowrank_kernels.*``.

See ``_registry`` for how an op picks its backend (reference, C++, Triton), and
each family module for the ops it defines. Multi-tensor functions are named ``foreach_`` +
the single-tensor function's name (``foreach_adam_update_``, ``foreach_dct_score_topk``,
``foreach_project_update_backproject_``), as torch's ``_foreach_*``; the old names
``adam_foreach_update_`` and ``dct_foreach_score_topk`` are deprecated aliases.
"""
from ._registry import (  # noqa: F401
    BACKENDS,
    OPS,
    BackendUnavailableError,
    backend_table,
    forced_backend,
    resolve_backend,
    use_backend,
)
from .projection import (  # noqa: F401
    backproject_apply_,
    lowrank_shape,
    project,
    project_adam_,
    foreach_project_update_backproject_,
    project_update_backproject_,
    register_projector_type,
)
from .adam import adam_update_, foreach_adam_update_, moments8_zeros  # noqa: F401
from .adam import adam_foreach_update_  # noqa: F401  (deprecated alias of foreach_adam_update_)
from .apollo import foreach_apollo_update_  # noqa: F401
from .fira import foreach_fira_update_  # noqa: F401
from .frugal import foreach_frugal_update_  # noqa: F401
from .adafactor import foreach_adafactor_update_  # noqa: F401
from .gradnormlorp import foreach_gradnormlorp_update_  # noqa: F401
from .dct import DCTProjector, dct_basis, dct_project, dct_score_topk, dct_scores, foreach_dct_score_topk  # noqa: F401
from .dct import dct_foreach_score_topk  # noqa: F401  (deprecated alias of foreach_dct_score_topk)
from .residual import residual_apply_, residual_sumsq  # noqa: F401
from .orth import foreach_newton_schulz, newton_schulz  # noqa: F401
from .trion import foreach_trion_apply_, foreach_trion_orth_, foreach_trion_update_  # noqa: F401
from .quant import Int4Projector, int4_pack, int4_unpack, int8_dequantize, int8_quantize, int8_update_sr_  # noqa: F401

from lowrank_kernels import _ext as _ext_mod

# Load the C++ kernels (if built): the extension registers them as the CPU kernels of the
# private ops define_op defined (torch.ops._lowrank_kernels.<family>_<op>_cpu).
_ext_mod.load()
from . import dtensor  # noqa: E402,F401  (DTensor handlers, installed when a DTensor first steps)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "use_backend",
    "project",
    "project_adam_",
    "backproject_apply_",
    "project_update_backproject_",
    "adam_update_",
    "foreach_project_update_backproject_",
    "foreach_adam_update_",
    "foreach_apollo_update_",
    "foreach_fira_update_",
    "foreach_frugal_update_",
    "foreach_adafactor_update_",
    "foreach_gradnormlorp_update_",
    "moments8_zeros",
    "lowrank_shape",
    "DCTProjector",
    "dct_basis",
    "dct_scores",
    "dct_score_topk",
    "foreach_dct_score_topk",
    "dct_project",
    "residual_sumsq",
    "residual_apply_",
    "newton_schulz",
    "foreach_newton_schulz",
    "foreach_trion_update_",
    "foreach_trion_orth_",
    "foreach_trion_apply_",
]
__all__ += ["Int4Projector", "int4_pack", "int4_unpack", "int8_quantize", "int8_dequantize", "int8_update_sr_"]

from lowrank_kernels._deprecation import deprecated_names as _deprecated_names  # noqa: E402

# Old spelling, kept for one release (warns).
__getattr__ = _deprecated_names(__name__, {"low_rank_shape": "lowrank_shape"})
