"""8-bit optimizer moments, blockwise (reference; the specification of the format).

Format of one moment tensor ``x`` of shape ``(..., cols)`` (docs/moment_formats.md; the dynamic maps of Dettmers et al. 2022):

- ``codes``: uint8, ``x``'s shape; ``codes[..., j]`` indexes a 256-entry map;
- ``absmax``: float32, shape ``(..., ceil(cols / block_size))``: the largest ``|x|`` of each
  block, a block being a run of at most ``block_size`` (256) consecutive elements **inside
  one row** (the last block of a row may be shorter). Unlike bitsandbytes' and torchao's
  flat blocks, every dim-0 shard (FSDP2) of the tensor is block-aligned;
- ``x ~= map[codes] * absmax[block]``, with the map of bitsandbytes' dynamic data type
  (:func:`moments_dynamic_map`): ``signed=True`` for the first moment, ``signed=False``
  for the second; each value, normalized as ``x * (1 / absmax)`` in float32, is rounded to
  the **nearest** map entry (float32 midpoints between entries; an exact tie goes to the
  lower entry). A block of zeros has ``absmax = 0`` and decodes to zeros.
- non-finite values: a block holding a NaN or an infinity gets ``absmax = NaN`` (so the
  whole block decodes to NaN, never silently to finite values) and every code of the
  block is the map's zero entry (the code ``x = 0`` would get).

Bytes per moment: ``numel`` (codes) + ``4 * rows * ceil(cols / 256)`` (absmax), so the two
Adam moments of an ``m x r`` state take ``2 * m * r + 8 * m * ceil(r / 256)`` bytes
(:func:`moments8_nbytes`) instead of ``8 * m * r`` in float32.

No run-time dependency on bitsandbytes: the map is built here from its definition
(Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning"; bitsandbytes'
``create_dynamic_map``), once per device and signedness.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

BLOCK_SIZE = 256

_MAPS: Dict[Tuple[bool, str], Tuple[torch.Tensor, torch.Tensor]] = {}


def _dynamic_values(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic data type's 2**total_bits values, sorted ascending (float32, CPU).

    Decade ``k = 0 .. max_exponent_bits - 1`` holds ``10^(k - max_exponent_bits + 1)``
    times the midpoints of an even split of ``[0.1, 1]`` into ``2^k`` (signed, each with
    its negative) or ``2^(k+1)`` (unsigned) intervals; then ``0`` and ``1``, then zero
    padding up to ``2**total_bits`` entries. With 8 bits and 7 exponent bits the values
    fill the 256 entries exactly (signed: 127 positive, 127 negative, 0, 1; unsigned:
    254 positive, 0, 1).
    """
    fraction_bits = total_bits - 1  # bits after the sign (or the unused sign) bit
    values = []
    for k in range(max_exponent_bits):
        intervals = 2 ** (k + fraction_bits - max_exponent_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1.0, intervals + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (k - max_exponent_bits + 1)
        values.append(decade * mids)
        if signed:
            values.append(-decade * mids)
    extra = 2 ** (fraction_bits - max_exponent_bits) - 1  # 0 for 8 bits / 7 exponent bits
    if extra > 0:
        edges = torch.linspace(0.1, 1.0, extra + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (max_exponent_bits - 1 - max_exponent_bits + 1)
        values.append(decade * mids)
        if signed:
            values.append(-decade * mids)
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    out = torch.cat(values)
    if out.numel() > 2**total_bits:
        raise ValueError(f"dynamic map: {out.numel()} values do not fit {total_bits} bits")
    out = torch.cat([out, torch.zeros(2**total_bits - out.numel(), dtype=torch.float32)])
    return out.sort().values


def moments_dynamic_map(signed: bool, device="cpu") -> torch.Tensor:
    """The 256 float32 values of the dynamic map on ``device`` (built once per device, cached).

    ``signed=True`` (first moment): values in ``[-0.993, 1]``; ``signed=False`` (second
    moment): values in ``[0, 1]``. Sorted ascending.
    """
    return _map_and_midpoints(bool(signed), torch.device(device))[0]


def _map_and_midpoints(signed: bool, device: torch.device):
    key = (signed, str(device))
    hit = _MAPS.get(key)
    if hit is None:
        values = _dynamic_values(signed)
        mids = (values[:-1] + values[1:]) / 2.0  # float32 decision boundaries
        hit = _MAPS[key] = (values.to(device), mids.to(device))
    return hit


def _check(x: torch.Tensor, block_size: int, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a Tensor, got {type(x).__name__}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= 256:
        raise ValueError(f"{name}: block_size must be an int in [1, 256], got {block_size!r}")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least one dimension (blocks run along the last), got a 0-d tensor")


def _blocks(shape, block_size: int):
    cols = shape[-1]
    nblocks = math.ceil(cols / block_size) if cols else 0
    return cols, nblocks


def moments_quantize_ref(x: torch.Tensor, *, signed: bool, block_size: int = BLOCK_SIZE):
    """Quantize ``x`` to ``(codes, absmax)`` (see the module docstring).

    Args:
        x: floating tensor, at least 1-D; blocks run along the last dimension.
        signed: the signed map (first moment) or the unsigned one (second moment; its
            values must be >= 0: negatives round to the map's 0).
        block_size: elements per block inside a row, 1..256.

    Returns ``codes`` (uint8, ``x.shape``) and ``absmax`` (float32,
    ``x.shape[:-1] + (ceil(cols / block_size),)``).
    """
    _check(x, block_size, "moments_quantize_ref")
    if not x.is_floating_point():
        raise TypeError(f"moments_quantize_ref: x must be floating point, got {x.dtype}")
    if not isinstance(signed, bool):
        raise TypeError(f"moments_quantize_ref: signed must be a bool, got {signed!r}")
    cols, nblocks = _blocks(x.shape, block_size)
    values, mids = _map_and_midpoints(signed, x.device)
    lead = x.shape[:-1]
    x32 = x.detach().to(torch.float32).reshape(-1, cols)
    pad = nblocks * block_size - cols
    xp = torch.nn.functional.pad(x32, (0, pad)).reshape(x32.shape[0], nblocks, block_size)
    absmax = xp.abs().amax(dim=-1)  # (rows, nblocks)
    bad = ~torch.isfinite(xp).all(dim=-1)  # a block holding NaN/inf: absmax NaN, codes of the map's zero
    absmax = torch.where(bad, torch.full_like(absmax, float("nan")), absmax)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    # multiply by the reciprocal (one division per block, as the kernels will; bitsandbytes' torch path too)
    normed = xp * (1.0 / safe).unsqueeze(-1)
    normed = torch.where(bad.unsqueeze(-1), torch.zeros_like(normed), normed)
    normed = normed.reshape(x32.shape[0], nblocks * block_size)[:, :cols]
    # nearest entry: the number of decision boundaries strictly below the value (ties go down)
    codes = torch.bucketize(normed.contiguous(), mids, right=False).to(torch.uint8)
    return codes.reshape(x.shape), absmax.reshape(*lead, nblocks)


def moments_dequantize_ref(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool,
                           block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``map[codes] * absmax[block]`` in float32, returned in ``dtype``."""
    _check(codes, block_size, "moments_dequantize_ref")
    if codes.dtype != torch.uint8:
        raise TypeError(f"moments_dequantize_ref: codes must be uint8, got {codes.dtype}")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise TypeError(f"moments_dequantize_ref: absmax must be a float32 Tensor, got "
                        f"{getattr(absmax, 'dtype', type(absmax).__name__)}")
    if not isinstance(signed, bool):
        raise TypeError(f"moments_dequantize_ref: signed must be a bool, got {signed!r}")
    cols, nblocks = _blocks(codes.shape, block_size)
    want = tuple(codes.shape[:-1]) + (nblocks,)
    if tuple(absmax.shape) != want:
        raise ValueError(f"moments_dequantize_ref: absmax must have shape {want} for codes of shape "
                         f"{tuple(codes.shape)} and block_size {block_size}, got {tuple(absmax.shape)}")
    if absmax.device != codes.device:
        raise ValueError(f"moments_dequantize_ref: codes on {codes.device} but absmax on {absmax.device}")
    values, _ = _map_and_midpoints(signed, codes.device)
    vals = values[codes.long()]
    scale = absmax.repeat_interleave(block_size, dim=-1)[..., :cols]
    return (vals * scale).to(dtype)


def moment_nbytes(shape, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of one 8-bit moment of ``shape``: ``numel + 4 * rows * ceil(cols / block_size)``."""
    shape = tuple(shape)
    if not shape:
        raise ValueError("moment_nbytes: shape must have at least one dimension")
    cols, nblocks = _blocks(shape, block_size)
    rows = math.prod(shape[:-1])
    return math.prod(shape) + 4 * rows * nblocks


def moments8_nbytes(shape, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of the two 8-bit Adam moments of ``shape``: ``2 numel + 8 rows ceil(cols / block_size)``."""
    return 2 * moment_nbytes(shape, block_size)


# --------------------------------------------------------------------------- the Adam step on 8-bit moments
def moments8_adam_ref(r, exp_avg, exp_avg_sq, m_absmax, v_absmax, beta1, beta2, eps, block_size):
    """The Adam moment update on 8-bit moments, in place; returns ``N`` (float32).

    ``exp_avg`` / ``exp_avg_sq``: uint8 codes of ``r``'s shape (signed / unsigned map),
    ``m_absmax`` / ``v_absmax``: their float32 block absmax. Both moments are
    dequantized to float32, updated from ``r`` (converted to float32) as
    ``m = beta1 m + (1 - beta1) r``, ``v = beta2 v + (1 - beta2) r^2``;
    ``N = m / (sqrt(v) + eps)`` is computed from these float32 values; then both are
    requantized (fresh absmax per block of the updated values, nearest map entry) into
    the codes and absmax tensors.
    """
    m = moments_dequantize_ref(exp_avg, m_absmax, signed=True, block_size=block_size)
    v = moments_dequantize_ref(exp_avg_sq, v_absmax, signed=False, block_size=block_size)
    r32 = r.to(torch.float32)
    m.mul_(beta1).add_(r32, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(r32, r32, value=1.0 - beta2)
    n = m / (v.sqrt() + eps)
    codes, am = moments_quantize_ref(m, signed=True, block_size=block_size)
    exp_avg.copy_(codes)
    m_absmax.copy_(am)
    codes, am = moments_quantize_ref(v, signed=False, block_size=block_size)
    exp_avg_sq.copy_(codes)
    v_absmax.copy_(am)
    return n


# --------------------------------------------------------------------------- 16-bit: bf16 stochastic rounding
def bf16_round_sr_ref(x: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """Round float32 ``x`` to bfloat16 stochastically (the 16-bit moments' store).

    With ``b`` the float32 bits of ``x[i]`` (logical row-major flat index ``i``) and
    ``h = mix32(mix32(((i + offset) & 0xFFFFFFFF) ^ k1) ^ k2)`` (``k1, k2 =
    seed_keys(seed)``, reference/quant.py), the bfloat16 bits are
    ``(b + (h >> 16)) >> 16``: 16 random bits added below the kept ones, then truncated,
    so a value rounds up with probability equal to its distance from the lower bfloat16
    neighbour (in units of that spacing), and ``E[round(x)] = x``. A value that is
    already a bfloat16 is returned exactly. NaN and infinities round to nearest (pass
    through unchanged). The Adam moments use ``offset = 0`` for ``exp_avg`` and
    ``offset = numel`` for ``exp_avg_sq``.
    """
    from .quant import MASK32, mix32, seed_keys

    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"bf16_round_sr_ref: x must be a float32 Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    k1, k2 = seed_keys(seed)
    flat = x.reshape(-1)
    idx = torch.arange(flat.numel(), dtype=torch.int64, device=x.device) + int(offset)
    h = mix32(mix32((idx & MASK32) ^ k1) ^ k2)
    b = flat.view(torch.int32).to(torch.int64) & MASK32
    hi = ((b + (h >> 16)) >> 16) & 0xFFFF
    hi = torch.where(hi >= 0x8000, hi - 0x10000, hi).to(torch.int16)
    out = hi.view(torch.bfloat16)
    out = torch.where(torch.isfinite(flat), out, flat.to(torch.bfloat16))
    return out.reshape(x.shape)


__all__ = [
    "BLOCK_SIZE",
    "moments_dynamic_map",
    "moments_quantize_ref",
    "moments_dequantize_ref",
    "moment_nbytes",
    "moments8_nbytes",
    "moments8_adam_ref",
    "bf16_round_sr_ref",
]
