"""The quant family: packed INT4 projectors, INT8 weights with stochastic rounding.

The group layout, the rounding rules and the random numbers are specified in
``lowrank_kernels/reference/quant.py``. In short: groups of ``group_size``
consecutive elements in row-major order, float32 ``(scale, minimum)`` per group,
``q = floor((x - min) / s + 0.5)`` (INT4: two values per byte, even index in the low
nibble), and for the INT8 update fresh per-group stats with
``q = floor((x - min) / s + u)``, ``u`` a counter hash of ``(seed, flat index)``.

Ops (``torch.ops.lowrank_kernels.*``):

- ``quant_int4_pack(x, group_size) -> (packed, scale, minimum)``
- ``quant_int4_unpack(packed, scale, minimum, shape, dtype, group_size) -> Tensor``
- ``quant_int8_quantize(w, group_size) -> (q, scale, minimum)``
- ``quant_int8_dequantize(q, scale, minimum, group_size, dtype) -> Tensor``
- ``quant_int8_update_sr(q!, scale!, minimum!, update, decay, alpha, seed, group_size) -> ()``
- ``quant_int4_project_adam``, ``quant_int4_backproject_apply``,
  ``quant_int4_project_update_backproject``: the projection family's three ops with
  the projector given packed (``packed, scale, minimum, rank, group_size``); the
  kernels dequantize projector tiles as they load them.

:class:`Int4Projector` bundles a packed projector; it is registered with
:func:`lowrank_kernels.ops.projection.register_projector_type`, so
``project_adam_`` / ``backproject_apply_`` / ``project_update_backproject_`` accept it
in place of a dense ``proj``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch

from lowrank_kernels.reference import quant as ref

from . import _checks as C
from . import projection as _proj
from ._registry import define_op, fake_no_output

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------- checks
def _check_group_size(group_size, op: str, even: bool) -> None:
    C.fail_value(
        isinstance(group_size, int) and group_size >= (2 if even else 1) and (not even or group_size % 2 == 0),
        op,
        lambda: f"group_size must be a positive{' even' if even else ''} int, got {group_size!r}",
    )


def _check_uint8(t, name: str, op: str) -> None:
    C.check_tensor(t, name, op)
    C.fail_type(t.dtype == torch.uint8, op, lambda: f"{name} must be uint8, got {t.dtype}")
    C.fail_value(t.is_contiguous(), op, lambda: f"{name} must be contiguous")


def _check_stats(scale, minimum, groups: int, op: str) -> None:
    for name, t in (("scale", scale), ("minimum", minimum)):
        C.check_tensor(t, name, op)
        C.fail_type(t.dtype == torch.float32, op, lambda: f"{name} must be float32, got {t.dtype}")
        C.check_shape(t, name, op, (groups,), "one value per group")
        C.fail_value(t.is_contiguous(), op, lambda: f"{name} must be contiguous")


def _check_packed(packed, scale, minimum, numel: int, group_size: int, op: str) -> None:
    _check_uint8(packed, "packed", op)
    C.check_shape(packed, "packed", op, ((numel + 1) // 2,), "ceil(numel / 2) bytes")
    _check_stats(scale, minimum, ref.num_groups(numel, group_size), op)
    C.check_same_device(op, [("packed", packed), ("scale", scale), ("minimum", minimum)])


def validate_int4_pack(x, group_size, *, op="int4_pack"):
    C.check_float(x, "x", op)
    C.fail_value(x.numel() >= 1, op, "x must have at least one element")
    _check_group_size(group_size, op, even=True)


def validate_int4_unpack(packed, scale, minimum, shape, dtype, group_size, *, op="int4_unpack"):
    _check_group_size(group_size, op, even=True)
    C.fail_value(all(int(s) >= 0 for s in shape), op, lambda: f"shape must have non-negative sizes, got {list(shape)}")
    numel = math.prod(shape)
    C.fail_value(numel >= 1, op, lambda: f"shape must have at least one element, got {list(shape)}")
    C.fail_type(dtype in C.FLOAT_DTYPES, op, lambda: f"dtype must be a floating dtype, got {dtype}")
    _check_packed(packed, scale, minimum, numel, group_size, op)


def validate_int8_quantize(w, group_size, *, op="int8_quantize"):
    C.check_float(w, "w", op)
    C.fail_value(w.numel() >= 1, op, "w must have at least one element")
    _check_group_size(group_size, op, even=False)


def validate_int8_dequantize(q, scale, minimum, group_size, dtype, *, op="int8_dequantize"):
    _check_group_size(group_size, op, even=False)
    _check_uint8(q, "q", op)
    C.fail_value(q.numel() >= 1, op, "q must have at least one element")
    C.fail_type(dtype in C.FLOAT_DTYPES, op, lambda: f"dtype must be a floating dtype, got {dtype}")
    _check_stats(scale, minimum, ref.num_groups(q.numel(), group_size), op)
    C.check_same_device(op, [("q", q), ("scale", scale), ("minimum", minimum)])


def validate_int8_update_sr(q, scale, minimum, update, decay, alpha, seed, group_size, *, op="int8_update_sr_"):
    validate_int8_dequantize(q, scale, minimum, group_size, torch.float32, op=op)
    C.check_float(update, "update", op)
    C.check_shape(update, "update", op, q.shape, "the weight's shape")
    C.fail_value(math.isfinite(decay), op, lambda: f"decay must be finite, got {decay}")
    C.fail_value(math.isfinite(alpha), op, lambda: f"alpha must be finite, got {alpha}")
    C.fail_value(isinstance(seed, int) and SEED_MIN <= seed <= SEED_MAX, op, lambda: f"seed must be a 64-bit int, got {seed!r}")
    C.check_same_device(op, [("q", q), ("update", update)])
    C.check_no_overlap(op, [("q", q), ("scale", scale), ("minimum", minimum)], [("update", update)])


def _int4_proj_shape(m, n, rank, side):
    return (rank, n) if side == "right" else (m, rank)


def _check_int4_projector(op, m, n, packed, scale, minimum, rank, group_size, side):
    C.check_side(side, op)
    _check_group_size(group_size, op, even=True)
    C.fail_value(isinstance(rank, int), op, lambda: f"rank must be an int, got {rank!r}")
    C.check_rank(rank, m, n, op, "proj")
    _check_packed(packed, scale, minimum, rank * (n if side == "right" else m), group_size, op)


def validate_int4_project_adam(
    grad, packed, scale, minimum, rank, group_size, exp_avg, exp_avg_sq, side, beta1, beta2, eps, *, op="project_adam_",
    _spans=None,
):
    C.check_side(side, op)
    C.check_float(grad, "grad", op)
    C.check_ndim(grad, "grad", op, 2)
    m, n = grad.shape
    _check_int4_projector(op, m, n, packed, scale, minimum, rank, group_size, side)
    _proj._check_moments(op, exp_avg, exp_avg_sq, _proj.low_rank_shape(m, n, rank, side), grad.dtype)
    _proj._check_hyper(op, beta1, beta2, eps)
    C.check_same_device(op, [("grad", grad), ("packed", packed), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)])
    C.check_no_overlap(
        op, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)],
        [("grad", grad), ("packed", packed), ("scale", scale), ("minimum", minimum)],
        spans=_spans,
    )


def validate_int4_backproject_apply(
    param, update, packed, scale, minimum, rank, group_size, side, alpha, decay, *, op="backproject_apply_"
):
    C.check_side(side, op)
    C.check_float(param, "param", op)
    C.check_ndim(param, "param", op, 2)
    m, n = param.shape
    _check_int4_projector(op, m, n, packed, scale, minimum, rank, group_size, side)
    C.check_float(update, "update", op)
    C.check_shape(update, "update", op, _proj.low_rank_shape(m, n, rank, side), "the low-rank update's shape")
    C.check_same_device(op, [("param", param), ("update", update), ("packed", packed)])
    C.check_no_overlap(op, [("param", param)], [("update", update), ("packed", packed), ("scale", scale), ("minimum", minimum)])


def validate_int4_project_update_backproject(
    param, grad, packed, scale, minimum, rank, group_size, exp_avg, exp_avg_sq, side, lr, beta1, beta2, eps, step,
    weight_decay, scale_factor, *, op="project_update_backproject_",
):
    C.check_float(param, "param", op)
    C.check_ndim(param, "param", op, 2)
    spans = {}
    validate_int4_project_adam(
        grad, packed, scale, minimum, rank, group_size, exp_avg, exp_avg_sq, side, beta1, beta2, eps, op=op, _spans=spans
    )
    C.check_shape(grad, "grad", op, param.shape, "the parameter's shape")
    C.fail_value(step >= 1, op, lambda: f"step must be >= 1 (1-based, after increment), got {step}")
    C.fail_value(lr >= 0.0, op, lambda: f"lr must be >= 0, got {lr}")
    C.check_same_device(op, [("param", param), ("grad", grad)])
    C.check_no_overlap(
        op,
        [("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)],
        [("grad", grad), ("packed", packed), ("scale", scale), ("minimum", minimum)],
        spans=spans,
    )


# --------------------------------------------------------------------------- fakes
def _fake_pack(x, group_size):
    numel = x.numel()
    g = (numel + group_size - 1) // group_size
    return (
        x.new_empty(((numel + 1) // 2,), dtype=torch.uint8),
        x.new_empty((g,), dtype=torch.float32),
        x.new_empty((g,), dtype=torch.float32),
    )


def _fake_unpack(packed, scale, minimum, shape, dtype, group_size):
    return packed.new_empty(tuple(shape), dtype=dtype)


def _fake_int8_quantize(w, group_size):
    g = (w.numel() + group_size - 1) // group_size
    return (
        w.new_empty(w.shape, dtype=torch.uint8),
        w.new_empty((g,), dtype=torch.float32),
        w.new_empty((g,), dtype=torch.float32),
    )


def _fake_int8_dequantize(q, scale, minimum, group_size, dtype):
    return q.new_empty(q.shape, dtype=dtype)


def _fake_int4_project_adam(grad, packed, scale, minimum, rank, group_size, exp_avg, exp_avg_sq, side, beta1, beta2, eps):
    return exp_avg.new_empty(exp_avg.shape)



# --------------------------------------------------------------------------- ops
int4_pack_op = define_op(
    "quant_int4_pack",
    "(Tensor x, int group_size) -> (Tensor, Tensor, Tensor)",
    family="quant", reference=ref.quant_int4_pack_ref, fake=_fake_pack, validate=validate_int4_pack,
)
int4_unpack_op = define_op(
    "quant_int4_unpack",
    "(Tensor packed, Tensor scale, Tensor minimum, int[] shape, ScalarType dtype, int group_size) -> Tensor",
    family="quant", reference=ref.quant_int4_unpack_ref, fake=_fake_unpack, validate=validate_int4_unpack,
)
int8_quantize_op = define_op(
    "quant_int8_quantize",
    "(Tensor w, int group_size) -> (Tensor, Tensor, Tensor)",
    family="quant", reference=ref.quant_int8_quantize_ref, fake=_fake_int8_quantize, validate=validate_int8_quantize,
)
int8_dequantize_op = define_op(
    "quant_int8_dequantize",
    "(Tensor q, Tensor scale, Tensor minimum, int group_size, ScalarType dtype) -> Tensor",
    family="quant", reference=ref.quant_int8_dequantize_ref, fake=_fake_int8_dequantize,
    validate=validate_int8_dequantize,
)
int8_update_sr_op = define_op(
    "quant_int8_update_sr",
    "(Tensor(a!) q, Tensor(b!) scale, Tensor(c!) minimum, Tensor update, float decay, float alpha, int seed, "
    "int group_size) -> ()",
    family="quant", reference=ref.quant_int8_update_sr_ref, fake=fake_no_output, validate=validate_int8_update_sr,
)
int4_project_adam_op = define_op(
    "quant_int4_project_adam",
    "(Tensor grad, Tensor packed, Tensor scale, Tensor minimum, int rank, int group_size, Tensor(a!) exp_avg, "
    "Tensor(b!) exp_avg_sq, str side, float beta1, float beta2, float eps) -> Tensor",
    family="quant", reference=ref.quant_int4_project_adam_ref, fake=_fake_int4_project_adam,
    validate=validate_int4_project_adam,
)
int4_backproject_apply_op = define_op(
    "quant_int4_backproject_apply",
    "(Tensor(a!) param, Tensor update, Tensor packed, Tensor scale, Tensor minimum, int rank, int group_size, "
    "str side, float alpha, float decay) -> ()",
    family="quant", reference=ref.quant_int4_backproject_apply_ref, fake=fake_no_output,
    validate=validate_int4_backproject_apply,
)
int4_project_update_backproject_op = define_op(
    "quant_int4_project_update_backproject",
    "(Tensor(a!) param, Tensor grad, Tensor packed, Tensor scale, Tensor minimum, int rank, int group_size, "
    "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, str side, float lr, float beta1, float beta2, float eps, int step, "
    "float weight_decay, float scale_factor) -> ()",
    family="quant", reference=ref.quant_int4_project_update_backproject_ref, fake=fake_no_output,
    validate=validate_int4_project_update_backproject,
)


# --------------------------------------------------------------------------- public API
def int4_pack(x: torch.Tensor, group_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to 4 bits, asymmetric per group, two values per byte.

    Returns ``(packed, scale, minimum)``: ``packed`` is uint8 of ``ceil(numel / 2)``
    bytes (element ``2i`` in the low nibble of byte ``i``), ``scale`` and ``minimum``
    float32 with one value per group of ``group_size`` consecutive elements (row-major;
    the last group may be short). ``s = max(max - min, 1e-5) / 15``,
    ``q = floor((x - min) / s + 0.5)``: every element is within half a step of
    ``min + s q``, also for groups that are all positive or all negative.
    """
    return int4_pack_op(x, int(group_size))


