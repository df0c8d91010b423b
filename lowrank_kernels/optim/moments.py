"""Moment formats of the optimizers: how ``exp_avg`` / ``exp_avg_sq`` are stored.

Group keys (every optimizer, projected and plain groups alike):

- ``moment_dtype`` (``"float32"``, default, or ``"param"``): the dtype of 32-bit-format
  moments. ``"float32"`` stores them in float32 (float64 for float64 parameters) even
  when the parameter is bfloat16 or float16; ``"param"`` stores them in the parameter's
  dtype (as torch.optim.AdamW and the reference packages do), on explicit request only,
  because 16-bit moments break Adam: in bfloat16 (8 significant bits) ``0.999 * V``
  rounds back to ``V``, so the second moment stops decaying (``beta2 > 1 - 2^-9`` has no
  effect), and in float16 ``(1 - beta2) R^2`` underflows to zero for ``|R| < ~5e-3`` at
  ``beta2 = 0.999`` (below half the smallest float16 subnormal, 2^-25), so ``V`` stays 0
  and the step becomes ``M / eps``.
- ``moment_bits`` = 32 (default) | 16 | 8, ``block_size`` (256, in [1, 256]) and
  ``min_8bit_size`` (4096); :data:`MOMENT_BITS_DEFAULTS`. ``32``: the moments above.
  ``16`` (any parameter dtype, float32 master weights included): bfloat16 moments whose
  every store rounds *stochastically* (a seed per parameter and step, deterministic and
  resumable), so the second moment keeps decaying in expectation. ``8``: uint8 codes of
  the moment's shape plus float32 block maxima ``exp_avg_absmax`` / ``exp_avg_sq_absmax``
  of shape ``shape[:-1] + (ceil(cols / block_size),)`` (blocks of <= ``block_size``
  elements inside one row; bitsandbytes' dynamic map, signed for ``exp_avg``, unsigned
  for ``exp_avg_sq``: :mod:`lowrank_kernels.reference.moments`), i.e.
  ``2 numel + 8 rows ceil(cols / 256)`` bytes for the pair instead of ``8 numel``. The
  kernels dequantize, update in float32, compute ``N`` from the float32 values and
  requantize in the same pass. A moment with fewer than ``min_8bit_size`` elements (or a
  0-d one) stays in the 32-bit format (:func:`bits_for`). 16 and 8 need
  ``moment_dtype="float32"``.

The format of a parameter is fixed when its state is created and read back from the
state tensors' dtypes (:func:`stored_bits`: uint8 is 8-bit; bfloat16 in a
``moment_bits=16`` group is 16-bit with stochastic rounding; anything else is 32-bit).
On ``load_state_dict`` the optimizer keeps *its* format keys and converts the saved
moments (:func:`convert`): float moments loaded into a ``moment_bits=8`` group are
quantized (moments below ``min_8bit_size`` stay float), float32/float64 moments loaded
into a ``moment_bits=16`` group are rounded to bfloat16 (to nearest), 8-bit moments are
dequantized (with the saved group's ``block_size``) into a ``moment_bits=32`` / ``16``
group or requantized for another ``block_size``; bfloat16 moments in a ``moment_bits=32``
group keep their dtype (as ``moment_dtype="param"`` ones). So a float32 checkpoint resumes
as 8-bit by loading it into an optimizer built with ``moment_bits=8``.

Everything here is a function of ``(state, format)``: ``state`` is one parameter's state
dict, ``format`` a :class:`MomentFormat` (:func:`format_of` reads it from a param group).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from lowrank_kernels.reference import moments as _ref

#: values of the ``moment_dtype`` group key.
MOMENT_DTYPES = ("float32", "param")
#: values of the ``moment_bits`` group key.
MOMENT_BITS = (32, 16, 8)
#: the moment-format group keys and their defaults.
MOMENT_BITS_DEFAULTS = {"moment_bits": 32, "block_size": 256, "min_8bit_size": 4096}
#: ``state`` key of the float32 block maxima of each 8-bit moment.
ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}
#: Adam's two moments.
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
#: Adam's two moments with their 8-bit map: ``(state key, signed)``.
ADAM_MOMENTS: Tuple[Tuple[str, bool], ...] = (("exp_avg", True), ("exp_avg_sq", False))


@dataclass(frozen=True)
class MomentFormat:
    """The moment format a param group asks for (its ``moment_*`` keys)."""

    bits: int = 32
    block_size: int = 256
    min_8bit_size: int = 4096
    dtype: str = "float32"  # the ``moment_dtype`` key


@functools.lru_cache(maxsize=256)
def _format(bits, block_size, min_8bit_size, dtype) -> MomentFormat:
    return MomentFormat(bits, int(block_size), min_8bit_size, dtype)


def format_of(group: Mapping[str, Any]) -> MomentFormat:
    """The :class:`MomentFormat` of a (validated) param group; missing keys take their defaults."""
    return _format(group.get("moment_bits", 32), group.get("block_size", 256), group.get("min_8bit_size", 4096),
                   group.get("moment_dtype", "float32"))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(group: Mapping[str, Any], err: Callable[[str], str]) -> None:
    """The one check of the format keys of a param group: ``moment_dtype`` in
    :data:`MOMENT_DTYPES`, ``moment_bits`` in 32 | 16 | 8, ``block_size`` an int in [1, 256],
    ``min_8bit_size`` an int >= 0, and 16/8-bit moments only with ``moment_dtype="float32"``.
    ``err(msg)`` makes the message (it names the optimizer and the group)."""
    md = group.get("moment_dtype", "float32")
    if not isinstance(md, str) or md not in MOMENT_DTYPES:
        raise ValueError(err(f"moment_dtype must be 'float32' (default) or 'param' (16-bit moments for 16-bit "
                             f"parameters; unsafe, see lowrank_kernels.optim.moments), got {md!r}"))
    bits = group.get("moment_bits", 32)
    if not _is_int(bits) or bits not in MOMENT_BITS:
        raise ValueError(err(f"moment_bits must be 32, 16 or 8 (the bits per stored Adam moment value), got {bits!r}"))
    bs = group.get("block_size", 256)
    if not _is_int(bs) or not 1 <= bs <= 256:
        raise ValueError(err(f"block_size must be an int in [1, 256] (elements per 8-bit moment block), got {bs!r}"))
    small = group.get("min_8bit_size", 4096)
    if not _is_int(small) or small < 0:
        raise ValueError(err(f"min_8bit_size must be an int >= 0, got {small!r}"))
    if bits != 32 and md != "float32":
        raise ValueError(err(f"moment_bits={bits} needs moment_dtype='float32' (the default), got "
                             f"moment_dtype={group.get('moment_dtype')!r}"))


# ---------------------------------------------------------------------------- new moments
def state_dtype(param_dtype: torch.dtype, fmt: MomentFormat) -> torch.dtype:
    """dtype of new 32-bit-format moments: float32 (float64 for float64 parameters), or the
    parameter's with ``moment_dtype="param"``."""
    if fmt.dtype == "param":
        return param_dtype
    return torch.promote_types(param_dtype, torch.float32)


