"""The capturable step (``capturable=True``): no host read of a tensor value, so a CUDA graph
can capture it.

With ``capturable=True`` (a group key of the optimizers that set
``LowRankOptimizer.supports_capturable``) ``state["step"]`` lives on the parameter's device,
the non-finite check (:func:`device_skip`) and the bias-corrected step sizes
(:func:`coefficients`) are computed on the device, and a non-refresh step reads no tensor value
on the host. ``lr`` may then be a 0-dim device tensor. Skips are counted on the device
(``LowRankOptimizer.nonfinite_skip_count``).

The step applies (:func:`plan`) when every parameter with a gradient is in a capturable group
and either takes the plain bucketed fused step (no refresh due, by the host mirrors of the step
counts) or plain AdamW; otherwise the optimizer takes its synchronizing path (refresh steps,
first steps, DTensors, ``proj_type="full"``), which first re-reads the device step counts
(:func:`sync_device_steps`). The host mirror of a step count assumes the step was taken (a
skip is unknown to the host) and does not see graph replays: the refresh schedule follows the
device counts again at the next synchronizing step or ``LowRankOptimizer.sync_step_counts``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import plain

#: one parameter of a bucket: ``(p, state, group, step)``.
Entry = Tuple[torch.Tensor, Dict[str, Any], Dict[str, Any], int]


def validate(opt_cls: type, group: Dict[str, Any], err: Callable[[str], str]) -> None:
    """``capturable`` must be a bool; True needs an optimizer class that declares it
    (``supports_capturable``, read from the class itself, not inherited), no ``compat`` mode
    and ``moment_bits=32``."""
    capturable = group.get("capturable", False)
    if not isinstance(capturable, bool):
        raise TypeError(err(f"capturable must be a bool, got {type(capturable).__name__}"))
    if not capturable:
        return
    if not opt_cls.__dict__.get("supports_capturable", False):
        raise ValueError(err(f"capturable=True is not supported by {opt_cls.__name__} (supported by GaLoreAdamW "
                             "and DCTAdamW)"))
    if group.get("compat") is not None:
        raise ValueError(err(f"capturable=True cannot be combined with compat={group['compat']!r}"))
    if group.get("moment_bits", 32) != 32:
        # 16-bit: the stochastic-rounding seed is a host int per step (a captured graph would
        # replay one seed); 8-bit: the capturable plain-AdamW path keeps float moments only.
        raise ValueError(err(f"capturable=True needs moment_bits=32, got moment_bits={group['moment_bits']!r} "
                             "(not supported yet)"))


def plan(work, state_of, projected: Callable, bucket_entry: Callable):
    """``(buckets, plain groups)`` of a capturable step over ``work`` (``(group, p)`` pairs), or
    None when it does not apply. ``projected(p, group)``: whether ``p`` is projected;
    ``bucket_entry(p, group)``: ``(key, step, state)`` when ``p`` takes the plain fused step."""
    if not work or not all(g.get("capturable", False) for g, _ in work):
        return None
    buckets: Dict[tuple, List[Entry]] = {}
    plains: Dict[int, Tuple[Dict[str, Any], List[torch.Tensor]]] = {}
    for group, p in work:
        state = state_of.get(p)
        if state and isinstance(state.get("step"), torch.Tensor) and state["step"].device != p.device:
            return None  # moved to the device by the synchronizing path
        if projected(p, group):
            entry = bucket_entry(p, group)
            if entry is None:
                return None
            key, step, state = entry
            buckets.setdefault(key, []).append((p, state, group, step))
        else:
            plains.setdefault(id(group), (group, []))[1].append(p)
    return buckets, list(plains.values())


def run(buckets: Dict[tuple, List[Entry]], plains, *, state_of, bucket_step: Callable, counters: Dict,
        remember: Callable[[torch.Tensor, int], None]) -> None:
    """Take the step :func:`plan` made.

    Per bucket: one inf-norm over the gradients gives the device skip flags, the step counts
    are stacked and the per-parameter coefficients computed on the device (:func:`coefficients`);
    one ``bucket_step(key, entries, skip=, coeffs=)`` call reads them; the step counts grow by
    one where not skipped and their host mirrors (``remember``) assume the step was taken. Plain
    parameters: :func:`lowrank_kernels.optim.plain.capturable_step` with device flags."""
    for key, entries in buckets.items():
        order: Dict[int, List[Entry]] = {}  # entries of one group next to each other: one fill per group
        for e in entries:
            order.setdefault(id(e[2]), []).append(e)
        entries = [e for es in order.values() for e in es]
        skip = device_skip([p.grad for p, _, _, _ in entries], [g for _, _, g, _ in entries], counters)
        steps = [st["step"] for _, st, _, _ in entries]
        coeffs = coefficients(list(order.values()), steps)
        bucket_step(key, entries, skip=skip, coeffs=coeffs)
        if skip is None:
            torch._foreach_add_(steps, 1.0)
        else:
            torch._foreach_add_(steps, list(skip.logical_not().to(torch.float32).unbind(0)))
        for st_t, (_, _, _, step) in zip(steps, entries):
            remember(st_t, step)
    for group, params in plains:
        skip = device_skip([p.grad for p in params], [group] * len(params), counters)
        plain.capturable_step(state_of, group, params, skip=skip)


def coefficients(runs: List[List[Entry]], steps: List[torch.Tensor]) -> torch.Tensor:
    """Per parameter ``(step_size * scale, 1 - lr * wd)`` in float64 on the device, at the step
    count + 1, in the host's order of operations (``adam_step_size`` then ``* scale``).
    ``runs``: the bucket's entries, one list per group (so ``lr`` is filled once per group);
    ``steps``: their step counts in that order. The bucket shares its betas."""
    t = torch.stack(steps).to(torch.float64).add_(1.0)
    coeffs = torch.empty((len(steps), 2), dtype=torch.float64, device=t.device)
    beta1, beta2 = runs[0][0][2]["betas"]
    lo = 0
    for es in runs:
        g = es[0][2]
        hi = lo + len(es)
        tt = t[lo:hi]
        lr = g["lr"]
        # adam_step_size's order: lr * sqrt(1 - b2^t) / (1 - b1^t), then * scale
        a = (torch.pow(beta2, tt).neg_().add_(1.0).sqrt_().mul_(lr)).div_(torch.pow(beta1, tt).neg_().add_(1.0))
        coeffs[lo:hi, 0] = a.mul_(g["scale"])
        coeffs[lo:hi, 1] = (1.0 - lr * g["weight_decay"]) if not isinstance(lr, torch.Tensor) \
            else lr.to(torch.float64).mul(-g["weight_decay"]).add_(1.0)
        lo = hi
    return coeffs


def device_skip(grads: List[torch.Tensor], groups: List[Dict[str, Any]], counters: Dict) -> Optional[torch.Tensor]:
    """Device bool flags, one per gradient: not finite (its inf-norm, in float32, is NaN or inf)
    in a group with ``skip_nonfinite``; None when no group checks. No host read; the count of
    skips accumulates in ``counters[device]`` (a 0-d int64 device tensor)."""
    checks = [g.get("skip_nonfinite", True) for g in groups]
    if not any(checks):
        return None
    norms = torch._foreach_norm(grads, float("inf"), dtype=torch.float32)
    skip = torch.stack(norms).isfinite().logical_not_()
    if not all(checks):
        for i, c in enumerate(checks):
            if not c:
                skip[i] = False
    dev = skip.device
    if dev not in counters:
        if _capturing():
            # made inside the graph, its zero fill would replay too and reset the count each time
            raise RuntimeError(f"capturable step: no skip counter for {dev} before CUDA graph capture; take one "
                               "eager step (or call sync_step_counts()) with the parameters on that device first")
        counters[dev] = torch.zeros((), dtype=torch.int64, device=dev)
    counters[dev].add_(skip.sum())
    return skip


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def ensure_counters(counters: Dict, devices) -> None:
    """The device-side skip counters (0-d int64, one per device) that :func:`device_skip` adds
    to, made for ``devices`` where missing: at construction and on every synchronizing step,
    so that a captured step finds its counter made outside the capture."""
    for dev in devices:
        if dev not in counters:
            counters[dev] = torch.zeros((), dtype=torch.int64, device=dev)


def sync_device_steps(param_groups, work, state_of, remember: Callable[[torch.Tensor, int], None],
                      counters: Optional[Dict] = None) -> None:
    """Before a synchronizing step: move the step counts of capturable groups to the parameter's
    device (a state made or loaded elsewhere) and refresh their host mirrors from the device
    (one read per device), so the refresh schedule follows the counts the device kept
    (capturable steps skip on the device, unseen by the host); ``counters``: the skip counters,
    made for the devices of ``work``'s capturable parameters (:func:`ensure_counters`)."""
    if not any(g.get("capturable", False) for g in param_groups):
        return
    by_device: Dict[torch.device, List[torch.Tensor]] = defaultdict(list)
    for group, p in work:
        if not group.get("capturable", False):
            continue
        if counters is not None and p.device not in counters:
            ensure_counters(counters, (p.device,))
        state = state_of.get(p)
        if not state or not isinstance(state.get("step"), torch.Tensor):
            continue
        t = state["step"]
        if t.device != p.device:
            t = state["step"] = t.to(device=p.device, dtype=torch.float32)
        by_device[t.device].append(t)
    for ts in by_device.values():
        for t, v in zip(ts, torch.stack(ts).tolist()):
            remember(t, int(v))


__all__ = ["validate", "plan", "run", "coefficients", "device_skip", "ensure_counters", "sync_device_steps"]
