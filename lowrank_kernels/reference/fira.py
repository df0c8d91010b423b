"""Pure-PyTorch reference of the fira family: Fira's non-refresh step over a list of weights
(the arithmetic of ``FiraAdamW``'s per-parameter step, operation for operation).

Per entry ``i`` (weight ``W``, gradient ``G``, projector ``P``: dense, or the rows
``indices[i]`` of a shared DCT basis ``projs[i]``; ``back`` as reference/residual.py):

- ``R = project(G)`` (float32, float64 for float64 inputs); ``N = adam_update(R)`` (the adam
  family's update, any moment format), ``N32 = N`` in ``R``'s dtype;
- the scaling factors ``s = ||N32||_k / (||R||_k + 1e-8)``, norms over the rank dimension;
- with the limiter (``prev_norm`` given): ``q = sqrt(residual_sumsq(G, -mix s R))`` (the norm
  of ``s (G - mix back(R))``), ``l = max(q / (prev + 1e-8), gamma) / gamma``, ``s <- s / l``,
  ``prev <- q / l``;
- ``W <- decay W + alpha (back(scale N32 - mix s R) + s G)`` (``residual_apply``).
"""
from __future__ import annotations

import torch

from .adam import adam_update_ref
from .projection import moment_tail, projection_project_ref
from .residual import residual_apply_ref, residual_sumsq_ref

#: the constant of the scaling factor's denominator and of the limiter (the fira package's)
TINY = 1e-8


def fira_foreach_update_ref(params, grads, projs, indices, exp_avg, exp_avg_sq, prev_norm, side, beta1, beta2, eps,
                            scale, mix, gamma, alpha, decay, m_absmax=(), v_absmax=(), block_size=0, moment_seed=()):
    """Each entry in turn (see the module doc); empty ``indices`` / ``prev_norm``: dense
    projectors / no limiter."""
    for i, (p, g, proj) in enumerate(zip(params, grads, projs)):
        idx = indices[i] if len(indices) else None
        low = projection_project_ref(g, proj, side, idx)
        upd = torch.float32 if exp_avg[i].dtype == torch.uint8 else exp_avg[i].dtype
        n_lr = adam_update_ref(low.to(upd), exp_avg[i], exp_avg_sq[i], beta1, beta2, eps,
                               *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i))
        fira_apply_(p, g, proj, idx, low, n_lr, prev_norm[i] if len(prev_norm) else None, side, scale[i], mix[i],
                    gamma[i] if len(prev_norm) else None, alpha[i], decay[i], residual_sumsq_ref, residual_apply_ref)


def fira_apply_(p, g, proj, idx, low, n_lr, prev, side, scale, mix, gamma, alpha, decay, sumsq, apply):
    """The step after the Adam update (``sumsq`` / ``apply``: residual backends with the ops'
    positional arguments)."""
    right = side == "right"
    rank_dim = 1 if right else 0
    n32 = n_lr.to(low.dtype)
    s = torch.linalg.vector_norm(n32, dim=rank_dim) / (torch.linalg.vector_norm(low, dim=rank_dim) + TINY)
    if prev is not None:
        s_b = s.unsqueeze(1) if right else s.unsqueeze(0)
        q = sumsq(g, low * s_b * (-mix), proj, s, side, idx).sqrt()
        limiter = torch.clamp(q / (prev.to(q.dtype) + TINY), min=gamma) / gamma
        s = s / limiter.to(s.dtype)
        prev.copy_(q / limiter)
    s_b = s.unsqueeze(1) if right else s.unsqueeze(0)
    update = n32 * scale - low * s_b * mix
    apply(p, g, update, proj, s, side, alpha, decay, idx)
