"""Small functions the optimizer files share: the projection side, ``R`` in float32,
deterministic seeds, Adam's bias-corrected step size, in-place state writes. (Also importable from
:mod:`lowrank_kernels.optim.base`, their former home.)"""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch

from . import distributed as _dist

SIDE_NAMES = ("right", "left", "full")
SIDE_CODES = {name: code for code, name in enumerate(SIDE_NAMES)}
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
#: every ``compat`` value some optimizer of this package accepts (``LowRankOptimizer.compat_modes``).
COMPAT_MODES = ("galore-torch", "apollo-torch")


def resolve_side(shape: Tuple[int, int], proj_type: str) -> str:
    """The projection side of an ``m x n`` weight for a galore-torch ``proj_type``.

    ``std``: right when ``m >= n`` (projector ``r x n``), left otherwise, so the
    projector sits on the smaller side; ``reverse_std``: the opposite; ``left``,
    ``right``, ``full``: as named.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}; expected one of {', '.join(PROJ_TYPES)}")


def project_fp32(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """``R = G P^T`` (right) or ``P^T G`` (left) in float32 (float64 stays float64).

    For methods that need ``R`` itself (APOLLO's scaling, FRUGAL's residual); the
    plain GaLore step never materializes it.
    """
    acc = torch.float64 if torch.float64 in (grad.dtype, proj.dtype) else torch.float32
    g = grad.to(acc)
    p = proj.to(acc)
    if _dist.is_sharded(g):  # FSDP2 / tensor parallelism: low-rank-sized all-reduces at most
        return _dist.sharded_project(g, p, side)
    return g @ p.T if side == "right" else p.T @ g


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 finalizer)."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for part in parts:
        x = (x ^ (int(part) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def assign_(state: Dict[str, Any], key: str, value: torch.Tensor) -> torch.Tensor:
    """Store ``value`` as ``state[key]``, in place when it can be: ``state[key].copy_(value)``
    when a tensor of the same type, shape, strides, dtype and device (a DTensor: also the same
    mesh and placements) is already there, else ``state[key] = value``. Returns ``state[key]``.

    Projector refreshes store their new state through this, so after the first refresh (the
    one that creates the state) the tensors keep their storage (``data_ptr``) and a CUDA graph
    captured after it replays correctly across later refreshes. The values are exactly
    ``value``'s (a same-dtype copy).
    """
    old = state.get(key)
    if (isinstance(old, torch.Tensor) and old is not value and type(old) is type(value)
            and old.dtype == value.dtype and old.device == value.device and old.shape == value.shape
            and not old.requires_grad and not old.is_inference() and _same_layout(old, value)):
        old.copy_(value)
        return old
    state[key] = value
    return value


def _same_layout(old: torch.Tensor, new: torch.Tensor) -> bool:
    if _dist.is_dtensor(old):
        return old.device_mesh == new.device_mesh and old.placements == new.placements
    return old.stride() == new.stride()


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``: the bias-corrected step of the projected methods."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


__all__ = ["resolve_side", "project_fp32", "mix_seed", "adam_step_size", "assign_", "SIDE_NAMES", "SIDE_CODES", "PROJ_TYPES",
           "COMPAT_MODES"]
