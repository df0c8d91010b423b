"""Triton kernels of the projection family: project + Adam epilogue, back-project + apply.

Two GEMM kernels, each with its elementwise work fused into the epilogue:

``_projection_project_adam_kernel``
    tiles of the low-rank gradient ``R`` (side="right": ``R = G P^T``, ``m x r``,
    reduction over ``n``; side="left": ``R = P^T G``, ``r x n``, reduction over ``m``),
    float32 accumulation, then in the same program: load the ``M``/``V`` tiles,
    ``M = b1 M + (1-b1) R``, ``V = b2 V + (1-b2) R^2``, store them, and store
    ``N = M / (sqrt(V) + eps)`` (computed from the float32 moments, before they are
    rounded to their storage dtype, exactly as the reference). ``R`` never reaches
    memory. No split-K: the epilogue is nonlinear.
``_projection_backproject_apply_kernel``
    tiles of the weight (side="right": ``back(N) = N P``; side="left": ``P N``;
    reduction over ``r``), epilogue ``W = decay * W + alpha * acc`` written in place
    in ``W``'s dtype; no full-size temporary exists.

Both kernels are one generic ``C[i, j] = sum_k A[i, k] B[k, j]`` in which one operand
is the gradient / update (read through explicit strides, so transposed views work)
and the other is the projector, read through :func:`_load_proj_tile`. Operand layouts
for the usual row-major tensors: right-side project reads ``G`` and ``P^T`` both
contiguous along ``k`` (an NT GEMM), left-side project reads ``P^T`` contiguous along
``i`` and ``G`` contiguous along ``j`` (a TN GEMM; Hopper's wgmma takes MN-major 16-bit
operands from shared memory); both back-projections are plain NN GEMMs. Integer
arguments equal to 1 are specialised by Triton, so unit strides are compile-time
constants and loads along them are vectorised and coalesced whichever dimension
they are.

Moment formats (m8spec; constexpr ``MOMENTS`` of the project + Adam kernel):
float moments as above; bf16 moments stored with stochastic rounding
(:func:`_round_sr_bf16`: 16 bits of the counter hash of reference/quant.py added below
the kept bits, counter = the moment's flat index, ``+ numel`` for ``V``; identical bits
to reference/moments.py ``bf16_round_sr_ref``); 8-bit moments (uint8 codes + float32
absmax per block of at most ``block_size`` elements inside a row, reference/moments.py):
each program's columns are exactly one quantization block (``qstep = min(block_size,
N)`` columns in ``BLOCK_N = max(16, next_pow2(qstep))`` lanes, tile table
``project_q8``), so the epilogue dequantizes the codes through the 256-entry maps
(a gather from :func:`q8_maps`), updates in float32, computes ``N`` (float32) from those
values, reduces the new absmax of each block row in registers and requantizes by an
8-step binary search over the map's 255 float32 midpoints (:func:`_q8_encode`). No
float32 moment tensor is written to memory. A block holding a NaN or an infinity gets
absmax NaN and the zero code.

Multi-tensor form (issue 12): ``_projection_project_adam_grouped_kernel`` and
``_projection_backproject_apply_grouped_kernel`` run the two kernels above over a whole list
of parameters of any shapes, one launch each (see "grouped kernels" below: one int64 table
of addresses / shapes / strides / per-parameter scalars, one program per tile of any
problem found by a binary search over the host-built tile starts, the tile computed by the
single kernels' code, :func:`_project_adam_tile` / :func:`_backproject_apply_tile`); the
launcher :func:`projection_foreach_project_update_backproject_triton` splits a list that
mixes dtypes or moment formats into uniform sub-lists. One tile config per grouped launch
(the table's tile of the largest problem; ``*_grouped`` tables in kernels/_launch.py).

Projector modes. ``_load_proj_tile`` is the one place that turns (rank index, dim
index) into projector values, selected by the constexpr ``PROJ_MODE``: 0 dense, 1 a
packed INT4 projector dequantized in the tile load (lowrank_kernels/kernels/quant.py),
2 rows of a shared DCT basis gathered by index (lowrank_kernels/kernels/dct.py). The
launchers take such projectors through ``_proj_launch_args``; the GEMM loops and
epilogues do not change.

Speed (H100/H200): tile configs from the per-arch table of
``lowrank_kernels/kernels/_launch.py`` (deterministic; runtime autotuning only with
``LOWRANK_KERNELS_TRITON_AUTOTUNE=1``), GROUP_M tile swizzle for L2 reuse of the big
operand, pipelined loads (``num_stages``), and a ``PREFETCH`` variant that issues the
epilogue's loads (moments, or ``W``) before the GEMM loop so their memory traffic
overlaps it. Both kernels share one main loop, :func:`_gemm_main_loop`.

Dtypes: float32 / bfloat16 / float16 tensors, float32 accumulation. The GEMM operands
are cast to one "dot dtype": the 16-bit dtype when the operands are that 16-bit
dtype and possibly float32 (tensor cores at the 16-bit rate; e.g. a float32 ``N``
is rounded to the bf16 of the projector in the back-projection), float32 with
``input_precision="ieee"`` when every operand is float32 (torch's default, no TF32),
and float32 with TF32 when bf16 meets fp16 (TF32 holds every bf16 and fp16 value
exactly). Under ``TRITON_INTERPRET=1`` the dot dtype is always float32: triton 3.9's
interpreter miscomputes bf16 arithmetic and bf16 dots, so every load is upcast first.
float64 is rejected with a TypeError (use the reference or C++ backend).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import math
from typing import NamedTuple, Optional

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.reference.projection import adam_step_size

# The shared launch policy (lowrank_kernels/kernels/_launch.py), under the names the
# other kernel families and the tests use.
_INTERPRET = L.INTERPRET
_SUPPORTED = L.SUPPORTED
_TL_DTYPE = L.TL_DTYPE
_INT32_MAX = L.INT32_MAX
_check_dtypes = L.check_dtypes
_dot_config = L.dot_config
_needs_int64 = L.needs_int64

# Projector storage modes understood by _load_proj_tile.
PROJ_DENSE = 0
# Packed INT4 (lowrank_kernels/reference/quant.py): p_ptr = the uint8 nibbles,
# aux0_ptr / aux1_ptr = the float32 per-group scale / minimum, aux_int = group size.
PROJ_INT4 = 1
# DCT basis rows picked by index (lowrank_kernels/ops/dct.py): p_ptr = the shared
# s x s basis, aux0_ptr = the int32/int64 indices, aux_int = their number (the rank),
# aux_bound = the basis' row count s (indices outside [0, s) read zeros, never memory
# outside the basis).
PROJ_DCT = 2


# --------------------------------------------------------------------------- shared device helpers
@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, grouped GROUP_M tile-rows at a time for L2 reuse."""
    return _group_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)


