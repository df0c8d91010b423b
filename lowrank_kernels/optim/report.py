"""What an optimizer tells its user about its parameters: the selection warning at
construction (nothing or too little projected), :meth:`LowRankOptimizer.summary`, and the
one warning of a skipped non-finite gradient."""
from __future__ import annotations

import warnings

import torch

from .common import SIDE_NAMES, resolve_side
from .config import _is_int


def warn_selection(opt, plain_name: str = "plain AdamW", stacklevel: int = 4) -> None:
    """Warn (``UserWarning``) when no parameter is projected, or when fewer than half of
    the eligible 2-D weights are: a 2-D weight of a plain group is eligible when its
    smaller dimension exceeds the smallest rank of the low-rank groups."""
    name = type(opt).__name__
    groups = [g for g in opt.param_groups if g["params"]]
    low = [g for g in groups if opt._is_lowrank(g)]
    if not low:
        if not opt.__dict__.get("_rank_none_given"):
            fix = ("pass rank=... (lowrank_kernels.optim.lowrank_param_groups(model, rank=...) also leaves "
                   "the 1-D parameters, embeddings and output head plain)")
        else:
            size = "density" if opt.defaults.get("density") is not None else "rank"
            given = "" if opt.defaults.get(size) is None else f" ({size}={opt.defaults[size]!r} is overridden)"
            fix = (f"every param group sets rank=None{given}: lowrank_param_groups(model, rank=r) leaves a "
                   "weight plain when min(m, n) <= r or when it is outside target_modules, so use a smaller "
                   "rank or check target_modules")
        warnings.warn(f"{name}: no parameter group is low-rank, so every parameter gets {plain_name}; {fix}",
                      UserWarning, stacklevel=stacklevel)
        return
    ranks = [g["rank"] for g in low if _is_int(g.get("rank"))]
    floor = min(ranks) if ranks else 0
    projected = sum(1 for g in low for p in g["params"] if p.dim() == 2)
    low_ids = {id(g) for g in low}
    left = sum(1 for g in groups if id(g) not in low_ids
               for p in g["params"] if p.dim() == 2 and min(p.shape) > floor)
    if projected < (projected + left) / 2:
        warnings.warn(
            f"{name}: only {projected} of the {projected + left} 2-D weights that could be projected are in a "
            f"low-rank group ({left} 2-D weights with min(m, n) > {floor} are in groups with rank=None); "
            "lowrank_kernels.optim.lowrank_param_groups(model, rank=...) without target_modules projects every "
            "2-D weight but the embeddings and the output head (with the Hugging Face Trainer: "
            "optim_target_modules=\"all-linear\"); opt.summary() lists what is projected",
            UserWarning, stacklevel=stacklevel)

def summary(opt, named_parameters=None) -> str:
    """A table of the parameters: name, shape, projected or plain, rank, side and the
    bytes of the state (:func:`~lowrank_kernels.optim.registry.tensors_nbytes`).

    Names come from ``named_parameters`` (e.g. ``model.named_parameters()``), else from a
    group's ``names`` key (one name per parameter), else ``group<i>.<j>``. The side is
    the stored one once the parameter has stepped, else the one its shape and
    ``proj_type`` will give.
    """
    from .registry import _state_tensors, tensors_nbytes

    names = {}
    if named_parameters is not None:
        for n, p in (named_parameters.items() if isinstance(named_parameters, dict) else named_parameters):
            names.setdefault(p, n)
    rows = []
    total = 0
    for gi, group in enumerate(opt.param_groups):
        group_names = group.get("names")
        low = opt._is_lowrank(group)
        for pi, p in enumerate(group["params"]):
            name = names.get(p)
            if name is None and isinstance(group_names, (list, tuple)) and len(group_names) == len(group["params"]):
                name = str(group_names[pi])
            if name is None:
                name = f"group{gi}.{pi}"
            state = opt.state.get(p) or {}
            nbytes = tensors_nbytes(_state_tensors(state))
            total += nbytes
            shape = "x".join(map(str, p.shape)) or "scalar"
            if low and p.dim() == 2 and not opt._capturable_plain(p, group):
                rank = opt._group_rank(group, tuple(p.shape))
                side = (SIDE_NAMES[int(state["side"])] if isinstance(state.get("side"), torch.Tensor)
                        else resolve_side(tuple(p.shape), group["proj_type"]))
                rows.append((name, shape, "projected", str(rank), side, str(nbytes)))
            else:
                rows.append((name, shape, "plain", "-", "-", str(nbytes)))
    head = ("parameter", "shape", "update", "rank", "side", "state bytes")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    projected = sum(r[2] == "projected" for r in rows)
    out = [f"{type(opt).__name__}: {projected} of {len(rows)} parameters projected, state {total} bytes",
           line(head)] + [line(r) for r in rows]
    return "\n".join(out)


def param_name(opt, group, p: torch.Tensor) -> str:
    """``p``'s name from its group's ``names`` key, else ``"param group <i>, parameter <j>"``."""
    gi = next(i for i, g in enumerate(opt.param_groups) if g is group)
    pi = next(j for j, q in enumerate(group["params"]) if q is p)
    names = group.get("names")
    if isinstance(names, (list, tuple)) and len(names) == len(group["params"]):
        return f"{names[pi]!s} (param group {gi}, parameter {pi})"
    return f"param group {gi}, parameter {pi}"


def warn_nonfinite(opt, group, p: torch.Tensor) -> None:
    """The one warning of a skipped non-finite gradient (cold path: the first skip)."""
    opt._warned["nonfinite"] = True
    warnings.warn(
        f"{type(opt).__name__}: the gradient of {param_name(opt, group, p)} (shape {tuple(p.shape)}) is not "
        "finite (NaN or infinity), so its step was skipped: weight and state unchanged (skip_nonfinite=True). "
        "nonfinite_skip_count() counts the skipped parameter-steps; this warning is shown once per optimizer",
        UserWarning, stacklevel=4)
