"""Pure-PyTorch reference of the quant family: the specification.

Group layout (INT4 projector and INT8 weight alike): the tensor is read in logical
row-major order (``x.reshape(-1)``) and cut into groups of ``group_size`` consecutive
elements; the last group may be short. Each group ``g`` keeps a float32 ``scale[g]``
and ``minimum[g]``.

Quantization with ``B`` bits (``L = 2**B - 1`` levels above zero), in float32::

    s = max(max(x_g) - min(x_g), 1e-5) / L
    q = clamp(floor((x - min) / s + 0.5), 0, L)          # round to nearest, ties up
    x' = min + s * q                                      # dequantization

The minimum itself is kept (no integer zero point), so groups that are all positive
or all negative are exact to half a step (the official Q-GaLore code clamps the zero
point to ``[0, L]`` and clips such groups).

INT4 packing: element ``2i`` goes in the low nibble of byte ``i``, element ``2i + 1``
in its high nibble; ``ceil(numel / 2)`` bytes; an odd numel leaves the last high
nibble zero. ``group_size`` must be even so a byte never straddles two groups.

Stochastic rounding (the INT8 weight update)::

    x  = (min + s * q) * decay + alpha * U              # dequantize + update, float32
    min', s' = fresh per-group stats of x (as above, L = 255)
    q' = clamp(floor((x - min') / s' + u), 0, 255)      # u ~ U[0, 1)

``E[min' + s' q'] = x`` exactly whenever ``(x - min') / s'`` lies in ``[0, 255]``,
which fresh stats guarantee (up to one float32 rounding of the top element). With the
old stats an update that moves an element past the old max/min would be clipped (a
biased, saturating error) and the range could never grow; so the stats are recomputed.

Non-finite values: a group that contains a NaN or an infinity (in ``x``, or for the
stochastic-rounding update in ``min + s * q`` / ``decay * . + alpha * U``) gets
``scale = minimum = NaN`` and every level of the group 0, so its dequantization is NaN:
the bad value propagates to the whole group and is never silently quantized to a valid
level (a NaN would otherwise vanish in the min/max, e.g. in CUDA's ``fminf``/``fmaxf``).
All three backends (reference, C++, Triton) implement exactly this. A NaN scale or
minimum coming in (a poisoned group) stays NaN through further updates.

Random numbers: ``u`` for the element with flat index ``i`` is a counter-based hash of
``(seed, i)`` (:func:`uniform_from_seed`), so the draws depend only on the seed and
the element, never on the launch layout. The C++ backend uses the same hash and so
draws the same ``u``; the Triton backend uses the same hash too. Float rounding of
``(x - min') / s'`` may still differ in the last bit between backends, so backends
agree elementwise up to rare one-level differences; each is deterministic per seed.
"""
from __future__ import annotations

import math

import torch


SCALE_FLOOR = 1e-5
MASK32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B


