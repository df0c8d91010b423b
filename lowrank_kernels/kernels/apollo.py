"""Triton backend of the apollo family (``lowrank_kernels::apollo_foreach_update``).

The Adam update of the whole list is ONE grouped launch (:func:`~lowrank_kernels.kernels.adam.adam_foreach_update_triton`);
the projector draw (torch's device generator, as the reference), the projection GEMMs, the
norms and the weight update are the reference's torch operations per entry
(:mod:`lowrank_kernels.reference.apollo`). Results match the reference to float32 rounding.
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import apollo as ref
from lowrank_kernels.reference.projection import n_dtype

from .adam import adam_foreach_update_triton


def apollo_foreach_update_triton(params, grads, seeds, exp_avg, exp_avg_sq, prev_norm, side, rank, channel, beta1,
                                 beta2, eps, front, alpha, decay, m_absmax, v_absmax, block_size, moment_seed):
    """Triton backend of ``lowrank_kernels::apollo_foreach_update`` (arguments as the op)."""
    rs = []
    for i, (p, g) in enumerate(zip(params, grads)):
        m, n = p.shape
        shape = (rank, n) if side == "right" else (m, rank)
        proj = ref.apollo_projection(shape, int(seeds[i]), p.device, p.dtype, rank)
        rs.append(ref.apollo_project(g, proj, side, exp_avg[i]).contiguous())
    ns = [torch.empty(t.shape, dtype=n_dtype(t), device=t.device) for t in exp_avg]
    adam_foreach_update_triton(rs, list(exp_avg), list(exp_avg_sq), ns, beta1, beta2, eps, list(m_absmax),
                               list(v_absmax), block_size, list(moment_seed))
    for i, (p, g) in enumerate(zip(params, grads)):
        ref.apollo_apply_(p, g, rs[i], ns[i], prev_norm[i] if len(prev_norm) else None, side, channel, front[i],
                          alpha[i], decay[i])
