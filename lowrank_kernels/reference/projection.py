"""Pure-PyTorch reference of the projection family: the specification.

Notation (docs/design.md): ``G`` is ``m x n``.
side="right": ``P`` is ``r x n``, ``R = G P^T`` (``m x r``), ``back(N) = N P``.
side="left":  ``P`` is ``m x r``, ``R = P^T G`` (``r x n``), ``back(N) = P N``.

The projector ``P`` comes in one of three kinds, carried by the ops' trailing
optional arguments ``(indices, q_scale, q_min, rank, group_size)``:

- dense: ``proj`` is ``P`` itself (``r x n`` right, ``m x r`` left);
- DCT: ``proj`` is the shared ``s x s`` DCT basis ``C`` and ``indices`` (int32/int64,
  length ``r``) picks its rows: ``P = C[idx]`` (right) or ``C[idx]^T`` (left);
- packed INT4: ``proj`` holds the uint8 codes of the row-major dense ``P`` (two per
  byte), ``q_scale`` / ``q_min`` the float32 per-group scale and minimum, ``rank`` and
  ``group_size`` the rest of the layout (reference/quant.py); ``P`` is dequantized to
  float32.

Everything is computed in float32, or float64 when any input is float64, then
written back in the storage dtype. Arguments are positional in the op schema
order; validation happens in the op router before these run.
"""
from __future__ import annotations

import math

import torch

from .moments import bf16_round_sr_ref, moments8_adam_ref


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def project(grad: torch.Tensor, proj: torch.Tensor, side: str, acc: torch.dtype) -> torch.Tensor:
    """``R`` in ``acc`` precision."""
    g = grad.to(acc)
    p = proj.to(acc)
    return g @ p.T if side == "right" else p.T @ g


def back(update: torch.Tensor, proj: torch.Tensor, side: str, acc: torch.dtype) -> torch.Tensor:
    """``back(N)`` in ``acc`` precision."""
    n = update.to(acc)
    p = proj.to(acc)
    return n @ p if side == "right" else p @ n


def adam_moments_(
    r: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float, beta2: float, eps: float,
    m_absmax=None, v_absmax=None, block_size: int = 0, moment_seed: int = -1,
) -> torch.Tensor:
    """Update the moments in place from ``r``; return ``N = M / (sqrt(V) + eps)``.

    Plain moments: computed in ``r``'s dtype (the accumulation dtype), ``N`` in it too;
    stored in the moments' dtype, rounding to nearest, or for bfloat16 moments with
    ``moment_seed >= 0`` stochastically (:func:`~lowrank_kernels.reference.moments.bf16_round_sr_ref`
    of the float32 value, counters ``i`` for ``exp_avg`` and ``i + numel`` for
    ``exp_avg_sq``). 8-bit moments (``m_absmax`` / ``v_absmax`` given): see
    :func:`~lowrank_kernels.reference.moments.moments8_adam_ref`; ``N`` is float32.
    """
    if m_absmax is not None:
        return moments8_adam_ref(r, exp_avg, exp_avg_sq, m_absmax, v_absmax, beta1, beta2, eps, block_size)
    acc = r.dtype
    m = exp_avg.to(acc).mul(beta1).add_(r, alpha=1.0 - beta1)
    v = exp_avg_sq.to(acc).mul(beta2).addcmul_(r, r, value=1.0 - beta2)
    if moment_seed >= 0 and exp_avg.dtype == torch.bfloat16:
        exp_avg.copy_(bf16_round_sr_ref(m.to(torch.float32), moment_seed, 0))
        exp_avg_sq.copy_(bf16_round_sr_ref(v.to(torch.float32), moment_seed, m.numel()))
    else:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    return m / (v.sqrt() + eps)


def n_dtype(exp_avg: torch.Tensor) -> torch.dtype:
    """The dtype of ``N``: the moments' dtype, float32 for 8-bit (uint8) moments."""
    return torch.float32 if exp_avg.dtype == torch.uint8 else exp_avg.dtype


