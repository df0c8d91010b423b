"""Moment formats of the Adam epilogues: host-side description and device code.

Three formats (spec: ``lowrank_kernels/reference/moments.py``), selected by the constexpr
``MOMENTS`` of the project + Adam kernels (kernels/projection.py,
kernels/projection_grouped.py) and the elementwise Adam kernels (kernels/adam.py):

- :data:`MOMENTS_PLAIN`: moments in their dtype (float32 / bf16 / fp16), rounded to
  nearest on store (:func:`~lowrank_kernels.kernels._tl._cast_out`);
- :data:`MOMENTS_SR16`: bf16 moments stored with stochastic rounding
  (:func:`_round_sr_bf16`: 16 bits of the counter hash of reference/quant.py added below
  the kept bits, counter = the moment's flat index, ``+ numel`` for ``V``; identical bits
  to reference/moments.py ``bf16_round_sr_ref``);
- :data:`MOMENTS_Q8`: uint8 codes + float32 absmax per block of at most ``block_size``
  elements inside a row: the epilogue dequantizes the codes through the 256-entry maps
  (:func:`_q8_decode`, a gather from :func:`q8_maps`), updates in float32 and requantizes
  by an 8-step binary search over the map's 255 float32 midpoints (:func:`_q8_encode`).
  No float32 moment tensor is written to memory. A block holding a NaN or an infinity
  gets absmax NaN and the zero code.

Host side: :class:`MomentFormat` (one launch's format, built by :func:`moment_format`
from the ops' trailing moment arguments).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from lowrank_kernels.kernels._tl import _cast_out
from lowrank_kernels.reference.moments import moments_dynamic_map
from lowrank_kernels.reference.quant import seed_keys


# --------------------------------------------------------------------------- device code
# MOMENTS constexpr of the Adam epilogues (kernels/projection*.py, kernels/adam.py):
MOMENTS_PLAIN = 0  # moments in their dtype (float32 / bf16 / fp16), round to nearest on store
MOMENTS_SR16 = 1  # bf16 moments, stochastic rounding on store (moment_seed >= 0)
MOMENTS_Q8 = 2  # uint8 codes + float32 absmax per block (reference/moments.py)


@triton.jit
def _hash32(x):
    """The 32-bit "lowbias32" hash of reference/quant.py (``mix32``) on uint32 ``x``
    (uint32 arithmetic: products wrap mod 2**32, shifts are logical). kernels/quant.py's
    ``_mix32`` computes the same in int64; this one needs half the registers."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _round_sr_bf16(x, ctr, k1, k2, INTERPRET: tl.constexpr):
    """``x`` (float32) rounded stochastically to bfloat16 (reference/moments.py ``bf16_round_sr_ref``).

    ``ctr``: the uint32 counter of each element (the low 32 bits of the flat index,
    + numel for the second moment: the reference hashes ``i & 0xFFFFFFFF``). ``bf16 bits = (bits(x) + (h >> 16)) >> 16`` with
    ``h = mix32(mix32(idx ^ k1) ^ k2)``; NaN and infinities round to nearest (pass
    through). The sum is formed in uint32 (no wrap: a finite float's bits plus 0xFFFF
    stay below 2**32), truncated, then converted to bfloat16 exactly (the value is
    already a bfloat16).
    """
    h = _hash32(_hash32(ctr ^ tl.cast(k1, tl.uint32)) ^ tl.cast(k2, tl.uint32))  # tl.cast: k may be a constexpr 1
    b = x.to(tl.uint32, bitcast=True)
    sr = ((b + (h >> 16)) & tl.full((), 0xFFFF0000, tl.uint32)).to(tl.float32, bitcast=True)
    finite = (x == x) & (tl.abs(x) != float("inf"))
    return _cast_out(tl.where(finite, sr, x), tl.bfloat16, INTERPRET)


