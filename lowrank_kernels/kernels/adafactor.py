"""Triton backend of the adafactor family (``lowrank_kernels::adafactor_foreach_update``).

The update of every entry, ``upd = (rsqrt(row / mean(row))[:, None] * rsqrt(col)[None, :]) * R``
(the full-size elementwise pass of the step), is ONE grouped launch for the whole list
(:func:`_adafactor_scale_grouped_kernel`): a table with one row per entry (addresses of
``R``, the two factor vectors and the output, ``rows``, ``cols``, its first chunk), each
program one chunk of one entry found by a binary search over the entries' first chunks
(kernels/_tl.py ``_grouped_problem``), as the grouped Adam kernel. The projection GEMM, the
factored statistics (row and column means: small reductions), the RMS clipping, the first
moment and the weight decay are the reference's torch operations per entry
(:mod:`lowrank_kernels.reference.adafactor`), the back-projection the projection family's
Triton kernel per entry. Results match the reference to float32 rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels._tl import _grouped_problem
from lowrank_kernels.reference import adafactor as ref

from .projection import projection_backproject_apply_triton

_BLOCK = 1024
_F_R, _F_RF, _F_CF, _F_OUT, _F_ROWS, _F_COLS, _F_START = 0, 1, 2, 3, 4, 5, 6
_NF = tl.constexpr(8)


@triton.jit(do_not_specialize=["n_entries"])  # a list's length: no recompile when it changes
def _adafactor_scale_grouped_kernel(tab_ptr, n_entries, r_ptr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """``out = (rf[i] * cf[j]) * R[i, j]`` (float32, contiguous ``rows x cols``) over a list:
    program ``pid`` is chunk ``pid - first[e]`` of entry ``e`` (table ``tab_ptr``, rows of 8
    int64 fields: R, rf, cf, out addresses, rows, cols, first chunk; ``r_ptr`` types the
    addresses)."""
    pid = tl.program_id(0)
    row = _grouped_problem(tab_ptr, pid, n_entries, _NF, 6, STEPS)
    chunk = pid - tl.load(row + 6).to(tl.int32)
    ty = tl.pointer_type(r_ptr.dtype.element_ty)
    rp = tl.load(row + 0).to(ty)
    rfp = tl.load(row + 1).to(ty)
    cfp = tl.load(row + 2).to(ty)
    op = tl.load(row + 3).to(ty)
    rows = tl.load(row + 4)
    cols = tl.load(row + 5)
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < rows * cols
    i = offs // cols
    j = offs - i * cols
    r = tl.load(rp + offs, mask=mask, other=0.0)
    rf = tl.load(rfp + i, mask=mask, other=0.0)
    cf = tl.load(cfp + j, mask=mask, other=0.0)
    tl.store(op + offs, (rf * cf) * r, mask=mask)


def adafactor_scale_foreach(lows, rfs, cfs, outs) -> None:
    """``outs[i] = (rfs[i][:, None] * cfs[i][None, :]) * lows[i]`` for every entry in ONE launch
    (float32, contiguous; every entry on one device)."""
    live = [i for i in range(len(lows)) if lows[i].numel()]
    if not live:
        return
    dev = lows[live[0]].device
    meta = dev.type == "meta"

    def ptr(t):
        return 0 if meta else t.data_ptr()

    rows, chunks = [], 0
    for i in live:
        r, c = lows[i].shape
        rows.append([ptr(lows[i]), ptr(rfs[i]), ptr(cfs[i]), ptr(outs[i]), r, c, chunks, 0])
        chunks += triton.cdiv(r * c, _BLOCK)
    tab = L.device_table([x for row in rows for x in row], torch.int64, dev)
    L.launch("adafactor", _adafactor_scale_grouped_kernel, (chunks,),
             (tab, len(rows), lows[live[0]]), dict(BLOCK=_BLOCK, STEPS=L.search_steps(len(rows)), num_warps=4),
             device=dev)


def adafactor_foreach_update_triton(params, grads, projs, exp_avg_sq_row, exp_avg_sq_col, exp_avg, m_absmax, side,
                                    eps1, eps2, clip_threshold, beta1, scale_parameter, beta2t, lr, weight_decay,
                                    alpha, block_size, moment_seed):
    """Triton backend of ``lowrank_kernels::adafactor_foreach_update`` (arguments as the op)."""
    lows, lrs, rfs, cfs = [], [], [], []
    for i, (p, g, proj) in enumerate(zip(params, grads, projs)):
        low = (g @ proj.T if side == "right" else proj.T @ g).contiguous()
        lrs.append(ref.adafactor_lr(p, lr[i], eps2, scale_parameter))
        rf, cf = ref.adafactor_factors(low, exp_avg_sq_row[i], exp_avg_sq_col[i], eps1, beta2t[i])
        lows.append(low)
        rfs.append(rf.contiguous())
        cfs.append(cf.contiguous())
    outs = [torch.empty_like(low) for low in lows]
    adafactor_scale_foreach(lows, rfs, cfs, outs)
    for i, (p, proj) in enumerate(zip(params, projs)):
        upd = ref.adafactor_clip_scale_(outs[i], clip_threshold, lrs[i])
        if len(exp_avg):
            upd = ref.adafactor_first_moment(upd, exp_avg[i], beta1, m_absmax[i] if len(m_absmax) else None,
                                             block_size, moment_seed[i] if len(moment_seed) else -1)
        ref.adafactor_apply_(p, upd, proj, side, lrs[i], weight_decay[i], scale_parameter, alpha[i],
                             projection_backproject_apply_triton)
