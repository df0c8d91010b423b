"""lowrank_kernels: memory-efficient low-rank gradient optimizers on fused kernels.

``lowrank_kernels.ops`` holds the kernels (torch custom ops with reference, C++
and Triton backends); ``lowrank_kernels.optim`` the optimizers built on them.
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
