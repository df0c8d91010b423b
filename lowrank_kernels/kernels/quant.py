"""Triton kernels of the quant family (spec: ``lowrank_kernels/reference/quant.py``).

Quantizing kernels give each program ``GPP`` whole groups and walk each group in
chunks of ``CH`` (elements, or byte pairs for INT4): a first sweep takes the group's
min/max, a second quantizes and stores (the group is back from L1/L2, so HBM traffic
is one read and one write). Any ``group_size`` works; inputs are read through their
2-D strides (tensors of other ranks through a flat view).

The INT8 stochastic-rounding update draws ``u`` from the same counter hash as the
reference and C++ backends (``mix32(mix32(i ^ k1) ^ k2)`` on the flat index, int64
arithmetic masked to 32 bits), so the three backends draw the same numbers.

Non-finite values (spec: ``lowrank_kernels/reference/quant.py``): the min/max sweep
(:func:`_group_minmax`, one helper for every quantizing kernel) also flags a group holding
a NaN or an infinity (``tl.minimum``/``tl.maximum`` would drop a NaN on the GPU); such a
group stores ``scale = minimum = NaN`` and levels 0, so it dequantizes to NaN, as the C++
and reference backends do. The kernels launch with ``enable_fp_fusion=False``
(kernels/_launch.py), so every level equals the other backends' bitwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels import _launch as L
from lowrank_kernels.kernels._tl import _cast_out
from lowrank_kernels.reference.quant import SCALE_FLOOR, num_groups, seed_keys


def _interpreting() -> bool:
    return L.INTERPRET


def _as_2d(x: torch.Tensor):
    """``(view, flat, cols, stride0, stride1)`` reading ``x`` in row-major order.

    ``flat``: ``x`` is contiguous, element ``f`` is at offset ``f`` (no index math).
    """
    if x.is_contiguous():
        return x, True, max(x.numel(), 1), 0, 1
    if x.dim() == 2:
        return x, False, x.shape[1], x.stride(0), x.stride(1)
    flat = x.reshape(-1)
    return flat, flat.is_contiguous(), flat.numel(), 0, flat.stride(0)


def _gs_shift(group_size: int) -> int:
    """log2(group_size) for a power of two, else -1."""
    return group_size.bit_length() - 1 if group_size & (group_size - 1) == 0 else -1


def _tiles(group_size: int, pairs: bool):
    """``(GPP, CH)``: groups per program and chunk length along a group."""
    units = group_size // 2 if pairs else group_size
    ch = min(triton.next_power_of_2(max(units, 1)), 512)
    # INT4 holds two values per unit: half the groups per program (no register spills on sm_80).
    gpp = max(1, min(8 if pairs else 16, (1024 if pairs else 2048) // ch))
    if _interpreting():
        gpp = max(1, min(gpp, 4))
    return gpp, ch


# --------------------------------------------------------------------------- helpers
@triton.jit
def _mul32(x, c: tl.constexpr):
    return (x * c) & 0xFFFFFFFF


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@triton.jit
def _uniform(idx, k1, k2):
    """Float32 ``u in [0, 1)`` for int64 flat indices ``idx`` (the reference's hash)."""
    h = _mix32(_mix32((idx & 0xFFFFFFFF) ^ k1) ^ k2)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _div(a, b):
    """IEEE round-to-nearest division (as the reference; ``/`` may be approximate on GPU)."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit
def _group_scale(mn, mx, LEVELS: tl.constexpr):
    """``max(max - min, 1e-5) / LEVELS`` per group, IEEE-rounded (the reference's scale)."""
    return tl.math.div_rn(tl.maximum(mx - mn, 1e-5), tl.full(mn.shape, LEVELS, tl.float32))


@triton.jit
def _level(x, mn, scale, offset, LEVELS: tl.constexpr):
    """``clamp(floor((x - min) / scale + offset), 0, LEVELS)`` for ``x`` of shape groups x chunk:
    round to nearest with ``offset = 0.5``, stochastic rounding with ``offset = u ~ U[0, 1)``."""
    return tl.minimum(tl.maximum(tl.floor(_div(x - mn[:, None], scale[:, None]) + offset), 0.0), LEVELS)


@triton.jit
def _nonfinite(x, m):
    """1 where ``x`` is NaN or +-inf inside the mask ``m``, else 0 (int32)."""
    return tl.where(m & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0)


@triton.jit
def _poison(bad, scale, mn):
    """Scale and minimum of the groups flagged ``bad`` (a NaN or inf inside) set to NaN."""
    nan = tl.full(scale.shape, float("nan"), tl.float32)
    return tl.where(bad, nan, scale), tl.where(bad, nan, mn)


@triton.jit
def _group_minmax(mn, mx, nf, x, m, x2, m2, PAIR: tl.constexpr):
    """The running ``(minimum, maximum, non-finite flag)`` of each group (one per row of the
    chunk) after one chunk: the values ``x`` where ``m`` holds and, with ``PAIR``, the values
    ``x2`` where ``m2`` holds (the INT4 kernel's odd elements). Masked lanes take no part; a
    NaN or an infinity sets the flag (``tl.minimum`` / ``tl.maximum`` would drop a NaN)."""
    lo = tl.where(m, x, float("inf"))
    if PAIR:
        lo = tl.minimum(lo, tl.where(m2, x2, float("inf")))
    mn = tl.minimum(mn, tl.min(lo, axis=1))
    hi = tl.where(m, x, float("-inf"))
    if PAIR:
        hi = tl.maximum(hi, tl.where(m2, x2, float("-inf")))
    mx = tl.maximum(mx, tl.max(hi, axis=1))
    bad = _nonfinite(x, m)
    if PAIR:
        bad = tl.maximum(bad, _nonfinite(x2, m2))
    return mn, mx, tl.maximum(nf, tl.max(bad, axis=1))


@triton.jit
def _load_strided(ptr, f, cols, s0, s1, mask, FLAT: tl.constexpr):
    """Float32 values at flat (row-major) indices ``f``; ``FLAT``: contiguous, no index math."""
    if FLAT:
        return tl.load(ptr + f, mask=mask, other=0.0).to(tl.float32)
    row = f // cols
    col = f - row * cols
    return tl.load(ptr + row * s0 + col * s1, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _group_of(f, group_size, gs_shift):
    """``f // group_size``; a shift when the group size is a power of two (``gs_shift >= 0``)."""
    if gs_shift >= 0:
        g = f >> gs_shift
    else:
        g = f // group_size
    return g


# --------------------------------------------------------------------------- INT4 pack / unpack
@triton.jit
def _quant_int4_pack_kernel(
    x_ptr, packed_ptr, scale_ptr, min_ptr, numel, cols, s0, s1, n_groups, group_size,
    GPP: tl.constexpr, CH: tl.constexpr, FLAT: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * GPP + tl.arange(0, GPP)
    gmask = g < n_groups
    gstart = g * group_size
    gend = tl.minimum(gstart + group_size, numel)
    half = group_size // 2
    mn = tl.full((GPP,), float("inf"), tl.float32)
    mx = tl.full((GPP,), float("-inf"), tl.float32)
    nf = tl.zeros((GPP,), tl.int32)
    for k0 in range(0, half, CH):
        k = k0 + tl.arange(0, CH)
        f0 = gstart[:, None] + 2 * k[None, :]
        m0 = gmask[:, None] & (k[None, :] < half) & (f0 < gend[:, None])
        m1 = m0 & (f0 + 1 < gend[:, None])
        a = _load_strided(x_ptr, f0, cols, s0, s1, m0, FLAT)
        b = _load_strided(x_ptr, f0 + 1, cols, s0, s1, m1, FLAT)
        mn, mx, nf = _group_minmax(mn, mx, nf, a, m0, b, m1, True)
    bad = nf > 0
    scale = _group_scale(mn, mx, 15.0)
    for k0 in range(0, half, CH):
        k = k0 + tl.arange(0, CH)
        f0 = gstart[:, None] + 2 * k[None, :]
        m0 = gmask[:, None] & (k[None, :] < half) & (f0 < gend[:, None])
        m1 = m0 & (f0 + 1 < gend[:, None])
        a = _load_strided(x_ptr, f0, cols, s0, s1, m0, FLAT)
        b = _load_strided(x_ptr, f0 + 1, cols, s0, s1, m1, FLAT)
        qa = tl.where(bad[:, None], 0, _level(a, mn, scale, 0.5, 15.0).to(tl.int32))
        qb = tl.where(bad[:, None], 0, _level(b, mn, scale, 0.5, 15.0).to(tl.int32))
        qb = tl.where(m1, qb, 0)
        byte = (qa | (qb << 4)).to(tl.uint8)
        tl.store(packed_ptr + f0 // 2, byte, mask=m0)
    scale, mn = _poison(bad, scale, mn)
    tl.store(scale_ptr + g, scale, mask=gmask)
    tl.store(min_ptr + g, mn, mask=gmask)


def quant_int4_pack_triton(x, group_size):
    x2, flat, cols, s0, s1 = _as_2d(x)
    numel = x.numel()
    g = num_groups(numel, group_size)
    packed = torch.empty(((numel + 1) // 2,), dtype=torch.uint8, device=x.device)
    scale = torch.empty((g,), dtype=torch.float32, device=x.device)
    minimum = torch.empty((g,), dtype=torch.float32, device=x.device)
    gpp, ch = _tiles(group_size, pairs=True)
    L.launch("quant", _quant_int4_pack_kernel, (triton.cdiv(g, gpp),),
             (x2, packed, scale, minimum, numel, cols, s0, s1, g, group_size),
             dict(GPP=gpp, CH=ch, FLAT=flat, num_warps=4), device=x.device)
    return packed, scale, minimum


@triton.jit
def _int4_at(packed_ptr, scale_ptr, min_ptr, f, group_size, gs_shift, mask):
    """Dequantized INT4 values at flat indices ``f`` (float32)."""
    byte = tl.load(packed_ptr + f // 2, mask=mask, other=0).to(tl.int32)
    q = (byte >> ((f & 1) * 4).to(tl.int32)) & 15
    g = _group_of(f, group_size, gs_shift)
    s = tl.load(scale_ptr + g, mask=mask, other=0.0)
    mn = tl.load(min_ptr + g, mask=mask, other=0.0)
    return mn + s * q.to(tl.float32)


@triton.jit
def _quant_int4_unpack_kernel(packed_ptr, scale_ptr, min_ptr, out_ptr, numel, group_size, gs_shift, BLOCK: tl.constexpr,
                              INTERPRET: tl.constexpr):
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = f < numel
    x = _int4_at(packed_ptr, scale_ptr, min_ptr, f, group_size, gs_shift, mask)
    tl.store(out_ptr + f, _cast_out(x, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def quant_int4_unpack_triton(packed, scale, minimum, shape, dtype, group_size):
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    numel = out.numel()
    block = 1024
    L.launch("quant", _quant_int4_unpack_kernel, (triton.cdiv(numel, block),),
             (packed, scale, minimum, out, numel, group_size, _gs_shift(group_size)),
             dict(BLOCK=block, INTERPRET=_interpreting()), device=packed.device)
    return out


# --------------------------------------------------------------------------- INT8
@triton.jit
def _quant_int8_quantize_kernel(
    x_ptr, q_ptr, scale_ptr, min_ptr, numel, cols, s0, s1, n_groups, group_size,
    GPP: tl.constexpr, CH: tl.constexpr, FLAT: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * GPP + tl.arange(0, GPP)
    gmask = g < n_groups
    gstart = g * group_size
    gend = tl.minimum(gstart + group_size, numel)
    mn = tl.full((GPP,), float("inf"), tl.float32)
    mx = tl.full((GPP,), float("-inf"), tl.float32)
    nf = tl.zeros((GPP,), tl.int32)
    for k0 in range(0, group_size, CH):
        k = k0 + tl.arange(0, CH)
        f = gstart[:, None] + k[None, :]
        m = gmask[:, None] & (k[None, :] < group_size) & (f < gend[:, None])
        a = _load_strided(x_ptr, f, cols, s0, s1, m, FLAT)
        mn, mx, nf = _group_minmax(mn, mx, nf, a, m, a, m, False)
    bad = nf > 0
    scale = _group_scale(mn, mx, 255.0)
    for k0 in range(0, group_size, CH):
        k = k0 + tl.arange(0, CH)
        f = gstart[:, None] + k[None, :]
        m = gmask[:, None] & (k[None, :] < group_size) & (f < gend[:, None])
        a = _load_strided(x_ptr, f, cols, s0, s1, m, FLAT)
        q = tl.where(bad[:, None], 0.0, _level(a, mn, scale, 0.5, 255.0))
        tl.store(q_ptr + f, q.to(tl.uint8), mask=m)
    scale, mn = _poison(bad, scale, mn)
    tl.store(scale_ptr + g, scale, mask=gmask)
    tl.store(min_ptr + g, mn, mask=gmask)


def quant_int8_quantize_triton(w, group_size):
    w2, flat, cols, s0, s1 = _as_2d(w)
    numel = w.numel()
    g = num_groups(numel, group_size)
    q = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scale = torch.empty((g,), dtype=torch.float32, device=w.device)
    minimum = torch.empty((g,), dtype=torch.float32, device=w.device)
    gpp, ch = _tiles(group_size, pairs=False)
    L.launch("quant", _quant_int8_quantize_kernel, (triton.cdiv(g, gpp),),
             (w2, q, scale, minimum, numel, cols, s0, s1, g, group_size),
             dict(GPP=gpp, CH=ch, FLAT=flat, num_warps=4), device=w.device)
    return q, scale, minimum


@triton.jit
def _int8_at(q_ptr, scale_ptr, min_ptr, f, group_size, gs_shift, mask):
    """Dequantized INT8 values at flat indices ``f`` (float32)."""
    q = tl.load(q_ptr + f, mask=mask, other=0).to(tl.float32)
    g = _group_of(f, group_size, gs_shift)
    s = tl.load(scale_ptr + g, mask=mask, other=0.0)
    mn = tl.load(min_ptr + g, mask=mask, other=0.0)
    return mn + s * q


@triton.jit
def _quant_int8_dequantize_kernel(q_ptr, scale_ptr, min_ptr, out_ptr, numel, group_size, gs_shift, BLOCK: tl.constexpr,
                                  INTERPRET: tl.constexpr):
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = f < numel
    x = _int8_at(q_ptr, scale_ptr, min_ptr, f, group_size, gs_shift, mask)
    tl.store(out_ptr + f, _cast_out(x, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def quant_int8_dequantize_triton(q, scale, minimum, group_size, dtype):
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    numel = q.numel()
    block = 1024
    L.launch("quant", _quant_int8_dequantize_kernel, (triton.cdiv(numel, block),),
             (q, scale, minimum, out, numel, group_size, _gs_shift(group_size)),
             dict(BLOCK=block, INTERPRET=_interpreting()), device=q.device)
    return out


# The stochastic-rounding keys change with the seed (a new one each update): typed int64
# and not specialized, so every seed launches the same compiled kernel (Triton otherwise
# specializes an integer argument on its value: 1, divisibility by 16, int32 vs int64 range).
@triton.jit(do_not_specialize=["k1", "k2"])
def _quant_int8_update_sr_kernel(
    q_ptr, scale_ptr, min_ptr, u_ptr, numel, cols, s0, s1, n_groups, group_size, decay, alpha, k1: tl.int64,
    k2: tl.int64,
    GPP: tl.constexpr, CH: tl.constexpr, FLAT: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * GPP + tl.arange(0, GPP)
    gmask = g < n_groups
    gstart = g * group_size
    gend = tl.minimum(gstart + group_size, numel)
    old_s = tl.load(scale_ptr + g, mask=gmask, other=0.0)
    old_mn = tl.load(min_ptr + g, mask=gmask, other=0.0)
    mn = tl.full((GPP,), float("inf"), tl.float32)
    mx = tl.full((GPP,), float("-inf"), tl.float32)
    nf = tl.zeros((GPP,), tl.int32)
    for k0 in range(0, group_size, CH):
        k = k0 + tl.arange(0, CH)
        f = gstart[:, None] + k[None, :]
        m = gmask[:, None] & (k[None, :] < group_size) & (f < gend[:, None])
        q = tl.load(q_ptr + f, mask=m, other=0).to(tl.float32)
        upd = _load_strided(u_ptr, f, cols, s0, s1, m, FLAT)
        x = (old_mn[:, None] + old_s[:, None] * q) * decay + alpha * upd
        mn, mx, nf = _group_minmax(mn, mx, nf, x, m, x, m, False)
    bad = nf > 0
    scale = _group_scale(mn, mx, 255.0)
    for k0 in range(0, group_size, CH):
        k = k0 + tl.arange(0, CH)
        f = gstart[:, None] + k[None, :]
        m = gmask[:, None] & (k[None, :] < group_size) & (f < gend[:, None])
        q = tl.load(q_ptr + f, mask=m, other=0).to(tl.float32)
        upd = _load_strided(u_ptr, f, cols, s0, s1, m, FLAT)
        x = (old_mn[:, None] + old_s[:, None] * q) * decay + alpha * upd
        r = _uniform(f, k1, k2)
        qn = tl.where(bad[:, None], 0.0, _level(x, mn, scale, r, 255.0))
        tl.store(q_ptr + f, qn.to(tl.uint8), mask=m)
    scale, mn = _poison(bad, scale, mn)
    tl.store(scale_ptr + g, scale, mask=gmask)
    tl.store(min_ptr + g, mn, mask=gmask)


def quant_int8_update_sr_triton(q, scale, minimum, update, decay, alpha, seed, group_size):
    u2, flat, cols, s0, s1 = _as_2d(update)
    numel = q.numel()
    g = num_groups(numel, group_size)
    k1, k2 = seed_keys(seed)
    gpp, ch = _tiles(group_size, pairs=False)
    L.launch("quant", _quant_int8_update_sr_kernel, (triton.cdiv(g, gpp),),
             (q, scale, minimum, u2, numel, cols, s0, s1, g, group_size, float(decay), float(alpha), k1, k2),
             dict(GPP=gpp, CH=ch, FLAT=flat, num_warps=4), device=q.device)


assert SCALE_FLOOR == 1e-5  # the kernels hard-code the floor of the spec
