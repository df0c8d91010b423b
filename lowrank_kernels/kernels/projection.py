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
and the other is the projector, read through ``_load_proj_tile``. The tile code (tile
loader, main loop, offsets, epilogue bodies) lives in kernels/_projection_tile.py, shared
with the grouped (multi-tensor) kernels of kernels/projection_grouped.py, whose launcher
:func:`projection_foreach_project_update_backproject_triton` is importable from here too.
Operand layouts for the usual row-major tensors: right-side project reads ``G`` and
``P^T`` both contiguous along ``k`` (an NT GEMM), left-side project reads ``P^T``
contiguous along ``i`` and ``G`` contiguous along ``j`` (a TN GEMM; Hopper's wgmma takes
MN-major 16-bit operands from shared memory); both back-projections are plain NN GEMMs.
Integer arguments equal to 1 are specialised by Triton, so unit strides are compile-time
constants and loads along them are vectorised and coalesced whichever dimension they are.

Moment formats (constexpr ``MOMENTS`` of the project + Adam kernel; kernels/moments.py):
float moments as above; bf16 moments stored with stochastic rounding; 8-bit moments
(uint8 codes + float32 absmax per block of at most ``block_size`` elements inside a row):
each program's columns are exactly one quantization block (``qstep = min(block_size,
N)`` columns in ``BLOCK_N = max(16, next_pow2(qstep))`` lanes, tile table
``project_q8``), so the epilogue dequantizes, updates in float32, computes ``N``
(float32) from those values, reduces the new absmax of each block row in registers and
requantizes; no float32 moment tensor is written to memory.

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
overlaps it. Both kernels share one main loop, ``_gemm_main_loop``.

