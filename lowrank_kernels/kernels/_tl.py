"""Shared ``@triton.jit`` helpers of the kernel families (projection, adam, quant).

- :func:`_cast_out`: float32 to a storage dtype, round-to-nearest-even (also under the
  interpreter, whose float32 -> bfloat16 conversion truncates);
- :func:`_group_ids_at`: the GROUP_M tile swizzle (L2 reuse of the big operand);
- :func:`_grouped_problem`: the tile scheduler of the grouped (multi-tensor) kernels, a
  binary search over a host-built table of each problem's first tile;
- :func:`_grouped_ptr`: a typed pointer read from such a table, with the 16-byte alignment
  hint of an aligned sub-list.
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
    """Address field ``F`` as a pointer to ``like``'s element type; ``ALIGNED``: the host
    checked it is 16-byte aligned in every problem (what Triton's specialization tells the
    single kernels about a tensor argument), so loads through it can be vectorized. Used by
    the grouped projection kernels and the grouped elementwise Adam kernels."""
    p = tl.load(row + F).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p
