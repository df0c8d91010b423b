"""The checks :meth:`LowRankOptimizer.load_state_dict` makes before it loads anything: the
state was saved by an optimizer of this kind with the same projection, and every saved
8-bit moment has its absmax (each refusal a ``ValueError`` naming the parameter); then how
the loaded tensors are placed and their moments converted to the group's format."""
from __future__ import annotations

from typing import Any, Dict

import torch

from . import distributed as _dist
from . import moments, report
from .moments import MOMENT_BITS_DEFAULTS

#: group keys a saved param group may lack (this optimizer's values are kept or defaulted).
OPTIONAL_SAVED_KEYS = frozenset({*MOMENT_BITS_DEFAULTS, "moment_dtype", "capturable", "compat", "foreach",
                                  "skip_nonfinite", "names"})


def _saved_groups(opt, state_dict):
    """``(index, saved group, group, saved state)`` per param group, in order, while the saved
    groups match this optimizer's in number and size; where they stop matching (or the state
    dict is malformed) nothing more is yielded: torch's ``load_state_dict`` reports it."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        return
    saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        return
    for gi, (sg, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if not isinstance(sg, dict) or len(sg.get("params", ())) != len(group["params"]):
            return
        yield gi, sg, group, saved_state


def check_saved_state(opt, state_dict) -> None:
    """Before anything is loaded: the state was saved by an optimizer of this kind with
    the same projection, else a ``ValueError`` naming the parameter and the mismatch.

    Refused: param groups that lack this optimizer's keys or carry another optimizer's
    (``torch.optim.AdamW``, another method), a low-rank parameter whose saved state is
    plain AdamW (no projection side) or the reverse, and a changed ``rank`` / ``density``.
    Moment formats may differ (they are converted)."""
    from .groups import group_keys
    from .registry import ctor_defaults

    name = type(opt).__name__
    known = group_keys()
    own = set(ctor_defaults(type(opt)))  # this optimizer's own keys (torch may add others)
    for gi, sg, group, saved_state in _saved_groups(opt, state_dict):
        where = lambda pi: (f"{name}.load_state_dict: "  # noqa: E731
                            + (report.param_name(opt, group, group["params"][pi]) if group["params"]
                               else f"param group {gi}"))
        missing = sorted(k for k in opt.defaults
                         if k in own and k not in sg and k not in OPTIONAL_SAVED_KEYS)
        foreign = sorted(k for k in sg if k in known and k not in group and k not in OPTIONAL_SAVED_KEYS)
        if missing or foreign:
            what = "; ".join(x for x in (
                f"it lacks {', '.join(map(repr, missing))}" if missing else "",
                f"it has {', '.join(map(repr, foreign))}, which {name} does not take" if foreign else "") if x)
            raise ValueError(f"{where(0)}: the state was saved by another optimizer ({what}); load a state "
                             f"saved by {name} with the same param groups")
        for key in ("rank", "density"):
            if key in sg and key in group and sg[key] != group[key]:
                raise ValueError(f"{where(0)}: {key} changed: saved {sg[key]!r}, this optimizer "
                                 f"{group[key]!r}; the saved moments and projector have the saved {key}")
        low = opt._is_lowrank(group)
        for pi, saved_id in enumerate(sg["params"]):
            st = saved_state.get(saved_id)
            p = group["params"][pi]
            if not st:
                continue
            projected_saved = "side" in st
            projected_now = low and p.dim() == 2 and not opt._capturable_plain(p, group)
            if projected_now and not projected_saved:
                raise ValueError(f"{where(pi)}: the saved state is plain AdamW (no projection side), but "
                                 f"{name} projects this parameter at rank "
                                 f"{opt._group_rank(group, tuple(p.shape))}")
            if projected_saved and not projected_now:
                raise ValueError(f"{where(pi)}: the saved state is projected, but this parameter is in a "
                                 "plain group (rank=None) here")


def check_saved_moments(opt, state_dict) -> None:
    """Before anything is loaded: every saved 8-bit moment has its absmax
    (:func:`lowrank_kernels.optim.moments.check_saved`), else a ``ValueError`` naming the
    parameter."""
    for gi, sg, group, saved_state in _saved_groups(opt, state_dict):
        bs = int(sg.get("block_size", 256))
        for pi, saved_id in enumerate(sg["params"]):
            moments.check_saved(saved_state.get(saved_id) or {}, bs, opt.moment_keys,
                                f"{type(opt).__name__}.load_state_dict: param group {gi}, parameter {pi}")


def convert_moments(opt, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any],
                     saved_block_size: int) -> None:
    """Bring loaded moments (:attr:`moment_keys`) to the group's format; DTensor (FSDP2)
    state is left as loaded."""
    keys = [k for k, _ in opt.moment_keys if isinstance(state.get(k), torch.Tensor)]
    if not keys or any(_dist.is_dtensor(state[k]) for k in keys):
        return
    moments.convert(state, moments.format_of(group), param_dtype=p.dtype, saved_block_size=saved_block_size,
                    moment_keys=opt.moment_keys)


def load_value(opt, p: torch.Tensor, key: str, value, capturable: bool = False):
    """A saved state tensor placed for ``p``: ``step`` on ``p``'s device (float32) in a
    capturable group, the other :attr:`host_state_keys` (and ``step`` otherwise) on the
    CPU, the rest on ``p``'s device; dtypes kept."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step" and capturable:
        return value.detach().to(device=p.device, dtype=torch.float32, copy=True)
    if key in opt.host_state_keys:
        return value.detach().to(device="cpu", copy=True)
    return value.detach().to(device=p.device, copy=True)
