"""Pure-PyTorch reference of the adam family: the Adam moment update on an already
low-rank (or any) tensor ``R``, the step APOLLO and FRUGAL take after their own
projection.

``exp_avg <- beta1 exp_avg + (1 - beta1) R``, ``exp_avg_sq <- beta2 exp_avg_sq + (1 - beta2) R^2``
(in place), and ``N = exp_avg / (sqrt(exp_avg_sq) + eps)`` returned in the moments'
dtype, all computed in float32 (float64 when any input is float64) from the moments
before they are rounded to their storage dtype: the same math as the projection
family's Adam epilogue (``project_adam_`` with an identity projector), without the GEMM.
"""
from __future__ import annotations

from .projection import adam_moments_, compute_dtype, moment_tail, n_dtype


def adam_update_ref(r, exp_avg, exp_avg_sq, beta1, beta2, eps, m_absmax=None, v_absmax=None, block_size=0,
                    moment_seed=-1):
    """The update (any moment format, see ``adam_moments_``); ``N`` in the moments' dtype
    (float32 for 8-bit moments)."""
    acc = compute_dtype(r, exp_avg)
    return adam_moments_(
        r.to(acc), exp_avg, exp_avg_sq, beta1, beta2, eps, m_absmax, v_absmax, block_size, moment_seed
    ).to(n_dtype(exp_avg))


def adam_foreach_update_ref(r, exp_avg, exp_avg_sq, n, beta1, beta2, eps, m_absmax=(), v_absmax=(), block_size=0,
                            moment_seed=()):
    """The multi-tensor form: the single-tensor update on each entry in turn, ``N`` into ``n``."""
    for i in range(len(r)):
        n[i].copy_(adam_update_ref(r[i], exp_avg[i], exp_avg_sq[i], beta1, beta2, eps,
                                   *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i)))