@triton.jit
def _q8_decode(codes, absmax, map_ptr):
    """``map[codes] * absmax[row]`` (float32): one quantization block per tile row."""
    return tl.load(map_ptr + codes.to(tl.int32)) * absmax[:, None]


@triton.jit
def _q8_encode(x, mask, mids_ptr):
    """``(codes, absmax)`` of float32 ``x`` (one quantization block per tile row, ``mask``
    the block's valid elements), exactly as reference/moments.py ``moments_quantize_ref``.

    ``absmax = max |x|`` over the block; ``codes`` = the number of the map's 255 float32
    midpoints (``mids_ptr``, sorted) strictly below ``x * (1 / absmax)`` (nearest entry, ties
    down), found by an 8-step binary search over the count. A block holding a NaN or an
    infinity gets ``absmax = NaN`` and every code of the map's zero entry (the code of
    ``0``); a zero block gets ``absmax = 0``.
    """
    ax = tl.where(mask, tl.abs(x), 0.0)
    absmax = tl.max(ax, axis=1)
    bad = tl.max(tl.where(mask & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0), axis=1) > 0
    safe = tl.where(absmax > 0, absmax, 1.0)
    inv = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    normed = tl.where(bad[:, None], 0.0, x * inv[:, None])
    c = tl.zeros(x.shape, tl.int32)
    for j in tl.static_range(8):
        # after the steps 128 .. 2^(8-j): c <= 255 - 2 * 2^(7-j) + 1, so c + step - 1 <= 254
        mid = tl.load(mids_ptr + c + ((128 >> j) - 1))
        c = tl.where(mid < normed, c + (128 >> j), c)
    absmax = tl.where(bad, float("nan"), absmax)
    return c.to(tl.uint8), absmax


# --------------------------------------------------------------------------- host side
class MomentFormat(NamedTuple):
    """How the Adam moments of one launch are stored (see :func:`moment_format`)."""

    mode: int  # MOMENTS_PLAIN / MOMENTS_SR16 / MOMENTS_Q8
    m_absmax: Optional[torch.Tensor] = None
    v_absmax: Optional[torch.Tensor] = None
    block_size: int = 0
    k1: int = 0
    k2: int = 0


PLAIN = MomentFormat(MOMENTS_PLAIN)


