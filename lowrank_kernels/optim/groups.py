"""Splitting a model's parameters into a low-rank group and a plain group."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn


def lowrank_param_groups(
    model: nn.Module,
    target_modules: Optional[Sequence[str]] = ("attn", "mlp"),
    rank: Optional[int] = None,
    update_proj_gap: Optional[int] = None,
    scale: Optional[float] = None,
    **extra: Any,
) -> List[Dict[str, Any]]:
    """Param groups for the low-rank optimizers, the way the GaLore / APOLLO scripts build them.

    The low-rank group holds the weights of the ``nn.Linear`` modules whose qualified
    name contains one of ``target_modules`` (all Linear modules when it is None),
    that require grad, are 2-D and, when ``rank`` is given, have
    ``min(m, n) > rank``. It carries ``rank``, ``update_proj_gap``, ``scale`` when
    they are not None (the optimizer's defaults fill the rest) and every ``extra``
    key (``proj_type``, ``density``, ``scale_type``, ...). Every other parameter that
    requires grad goes to the plain group, marked ``rank=None`` and ``density=None``
    so that every optimizer of this package treats it as plain AdamW. Empty groups
    are left out; tied (shared) parameters appear once.

    Example::

        groups = lowrank_param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
        opt = GaLoreAdamW(groups, lr=1e-2)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowrank_param_groups: model must be an nn.Module, got {type(model).__name__}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"lowrank_param_groups: rank must be an int >= 1 or None, got {rank!r}")
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    lowrank: List[torch.Tensor] = []
    seen = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if target_modules is not None and not any(t in name for t in target_modules):
            continue
        w = module.weight
        if id(w) in seen or not w.requires_grad or w.dim() != 2:
            continue
        if rank is not None and min(w.shape) <= rank:
            continue
        seen.add(id(w))
        lowrank.append(w)
    plain: List[torch.Tensor] = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            plain.append(p)
    groups: List[Dict[str, Any]] = []
    if lowrank:
        group: Dict[str, Any] = {"params": lowrank}
        for key, value in (("rank", rank), ("update_proj_gap", update_proj_gap), ("scale", scale)):
            if value is not None:
                group[key] = value
        group.update(extra)
        groups.append(group)
    if plain:
        groups.append({"params": plain, "rank": None, "density": None})
    return groups