# --------------------------------------------------------------------------- random numbers
def mix32_int(x: int) -> int:
    """The 32-bit integer hash ("lowbias32", C. Wellons) on a Python int."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _C1) & MASK32
    x ^= x >> 15
    x = (x * _C2) & MASK32
    x ^= x >> 16
    return x


def seed_keys(seed: int) -> tuple:
    """Two 32-bit keys derived from a 64-bit seed (computed on the host by every backend)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k1 = mix32_int((seed & MASK32) ^ mix32_int((seed >> 32) ^ 0x9E3779B9))
    k2 = mix32_int(k1 ^ 0x85EBCA6B)
    return k1, k2


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32_int` elementwise on an int64 tensor of values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def uniform_from_seed(seed: int, index: torch.Tensor) -> torch.Tensor:
    """``u[i] in [0, 1)``, float32, for flat element indices ``index`` (int64, < 2**32).

    ``u = (h >> 8) * 2**-24`` with ``h = mix32(mix32(i ^ k1) ^ k2)``: 24 random bits,
    exactly representable in float32, so ``u < 1``.
    """
    k1, k2 = seed_keys(seed)
    h = mix32(mix32((index & MASK32) ^ k1) ^ k2)
    return (h >> 8).to(torch.float32) * (2.0**-24)


# --------------------------------------------------------------------------- grouping helpers
def num_groups(numel: int, group_size: int) -> int:
    return (numel + group_size - 1) // group_size


def _grouped(flat: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pad ``flat`` to whole groups and view as ``(groups, group_size)``; pads with the last value."""
    numel = flat.numel()
    g = num_groups(numel, group_size)
    pad = g * group_size - numel
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(g, group_size)


def group_stats(flat: torch.Tensor, group_size: int, levels: int):
    """Per-group ``(scale, minimum)`` in float32 for the flat float32 tensor ``flat``;
    both NaN for a group holding a NaN or an infinity (see the module doc)."""
    x = _grouped(flat, group_size)
    mn = x.amin(dim=1)
    mx = x.amax(dim=1)
    scale = torch.clamp(mx - mn, min=SCALE_FLOOR) / levels
    bad = ~torch.isfinite(x).all(dim=1)
    nan = torch.full_like(mn, float("nan"))
    return torch.where(bad, nan, scale), torch.where(bad, nan, mn)


def _levels(v: torch.Tensor, levels: int) -> torch.Tensor:
    """``clamp(floor(v), 0, levels)`` as int64; NaN (a non-finite group) -> level 0."""
    q = torch.clamp(torch.floor(v), 0, levels)
    return torch.nan_to_num(q, nan=0.0).to(torch.int64)


def _expand(per_group: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    return per_group.repeat_interleave(group_size)[:numel]


def quantize_nearest(flat: torch.Tensor, group_size: int, levels: int):
    """``(q int64, scale, minimum)`` with round-to-nearest (ties up)."""
    flat = flat.to(torch.float32)
    scale, mn = group_stats(flat, group_size, levels)
    n = flat.numel()
    v = (flat - _expand(mn, n, group_size)) / _expand(scale, n, group_size)
    q = _levels(v + 0.5, levels)
    return q, scale, mn


def dequantize_flat(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int) -> torch.Tensor:
    n = q.numel()
    return _expand(minimum, n, group_size) + _expand(scale, n, group_size) * q.to(torch.float32)


# --------------------------------------------------------------------------- INT4
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 15] -> uint8 bytes, even index in the low nibble."""
    n = q.numel()
    if n % 2:
        q = torch.cat([q, q.new_zeros(1)])
    q = q.view(-1, 2)
    return (q[:, 0] | (q[:, 1] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    b = packed.to(torch.int64)
    return torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:numel]


def quant_int4_pack_ref(x, group_size):
    q, scale, mn = quantize_nearest(x.reshape(-1), group_size, 15)
    return pack_nibbles(q), scale, mn


def quant_int4_unpack_ref(packed, scale, minimum, shape, dtype, group_size):
    numel = math.prod(shape)
    x = dequantize_flat(unpack_nibbles(packed, numel), scale, minimum, group_size)
    return x.to(dtype).reshape(shape)


# --------------------------------------------------------------------------- INT8
def quant_int8_quantize_ref(w, group_size):
    q, scale, mn = quantize_nearest(w.reshape(-1), group_size, 255)
    return q.to(torch.uint8).reshape(w.shape), scale, mn


def quant_int8_dequantize_ref(q, scale, minimum, group_size, dtype):
    return dequantize_flat(q.reshape(-1), scale, minimum, group_size).to(dtype).reshape(q.shape)


def quant_int8_update_sr_ref(q, scale, minimum, update, decay, alpha, seed, group_size):
    n = q.numel()
    x = dequantize_flat(q.reshape(-1), scale, minimum, group_size)
    x = x * decay + update.reshape(-1).to(torch.float32) * alpha
    new_scale, new_mn = group_stats(x, group_size, 255)
    v = (x - _expand(new_mn, n, group_size)) / _expand(new_scale, n, group_size)
    u = uniform_from_seed(seed, torch.arange(n, dtype=torch.int64, device=q.device))
    qn = _levels(v + u, 255).to(torch.uint8)
    q.copy_(qn.view(q.shape))
    scale.copy_(new_scale)
    minimum.copy_(new_mn)
