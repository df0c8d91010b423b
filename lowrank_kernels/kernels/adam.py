"""Triton kernel of the adam family: the elementwise Adam moment update on ``R``.

``_adam_update_kernel`` reads ``R``, ``M``, ``V`` (any of float32 / bfloat16 / float16)
in flat blocks, computes in float32 ``M = b1 M + (1-b1) R``, ``V = b2 V + (1-b2) R^2``,
``N = M / (sqrt(V) + eps)`` (from the float32 moments, as the reference), and stores
``M``, ``V`` in place and ``N`` in the moments' dtype: one read of three tensors, three
writes, no GEMM (APOLLO and FRUGAL project ``R`` themselves).

Moment formats (kernels/moments.py; spec reference/moments.py): with ``moment_seed >= 0``
bf16 moments are stored with stochastic rounding (counter = flat index, ``+ numel`` for
``V``), in the same kernel. 8-bit moments (uint8 codes + float32 absmax per block of at most
``block_size`` elements along the last dim) take ``_adam_update_q8_kernel``: each
program owns ``BLOCK_R`` rows x one quantization block, dequantizes both moments
through the 256-entry maps, updates them in float32, computes ``N`` (float32) from those
values and requantizes (fresh absmax per block, nearest map entry), with the helpers of
kernels/moments.py, as the projection epilogue, so no float32 moment reaches memory.

Multi-tensor form: ``_adam_update_grouped_kernel`` / ``_adam_update_q8_grouped_kernel``
run ``adam_foreach_update`` in ONE launch per list (per dtype / format / alignment
sub-list of a mixed list; :func:`adam_alignment`), as torch's ``multi_tensor_apply``: a
table with one row per tensor (addresses, sizes, seeds, first chunk), each program one
chunk of one tensor found by a binary search over the tensors' first chunks, the chunk
computed by the single kernels' bodies (``_adam_block``, ``_adam_q8_block``): bitwise the
single launches' results.

Non-contiguous inputs go through contiguous copies (the moments are copied back after
the kernel): the optimizers pass contiguous state, so that path is for correctness only.
float64 is rejected with a TypeError (use the reference or C++ backend).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels._tl import _cast_out, _grouped_problem, _grouped_ptr, _grouped_x16
from lowrank_kernels.kernels.moments import (
    MOMENTS_Q8,
    _foreach_moment_formats,
    _moment_named,
    _q8_decode,
    _q8_encode,
    _round_sr_bf16,
    moment_format,
    q8_maps,
)

_address = L.address
_check_dtypes = L.check_dtypes

_BLOCK = 1024
# 8-bit: elements per program (BLOCK_R rows x one block of BLOCK_C >= block_size lanes)
_Q8_ELEMS = 1024


@triton.jit
def _adam_moments(m, v, r, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """``(beta1 m + (1 - beta1) r, beta2 v + (1 - beta2) r^2)`` in float32, rounded exactly as
    the reference's torch ops (``m.mul(beta1).add_(r, alpha=1 - beta1)`` and
    ``v.mul(beta2).addcmul_(r, r, value=1 - beta2)`` compute ``fma(r, 1 - beta1, beta1 m)`` and
    ``fma((1 - beta2) r, r, beta2 v)``), so the float32 moments, and with them the stochastic
    rounding and the 8-bit codes, equal the reference's bit for bit (the projection epilogue
    rounds each operation instead, its R differing anyway)."""
    m = tl.fma(r, one_minus_beta1, beta1 * m)
    v = tl.fma(one_minus_beta2 * r, r, beta2 * v)
    return m, v


# The stochastic-rounding keys change every step (they come from the step's seed): typed int64
# and not specialized, so every seed launches the same compiled kernel (Triton otherwise
# specializes an integer argument on its value: 1, divisibility by 16, int32 vs int64 range).
@triton.jit(do_not_specialize=["k1", "k2"])
def _adam_update_kernel(
    r_ptr, m_ptr, v_ptr, n_ptr, numel,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, k1: tl.int64, k2: tl.int64,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr, SR: tl.constexpr,
):
    """Flat blocks of ``BLOCK`` elements; ``SR``: bf16 moments stored with stochastic
    rounding (keys ``k1``/``k2``, counter = flat index, ``+ numel`` for ``V``)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adam_block(r_ptr, m_ptr, v_ptr, n_ptr, offs, numel, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, k1, k2,
                INTERPRET, SR)


