"""Triton kernel of the adam family: the elementwise Adam moment update on ``R``.

``_adam_update_kernel`` reads ``R``, ``M``, ``V`` (any of float32 / bfloat16 / float16)
in flat blocks, computes in float32 ``M = b1 M + (1-b1) R``, ``V = b2 V + (1-b2) R^2``,
``N = M / (sqrt(V) + eps)`` (from the float32 moments, as the reference), and stores
``M``, ``V`` in place and ``N`` in the moments' dtype: one read of three tensors, three
writes, no GEMM (APOLLO and FRUGAL project ``R`` themselves).

Non-contiguous inputs go through contiguous copies (the moments are copied back after
the kernel): the optimizers pass contiguous state, so that path is for correctness only.
float64 is rejected with a TypeError (use the reference or C++ backend).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels.projection import _cast_out, _check_dtypes

_BLOCK = 1024


@triton.jit
def _adam_update_kernel(
    r_ptr, m_ptr, v_ptr, n_ptr, numel,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = beta1 * m + one_minus_beta1 * r
    v = beta2 * v + one_minus_beta2 * (r * r)
    n = tl.math.div_rn(m, tl.sqrt_rn(v) + eps)  # IEEE division and sqrt, as the projection epilogue
    tl.store(m_ptr + offs, _cast_out(m, m_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(v_ptr + offs, _cast_out(v, v_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(n_ptr + offs, _cast_out(n, n_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _launch(r, m, v, out, numel, beta1, beta2, eps):
    # Through the shared plumbing: device guard, explicit enable_fp_fusion, compile-check capture.
    L.launch(
        "adam", _adam_update_kernel, (triton.cdiv(numel, _BLOCK),),
        (r, m, v, out, numel, float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps)),
        dict(BLOCK=_BLOCK, INTERPRET=L.INTERPRET, num_warps=4), device=out.device,
    )


def _moments_not_yet(op, m_absmax, v_absmax, moment_seed):
    if m_absmax is not None or v_absmax is not None or moment_seed >= 0:
        raise NotImplementedError(
            f"{op}: 8-bit / stochastically rounded moments are not implemented in the Triton backend yet"
        )


def adam_update_triton(r, exp_avg, exp_avg_sq, beta1, beta2, eps, m_absmax=None, v_absmax=None, block_size=0,
                       moment_seed=-1):
    """Triton backend of ``lowrank_kernels::adam_update`` (arguments as the op)."""
    _moments_not_yet("adam_update", m_absmax, v_absmax, moment_seed)
    _check_dtypes("adam_update", (("r", r), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)))
    out = torch.empty(exp_avg.shape, dtype=exp_avg.dtype, device=exp_avg.device)
    _update(r, exp_avg, exp_avg_sq, out, beta1, beta2, eps)
    return out


def _update(r, exp_avg, exp_avg_sq, out, beta1, beta2, eps):
    """The update with ``N`` written into ``out`` (contiguous, moments' dtype and shape)."""
    numel = out.numel()
    if numel == 0:
        return
    rc = r.contiguous()
    m = exp_avg if exp_avg.is_contiguous() else exp_avg.contiguous()
    v = exp_avg_sq if exp_avg_sq.is_contiguous() else exp_avg_sq.contiguous()
    _launch(rc, m, v, out, numel, beta1, beta2, eps)
    if m is not exp_avg:
        exp_avg.copy_(m)
    if v is not exp_avg_sq:
        exp_avg_sq.copy_(v)


def adam_foreach_update_triton(r, exp_avg, exp_avg_sq, n, beta1, beta2, eps, m_absmax, v_absmax, block_size,
                               moment_seed):
    """Triton backend of ``lowrank_kernels::adam_foreach_update``: for now one launch per
    entry (after a dtype check of every entry, so nothing is written on a bad one), ``N``
    into ``n[i]``; a grouped launch over the whole list is later work."""
    if len(m_absmax) or len(v_absmax) or any(s >= 0 for s in moment_seed):
        _moments_not_yet("adam_foreach_update", m_absmax, v_absmax, 0)
    for i in range(len(r)):
        _check_dtypes(f"adam_foreach_update (entry {i})",
                      (("r", r[i]), ("exp_avg", exp_avg[i]), ("exp_avg_sq", exp_avg_sq[i])))
    for i in range(len(r)):
        _update(r[i], exp_avg[i], exp_avg_sq[i], n[i], beta1, beta2, eps)