@triton.jit
def _group_ids(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program on a ``num_pid_m x num_pid_n`` grid, GROUP_M rows at a time."""
    return _group_ids_at(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)


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
def _load_proj_tile(
    p_ptr, rank_idx, dim_idx, mask, stride_rank, stride_dim, OUT_DTYPE: tl.constexpr, PROJ_MODE: tl.constexpr,
    aux0_ptr, aux1_ptr, aux_int, aux_bound,
):
    """Projector values at (rank_idx, dim_idx), broadcast to one tile, as ``OUT_DTYPE``.

    ``rank_idx`` indexes the rank dimension (rows of a right projector ``r x n``,
    columns of a left projector ``m x r``), ``dim_idx`` the other one; they are
    broadcastable index tensors (e.g. ``[1, BN]`` and ``[BK, 1]``), so the caller
    chooses the tile orientation. Masked-off elements are 0.

    PROJ_MODE 0 (dense): ``p_ptr + rank_idx * stride_rank + dim_idx * stride_dim``.

    Modes to add here (the caller passes the extra pointers through the kernel):
    - DCT gather (``P[i, :] = C[idx[i], :]``, ``C`` the shared ``s x s`` basis):
      ``row = tl.load(idx_ptr + rank_idx, mask=rank_idx < r)``, then
      ``tl.load(c_ptr + row * stride_c0 + dim_idx * stride_c1, mask)``.
    - packed INT4 (row-major projector, element ``e = row * ncols + col`` where
      (row, col) is (rank, dim) for right and (dim, rank) for left, i.e.
      ``e = rank_idx * stride_rank + dim_idx * stride_dim`` with the contiguous
      strides): ``byte = tl.load(q_ptr + e // 2, mask)``, nibble
      ``(byte >> 4 * (e % 2)) & 15`` (even index in the low nibble), group
      ``g = e // 256``, value ``tl.load(min_ptr + g) + tl.load(scale_ptr + g) * nibble``
      computed in float32, then ``.to(OUT_DTYPE)``.

    PROJ_MODE 1 (packed INT4, implemented as sketched above): the strides are the
    dense row-major projector's, ``aux0_ptr``/``aux1_ptr`` the per-group scale/minimum
    and ``aux_int`` the group size (``-log2`` of it when a power of two: the
    group index is then a shift). ``aux*`` are unused by the dense mode.

    PROJ_MODE 2 (DCT gather): ``p_ptr`` is the basis ``C``, ``stride_rank`` /
    ``stride_dim`` its row / column strides, ``aux0_ptr`` the indices and ``aux_int``
    their number, ``aux_bound`` the basis' row count: the value at (a, d) is
    ``C[idx[a], d]`` for both sides, and 0 when ``idx[a]`` is outside ``[0, aux_bound)``
    (masked: a bad index never reads outside the basis on a GPU, where nothing checks it).
    """
    tl.static_assert(PROJ_MODE == 0 or PROJ_MODE == 1 or PROJ_MODE == 2,
                     "PROJ_MODE must be 0 (dense), 1 (packed INT4) or 2 (DCT gather)")
    if PROJ_MODE == 2:
        row = tl.load(aux0_ptr + rank_idx, mask=rank_idx < aux_int, other=0).to(tl.int64)
        in_basis = (row >= 0) & (row < aux_bound)
        tile = tl.load(p_ptr + row * stride_rank + dim_idx * stride_dim, mask=mask & in_basis, other=0.0)
        return tile.to(OUT_DTYPE)
    elif PROJ_MODE == 1:
        e = rank_idx * stride_rank + dim_idx * stride_dim
        byte = tl.load(p_ptr + e // 2, mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((e % 2) * 4).to(tl.int32)) & 15
        if aux_int < 0:  # power-of-two group size 2^-aux_int: a shift, not an integer division
            grp = e >> (-aux_int)
        else:
            grp = e // aux_int
        s = tl.load(aux0_ptr + grp, mask=mask, other=0.0)
        mn = tl.load(aux1_ptr + grp, mask=mask, other=0.0)
        return (mn + s * nib.to(tl.float32)).to(OUT_DTYPE)
    else:
        tile = tl.load(p_ptr + rank_idx * stride_rank + dim_idx * stride_dim, mask=mask, other=0.0)
        return tile.to(OUT_DTYPE)


# --------------------------------------------------------------------------- shared main loop
@triton.jit
def _gemm_main_loop(
    x_ptr, stride_x0, stride_x1, p_ptr, stride_p_rank, stride_p_dim, aux0_ptr, aux1_ptr, aux_int, aux_bound,
    offs_m, offs_n, offs_k, mask_m, mask_n, K,
    SIDE_RIGHT: tl.constexpr, PROJ_RANK_ON_K: tl.constexpr, PROJ_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """``acc[i, j] = sum_k A[i, k] B[k, j]`` (float32) over one ``BLOCK_M x BLOCK_N`` tile.

    One operand is ``X`` (gradient or update, explicit strides), the other the projector
    (:func:`_load_proj_tile`). ``SIDE_RIGHT``: ``A = X`` (``X[i, k]``), ``B`` the
    projector; else ``A`` the projector, ``B = X`` (``X[k, j]``). ``PROJ_RANK_ON_K``:
    the reduction runs over the projector's rank index (back-projection), else over its
    other index (projection).
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            mask_a = mask_m[:, None]
            mask_b = mask_n[None, :]
        else:
            mask_a = mask_m[:, None] & (kk[None, :] < K)
            mask_b = (kk[:, None] < K) & mask_n[None, :]
        if SIDE_RIGHT:
            a = tl.load(x_ptr + offs_m[:, None] * stride_x0 + kk[None, :] * stride_x1, mask=mask_a, other=0.0)
            a = a.to(DOT_DTYPE)
            if PROJ_RANK_ON_K:
                b = _load_proj_tile(p_ptr, kk[:, None], offs_n[None, :], mask_b, stride_p_rank, stride_p_dim,
                                    DOT_DTYPE, PROJ_MODE, aux0_ptr, aux1_ptr, aux_int, aux_bound)
            else:
                b = _load_proj_tile(p_ptr, offs_n[None, :], kk[:, None], mask_b, stride_p_rank, stride_p_dim,
                                    DOT_DTYPE, PROJ_MODE, aux0_ptr, aux1_ptr, aux_int, aux_bound)
        else:
            if PROJ_RANK_ON_K:
                a = _load_proj_tile(p_ptr, kk[None, :], offs_m[:, None], mask_a, stride_p_rank, stride_p_dim,
                                    DOT_DTYPE, PROJ_MODE, aux0_ptr, aux1_ptr, aux_int, aux_bound)
            else:
                a = _load_proj_tile(p_ptr, offs_m[:, None], kk[None, :], mask_a, stride_p_rank, stride_p_dim,
                                    DOT_DTYPE, PROJ_MODE, aux0_ptr, aux1_ptr, aux_int, aux_bound)
            b = tl.load(x_ptr + kk[:, None] * stride_x0 + offs_n[None, :] * stride_x1, mask=mask_b, other=0.0)
            b = b.to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  IDX64: tl.constexpr):
    """Row/column/reduction offsets of this program's tile (int64 when ``IDX64``) and the row/column masks."""
    return _tile_offsets_at(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IDX64)


@triton.jit
def _tile_offsets_at(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, IDX64: tl.constexpr):
    """:func:`_tile_offsets` of tile number ``pid`` of an ``M x N`` problem."""
    pid_m, pid_n = _group_ids_at(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    return offs_m, offs_n, offs_k, offs_m < M, offs_n < N


@triton.jit
def _tile_offsets_q8(M, N, qstep, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, IDX64: tl.constexpr):
    """As :func:`_tile_offsets` for 8-bit moments: the program's columns are quantization
    block ``pid_n`` (``[pid_n * qstep, pid_n * qstep + qstep)`` with ``qstep = min(block_size, N)``,
    ``BLOCK_N >= qstep`` lanes, the extra lanes masked off). Also returns ``pid_n``."""
    return _tile_offsets_q8_at(tl.program_id(0), M, N, qstep, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IDX64)


@triton.jit
def _tile_offsets_q8_at(pid, M, N, qstep, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, IDX64: tl.constexpr):
    """:func:`_tile_offsets_q8` of tile number ``pid`` of an ``M x N`` problem."""
    pid_m, pid_n = _group_ids_at(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, qstep), GROUP_M)
    lane = tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * qstep + lane
    offs_k = tl.arange(0, BLOCK_K)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    return offs_m, offs_n, offs_k, offs_m < M, (offs_n < N) & (lane < qstep), pid_n


# --------------------------------------------------------------------------- moment formats
# MOMENTS constexpr of the Adam epilogues (kernels/projection.py, kernels/adam.py):
MOMENTS_PLAIN = 0  # moments in their dtype (float32 / bf16 / fp16), round to nearest on store
MOMENTS_SR16 = 1  # bf16 moments, stochastic rounding on store (moment_seed >= 0)
MOMENTS_Q8 = 2  # uint8 codes + float32 absmax per block (reference/moments.py)


@triton.jit
def _hash32(x):
    """The 32-bit "lowbias32" hash of reference/quant.py (``mix32``) on uint32 ``x``
    (uint32 arithmetic: products wrap mod 2**32, shifts are logical). kernels/quant.py's
    ``_mix32`` computes the same in int64; this one needs half the registers."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _round_sr_bf16(x, ctr, k1, k2, INTERPRET: tl.constexpr):
    """``x`` (float32) rounded stochastically to bfloat16 (reference/moments.py ``bf16_round_sr_ref``).

    ``ctr``: the uint32 counter of each element (the low 32 bits of the flat index,
    + numel for the second moment: the reference hashes ``i & 0xFFFFFFFF``). ``bf16 bits = (bits(x) + (h >> 16)) >> 16`` with
    ``h = mix32(mix32(idx ^ k1) ^ k2)``; NaN and infinities round to nearest (pass
    through). The sum is formed in uint32 (no wrap: a finite float's bits plus 0xFFFF
    stay below 2**32), truncated, then converted to bfloat16 exactly (the value is
    already a bfloat16).
    """
    h = _hash32(_hash32(ctr ^ tl.cast(k1, tl.uint32)) ^ tl.cast(k2, tl.uint32))  # tl.cast: k may be a constexpr 1
    b = x.to(tl.uint32, bitcast=True)
    sr = ((b + (h >> 16)) & tl.full((), 0xFFFF0000, tl.uint32)).to(tl.float32, bitcast=True)
    finite = (x == x) & (tl.abs(x) != float("inf"))
    return _cast_out(tl.where(finite, sr, x), tl.bfloat16, INTERPRET)


@triton.jit
def _adam_moments(m, v, r, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """``(beta1 m + (1 - beta1) r, beta2 v + (1 - beta2) r^2)`` in float32, rounded exactly as
    the reference's torch ops (``m.mul(beta1).add_(r, alpha=1 - beta1)`` and
    ``v.mul(beta2).addcmul_(r, r, value=1 - beta2)`` compute ``fma(r, 1 - beta1, beta1 m)`` and
    ``fma((1 - beta2) r, r, beta2 v)``), so the float32 moments, and with them the stochastic
    rounding and the 8-bit codes, equal the reference's bit for bit (the elementwise adam
    kernels; the projection epilogue rounds each operation, its R differing anyway)."""
    m = tl.fma(r, one_minus_beta1, beta1 * m)
    v = tl.fma(one_minus_beta2 * r, r, beta2 * v)
    return m, v


@triton.jit
def _q8_decode(codes, absmax, map_ptr):
    """``map[codes] * absmax[row]`` (float32): one quantization block per tile row."""
    return tl.load(map_ptr + codes.to(tl.int32)) * absmax[:, None]


@triton.jit
def _q8_encode(x, mask, mids_ptr):
    """``(codes, absmax)`` of float32 ``x`` (one quantization block per tile row, ``mask``
    the block's valid elements), exactly as reference/moments.py ``moments_quantize_ref``.

    ``absmax = max |x|`` over the block; ``codes`` = the number of the map's 255 float32
    midpoints (``mids_ptr``, sorted) strictly below ``x * (1 / absmax)`` (nearest entry, ties
    down), found by an 8-step binary search over the count. A block holding a NaN or an
    infinity gets ``absmax = NaN`` and every code of the map's zero entry (the code of
    ``0``); a zero block gets ``absmax = 0``.
    """
    ax = tl.where(mask, tl.abs(x), 0.0)
    absmax = tl.max(ax, axis=1)
    bad = tl.max(tl.where(mask & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0), axis=1) > 0
    safe = tl.where(absmax > 0, absmax, 1.0)
    inv = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    normed = tl.where(bad[:, None], 0.0, x * inv[:, None])
    c = tl.zeros(x.shape, tl.int32)
    for j in tl.static_range(8):
        # after the steps 128 .. 2^(8-j): c <= 255 - 2 * 2^(7-j) + 1, so c + step - 1 <= 254
        mid = tl.load(mids_ptr + c + ((128 >> j) - 1))
        c = tl.where(mid < normed, c + (128 >> j), c)
    absmax = tl.where(bad, float("nan"), absmax)
    return c.to(tl.uint8), absmax


# --------------------------------------------------------------------------- project + Adam
# The stochastic-rounding keys change every step (they come from the step's seed): typed int64
# and not specialized, so every seed launches the same compiled kernel (Triton otherwise
# specializes an integer argument on its value: 1, divisibility by 16, int32 vs int64 range).
@triton.jit(do_not_specialize=["k1", "k2"])
def _projection_project_adam_kernel(
    g_ptr, p_ptr, m_ptr, v_ptr, n_ptr,
    M, N, K,
    stride_g0, stride_g1,
    stride_p_rank, stride_p_dim,
    stride_m0, stride_m1,
    stride_v0, stride_v1,
    stride_n0, stride_n1,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    aux0_ptr, aux1_ptr, aux_int, aux_bound,
    ma_ptr, va_ptr, qmap_ptr, qstep, nblk, k1: tl.int64, k2: tl.int64, sr_off,
    skip_ptr,
    SIDE_RIGHT: tl.constexpr,
    PROJ_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    INTERPRET: tl.constexpr,
    MOMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PREFETCH: tl.constexpr,
    EVEN_K: tl.constexpr,
    SKIP: tl.constexpr = False,
):
    """One ``BLOCK_M x BLOCK_N`` tile of ``R`` (``M x N``, reduction ``K``) + the Adam epilogue.

    right: ``R[i, j] = sum_k G[i, k] P[j, k]`` (M=m, N=r, K=n);
    left:  ``R[i, j] = sum_k P[k, i] G[k, j]`` (M=r, N=n, K=m).

    ``MOMENTS``: :data:`MOMENTS_PLAIN` (moments in their dtype; ``ma_ptr`` .. ``sr_off``
    unused), :data:`MOMENTS_SR16` (bf16 moments stored with stochastic rounding, keys
    ``k1``/``k2``, counter = flat index, ``+ sr_off`` (the numel) for ``V``) or
    :data:`MOMENTS_Q8` (``m_ptr``/``v_ptr`` uint8 codes, ``ma_ptr``/``va_ptr`` the float32
    absmax, ``nblk`` blocks per row, ``qmap_ptr`` = signed map, unsigned map, signed
    midpoints, unsigned midpoints at offsets 0/256/512/768; the program's columns are
    one quantization block of ``qstep`` columns, see :func:`_tile_offsets_q8`).

    ``SKIP``: ``skip_ptr`` points at this parameter's uint8 skip flag; when it is nonzero
    every load and store is masked off (moments, absmax and ``N`` stay as they were).
    """
    if MOMENTS == 2:
        offs_m, offs_n, offs_k, mask_m, mask_n, blk = _tile_offsets_q8(M, N, qstep, BLOCK_M, BLOCK_N, BLOCK_K,
                                                                       GROUP_M, IDX64)
    else:
        offs_m, offs_n, offs_k, mask_m, mask_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IDX64)
        blk = 0
    _project_adam_tile(
        g_ptr, p_ptr, m_ptr, v_ptr, n_ptr, offs_m, offs_n, offs_k, mask_m, mask_n, blk, N, K,
        stride_g0, stride_g1, stride_p_rank, stride_p_dim, stride_m0, stride_m1, stride_v0, stride_v1,
        stride_n0, stride_n1, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        aux0_ptr, aux1_ptr, aux_int, aux_bound, ma_ptr, va_ptr, qmap_ptr, nblk, k1, k2, sr_off, skip_ptr,
        SIDE_RIGHT, PROJ_MODE, DOT_DTYPE, INPUT_PRECISION, INTERPRET, MOMENTS, BLOCK_M, BLOCK_N, BLOCK_K, PREFETCH,
        EVEN_K, SKIP,
    )


@triton.jit
def _project_adam_tile(
    g_ptr, p_ptr, m_ptr, v_ptr, n_ptr, offs_m, offs_n, offs_k, mask_m, mask_n, blk, N, K,
    stride_g0, stride_g1, stride_p_rank, stride_p_dim, stride_m0, stride_m1, stride_v0, stride_v1,
    stride_n0, stride_n1, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    aux0_ptr, aux1_ptr, aux_int, aux_bound, ma_ptr, va_ptr, qmap_ptr, nblk, k1, k2, sr_off, skip_ptr,
    SIDE_RIGHT: tl.constexpr, PROJ_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, MOMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, EVEN_K: tl.constexpr, SKIP: tl.constexpr,
):
    """The body of the project + Adam kernels (single and grouped): one tile of ``R`` at the
    given offsets (``blk``: the quantization block of 8-bit moments, else unused) and its Adam
    epilogue. Arguments as :func:`_projection_project_adam_kernel`'s."""
    if MOMENTS == 2:
        ma_ptrs = ma_ptr + offs_m * nblk + blk
        va_ptrs = va_ptr + offs_m * nblk + blk
    if SKIP:  # the flag broadcast over the tile's rows (one cached byte)
        mask_m = mask_m & (tl.load(skip_ptr + offs_m * 0) == 0)
    mask = mask_m[:, None] & mask_n[None, :]
    m_ptrs = m_ptr + offs_m[:, None] * stride_m0 + offs_n[None, :] * stride_m1
    v_ptrs = v_ptr + offs_m[:, None] * stride_v0 + offs_n[None, :] * stride_v1
    if PREFETCH:
        # Issue the moments' loads before the GEMM so their latency hides behind it (costs
        # registers across the loop: only the smaller tiles try it).
        mo = tl.load(m_ptrs, mask=mask, other=0)
        vo = tl.load(v_ptrs, mask=mask, other=0)
        if MOMENTS == 2:
            am = tl.load(ma_ptrs, mask=mask_m, other=0.0)
            av = tl.load(va_ptrs, mask=mask_m, other=0.0)

    acc = _gemm_main_loop(
        g_ptr, stride_g0, stride_g1, p_ptr, stride_p_rank, stride_p_dim, aux0_ptr, aux1_ptr, aux_int, aux_bound,
        offs_m, offs_n, offs_k, mask_m, mask_n, K,
        SIDE_RIGHT, False, PROJ_MODE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
    )

    # Epilogue: the Adam moments of this tile, and N (from the float32 moments).
    if not PREFETCH:
        mo = tl.load(m_ptrs, mask=mask, other=0)
        vo = tl.load(v_ptrs, mask=mask, other=0)
        if MOMENTS == 2:
            am = tl.load(ma_ptrs, mask=mask_m, other=0.0)
            av = tl.load(va_ptrs, mask=mask_m, other=0.0)
    if MOMENTS == 2:
        mo = _q8_decode(mo, am, qmap_ptr)
        vo = _q8_decode(vo, av, qmap_ptr + 256)
    else:
        mo = mo.to(tl.float32)
        vo = vo.to(tl.float32)
    # one rounding per operation (not _adam_moments' fused multiply-adds: R already differs
    # from the reference's in the last bits, and the fma form spills the 8-bit epilogue on sm_90)
    mo = beta1 * mo + one_minus_beta1 * acc
    vo = beta2 * vo + one_minus_beta2 * (acc * acc)
    nn = tl.math.div_rn(mo, tl.sqrt_rn(vo) + eps)
    tl.store(n_ptr + offs_m[:, None] * stride_n0 + offs_n[None, :] * stride_n1, _cast_out(nn, n_ptr.dtype.element_ty, INTERPRET),
             mask=mask)
    if MOMENTS == 2:
        cm, am = _q8_encode(mo, mask, qmap_ptr + 512)
        tl.store(m_ptrs, cm, mask=mask)
        tl.store(ma_ptrs, am, mask=mask_m)
        cv, av = _q8_encode(vo, mask, qmap_ptr + 768)
        tl.store(v_ptrs, cv, mask=mask)
        tl.store(va_ptrs, av, mask=mask_m)
    elif MOMENTS == 1:
        # flat index mod 2**32 in uint32 arithmetic (half the registers of an int64 tile)
        ctr = offs_m.to(tl.uint32)[:, None] * tl.cast(N, tl.uint32) + offs_n.to(tl.uint32)[None, :]
        tl.store(m_ptrs, _round_sr_bf16(mo, ctr, k1, k2, INTERPRET), mask=mask)
        tl.store(v_ptrs, _round_sr_bf16(vo, ctr + tl.cast(sr_off, tl.uint32), k1, k2, INTERPRET), mask=mask)
    else:
        tl.store(m_ptrs, _cast_out(mo, m_ptr.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(v_ptrs, _cast_out(vo, v_ptr.dtype.element_ty, INTERPRET), mask=mask)


# --------------------------------------------------------------------------- back-project + apply
@triton.jit
def _projection_backproject_apply_kernel(
    w_ptr, u_ptr, p_ptr,
    M, N, K,
    stride_w0, stride_w1,
    stride_u0, stride_u1,
    stride_p_rank, stride_p_dim,
    alpha, decay,
    aux0_ptr, aux1_ptr, aux_int, aux_bound,
    skip_ptr, coef_ptr,
    SIDE_RIGHT: tl.constexpr,
    PROJ_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PREFETCH: tl.constexpr,
    EVEN_K: tl.constexpr,
    SKIP: tl.constexpr = False,
    COEF: tl.constexpr = False,
):
    """One ``BLOCK_M x BLOCK_N`` tile of ``W`` (``m x n``): ``W = decay * W + alpha * back(U)``.

    right: ``back[i, j] = sum_k U[i, k] P[k, j]``; left: ``back[i, j] = sum_k P[i, k] U[k, j]``
    (K = r). ``SKIP``: a nonzero uint8 at ``skip_ptr`` masks every load and store off (``W``
    unchanged); ``COEF``: ``alpha = -coef[0]``, ``decay = coef[1]`` loaded from ``coef_ptr``
    (float32/float64, rounded to float32 as a scalar argument is) instead of the arguments.
    """
    offs_m, offs_n, offs_k, mask_m, mask_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IDX64)
    _backproject_apply_tile(
        w_ptr, u_ptr, p_ptr, offs_m, offs_n, offs_k, mask_m, mask_n, K,
        stride_w0, stride_w1, stride_u0, stride_u1, stride_p_rank, stride_p_dim, alpha, decay,
        aux0_ptr, aux1_ptr, aux_int, aux_bound, skip_ptr, coef_ptr,
        SIDE_RIGHT, PROJ_MODE, DOT_DTYPE, INPUT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, PREFETCH, EVEN_K,
        SKIP, COEF,
    )


@triton.jit
def _backproject_apply_tile(
    w_ptr, u_ptr, p_ptr, offs_m, offs_n, offs_k, mask_m, mask_n, K,
    stride_w0, stride_w1, stride_u0, stride_u1, stride_p_rank, stride_p_dim, alpha, decay,
    aux0_ptr, aux1_ptr, aux_int, aux_bound, skip_ptr, coef_ptr,
    SIDE_RIGHT: tl.constexpr, PROJ_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr, EVEN_K: tl.constexpr, SKIP: tl.constexpr, COEF: tl.constexpr,
):
    """The body of the back-project + apply kernels (single and grouped): one tile of ``W`` at
    the given offsets. Arguments as :func:`_projection_backproject_apply_kernel`'s."""
    if SKIP:  # the flag broadcast over the tile's rows (one cached byte)
        mask_m = mask_m & (tl.load(skip_ptr + offs_m * 0) == 0)
    if COEF:
        alpha = -tl.load(coef_ptr).to(tl.float32)
        decay = tl.load(coef_ptr + 1).to(tl.float32)
    mask = mask_m[:, None] & mask_n[None, :]
    w_ptrs = w_ptr + offs_m[:, None] * stride_w0 + offs_n[None, :] * stride_w1
    if PREFETCH:
        # W's load overlaps the (short, K = rank) GEMM instead of following it.
        w = tl.load(w_ptrs, mask=mask, other=0.0)

    acc = _gemm_main_loop(
        u_ptr, stride_u0, stride_u1, p_ptr, stride_p_rank, stride_p_dim, aux0_ptr, aux1_ptr, aux_int, aux_bound,
        offs_m, offs_n, offs_k, mask_m, mask_n, K,
        SIDE_RIGHT, True, PROJ_MODE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
    )

    if not PREFETCH:
        w = tl.load(w_ptrs, mask=mask, other=0.0)
    w = decay * w.to(tl.float32) + alpha * acc
    tl.store(w_ptrs, _cast_out(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


# --------------------------------------------------------------------------- grouped (multi-tensor) kernels
# A grouped launch runs one kernel over a list of problems (parameters) of any shapes: one
# program per output tile of any problem, grid = the total tile count. The problems are
# described by ONE int64 table (:func:`_group_table`), one row of ``_NF`` fields per
# problem, read by both grouped kernels: the tensors' addresses (cast back to typed
# pointers in the kernel: ``tl.load(row + F).to(tl.pointer_type(rep.dtype.element_ty))``,
# ``rep`` a tensor argument of the same dtype, the element type of the whole launch), shapes,
# strides, per-problem scalars, the original list index (the ``skip`` / ``coeffs`` rows) and
# each kernel's first tile. Tile scheduler: a program finds its problem by a binary search
# over the host-built prefix of tile counts (:func:`_grouped_problem`, ``ceil(log2 n)``
# scalar loads), then computes the tile exactly as the single kernel does with its tile
# number inside the problem (:func:`_tile_offsets_at`) and runs the same body
# (:func:`_project_adam_tile`, :func:`_backproject_apply_tile`). Chosen over a persistent
# grid (Triton's grouped-GEMM tutorial walks the problems inside a loop of NUM_SM
# programs) because it needs no SM count, keeps one tile per program exactly as the single
# kernels (same per-tile code and register budget) and its grid is fixed on the host,
# which a CUDA graph replays as is.
_F_G = tl.constexpr(0)  # address of the gradient
_F_P = tl.constexpr(1)  # the projector (dense), packed codes (INT4) or the DCT basis
_F_M = tl.constexpr(2)  # exp_avg (uint8 codes for 8-bit moments)
_F_V = tl.constexpr(3)  # exp_avg_sq
_F_A0 = tl.constexpr(4)  # INT4 scale / DCT indices
_F_A1 = tl.constexpr(5)  # INT4 minimum
_F_MA = tl.constexpr(6)  # 8-bit: exp_avg's absmax
_F_VA = tl.constexpr(7)  # 8-bit: exp_avg_sq's absmax
_F_W = tl.constexpr(8)  # the parameter
_F_OUT = tl.constexpr(9)  # element offset of this problem's N (contiguous) in the launch's flat N buffer
_F_TS_P = tl.constexpr(10)  # first tile of the problem in the project + Adam launch
_F_TS_B = tl.constexpr(11)  # first tile of the problem in the back-project launch
_F_DM = tl.constexpr(12)  # m (the parameter's rows)
_F_DN = tl.constexpr(13)  # n (its columns)
_F_DR = tl.constexpr(14)  # rank
_F_G0 = tl.constexpr(15)  # gradient strides
_F_G1 = tl.constexpr(16)
_F_PR = tl.constexpr(17)  # projector strides along the rank / the other dim
_F_PD = tl.constexpr(18)
_F_M0 = tl.constexpr(19)  # exp_avg strides
_F_M1 = tl.constexpr(20)
_F_V0 = tl.constexpr(21)  # exp_avg_sq strides
_F_V1 = tl.constexpr(22)
_F_W0 = tl.constexpr(23)  # parameter strides
_F_W1 = tl.constexpr(24)
_F_AUXI = tl.constexpr(25)  # aux_int of _load_proj_tile (INT4 group size, DCT rank)
_F_AUXB = tl.constexpr(26)  # aux_bound (DCT basis rows)
_F_QSTEP = tl.constexpr(27)  # 8-bit: min(block_size, N) columns per quantization block
_F_NBLK = tl.constexpr(28)  # 8-bit: blocks per moment row
_F_K1 = tl.constexpr(29)  # stochastic rounding keys of the problem's moment seed
_F_K2 = tl.constexpr(30)
_F_IDX = tl.constexpr(31)  # the problem's index in the op's lists (row of skip / coeffs)
_NF = tl.constexpr(32)

# UNIT (constexpr) of the grouped kernels: bit ``1 << j`` set when stride field ``_F_G0 + j``
# (gradient, projector, moments, parameter strides, in field order) is 1 in every problem of
# the launch, so the kernel uses the constant (vectorized, coalesced loads along it, as the
# single kernels get from Triton's specialization of integer arguments equal to 1).
_UNIT_FIELDS = tuple((1 << j, 15 + j) for j in range(10))  # (bit, field)


@triton.jit
def _grouped_problem(tab_ptr, pid, n_problems, NF: tl.constexpr, TS: tl.constexpr, STEPS: tl.constexpr):
    """The table row (pointer to its first field; rows of ``NF`` int64 fields) of the problem
    that owns tile ``pid``: the last row whose first tile (field ``TS``, non-decreasing) is
    ``<= pid``, by a binary search of ``STEPS >= ceil(log2(n_problems))`` scalar loads
    (unrolled: a runtime loop made ptxas spill; extra steps change nothing). A problem with
    no tile has its successor's first tile and is never chosen. Also used by the grouped
    elementwise Adam kernels (kernels/adam.py)."""
    lo = pid * 0
    hi = lo + (n_problems - 1)
    for _ in tl.static_range(STEPS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(tab_ptr + mid.to(tl.int64) * NF + TS) <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return tab_ptr + lo.to(tl.int64) * NF


@triton.jit
def _grouped_int(row, F: tl.constexpr, IDX64: tl.constexpr):
    """Field ``F`` of a table row as an offset integer (int64 when ``IDX64``, else int32, as
    the single kernels' integer arguments)."""
    x = tl.load(row + F)
    if not IDX64:
        x = x.to(tl.int32)
    return x


@triton.jit
def _grouped_projector_aux(row, aux0_ptr, aux1_ptr, PROJ_MODE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """A problem's projector extras from its table row: ``(aux0, aux1, aux_int, aux_bound)`` as
    ``_proj_launch_args`` gives the single kernels (DCT indices / INT4 scale and minimum); the
    launch's placeholders and zeros for a dense projector."""
    a0 = aux0_ptr
    a1 = aux1_ptr
    aux_int = 0
    aux_bound = 0
    if PROJ_MODE != 0:
        a0 = _grouped_ptr(row, _F_A0, aux0_ptr, ALIGNED)
        a1 = _grouped_ptr(row, _F_A1, aux1_ptr, ALIGNED)
        aux_int = tl.load(row + _F_AUXI).to(tl.int32)
        aux_bound = tl.load(row + _F_AUXB).to(tl.int32)
    return a0, a1, aux_int, aux_bound


@triton.jit
def _grouped_stride(row, F: tl.constexpr, BIT: tl.constexpr, UNIT: tl.constexpr, IDX64: tl.constexpr,
                    ALIGNED: tl.constexpr = False):
    """Stride field ``F``, or the constant 1 when ``UNIT`` says it is 1 in every problem;
    ``ALIGNED``: the host checked that a non-unit stride is a multiple of 16 in every problem."""
    s = 1
    if (UNIT & BIT) == 0:
        s = _grouped_int(row, F, IDX64)
        if ALIGNED:
            s = tl.multiple_of(s, 16)
    return s


@triton.jit
def _grouped_ptr(row, F: tl.constexpr, like, ALIGNED: tl.constexpr):
    """Address field ``F`` as a pointer to ``like``'s element type; ``ALIGNED``: the host
    checked it is 16-byte aligned in every problem (what Triton's specialization tells the
    single kernels about a tensor argument), so loads through it can be vectorized."""
    p = tl.load(row + F).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _grouped_dim(row, F: tl.constexpr, ALIGNED: tl.constexpr):
    """Dimension field ``F`` (int32); ``ALIGNED``: a multiple of 16 in every problem (the masks
    along a contiguous dimension then stay constant over a vector, as the single kernels'
    masks against a size Triton specialized as divisible by 16)."""
    d = tl.load(row + F).to(tl.int32)
    if ALIGNED:
        d = tl.multiple_of(d, 16)
    return d


@triton.jit
def _projection_project_adam_grouped_kernel(
    tab_ptr, n_problems,
    g_ptr, p_ptr, m_ptr, v_ptr, n_ptr, aux0_ptr, aux1_ptr, ma_ptr, va_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    qmap_ptr, skip_ptr,
    SIDE_RIGHT: tl.constexpr,
    PROJ_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    INTERPRET: tl.constexpr,
    MOMENTS: tl.constexpr,
    UNIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PREFETCH: tl.constexpr,
    EVEN_K: tl.constexpr,
    SKIP: tl.constexpr = False,
    STEPS: tl.constexpr = 0,
    ALIGNED: tl.constexpr = False,
):
    """:func:`_projection_project_adam_kernel` over a list of problems in one launch.

    ``tab_ptr``: the problems' table (``n_problems`` rows, see ``_F_*``); ``g_ptr`` ..
    ``va_ptr``: tensors of the launch's dtypes (their element types type the table's
    addresses; only ``n_ptr``, the flat N buffer, is also read: N of problem ``i`` is
    ``n_ptr + out_offset[i]``, contiguous). ``skip_ptr``: the op's ``(n,)`` uint8 flags,
    indexed by the problem's list index. Every tile is computed by the single kernel's code.
    """
    pid = tl.program_id(0)
    row = _grouped_problem(tab_ptr, pid, n_problems, _NF, _F_TS_P, STEPS)
    tile = pid - tl.load(row + _F_TS_P).to(tl.int32)
    dm = _grouped_dim(row, _F_DM, ALIGNED)
    dn = _grouped_dim(row, _F_DN, ALIGNED)
    dr = _grouped_dim(row, _F_DR, ALIGNED)
    if SIDE_RIGHT:  # R = G P^T (m x r), reduction over n
        M = dm
        N = dr
        K = dn
    else:  # R = P^T G (r x n), reduction over m
        M = dr
        N = dn
        K = dm
    gp = _grouped_ptr(row, _F_G, g_ptr, ALIGNED)
    pp = _grouped_ptr(row, _F_P, p_ptr, ALIGNED)
    mp = _grouped_ptr(row, _F_M, m_ptr, ALIGNED)
    vp = _grouped_ptr(row, _F_V, v_ptr, ALIGNED)
    np_ = n_ptr + tl.multiple_of(tl.load(row + _F_OUT), 16)  # every N starts 16-element aligned
    a0, a1, aux_int, aux_bound = _grouped_projector_aux(row, aux0_ptr, aux1_ptr, PROJ_MODE, ALIGNED)
    ma = ma_ptr
    va = va_ptr
    nblk = 0
    k1 = 0
    k2 = 0
    sr_off = 0
    if MOMENTS == 2:
        ma = _grouped_ptr(row, _F_MA, ma_ptr, ALIGNED)
        va = _grouped_ptr(row, _F_VA, va_ptr, ALIGNED)
        qstep = _grouped_dim(row, _F_QSTEP, ALIGNED)
        nblk = tl.load(row + _F_NBLK).to(tl.int32)
        offs_m, offs_n, offs_k, mask_m, mask_n, blk = _tile_offsets_q8_at(tile, M, N, qstep, BLOCK_M, BLOCK_N,
                                                                          BLOCK_K, GROUP_M, IDX64)
    else:
        offs_m, offs_n, offs_k, mask_m, mask_n = _tile_offsets_at(tile, M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                                                                  IDX64)
        blk = 0
    if MOMENTS == 1:
        k1 = tl.load(row + _F_K1)
        k2 = tl.load(row + _F_K2)
        sr_off = M.to(tl.int64) * N
    sk = skip_ptr
    if SKIP:
        sk = skip_ptr + tl.load(row + _F_IDX)
    _project_adam_tile(
        gp, pp, mp, vp, np_, offs_m, offs_n, offs_k, mask_m, mask_n, blk, N, K,
        _grouped_stride(row, _F_G0, 1, UNIT, IDX64, ALIGNED), _grouped_stride(row, _F_G1, 2, UNIT, IDX64, ALIGNED),
        _grouped_stride(row, _F_PR, 4, UNIT, IDX64, ALIGNED), _grouped_stride(row, _F_PD, 8, UNIT, IDX64, ALIGNED),
        _grouped_stride(row, _F_M0, 16, UNIT, IDX64, ALIGNED), _grouped_stride(row, _F_M1, 32, UNIT, IDX64, ALIGNED),
        _grouped_stride(row, _F_V0, 64, UNIT, IDX64, ALIGNED), _grouped_stride(row, _F_V1, 128, UNIT, IDX64, ALIGNED),
        N, 1, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        a0, a1, aux_int, aux_bound, ma, va, qmap_ptr, nblk, k1, k2, sr_off, sk,
        SIDE_RIGHT, PROJ_MODE, DOT_DTYPE, INPUT_PRECISION, INTERPRET, MOMENTS, BLOCK_M, BLOCK_N, BLOCK_K, PREFETCH,
        EVEN_K, SKIP,
    )


@triton.jit
def _projection_backproject_apply_grouped_kernel(
    tab_ptr, n_problems,
    w_ptr, u_ptr, p_ptr, aux0_ptr, aux1_ptr,
    coef_ptr, skip_ptr,
    SIDE_RIGHT: tl.constexpr,
    PROJ_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    INTERPRET: tl.constexpr,
    UNIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PREFETCH: tl.constexpr,
    EVEN_K: tl.constexpr,
    SKIP: tl.constexpr = False,
    STEPS: tl.constexpr = 0,
    ALIGNED: tl.constexpr = False,
):
    """:func:`_projection_backproject_apply_kernel` over a list of problems in one launch
    (table as :func:`_projection_project_adam_grouped_kernel`'s; ``u_ptr``: the flat N
    buffer that kernel wrote). ``W = d * W - a * back(U)`` with ``(a, d)`` the problem's row
    of ``coef_ptr`` (``(n, 2)`` float32/float64: the op's ``coeffs``, or the host's step
    sizes and decays), as the single kernel's ``COEF`` form."""
    pid = tl.program_id(0)
    row = _grouped_problem(tab_ptr, pid, n_problems, _NF, _F_TS_B, STEPS)
    tile = pid - tl.load(row + _F_TS_B).to(tl.int32)
    M = _grouped_dim(row, _F_DM, ALIGNED)
    N = _grouped_dim(row, _F_DN, ALIGNED)
    K = _grouped_dim(row, _F_DR, ALIGNED)
    wp = _grouped_ptr(row, _F_W, w_ptr, ALIGNED)
    pp = _grouped_ptr(row, _F_P, p_ptr, ALIGNED)
    up = u_ptr + tl.multiple_of(tl.load(row + _F_OUT), 16)  # every N starts 16-element aligned
    if SIDE_RIGHT:  # U: m x r, contiguous
        su0 = K
    else:  # U: r x n
        su0 = N
    a0, a1, aux_int, aux_bound = _grouped_projector_aux(row, aux0_ptr, aux1_ptr, PROJ_MODE, ALIGNED)
    idx = tl.load(row + _F_IDX)
    sk = skip_ptr
    if SKIP:
        sk = skip_ptr + idx
    offs_m, offs_n, offs_k, mask_m, mask_n = _tile_offsets_at(tile, M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IDX64)
    _backproject_apply_tile(
        wp, up, pp, offs_m, offs_n, offs_k, mask_m, mask_n, K,
        _grouped_stride(row, _F_W0, 256, UNIT, IDX64, ALIGNED), _grouped_stride(row, _F_W1, 512, UNIT, IDX64, ALIGNED),
        su0, 1,
        _grouped_stride(row, _F_PR, 4, UNIT, IDX64, ALIGNED), _grouped_stride(row, _F_PD, 8, UNIT, IDX64, ALIGNED),
        0.0, 1.0,
        a0, a1, aux_int, aux_bound, sk, coef_ptr + idx * 2,
        SIDE_RIGHT, PROJ_MODE, DOT_DTYPE, INPUT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, PREFETCH, EVEN_K,
        SKIP, True,
    )


# --------------------------------------------------------------------------- launchers
def _proj_strides(proj: torch.Tensor, side: str):
    """(stride along the rank dimension, stride along the other one)."""
    return (proj.stride(0), proj.stride(1)) if side == "right" else (proj.stride(1), proj.stride(0))


def _proj_launch_args(proj, side: str):
    """``(p, rank, stride_rank, stride_dim, dot_dtypes, aux0, aux1, aux_int, aux_bound, mode, idx64)`` for a projector.

    ``proj`` is a dense tensor, or a packed INT4 projector given as the tuple
    ``(packed, scale, minimum, (rows, cols), group_size)`` (see
    ``lowrank_kernels/kernels/quant.py``), whose tiles ``_load_proj_tile`` dequantizes,
    or DCT basis indices given as the pair ``(basis, indices)`` (see
    ``lowrank_kernels/kernels/dct.py``), whose basis rows ``_load_proj_tile`` gathers.
    """
    if isinstance(proj, tuple) and len(proj) == 2:
        basis, indices = proj
        return (basis, indices.shape[0], basis.stride(0), basis.stride(1), (basis.dtype,), indices, indices,
                indices.shape[0], basis.shape[0], PROJ_DCT, _needs_int64(basis))
    if isinstance(proj, torch.Tensor):
        rank = proj.shape[0] if side == "right" else proj.shape[1]
        sp_rank, sp_dim = _proj_strides(proj, side)
        return proj, rank, sp_rank, sp_dim, (proj.dtype,), proj, proj, 0, 0, PROJ_DENSE, _needs_int64(proj)
    packed, scale, minimum, (rows, cols), group_size = proj
    rank = rows if side == "right" else cols
    # Element (row, col) of the dense row-major projector is nibble row * cols + col.
    sp_rank, sp_dim = (cols, 1) if side == "right" else (1, cols)
    # The dequantized values are float32 (cast to the GEMM's dot dtype).
    gs = int(group_size)
    # aux_int: the group size, or -log2 of it when it is a power of two (shift in the kernel).
    aux_int = -(gs.bit_length() - 1) if gs & (gs - 1) == 0 else gs
    return (packed, rank, sp_rank, sp_dim, (torch.float32,), scale, minimum, aux_int, 0, PROJ_INT4,
            rows * cols + 256 > _INT32_MAX)


def _grid(M, N):
    return lambda tile: (triton.cdiv(M, tile.bm) * triton.cdiv(N, tile.bn),)


def _op_bytes(*tensors_or_dtypes) -> list:
    """Storage bytes of the pipelined GEMM operands (a packed INT4 projector loads 1-byte nibbles)."""
    return [t.itemsize if isinstance(t, torch.dtype) else t.element_size() for t in tensors_or_dtypes]


# --------------------------------------------------------------------------- moment formats (host side)
class MomentFormat(NamedTuple):
    """How the Adam moments of one launch are stored (see :func:`moment_format`)."""

    mode: int  # MOMENTS_PLAIN / MOMENTS_SR16 / MOMENTS_Q8
    m_absmax: Optional[torch.Tensor] = None
    v_absmax: Optional[torch.Tensor] = None
    block_size: int = 0
    k1: int = 0
    k2: int = 0


PLAIN = MomentFormat(MOMENTS_PLAIN)


def moment_format(op: str, exp_avg, exp_avg_sq, m_absmax=None, v_absmax=None, block_size=0,
                  moment_seed=-1) -> MomentFormat:
    """Check the moment-format arguments of a launcher (m8spec: the op layer checks them too)
    and return the :class:`MomentFormat`; ValueError / TypeError naming the argument, before
    any write.

    8-bit iff ``m_absmax`` and ``v_absmax`` are both given: the moments are uint8 codes of one
    shape (at least 1-D), each absmax float32, contiguous, of shape
    ``shape[:-1] + (ceil(cols / block_size),)`` on the moments' device, ``1 <= block_size <= 256``.
    Otherwise ``block_size`` must be 0. ``moment_seed >= 0`` (stochastic rounding) only with
    bfloat16 moments.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{op}: block_size must be an int, got {block_size!r}")
    if isinstance(moment_seed, bool) or not isinstance(moment_seed, int):
        raise TypeError(f"{op}: moment_seed must be an int, got {moment_seed!r}")
    if (m_absmax is None) != (v_absmax is None):
        raise ValueError(f"{op}: m_absmax and v_absmax must be given together (8-bit moments) or both be None, "
                         f"got m_absmax={'None' if m_absmax is None else 'a tensor'}, "
                         f"v_absmax={'None' if v_absmax is None else 'a tensor'}")
    if m_absmax is None:
        if block_size != 0:
            raise ValueError(f"{op}: block_size must be 0 unless the moments are 8-bit (m_absmax/v_absmax given), "
                             f"got {block_size}")
        if moment_seed < 0:
            return PLAIN
        for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if t.dtype != torch.bfloat16:
                raise ValueError(f"{op}: moment_seed={moment_seed} (stochastic rounding) needs bfloat16 moments, "
                                 f"but {name} is {t.dtype}; pass moment_seed=-1")
        from lowrank_kernels.reference.quant import seed_keys

        k1, k2 = seed_keys(moment_seed)
        return MomentFormat(MOMENTS_SR16, k1=k1, k2=k2)
    if moment_seed >= 0:
        raise ValueError(f"{op}: moment_seed={moment_seed} (stochastic rounding) needs bfloat16 moments, but the "
                         "moments are 8-bit; pass moment_seed=-1")
    if not 1 <= block_size <= 256:
        raise ValueError(f"{op}: block_size must be in [1, 256] for 8-bit moments, got {block_size}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.uint8:
            raise TypeError(f"{op}: 8-bit moments: {name} must be uint8 codes, got {t.dtype}")
    if exp_avg.dim() < 1 or exp_avg_sq.shape != exp_avg.shape:
        raise ValueError(f"{op}: 8-bit moments: exp_avg and exp_avg_sq must have one shape of at least one dim, "
                         f"got {tuple(exp_avg.shape)} and {tuple(exp_avg_sq.shape)}")
    want = tuple(exp_avg.shape[:-1]) + (math.ceil(exp_avg.shape[-1] / block_size),)
    for name, t in (("m_absmax", m_absmax), ("v_absmax", v_absmax)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must have shape {want} for moments of shape {tuple(exp_avg.shape)} and "
                             f"block_size {block_size}, got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
        if t.device != exp_avg.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the moments are on {exp_avg.device}")
    return MomentFormat(MOMENTS_Q8, m_absmax, v_absmax, block_size)


_Q8_MAPS: dict = {}


def q8_maps(device) -> torch.Tensor:
    """float32 ``[1024]`` on ``device`` (built once per device): the signed map (first moment),
    the unsigned map (second moment), then each map's 255 decision midpoints
    ``(map[i] + map[i + 1]) / 2`` (float32, as reference/moments.py) padded with ``+inf``,
    at offsets 0 / 256 / 512 / 768 (``qmap_ptr`` of the 8-bit epilogues)."""
    from lowrank_kernels.reference.moments import moments_dynamic_map

    device = torch.device(device)
    key = str(device)
    hit = _Q8_MAPS.get(key)
    if hit is None:
        parts = [moments_dynamic_map(True, "cpu"), moments_dynamic_map(False, "cpu")]
        inf = torch.full((1,), float("inf"), dtype=torch.float32)
        for values in parts[:2]:
            parts.append(torch.cat([(values[:-1] + values[1:]) / 2.0, inf]))
        hit = _Q8_MAPS[key] = torch.cat(parts).to(torch.float32).to(device)
    return hit


def _launch_project_adam(grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps,
                         fmt: MomentFormat = PLAIN, skip=None) -> torch.Tensor:
    m, n = grad.shape
    right = side == "right"
    p, rank, sp_rank, sp_dim, p_dtypes, aux0, aux1, aux_int, aux_bound, mode, p_idx64 = _proj_launch_args(proj, side)
    M, N, K = (m, rank, n) if right else (rank, n, m)
    q8 = fmt.mode == MOMENTS_Q8
    out = torch.empty(exp_avg.shape, dtype=torch.float32 if q8 else exp_avg.dtype, device=exp_avg.device)
    if out.numel() == 0:
        return out
    dot_dtype, precision = _dot_config(grad.dtype, *p_dtypes)
    if q8:
        # one quantization block of qstep columns per program along N (kernels/_launch.py q8_tile)
        qstep, nblk = min(fmt.block_size, N), triton.cdiv(N, fmt.block_size)
        ma, va, qmap = fmt.m_absmax, fmt.v_absmax, q8_maps(exp_avg.device)
        kname, grid, restore = "project_q8", (lambda tile: (triton.cdiv(M, tile.bm) * triton.cdiv(N, qstep),)), \
            (exp_avg, exp_avg_sq, ma, va)
    else:
        qstep, nblk, ma, va, qmap = 0, 0, exp_avg, exp_avg_sq, exp_avg  # unused by the kernel
        kname = "project_sr" if fmt.mode == MOMENTS_SR16 else "project"
        grid, restore = _grid(M, N), (exp_avg, exp_avg_sq)
    L.launch_gemm(
        kname, _projection_project_adam_kernel, grid,
        (
            grad, p, exp_avg, exp_avg_sq, out,
            M, N, K,
            grad.stride(0), grad.stride(1),
            sp_rank, sp_dim,
            exp_avg.stride(0), exp_avg.stride(1),
            exp_avg_sq.stride(0), exp_avg_sq.stride(1),
            out.stride(0), out.stride(1),
            float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps),
            aux0, aux1, aux_int, aux_bound,
            ma, va, qmap, qstep, nblk, fmt.k1, fmt.k2, (M * N) & 0xFFFFFFFF,
            exp_avg if skip is None else skip,
        ),
        dict(
            SIDE_RIGHT=right,
            PROJ_MODE=mode,
            DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision,
            IDX64=p_idx64 or _needs_int64(grad, exp_avg, exp_avg_sq, out),
            INTERPRET=_INTERPRET,
            MOMENTS=fmt.mode,
            SKIP=skip is not None,
        ),
        device=grad.device, M=M, N=N, K=K, op_bytes=_op_bytes(grad, p), side=side, mode=mode,
        restore=restore, qblock=qstep,
    )
    return out


def _launch_backproject_apply(param, update, proj, side, alpha, decay, skip=None, coef=None) -> None:
    m, n = param.shape
    right = side == "right"
    p, rank, sp_rank, sp_dim, p_dtypes, aux0, aux1, aux_int, aux_bound, mode, p_idx64 = _proj_launch_args(proj, side)
    if param.numel() == 0:
        return
    dot_dtype, precision = _dot_config(update.dtype, *p_dtypes)
    L.launch_gemm(
        "backproject", _projection_backproject_apply_kernel, _grid(m, n),
        (
            param, update, p,
            m, n, rank,
            param.stride(0), param.stride(1),
            update.stride(0), update.stride(1),
            sp_rank, sp_dim,
            float(alpha), float(decay),
            aux0, aux1, aux_int, aux_bound,
            param if skip is None else skip, param if coef is None else coef,
        ),
        dict(
            SIDE_RIGHT=right,
            PROJ_MODE=mode,
            DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision,
            IDX64=p_idx64 or _needs_int64(param, update),
            INTERPRET=_INTERPRET,
            SKIP=skip is not None,
            COEF=coef is not None,
        ),
        device=param.device, M=m, N=n, K=rank, op_bytes=_op_bytes(update, p), side=side, mode=mode,
        restore=(param,),
    )


def _projector(proj, side, m, n, indices, q_scale, q_min, rank, group_size):
    """The op's projector arguments as ``(descriptor for _proj_launch_args, dtype-checked tensors)``."""
    if indices is not None:  # DCT: basis rows gathered by index (PROJ_DCT)
        return (proj, indices), (("basis", proj),)
    if q_scale is not None:  # packed INT4, dequantized in the tile loads (PROJ_INT4)
        shape = (rank, n) if side == "right" else (m, rank)
        return (proj, q_scale, q_min, shape, group_size), ()
    return proj, (("proj", proj),)


def projection_project_triton(grad, proj, side, indices=None, q_scale=None, q_min=None, rank=0, group_size=0):
    """Triton backend of ``lowrank_kernels::projection_project`` (arguments as the op).

    ``R`` (float32) by the DCT family's plain GEMM kernel with no epilogue
    (``kernels/dct.py``: basis rows gathered by index for a DCT projector, the dense
    projector read in place). A packed INT4 projector is first dequantized to a dense
    float32 ``r x K`` tensor (the size of one moment) by the INT4 unpack kernel: this op
    is not on the optimizers' per-step path.
    """
    from lowrank_kernels.kernels import dct as kd

    m, n = grad.shape
    _, named = _projector(proj, side, m, n, indices, q_scale, q_min, rank, group_size)
    _check_dtypes("projection_project", (("grad", grad),) + named)
    if indices is not None:
        return kd.dct_project_triton(grad, proj, indices, side)
    if q_scale is not None:
        from lowrank_kernels.kernels import quant as kq

        shape = (rank, n) if side == "right" else (m, rank)
        proj = kq.quant_int4_unpack_triton(proj, q_scale, q_min, shape, torch.float32, group_size)
    if side == "right":  # R = G P^T (m x r)
        r = proj.shape[0]
        out = torch.empty((m, r), dtype=torch.float32, device=grad.device)
        kd._gemm(grad, proj, out, m, r, n, grad.stride(), (proj.stride(1), proj.stride(0)), out.stride(),
                 epilogue=0, dot_from=grad)
    else:  # R = P^T G (r x n)
        r = proj.shape[1]
        out = torch.empty((r, n), dtype=torch.float32, device=grad.device)
        kd._gemm(proj, grad, out, r, n, m, (proj.stride(1), proj.stride(0)), grad.stride(), out.stride(),
                 epilogue=0, dot_from=grad)
    return out


def _moment_named(fmt, exp_avg, exp_avg_sq):
    """The moments for :func:`_check_dtypes` (8-bit codes are checked by :func:`moment_format`)."""
    return () if fmt.mode == MOMENTS_Q8 else (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))


def projection_project_adam_triton(
    grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, indices=None, q_scale=None, q_min=None, rank=0,
    group_size=0, m_absmax=None, v_absmax=None, block_size=0, moment_seed=-1,
):
    """Triton backend of ``lowrank_kernels::projection_project_adam`` (arguments as the op).

    One kernel: ``R`` tile by tile with float32 accumulation, the Adam moments updated
    in place in its epilogue, ``N = M / (sqrt(V) + eps)`` returned in the moments' dtype
    (float32 for 8-bit moments). The projector's kind picks the tile loader's
    ``PROJ_MODE`` (dense, DCT gather, INT4). Moment formats (m8spec): 8-bit when
    ``m_absmax``/``v_absmax`` are given (codes dequantized, updated in float32 and
    requantized in the epilogue, one quantization block per program along the moment's
    columns; no float32 moment reaches memory); bf16 moments with stochastic rounding
    when ``moment_seed >= 0``.
    """
    m, n = grad.shape
    desc, named = _projector(proj, side, m, n, indices, q_scale, q_min, rank, group_size)
    fmt = moment_format("projection_project_adam", exp_avg, exp_avg_sq, m_absmax, v_absmax, block_size, moment_seed)
    _check_dtypes("projection_project_adam", (("grad", grad),) + named + _moment_named(fmt, exp_avg, exp_avg_sq))
    return _launch_project_adam(grad, desc, exp_avg, exp_avg_sq, side, beta1, beta2, eps, fmt)


def projection_backproject_apply_triton(
    param, update, proj, side, alpha, decay, indices=None, q_scale=None, q_min=None, rank=0, group_size=0,
    row_decay=None, row_alpha=None,
):
    """Triton backend of ``lowrank_kernels::projection_backproject_apply`` (arguments as the op).

    One kernel over tiles of ``param``: ``param = decay * param + alpha * back(update)``
    in place, in ``param``'s dtype, with float32 accumulation and no full-size temporary.

    Per-row factors are folded around that kernel for now (its epilogue takes scalars):
    ``row_decay`` scales ``param``'s rows first (one extra elementwise pass over ``param``,
    rounded to its dtype in between); ``row_alpha`` scales the rows of ``update``
    (side="right": ``back(N)[i] = N[i] P``, low-rank sized) or of the projector
    (side="left": ``back(N)[i] = P[i] N``; the projector is then materialized dense,
    ``m x r`` float32, for a DCT or INT4 projector).
    """
    m, n = param.shape
    desc, named = _projector(proj, side, m, n, indices, q_scale, q_min, rank, group_size)
    _check_dtypes("projection_backproject_apply", (("param", param), ("update", update)) + named)
    if row_decay is not None:
        param.mul_(row_decay.unsqueeze(1))  # computed in float32, rounded to param's dtype
    if row_alpha is not None:
        if side == "right":
            update = update.to(torch.float32) * row_alpha.unsqueeze(1)
        else:
            desc = _dense_left_projector(proj, m, indices, q_scale, q_min, rank, group_size) * row_alpha.unsqueeze(1)
    _launch_backproject_apply(param, update, desc, side, alpha, decay)


def _dense_left_projector(proj, m, indices, q_scale, q_min, rank, group_size):
    """The dense ``m x r`` left projector, float32 (or the dense one as given)."""
    if indices is not None:
        return proj.index_select(0, indices.long()).T.to(torch.float32)
    if q_scale is not None:
        from lowrank_kernels.kernels import quant as kq

        return kq.quant_int4_unpack_triton(proj, q_scale, q_min, (m, rank), torch.float32, group_size)
    return proj


def projection_project_update_backproject_triton(
    param, grad, proj, exp_avg, exp_avg_sq, side, lr, beta1, beta2, eps, step, weight_decay, scale, indices=None,
    q_scale=None, q_min=None, rank=0, group_size=0, m_absmax=None, v_absmax=None, block_size=0, moment_seed=-1,
):
    """Triton backend of ``lowrank_kernels::projection_project_update_backproject``.

    The two kernels above: ``N`` (moments' dtype, as the reference rounds it; float32 for
    8-bit moments), then ``param = (1 - lr * wd) * param - step_size * scale * back(N)`` with
    ``step_size = lr * sqrt(1 - beta2^step) / (1 - beta1^step)``. Moment formats as
    :func:`projection_project_adam_triton`.
    """
    m, n = param.shape
    desc, named = _projector(proj, side, m, n, indices, q_scale, q_min, rank, group_size)
    op = "projection_project_update_backproject"
    fmt = moment_format(op, exp_avg, exp_avg_sq, m_absmax, v_absmax, block_size, moment_seed)
    _check_dtypes(op, (("param", param), ("grad", grad)) + named + _moment_named(fmt, exp_avg, exp_avg_sq))
    _project_update_backproject(param, grad, desc, exp_avg, exp_avg_sq, side, lr, beta1, beta2, eps, step,
                                weight_decay, scale, fmt)


def _project_update_backproject(param, grad, desc, exp_avg, exp_avg_sq, side, lr, beta1, beta2, eps, step,
                                weight_decay, scale, fmt, skip=None, coef=None):
    n_upd = _launch_project_adam(grad, desc, exp_avg, exp_avg_sq, side, beta1, beta2, eps, fmt, skip)
    if coef is not None:  # the kernel loads (a, d) from coef
        _launch_backproject_apply(param, n_upd, desc, side, 0.0, 1.0, skip, coef)
        return
    step_size = adam_step_size(lr, beta1, beta2, step)
    _launch_backproject_apply(param, n_upd, desc, side, -step_size * scale, 1.0 - lr * weight_decay, skip)


def _foreach_moment_formats(op, exp_avgs, exp_avg_sqs, m_absmax, v_absmax, block_size, moment_seed):
    """Each entry's :class:`MomentFormat` from the multi-tensor ops' lists (empty = not given)."""
    n = len(exp_avgs)
    m_absmax, v_absmax, moment_seed = list(m_absmax or ()), list(v_absmax or ()), list(moment_seed or ())
    for name, lst in (("m_absmax", m_absmax), ("v_absmax", v_absmax), ("moment_seed", moment_seed)):
        if len(lst) not in (0, n):
            raise ValueError(f"{op}: {name} must be empty or have one entry per parameter ({n}), got {len(lst)}")
    return [
        moment_format(f"{op} (parameter {i})", exp_avgs[i], exp_avg_sqs[i], m_absmax[i] if m_absmax else None,
                      v_absmax[i] if v_absmax else None, block_size, moment_seed[i] if moment_seed else -1)
        for i in range(n)
    ]


def projection_foreach_project_update_backproject_triton(
    params, grads, projs, exp_avgs, exp_avg_sqs, side, lr, beta1, beta2, eps, step, weight_decay, scale,
    indices=(), q_scale=(), q_min=(), rank=(), group_size=0, m_absmax=(), v_absmax=(), block_size=0, moment_seed=(),
    skip=None, coeffs=None,
):
    """Triton backend of ``lowrank_kernels::projection_foreach_project_update_backproject``.

    Two grouped launches for the whole list, whatever the shapes (see "grouped kernels"
    above): :func:`_projection_project_adam_grouped_kernel` writes every parameter's ``N``
    into one flat buffer, then :func:`_projection_backproject_apply_grouped_kernel` applies
    every update; each tile runs the single kernels' code, so each parameter's result is the
    single-tensor launchers' when the tile is the same (always under the interpreter; on a GPU
    the launch takes the table's tile of the list's largest problem). A list that mixes dtypes
    (parameter, gradient, projector, its index/scale tensors, moments) or moment formats is
    split on the host into uniform sub-lists, two launches each. Every entry's dtypes and
    moment format are checked first, so a bad entry fails before any write. All projector
    kinds (dense, DCT, INT4) and moment formats (plain, bf16 stochastic rounding, 8-bit) are
    grouped. ``m_absmax`` / ``v_absmax`` / ``moment_seed``: lists with one entry per
    parameter, or empty (not given). ``skip`` (bool/uint8, ``(n,)``) and ``coeffs``
    (``(n, 2)``): device tensors the kernels load (parameter ``i``'s flag masks its tiles'
    stores off; its ``(a, d)`` replace the host step size and decay), so nothing is read on
    the host; without ``coeffs`` the host's step sizes and decays go to the device in one
    small table.
    """
    from lowrank_kernels.reference.projection import projector_tail

    op = "projection_foreach_project_update_backproject"
    n = len(params)
    tails = [projector_tail(indices, q_scale, q_min, rank, group_size, i) for i in range(n)]
    fmts = _foreach_moment_formats(op, exp_avgs, exp_avg_sqs, m_absmax, v_absmax, block_size, moment_seed)
    descs = []
    for i in range(n):
        m_, n_ = params[i].shape
        desc, named = _projector(projs[i], side, m_, n_, *tails[i])
        descs.append(desc)
        _check_dtypes(f"{op} (parameter {i})", (("param", params[i]), ("grad", grads[i])) + named
                      + _moment_named(fmts[i], exp_avgs[i], exp_avg_sqs[i]))
    if n == 0:
        return
    if skip is not None and skip.dtype == torch.bool:
        skip = skip.view(torch.uint8)
    dev = params[0].device
    if coeffs is None:  # (a, d) per parameter: W = d W - a back(N), as the single launcher's alpha / decay
        coef = []
        for i in range(n):
            coef += [adam_step_size(lr[i], beta1, beta2, step[i]) * scale[i], 1.0 - lr[i] * weight_decay[i]]
        coeffs = _device_table(coef, torch.float32, dev)
    groups: dict = {}
    for i in range(n):
        a = _proj_launch_args(descs[i], side)
        key = (params[i].dtype, grads[i].dtype, a[0].dtype, a[5].dtype, a[6].dtype, exp_avgs[i].dtype,
               exp_avg_sqs[i].dtype, fmts[i].mode,
               grouped_alignment(params[i], grads[i], a, exp_avgs[i], exp_avg_sqs[i], fmts[i], side))
        groups.setdefault(key, []).append((i, a))
    for key, members in groups.items():
        _grouped_step(members, params, grads, exp_avgs, exp_avg_sqs, fmts, side, beta1, beta2, eps, skip, coeffs,
                      key[-1])


def _address(t: torch.Tensor) -> int:
    """``t``'s address (a ``meta`` tensor's: its storage offset in bytes, so the compile check
    and the host tests see the alignment a real tensor of that view would have)."""
    return t.storage_offset() * t.element_size() if t.device.type == "meta" else t.data_ptr()


def grouped_alignment(param, grad, a, exp_avg, exp_avg_sq, fmt, side):
    """Whether one entry of the grouped projection launches may take alignment hints: ``None``
    when not, else its unit-stride pattern (one bool per stride field of ``_UNIT_FIELDS``).

    Aligned means what Triton's specialization tells the single kernels about such tensors:
    every address the grouped kernels read from the table (parameter, gradient, projector and
    its INT4 scale / minimum or DCT indices, moments, 8-bit absmax) 16-byte aligned; every
    stride 1 or a multiple of 16 elements; ``m``, ``n``, the rank (and the 8-bit quantization
    step ``min(block_size, N)``) multiples of 16, which keeps the masks along a contiguous
    dimension constant over a vector, for the loads and the epilogue's stores. Entries of one
    pattern form one sub-list (each stride field is then 1 in all of them or a multiple of 16
    in all of them), compiled with ``ALIGNED``; unaligned entries form their own sub-list,
    which takes no hints (``a``: the entry's :func:`_proj_launch_args`)."""
    m_, n_ = param.shape
    r = a[1]
    tensors = [param, grad, a[0], exp_avg, exp_avg_sq]
    if a[9] != PROJ_DENSE:
        tensors += [a[5], a[6]]
    dims = [m_, n_, r]
    if fmt.mode == MOMENTS_Q8:
        tensors += [fmt.m_absmax, fmt.v_absmax]
        dims.append(min(fmt.block_size, r if side == "right" else n_))
    strides = (*grad.stride(), a[2], a[3], *exp_avg.stride(), *exp_avg_sq.stride(), *param.stride())
    if any(_address(t) % 16 for t in tensors) or any(d % 16 for d in dims) or \
            any(st != 1 and st % 16 for st in strides):
        return None
    return tuple(st == 1 for st in strides)


# Device tables of the grouped launches, by content (device, dtype, values): a step whose
# tensors did not move reuses its table (no host-to-device copy). A table used while a CUDA
# graph is captured is kept for good (with its pinned host source when the capture copied
# it): the graph reads that memory again on every replay, so it must never be freed.
_DEVICE_TABLES: "dict" = {}
_DEVICE_TABLES_MAX = 64
_CAPTURED_TABLES: list = []


def _device_table(values, dtype, device):
    """``values`` (a list of Python numbers) as a 1-D ``dtype`` tensor on ``device``: one
    host-to-device copy (from pinned memory, asynchronous, on CUDA), or none when the same
    table was made recently (content-keyed, at most ``_DEVICE_TABLES_MAX`` kept)."""
    if device.type == "meta":  # the compile check: only the argument's type matters
        return torch.zeros(len(values), dtype=dtype, device=device)
    key = (str(device), dtype, tuple(values))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    hit = _DEVICE_TABLES.pop(key, None)
    host = None
    if hit is None:
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
            hit = host.to(device, non_blocking=True)
        else:
            hit = host.to(device)
        if len(_DEVICE_TABLES) >= _DEVICE_TABLES_MAX:
            _DEVICE_TABLES.pop(next(iter(_DEVICE_TABLES)))  # the least recently used
    elif device.type == "cuda":
        hit.record_stream(torch.cuda.current_stream(device))  # may be read on another stream than it was made on
    if capturing and not any(t is hit for _, t in _CAPTURED_TABLES):
        _CAPTURED_TABLES.append((host, hit))
    _DEVICE_TABLES[key] = hit  # (re)inserted last: most recently used
    return hit


def _grouped_step(members, params, grads, exp_avgs, exp_avg_sqs, fmts, side, beta1, beta2, eps, skip, coeffs,
                  aligned=None):
    """The two grouped launches of one uniform sub-list ``members`` (``(list index,
    _proj_launch_args)`` pairs: one dtype per tensor role, one moment format); ``aligned``: the
    members' :func:`grouped_alignment` (``None``: unaligned, no hints)."""
    right = side == "right"
    i0, a0 = members[0]
    mode, fmt0 = a0[9], fmts[i0]
    q8 = fmt0.mode == MOMENTS_Q8
    dev = params[i0].device
    meta = dev.type == "meta"
    out_dtype = torch.float32 if q8 else exp_avgs[i0].dtype

    def ptr(t):
        return 0 if meta else t.data_ptr()

    probs_p, probs_b, rows = [], [], []
    off, qmax, idx64_p, idx64_b = 0, 1, False, False
    for i, a in members:
        m_, n_ = params[i].shape
        r = a[1]
        M, N, K = (m_, r, n_) if right else (r, n_, m_)
        probs_p.append((M, N, K))
        probs_b.append((m_, n_, r))
        span = M * N + 256 > _INT32_MAX  # N's own offsets (contiguous M x N)
        idx64_p = idx64_p or a[10] or span or _needs_int64(grads[i], exp_avgs[i], exp_avg_sqs[i])
        idx64_b = idx64_b or a[10] or span or _needs_int64(params[i])
        row = [0] * 32
        row[0], row[1], row[2], row[3] = ptr(grads[i]), ptr(a[0]), ptr(exp_avgs[i]), ptr(exp_avg_sqs[i])
        row[4], row[5], row[8] = ptr(a[5]), ptr(a[6]), ptr(params[i])
        if q8:
            f = fmts[i]
            row[6], row[7] = ptr(f.m_absmax), ptr(f.v_absmax)
            row[27], row[28] = min(f.block_size, N), triton.cdiv(N, f.block_size)
            qmax = max(qmax, row[27])
        row[9] = off
        off += -(-M * N // 16) * 16  # each N 16-element aligned in the flat buffer
        row[12], row[13], row[14] = m_, n_, r
        row[15], row[16] = grads[i].stride()
        row[17], row[18] = a[2], a[3]
        row[19], row[20] = exp_avgs[i].stride()
        row[21], row[22] = exp_avg_sqs[i].stride()
        row[23], row[24] = params[i].stride()
        row[25], row[26] = a[7], a[8]
        row[29], row[30] = fmts[i].k1, fmts[i].k2
        row[31] = i
        rows.append(row)
    unit = 0
    for bit, f in _UNIT_FIELDS:
        if all(row[f] == 1 for row in rows):
            unit |= bit
    aligned = aligned is not None
    sr = fmt0.mode == MOMENTS_SR16
    kname = "project_q8_grouped" if q8 else ("project_sr_grouped" if sr else "project_grouped")
    bytes_p, bytes_b = _op_bytes(grads[i0], a0[0]), _op_bytes(out_dtype, a0[0])
    qblock = qmax if q8 else 0
    tile_p = L.grouped_tile(kname, dev, problems=probs_p, op_bytes=bytes_p, side=side, mode=mode, qblock=qblock)
    tile_b = L.grouped_tile("backproject_grouped", dev, problems=probs_b, op_bytes=bytes_b, side=side, mode=mode)
    total_p = total_b = 0
    for row, (M, N, _), (m_, n_, _) in zip(rows, probs_p, probs_b):
        row[10], row[11] = total_p, total_b
        if M and N:
            total_p += triton.cdiv(M, tile_p.bm) * triton.cdiv(N, row[27] if q8 else tile_p.bn)
        if m_ and n_:
            total_b += triton.cdiv(m_, tile_b.bm) * triton.cdiv(n_, tile_b.bn)
    tab = _device_table([x for row in rows for x in row], torch.int64, dev)
    out = torch.empty(off, dtype=out_dtype, device=dev)
    count, steps = len(rows), (len(rows) - 1).bit_length()  # binary search steps (a constexpr)
    flag = skip if skip is not None else out
    if total_p:
        dot_dtype, precision = _dot_config(grads[i0].dtype, *a0[4])
        ma, va = (fmt0.m_absmax, fmt0.v_absmax) if q8 else (exp_avgs[i0], exp_avg_sqs[i0])
        L.launch_grouped(
            kname, _projection_project_adam_grouped_kernel, (total_p,),
            (tab, count, grads[i0], a0[0], exp_avgs[i0], exp_avg_sqs[i0], out, a0[5], a0[6], ma, va,
             float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps),
             q8_maps(dev) if q8 else out, flag),
            dict(SIDE_RIGHT=right, PROJ_MODE=mode, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, IDX64=idx64_p,
                 INTERPRET=_INTERPRET, MOMENTS=fmt0.mode, UNIT=unit, SKIP=skip is not None, STEPS=steps,
                 ALIGNED=aligned),
            device=dev, tile=tile_p, problems=probs_p, op_bytes=bytes_p, side=side, mode=mode, qblock=qblock,
        )
    if total_b:
        dot_dtype, precision = _dot_config(out_dtype, *a0[4])
        L.launch_grouped(
            "backproject_grouped", _projection_backproject_apply_grouped_kernel, (total_b,),
            (tab, count, params[i0], out, a0[0], a0[5], a0[6], coeffs, flag),
            dict(SIDE_RIGHT=right, PROJ_MODE=mode, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, IDX64=idx64_b,
                 INTERPRET=_INTERPRET, UNIT=unit, SKIP=skip is not None, STEPS=steps, ALIGNED=aligned),
            device=dev, tile=tile_b, problems=probs_b, op_bytes=bytes_b, side=side, mode=mode,
        )
