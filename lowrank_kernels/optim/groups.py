"""Splitting a model's parameters into a low-rank group and a plain group."""
from __future__ import annotations

import inspect
from typing import Any, Dict, FrozenSet, List, Optional, Sequence

import torch
from torch import nn

#: the last component of a module name that marks an output head (a Linear named so is plain).
HEAD_NAMES: FrozenSet[str] = frozenset({"lm_head", "output", "head", "classifier", "embed_out"})


def group_keys() -> FrozenSet[str]:
    """The param-group keys the optimizers of this package know: every constructor keyword
    (``params`` aside) of the classes in :mod:`~lowrank_kernels.optim.registry`, so the set
    follows the constructors."""
    from . import registry

    keys = set()
    for spec in registry.OPTIMIZERS.values():
        sig = inspect.signature(spec.cls.__init__)
        keys.update(k for k, v in sig.parameters.items()
                    if k not in ("self", "params") and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD))
    return frozenset(keys)


def _excluded(model: nn.Module) -> Dict[int, str]:
    """``id(parameter) -> why`` for the embeddings and the output head (see
    :func:`lowrank_param_groups`)."""
    out: Dict[int, str] = {}
    embed_shapes = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            out[id(module.weight)] = "embedding"
            embed_shapes.add(tuple(module.weight.shape))
            embed_shapes.add(tuple(module.weight.shape)[::-1])
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in out:
            continue
        if name.rpartition(".")[2] in HEAD_NAMES:
            out[id(module.weight)] = "output head"
    for name, p in model.named_parameters(recurse=True):
        top_level = name.count(".") <= 1  # a parameter of the model or of one of its children
        if top_level and p.dim() == 2 and tuple(p.shape) in embed_shapes and id(p) not in out:
            out[id(p)] = "output head"
    return out


def lowrank_param_groups(
    model: nn.Module,
    target_modules: Optional[Sequence[str]] = None,
    rank: Optional[int] = None,
    update_proj_gap: Optional[int] = None,
    scale: Optional[float] = None,
    **extra: Any,
) -> List[Dict[str, Any]]:
    """Param groups for the low-rank optimizers: every 2-D weight matrix projected, except
    the embeddings and the output head (what galore-torch users call "all linear layers").

    The low-rank group holds every parameter of ``model`` that requires grad, is 2-D and is
    neither an embedding nor the output head: ``nn.Linear`` weights, and raw 2-D
    ``nn.Parameter`` matrices such as ``nn.MultiheadAttention.in_proj_weight``. With
    ``rank`` given, a weight with ``min(m, n) <= rank`` stays plain.

    - **embeddings**: the weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules and every
      parameter tied to one (the same tensor, e.g. a tied LM head);
    - **the output head**: the weight of an ``nn.Linear`` whose own name (last component of
      its qualified name) is one of :data:`HEAD_NAMES` (``lm_head``, ``output``, ``head``,
      ``classifier``, ``embed_out``), and a 2-D parameter of the model or of one of its
      direct children whose shape is an embedding's, ``(vocab, d)`` or ``(d, vocab)``.

    ``target_modules`` narrows the selection to the parameters whose module's qualified name
    contains one of these substrings (``("attn", "mlp")``: the GaLore / APOLLO scripts'
    choice); None (default) keeps every eligible weight.

    The low-rank group carries ``rank``, ``update_proj_gap``, ``scale`` when they are not
    None (the optimizer's defaults fill the rest) and every ``extra`` key: a param-group key
    an optimizer of this package knows (a constructor keyword of a registered optimizer:
    ``proj_type``, ``density``, ``scale_type``, ...); any other keyword is a ``TypeError``.
    Every other parameter that requires grad goes to the plain group, marked ``rank=None`` and
    ``density=None`` so that every optimizer of this package treats it as plain AdamW. Empty
    groups are left out; tied (shared) parameters appear once.

    Example::

        groups = lowrank_param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
        opt = GaLoreAdamW(groups, lr=1e-2)
        print(opt.summary(model.named_parameters()))  # what is projected
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowrank_param_groups: model must be an nn.Module, got {type(model).__name__}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"lowrank_param_groups: rank must be an int >= 1 or None, got {rank!r}")
    if extra:
        known = group_keys()
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise TypeError(
                f"lowrank_param_groups() got an unexpected keyword argument {unknown[0]!r} (not a param-group key "
                f"of any optimizer of lowrank_kernels.optim; known: {', '.join(sorted(known))})")
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    excluded = _excluded(model)
    lowrank: List[torch.Tensor] = []
    seen = set()
    from .distributed import flat_parameter_error

    for name, w in model.named_parameters():
        reason = flat_parameter_error(w)
        if reason is not None:  # not a plain parameter: its matrices are hidden in one flat buffer
            raise ValueError(f"lowrank_param_groups: parameter {name!r} {reason}")
        module_name = name.rpartition(".")[0]
        if id(w) in excluded or not w.requires_grad or w.dim() != 2:
            continue
        if target_modules is not None and not any(t in module_name for t in target_modules):
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
