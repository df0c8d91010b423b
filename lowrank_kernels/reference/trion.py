"""Pure-PyTorch reference of the trion family: Trion's step over a list of weights (the
arithmetic of ``Trion``'s per-parameter step, operation for operation).

Per entry ``i`` (weight ``W``, gradient ``G``, momentum buffer ``M``, all of one shape; the
shared DCT ``basis`` whose rows are the basis vectors; ``P = basis[idx]`` on the right,
``basis[idx]^T`` on the left; ``back(N) = N P`` or ``P N``):

- ``M <- M + G``;
- ``idx`` = the ``rank`` basis vectors best aligned with ``M`` (``dct_score_topk``, its
  ``norm``);
- ``m = M P^T`` (right) or ``P^T M`` (left), float32 (float64 for float64);
- ``M <- M - (1 - momentum[i]) back(m)``;
- ``O = newton_schulz(m)`` (``coefficients``, ``eps``);
- ``W <- decay[i] W + alpha[i] back(O)``.

The momentum of every entry is updated and scored before any projection: the entries are
independent, so the order does not change a result.
"""
from __future__ import annotations

from .dct import dct_foreach_score_topk_ref
from .orth import orth_foreach_newton_schulz_ref
from .projection import projection_backproject_apply_ref, projection_project_ref


def orth_steps_(grads, momentum, basis, side, rank, norm, coefficients, eps, mu, *, score_topk, project,
                backproject_apply, newton_schulz):
    """Steps ``M += G`` up to ``O`` of the module doc on every entry, on the given backends
    (each called with its op's positional arguments: ``score_topk(grads, basis, k, side, norm)``
    of the list form, ``project(grad, proj, side, indices)``, ``backproject_apply(param, update,
    proj, side, alpha, decay, indices)``, ``newton_schulz(xs, coefficients, eps)`` of the list
    form). Returns ``(orths, idx)``, ``idx`` indexable by entry (None for an empty list)."""
    if not len(momentum):
        return [], None
    for M, g in zip(momentum, grads):
        M.add_(g)
    idx = score_topk(list(momentum), basis, rank, side, norm)
    lows = []
    for i, M in enumerate(momentum):
        low = project(M, basis, side, idx[i])
        backproject_apply(M, low, basis, side, -(1.0 - mu[i]), 1.0, idx[i])
        lows.append(low)
    return list(newton_schulz(lows, coefficients, eps)), idx


def apply_steps_(params, orths, idx, basis, side, alpha, decay, *, backproject_apply):
    """The last step of the module doc, ``W <- decay W + alpha back(O)``, on every entry."""
    for i, p in enumerate(params):
        backproject_apply(p, orths[i], basis, side, alpha[i], decay[i], idx[i])


def trion_steps_(params, grads, momentum, basis, side, rank, norm, coefficients, eps, mu, alpha, decay, *,
                 score_topk, project, backproject_apply, newton_schulz):
    """The step of the module doc on every entry, on the given backends (as :func:`orth_steps_`)."""
    if not len(params):
        return
    orths, idx = orth_steps_(grads, momentum, basis, side, rank, norm, coefficients, eps, mu, score_topk=score_topk,
                             project=project, backproject_apply=backproject_apply, newton_schulz=newton_schulz)
    apply_steps_(params, orths, idx, basis, side, alpha, decay, backproject_apply=backproject_apply)


def trion_foreach_update_ref(params, grads, momentum, basis, side, rank, norm, coefficients, eps, mu, alpha, decay):
    """Each entry as the module doc says, on the reference backends."""
    trion_steps_(params, grads, momentum, basis, side, rank, norm, coefficients, eps, mu, alpha, decay,
                 score_topk=dct_foreach_score_topk_ref, project=projection_project_ref,
                 backproject_apply=projection_backproject_apply_ref, newton_schulz=orth_foreach_newton_schulz_ref)


def trion_foreach_orth_ref(grads, momentum, basis, side, rank, norm, coefficients, eps, mu, orths, indices):
    """Steps ``M += G`` up to ``O`` of each entry on the reference backends, ``O`` into
    ``orths[i]`` and the basis indices into ``indices`` (``len x rank`` int32)."""
    got, idx = orth_steps_(grads, momentum, basis, side, rank, norm, coefficients, eps, mu,
                           score_topk=dct_foreach_score_topk_ref, project=projection_project_ref,
                           backproject_apply=projection_backproject_apply_ref,
                           newton_schulz=orth_foreach_newton_schulz_ref)
    store_halves(got, idx, orths, indices)


def trion_foreach_apply_ref(params, orths, indices, basis, side, alpha, decay):
    """``W <- decay W + alpha back(O)`` of each entry on the reference backend."""
    apply_steps_(params, orths, indices, basis, side, alpha, decay,
                 backproject_apply=projection_backproject_apply_ref)


def store_halves(got, idx, orths, indices):
    """``got[i]`` into ``orths[i]`` and the rows ``idx[i]`` into ``indices``."""
    for i, o in enumerate(got):
        orths[i].copy_(o)
        indices[i].copy_(idx[i])