def int4_unpack(packed, scale, minimum, shape, dtype=torch.float32, *, group_size: int = 256) -> torch.Tensor:
    """Inverse of :func:`int4_pack`: ``min + s * q`` as a tensor of ``shape`` and ``dtype``."""
    return int4_unpack_op(packed, scale, minimum, [int(s) for s in shape], dtype, int(group_size))


def int8_quantize(w: torch.Tensor, group_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to 8 bits (round to nearest), asymmetric per group of ``group_size``.

    Returns ``(q, scale, minimum)``: ``q`` uint8 of ``w``'s shape, ``scale``/``minimum``
    float32 per group; ``s = max(max - min, 1e-5) / 255``.
    """
    return int8_quantize_op(w, int(group_size))


def int8_dequantize(q, scale, minimum, *, group_size: int = 256, dtype=torch.float32) -> torch.Tensor:
    """``min + s * q`` per group, as a new tensor of ``q``'s shape in ``dtype``."""
    return int8_dequantize_op(q, scale, minimum, int(group_size), dtype)


def int8_update_sr_(q, scale, minimum, update, *, decay: float = 1.0, alpha: float = 1.0, seed: int,
                    group_size: int = 256) -> None:
    """``W <- W * decay + alpha * update`` on an INT8 weight, requantized with stochastic rounding.

    One pass per group: dequantize, update in float32, take the group's fresh min/max,
    and write ``q = floor((x - min) / s + u)`` with ``u ~ U[0, 1)`` drawn from a hash of
    ``(seed, flat index)``: unbiased (``E[min + s q] = x``) and deterministic per seed.
    ``q``, ``scale`` and ``minimum`` are updated in place. Pass a different ``seed`` at
    each step (e.g. derived from the step count).
    """
    int8_update_sr_op(q, scale, minimum, update, float(decay), float(alpha), int(seed), int(group_size))


class Int4Projector(NamedTuple):
    """A projector stored as packed INT4 (see :func:`int4_pack`), usable as ``proj``.

    ``shape`` is the dense projector's shape: ``(rank, n)`` for ``side="right"``,
    ``(m, rank)`` for ``side="left"``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    shape: Tuple[int, int]
    group_size: int = 256

    @classmethod
    def quantize(cls, proj: torch.Tensor, group_size: int = 256) -> "Int4Projector":
        """Pack a dense 2-D projector."""
        C.check_float(proj, "proj", "Int4Projector.quantize")
        C.check_ndim(proj, "proj", "Int4Projector.quantize", 2)
        packed, scale, minimum = int4_pack(proj, group_size)
        return cls(packed, scale, minimum, (int(proj.shape[0]), int(proj.shape[1])), int(group_size))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The dense projector ``min + s q`` (for tests and debugging; the kernels never build it)."""
        return int4_unpack(self.packed, self.scale, self.minimum, self.shape, dtype, group_size=self.group_size)

    def nbytes(self) -> int:
        """Bytes held: packed nibbles plus the per-group scale and minimum."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minimum))


def _rank_of(proj: Int4Projector, side: str, m: int, n: int, op: str) -> int:
    C.check_side(side, op)
    expect = (proj.shape[0], n) if side == "right" else (m, proj.shape[1])
    C.fail_value(
        tuple(proj.shape) == expect,
        op,
        f"side={side!r} needs proj of shape {'(rank, n) = (rank, ' + str(n) + ')' if side == 'right' else '(m, rank) = (' + str(m) + ', rank)'}, got {tuple(proj.shape)}",
    )
    return int(proj.shape[0] if side == "right" else proj.shape[1])


def _grad_shape(t, name, op):
    C.check_float(t, name, op)
    C.check_ndim(t, name, op, 2)
    return t.shape


def _int4_project_adam_(grad, proj, exp_avg, exp_avg_sq, *, side, beta1=0.9, beta2=0.999, eps=1e-8):
    m, n = _grad_shape(grad, "grad", "project_adam_")
    rank = _rank_of(proj, side, m, n, "project_adam_")
    return int4_project_adam_op(
        grad, proj.packed, proj.scale, proj.minimum, rank, int(proj.group_size), exp_avg, exp_avg_sq, side,
        float(beta1), float(beta2), float(eps),
    )


def _int4_backproject_apply_(param, update, proj, *, side, alpha, decay=1.0):
    m, n = _grad_shape(param, "param", "backproject_apply_")
    rank = _rank_of(proj, side, m, n, "backproject_apply_")
    int4_backproject_apply_op(
        param, update, proj.packed, proj.scale, proj.minimum, rank, int(proj.group_size), side, float(alpha),
        float(decay),
    )


def _int4_project_update_backproject_(
    param, grad, proj, exp_avg, exp_avg_sq, *, side, lr, beta1=0.9, beta2=0.999, eps=1e-8, step, weight_decay=0.0,
    scale=1.0,
):
    m, n = _grad_shape(param, "param", "project_update_backproject_")
    rank = _rank_of(proj, side, m, n, "project_update_backproject_")
    int4_project_update_backproject_op(
        param, grad, proj.packed, proj.scale, proj.minimum, rank, int(proj.group_size), exp_avg, exp_avg_sq, side,
        float(lr), float(beta1), float(beta2), float(eps), int(step), float(weight_decay), float(scale),
    )


_proj.register_projector_type(
    Int4Projector,
    project_adam_=_int4_project_adam_,
    backproject_apply_=_int4_backproject_apply_,
    project_update_backproject_=_int4_project_update_backproject_,
)

__all__ = [
    "int4_pack",
    "int4_unpack",
    "int8_quantize",
    "int8_dequantize",
    "int8_update_sr_",
    "Int4Projector",
]
