"""Low-rank gradient optimizers on the fused ``lowrank_kernels.ops`` kernels.

All are ``torch.optim.Optimizer`` subclasses sharing :class:`LowRankOptimizer`
(``base.py``). Param groups use galore-torch's keys (``rank``, ``update_proj_gap``,
``scale``, ``proj_type``); a group without ``rank`` is plain AdamW.
"""
from .base import LowRankOptimizer, resolve_side  # noqa: F401
from .galore import GaLoreAdamW  # noqa: F401

__all__ = ["LowRankOptimizer", "GaLoreAdamW", "resolve_side"]
