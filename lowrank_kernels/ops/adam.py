"""The adam family: the Adam moment update on an already projected ``R``.

APOLLO and FRUGAL project the gradient themselves (a random or column projection) and
then need only Adam's elementwise step on the low-rank ``R``; this op does that without
pushing ``R`` through an identity-projector GEMM.

Op (``torch.ops.lowrank_kernels.*``):

- ``adam_update(r, exp_avg!, exp_avg_sq!, beta1, beta2, eps) -> N``
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import adam as ref

from . import _checks as C
from ._registry import define_op
from .projection import _check_hyper


def validate_adam_update(r, exp_avg, exp_avg_sq, beta1, beta2, eps, *, op="adam_update_"):
    C.check_float(r, "r", op)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        C.check_float(t, name, op)
        C.check_shape(t, name, op, r.shape, "r's shape")
        C.check_moment_dtype(t, name, r.dtype, op)
    if exp_avg.dtype != exp_avg_sq.dtype:
        raise TypeError(f"{op}: exp_avg ({exp_avg.dtype}) and exp_avg_sq ({exp_avg_sq.dtype}) must have one dtype")
    _check_hyper(op, beta1, beta2, eps)
    C.check_same_device(op, [("r", r), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)])
    C.check_no_overlap(op, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)], [("r", r)])


def _fake_adam_update(r, exp_avg, exp_avg_sq, beta1, beta2, eps):
    return exp_avg.new_empty(exp_avg.shape)


adam_update_op = define_op(
    "adam_update",
    "(Tensor r, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, float beta1, float beta2, float eps) -> Tensor",
    family="adam",
    reference=ref.adam_update_ref,
    fake=_fake_adam_update,
    validate=validate_adam_update,
)


def adam_update_(r, exp_avg, exp_avg_sq, *, beta1=0.9, beta2=0.999, eps=1e-8) -> torch.Tensor:
    """The Adam moment update on ``r`` (e.g. an already projected gradient), in place.

    ``exp_avg <- beta1 exp_avg + (1 - beta1) r``, ``exp_avg_sq <- beta2 exp_avg_sq +
    (1 - beta2) r^2``, computed in float32 (float64 for float64 inputs). Returns
    ``N = exp_avg / (sqrt(exp_avg_sq) + eps)`` (no bias correction), a new tensor of
    ``r``'s shape in the moments' dtype: what :func:`project_adam_` returns with an
    identity projector, without the GEMM.
    """
    return adam_update_op(r, exp_avg, exp_avg_sq, float(beta1), float(beta2), float(eps))
