"""The projection family's GEMM tile, shared by its single kernels (kernels/projection.py)
and grouped kernels (kernels/projection_grouped.py): the projector tile loader, the main
loop, the tile offsets, and the bodies of one project + Adam tile and one back-project +
apply tile; on the host, the projector descriptors the launchers pass to the kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels._tl import _cast_out, _group_ids_at
from lowrank_kernels.kernels.moments import _q8_decode, _q8_encode, _round_sr_bf16

_INT32_MAX = L.INT32_MAX
_needs_int64 = L.needs_int64

# Projector storage modes understood by _load_proj_tile (constexpr PROJ_MODE).
PROJ_DENSE = 0
# Packed INT4 (lowrank_kernels/reference/quant.py): p_ptr = the uint8 nibbles,
# aux0_ptr / aux1_ptr = the float32 per-group scale / minimum, aux_int = group size.
PROJ_INT4 = 1
# DCT basis rows picked by index (lowrank_kernels/ops/dct.py): p_ptr = the shared
# s x s basis, aux0_ptr = the int32/int64 indices, aux_int = their number (the rank),
# aux_bound = the basis' row count s (indices outside [0, s) read zeros, never memory
# outside the basis).
PROJ_DCT = 2


# --------------------------------------------------------------------------- projector tile loader
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


# --------------------------------------------------------------------------- tile offsets
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


# --------------------------------------------------------------------------- tile bodies (single and grouped kernels)
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
    epilogue. Arguments as ``_projection_project_adam_kernel``'s (kernels/projection.py)."""
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
    the given offsets. Arguments as ``_projection_backproject_apply_kernel``'s
    (kernels/projection.py)."""
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


# --------------------------------------------------------------------------- host: projector descriptors
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


def _op_bytes(*tensors_or_dtypes) -> list:
    """Storage bytes of the pipelined GEMM operands (a packed INT4 projector loads 1-byte nibbles)."""
    return [t.itemsize if isinstance(t, torch.dtype) else t.element_size() for t in tensors_or_dtypes]


def _projector(proj, side, m, n, indices, q_scale, q_min, rank, group_size):
    """The op's projector arguments as ``(descriptor for _proj_launch_args, dtype-checked tensors)``."""
    if indices is not None:  # DCT: basis rows gathered by index (PROJ_DCT)
        return (proj, indices), (("basis", proj),)
    if q_scale is not None:  # packed INT4, dequantized in the tile loads (PROJ_INT4)
        shape = (rank, n) if side == "right" else (m, rank)
        return (proj, q_scale, q_min, shape, group_size), ()
    return proj, (("proj", proj),)
