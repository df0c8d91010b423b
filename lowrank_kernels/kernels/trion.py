"""Triton backend of the trion family (``lowrank_kernels::trion_foreach_update``).

The scoring of the list is ONE launch per shape in it (:func:`~lowrank_kernels.kernels.dct.dct_foreach_score_topk_triton`,
a table of the momentum buffers' addresses; an optimizer's bucket holds one or two shapes); the projection and the two back-projections are
the projection family's Triton kernels per entry (the DCT basis rows gathered by index); the
Newton-Schulz is the orth family's kernels (:func:`~lowrank_kernels.kernels.orth.orth_foreach_newton_schulz_triton`);
the momentum update ``M += G`` is torch's ``add_``. The order and arithmetic are the
reference's (:mod:`lowrank_kernels.reference.trion`); results match it to float32 rounding.
"""
from __future__ import annotations

from lowrank_kernels.reference import trion as ref

from .dct import dct_foreach_score_topk_triton
from .orth import orth_foreach_newton_schulz_triton
from .projection import projection_backproject_apply_triton, projection_project_triton


def _score_topk(grads, basis, k, side, norm):
    """The indices of every entry (a list of int32 rows): one scoring launch per shape in the list."""
    by_shape = {}
    for i, g in enumerate(grads):
        by_shape.setdefault(tuple(g.shape), []).append(i)
    rows = [None] * len(grads)
    for members in by_shape.values():
        idx = dct_foreach_score_topk_triton([grads[i] for i in members], basis, k, side, norm)
        for j, i in enumerate(members):
            rows[i] = idx[j]
    return rows


def trion_foreach_update_triton(params, grads, momentum, basis, side, rank, norm, coefficients, eps, mu, alpha, decay):
    """Triton backend of ``lowrank_kernels::trion_foreach_update`` (arguments as the op)."""
    ref.trion_steps_(params, grads, momentum, basis, side, rank, norm, coefficients, eps,
                     mu, alpha, decay, score_topk=_score_topk, project=projection_project_triton,
                     backproject_apply=projection_backproject_apply_triton,
                     newton_schulz=orth_foreach_newton_schulz_triton)


def trion_foreach_orth_triton(grads, momentum, basis, side, rank, norm, coefficients, eps, mu, orths, indices):
    """Triton backend of ``lowrank_kernels::trion_foreach_orth`` (arguments as the op)."""
    got, idx = ref.orth_steps_(grads, momentum, basis, side, rank, norm, coefficients, eps, mu,
                               score_topk=_score_topk, project=projection_project_triton,
                               backproject_apply=projection_backproject_apply_triton,
                               newton_schulz=orth_foreach_newton_schulz_triton)
    ref.store_halves(got, idx, orths, indices)


def trion_foreach_apply_triton(params, orths, indices, basis, side, alpha, decay):
    """Triton backend of ``lowrank_kernels::trion_foreach_apply`` (arguments as the op)."""
    ref.apply_steps_(params, orths, indices, basis, side, alpha, decay,
                     backproject_apply=projection_backproject_apply_triton)
