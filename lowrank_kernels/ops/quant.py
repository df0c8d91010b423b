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

:class:`Int4Projector` bundles a packed projector. It is the projection family's packed
INT4 projector kind (registered with
:func:`lowrank_kernels.ops.projection.register_projector_type`): ``project_adam_`` /
``backproject_apply_`` / ``project_update_backproject_`` accept it in place of a dense
``proj`` and run the ``projection_*`` ops with ``proj=packed, q_scale=scale,
q_min=minimum, rank, group_size``, whose kernels dequantize projector tiles as they load
them.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch

from lowrank_kernels.reference import quant as ref

from . import _checks as C
from . import projection as _proj
from ._registry import define_op, fake_no_output


def _kernels():
    """The quant family's Triton launchers (``lowrank_kernels.kernels.quant``), imported on
    first use: triton is optional, and decides at import whether it interprets."""
    from lowrank_kernels.kernels import quant as kernels

    return kernels


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------- checks
# The packed-INT4 checks are shared with the projection family's INT4 projector kind.
_check_group_size = _proj.check_group_size
_check_uint8 = _proj.check_uint8
_check_stats = _proj.check_stats
_check_packed = _proj.check_packed


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


# --------------------------------------------------------------------------- ops
int4_pack_op = define_op(
    "quant_int4_pack",
    "(Tensor x, int group_size) -> (Tensor, Tensor, Tensor)",
    family="quant",
    reference=ref.quant_int4_pack_ref,
    triton=lambda: _kernels().quant_int4_pack_triton,
    cpp="quant_int4_pack_cpu",
    fake=_fake_pack,
    validate=validate_int4_pack,
)
int4_unpack_op = define_op(
    "quant_int4_unpack",
    "(Tensor packed, Tensor scale, Tensor minimum, int[] shape, ScalarType dtype, int group_size) -> Tensor",
    family="quant",
    reference=ref.quant_int4_unpack_ref,
    triton=lambda: _kernels().quant_int4_unpack_triton,
    cpp="quant_int4_unpack_cpu",
    fake=_fake_unpack,
    validate=validate_int4_unpack,
)
int8_quantize_op = define_op(
    "quant_int8_quantize",
    "(Tensor w, int group_size) -> (Tensor, Tensor, Tensor)",
    family="quant",
    reference=ref.quant_int8_quantize_ref,
    triton=lambda: _kernels().quant_int8_quantize_triton,
    cpp="quant_int8_quantize_cpu",
    fake=_fake_int8_quantize,
    validate=validate_int8_quantize,
)
int8_dequantize_op = define_op(
    "quant_int8_dequantize",
    "(Tensor q, Tensor scale, Tensor minimum, int group_size, ScalarType dtype) -> Tensor",
    family="quant",
    reference=ref.quant_int8_dequantize_ref,
    triton=lambda: _kernels().quant_int8_dequantize_triton,
    cpp="quant_int8_dequantize_cpu",
    fake=_fake_int8_dequantize,
    validate=validate_int8_dequantize,
)
int8_update_sr_op = define_op(
    "quant_int8_update_sr",
    "(Tensor(a!) q, Tensor(b!) scale, Tensor(c!) minimum, Tensor update, float decay, float alpha, int seed, "
    "int group_size) -> ()",
    family="quant",
    reference=ref.quant_int8_update_sr_ref,
    triton=lambda: _kernels().quant_int8_update_sr_triton,
    cpp="quant_int8_update_sr_cpu",
    fake=fake_no_output,
    validate=validate_int8_update_sr,
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
        lambda: f"side={side!r} needs proj of shape {'(rank, n) = (rank, ' + str(n) + ')' if side == 'right' else '(m, rank) = (' + str(m) + ', rank)'}, got {tuple(proj.shape)}",
    )
    return int(proj.shape[0] if side == "right" else proj.shape[1])


def _op_args(proj: Int4Projector, side, m, n, op):
    # The ops' packed INT4 projector kind; the rank comes from the dense shape.
    rank = _rank_of(proj, side, m, n, op)
    return proj.packed, None, proj.scale, proj.minimum, rank, int(proj.group_size)


_proj.register_projector_type(Int4Projector, op_args=_op_args)

__all__ = [
    "int4_pack",
    "int4_unpack",
    "int8_quantize",
    "int8_dequantize",
    "int8_update_sr_",
    "Int4Projector",
]


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the quant family's ops, for ``torch.library.opcheck``.

    Returns ``[(op name, label, args), ...]``, made afresh at each call: an odd shape whose
    last group is short (INT4 groups of 64, INT8 groups of 50), unpacking to bfloat16. (The
    projection family's samples cover the packed INT4 projector kind.)
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(13, 21, generator=gen)
    packed, s4, m4 = ref.quant_int4_pack_ref(x, 64)
    q, s8, m8 = ref.quant_int8_quantize_ref(x, 50)
    return [
        ("quant_int4_pack", "odd-shape", (x, 64)),
        ("quant_int4_unpack", "to-bf16", (packed, s4, m4, [13, 21], torch.bfloat16, 64)),
        ("quant_int8_quantize", "odd-shape", (x, 50)),
        ("quant_int8_dequantize", "to-f32", (q, s8, m8, 50, torch.float32)),
        ("quant_int8_update_sr", "odd-shape", (q.clone(), s8.clone(), m8.clone(), torch.randn(13, 21, generator=gen),
                                               0.99, -0.1, 5, 50)),
    ]
