"""torchtitan: this package's optimizers in a torchtitan job (tested with torchtitan 0.3.0).

torchtitan builds its optimizers through ``OptimizersContainer`` from
``ParamGroupConfig(pattern, optimizer_name, optimizer_kwargs)`` entries (first matching
pattern wins, one optimizer per name and model part). :class:`LowRankOptimizersContainer`
is that container with this package's names added (registry names, their Hugging Face
spellings, or class names: ``"galore"``, ``"galore_adamw"``, ``"GaLoreAdamW"``, ...);
:func:`lowrank_optimizer_config` writes the usual two groups (the target weights
projected, everything else plain AdamW in the same optimizer)::

    from lowrank_kernels.integrations.torchtitan import lowrank_optimizer_config

    trainer_config = Trainer.Config(
        ...,
        optimizer=lowrank_optimizer_config(
            "GaLoreAdamW", lr=3e-4, weight_decay=0.1, rank=128, update_proj_gap=200, scale=0.25,
            projector="lowrank", target_modules=("attention", "feed_forward"), moment_bits=8),
    )

torchtitan's LR schedulers (``LRSchedulersContainer``, ``LambdaLR`` over every group) and
its DCP checkpointing (``CheckpointManager``: FQN-keyed flat optimizer state) work
unchanged: moments are saved sharded under FSDP2, projectors and step counts as
replicated tensors. One difference from torchtitan's own container: before a checkpoint
is saved or loaded with no optimizer state yet, torchtitan creates the state with one
zero-gradient, ``lr = 0`` step (``init_optim_state``), which would make a projector from
a zero gradient and count a step; this container calls
:meth:`~lowrank_kernels.optim.base.LowRankOptimizer.init_state` instead (placeholder
projectors, step 0: the first real step refreshes, as without a checkpoint).

torchtitan's ``implementation`` setting (``fused`` / ``foreach`` group keys for torch's
optimizers) is not passed to this package's optimizers, which keep their own defaults
(the bucketed multi-tensor step).

Only what this module's functions and its container use imports torchtitan (on first
use), so ``import lowrank_kernels.integrations.torchtitan`` works without it.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence

from lowrank_kernels.optim import registry as _registry

#: torchtitan's group keys that configure torch's own optimizers (``implementation``).
_TORCH_IMPL_KEYS = ("fused", "foreach")
#: what ``projector`` sets, per registry name.
_PROJECTOR_KEY = {"galore": "svd", "qgalore": "svd", "gradnormlorp": "svd", "adafactor": "svd", "frugal": "projection"}


def spec_for_name(name: str) -> Optional[_registry.OptimizerSpec]:
    """The registry entry of one of this package's optimizers named ``name`` (registry
    name, alias or class name), or None when ``name`` is none of them."""
    for n in _registry.names(lowrank=True):
        spec = _registry.get(n)
        if name == spec.name or name in spec.aliases or (name == spec.cls_name and spec.constructor is None):
            return spec
    return None


def optimizer_factory(name: str) -> Callable[..., Any]:
    """``factory(param_groups, **kwargs)`` building this package's optimizer ``name`` the way
    torchtitan's container calls its factories (torchtitan's ``fused`` / ``foreach`` group
    keys dropped). Raises ``ValueError`` for an unknown name."""
    spec = spec_for_name(name)
    if spec is None:
        known = ", ".join(_registry.get(n).cls_name if _registry.get(n).constructor is None else n
                          for n in _registry.names(lowrank=True))
        raise ValueError(f"lowrank_kernels: no optimizer named {name!r}; known: {known}")

    def factory(param_groups: List[Dict[str, Any]], **kwargs: Any):
        groups = [{k: v for k, v in g.items() if k not in _TORCH_IMPL_KEYS} for g in param_groups]
        build = getattr(spec.cls, spec.constructor) if spec.constructor else spec.cls
        return build(groups, **{**spec.settings, **kwargs})

    factory.__name__ = f"build_{spec.name}"
    return factory


def target_pattern(target_modules: Sequence[str]) -> str:
    """The ``ParamGroupConfig`` pattern of the weights of the modules under any of
    ``target_modules`` (FQN components, e.g. ``("attention", "feed_forward")`` matches
    ``layers.0.attention.wqkv.weight`` but not ``layers.0.attention_norm.weight``)."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules must be non-empty module names, got {target_modules!r}")
    alts = "|".join(re.escape(t) for t in target_modules)
    return rf"(?:^|\.)(?:{alts})\.(?:[^.]+\.)*weight$"


