"""The residual family: Fira's scaled gradient residual, fused into one back-projection GEMM.

Two ops over the full-size expression ``E = back(low) + f * G`` (reference/residual.py):

- ``residual_sumsq(grad, low, proj, factor, side, indices?) -> Tensor``: ``sum(E^2)``, a
  0-dim float32 tensor (float64 for float64 inputs); ``E`` is never stored;
- ``residual_apply(param!, grad, low, proj, factor, side, alpha, decay, indices?) -> ()``:
  ``param <- decay * param + alpha * E`` in place, no full-size temporary.

``low`` has the low-rank shape (``m x r`` right, ``r x n`` left), ``factor`` is a float32
(or float64) vector along the dimension the projection keeps: length ``m`` for side="right"
(one factor per row), ``n`` for side="left" (one per column). The projector is dense
(``proj`` is ``P``) or DCT basis rows (``proj`` the shared ``s x s`` basis, ``indices`` the
selected rows), as in the projection family.

Fira (:class:`~lowrank_kernels.optim.FiraAdamW`) computes the norm of its scaled residual
``f * (G - back(R))`` with the first op (``low = -f * R``) and applies
``scale * back(N) + f' * (G - back(R))`` with the second (``low = scale * N - f' * R``):
each is one GEMM over tiles of the weight whose epilogue reads ``G``.
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import residual as ref

from . import _checks as C
from ._registry import define_op, eager_caller, fake_no_output
from .projection import check_projector, lowrank_shape


def _kernels():
    """The residual family's Triton launchers (``lowrank_kernels.kernels.residual``), imported
    on first use: triton is optional, and decides at import whether it interprets."""
    from lowrank_kernels.kernels import residual as kernels

    return kernels


FACTOR_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- validators
def _check_common(op, grad, low, proj, factor, side, indices):
    C.check_side(side, op)
    C.check_float(grad, "grad", op)
    C.check_ndim(grad, "grad", op, 2)
    m, n = grad.shape
    r, read = check_projector(op, m, n, side, proj, indices, None, None, 0, 0)
    C.check_float(low, "low", op)
    C.check_shape(low, "low", op, lowrank_shape(m, n, r, side), "the low-rank shape")
    C.check_tensor(factor, "factor", op)
    C.fail_type(factor.dtype in FACTOR_DTYPES, op, lambda: f"factor must be float32 or float64, got {factor.dtype}")
    k = m if side == "right" else n
    C.check_shape(factor, "factor", op, (k,),
                  f"one factor per {'row' if side == 'right' else 'column'} of grad")
    return [("grad", grad), ("low", low), ("factor", factor)] + read


def validate_residual_sumsq(grad, low, proj, factor, side, indices=None, *, op="residual_sumsq"):
    read = _check_common(op, grad, low, proj, factor, side, indices)
    C.check_same_device(op, read)


def validate_residual_apply(param, grad, low, proj, factor, side, alpha, decay, indices=None, *,
                            op="residual_apply_"):
    C.check_float(param, "param", op)
    C.check_ndim(param, "param", op, 2)
    read = _check_common(op, grad, low, proj, factor, side, indices)
    C.check_shape(grad, "grad", op, param.shape, "the parameter's shape")
    C.check_same_device(op, [("param", param)] + read)
    C.check_no_overlap(op, [("param", param)], read)


def _fake_sumsq(grad, low, proj, factor, side, indices=None):
    f64 = any(t.dtype == torch.float64 for t in (grad, low, proj))
    return grad.new_empty((), dtype=torch.float64 if f64 else torch.float32)


# --------------------------------------------------------------------------- ops
sumsq_op = define_op(
    "residual_sumsq",
    "(Tensor grad, Tensor low, Tensor proj, Tensor factor, str side, Tensor? indices=None) -> Tensor",
    family="residual",
    triton=lambda: _kernels().residual_sumsq_triton,
    cpp="residual_sumsq_cpu",
    reference=ref.residual_sumsq_ref,
    fake=_fake_sumsq,
    validate=validate_residual_sumsq,
)

apply_op = define_op(
    "residual_apply",
    "(Tensor(a!) param, Tensor grad, Tensor low, Tensor proj, Tensor factor, str side, float alpha, float decay, "
    "Tensor? indices=None) -> ()",
    family="residual",
    triton=lambda: _kernels().residual_apply_triton,
    cpp="residual_apply_cpu",
    reference=ref.residual_apply_ref,
    fake=fake_no_output,
    validate=validate_residual_apply,
)

_eager_sumsq = eager_caller(sumsq_op)
_eager_apply = eager_caller(apply_op)


def _projector_args(proj, fn):
    """``(tensor, indices)`` of a dense projector or a :class:`~lowrank_kernels.ops.DCTProjector`."""
    if isinstance(proj, torch.Tensor):
        return proj, None
    from .dct import DCTProjector

    if isinstance(proj, DCTProjector):
        return proj.basis, proj.indices
    raise TypeError(f"{fn}: proj must be a Tensor or a DCTProjector, got {type(proj).__name__}")


# --------------------------------------------------------------------------- public API
def residual_sumsq(grad, low, proj, factor, *, side) -> torch.Tensor:
    """``sum(E^2)`` with ``E = back(low) + f * G`` (module doc), without storing ``E``.

    ``proj``: a dense projector or a :class:`~lowrank_kernels.ops.DCTProjector`; ``factor``
    (``f``): one float per row (side="right") or column (side="left") of ``grad``. Returns a
    0-dim float32 tensor (float64 for float64 inputs) on ``grad``'s device (no host sync).
    """
    p, idx = _projector_args(proj, "residual_sumsq")
    return _eager_sumsq(grad, low, p, factor, side, idx)


def residual_apply_(param, grad, low, proj, factor, *, side, alpha, decay=1.0) -> None:
    """``param <- decay * param + alpha * (back(low) + f * G)`` in place (module doc), one
    GEMM over tiles of ``param`` whose epilogue reads ``grad``; arguments as
    :func:`residual_sumsq`."""
    p, idx = _projector_args(proj, "residual_apply_")
    _eager_apply(param, grad, low, p, factor, side, float(alpha), float(decay), idx)


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the residual family's ops, for ``torch.library.opcheck``: both
    sides, dense and DCT projectors (int32 / int64 indices), float32 and bfloat16 weights,
    a transposed gradient."""
    from .dct import dct_basis

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    out = []
    m, n, r = 20, 13, 4
    idx = torch.tensor([4, 0, 9, 2], dtype=torch.int32)
    for side in ("right", "left"):
        low_shape = lowrank_shape(m, n, r, side)
        k = m if side == "right" else n
        dense = randn(r, n) if side == "right" else randn(m, r)
        basis = dct_basis(n if side == "right" else m)
        projs = [("dense", dense, None), ("dct-int32", basis, idx), ("dct-int64", basis, idx.long())]
        for label, p, ix in projs:
            g = randn(m, n)
            out.append(("residual_sumsq", f"{side}-{label}", (g, randn(*low_shape), p, randn(k), side, ix)))
            out.append(("residual_apply", f"{side}-{label}",
                        (randn(m, n), g, randn(*low_shape), p, randn(k), side, -0.01, 0.99, ix)))
        gb = randn(m, n, dtype=torch.bfloat16)
        out.append(("residual_sumsq", f"{side}-bf16", (gb, randn(*low_shape), dense.bfloat16(), randn(k), side)))
        out.append(("residual_apply", f"{side}-bf16",
                    (randn(m, n, dtype=torch.bfloat16), gb, randn(*low_shape), dense.bfloat16(), randn(k), side,
                     -0.01, 0.99)))
        gt = randn(n, m).T
        out.append(("residual_apply", f"{side}-transposed-grad",
                    (randn(m, n), gt, randn(*low_shape), dense, randn(k), side, -0.01, 1.0)))
    return out
