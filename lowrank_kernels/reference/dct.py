"""Pure-PyTorch reference of the DCT family: the specification.

Notation (DCT-AdamW, Modoranu et al. 2025): ``G`` is ``m x n``; ``C`` is the orthonormal
DCT-II basis of size ``s`` (rows are the cosine waveforms), ``s = n`` for
``side="right"`` and ``s = m`` for ``side="left"``.

- scores: ``side="right"``: ``S = G C^T`` (``m x n``), ``score_j = ||S[:, j]||_p``;
  ``side="left"``: ``S = C G`` (``m x n``), ``score_i = ||S[i, :]||_p``; ``p`` is 1 or 2.
  A 3-D ``G`` (``batch x m x n``) is scored matrix by matrix (``batch x s`` scores).
- a list of same-shape gradients (the multi-tensor form) is scored gradient by gradient
  (``len(grads) x k`` indices).
- top-k: the ``k`` indices of the largest scores, ordered by descending score, ties
  broken by the lower index (a stable descending sort); NaN scores sort first, as in
  ``torch.sort``. Returned as int32.
- projection with indices ``idx`` (length ``r``): the dense projector is
  ``P = C[idx]`` (``r x n``, right) or ``P = C[idx]^T`` (``m x r``, left), and the
  projection family's math applies unchanged: the projection ops take the basis and
  the indices as their DCT projector kind (reference/projection.py).

Computed in float32 (float64 when any input is float64). Arguments are positional
in the op schema order; validation happens in the op router before these run.
"""
from __future__ import annotations

import math

import torch

from . import projection as pref

INDEX_DTYPE = torch.int32


def dct_basis_float64(size: int, device=None) -> torch.Tensor:
    """``C[k, j] = sqrt(2/s) cos(pi k (2j + 1) / (2s))``, row 0 scaled by ``1/sqrt(2)``, in float64."""
    k = torch.arange(size, dtype=torch.float64, device=device).unsqueeze(1)
    j = torch.arange(size, dtype=torch.float64, device=device).unsqueeze(0)
    c = torch.cos(math.pi * k * (2.0 * j + 1.0) / (2.0 * size)) * math.sqrt(2.0 / size)
    c[0] *= 1.0 / math.sqrt(2.0)
    return c


def score_matrix(grad: torch.Tensor, basis: torch.Tensor, side: str, acc: torch.dtype) -> torch.Tensor:
    """``S = G C^T`` (right) or ``C G`` (left) in ``acc`` precision."""
    g = grad.to(acc)
    c = basis.to(acc)
    return g @ c.T if side == "right" else c @ g


def dct_scores_ref(grad, basis, side, norm):
    acc = pref.compute_dtype(grad, basis)
    s = score_matrix(grad, basis, side, acc)  # batched matmul for a 3-D grad
    dim = -2 if side == "right" else -1
    if norm == 1:
        out = s.abs().sum(dim)
    else:
        out = s.square().sum(dim).sqrt()
    return out.to(torch.float64 if acc == torch.float64 else torch.float32)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest by descending score, ties to the lower index, as int32 (along the last dim)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].to(INDEX_DTYPE)


def dct_score_topk_ref(grad, basis, k, side, norm):
    return topk_indices(dct_scores_ref(grad, basis, side, norm), k)


def dct_foreach_score_topk_ref(grads, basis, k, side, norm):
    """The list form: :func:`dct_score_topk_ref` of each gradient, stacked (``len(grads) x k``)."""
    if len(grads) == 0:
        return torch.zeros((0, k), dtype=INDEX_DTYPE, device=basis.device)
    return torch.stack([dct_score_topk_ref(g, basis, k, side, norm) for g in grads])


def dense_projector(basis: torch.Tensor, indices: torch.Tensor, side: str) -> torch.Tensor:
    """``P = C[idx]`` (right, ``r x s``) or ``C[idx]^T`` (left, ``s x r``), a view-free gather."""
    rows = basis.index_select(0, indices.long())
    return rows if side == "right" else rows.T