Dtypes: float32 / bfloat16 / float16 tensors, float32 accumulation. The GEMM operands
are cast to one "dot dtype": the 16-bit dtype when the operands are that 16-bit
dtype and possibly float32 (tensor cores at the 16-bit rate; e.g. a float32 ``N``
is rounded to the bf16 of the projector in the back-projection), float32 with
``input_precision="ieee"`` when every operand is float32 (torch's default, no TF32),
and float32 with TF32 when bf16 meets fp16 (TF32 holds every bf16 and fp16 value
exactly). Under ``TRITON_INTERPRET=1`` the dot dtype is always float32: triton 3.9's
interpreter miscomputes bf16 arithmetic and bf16 dots, so every load is upcast first.
float64 is rejected with a TypeError (use the reference or C++ backend).

Argument checks with messages are the op layer's (lowrank_kernels/ops/); the launchers
take arguments the op layer has validated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels import dct as kd
from lowrank_kernels.kernels import quant as kq
from lowrank_kernels.kernels._projection_tile import (  # noqa: F401  (PROJ_*: re-exported)
    PROJ_DCT,
    PROJ_DENSE,
    PROJ_INT4,
    _backproject_apply_tile,
    _op_bytes,
    _proj_launch_args,
    _project_adam_tile,
    _projector,
    _tile_offsets,
    _tile_offsets_q8,
)
from lowrank_kernels.kernels.moments import (  # noqa: F401  (the moment-format names: re-exported)
    MOMENTS_PLAIN,
    MOMENTS_Q8,
    MOMENTS_SR16,
    PLAIN,
    MomentFormat,
    _moment_named,
    moment_format,
    q8_maps,
)
from lowrank_kernels.kernels.projection_grouped import (  # noqa: F401  (the multi-tensor launcher)
    projection_foreach_project_update_backproject_triton,
)
from lowrank_kernels.reference.projection import adam_step_size

# The shared launch policy (lowrank_kernels/kernels/_launch.py), under the names the tests use.
_INTERPRET = L.INTERPRET
_check_dtypes = L.check_dtypes
_dot_config = L.dot_config
_needs_int64 = L.needs_int64


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

    ``MOMENTS`` (kernels/moments.py): :data:`MOMENTS_PLAIN` (moments in their dtype; ``ma_ptr`` .. ``sr_off``
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


def _grid(M, N):
    return lambda tile: (triton.cdiv(M, tile.bm) * triton.cdiv(N, tile.bn),)


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
        aligned=not q8 or L.q8_aligned(N, K, qstep, (grad, exp_avg, exp_avg_sq, out), (ma, va)),
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


def projection_project_triton(grad, proj, side, indices=None, q_scale=None, q_min=None, rank=0, group_size=0):
    """Triton backend of ``lowrank_kernels::projection_project`` (arguments as the op).

    ``R`` (float32) by the DCT family's plain GEMM kernel with no epilogue
    (``kernels/dct.py``: basis rows gathered by index for a DCT projector, the dense
    projector read in place). A packed INT4 projector is first dequantized to a dense
    float32 ``r x K`` tensor (the size of one moment) by the INT4 unpack kernel: this op
    is not on the optimizers' per-step path.
    """
    m, n = grad.shape
    _, named = _projector(proj, side, m, n, indices, q_scale, q_min, rank, group_size)
    _check_dtypes("projection_project", (("grad", grad),) + named)
    if indices is not None:
        return kd.dct_project_triton(grad, proj, indices, side)
    if q_scale is not None:
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


def projection_project_adam_triton(
    grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, indices=None, q_scale=None, q_min=None, rank=0,
    group_size=0, m_absmax=None, v_absmax=None, block_size=0, moment_seed=-1,
):
    """Triton backend of ``lowrank_kernels::projection_project_adam`` (arguments as the op).

    One kernel: ``R`` tile by tile with float32 accumulation, the Adam moments updated
    in place in its epilogue, ``N = M / (sqrt(V) + eps)`` returned in the moments' dtype
    (float32 for 8-bit moments). The projector's kind picks the tile loader's
    ``PROJ_MODE`` (dense, DCT gather, INT4). Moment formats: 8-bit when
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

    Per-row factors are folded around that kernel (its epilogue takes scalars):
    ``row_decay`` scales ``param``'s rows first (one extra elementwise pass over ``param``);
    ``row_alpha`` scales the rows of ``update`` (side="right": ``back(N)[i] = N[i] P``,
    low-rank sized) or of the projector (side="left": ``back(N)[i] = P[i] N``; the projector
    is then materialized dense, ``m x r`` float32, for a DCT or INT4 projector). With
    ``row_decay`` a 16-bit ``param`` goes through bounded float32 row panels (about
    :data:`_ROW_PANEL_ELEMS` elements each): each panel is converted to float32, scaled and
    updated there, and rounded back to ``param``'s dtype once, as the other backends round
    it (an extra pass in ``param``'s dtype would round it twice).
    """
    m, n = param.shape
    desc, named = _projector(proj, side, m, n, indices, q_scale, q_min, rank, group_size)
    _check_dtypes("projection_backproject_apply", (("param", param), ("update", update)) + named)
    if row_decay is not None and param.dtype != torch.float32:
        # back(N) is row-local on both sides (N_i P or P_i N): a panel of param's rows takes
        # the same rows of N (right) or of the dense projector (left).
        dense = _dense_left_projector(proj, m, indices, q_scale, q_min, rank, group_size) if side == "left" else None
        r = update.shape[1] if side == "right" else update.shape[0]
        for rows in _row_panels(m, n, r):
            w = param[rows].to(torch.float32)
            upd, pr = (update[rows], desc) if side == "right" else (update, dense[rows])
            _backproject_apply_rows(w, upd, pr, side, alpha, decay, row_decay[rows],
                                    None if row_alpha is None else row_alpha[rows])
            param[rows].copy_(w)
        return
    if side == "left" and row_alpha is not None:
        desc = _dense_left_projector(proj, m, indices, q_scale, q_min, rank, group_size)
    _backproject_apply_rows(param, update, desc, side, alpha, decay, row_decay, row_alpha)


def _backproject_apply_rows(param, update, desc, side, alpha, decay, row_decay, row_alpha):
    """The back-projection with per-row factors around the kernel (``desc``: the projector
    descriptor, or the dense ``m x r`` left projector when ``side="left"`` and ``row_alpha``
    is given)."""
    if row_decay is not None:
        param.mul_(row_decay.unsqueeze(1))  # computed in float32, rounded to param's dtype
    if row_alpha is not None:
        if side == "right":
            update = update.to(torch.float32) * row_alpha.unsqueeze(1)
        else:
            desc = desc * row_alpha.unsqueeze(1)
    _launch_backproject_apply(param, update, desc, side, alpha, decay)


# Row panels of a 16-bit param with per-row decay (projection_backproject_apply_triton):
# elements per panel, a bounded float32 scratch (4 MiB).
_ROW_PANEL_ELEMS = 1 << 20


def _row_panels(m: int, n: int, min_rows: int):
    """Row panels of about :data:`_ROW_PANEL_ELEMS` elements, each at least ``min_rows`` rows
    (``m >= min_rows``): the panel count is rounded down, so no short last panel."""
    count = max(1, m // max(min_rows, _ROW_PANEL_ELEMS // max(n, 1), 1))
    bounds = [(i * m) // count for i in range(count + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield slice(lo, hi)


def _dense_left_projector(proj, m, indices, q_scale, q_min, rank, group_size):
    """The dense ``m x r`` left projector, float32 (or the dense one as given)."""
    if indices is not None:
        return proj.index_select(0, indices.long()).T.to(torch.float32)
    if q_scale is not None:
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
