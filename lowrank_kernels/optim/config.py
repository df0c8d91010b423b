"""The hyper-parameters every optimizer of this package shares, and their one validation.

The shared keywords (:data:`SHARED_KEYS`) are written once, here. An optimizer's
constructor writes only its own arguments and takes the shared ones through
``**options``; :func:`shared_signature` gives it the full signature (``lr``, ``betas``,
``eps``, ``weight_decay`` after ``params``, positional as in ``torch.optim.AdamW``, the
low-rank and moment-format keywords keyword-only, with the method's own defaults:
``eps`` and ``scale`` differ per method), which ``inspect.signature``, ``help()`` and the
optimizer registry read, and refuses unknown keywords with ``TypeError``.
:meth:`OptimizerConfig.from_arguments` takes the shared values from the constructor's
arguments; :meth:`OptimizerConfig.defaults` then gives the param-group defaults (these
keys plus the method's own). A constructor without a shared keyword says so
(``absent=("betas",)``), so no signature can drift from the others unnoticed.

The values are checked per param group, when the group is added (a group may override any
key), by :func:`validate` (Adam-style groups) or the single checks it is made of: every
message names the optimizer, the param group and the key (``err`` builds the prefix), and
nothing is added when a check fails.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, TypedDict

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
    refresh_sharing: str = "owner"

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], **absent: Any) -> "OptimizerConfig":
        """The shared keywords of a constructor's ``arguments`` (its ``locals()``, where the
        ``options`` mapping of a :func:`shared_signature` constructor counts as arguments).
        Keys the constructor does not take are given in ``absent``; any other missing key
        raises ``TypeError`` (a constructor that forgot a shared keyword)."""
        arguments = dict(arguments, **arguments.get("options", {}))
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
#: the shared keywords that follow ``params`` positionally (torch.optim.AdamW's order).
POSITIONAL_KEYS: Tuple[str, ...] = ("lr", "betas", "eps", "weight_decay")


class SharedOptions(TypedDict, total=False):
    """The shared keywords a constructor takes through ``**options`` (for type checkers)."""

    lr: float
    betas: Tuple[float, float]
    eps: float
    weight_decay: float
    rank: Optional[int]
    update_proj_gap: int
    scale: float
    proj_type: str
    skip_nonfinite: bool
    foreach: Optional[bool]
    moment_dtype: str
    moment_bits: int
    block_size: int
    min_8bit_size: int
    refresh_sharing: str


def shared_signature(*, absent: Sequence[str] = (), **defaults: Any) -> Callable:
    """Decorator of an optimizer's ``__init__(self, params, <own args>, **options)``: the
    shared keywords become part of its signature.

    The written signature keeps its own arguments; every shared key it does not write (and
    that is not in ``absent``) is added, with the default from ``defaults`` or else
    :class:`OptimizerConfig`'s: :data:`POSITIONAL_KEYS` right after ``params`` (so
    ``GaLoreAdamW(params, 1e-3)`` works as for torch.optim.AdamW), the others keyword-only
    at the end. A call binds against that signature (an unknown or repeated keyword raises
    ``TypeError``, as for any Python function), fills the defaults, and passes the shared
    keys in ``options``.
    """
    unknown = set(defaults) - set(SHARED_KEYS)
    if unknown:
        raise TypeError(f"shared_signature: not shared keywords: {sorted(unknown)}")
    base = OptimizerConfig()
    # annotations as text, like those of the written parameters (postponed evaluation)
    hints = {k: getattr(v, "__forward_arg__", v) for k, v in SharedOptions.__annotations__.items()}

    def wrap(init: Callable) -> Callable:
        written = inspect.signature(init)
        params = list(written.parameters.values())
        if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"shared_signature: {init.__qualname__} must end in **options")
        own = params[:-1]
        names = {q.name for q in own}

        def shared(keys, kind):
            return [inspect.Parameter(k, kind, default=defaults.get(k, getattr(base, k)), annotation=hints[k])
                    for k in keys if k not in names and k not in absent]

        positional = [q for q in own if q.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        keyword = [q for q in own if q.kind is inspect.Parameter.KEYWORD_ONLY]
        full = written.replace(parameters=(
            positional[:2] + shared(POSITIONAL_KEYS, inspect.Parameter.POSITIONAL_OR_KEYWORD) + positional[2:]
            + keyword + shared([k for k in SHARED_KEYS if k not in POSITIONAL_KEYS], inspect.Parameter.KEYWORD_ONLY)))
        own_names = [q.name for q in own]

        @functools.wraps(init)
        def __init__(*args: Any, **kwargs: Any) -> None:
            try:
                bound = full.bind(*args, **kwargs)
            except TypeError as e:  # name the constructor, as Python does for a written signature
                raise TypeError(f"{init.__qualname__}() {e}") from None
            bound.apply_defaults()
            values = bound.arguments
            init(**{k: values[k] for k in own_names}, **{k: v for k, v in values.items() if k not in names})

        __init__.__signature__ = full  # type: ignore[attr-defined]
        return __init__

    return wrap


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


#: values of ``refresh_sharing`` (see :mod:`lowrank_kernels.optim.refresh_share`).
REFRESH_SHARING = ("owner", "replicate")


def check_flags(group: Mapping[str, Any], err: Err) -> None:
    """``skip_nonfinite`` a bool, ``foreach`` None or a bool, ``refresh_sharing`` one of
    :data:`REFRESH_SHARING`."""
    skip = group.get("skip_nonfinite", True)
    if not isinstance(skip, bool):
        raise TypeError(err(f"skip_nonfinite must be a bool, got {skip!r}"))
    foreach = group.get("foreach")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(err(f"foreach must be None or a bool, got {foreach!r}"))
    sharing = group.get("refresh_sharing", "owner")
    if sharing not in REFRESH_SHARING:
        raise ValueError(err(f"refresh_sharing must be one of {', '.join(map(repr, REFRESH_SHARING))}, "
                             f"got {sharing!r}"))


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


__all__ = ["OptimizerConfig", "SHARED_KEYS", "SharedOptions", "shared_signature", "validate", "check_lr", "check_betas", "check_eps",
           "check_weight_decay", "check_flags", "check_lowrank"]