def projector_kind(indices, q_scale, q_min) -> str:
    """``"dense"``, ``"dct"`` or ``"int4"`` from which optional projector arguments are given."""
    if indices is None and q_scale is None and q_min is None:
        return "dense"
    if indices is not None and q_scale is None and q_min is None:
        return "dct"
    if indices is None and q_scale is not None and q_min is not None:
        return "int4"
    raise ValueError(
        "projector: give indices (DCT), or q_scale and q_min (packed INT4), or none of them (dense), "
        f"got indices={indices is not None}, q_scale={q_scale is not None}, q_min={q_min is not None}"
    )


def dense_projector_of(proj, indices, q_scale, q_min, rank, group_size, m, n, side) -> torch.Tensor:
    """The dense ``P`` (``r x n`` right, ``m x r`` left) that a projector of any kind stands for.

    A dense ``proj`` is returned as is; DCT rows are gathered in the basis' dtype; an
    INT4 projector is dequantized to float32 (``min + scale * q`` per group).
    """
    kind = projector_kind(indices, q_scale, q_min)
    if kind == "dense":
        return proj
    if kind == "dct":
        rows = proj.index_select(0, indices.long())
        return rows if side == "right" else rows.T
    from .quant import quant_int4_unpack_ref  # reference/quant.py imports this module

    shape = (rank, n) if side == "right" else (m, rank)
    return quant_int4_unpack_ref(proj, q_scale, q_min, shape, torch.float32, group_size)


def projection_project_ref(grad, proj, side, indices=None, q_scale=None, q_min=None, rank=0, group_size=0):
    """``R`` (float32, float64 for float64 input): the projection GEMM without an epilogue."""
    m, n = grad.shape
    p = dense_projector_of(proj, indices, q_scale, q_min, rank, group_size, m, n, side)
    acc = compute_dtype(grad, p)
    return project(grad, p, side, acc)


def projection_project_adam_ref(
    grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, indices=None, q_scale=None, q_min=None, rank=0,
    group_size=0, m_absmax=None, v_absmax=None, block_size=0, moment_seed=-1,
):
    m, n = grad.shape
    proj = dense_projector_of(proj, indices, q_scale, q_min, rank, group_size, m, n, side)
    acc = compute_dtype(grad, proj, exp_avg)
    r = project(grad, proj, side, acc)
    return adam_moments_(
        r, exp_avg, exp_avg_sq, beta1, beta2, eps, m_absmax, v_absmax, block_size, moment_seed
    ).to(n_dtype(exp_avg))


def _apply(param, update, proj, side, alpha, decay, row_decay=None, row_alpha=None):
    acc = compute_dtype(param, update, proj)
    w = param.to(acc)
    b = back(update, proj, side, acc)
    if row_decay is not None:
        w.mul_(row_decay.to(acc).unsqueeze(1))
    if row_alpha is not None:
        b.mul_(row_alpha.to(acc).unsqueeze(1))
    w.mul_(decay).add_(b, alpha=alpha)
    param.copy_(w)


