"""Pure-PyTorch reference of the apollo family: APOLLO's non-refresh step over a list of
weights (the arithmetic of ``APOLLOAdamW``'s per-parameter step, operation for operation).

Per entry ``i`` (weight ``W`` of shape ``m x n``, gradient ``G``, ``r = rank``):

- ``P = randn(shape, generator seeded with seeds[i]) / sqrt(r)`` in float32, then in ``W``'s
  dtype (``shape``: ``r x n`` for ``side="right"``, ``m x r`` for ``"left"``);
- ``R = G P^T`` (right) or ``P^T G`` (left) in float32, in the moments' update dtype;
  ``N = adam_update(R)`` (the adam family's update, any moment format);
- ``channel``: ``s = ||N||_d / (||R||_d + 1e-8)`` along the low-rank dimension ``d``,
  ``|Gt| = || s * ||G||_d ||``; else ``s = ||N|| / (||R|| + 1e-8)``, ``|Gt| = s ||G||``;
- ``s *= front[i]``, ``|Gt| *= front[i]`` (apollo-torch's ``scale_front``; 1 otherwise);
- with ``prev_norm`` given (the norm-growth limiter): ``l = max(|Gt| / (prev + 1e-8), 1.01) / 1.01``,
  ``s /= l``, ``|Gt| /= l``, ``prev <- |Gt|`` (in place);
- ``W <- decay[i] W`` (when ``decay[i] != 1``), then ``W <- W + G * (s * alpha[i])`` (``s``
  broadcast along the full dimension: per row for right, per column for left).
"""
from __future__ import annotations

import math

import torch

from .adam import adam_update_ref
from .projection import moment_tail

#: the norm-growth limiter's bound: at most 1% growth of the scaled update norm per step.
LIMIT = 1.01


def _norm(x: torch.Tensor, dim=None) -> torch.Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=dim, dtype=acc)


def apollo_projection(shape, seed: int, device, dtype, rank: int) -> torch.Tensor:
    """APOLLO's projector: ``randn(shape) / sqrt(rank)`` from a generator seeded with ``seed``
    on ``device`` (float32), in ``dtype``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    proj = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(rank)
    return proj.to(dtype)


def apollo_project(grad, proj, side, exp_avg) -> torch.Tensor:
    """``R = G P^T`` (right) or ``P^T G`` (left) in float32 (float64 with a float64 input), in
    the moments' update dtype (float32 for 8-bit moments)."""
    acc = torch.float64 if torch.float64 in (grad.dtype, proj.dtype) else torch.float32
    g, pr = grad.to(acc), proj.to(acc)
    r_lr = g @ pr.T if side == "right" else pr.T @ g
    return r_lr.to(torch.float32 if exp_avg.dtype == torch.uint8 else exp_avg.dtype)


def apollo_entry_(param, grad, proj, exp_avg, exp_avg_sq, prev_norm, side, channel, beta1, beta2, eps, front, alpha,
                  decay, m_absmax=None, v_absmax=None, block_size=0, moment_seed=-1):
    """One entry's step with its projector ``proj`` given (see the module doc)."""
    r_lr = apollo_project(grad, proj, side, exp_avg)
    n_lr = adam_update_ref(r_lr, exp_avg, exp_avg_sq, beta1, beta2, eps, m_absmax, v_absmax, block_size, moment_seed)
    apollo_apply_(param, grad, r_lr, n_lr, prev_norm, side, channel, front, alpha, decay)


def apollo_apply_(param, grad, r_lr, n_lr, prev_norm, side, channel, front, alpha, decay):
    """The step after the Adam update: scaling factors from ``N`` and ``R``, limiter, update."""
    if channel:
        dim = 1 if side == "right" else 0
        s = _norm(n_lr, dim) / (_norm(r_lr, dim) + 1e-8)
        scaled_norm = _norm(s * _norm(grad, dim))
        coef = s.unsqueeze(1) if side == "right" else s.unsqueeze(0)
    else:
        s = _norm(n_lr) / (_norm(r_lr) + 1e-8)
        scaled_norm = s * _norm(grad)
        coef = s
    if front != 1.0:
        coef = coef * front
        scaled_norm = scaled_norm * front
    if prev_norm is not None:
        limiter = torch.clamp(scaled_norm / (prev_norm + 1e-8), min=LIMIT) / LIMIT
        coef = coef / limiter
        scaled_norm = scaled_norm / limiter
        prev_norm.copy_(scaled_norm)
    coef = coef * alpha
    if decay != 1.0:
        param.mul_(decay)
    param.addcmul_(grad, coef)


def apollo_foreach_update_ref(params, grads, seeds, exp_avg, exp_avg_sq, prev_norm, side, rank, channel, beta1, beta2,
                              eps, front, alpha, decay, m_absmax=(), v_absmax=(), block_size=0, moment_seed=()):
    """The multi-tensor step: each entry in turn (``prev_norm`` empty: no limiter)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        m, n = p.shape
        shape = (rank, n) if side == "right" else (m, rank)
        proj = apollo_projection(shape, int(seeds[i]), p.device, p.dtype, rank)
        apollo_entry_(p, g, proj, exp_avg[i], exp_avg_sq[i], prev_norm[i] if len(prev_norm) else None, side, channel,
                      beta1, beta2, eps, front[i], alpha[i], decay[i],
                      *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i))