@triton.jit
def _adam_block(r_ptr, m_ptr, v_ptr, n_ptr, offs, numel, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, k1, k2,
                INTERPRET: tl.constexpr, SR: tl.constexpr):
    """The body of the plain / stochastic-rounding Adam kernels (single and grouped): the
    elements ``offs`` (int64 flat indices) of one contiguous tensor of ``numel`` elements."""
    mask = offs < numel
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m, v = _adam_moments(m, v, r, beta1, one_minus_beta1, beta2, one_minus_beta2)
    n = tl.math.div_rn(m, tl.sqrt_rn(v) + eps)  # IEEE division and sqrt, as the projection epilogue
    if SR:
        tl.store(m_ptr + offs, _round_sr_bf16(m, offs.to(tl.uint32), k1, k2, INTERPRET), mask=mask)
        tl.store(v_ptr + offs, _round_sr_bf16(v, (offs + numel).to(tl.uint32), k1, k2, INTERPRET), mask=mask)
    else:
        tl.store(m_ptr + offs, _cast_out(m, m_ptr.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(v_ptr + offs, _cast_out(v, v_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(n_ptr + offs, _cast_out(n, n_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _adam_update_q8_kernel(
    r_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, qmap_ptr, n_ptr, rows, cols, nblk, qstep,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """8-bit moments (contiguous ``rows x cols``): program ``pid`` owns rows
    ``[(pid // nblk) * BLOCK_R, +BLOCK_R)`` x quantization block ``pid % nblk`` (``qstep =
    min(block_size, cols)`` columns in ``BLOCK_C`` lanes); ``qmap_ptr``: kernels/moments.py
    ``q8_maps``."""
    pid = tl.program_id(0)
    _adam_q8_block(r_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, qmap_ptr, n_ptr, pid // nblk, pid % nblk, rows, cols, nblk,
                   qstep, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, BLOCK_R, BLOCK_C)


@triton.jit
def _adam_q8_block(r_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, qmap_ptr, n_ptr, rblk, blk, rows, cols, nblk, qstep,
                   beta1, one_minus_beta1, beta2, one_minus_beta2, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The body of the 8-bit Adam kernels (single and grouped): rows ``[rblk * BLOCK_R, +BLOCK_R)``
    x quantization block ``blk`` of one contiguous ``rows x cols`` tensor."""
    offs_r = rblk.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    lane = tl.arange(0, BLOCK_C)
    offs_c = blk.to(tl.int64) * qstep + lane
    mask_r = offs_r < rows
    mask = mask_r[:, None] & ((offs_c < cols) & (lane < qstep))[None, :]
    offs = offs_r[:, None] * cols + offs_c[None, :]
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    am = tl.load(ma_ptr + offs_r * nblk + blk, mask=mask_r, other=0.0)
    av = tl.load(va_ptr + offs_r * nblk + blk, mask=mask_r, other=0.0)
    m = _q8_decode(tl.load(m_ptr + offs, mask=mask, other=0), am, qmap_ptr)
    v = _q8_decode(tl.load(v_ptr + offs, mask=mask, other=0), av, qmap_ptr + 256)
    m, v = _adam_moments(m, v, r, beta1, one_minus_beta1, beta2, one_minus_beta2)
    n = tl.math.div_rn(m, tl.sqrt_rn(v) + eps)
    tl.store(n_ptr + offs, n, mask=mask)
    cm, am = _q8_encode(m, mask, qmap_ptr + 512)
    tl.store(m_ptr + offs, cm, mask=mask)
    tl.store(ma_ptr + offs_r * nblk + blk, am, mask=mask_r)
    cv, av = _q8_encode(v, mask, qmap_ptr + 768)
    tl.store(v_ptr + offs, cv, mask=mask)
    tl.store(va_ptr + offs_r * nblk + blk, av, mask=mask_r)


# --------------------------------------------------------------------------- grouped (multi-tensor) kernels
# adam_foreach_update in one launch per uniform sub-list, as torch's multi_tensor_apply: one
# int64 table with one row of _NA fields per entry (kernels/projection_grouped.py's launches
# use the same scheme), each program one chunk of one entry (a BLOCK of elements, or for 8-bit
# moments BLOCK_R rows x one quantization block), found by a binary search over the entries'
# first chunks (kernels/_tl.py ``_grouped_problem``); each chunk runs the single kernel's body.
_A_R = tl.constexpr(0)  # address of r (contiguous)
_A_M = tl.constexpr(1)  # exp_avg (codes for 8-bit)
_A_V = tl.constexpr(2)  # exp_avg_sq
_A_N = tl.constexpr(3)  # n (the output)
_A_MA = tl.constexpr(4)  # 8-bit: absmax of exp_avg
_A_VA = tl.constexpr(5)  # 8-bit: absmax of exp_avg_sq
_A_NUMEL = tl.constexpr(6)  # elements (8-bit: rows)
_A_COLS = tl.constexpr(7)  # 8-bit: columns (the last dim)
_A_NBLK = tl.constexpr(8)  # 8-bit: quantization blocks per row
_A_QSTEP = tl.constexpr(9)  # 8-bit: min(block_size, cols)
_A_K1 = tl.constexpr(10)  # stochastic rounding keys
_A_K2 = tl.constexpr(11)
_A_START = tl.constexpr(12)  # the entry's first chunk (program)
_NA = tl.constexpr(16)


@triton.jit(do_not_specialize=["n_entries"])  # a list's length: no recompile when it changes
def _adam_update_grouped_kernel(
    tab_ptr, n_entries, r_ptr, m_ptr, v_ptr, n_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr, SR: tl.constexpr, STEPS: tl.constexpr,
    ALIGNED: tl.constexpr = False,
):
    """:func:`_adam_update_kernel` over a list of tensors in one launch: program ``pid`` is
    chunk ``pid - first[e]`` of entry ``e`` (table ``tab_ptr``, ``n_entries`` rows; ``r_ptr``
    .. ``n_ptr``: tensors of the launch's dtypes, typing the table's addresses). ``ALIGNED``:
    the host checked every entry's addresses (16 bytes) and ``numel`` (16) (:func:`adam_alignment`)
    and wrote the table in the divided-by-16 form of kernels/_tl.py, so the loads and stores are
    vectorized as the single kernel's."""
    pid = tl.program_id(0)
    row = _grouped_problem(tab_ptr, pid, n_entries, _NA, _A_START, STEPS)
    chunk = pid - tl.load(row + _A_START).to(tl.int32)
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k1 = 0
    k2 = 0
    if SR:
        k1 = tl.load(row + _A_K1)
        k2 = tl.load(row + _A_K2)
    numel = _grouped_x16(row, _A_NUMEL, ALIGNED)
    _adam_block(
        _grouped_ptr(row, _A_R, r_ptr, ALIGNED), _grouped_ptr(row, _A_M, m_ptr, ALIGNED),
        _grouped_ptr(row, _A_V, v_ptr, ALIGNED), _grouped_ptr(row, _A_N, n_ptr, ALIGNED),
        offs, numel, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, k1, k2, INTERPRET, SR,
    )


@triton.jit(do_not_specialize=["n_entries"])  # a list's length: no recompile when it changes
def _adam_update_q8_grouped_kernel(
    tab_ptr, n_entries, r_ptr, m_ptr, v_ptr, ma_ptr, va_ptr, qmap_ptr, n_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STEPS: tl.constexpr, ALIGNED: tl.constexpr = False,
):
    """:func:`_adam_update_q8_kernel` over a list of tensors in one launch (``BLOCK_C`` lanes
    cover the widest quantization block of the list; narrower blocks mask the rest).
    ``ALIGNED``: addresses 16-byte aligned, columns and quantization step multiples of 16 in
    every entry (:func:`adam_alignment`), the table in the divided-by-16 form of kernels/_tl.py."""
    pid = tl.program_id(0)
    row = _grouped_problem(tab_ptr, pid, n_entries, _NA, _A_START, STEPS)
    chunk = pid - tl.load(row + _A_START).to(tl.int32)
    nblk = tl.load(row + _A_NBLK).to(tl.int32)
    rblk = chunk // nblk
    cols = _grouped_x16(row, _A_COLS, ALIGNED)
    qstep = _grouped_x16(row, _A_QSTEP, ALIGNED).to(tl.int32)
    _adam_q8_block(
        _grouped_ptr(row, _A_R, r_ptr, ALIGNED), _grouped_ptr(row, _A_M, m_ptr, ALIGNED),
        _grouped_ptr(row, _A_V, v_ptr, ALIGNED), _grouped_ptr(row, _A_MA, ma_ptr, ALIGNED),
        _grouped_ptr(row, _A_VA, va_ptr, ALIGNED), qmap_ptr, _grouped_ptr(row, _A_N, n_ptr, ALIGNED),
        rblk, chunk - rblk * nblk, tl.load(row + _A_NUMEL), cols, nblk,
        qstep, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, BLOCK_R, BLOCK_C,
    )


def adam_alignment(r, m, v, n, fmt) -> bool:
    """Whether one entry of ``adam_foreach_update``'s grouped launch may take alignment hints
    (the contiguous operands ``r``, ``m``, ``v``, ``n`` it reads): every address (the 8-bit
    absmax too) 16-byte aligned, and ``numel`` (8-bit moments: the columns and the quantization
    step ``min(block_size, cols)``) a multiple of 16, what Triton's specialization tells the
    single kernel. Aligned and unaligned entries go to separate launches."""
    tensors = [r, m, v, n]
    if fmt.mode == MOMENTS_Q8:
        cols = n.shape[-1]
        tensors += [fmt.m_absmax, fmt.v_absmax]
        sizes = [cols, min(fmt.block_size, cols)]
    else:
        sizes = [n.numel()]
    return not (any(_address(t) % 16 for t in tensors) or any(x % 16 for x in sizes))


def _launch(r, m, v, out, numel, beta1, beta2, eps, fmt):
    # Through the shared plumbing: device guard, explicit enable_fp_fusion, compile-check capture.
    if fmt.mode == MOMENTS_Q8:
        cols = out.shape[-1]
        rows = numel // cols
        qstep = min(fmt.block_size, cols)
        nblk = triton.cdiv(cols, fmt.block_size)
        block_c = max(16, triton.next_power_of_2(qstep))
        block_r = max(1, _Q8_ELEMS // block_c)
        L.launch(
            "adam", _adam_update_q8_kernel, (triton.cdiv(rows, block_r) * nblk,),
            (r, m, v, fmt.m_absmax, fmt.v_absmax, q8_maps(out.device), out, rows, cols, nblk, qstep,
             float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps)),
            dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8), device=out.device,
        )
        return
    L.launch(
        "adam", _adam_update_kernel, (triton.cdiv(numel, _BLOCK),),
        (r, m, v, out, numel, float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps),
         fmt.k1, fmt.k2),
        dict(BLOCK=_BLOCK, INTERPRET=L.INTERPRET, SR=fmt.mode != 0, num_warps=4), device=out.device,
    )


def adam_update_triton(r, exp_avg, exp_avg_sq, beta1, beta2, eps, m_absmax=None, v_absmax=None, block_size=0,
                       moment_seed=-1):
    """Triton backend of ``lowrank_kernels::adam_update`` (arguments as the op).

    ``N`` in the moments' dtype, float32 for 8-bit moments (``m_absmax``/``v_absmax`` given;
    blocks along ``r``'s last dim); bf16 moments with ``moment_seed >= 0`` are stored with
    stochastic rounding (see the module doc).
    """
    fmt = moment_format("adam_update", exp_avg, exp_avg_sq, m_absmax, v_absmax, block_size, moment_seed)
    _check_dtypes("adam_update", (("r", r),) + _moment_named(fmt, exp_avg, exp_avg_sq))
    out = torch.empty(exp_avg.shape, dtype=torch.float32 if fmt.mode == MOMENTS_Q8 else exp_avg.dtype,
                      device=exp_avg.device)
    _update(r, exp_avg, exp_avg_sq, out, beta1, beta2, eps, fmt)
    return out


def _update(r, exp_avg, exp_avg_sq, out, beta1, beta2, eps, fmt):
    """The update with ``N`` written into ``out`` (contiguous, moments' shape; moments' dtype,
    float32 for 8-bit moments)."""
    numel = out.numel()
    if numel == 0:
        return
    rc = r.contiguous()
    m = exp_avg if exp_avg.is_contiguous() else exp_avg.contiguous()
    v = exp_avg_sq if exp_avg_sq.is_contiguous() else exp_avg_sq.contiguous()
    _launch(rc, m, v, out, numel, beta1, beta2, eps, fmt)
    if m is not exp_avg:
        exp_avg.copy_(m)
    if v is not exp_avg_sq:
        exp_avg_sq.copy_(v)


def adam_foreach_update_triton(r, exp_avg, exp_avg_sq, n, beta1, beta2, eps, m_absmax, v_absmax, block_size,
                               moment_seed):
    """Triton backend of ``lowrank_kernels::adam_foreach_update``: ONE launch for the whole
    list (:func:`_adam_update_grouped_kernel`, or :func:`_adam_update_q8_grouped_kernel` for
    8-bit moments; a list that mixes dtypes or moment formats is split on the host into
    uniform sub-lists, one launch each), after a dtype and moment-format check of every entry
    (nothing is written on a bad one); ``N`` into ``n[i]``. Each chunk runs the single
    kernels' code: the results are the single-tensor launcher's bit for bit. Non-contiguous
    ``r`` / moments go through contiguous copies (moments copied back), as the single launcher.
    ``m_absmax`` / ``v_absmax`` / ``moment_seed``: one entry per tensor, or empty (not given)."""
    fmts = _foreach_moment_formats("adam_foreach_update", exp_avg, exp_avg_sq, m_absmax, v_absmax, block_size,
                                   moment_seed)
    for i in range(len(r)):
        _check_dtypes(f"adam_foreach_update (entry {i})", (("r", r[i]),) + _moment_named(fmts[i], exp_avg[i],
                                                                                          exp_avg_sq[i]))
    # contiguous operands (copies of the odd ones; the moments' copies are written back)
    live = [i for i in range(len(r)) if n[i].numel()]
    rc = {i: r[i].contiguous() for i in live}
    mc = {i: exp_avg[i] if exp_avg[i].is_contiguous() else exp_avg[i].contiguous() for i in live}
    vc = {i: exp_avg_sq[i] if exp_avg_sq[i].is_contiguous() else exp_avg_sq[i].contiguous() for i in live}
    groups: dict = {}
    for i in live:
        key = (r[i].dtype, exp_avg[i].dtype, exp_avg_sq[i].dtype, n[i].dtype, fmts[i].mode,
               adam_alignment(rc[i], mc[i], vc[i], n[i], fmts[i]))
        groups.setdefault(key, []).append(i)
    for key, members in groups.items():
        aligned = key[-1]
        dev = n[members[0]].device
        meta = dev.type == "meta"

        def ptr(t):
            return 0 if meta else t.data_ptr()

        i0, fmt0 = members[0], fmts[members[0]]
        q8 = fmt0.mode == MOMENTS_Q8
        rows, chunks = [], 0
        if q8:
            block_c = max(max(16, triton.next_power_of_2(min(fmts[i].block_size, n[i].shape[-1]))) for i in members)
            block_r = max(1, _Q8_ELEMS // block_c)
        for i in members:
            row = [0] * 16
            row[0], row[1], row[2], row[3] = ptr(rc[i]), ptr(mc[i]), ptr(vc[i]), ptr(n[i])
            row[12] = chunks
            if q8:
                cols = n[i].shape[-1]
                row[4], row[5] = ptr(fmts[i].m_absmax), ptr(fmts[i].v_absmax)
                row[6], row[7] = n[i].numel() // cols, cols
                row[8], row[9] = triton.cdiv(cols, fmts[i].block_size), min(fmts[i].block_size, cols)
                chunks += triton.cdiv(row[6], block_r) * row[8]
            else:
                row[6] = n[i].numel()
                row[10], row[11] = fmts[i].k1, fmts[i].k2
                chunks += triton.cdiv(row[6], _BLOCK)
            rows.append(row)
        if aligned:  # fields divided by 16, addresses relative to the launch's tensor arguments (kernels/_tl.py)
            bases = {0: rc[i0], 1: mc[i0], 2: vc[i0], 3: n[i0]}
            if q8:
                bases.update({4: fmt0.m_absmax, 5: fmt0.v_absmax})
            rows = [L.aligned_row(row, {f: ptr(t) for f, t in bases.items()}, [7, 9] if q8 else [6]) for row in rows]
        tab = L.device_table([x for row in rows for x in row], torch.int64, dev)
        count, steps = len(rows), L.search_steps(len(rows))
        betas = (float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps))
        if q8:
            L.launch(
                "adam", _adam_update_q8_grouped_kernel, (chunks,),
                (tab, count, rc[i0], mc[i0], vc[i0], fmt0.m_absmax, fmt0.v_absmax, q8_maps(dev), n[i0], *betas),
                dict(BLOCK_R=block_r, BLOCK_C=block_c, STEPS=steps, ALIGNED=aligned, num_warps=8), device=dev,
            )
        else:
            L.launch(
                "adam", _adam_update_grouped_kernel, (chunks,),
                (tab, count, rc[i0], mc[i0], vc[i0], n[i0], *betas),
                dict(BLOCK=_BLOCK, INTERPRET=L.INTERPRET, SR=fmt0.mode != 0, STEPS=steps, ALIGNED=aligned,
                     num_warps=4), device=dev,
            )
        for i in members:
            if mc[i] is not exp_avg[i]:
                exp_avg[i].copy_(mc[i])
            if vc[i] is not exp_avg_sq[i]:
                exp_avg_sq[i].copy_(vc[i])
