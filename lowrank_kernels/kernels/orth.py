"""Triton kernels of the orth family: Newton-Schulz orthogonalization (spec: reference/orth.py).

The launcher works on the wide orientation ``X`` (``s x l``, ``s = min(m, n)``; a tall input
is read through its transposed strides, never copied) in float32 buffers:

1. ``_ns_sumsq_kernel``: per block of ``BLOCK_S`` rows, the sum of squares of the input
   (float32 accumulation), one partial per program;
2. ``_ns_normalize_kernel``: every program reduces the partials (a fixed order: the result
   is deterministic) to ``||X||_F + eps`` and writes its tile of ``X / (||X||_F + eps)`` as
   float32;
3. per ``(a, b, c)`` triple: ``_ns_gram_kernel`` ``A = X X^T`` (``s x s``, K loop over
   ``l``), ``_ns_poly_kernel`` ``B = b A + c A A`` (K loop over ``s``) and
   ``_ns_update_kernel`` ``X' = a X + B X`` (``s x l``, K loop over ``s``) into the other
   buffer; the last update writes the output through its strides (transposed back for a
   tall input).

Every GEMM accumulates in float32 with ``input_precision="ieee"`` (no TF32): the
iteration amplifies rounding, and the matrices are ``s``-sized on one side (Trion's
``r``), so the precision costs little. The list form loops over its entries with these
launches (no grouped kernel yet). float64 is rejected with a TypeError (use the reference
or C++ backend).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L

_FAMILY = "orth"
_BLOCK_S = 16  # rows per sum-of-squares program
_BLOCK_L = 128  # columns per step of its loop
_TILE = 32  # GEMM tile (BM = BN = BK)
_NORM_TILE = (32, 128)  # normalize tile (rows x columns)


@triton.jit
def _ns_sumsq_kernel(x_ptr, part_ptr, S, L_, stride_s, stride_l, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_S, BLOCK_L), dtype=tl.float32)
    for l0 in range(0, L_, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = (rows[:, None] < S) & (cols[None, :] < L_)
        x = tl.load(x_ptr + rows[:, None] * stride_s + cols[None, :] * stride_l, mask=mask, other=0.0)
        x = x.to(tl.float32)
        acc += x * x
    tl.store(part_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _ns_normalize_kernel(x_ptr, part_ptr, y_ptr, S, L_, stride_s, stride_l, n_part, eps,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    offs_p = tl.arange(0, BLOCK_P)
    part = tl.load(part_ptr + offs_p, mask=offs_p < n_part, other=0.0)
    denom = tl.sqrt(tl.sum(part, axis=0)) + eps
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < S) & (cols[None, :] < L_)
    x = tl.load(x_ptr + rows[:, None] * stride_s + cols[None, :] * stride_l, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * L_ + cols[None, :], x / denom, mask=mask)


@triton.jit
def _ns_gram_kernel(x_ptr, a_ptr, S, L_, BM: tl.constexpr, BK: tl.constexpr):
    """A = X X^T for a contiguous float32 X (S x L_), A contiguous (S x S)."""
    offs_i = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_j = tl.program_id(1) * BM + tl.arange(0, BM)
    acc = tl.zeros((BM, BM), dtype=tl.float32)
    for k0 in range(0, L_, BK):
        ks = k0 + tl.arange(0, BK)
        xi = tl.load(x_ptr + offs_i[:, None] * L_ + ks[None, :], mask=(offs_i[:, None] < S) & (ks[None, :] < L_),
                     other=0.0)
        xj = tl.load(x_ptr + offs_j[:, None] * L_ + ks[None, :], mask=(offs_j[:, None] < S) & (ks[None, :] < L_),
                     other=0.0)
        acc = tl.dot(xi, tl.trans(xj), acc, input_precision="ieee")
    tl.store(a_ptr + offs_i[:, None] * S + offs_j[None, :], acc, mask=(offs_i[:, None] < S) & (offs_j[None, :] < S))


@triton.jit
def _ns_poly_kernel(a_ptr, b_ptr, S, coef_b, coef_c, BM: tl.constexpr, BK: tl.constexpr):
    """B = b A + c (A A) for a contiguous float32 A (S x S)."""
    offs_i = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_j = tl.program_id(1) * BM + tl.arange(0, BM)
    acc = tl.zeros((BM, BM), dtype=tl.float32)
    for k0 in range(0, S, BK):
        ks = k0 + tl.arange(0, BK)
        ai = tl.load(a_ptr + offs_i[:, None] * S + ks[None, :], mask=(offs_i[:, None] < S) & (ks[None, :] < S),
                     other=0.0)
        aj = tl.load(a_ptr + ks[:, None] * S + offs_j[None, :], mask=(ks[:, None] < S) & (offs_j[None, :] < S),
                     other=0.0)
        acc = tl.dot(ai, aj, acc, input_precision="ieee")
    mask = (offs_i[:, None] < S) & (offs_j[None, :] < S)
    a = tl.load(a_ptr + offs_i[:, None] * S + offs_j[None, :], mask=mask, other=0.0)
    tl.store(b_ptr + offs_i[:, None] * S + offs_j[None, :], coef_b * a + coef_c * acc, mask=mask)


@triton.jit
def _ns_update_kernel(x_ptr, b_ptr, y_ptr, S, L_, coef_a, stride_ys, stride_yl, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr):
    """Y = a X + B X for contiguous float32 X (S x L_) and B (S x S); Y through its strides."""
    offs_i = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_j = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, S, BK):
        ks = k0 + tl.arange(0, BK)
        b = tl.load(b_ptr + offs_i[:, None] * S + ks[None, :], mask=(offs_i[:, None] < S) & (ks[None, :] < S),
                    other=0.0)
        x = tl.load(x_ptr + ks[:, None] * L_ + offs_j[None, :], mask=(ks[:, None] < S) & (offs_j[None, :] < L_),
                    other=0.0)
        acc = tl.dot(b, x, acc, input_precision="ieee")
    mask = (offs_i[:, None] < S) & (offs_j[None, :] < L_)
    x = tl.load(x_ptr + offs_i[:, None] * L_ + offs_j[None, :], mask=mask, other=0.0)
    tl.store(y_ptr + offs_i[:, None] * stride_ys + offs_j[None, :] * stride_yl, coef_a * x + acc, mask=mask)


def _launch(kernel, grid, args, meta, device):
    L.launch(_FAMILY, kernel, grid, args, meta, device=device)


def orth_newton_schulz_triton(x, coefficients, eps):
    """The iteration of the module doc on a 2-D ``x`` (float32 / bfloat16 / float16); a new
    contiguous float32 tensor of ``x``'s shape."""
    L.check_dtypes("newton_schulz", (("x", x),))
    dev = x.device
    tall = x.shape[0] > x.shape[1]
    xw = x.T if tall else x  # the wide view: strides only, no copy
    S, Ln = xw.shape
    out = torch.empty(x.shape, dtype=torch.float32, device=dev)
    if x.numel() == 0:
        return out
    n_part = triton.cdiv(S, _BLOCK_S)
    part = torch.empty(n_part, dtype=torch.float32, device=dev)
    _launch(_ns_sumsq_kernel, (n_part,), (xw, part, S, Ln, xw.stride(0), xw.stride(1)),
            dict(BLOCK_S=_BLOCK_S, BLOCK_L=_BLOCK_L), dev)
    X = torch.empty((S, Ln), dtype=torch.float32, device=dev)
    br, bc = _NORM_TILE
    _launch(_ns_normalize_kernel, (triton.cdiv(S, br), triton.cdiv(Ln, bc)),
            (xw, part, X, S, Ln, xw.stride(0), xw.stride(1), n_part, float(eps)),
            dict(BLOCK_R=br, BLOCK_C=bc, BLOCK_P=max(16, triton.next_power_of_2(n_part))), dev)
    triples = [tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3)]
    out_w = out.T if tall else out  # the output in the wide orientation (a view)
    if not triples:
        out_w.copy_(X)
        return out
    A = torch.empty((S, S), dtype=torch.float32, device=dev)
    B = torch.empty_like(A)
    Y = torch.empty_like(X) if len(triples) > 1 else None
    t = _TILE
    gs = triton.cdiv(S, t)
    for it, (a, b, c) in enumerate(triples):
        _launch(_ns_gram_kernel, (gs, gs), (X, A, S, Ln), dict(BM=t, BK=t, num_stages=2), dev)
        _launch(_ns_poly_kernel, (gs, gs), (A, B, S, float(b), float(c)), dict(BM=t, BK=t), dev)
        last = it == len(triples) - 1
        dst = out_w if last else Y
        _launch(_ns_update_kernel, (gs, triton.cdiv(Ln, t)),
                (X, B, dst, S, Ln, float(a), dst.stride(0), dst.stride(1)), dict(BM=t, BN=t, BK=t), dev)
        if not last:
            X, Y = Y, X
    return out


def orth_foreach_newton_schulz_triton(xs, coefficients, eps):
    """:func:`orth_newton_schulz_triton` on each entry (one set of launches per entry)."""
    return [orth_newton_schulz_triton(x, coefficients, eps) for x in xs]
