"""Plain AdamW: the step of the parameters a low-rank optimizer does not project.

Groups without ``rank`` (and, in DCTAdamW, the parameters of a low-rank group it does not
project) get AdamW here. :func:`step` picks one variant per parameter:

- :func:`torch_step`: moments in the parameter's dtype (float32/float64 parameters, or
  ``moment_dtype="param"``) go through torch's own AdamW kernels, so the step is
  bit-identical to ``torch.optim.AdamW``;
- :func:`wide_step`: float32 moments of a 16-bit parameter, torch's math in the moments'
  dtype, the weight rounded once;
- :func:`lowbit_step`: 8-bit or 16-bit moments (``moment_bits``) through ``ops.adam_update_``
  / ``ops.foreach_adam_update_``;
- :func:`compat_step`: ``compat="galore-torch"`` / ``"apollo-torch"``: the transformers-style
  AdamW of the official packages (eps before the bias correction, decay after the update);
- :func:`capturable_step`: ``capturable=True``: the step count on the device, every write
  maskable by device flags, no host read (a CUDA graph can capture it).

All share one state layout (:func:`init_state`: torch.optim.AdamW's ``step``, ``exp_avg``,
``exp_avg_sq``, in the group's moment format), so a checkpoint moves between them.
``state_of`` is the optimizer's ``state`` (parameter -> state dict).
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim.adamw import adamw as _adamw_functional

from lowrank_kernels import ops

from . import distributed as _dist
from . import moments
from .common import adam_step_size

#: ``moment_seed(p, step)``: the stochastic-rounding seed of ``p``'s 16-bit moments at ``step``.
SeedFn = Callable[[torch.Tensor, int], int]


def step_device(p: torch.Tensor, group: Dict[str, Any]) -> torch.device:
    """Where ``state["step"]`` lives: the parameter's device with ``capturable=True`` (as
    torch's capturable AdamW), else the CPU (read on the host without a sync)."""
    return p.device if group.get("capturable", False) else torch.device("cpu")


def init_state(p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
    """torch.optim.AdamW's state layout (``step`` float32 on :func:`step_device`, the two
    moments in the group's format, :mod:`~lowrank_kernels.optim.moments`), shared by every
    variant so checkpoints move between them."""
    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device(p, group))
    fmt = moments.format_of(group)
    bits = moments.bits_for(tuple(p.shape), fmt)
    if bits == 8 and _dist.is_dtensor(p) and (p.dim() < 2 or _dist.has_col_shard(p)):
        # FSDP2 shards a 1-D parameter along its blocks, tensor parallelism a weight's rows
        # (Shard(1)): the blocks would straddle the shards, so these moments stay 32-bit
        bits = 32
        warnings.warn("moment_bits=8: plain-AdamW parameters whose 8-bit blocks would straddle their shards "
                      "(1-D parameters under FSDP2, weights sharded on dim 1 by tensor parallelism) keep "
                      "32-bit moments", UserWarning, stacklevel=2)
    if bits == 16:
        for key in moments.ADAM_KEYS:
            state[key] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
        return
    if bits == 8:
        for key in moments.ADAM_KEYS:
            state[key] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
            absmax = torch.zeros(moments.absmax_shape(p.shape, fmt.block_size), dtype=torch.float32, device=p.device)
            if _dist.is_dtensor(p):  # row-aligned with the codes: this rank's rows (no communication)
                absmax = _dist.distribute_tensor(absmax, p.device_mesh, p.placements, src_data_rank=None)
            state[moments.ABSMAX_KEYS[key]] = absmax
        return
    dtype = moments.state_dtype(p.dtype, fmt)
    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def step(state_of, group: Dict[str, Any], params: List[torch.Tensor], *, moment_seed: SeedFn) -> None:
    """AdamW on ``params`` of ``group`` (creating their state on first use), each through the
    variant its state and the group call for (see the module docstring)."""
    fmt = moments.format_of(group)
    lowbit = []
    for p in params:
        state = state_of[p]
        if len(state) == 0:
            init_state(p, state, group)
        if moments.is_lowbit(state, fmt):
            lowbit.append(p)
    if lowbit:
        lowbit_step(state_of, group, lowbit, moment_seed=moment_seed)
        params = [p for p in params if not moments.is_lowbit(state_of[p], fmt)]
        if not params:
            return
    if group.get("compat") is not None:
        compat_step(state_of, group, params)
        return
    if group.get("capturable", False):
        capturable_step(state_of, group, params)
        return
    same, wide = [], []
    for p in params:
        (wide if state_of[p]["exp_avg"].dtype != p.dtype else same).append(p)
    if wide:
        wide_step(state_of, group, wide)
    if same:
        torch_step(state_of, group, same)


