"""Pure-PyTorch reference of the orth family: Newton-Schulz orthogonalization.

``newton_schulz(X, coefficients, eps)`` approximates the orthogonal polar factor ``U V^T``
of ``X = U S V^T`` (Muon's "zeroth power") by a quintic polynomial iteration on the
small Gram matrix:

1. work on the wide orientation: ``X <- X^T`` when ``X`` has more rows than columns
   (the Gram matrix is then ``min(m, n)``-square);
2. ``X <- X / (||X||_F + eps)`` (spectral norm at most 1);
3. for each ``(a, b, c)`` of ``coefficients``: ``A = X X^T``, ``B = b A + c A A``,
   ``X <- a X + B X``;
4. transpose back.

Computed in float32 (float64 for float64 input), returned in that dtype. The named
coefficient sets (:data:`NS_COEFFICIENTS`) are those of the reference implementations:
``"muon"``, five steps of Keller Jordan's ``(3.4445, -4.7750, 2.0315)``, and ``"dion"``,
the five per-step triples of Dion's Triton Newton-Schulz (both as shipped by Trion's
``ista-daslab-optimizers``: its ``ns_type="torch"`` and ``ns_type="triton"``).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

Triple = Tuple[float, float, float]

#: Named coefficient schedules: one ``(a, b, c)`` triple per iteration.
NS_COEFFICIENTS: Dict[str, Tuple[Triple, ...]] = {
    "muon": ((3.4445, -4.7750, 2.0315),) * 5,
    "dion": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def triples(coefficients: Sequence[float]) -> Tuple[Triple, ...]:
    """The flat ``[a0, b0, c0, a1, b1, c1, ...]`` list as ``(a, b, c)`` triples."""
    c = [float(v) for v in coefficients]
    return tuple((c[i], c[i + 1], c[i + 2]) for i in range(0, len(c), 3))


def flat(schedule: Sequence[Triple]) -> list:
    """``(a, b, c)`` triples as the ops' flat coefficient list."""
    return [float(v) for t in schedule for v in t]


def orth_newton_schulz_ref(x: torch.Tensor, coefficients: Sequence[float], eps: float) -> torch.Tensor:
    """The iteration of the module doc on a 2-D ``x``; a new contiguous tensor of ``x``'s shape
    in the compute dtype."""
    X = x.to(compute_dtype(x))
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (torch.linalg.matrix_norm(X) + eps)
    for a, b, c in triples(coefficients):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.T
    return X.contiguous()


def orth_foreach_newton_schulz_ref(xs, coefficients: Sequence[float], eps: float) -> list:
    """The single-tensor iteration on each entry in turn."""
    return [orth_newton_schulz_ref(x, coefficients, eps) for x in xs]
