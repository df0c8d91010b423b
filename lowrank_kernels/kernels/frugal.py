"""Triton backend of the frugal family (``lowrank_kernels::frugal_foreach_update``).

The Adam update of the whole list is ONE grouped launch (:func:`~lowrank_kernels.kernels.adam.adam_foreach_update_triton`);
the back-projections (residual and update) are the projection family's Triton kernel per entry;
the projection GEMM and the state-free update are the reference's torch operations
(:mod:`lowrank_kernels.reference.frugal`). Results match the reference to float32 rounding.
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import frugal as ref
from lowrank_kernels.reference.projection import n_dtype

from .adam import adam_foreach_update_triton
from .projection import projection_backproject_apply_triton


def frugal_foreach_update_triton(params, grads, projs, exp_avg, exp_avg_sq, side, signsgd, beta1, beta2, eps, alpha,
                                 decay, free_alpha, m_absmax, v_absmax, block_size, moment_seed):
    """Triton backend of ``lowrank_kernels::frugal_foreach_update`` (arguments as the op)."""
    lows = []
    for g, proj, m in zip(grads, projs, exp_avg):
        low = g @ proj.T if side == "right" else proj.T @ g
        lows.append(low)
    rs = [low.to(torch.float32 if m.dtype == torch.uint8 else m.dtype).contiguous() for low, m in zip(lows, exp_avg)]
    ns = [torch.empty(t.shape, dtype=n_dtype(t), device=t.device) for t in exp_avg]
    adam_foreach_update_triton(rs, list(exp_avg), list(exp_avg_sq), ns, beta1, beta2, eps, list(m_absmax),
                               list(v_absmax), block_size, list(moment_seed))
    for i, (p, g, proj) in enumerate(zip(params, grads, projs)):
        ref.frugal_apply_(p, g, proj, lows[i], ns[i], side, signsgd, alpha[i], decay[i], free_alpha[i],
                          projection_backproject_apply_triton)