def lowrank_optimizer_config(name: str, *, lr: float, rank: Optional[int] = None, update_proj_gap: int = 200,
                             scale: Optional[float] = None, proj_type: str = "std", projector: Optional[str] = None,
                             target_modules: Sequence[str] = ("attention", "feed_forward"),
                             moment_bits: int = 32, density: Optional[float] = None, **kwargs: Any):
    """A ``LowRankOptimizersContainer.Config`` for a torchtitan job: the weights under
    ``target_modules`` projected by optimizer ``name``, every other parameter plain AdamW
    in the same optimizer.

    ``rank`` (``density`` for FRUGAL), ``update_proj_gap``, ``scale``, ``proj_type`` and
    ``moment_bits`` are the optimizer's keys; ``projector`` picks the projector where the
    optimizer has a choice (GaLore-family ``svd``: ``"exact"`` / ``"lowrank"``; FRUGAL
    ``projection``). ``lr`` and ``kwargs`` (``weight_decay``, ``betas``, ``eps``,
    ``refresh_sharing``, ...) apply to both groups.
    """
    from torchtitan.components.optimizer import ParamGroupConfig

    spec = spec_for_name(name)
    if spec is None:
        optimizer_factory(name)  # raises, naming the known ones
    low: Dict[str, Any] = {"lr": lr, "update_proj_gap": update_proj_gap, "proj_type": proj_type,
                           "moment_bits": moment_bits, **kwargs}
    if spec.subspace == "density":
        if density is None:
            raise ValueError(f"{name}: pass density (the share of each weight's rows or columns kept)")
        low["density"] = density
    else:
        if rank is None:
            raise ValueError(f"{name}: pass rank")
        low["rank"] = rank
    if scale is not None:
        low["scale"] = scale
    if projector is not None:
        key = _PROJECTOR_KEY.get(spec.name)
        if key is None:
            raise ValueError(f"{name}: projector={projector!r}: this optimizer has no projector choice")
        low[key] = projector
    plain: Dict[str, Any] = {"lr": lr, "rank": None, **kwargs}
    if spec.subspace == "density":
        plain["density"] = None
    cls = _container_class()
    return cls.Config(param_groups=[
        ParamGroupConfig(pattern=target_pattern(target_modules), optimizer_name=name, optimizer_kwargs=low),
        ParamGroupConfig(pattern=r".*", optimizer_name=name, optimizer_kwargs=plain),
    ])


_CONTAINER = None


def _container_class():
    """``LowRankOptimizersContainer``, defined on first use (it subclasses torchtitan's)."""
    global _CONTAINER
    if _CONTAINER is not None:
        return _CONTAINER
    from dataclasses import dataclass

    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.components.optimizer.utils import (get_flat_optim_state_dict, init_optim_state,
                                                       load_flat_optim_state_dict)

    from lowrank_kernels.optim.base import LowRankOptimizer

    def _init(optim) -> None:
        if isinstance(optim, LowRankOptimizer):
            optim.init_state()  # placeholder projectors, step 0: no projector from a zero gradient
        else:
            init_optim_state(optim)

    class LowRankOptimizersContainer(OptimizersContainer):
        """torchtitan's ``OptimizersContainer`` that also builds this package's optimizers
        (any name :func:`spec_for_name` knows) and creates their state for checkpointing
        with ``init_state()`` instead of a zero-gradient step."""

        @dataclass(kw_only=True, slots=True)
        class Config(OptimizersContainer.Config):
            """``OptimizersContainer.Config``; ``ParamGroupConfig.optimizer_name`` may also name
            this package's optimizers."""

        @staticmethod
        def _resolve_optimizer_factory(name: str):
            if spec_for_name(name) is not None:
                return optimizer_factory(name)
            return OptimizersContainer._resolve_optimizer_factory(name)

        def state_dict(self) -> Dict[str, Any]:
            result: Dict[str, Any] = {}
            for optim in self.optimizers:
                _init(optim)
                result.update(get_flat_optim_state_dict(optim))
            return result

        def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
            for optim in self.optimizers:
                _init(optim)
                load_flat_optim_state_dict(optim, state_dict)

    LowRankOptimizersContainer.__module__ = __name__
    _CONTAINER = LowRankOptimizersContainer
    return _CONTAINER


def __getattr__(name: str):
    if name == "LowRankOptimizersContainer":
        return _container_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LowRankOptimizersContainer", "lowrank_optimizer_config", "optimizer_factory", "spec_for_name",
           "target_pattern"]
