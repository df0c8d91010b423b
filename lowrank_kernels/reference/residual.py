"""Pure-PyTorch reference of the residual family: the scaled gradient residual of Fira.

Notation as reference/projection.py: ``G`` is ``m x n``; side="right": ``P`` is ``r x n``,
``back(X) = X P`` (``X`` is ``m x r``); side="left": ``P`` is ``m x r``, ``back(X) = P X``
(``X`` is ``r x n``). The projector is dense, or rows of a shared DCT basis picked by
``indices`` (``P = C[idx]`` right, ``C[idx]^T`` left).

Both ops evaluate one full-size expression, never stored:

``E = back(low) + f * G``

with ``f`` a vector along the dimension the projection keeps (length ``n`` for side="left",
one factor per column; length ``m`` for side="right", one per row). Because ``f`` runs along
the kept dimension it commutes with the back-projection (``back(f * X) = f * back(X)``), so
Fira's update ``scale * back(N) + f * (G - a * back(R))`` is ``E`` with
``low = scale * N - a * f * R``: one GEMM whose epilogue reads ``G``.

- ``residual_sumsq(grad, low, proj, factor, side, indices)`` -> ``sum(E^2)`` (0-dim);
- ``residual_apply(param!, grad, low, proj, factor, side, alpha, decay, indices)``:
  ``param <- decay * param + alpha * E``.

Computed in float32, or float64 when any input is float64; the result is written back in
the parameter's dtype (round to nearest).
"""
from __future__ import annotations

import torch

from .dct import dense_projector
from .projection import back, compute_dtype


def residual(grad, low, proj, factor, side, indices=None) -> torch.Tensor:
    """``E = back(low) + f * G`` in the accumulation dtype."""
    acc = compute_dtype(grad, low, proj)
    e = back(low, proj if indices is None else dense_projector(proj, indices, side), side, acc)
    f = factor.to(acc)
    f = f[None, :] if side == "left" else f[:, None]
    return e + f * grad.to(acc)


def residual_sumsq_ref(grad, low, proj, factor, side, indices=None) -> torch.Tensor:
    """``sum(E^2)``: a 0-dim tensor in the accumulation dtype."""
    e = residual(grad, low, proj, factor, side, indices)
    return (e * e).sum()


def residual_apply_ref(param, grad, low, proj, factor, side, alpha, decay, indices=None) -> None:
    """``param <- decay * param + alpha * E`` in place."""
    e = residual(grad, low, proj, factor, side, indices)
    acc = compute_dtype(param, e)
    param.copy_(param.to(acc) * decay + alpha * e.to(acc))
