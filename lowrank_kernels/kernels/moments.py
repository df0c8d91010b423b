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
from the ops' trailing moment arguments, which the op layer has validated).
"""
from __future__ import annotations

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
    """The :class:`MomentFormat` of a launch from the ops' trailing moment arguments.

    8-bit iff ``m_absmax`` and ``v_absmax`` are given (uint8 codes, float32 absmax per block
    of ``block_size`` columns); bf16 stochastic rounding iff ``moment_seed >= 0``; else plain.
    The op layer validates these arguments with messages (``check_moment_state`` in
    lowrank_kernels/ops/_checks.py) before any launch; the asserts here only state what the
    kernels rely on. ``op`` names the caller in an assertion's message.
    """
    if m_absmax is None:
        assert v_absmax is None and block_size == 0, op
        if moment_seed < 0:
            return PLAIN
        assert exp_avg.dtype == torch.bfloat16 and exp_avg_sq.dtype == torch.bfloat16, op
        k1, k2 = seed_keys(moment_seed)
        return MomentFormat(MOMENTS_SR16, k1=k1, k2=k2)
    assert v_absmax is not None and 1 <= block_size <= 256 and moment_seed < 0, op
    assert exp_avg.dtype == torch.uint8 and exp_avg_sq.dtype == torch.uint8, op
    want = tuple(exp_avg.shape[:-1]) + (-(-exp_avg.shape[-1] // block_size),)
    for t in (m_absmax, v_absmax):
        assert t.dtype == torch.float32 and tuple(t.shape) == want and t.is_contiguous(), op
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
    """The moments for the launchers' dtype check (``_launch.check_dtypes``): none for 8-bit
    moments (uint8 codes)."""
    return () if fmt.mode == MOMENTS_Q8 else (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))


def _foreach_moment_formats(op, exp_avgs, exp_avg_sqs, m_absmax, v_absmax, block_size, moment_seed):
    """Each entry's :class:`MomentFormat` from the multi-tensor ops' lists (empty = not given;
    else one entry per tensor, as the op layer checked)."""
    n = len(exp_avgs)
    m_absmax, v_absmax, moment_seed = list(m_absmax or ()), list(v_absmax or ()), list(moment_seed or ())
    assert all(len(lst) in (0, n) for lst in (m_absmax, v_absmax, moment_seed)), op
    return [
        moment_format(f"{op} (parameter {i})", exp_avgs[i], exp_avg_sqs[i], m_absmax[i] if m_absmax else None,
                      v_absmax[i] if v_absmax else None, block_size, moment_seed[i] if moment_seed else -1)
        for i in range(n)
    ]
