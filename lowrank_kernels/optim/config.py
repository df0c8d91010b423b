"""The hyper-parameters every optimizer of this package shares, and their one validation.

Each optimizer's constructor keeps its explicit keyword signature (and its own defaults:
``eps`` and ``scale`` differ per method) and hands its arguments to
:meth:`OptimizerConfig.from_arguments`, which takes the shared keywords (:data:`SHARED_KEYS`)
from them; :meth:`OptimizerConfig.defaults` then gives the param-group defaults (these keys
plus the method's own). A constructor that lacks a shared keyword must say so
(``from_arguments(locals(), betas=None)``), so the signatures cannot drift apart unnoticed.

The values are checked per param group, when the group is added (a group may override any
key), by :func:`validate` (Adam-style groups) or the single checks it is made of: every
message names the optimizer, the param group and the key (``err`` builds the prefix), and
nothing is added when a check fails.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from . import moments

Err = Callable[[str], str]


@dataclass(frozen=True)
class OptimizerConfig:
    """The shared hyper-parameters (the defaults below are GaLoreAdamW's; each constructor
    passes its own)."""

    lr: Any = 1e-3
    betas: Optional[Tuple[float, float]] = (0.9, 0.999)  # None: the optimizer has no betas (Adafactor)
    eps: Any = 1e-6
    weight_decay: float = 0.0
    rank: Optional[int] = None
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    skip_nonfinite: bool = True
    foreach: Optional[bool] = None
    moment_dtype: str = "float32"
    moment_bits: int = 32
    block_size: int = 256
    min_8bit_size: int = 4096

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], **absent: Any) -> "OptimizerConfig":
        """The shared keywords of a constructor's ``arguments`` (its ``locals()``). Keys the
        constructor does not take are given in ``absent``; any other missing key raises
        ``TypeError`` (a constructor that forgot a shared keyword)."""
        values = {}
        for name in SHARED_KEYS:
            if name in absent:
                values[name] = absent[name]
            elif name in arguments:
                values[name] = arguments[name]
            else:
                raise TypeError(f"OptimizerConfig.from_arguments: the constructor lacks the shared keyword {name!r}")
        return cls(**values)

    def defaults(self, **extra: Any) -> Dict[str, Any]:
        """The param-group defaults: the shared keys (``betas`` only when the optimizer has
        them), then the method's own ``extra`` keys."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["betas"] is None:
            del out["betas"]
        out.update(extra)
        return out


#: the shared keyword names, in signature order.
SHARED_KEYS: Tuple[str, ...] = tuple(f.name for f in fields(OptimizerConfig))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------- single checks
def check_lr(group: Mapping[str, Any], err: Err) -> None:
    """``lr`` a float >= 0; a 0-dim floating tensor on the parameters' device only with
    ``capturable=True`` (its value is read once, here)."""
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor):
        if not group.get("capturable", False):
            raise TypeError(err("a Tensor lr is supported only with capturable=True; pass a float"))
        devices = {p.device for p in group["params"]}
        if lr.dim() != 0 or not lr.is_floating_point() or (devices and {lr.device} != devices):
            raise ValueError(err(f"a Tensor lr must be a 0-dim floating tensor on the parameters' device, got "
                                 f"{lr.dtype} of shape {tuple(lr.shape)} on {lr.device}"))
        if not float(lr) >= 0.0:
            raise ValueError(err(f"lr must be >= 0, got {float(lr)}"))
    elif not _is_real(lr) or not lr >= 0.0:
        raise ValueError(err(f"lr must be a float >= 0, got {lr!r}"))


def check_betas(group: Mapping[str, Any], err: Err) -> None:
    """``betas`` a pair of floats in [0, 1)."""
    betas = group.get("betas")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) for b in betas)):
        raise ValueError(err(f"betas must be a pair of floats, got {betas!r}"))
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(err(f"betas[{i}] must be in [0, 1), got {b}"))


def check_eps(group: Mapping[str, Any], err: Err) -> None:
    """``eps`` a float >= 0."""
    eps = group.get("eps")
    if not _is_real(eps) or not eps >= 0.0:
        raise ValueError(err(f"eps must be a float >= 0, got {eps!r}"))


def check_weight_decay(group: Mapping[str, Any], err: Err) -> None:
    """``weight_decay`` a float >= 0."""
    wd = group.get("weight_decay")
    if not _is_real(wd) or not wd >= 0.0:
        raise ValueError(err(f"weight_decay must be a float >= 0, got {wd!r}"))


def check_flags(group: Mapping[str, Any], err: Err) -> None:
    """``skip_nonfinite`` a bool, ``foreach`` None or a bool."""
    skip = group.get("skip_nonfinite", True)
    if not isinstance(skip, bool):
        raise TypeError(err(f"skip_nonfinite must be a bool, got {skip!r}"))
    foreach = group.get("foreach")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(err(f"foreach must be None or a bool, got {foreach!r}"))


def check_lowrank(group: Mapping[str, Any], err: Err, *, proj_types: Sequence[str], min_rank: int) -> None:
    """The keys of a low-rank group: ``rank`` (when set) an int >= ``min_rank``,
    ``update_proj_gap`` an int >= 1, ``scale`` a finite float > 0, ``proj_type`` in ``proj_types``.
    (The per-parameter checks, e.g. ``rank <= min(m, n)``, are the optimizer's.)"""
    rank = group.get("rank")
    if rank is not None and (not _is_int(rank) or rank < min_rank):
        raise ValueError(err(f"rank must be an int >= {min_rank}, got {rank!r}"))
    gap = group.get("update_proj_gap")
    if not _is_int(gap) or gap < 1:
        raise ValueError(err(f"update_proj_gap must be an int >= 1, got {gap!r}"))
    scale = group.get("scale")
    if not _is_real(scale) or not math.isfinite(scale) or not scale > 0:
        raise ValueError(err(f"scale must be a finite float > 0, got {scale!r}"))
    proj_type = group.get("proj_type")
    if proj_type not in proj_types:
        raise ValueError(err(f"proj_type must be one of {', '.join(map(repr, proj_types))}, got {proj_type!r}"))


def validate(group: Mapping[str, Any], err: Err) -> None:
    """The shared keys of an Adam-style group but the low-rank ones (:func:`check_lowrank`,
    low-rank groups only): ``lr``, ``betas``, ``eps``, ``weight_decay``, ``skip_nonfinite``,
    ``foreach`` and the moment format (:func:`lowrank_kernels.optim.moments.validate`)."""
    check_lr(group, err)
    check_betas(group, err)
    check_eps(group, err)
    check_weight_decay(group, err)
    check_flags(group, err)
    moments.validate(group, err)


__all__ = ["OptimizerConfig", "SHARED_KEYS", "validate", "check_lr", "check_betas", "check_eps",
           "check_weight_decay", "check_flags", "check_lowrank"]
