"""The orth family: Newton-Schulz orthogonalization of small matrices (Muon, Trion).

Ops (``torch.ops.lowrank_kernels.*``):

- ``orth_newton_schulz(x, coefficients, eps) -> Tensor``: the quintic Newton-Schulz
  iteration of ``lowrank_kernels/reference/orth.py`` on a 2-D ``x`` (any float dtype),
  one ``(a, b, c)`` triple per iteration in the flat list ``coefficients``; a new tensor of
  ``x``'s shape in float32 (float64 for float64 input);
- ``orth_foreach_newton_schulz(xs, coefficients, eps) -> Tensor[]`` (Python:
  :func:`foreach_newton_schulz`): the same on each entry of a list in one op call; entry
  ``i`` is bitwise what the single op returns for ``xs[i]`` on the same backend.

Backends: the reference; C++ (csrc/cpu/orth.cpp: BLAS GEMMs on the ``min(m, n)``-square
Gram matrix, the polynomial's scalars folded into ``addmm``; float32 with ``min(m, n) <= 32``:
the same iteration on raw pointers, no ATen call per stage, within float32 rounding of the BLAS
path); Triton (kernels/orth.py: a
norm kernel, then per iteration a Gram kernel, a polynomial kernel and an update kernel,
float32 accumulation). The Gram matrix is ``s x s`` with ``s = min(m, n)``: for the
``m x r`` / ``r x n`` low-rank updates of Trion every GEMM is ``r``-sized on one side.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from lowrank_kernels.reference import orth as ref
from lowrank_kernels.reference.orth import NS_COEFFICIENTS

from . import _checks as C
from ._registry import define_op, eager_caller

#: the default ``eps`` of the normalization ``X / (||X||_F + eps)`` (the reference packages').
NS_EPS = 1e-7


def _kernels():
    """The orth family's Triton launchers (``lowrank_kernels.kernels.orth``), imported on
    first use: triton is optional, and decides at import whether it interprets."""
    from lowrank_kernels.kernels import orth as kernels

    return kernels


# --------------------------------------------------------------------------- validation
def _check_coefficients(op, coefficients, eps):
    C.fail_type(isinstance(coefficients, (list, tuple)), op,
                lambda: f"coefficients must be a list of floats, got {type(coefficients).__name__}")
    C.fail_value(len(coefficients) % 3 == 0, op,
                 lambda: f"coefficients must hold (a, b, c) triples (a length divisible by 3), got {len(coefficients)}")
    for i, v in enumerate(coefficients):
        C.fail_value(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), op,
                     lambda: f"coefficients[{i}] must be a finite float, got {v!r}")
    C.fail_value(isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0, op,
                 lambda: f"eps must be a finite float >= 0, got {eps!r}")


def validate_newton_schulz(x, coefficients, eps, *, op="newton_schulz"):
    C.check_float(x, "x", op)
    C.check_ndim(x, "x", op, 2)
    _check_coefficients(op, coefficients, eps)


def validate_foreach_newton_schulz(xs, coefficients, eps, *, op="foreach_newton_schulz"):
    C.fail_type(isinstance(xs, (list, tuple)), op, lambda: f"xs must be a list of tensors, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        C.check_float(x, f"xs[{i}]", op)
        C.check_ndim(x, f"xs[{i}]", op, 2)
    C.check_list_devices(op, [("xs", xs)])
    _check_coefficients(op, coefficients, eps)


# --------------------------------------------------------------------------- fakes
def _out_dtype(x):
    return ref.compute_dtype(x)


def _fake_newton_schulz(x, coefficients, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x))


def _fake_foreach_newton_schulz(xs, coefficients, eps):
    return [x.new_empty(x.shape, dtype=_out_dtype(x)) for x in xs]


# --------------------------------------------------------------------------- ops
newton_schulz_op = define_op(
    "orth_newton_schulz",
    "(Tensor x, float[] coefficients, float eps) -> Tensor",
    family="orth",
    reference=ref.orth_newton_schulz_ref,
    triton=lambda: _kernels().orth_newton_schulz_triton,
    cpp="orth_newton_schulz_cpu",
    fake=_fake_newton_schulz,
    validate=validate_newton_schulz,
)

foreach_newton_schulz_op = define_op(
    "orth_foreach_newton_schulz",
    "(Tensor[] xs, float[] coefficients, float eps) -> Tensor[]",
    family="orth",
    reference=ref.orth_foreach_newton_schulz_ref,
    triton=lambda: _kernels().orth_foreach_newton_schulz_triton,
    cpp="orth_foreach_newton_schulz_cpu",
    fake=_fake_foreach_newton_schulz,
    validate=validate_foreach_newton_schulz,
)

_eager_newton_schulz_op = eager_caller(newton_schulz_op)
_eager_foreach_newton_schulz_op = eager_caller(foreach_newton_schulz_op)


# --------------------------------------------------------------------------- public API
Schedule = Union[str, Sequence[Sequence[float]]]


def coefficients_problem(schedule: Schedule, name: str = "coefficients"):
    """``(flat list, None)`` for a valid ``schedule`` (see :func:`ns_coefficients`), else
    ``(None, (exception type, message))`` with the message naming ``name``."""
    if isinstance(schedule, str):
        if schedule not in NS_COEFFICIENTS:
            return None, (ValueError, f"{name} must be one of {', '.join(map(repr, NS_COEFFICIENTS))} or a "
                                      f"sequence of (a, b, c) triples, got {schedule!r}")
        return ref.flat(NS_COEFFICIENTS[schedule]), None
    try:
        triples = [tuple(t) for t in schedule]
    except TypeError:
        return None, (TypeError, f"{name} must be a name or a sequence of (a, b, c) triples, "
                                 f"got {type(schedule).__name__}")
    for i, t in enumerate(triples):
        if len(t) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  for v in t):
            return None, (ValueError, f"{name}[{i}] must be an (a, b, c) triple of finite floats, got {t!r}")
    return ref.flat(triples), None


def ns_coefficients(schedule: Schedule, *, op: str = "newton_schulz") -> list:
    """The ops' flat coefficient list of ``schedule``: a name of
    :data:`~lowrank_kernels.reference.orth.NS_COEFFICIENTS` (``"muon"``, ``"dion"``) or a
    sequence of ``(a, b, c)`` triples, one per iteration."""
    flat, problem = coefficients_problem(schedule)
    if problem is not None:
        raise problem[0](f"{op}: {problem[1]}")
    return flat


def newton_schulz(x: torch.Tensor, coefficients: Schedule = "muon", *, eps: float = NS_EPS) -> torch.Tensor:
    """Orthogonalize ``x`` (2-D, any float dtype) by Newton-Schulz: approximately ``U V^T``
    for ``x = U S V^T``.

    ``coefficients``: ``"muon"`` (5 x ``(3.4445, -4.7750, 2.0315)``), ``"dion"`` (Dion's five
    per-step triples) or a sequence of ``(a, b, c)`` triples; the iteration works on the
    wide orientation after ``X / (||X||_F + eps)``, as the reference's module doc says.
    Returns a new float32 tensor (float64 for float64 input) of ``x``'s shape.
    """
    return _eager_newton_schulz_op(x, ns_coefficients(coefficients), float(eps))


def foreach_newton_schulz(xs, coefficients: Schedule = "muon", *, eps: float = NS_EPS) -> list:
    """:func:`newton_schulz` on each tensor of ``xs`` (any shapes, one device), in one op call;
    entry ``i`` is bitwise ``newton_schulz(xs[i], ...)`` on the same backend."""
    op = "foreach_newton_schulz"
    C.fail_type(isinstance(xs, (list, tuple)), op, lambda: f"xs must be a list of tensors, got {type(xs).__name__}")
    return _eager_foreach_newton_schulz_op(list(xs), ns_coefficients(coefficients, op=op), float(eps))


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the orth family's ops, for ``torch.library.opcheck``: wide, tall
    and square float32 matrices, a bfloat16 one, both named schedules, and for the list op
    entries of different shapes. (An empty list has no tensor for the private C++ op to
    dispatch on; the public op's router answers it, tested in python_tests/ops/test_orth.py.)"""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    muon, dion = ref.flat(NS_COEFFICIENTS["muon"]), ref.flat(NS_COEFFICIENTS["dion"])
    return [
        ("orth_newton_schulz", "wide-muon", (randn(5, 19), muon, NS_EPS)),
        ("orth_newton_schulz", "tall-dion", (randn(23, 6), dion, NS_EPS)),
        ("orth_newton_schulz", "square-bf16", (randn(7, 7, dtype=torch.bfloat16), muon, 1e-6)),
        ("orth_foreach_newton_schulz", "two-shapes", ([randn(4, 11), randn(13, 3)], dion, NS_EPS)),
    ]
