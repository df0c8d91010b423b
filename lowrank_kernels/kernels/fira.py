"""Triton backend of the fira family (``lowrank_kernels::fira_foreach_update``).

Per list: the projections (the projection family's Triton GEMM, per entry), then ONE grouped
launch of the Adam update (:func:`~lowrank_kernels.kernels.adam.adam_foreach_update_triton`),
ONE grouped launch of the residual norms (:func:`_residual_grouped_kernel`, square-sum mode)
and ONE grouped launch of the applies (the same kernel, apply mode). The scaling factors and
the limiter are the reference's torch operations on the low-rank and scalar tensors
(:mod:`lowrank_kernels.reference.fira`), per entry, no host read. Results match the reference
to float32 rounding.

``_residual_grouped_kernel`` is kernels/residual.py's ``_residual_kernel`` over a list of
problems of any shapes: one program per output tile of any problem (grid = the total tile
count), a program finds its problem by a binary search over the host-built first tiles
(:func:`~lowrank_kernels.kernels._tl._grouped_problem`) in ONE int64 table (``_F_*`` fields per
problem: addresses, shapes, strides, the DCT projector's extras), then computes its tile with
the single kernel's main loop and epilogue. One tile config per launch (the
``"residual_grouped"`` table's tile of the largest problem: the grouped back-projection's table
except where kernels/_launch.py says otherwise). In square-sum mode each
program stores its tile's ``sum(E^2)`` at ``partial[program_id]`` and the launcher adds each
problem's partials (a fixed order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels._projection_tile import _gemm_main_loop, _op_bytes, _proj_launch_args, _tile_offsets_at
from lowrank_kernels.kernels._tl import _cast_out, _grouped_problem, _grouped_ptr
from lowrank_kernels.reference import fira as ref
from lowrank_kernels.reference.projection import n_dtype

from .adam import adam_foreach_update_triton
from .projection import projection_project_triton

# --------------------------------------------------------------------------- the problem table
_F_W = tl.constexpr(0)  # the parameter (apply mode)
_F_G = tl.constexpr(1)  # the gradient
_F_U = tl.constexpr(2)  # the low-rank operand
_F_P = tl.constexpr(3)  # the dense projector or the DCT basis
_F_F = tl.constexpr(4)  # the factors (float32)
_F_A0 = tl.constexpr(5)  # DCT indices
_F_A1 = tl.constexpr(6)
_F_DM = tl.constexpr(7)  # m
_F_DN = tl.constexpr(8)  # n
_F_DK = tl.constexpr(9)  # rank
_F_W0 = tl.constexpr(10)  # strides: parameter, gradient, low-rank operand, projector (rank, dim)
_F_W1 = tl.constexpr(11)
_F_G0 = tl.constexpr(12)
_F_G1 = tl.constexpr(13)
_F_U0 = tl.constexpr(14)
_F_U1 = tl.constexpr(15)
_F_PR = tl.constexpr(16)
_F_PD = tl.constexpr(17)
_F_AUXI = tl.constexpr(18)  # aux_int / aux_bound of the projector loader (DCT rank, basis rows)
_F_AUXB = tl.constexpr(19)
_F_TS = tl.constexpr(20)  # the problem's first tile
_F_IDX = tl.constexpr(21)  # its row of the (alpha, decay) table
_NF = tl.constexpr(22)


@triton.jit
def _field(row, F: tl.constexpr, IDX64: tl.constexpr):
    x = tl.load(row + F)
    if not IDX64:
        x = x.to(tl.int32)
    return x


@triton.jit(do_not_specialize=["n_problems"])  # a list's length: no recompile when it changes
def _residual_grouped_kernel(
    tab_ptr, n_problems,
    w_ptr, g_ptr, u_ptr, p_ptr, f_ptr, aux0_ptr, aux1_ptr, coef_ptr, out_ptr,
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
    STEPS: tl.constexpr = 0,
):
    """One tile of ``E = back(U) + f * G`` of the problem that owns it (kernels/residual.py's
    ``_residual_kernel``), then ``W = decay * W + alpha * E`` (``APPLY``, ``(alpha, decay)``
    the problem's row of ``coef_ptr``) or the tile's ``sum(E^2)`` at ``out_ptr[program_id]``.
    ``w_ptr`` .. ``aux1_ptr``: tensors of the launch's dtypes (they type the table's addresses)."""
    pid = tl.program_id(0)
    row = _grouped_problem(tab_ptr, pid, n_problems, _NF, _F_TS, STEPS)
    tile = pid - tl.load(row + _F_TS).to(tl.int32)
    M = tl.load(row + _F_DM).to(tl.int32)
    N = tl.load(row + _F_DN).to(tl.int32)
    K = tl.load(row + _F_DK).to(tl.int32)
    gp = _grouped_ptr(row, _F_G, g_ptr, False)
    up = _grouped_ptr(row, _F_U, u_ptr, False)
    pp = _grouped_ptr(row, _F_P, p_ptr, False)
    fp = _grouped_ptr(row, _F_F, f_ptr, False)
    a0 = aux0_ptr
    a1 = aux1_ptr
    aux_int = 0
    aux_bound = 0
    if PROJ_MODE != 0:
        a0 = _grouped_ptr(row, _F_A0, aux0_ptr, False)
        a1 = _grouped_ptr(row, _F_A1, aux1_ptr, False)
        aux_int = tl.load(row + _F_AUXI).to(tl.int32)
        aux_bound = tl.load(row + _F_AUXB).to(tl.int32)
    offs_m, offs_n, offs_k, mask_m, mask_n = _tile_offsets_at(tile, M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IDX64)
    mask = mask_m[:, None] & mask_n[None, :]
    if APPLY:
        wp = _grouped_ptr(row, _F_W, w_ptr, False)
        w_ptrs = wp + offs_m[:, None] * _field(row, _F_W0, IDX64) + offs_n[None, :] * _field(row, _F_W1, IDX64)
        if PREFETCH:
            w = tl.load(w_ptrs, mask=mask, other=0.0)
    acc = _gemm_main_loop(
        up, _field(row, _F_U0, IDX64), _field(row, _F_U1, IDX64), pp, _field(row, _F_PR, IDX64),
        _field(row, _F_PD, IDX64), a0, a1, aux_int, aux_bound,
        offs_m, offs_n, offs_k, mask_m, mask_n, K,
        SIDE_RIGHT, True, PROJ_MODE, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
    )
    g = tl.load(gp + offs_m[:, None] * _field(row, _F_G0, IDX64) + offs_n[None, :] * _field(row, _F_G1, IDX64),
                mask=mask, other=0.0)
    if SIDE_RIGHT:
        f = tl.load(fp + offs_m, mask=mask_m, other=0.0)
        e = acc + f[:, None] * g.to(tl.float32)
    else:
        f = tl.load(fp + offs_n, mask=mask_n, other=0.0)
        e = acc + f[None, :] * g.to(tl.float32)
    if APPLY:
        if not PREFETCH:
            w = tl.load(w_ptrs, mask=mask, other=0.0)
        cp = coef_ptr + tl.load(row + _F_IDX) * 2
        alpha = tl.load(cp)
        decay = tl.load(cp + 1)
        w = decay * w.to(tl.float32) + alpha * e
        tl.store(w_ptrs, _cast_out(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(tl.sum(e * e, axis=1), axis=0))


def residual_grouped(params, grads, lows, projs, indices, factors, side, coef=None):
    """The residual pass over a list in ONE launch: ``coef`` None: each entry's
    ``sum(E^2)`` (a float32 vector, one per entry); else ``W <- decay W + alpha E`` in place
    with ``(alpha, decay)`` the entry's row of ``coef`` (an ``(n, 2)`` float32 device tensor).
    ``projs[i]`` dense, or a DCT basis with ``indices[i]`` (``indices``: a list or None).
    One dtype per role over the list (the op's float32 weights)."""
    n = len(grads)
    right = side == "right"
    apply = coef is not None
    dev = grads[0].device
    descs = [projs[i] if indices is None else (projs[i], indices[i]) for i in range(n)]
    args = [_proj_launch_args(d, side) for d in descs]
    mode = args[0][9]
    meta = dev.type == "meta"  # the compile check: only the arguments' types matter

    def ptr(t):
        return 0 if meta else t.data_ptr()

    rows, probs, counts = [], [], []
    idx64 = False
    for i in range(n):
        m_, n_ = grads[i].shape
        a = args[i]
        w = params[i] if apply else grads[i]
        idx64 = idx64 or a[10] or L.needs_int64(w, grads[i], lows[i])
        row = [ptr(w), ptr(grads[i]), ptr(lows[i]), ptr(a[0]), ptr(factors[i]), ptr(a[5]), ptr(a[6]), m_, n_, a[1],
               *w.stride(), *grads[i].stride(), *lows[i].stride(),
               a[2], a[3], a[7], a[8], 0, i]
        rows.append(row)
        probs.append((m_, n_, a[1]))
    bytes_ = _op_bytes(lows[0], args[0][0])
    tile = L.grouped_tile("residual_grouped", dev, problems=probs, op_bytes=bytes_, side=side, mode=mode)
    total = 0
    for row, (m_, n_, _) in zip(rows, probs):
        row[_F_TS.value] = total
        c = triton.cdiv(m_, tile.bm) * triton.cdiv(n_, tile.bn) if m_ and n_ else 0
        counts.append(c)
        total += c
    out = torch.zeros(max(total, 1), dtype=torch.float32, device=dev)
    if total:
        tab = L.device_table([x for row in rows for x in row], torch.int64, dev)
        dot_dtype, precision = L.dot_config(lows[0].dtype, *args[0][4])
        w0 = params[0] if apply else grads[0]
        L.launch_grouped(
            "residual_grouped", _residual_grouped_kernel, (total,),
            (tab, n, w0, grads[0], lows[0], args[0][0], factors[0], args[0][5], args[0][6],
             coef if apply else out, out),
            dict(SIDE_RIGHT=right, PROJ_MODE=mode, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, IDX64=idx64,
                 INTERPRET=L.INTERPRET, APPLY=apply, STEPS=L.search_steps(n)),
            device=dev, tile=tile, problems=probs, op_bytes=bytes_, side=side, mode=mode,
        )
    if apply:
        return None
    lengths = torch.tensor(counts, dtype=torch.int64, device=dev)
    return torch.segment_reduce(out[:total], "sum", lengths=lengths, unsafe=True) if total else out.new_zeros(n)


def fira_foreach_update_triton(params, grads, projs, indices, exp_avg, exp_avg_sq, prev_norm, side, beta1, beta2, eps,
                               scale, mix, gamma, alpha, decay, m_absmax, v_absmax, block_size, moment_seed):
    """Triton backend of ``lowrank_kernels::fira_foreach_update`` (arguments as the op): the
    projections per entry, then one grouped launch each for the Adam updates, the residual
    norms (with the limiter) and the applies."""
    n = len(params)
    if n == 0:
        return
    idx = list(indices) if len(indices) else [None] * n
    for i in range(n):
        L.check_dtypes(f"fira_foreach_update (entry {i})",
                       [("param", params[i]), ("grad", grads[i]), ("proj" if idx[i] is None else "basis", projs[i])])
    lows = [projection_project_triton(g, proj, side, ix) for g, proj, ix in zip(grads, projs, idx)]
    rs = [low.to(torch.float32 if m.dtype == torch.uint8 else m.dtype).contiguous() for low, m in zip(lows, exp_avg)]
    ns = [torch.empty(t.shape, dtype=n_dtype(t), device=t.device) for t in exp_avg]
    adam_foreach_update_triton(rs, list(exp_avg), list(exp_avg_sq), ns, beta1, beta2, eps, list(m_absmax),
                               list(v_absmax), block_size, list(moment_seed))
    right = side == "right"
    dim = 1 if right else 0
    n32 = [x.to(low.dtype) for x, low in zip(ns, lows)]
    s = [torch.linalg.vector_norm(x, dim=dim) / (torch.linalg.vector_norm(low, dim=dim) + ref.TINY)
         for x, low in zip(n32, lows)]

    def bcast(v):
        return v.unsqueeze(1) if right else v.unsqueeze(0)

    if len(prev_norm):
        neg = [(low * bcast(f) * (-mx)).contiguous() for low, f, mx in zip(lows, s, mix)]
        q = residual_grouped(None, grads, neg, projs, None if idx[0] is None else idx, s, side).sqrt()
        for i in range(n):
            qi = q[i]
            lim = torch.clamp(qi / (prev_norm[i].to(qi.dtype) + ref.TINY), min=gamma[i]) / gamma[i]
            s[i] = s[i] / lim.to(s[i].dtype)
            prev_norm[i].copy_(qi / lim)
    upd = [(x * sc - low * bcast(f) * mx).contiguous() for x, low, f, sc, mx in zip(n32, lows, s, scale, mix)]
    coef = L.device_table([v for a, d in zip(alpha, decay) for v in (a, d)], torch.float32, params[0].device)
    residual_grouped(params, grads, upd, projs, None if idx[0] is None else idx, s, side, coef=coef)