def projection_backproject_apply_ref(
    param, update, proj, side, alpha, decay, indices=None, q_scale=None, q_min=None, rank=0, group_size=0,
    row_decay=None, row_alpha=None,
):
    m, n = param.shape
    proj = dense_projector_of(proj, indices, q_scale, q_min, rank, group_size, m, n, side)
    _apply(param, update, proj, side, alpha, decay, row_decay, row_alpha)


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` (torch.optim.AdamW's bias correction)."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def projection_project_update_backproject_ref(
    param, grad, proj, exp_avg, exp_avg_sq, side, lr, beta1, beta2, eps, step, weight_decay, scale, indices=None,
    q_scale=None, q_min=None, rank=0, group_size=0, m_absmax=None, v_absmax=None, block_size=0, moment_seed=-1,
):
    m, n = param.shape
    proj = dense_projector_of(proj, indices, q_scale, q_min, rank, group_size, m, n, side)
    acc = compute_dtype(param, grad, proj, exp_avg)
    n_upd = adam_moments_(
        project(grad, proj, side, acc), exp_avg, exp_avg_sq, beta1, beta2, eps, m_absmax, v_absmax, block_size,
        moment_seed,
    )
    # The moments' dtype (float32 for 8-bit moments) rounds N exactly as the fused
    # kernels' two-op path does.
    n_upd = n_upd.to(n_dtype(exp_avg))
    step_size = adam_step_size(lr, beta1, beta2, step)
    _apply(param, n_upd, proj, side, -step_size * scale, 1.0 - lr * weight_decay)


def projector_tail(indices, q_scale, q_min, rank, group_size, i):
    """Parameter ``i``'s projector arguments from the multi-tensor op's lists (empty: not given)."""
    return (
        indices[i] if len(indices) else None, q_scale[i] if len(q_scale) else None,
        q_min[i] if len(q_min) else None, rank[i] if len(rank) else 0, group_size,
    )


def moment_tail(m_absmax, v_absmax, block_size, moment_seed, i):
    """Parameter ``i``'s moment arguments from the multi-tensor ops' lists (empty: not given)."""
    return (
        m_absmax[i] if len(m_absmax) else None, v_absmax[i] if len(v_absmax) else None, block_size,
        moment_seed[i] if len(moment_seed) else -1,
    )


def projection_foreach_project_update_backproject_ref(
    params, grads, projs, exp_avgs, exp_avg_sqs, side, lr, beta1, beta2, eps, step, weight_decay, scale,
    indices=(), q_scale=(), q_min=(), rank=(), group_size=0, m_absmax=(), v_absmax=(), block_size=0,
    moment_seed=(), skip=None, coeffs=None,
):
    """The multi-tensor step: the single-tensor step on each parameter in turn (empty
    projector / moment lists: not given).

    ``skip`` (optional, bool/uint8, one entry per parameter, on the parameters' device):
    a parameter whose entry is nonzero is left exactly as it was (weight, moments and
    8-bit absmax), decided on the device with ``torch.where`` (no host read).
    ``coeffs`` (optional, float32/float64 ``(n, 2)``): per parameter ``(a, d)`` with
    ``W <- d W - a back(N)``, replacing ``step_size * scale`` and ``1 - lr * wd`` computed
    from the host lists (which are then not read).
    """
    for i in range(len(params)):
        tail = (
            indices[i] if len(indices) else None, q_scale[i] if len(q_scale) else None,
            q_min[i] if len(q_min) else None, rank[i] if len(rank) else 0, group_size,
        )
        mom = moment_tail(m_absmax, v_absmax, block_size, moment_seed, i)
        written = [params[i], exp_avgs[i], exp_avg_sqs[i]] + [t for t in mom[:2] if t is not None]
        saved = [t.clone() for t in written] if skip is not None else None
        if coeffs is None:
            projection_project_update_backproject_ref(
                params[i], grads[i], projs[i], exp_avgs[i], exp_avg_sqs[i], side, lr[i], beta1, beta2, eps,
                step[i], weight_decay[i], scale[i], *tail, *mom,
            )
        else:
            _update_with_coeffs(params[i], grads[i], projs[i], exp_avgs[i], exp_avg_sqs[i], side, beta1, beta2,
                                eps, coeffs[i], tail, mom)
        if saved is not None:
            keep = skip[i] != 0
            for t, old in zip(written, saved):
                t.copy_(torch.where(keep, old, t))


def _update_with_coeffs(param, grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, coef, tail, mom):
    """:func:`projection_project_update_backproject_ref` with the device coefficients
    ``coef = (a, d)``: ``W <- d W - a back(N)`` (no host read of ``coef``)."""
    m, n = param.shape
    proj = dense_projector_of(proj, *tail, m, n, side)
    acc = compute_dtype(param, grad, proj, exp_avg)
    n_upd = adam_moments_(project(grad, proj, side, acc), exp_avg, exp_avg_sq, beta1, beta2, eps, *mom)
    n_upd = n_upd.to(n_dtype(exp_avg))
    acc = compute_dtype(param, n_upd, proj)
    w = param.to(acc)
    b = back(n_upd, proj, side, acc)
    c = coef.to(acc)
    w.mul_(c[1]).sub_(b * c[0])
    param.copy_(w)
