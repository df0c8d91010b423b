"""The adam family: the Adam moment update on an already projected ``R``.

APOLLO and FRUGAL project the gradient themselves (a random or column projection) and
then need only Adam's elementwise step on the low-rank ``R``; this op does that without
pushing ``R`` through an identity-projector GEMM.

Op (``torch.ops.lowrank_kernels.*``):

- ``adam_update(r, exp_avg!, exp_avg_sq!, beta1, beta2, eps) -> N``
- ``adam_foreach_update(r[], exp_avg![], exp_avg_sq![], n![], beta1, beta2, eps) -> ()``: the
  same over lists in one call, ``N`` written into the caller's ``n`` list (an op returning
  a tensor list next to mutated lists cannot be functionalized by torch.compile) (reference: a loop; C++: the loop behind one dispatcher
  call; Triton: one launch per entry for now, a grouped launch is later work).
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import adam as ref

from . import _checks as C
from ._registry import define_op, fake_no_output
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


def validate_foreach_update(r, exp_avg, exp_avg_sq, out, beta1, beta2, eps, *, op="adam_foreach_update_"):
    n = len(r)
    for name, xs in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("n", out)):
        C.fail_value(len(xs) == n, op, lambda: f"{name} must have one entry per tensor of r ({n}), got {len(xs)}")
    written = []
    for i in range(n):
        validate_adam_update(r[i], exp_avg[i], exp_avg_sq[i], beta1, beta2, eps, op=f"{op} (entry {i})")
        C.check_tensor(out[i], "n", f"{op} (entry {i})")
        C.fail_type(out[i].dtype == exp_avg[i].dtype, f"{op} (entry {i})",
                    lambda: f"n must have the moments' dtype {exp_avg[i].dtype}, got {out[i].dtype}")
        C.check_shape(out[i], "n", f"{op} (entry {i})", r[i].shape, "r's shape")
        C.fail_value(out[i].is_contiguous(), f"{op} (entry {i})", "n must be contiguous")
        C.check_same_device(f"{op} (entry {i})", [("r", r[i]), ("n", out[i])])
        written += [(f"exp_avg[{i}]", exp_avg[i]), (f"exp_avg_sq[{i}]", exp_avg_sq[i]), (f"n[{i}]", out[i])]
    # a written tensor must not share memory with another argument (across entries too)
    C.check_no_overlap(op, written, [(f"r[{i}]", r[i]) for i in range(n)])


foreach_update_op = define_op(
    "adam_foreach_update",
    "(Tensor[] r, Tensor(a!)[] exp_avg, Tensor(b!)[] exp_avg_sq, Tensor(c!)[] n, float beta1, float beta2, "
    "float eps) -> ()",
    family="adam",
    reference=ref.adam_foreach_update_ref,
    fake=fake_no_output,
    validate=validate_foreach_update,
)


def _is_subclass(t) -> bool:
    return type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter


def adam_foreach_update_(r, exp_avg, exp_avg_sq, *, beta1=0.9, beta2=0.999, eps=1e-8):
    """:func:`adam_update_` over lists (``r[i]``, ``exp_avg[i]``, ``exp_avg_sq[i]``) in one op call.

    Returns the list of ``N`` (new tensors in the moments' dtypes). Every entry is
    validated before anything is written.
    """
    exp_avg = list(exp_avg)
    # A DTensor moment (FSDP2) gets an N laid out like it (empty_like keeps its placements).
    out = [(torch.empty_like(m, memory_format=torch.contiguous_format) if _is_subclass(m)
            else torch.empty(m.shape, dtype=m.dtype, device=m.device)) if isinstance(m, torch.Tensor) else m
           for m in exp_avg]
    foreach_update_op(list(r), exp_avg, list(exp_avg_sq), out, float(beta1), float(beta2), float(eps))
    return out