def bits_for(shape: Sequence[int], fmt: MomentFormat) -> int:
    """The format (32, 16 or 8) new moments of ``shape`` get: ``fmt.bits``, except that 0-d
    moments are 32, and 8 falls back to 32 below ``min_8bit_size`` elements or where codes +
    absmax would take no fewer bytes than float32 (rows of one element: APOLLO-Mini's rank-1
    moments). 16 applies to every parameter dtype (float32 master weights included)."""
    bits = fmt.bits
    if len(shape) == 0:
        return 32
    if bits == 8 and math.prod(shape) < fmt.min_8bit_size:
        return 32
    if bits == 8:
        numel, rows = math.prod(shape), math.prod(shape[:-1])
        if numel + 4 * rows * -(-shape[-1] // fmt.block_size) >= 4 * numel:
            return 32  # rows of one element (APOLLO-Mini's rank 1): codes + absmax outweigh float32
    return bits


def absmax_shape(shape: Sequence[int], block_size: int) -> Tuple[int, ...]:
    """Shape of the float32 block maxima of 8-bit codes of ``shape``."""
    return tuple(shape[:-1]) + (-(-shape[-1] // block_size),)


def init(state: Dict[str, Any], fmt: MomentFormat, shape: Sequence[int], *, device, param_dtype: torch.dtype,
         keys: Sequence[str] = ADAM_KEYS) -> None:
    """Zero moments ``keys`` of ``shape`` in ``state`` in the format :func:`bits_for` picks:
    uint8 codes + float32 absmax (:data:`ABSMAX_KEYS`; absmax 0 decodes to 0), bfloat16, or
    :func:`state_dtype`."""
    shape = tuple(int(s) for s in shape)
    bits = bits_for(shape, fmt)
    for key in keys:
        if bits == 8:
            state[key] = torch.zeros(shape, dtype=torch.uint8, device=device)
            state[ABSMAX_KEYS[key]] = torch.zeros(absmax_shape(shape, fmt.block_size), dtype=torch.float32,
                                                  device=device)
        else:
            dtype = torch.bfloat16 if bits == 16 else state_dtype(param_dtype, fmt)
            state[key] = torch.zeros(shape, dtype=dtype, device=device)


def zero(state: Dict[str, Any], keys: Sequence[str] = ADAM_KEYS) -> None:
    """Zero the moments ``keys`` in place, whatever their format (8-bit: codes and absmax)."""
    for key in keys:
        if key in state:
            state[key].zero_()
        if ABSMAX_KEYS[key] in state:
            state[ABSMAX_KEYS[key]].zero_()


# ---------------------------------------------------------------------------- stored moments
def stored_bits(state: Mapping[str, Any], fmt: MomentFormat) -> int:
    """The format ``state``'s Adam moments are stored in: 8 (uint8 codes), 16 (bfloat16 in a
    ``moment_bits=16`` group: stochastic rounding) or 32 (anything else, no moments included)."""
    m = state.get("exp_avg")
    if m is None:
        return 32
    if m.dtype == torch.uint8:
        return 8
    return 16 if m.dtype == torch.bfloat16 and fmt.bits == 16 else 32


def is_lowbit(state: Mapping[str, Any], fmt: MomentFormat) -> bool:
    """Whether ``state``'s Adam moments are 8-bit, or bfloat16 with ``moment_bits=16``."""
    return stored_bits(state, fmt) != 32


def op_kwargs(state: Mapping[str, Any], fmt: MomentFormat, seed: Callable[[], int]) -> Dict[str, Any]:
    """The moment-format arguments of the projection / adam ops for ``state``'s moments:
    ``m_absmax``, ``v_absmax``, ``block_size`` (8-bit), ``moment_seed`` (16-bit: ``seed()``,
    called only then), or none."""
    m = state["exp_avg"]
    if m.dtype == torch.uint8:
        return dict(m_absmax=state["exp_avg_absmax"], v_absmax=state["exp_avg_sq_absmax"], block_size=fmt.block_size)
    if m.dtype == torch.bfloat16 and fmt.bits == 16:
        return dict(moment_seed=seed())
    return {}


def foreach_op_kwargs(kws: List[Dict[str, Any]]) -> Dict[str, Any]:
    """:func:`op_kwargs` of a bucket's parameters (one format) as the list arguments of the
    multi-tensor ops."""
    if not kws or not kws[0]:
        return {}
    if "m_absmax" in kws[0]:
        return dict(m_absmax=[k["m_absmax"] for k in kws], v_absmax=[k["v_absmax"] for k in kws],
                    block_size=kws[0]["block_size"])
    return dict(moment_seed=[k["moment_seed"] for k in kws])


def bucket_part(state: Mapping[str, Any], fmt: MomentFormat) -> tuple:
    """The stored format as a bucket-key part: one multi-tensor op call takes one format
    (8-bit with one ``block_size``, 16-bit with stochastic rounding, or plain)."""
    bits = stored_bits(state, fmt)
    return (8, fmt.block_size) if bits == 8 else (bits, 0)


def update_dtype(state: Mapping[str, Any], default: torch.dtype) -> torch.dtype:
    """dtype of an ``R`` (projected gradient, or a plain gradient) handed to the adam ops with
    ``state``'s moments: float32 for 8-bit moments (the update is computed in float32), else
    ``default`` (the moments' dtype for the projected methods)."""
    return torch.float32 if state["exp_avg"].dtype == torch.uint8 else default


# ---------------------------------------------------------------------------- checkpoints
def check_saved(state: Mapping[str, Any], block_size: int, moment_keys: Sequence[Tuple[str, bool]],
                where: str) -> None:
    """A saved 8-bit moment (uint8 codes) of ``state`` must come with its float32 absmax of the
    shape the *saved* group's ``block_size`` gives, else a ``ValueError`` (``where`` names the
    parameter): the moments could not be decoded."""
    for key, _ in moment_keys:
        t = state.get(key)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            continue
        am = state.get(ABSMAX_KEYS[key])
        want = absmax_shape(t.shape, block_size) if t.dim() >= 1 else None
        if not isinstance(am, torch.Tensor) or am.dtype != torch.float32 or tuple(am.shape) != want:
            got = f"{am.dtype} {tuple(am.shape)}" if isinstance(am, torch.Tensor) else repr(am)
            raise ValueError(
                f"{where}: the saved 8-bit {key} (shape {tuple(t.shape)}) needs a float32 "
                f"{ABSMAX_KEYS[key]} of shape {want} for the saved group's block_size {block_size}, got {got}"
            )


def convert(state: Dict[str, Any], fmt: MomentFormat, *, param_dtype: torch.dtype, saved_block_size: int,
            moment_keys: Sequence[Tuple[str, bool]] = ADAM_MOMENTS) -> None:
    """Bring loaded moments ``moment_keys`` to ``fmt`` (see the module docstring);
    ``saved_block_size`` decodes saved 8-bit moments. The caller leaves DTensor state alone."""
    bits, bs = fmt.bits, fmt.block_size
    for key, signed in moment_keys:
        t = state.get(key)
        if not isinstance(t, torch.Tensor):
            continue
        if t.dtype == torch.uint8:
            if bits == 8 and bs == saved_block_size:
                continue
            val = _ref.moments_dequantize_ref(t, state.pop(ABSMAX_KEYS[key]), signed=signed,
                                              block_size=saved_block_size)
            if bits == 8:  # another block size: requantize
                state[key], state[ABSMAX_KEYS[key]] = _ref.moments_quantize_ref(val, signed=signed, block_size=bs)
            else:
                state[key] = val.to(torch.bfloat16 if bits_for(tuple(t.shape), fmt) == 16
                                    else state_dtype(param_dtype, fmt))
        elif bits == 8 and bits_for(tuple(t.shape), fmt) == 8:
            state[key], state[ABSMAX_KEYS[key]] = _ref.moments_quantize_ref(t, signed=signed, block_size=bs)
        elif bits == 16 and t.dtype in (torch.float32, torch.float64) and bits_for(tuple(t.shape), fmt) == 16:
            state[key] = t.to(torch.bfloat16)


__all__ = [
    "MomentFormat", "format_of", "validate", "state_dtype", "bits_for", "absmax_shape", "init", "zero",
    "stored_bits", "is_lowbit", "op_kwargs", "foreach_op_kwargs", "bucket_part", "update_dtype", "check_saved",
    "convert", "MOMENT_DTYPES", "MOMENT_BITS", "MOMENT_BITS_DEFAULTS", "ABSMAX_KEYS", "ADAM_KEYS", "ADAM_MOMENTS",
]
