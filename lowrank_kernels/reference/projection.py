"""Pure-PyTorch reference of the projection family: the specification.

Notation (../../README.md, ALGORITHMS.md): ``G`` is ``m x n``.
side="right": ``P`` is ``r x n``, ``R = G P^T`` (``m x r``), ``back(N) = N P``.
side="left":  ``P`` is ``m x r``, ``R = P^T G`` (``r x n``), ``back(N) = P N``.

Everything is computed in float32, or float64 when any input is float64, then
written back in the storage dtype. Arguments are positional in the op schema
order; validation happens in the op router before these run.
"""
from __future__ import annotations

import math

import torch


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
    r: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float, beta2: float, eps: float
) -> torch.Tensor:
    """Update the moments in place from ``r``; return ``N = M / (sqrt(V) + eps)`` in ``r``'s dtype."""
    acc = r.dtype
    m = exp_avg.to(acc).mul(beta1).add_(r, alpha=1.0 - beta1)
    v = exp_avg_sq.to(acc).mul(beta2).addcmul_(r, r, value=1.0 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return m / (v.sqrt() + eps)


def projection_project_adam_ref(grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps):
    acc = compute_dtype(grad, proj, exp_avg)
    r = project(grad, proj, side, acc)
    return adam_moments_(r, exp_avg, exp_avg_sq, beta1, beta2, eps).to(exp_avg.dtype)


def projection_backproject_apply_ref(param, update, proj, side, alpha, decay):
    acc = compute_dtype(param, update, proj)
    w = param.to(acc).mul_(decay).add_(back(update, proj, side, acc), alpha=alpha)
    param.copy_(w)


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` (torch.optim.AdamW's bias correction)."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def projection_project_update_backproject_ref(
    param, grad, proj, exp_avg, exp_avg_sq, side, lr, beta1, beta2, eps, step, weight_decay, scale
):
    acc = compute_dtype(param, grad, proj, exp_avg)
    n = adam_moments_(project(grad, proj, side, acc), exp_avg, exp_avg_sq, beta1, beta2, eps)
    # The moments' dtype rounds N exactly as the fused kernels' two-op path does.
    n = n.to(exp_avg.dtype)
    step_size = adam_step_size(lr, beta1, beta2, step)
    projection_backproject_apply_ref(param, n, proj, side, -step_size * scale, 1.0 - lr * weight_decay)
