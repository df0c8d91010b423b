"""Pure-PyTorch reference of the frugal family: FRUGAL's non-refresh step over a list of
weights (the arithmetic of ``FrugalAdamW``'s per-parameter step, operation for operation).

Per entry ``i`` (weight ``W``, gradient ``G``, dense orthonormal projector ``P`` of rank ``r``):

- ``R = G P^T`` (right) or ``P^T G`` (left) in float32; ``N = adam_update(R)`` (the adam
  family's update, any moment format);
- when ``r`` is less than the projected dimension: ``residual = G - back(R)``;
- ``W <- decay[i] W + alpha[i] back(N)`` (the state-full part; ``alpha = -step_size * scale``);
- ``W <- W + free_alpha[i] * sign(residual)`` (``signsgd``) or ``* residual`` (the state-free part).
"""
from __future__ import annotations

import torch

from .adam import adam_update_ref
from .projection import moment_tail, projection_backproject_apply_ref


def frugal_foreach_update_ref(params, grads, projs, exp_avg, exp_avg_sq, side, signsgd, beta1, beta2, eps, alpha,
                              decay, free_alpha, m_absmax=(), v_absmax=(), block_size=0, moment_seed=()):
    """Each entry in turn (see the module doc)."""
    for i, (p, g, proj) in enumerate(zip(params, grads, projs)):
        acc = torch.float64 if torch.float64 in (g.dtype, proj.dtype) else torch.float32
        ga, pa = g.to(acc), proj.to(acc)
        low = ga @ pa.T if side == "right" else pa.T @ ga
        upd = torch.float32 if exp_avg[i].dtype == torch.uint8 else exp_avg[i].dtype
        n_lr = adam_update_ref(low.to(upd), exp_avg[i], exp_avg_sq[i], beta1, beta2, eps,
                               *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i))
        frugal_apply_(p, g, proj, low, n_lr, side, signsgd, alpha[i], decay[i], free_alpha[i],
                      projection_backproject_apply_ref)


def frugal_apply_(p, g, proj, low, n_lr, side, signsgd, alpha, decay, free_alpha, backproject_apply):
    """The step after the Adam update (``backproject_apply``: a back-projection backend with the
    op's positional arguments ``(param, update, proj, side, alpha, decay)``)."""
    r = proj.shape[0] if side == "right" else proj.shape[1]
    full = p.shape[1] if side == "right" else p.shape[0]
    residual = None
    if r < full:
        residual = g.to(low.dtype, copy=True)
        backproject_apply(residual, low, proj, side, -1.0, 1.0)
    backproject_apply(p, n_lr, proj, side, alpha, decay)
    if residual is not None:
        p.add_(residual.sign() if signsgd else residual, alpha=free_alpha)
