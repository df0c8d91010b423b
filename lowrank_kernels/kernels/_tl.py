"""Shared ``@triton.jit`` helpers of the kernel families (projection, adam, quant).

- :func:`_cast_out`: float32 to a storage dtype, round-to-nearest-even (also under the
  interpreter, whose float32 -> bfloat16 conversion truncates);
- :func:`_group_ids_at`: the GROUP_M tile swizzle (L2 reuse of the big operand);
- :func:`_grouped_problem`: the tile scheduler of the grouped (multi-tensor) kernels, a
  binary search over a host-built table of each problem's first tile;
- :func:`_grouped_ptr`, :func:`_grouped_x16`: a typed pointer / an integer read from such a
  table, carrying the 16-byte (16-element) divisibility of an aligned sub-list.

How an aligned sub-list's table conveys alignment (host side: ``_launch.aligned_row``). The
fields are stored divided by 16 (addresses: the byte distance from the launch's tensor
argument of the same role, divided by 16) and multiplied back by a constant in the kernel, so
Triton's own divisibility analysis (AxisInfo: a product of a constant and anything is divisible
by that constant; a 16-byte aligned pointer argument plus a multiple of 16 bytes is 16-byte
aligned) sees what the host checked. A ``tl.multiple_of`` hint on a value loaded from memory
says the same, but Triton 3.6 drops it there (the aligned rows then compiled without vector
loads or cp.async); the constant product holds under every Triton.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _group_ids_at(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile number ``pid`` on a ``num_pid_m x num_pid_n`` grid, GROUP_M rows at a
    time (the single kernels pass their program id, the grouped ones the tile's number inside
    its problem)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _cast_out(x, DST: tl.constexpr, INTERPRET: tl.constexpr):
    """``x`` (float32) rounded to the storage dtype ``DST``, round-to-nearest-even.

    The GPU's conversion already rounds to nearest even. triton 3.9's interpreter
    truncates float32 -> bfloat16, so there the rounding is done on the bits first
    (the truncation of the rounded value is then exact).
    """
    if INTERPRET:
        if DST == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DST)


@triton.jit
def _grouped_problem(tab_ptr, pid, n_problems, NF: tl.constexpr, TS: tl.constexpr, STEPS: tl.constexpr):
    """The table row (pointer to its first field; rows of ``NF`` int64 fields) of the problem
    that owns tile ``pid``: the last row whose first tile (field ``TS``, non-decreasing) is
    ``<= pid``, by a binary search of ``STEPS >= ceil(log2(n_problems))`` scalar loads
    (unrolled: a runtime loop made ptxas spill; extra steps change nothing). A problem with
    no tile has its successor's first tile and is never chosen. Used by the grouped
    projection kernels (kernels/projection_grouped.py) and the grouped elementwise Adam
    kernels (kernels/adam.py)."""
    lo = pid * 0
    hi = lo + (n_problems - 1)
    for _ in tl.static_range(STEPS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(tab_ptr + mid.to(tl.int64) * NF + TS) <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return tab_ptr + lo.to(tl.int64) * NF


@triton.jit
def _grouped_ptr(row, F: tl.constexpr, like, ALIGNED: tl.constexpr):
    """Address field ``F`` as a pointer to ``like``'s element type. Unaligned: the field is the
    address. ``ALIGNED`` (the host checked every problem's address is 16-byte aligned, what
    Triton's specialization tells the single kernels about a tensor argument): the field is the
    byte distance from ``like`` (the launch's tensor argument of that role, itself aligned)
    divided by 16, so the pointer ``like + field * (16 bytes in elements)`` is known 16-byte
    aligned and loads through it can be vectorized (module doc). Used by the grouped
    projection kernels and the grouped elementwise Adam kernels."""
    if ALIGNED:
        p = like + tl.load(row + F) * (128 // like.dtype.element_ty.primitive_bitwidth)
    else:
        p = tl.load(row + F).to(tl.pointer_type(like.dtype.element_ty))
    return p


@triton.jit
def _grouped_x16(row, F: tl.constexpr, ALIGNED: tl.constexpr):
    """Integer field ``F`` (int64). ``ALIGNED``: the host stored the value divided by 16 (it
    checked every problem's value is a multiple of 16), multiplied back here so that the
    divisibility reaches the masks and offsets (module doc)."""
    x = tl.load(row + F)
    if ALIGNED:
        x = x * 16
    return x
