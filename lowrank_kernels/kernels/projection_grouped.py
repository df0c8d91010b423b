"""Grouped (multi-tensor) Triton kernels of the projection family and their launcher.

``_projection_project_adam_grouped_kernel`` and ``_projection_backproject_apply_grouped_kernel``
run the single kernels of kernels/projection.py over a whole list of parameters of any
shapes, one launch each; the launcher
:func:`projection_foreach_project_update_backproject_triton` (the Triton backend of
``lowrank_kernels::projection_foreach_project_update_backproject``) splits a list that
mixes dtypes or moment formats into uniform sub-lists, and those by alignment
(:func:`grouped_alignment`: entries the host checked aligned launch apart, with constexpr
``ALIGNED`` and their table fields in the divided-by-16 form of kernels/_tl.py, which carries the
alignment to the compiler). One tile config per grouped launch
(the table's tile of the largest problem; ``*_grouped`` tables in kernels/_launch.py).

A grouped launch runs one kernel over a list of problems (parameters): one program per
output tile of any problem, grid = the total tile count. The problems are described by
ONE int64 table (built by :func:`_grouped_step`), one row of ``_NF`` fields per problem,
read by both grouped kernels: the tensors' addresses (cast back to typed pointers in the
kernel: ``tl.load(row + F).to(tl.pointer_type(rep.dtype.element_ty))``, ``rep`` a tensor
argument of the same dtype, the element type of the whole launch), shapes, strides,
per-problem scalars, the original list index (the ``skip`` / ``coeffs`` rows) and each
kernel's first tile. Tile scheduler: a program finds its problem by a binary search over
the host-built prefix of tile counts (:func:`~lowrank_kernels.kernels._tl._grouped_problem`,
``ceil(log2 n)`` scalar loads), then computes the tile exactly as the single kernel does
with its tile number inside the problem (``_tile_offsets_at``) and runs the same body
(``_project_adam_tile``, ``_backproject_apply_tile`` of kernels/_projection_tile.py).
Chosen over a persistent grid (Triton's grouped-GEMM tutorial walks the problems inside a
loop of NUM_SM programs) because it needs no SM count, keeps one tile per program exactly
as the single kernels (same per-tile code and register budget) and its grid is fixed on
the host, which a CUDA graph replays as is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels._projection_tile import (
    PROJ_DENSE,
    _backproject_apply_tile,
    _op_bytes,
    _proj_launch_args,
    _project_adam_tile,
    _projector,
    _tile_offsets_at,
    _tile_offsets_q8_at,
)
from lowrank_kernels.kernels._tl import _grouped_problem, _grouped_ptr
from lowrank_kernels.kernels.moments import MOMENTS_Q8, MOMENTS_SR16, _foreach_moment_formats, _moment_named, q8_maps
from lowrank_kernels.reference.projection import adam_step_size, projector_tail

_INTERPRET = L.INTERPRET
_INT32_MAX = L.INT32_MAX
_address = L.address
_check_dtypes = L.check_dtypes
_dot_config = L.dot_config
_needs_int64 = L.needs_int64


# --------------------------------------------------------------------------- the problem table
_F_G = tl.constexpr(0)  # address of the gradient
_F_P = tl.constexpr(1)  # the projector (dense), packed codes (INT4) or the DCT basis
_F_M = tl.constexpr(2)  # exp_avg (uint8 codes for 8-bit moments)
_F_V = tl.constexpr(3)  # exp_avg_sq
_F_A0 = tl.constexpr(4)  # INT4 scale / DCT indices
_F_A1 = tl.constexpr(5)  # INT4 minimum
_F_MA = tl.constexpr(6)  # 8-bit: exp_avg's absmax
_F_VA = tl.constexpr(7)  # 8-bit: exp_avg_sq's absmax
_F_W = tl.constexpr(8)  # the parameter
_F_OUT = tl.constexpr(9)  # element offset / 16 of this problem's N (contiguous) in the launch's flat N buffer
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
def _grouped_int(row, F: tl.constexpr, IDX64: tl.constexpr, X16: tl.constexpr = False):
    """Field ``F`` of a table row as an offset integer (int64 when ``IDX64``, else int32, as
    the single kernels' integer arguments); ``X16``: the field holds the value divided by 16
    (an aligned launch's, kernels/_tl.py), multiplied back after the cast so that Triton sees
    the divisibility."""
    x = tl.load(row + F)
    if not IDX64:
        x = x.to(tl.int32)
    if X16:
        x = x * 16
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
    ``ALIGNED``: the host checked that a non-unit stride is a multiple of 16 in every problem
    and stored it divided by 16."""
    s = 1
    if (UNIT & BIT) == 0:
        s = _grouped_int(row, F, IDX64, ALIGNED)
    return s


@triton.jit
def _grouped_dim(row, F: tl.constexpr, ALIGNED: tl.constexpr):
    """Dimension field ``F`` (int32); ``ALIGNED``: a multiple of 16 in every problem, stored
    divided by 16 (the masks along a contiguous dimension then stay constant over a vector, as
    the single kernels' masks against a size Triton specialized as divisible by 16)."""
    return _grouped_int(row, F, False, ALIGNED)


@triton.jit(do_not_specialize=["n_problems"])  # a list's length: no recompile when it changes
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
    """``_projection_project_adam_kernel`` (kernels/projection.py) over a list of problems in one launch.

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
    np_ = n_ptr + tl.load(row + _F_OUT) * 16  # N's offset / 16: every N starts 16-element aligned
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


@triton.jit(do_not_specialize=["n_problems"])  # a list's length: no recompile when it changes
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
    """``_projection_backproject_apply_kernel`` (kernels/projection.py) over a list of problems in one launch
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
    up = u_ptr + tl.load(row + _F_OUT) * 16  # N's offset / 16: every N starts 16-element aligned
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


# --------------------------------------------------------------------------- launcher
def projection_foreach_project_update_backproject_triton(
    params, grads, projs, exp_avgs, exp_avg_sqs, side, lr, beta1, beta2, eps, step, weight_decay, scale,
    indices=(), q_scale=(), q_min=(), rank=(), group_size=0, m_absmax=(), v_absmax=(), block_size=0, moment_seed=(),
    skip=None, coeffs=None,
):
    """Triton backend of ``lowrank_kernels::projection_foreach_project_update_backproject``.

    Two grouped launches for the whole list, whatever the shapes (see the module doc):
    :func:`_projection_project_adam_grouped_kernel` writes every parameter's ``N`` into one
    flat buffer, then :func:`_projection_backproject_apply_grouped_kernel` applies every
    update; each tile runs the single kernels' code, so each parameter's result is the
    single-tensor launchers' when the tile is the same (always under the interpreter; on a GPU
    the launch takes the table's tile of the list's largest problem). A list that mixes dtypes
    (parameter, gradient, projector, its index/scale tensors, moments) or moment formats is
    split on the host into uniform sub-lists, two launches each. Every entry's dtypes are
    checked first (float64 is not served here), so a bad entry fails before any write. All
    projector kinds (dense, DCT, INT4) and moment formats (plain, bf16 stochastic rounding,
    8-bit) are grouped. ``m_absmax`` / ``v_absmax`` / ``moment_seed``: lists with one entry per
    parameter, or empty (not given). ``skip`` (bool/uint8, ``(n,)``) and ``coeffs``
    (``(n, 2)``): device tensors the kernels load (parameter ``i``'s flag masks its tiles'
    stores off; its ``(a, d)`` replace the host step size and decay), so nothing is read on
    the host; without ``coeffs`` the host's step sizes and decays go to the device in one
    small table.
    """
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
        coeffs = L.device_table(coef, torch.float32, dev)
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
        row[9] = off // 16
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
    tile_p = L.grouped_tile(kname, dev, problems=probs_p, op_bytes=bytes_p, side=side, mode=mode, qblock=qblock,
                            aligned=aligned)
    tile_b = L.grouped_tile("backproject_grouped", dev, problems=probs_b, op_bytes=bytes_b, side=side, mode=mode)
    total_p = total_b = 0
    for row, (M, N, _), (m_, n_, _) in zip(rows, probs_p, probs_b):
        row[10], row[11] = total_p, total_b
        if M and N:
            total_p += triton.cdiv(M, tile_p.bm) * triton.cdiv(N, row[27] if q8 else tile_p.bn)
        if m_ and n_:
            total_b += triton.cdiv(m_, tile_b.bm) * triton.cdiv(n_, tile_b.bn)
    if aligned:  # fields divided by 16, addresses relative to the launch's tensor arguments (kernels/_tl.py)
        bases = {0: grads[i0], 1: a0[0], 2: exp_avgs[i0], 3: exp_avg_sqs[i0], 8: params[i0]}
        if mode != PROJ_DENSE:
            bases.update({4: a0[5], 5: a0[6]})
        if q8:
            bases.update({6: fmt0.m_absmax, 7: fmt0.v_absmax})
        x16 = [12, 13, 14] + [f for bit, f in _UNIT_FIELDS if not unit & bit] + ([27] if q8 else [])
        rows = [L.aligned_row(row, {f: ptr(t) for f, t in bases.items()}, x16) for row in rows]
    tab = L.device_table([x for row in rows for x in row], torch.int64, dev)
    out = torch.empty(off, dtype=out_dtype, device=dev)
    count, steps = len(rows), L.search_steps(len(rows))  # binary search steps (a constexpr)
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
            aligned=aligned,
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
