"""Triton kernel of the residual family: ``E = back(low) + f * G`` over tiles of the weight.

``_residual_kernel`` is the back-projection GEMM of the projection family (``K = rank``,
the shared main loop and projector tile loader of kernels/_projection_tile.py: dense or
DCT rows gathered by index) with a different epilogue: it loads the ``G`` tile and the
factor ``f`` (per row on the right side, per column on the left) after the GEMM loop (``W``
before it with the table's ``PREFETCH``, as the back-projection does), forms ``E = acc + f * G`` in float32, then

- ``APPLY``: ``W = decay * W + alpha * E`` stored in ``W``'s dtype (round to nearest even);
- otherwise: the tile's ``sum(E^2)`` is stored at ``partial[program_id]``; the launcher adds
  the partials (a fixed order: deterministic). ``E`` never reaches memory.

Tiles come from the back-projection's table (kernels/_launch.py, ``"backproject"``): the
operands and the reduction are the same. Dtypes: float32 / bfloat16 / float16 (float64:
the reference or C++ backend). The op layer (lowrank_kernels/ops/residual.py) validates
the arguments before any launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels._projection_tile import _gemm_main_loop, _op_bytes, _proj_launch_args, _tile_offsets
from lowrank_kernels.kernels._tl import _cast_out

#: the smallest tile side of the back-projection tables: bounds the number of programs (partial sums)
_MIN_TILE = 16


@triton.jit
def _residual_kernel(
    w_ptr, g_ptr, u_ptr, p_ptr, f_ptr, out_ptr,
    M, N, K,
    stride_w0, stride_w1,
    stride_g0, stride_g1,
    stride_u0, stride_u1,
    stride_p_rank, stride_p_dim,
    alpha, decay,
    aux0_ptr, aux1_ptr, aux_int, aux_bound,
    SIDE_RIGHT: tl.constexpr,
    PROJ_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    INTERPRET: tl.constexpr,
    APPLY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PREFETCH: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """One ``BLOCK_M x BLOCK_N`` tile of ``E = back(U) + f * G`` (``m x n``; right:
    ``back[i, j] = sum_k U[i, k] P[k, j]``, ``f`` per row; left: ``sum_k P[i, k] U[k, j]``,
    ``f`` per column), then ``W = decay * W + alpha * E`` (``APPLY``) or the tile's ``sum(E^2)``
    at ``out_ptr[program_id]``."""
    offs_m, offs_n, offs_k, mask_m, mask_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IDX64)
    mask = mask_m[:, None] & mask_n[None, :]
    if APPLY:
        w_ptrs = w_ptr + offs_m[:, None] * stride_w0 + offs_n[None, :] * stride_w1
        if PREFETCH:
            w = tl.load(w_ptrs, mask=mask, other=0.0)
    acc = _gemm_main_loop(
        u_ptr, stride_u0, stride_u1, p_ptr, stride_p_rank, stride_p_dim, aux0_ptr, aux1_ptr, aux_int, aux_bound,
        offs_m, offs_n, offs_k, mask_m, mask_n, K,
        SIDE_RIGHT, True, PROJ_MODE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
    )
    # G after the loop: held across it (with the accumulator and a prefetched W) it spills in float32
    g = tl.load(g_ptr + offs_m[:, None] * stride_g0 + offs_n[None, :] * stride_g1, mask=mask, other=0.0)
    if SIDE_RIGHT:
        f = tl.load(f_ptr + offs_m, mask=mask_m, other=0.0)
        e = acc + f[:, None] * g.to(tl.float32)
    else:
        f = tl.load(f_ptr + offs_n, mask=mask_n, other=0.0)
        e = acc + f[None, :] * g.to(tl.float32)
    # masked lanes: 0 (G, f and the GEMM operands load 0 there)
    if APPLY:
        if not PREFETCH:
            w = tl.load(w_ptrs, mask=mask, other=0.0)
        w = decay * w.to(tl.float32) + alpha * e
        tl.store(w_ptrs, _cast_out(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        tl.store(out_ptr + tl.program_id(0), tl.sum(tl.sum(e * e, axis=1), axis=0))


def _launch(param, grad, low, proj, factor, side, alpha, decay, indices, apply: bool):
    m, n = grad.shape
    right = side == "right"
    desc = proj if indices is None else (proj, indices)
    named = [("grad", grad), ("low", low), ("proj" if indices is None else "basis", proj)]
    if apply:
        named.append(("param", param))
    L.check_dtypes("residual_apply" if apply else "residual_sumsq", named)
    p, rank, sp_rank, sp_dim, p_dtypes, aux0, aux1, aux_int, aux_bound, mode, p_idx64 = _proj_launch_args(desc, side)
    f = factor.to(torch.float32).contiguous()
    n_out = triton.cdiv(m, _MIN_TILE) * triton.cdiv(n, _MIN_TILE)
    out = torch.zeros(max(n_out, 1), dtype=torch.float32, device=grad.device)
    if m == 0 or n == 0:
        return out.sum()
    w = param if apply else grad  # unread without APPLY
    dot_dtype, precision = L.dot_config(low.dtype, *p_dtypes)
    L.launch_gemm(
        "backproject", _residual_kernel,
        lambda tile: (triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn),),
        (
            w, grad, low, p, f, out,
            m, n, rank,
            w.stride(0), w.stride(1),
            grad.stride(0), grad.stride(1),
            low.stride(0), low.stride(1),
            sp_rank, sp_dim,
            float(alpha), float(decay),
            aux0, aux1, aux_int, aux_bound,
        ),
        dict(
            SIDE_RIGHT=right,
            PROJ_MODE=mode,
            DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision,
            IDX64=p_idx64 or L.needs_int64(w, grad, low),
            INTERPRET=L.INTERPRET,
            APPLY=apply,
        ),
        device=grad.device, M=m, N=n, K=rank, op_bytes=_op_bytes(low, p), side=side, mode=mode,
        restore=(param,) if apply else (out,),
    )
    return out.sum()


def residual_sumsq_triton(grad, low, proj, factor, side, indices=None):
    """Triton backend of ``lowrank_kernels::residual_sumsq`` (arguments as the op): a 0-dim
    float32 tensor, the sum of the per-tile partial sums (fixed order)."""
    return _launch(None, grad, low, proj, factor, side, 0.0, 1.0, indices, apply=False)


def residual_apply_triton(param, grad, low, proj, factor, side, alpha, decay, indices=None):
    """Triton backend of ``lowrank_kernels::residual_apply`` (arguments as the op), in place."""
    _launch(param, grad, low, proj, factor, side, alpha, decay, indices, apply=True)