def torch_step(state_of, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
    """``torch.optim.adamw.adamw`` on parameters whose moments have their dtype (bit-identical
    to ``torch.optim.AdamW``; ``foreach`` as the group says)."""
    states = [state_of[p] for p in params]
    beta1, beta2 = group["betas"]
    _adamw_functional(
        params, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [],
        [st["step"] for st in states],
        foreach=group.get("foreach"), capturable=False, differentiable=False, fused=None,
        amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
        eps=group["eps"], maximize=False,
    )


def wide_step(state_of, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
    """torch.optim.AdamW's math (its order of operations) with moments wider than the
    parameter: moments and the new weight are computed in the moments' dtype and the weight
    is rounded once into the parameter (one transient copy of one parameter)."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    for p in params:
        state = state_of[p]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = float(state["step"])
        g = p.grad.to(m.dtype)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        del g
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        w = p.to(m.dtype, copy=True)
        w.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        p.copy_(w)


def compat_step(state_of, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
    """The transformers-style AdamW of galore-torch / apollo-torch, in their order of operations.

    Per parameter, with ``t`` the 1-based step: ``m <- b1 m + (1 - b1) g``,
    ``v <- b2 v + (1 - b2) g^2``, ``W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) *
    m / (sqrt(v) + eps)``, then ``W <- W - lr wd W``. Parameters are bucketed by step count
    (one bucket in a normal run), one ``torch._foreach_*`` call per operation; moments wider
    than the parameter are updated with the weight computed in their dtype and rounded once.
    """
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    buckets: Dict[int, List[torch.Tensor]] = defaultdict(list)
    for p in params:
        state = state_of[p]
        if len(state) == 0:
            init_state(p, state, group)
        state["step"] += 1
        buckets[int(state["step"])].append(p)
    for t, ps in buckets.items():
        exp_avgs = [state_of[p]["exp_avg"] for p in ps]
        exp_avg_sqs = [state_of[p]["exp_avg_sq"] for p in ps]
        wide = [m.dtype != p.dtype for p, m in zip(ps, exp_avgs)]
        grads = [p.grad.to(m.dtype) if w else p.grad for p, m, w in zip(ps, exp_avgs, wide)]
        weights = [p.to(m.dtype, copy=True) if w else p for p, m, w in zip(ps, exp_avgs, wide)]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        del grads
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_div(exp_avgs, denoms)
        del denoms
        step_size = adam_step_size(lr, beta1, beta2, t)
        torch._foreach_add_(weights, updates, alpha=-step_size)
        if wd > 0.0:
            torch._foreach_add_(weights, weights, alpha=-lr * wd)
        for p, w, is_wide in zip(ps, weights, wide):
            if is_wide:
                p.copy_(w)


def lowbit_step(state_of, group: Dict[str, Any], params: List[torch.Tensor], *, moment_seed: SeedFn) -> None:
    """AdamW with 8-bit or 16-bit moments: ``ops.adam_update_`` (or ``ops.foreach_adam_update_``
    per bucket of step count and format) then the weight update.

    The op returns ``N = m / (sqrt(v) + eps')`` with no bias correction; the update is
    ``W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) N``. **eps convention**: by default
    ``eps' = eps sqrt(1 - b2^t)``, which makes this torch.optim.AdamW's
    ``lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` exactly (in real arithmetic),
    with the decay first (``W <- (1 - lr wd) W`` on the old weight); with ``compat`` set,
    ``eps' = eps`` (the transformers-style AdamW of the official packages) and the decay
    after the update. A 16-bit weight is updated in float32 and rounded once.
    ``foreach=False`` in the group: one ``adam_update_`` call per parameter (the same numbers).
    """
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    compat = group.get("compat") is not None
    fmt = moments.format_of(group)
    buckets: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
    for p in params:
        state = state_of[p]
        state["step"] += 1
        m = state["exp_avg"]
        buckets[(int(state["step"]), m.dtype, m.device)].append(p)
    for (t, _, _), ps in buckets.items():
        bc2 = 1.0 - beta2**t
        step_size = lr * math.sqrt(bc2) / (1.0 - beta1**t)
        eps_t = eps if compat else eps * math.sqrt(bc2)
        states = [state_of[p] for p in ps]
        grads = [p.grad.to(moments.update_dtype(st, p.grad.dtype)) for p, st in zip(ps, states)]
        kws = [moments.op_kwargs(st, fmt, lambda p=p, t=t: moment_seed(p, t)) for p, st in zip(ps, states)]
        if group.get("foreach") is False or len(ps) == 1 or any(_dist.is_dtensor(p) for p in ps):
            ns = [ops.adam_update_(g, st["exp_avg"], st["exp_avg_sq"], beta1=beta1, beta2=beta2, eps=eps_t, **kw)
                  for g, st, kw in zip(grads, states, kws)]
        else:
            ns = ops.foreach_adam_update_(
                grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], beta1=beta1,
                beta2=beta2, eps=eps_t, **moments.foreach_op_kwargs(kws),
            )
        del grads
        wide = [p.dtype not in (torch.float32, torch.float64) for p in ps]
        ws = [p.to(torch.float32) if w else p for p, w in zip(ps, wide)]
        ns = [n.to(w.dtype) for n, w in zip(ns, ws)]
        if not compat and wd != 0.0:
            torch._foreach_mul_(ws, 1.0 - lr * wd)
        torch._foreach_add_(ws, ns, alpha=-step_size)
        if compat and wd != 0.0:
            torch._foreach_add_(ws, ws, alpha=-lr * wd)
        for p, w, is_wide in zip(ps, ws, wide):
            if is_wide:
                p.copy_(w)


def capturable_step(state_of, group: Dict[str, Any], params: List[torch.Tensor],
                    skip: Optional[torch.Tensor] = None) -> None:
    """torch.optim.AdamW's math (decay first, eps after the bias correction) with the step
    count on the device and no host read. With ``skip`` (device bool flags, one per parameter,
    :func:`lowrank_kernels.optim.capturable.device_skip`) a flagged parameter keeps its weight,
    moments and step count (``torch.where``). Moments and the new weight in the moments' dtype,
    rounded once into the parameter. Equal to :func:`torch_step` up to rounding (another order
    of operations than torch's foreach kernels)."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    for p in params:
        if len(state_of[p]) == 0:
            init_state(p, state_of[p], group)
    for i, p in enumerate(params):
        state = state_of[p]
        m, v, st = state["exp_avg"], state["exp_avg_sq"], state["step"]
        if st.device != p.device:
            st = state["step"] = st.to(device=p.device, dtype=torch.float32)
        keep = None if skip is None else skip[i].logical_not()
        g = p.grad if keep is None else torch.where(keep, p.grad, 0)
        g = g.to(m.dtype)
        if keep is None:
            st.add_(1.0)
        else:
            st.add_(keep.to(st.dtype))
        # bias corrections in float64, as torch's AdamW computes them on the host
        t = st.to(torch.float64)
        bc1 = torch.pow(beta1, t).neg_().add_(1.0)
        step_size = (lr.to(torch.float64) if isinstance(lr, torch.Tensor) else torch.full_like(bc1, lr)).div(bc1)
        bc2_sqrt = torch.pow(beta2, t).neg_().add_(1.0).sqrt_()
        m_new = m.lerp(g, 1 - beta1)
        v_new = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v_new.sqrt() / bc2_sqrt).add_(eps)
        w = p.to(m.dtype, copy=True)
        w.mul_(1 - lr * wd)
        w.sub_(m_new / denom * step_size)
        if keep is None:
            m.copy_(m_new)
            v.copy_(v_new)
            p.copy_(w)
        else:
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))
            p.copy_(torch.where(keep, w.to(p.dtype), p))


__all__ = ["step", "init_state", "step_device", "torch_step", "wide_step", "compat_step", "lowbit_step",
           "capturable_step"]
