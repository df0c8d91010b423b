"""Triton backend of the gradnormlorp family (``lowrank_kernels::gradnormlorp_foreach_update``).

The Adam update of the whole list is ONE grouped launch (:func:`~lowrank_kernels.kernels.adam.adam_foreach_update_triton`)
on the projected direction gradients; the back-projections with their per-row factors are the
projection family's Triton kernel per entry; the weight-norm gradients, the projection GEMM and
the per-row (length ``m``) arithmetic are the reference's torch operations
(:mod:`lowrank_kernels.reference.gradnormlorp`). Results match the reference to float32 rounding.
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import gradnormlorp as ref
from lowrank_kernels.reference.projection import n_dtype

from .adam import adam_foreach_update_triton
from .projection import projection_backproject_apply_triton


def gradnormlorp_foreach_update_triton(params, grads, projs, exp_avg, exp_avg_sq, wn_g, wn_vnorm, exp_avg_g,
                                       exp_avg_sq_g, side, beta1, beta2, eps, step_size, scale, decay, m_absmax,
                                       v_absmax, block_size, moment_seed):
    """Triton backend of ``lowrank_kernels::gradnormlorp_foreach_update`` (arguments as the op)."""
    wn, rs = [], []
    for i, (p, g, proj) in enumerate(zip(params, grads, projs)):
        a, gv, s, wsq = ref.weight_norm_grads(p, g, wn_g[i], wn_vnorm[i])
        wn.append((a, s, wsq))
        low = gv @ proj.T if side == "right" else proj.T @ gv
        rs.append(low.to(n_dtype(exp_avg[i])).contiguous())
    ns = [torch.empty(t.shape, dtype=n_dtype(t), device=t.device) for t in exp_avg]
    adam_foreach_update_triton(rs, list(exp_avg), list(exp_avg_sq), ns, beta1, beta2, eps, list(m_absmax),
                               list(v_absmax), block_size, list(moment_seed))
    for i, (p, proj) in enumerate(zip(params, projs)):
        n = ns[i]
        if eps == 0.0:
            n = torch.nan_to_num_(n, nan=0.0)
        a, s, wsq = wn[i]

        def apply(row_decay, row_alpha, p=p, n=n, proj=proj):
            projection_backproject_apply_triton(p, n, proj, side, 1.0, 1.0, row_decay=row_decay.to(torch.float32),
                                                row_alpha=row_alpha.to(torch.float32))

        ref.magnitude_step_(p, n, proj, side, a=a, s=s, wsq=wsq, g=wn_g[i], vnorm=wn_vnorm[i], exp_avg_g=exp_avg_g[i],
                            exp_avg_sq_g=exp_avg_sq_g[i], beta1=beta1, beta2=beta2, eps=eps, step_size=step_size[i],
                            scale=scale[i], decay=decay[i], apply=apply)