def moment_format(op: str, exp_avg, exp_avg_sq, m_absmax=None, v_absmax=None, block_size=0,
                  moment_seed=-1) -> MomentFormat:
    """Check the moment-format arguments of a launcher (m8spec: the op layer checks them too)
    and return the :class:`MomentFormat`; ValueError / TypeError naming the argument, before
    any write.

    8-bit iff ``m_absmax`` and ``v_absmax`` are both given: the moments are uint8 codes of one
    shape (at least 1-D), each absmax float32, contiguous, of shape
    ``shape[:-1] + (ceil(cols / block_size),)`` on the moments' device, ``1 <= block_size <= 256``.
    Otherwise ``block_size`` must be 0. ``moment_seed >= 0`` (stochastic rounding) only with
    bfloat16 moments.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{op}: block_size must be an int, got {block_size!r}")
    if isinstance(moment_seed, bool) or not isinstance(moment_seed, int):
        raise TypeError(f"{op}: moment_seed must be an int, got {moment_seed!r}")
    if (m_absmax is None) != (v_absmax is None):
        raise ValueError(f"{op}: m_absmax and v_absmax must be given together (8-bit moments) or both be None, "
                         f"got m_absmax={'None' if m_absmax is None else 'a tensor'}, "
                         f"v_absmax={'None' if v_absmax is None else 'a tensor'}")
    if m_absmax is None:
        if block_size != 0:
            raise ValueError(f"{op}: block_size must be 0 unless the moments are 8-bit (m_absmax/v_absmax given), "
                             f"got {block_size}")
        if moment_seed < 0:
            return PLAIN
        for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if t.dtype != torch.bfloat16:
                raise ValueError(f"{op}: moment_seed={moment_seed} (stochastic rounding) needs bfloat16 moments, "
                                 f"but {name} is {t.dtype}; pass moment_seed=-1")
        k1, k2 = seed_keys(moment_seed)
        return MomentFormat(MOMENTS_SR16, k1=k1, k2=k2)
    if moment_seed >= 0:
        raise ValueError(f"{op}: moment_seed={moment_seed} (stochastic rounding) needs bfloat16 moments, but the "
                         "moments are 8-bit; pass moment_seed=-1")
    if not 1 <= block_size <= 256:
        raise ValueError(f"{op}: block_size must be in [1, 256] for 8-bit moments, got {block_size}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.uint8:
            raise TypeError(f"{op}: 8-bit moments: {name} must be uint8 codes, got {t.dtype}")
    if exp_avg.dim() < 1 or exp_avg_sq.shape != exp_avg.shape:
        raise ValueError(f"{op}: 8-bit moments: exp_avg and exp_avg_sq must have one shape of at least one dim, "
                         f"got {tuple(exp_avg.shape)} and {tuple(exp_avg_sq.shape)}")
    want = tuple(exp_avg.shape[:-1]) + (math.ceil(exp_avg.shape[-1] / block_size),)
    for name, t in (("m_absmax", m_absmax), ("v_absmax", v_absmax)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must have shape {want} for moments of shape {tuple(exp_avg.shape)} and "
                             f"block_size {block_size}, got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
        if t.device != exp_avg.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the moments are on {exp_avg.device}")
    return MomentFormat(MOMENTS_Q8, m_absmax, v_absmax, block_size)


_Q8_MAPS: dict = {}


def q8_maps(device) -> torch.Tensor:
    """float32 ``[1024]`` on ``device`` (built once per device): the signed map (first moment),
    the unsigned map (second moment), then each map's 255 decision midpoints
    ``(map[i] + map[i + 1]) / 2`` (float32, as reference/moments.py) padded with ``+inf``,
    at offsets 0 / 256 / 512 / 768 (``qmap_ptr`` of the 8-bit epilogues)."""
    device = torch.device(device)
    key = str(device)
    hit = _Q8_MAPS.get(key)
    if hit is None:
        parts = [moments_dynamic_map(True, "cpu"), moments_dynamic_map(False, "cpu")]
        inf = torch.full((1,), float("inf"), dtype=torch.float32)
        for values in parts[:2]:
            parts.append(torch.cat([(values[:-1] + values[1:]) / 2.0, inf]))
        hit = _Q8_MAPS[key] = torch.cat(parts).to(torch.float32).to(device)
    return hit


def _moment_named(fmt, exp_avg, exp_avg_sq):
    """The moments for :func:`_check_dtypes` (8-bit codes are checked by :func:`moment_format`)."""
    return () if fmt.mode == MOMENTS_Q8 else (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))


def _foreach_moment_formats(op, exp_avgs, exp_avg_sqs, m_absmax, v_absmax, block_size, moment_seed):
    """Each entry's :class:`MomentFormat` from the multi-tensor ops' lists (empty = not given)."""
    n = len(exp_avgs)
    m_absmax, v_absmax, moment_seed = list(m_absmax or ()), list(v_absmax or ()), list(moment_seed or ())
    for name, lst in (("m_absmax", m_absmax), ("v_absmax", v_absmax), ("moment_seed", moment_seed)):
        if len(lst) not in (0, n):
            raise ValueError(f"{op}: {name} must be empty or have one entry per parameter ({n}), got {len(lst)}")
    return [
        moment_format(f"{op} (parameter {i})", exp_avgs[i], exp_avg_sqs[i], m_absmax[i] if m_absmax else None,
                      v_absmax[i] if v_absmax else None, block_size, moment_seed[i] if moment_seed else -1)
        for i in range(n)
    ]
