"""Projection-aware moments (``moment_transport=True``): at a refresh that changes the
projector, move Adam's moments into the new subspace instead of keeping them in the old
coordinates.

The rule is LDAdam's (Robert, Safaryan, Modoranu, Alistarh, "LDAdam: Adaptive Optimization
from Low-Dimensional Gradient Statistics", ICLR 2025, its "projection-aware update rule";
SubTrack++ builds on the same update). With ``Q`` the change of basis, ``k`` the steps the
moments have accumulated, ``c1 = 1 - beta1^k``, ``c2 = 1 - beta2^k`` and hats the bias-corrected
moments ``m^ = m / c1``, ``v^ = v / c2``:

- first moment: ``m' = Q m`` (a linear change of coordinates);
- second moment: ``v`` is read as ``E[g^2] = Var[g] + E[g]^2``; the variance part is
  carried through the element-wise square of ``Q`` (the coordinates treated as
  independent) and the mean part is recomputed from the rotated first moment:
  ``v' = c2 * | (Q o Q)(v^ - m^ o m^) + (Q m^) o (Q m^) |`` (``o``: element-wise).

``Q`` by side (this package's projector layouts; ``R`` the projected gradient):

- right (``P`` is ``r x n``, ``R = G P^T`` is ``m x r``): ``m' = m Q_r`` with
  ``Q_r = P_old P_new^T`` and ``(Q o Q)`` applied on the right;
- left (``P`` is ``m x r``, ``R = P^T G`` is ``r x n``): ``m' = Q_l m`` with
  ``Q_l = P_new^T P_old``;
- full (``U``, ``Vh``): ``m' = Q_l m Q_r`` and the second moment with both squares.

(The ``ldadamw.py`` of LDAdam's public code, read in its fork ``saharsamr/LDAdam``, squares
the change-of-basis matrix in place and then squares it again, which applies ``Q^(o4)``; the
equation as restated by a third-party LDAdamW documentation page, junaidaliop.github.io/zij,
has ``Q o Q``; the paper's own text was not reachable when this was written. We implement
``Q o Q``.)

For the DCT projector ``Q`` is a 0/1 partial permutation, so ``Q o Q = Q`` and
``(Q m^)^2 = Q(m^2)``: the rule reduces exactly to re-indexing (kept basis vectors carry
their moments to their new positions, new ones start at zero), which
:func:`lowrank_kernels.optim.dct.reindex_moments_` does bit-exactly.

A refresh that returns exactly the projector in use (``torch.equal``) leaves the moments
untouched, so the step is bit-identical to one without transport. The moments are
transported in float32 (float64 for float64 moments) and written back in place in their
format: 8-bit moments are dequantized, transported and requantized (new block maxima);
16-bit (bfloat16) moments are rounded to nearest on the way back.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from lowrank_kernels.reference import moments as _ref

from . import distributed as _dist
from .moments import ABSMAX_KEYS, ADAM_MOMENTS, MomentFormat


def _full(t: torch.Tensor) -> torch.Tensor:
    """A projector as a plain full tensor (an FSDP2 row-sharded left projector is gathered)."""
    return t.full_tensor() if _dist.is_dtensor(t) else t


def _acc(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def change_of_basis(old: torch.Tensor, new: torch.Tensor, side: str) -> torch.Tensor:
    """``Q`` (``r x r``) that moves moments from ``old``'s coordinates to ``new``'s: right
    ``P_old P_new^T`` (applied on the right), left ``P_new^T P_old`` (applied on the left)."""
    old, new = _full(old), _full(new)
    acc = _acc(old, new)
    o, n = old.to(acc), new.to(acc)
    return o @ n.T if side == "right" else n.T @ o


def transport(m: torch.Tensor, v: torch.Tensor, q_left: Optional[torch.Tensor], q_right: Optional[torch.Tensor],
              c1: float, c2: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """LDAdam's projection-aware rule (module docstring) on float moments: returns
    ``(m', v')`` (new tensors) for ``m' = Q_l m Q_r`` (either factor may be None)."""

    def rot(x, ql, qr):
        if ql is not None:
            x = ql @ x
        if qr is not None:
            x = x @ qr
        return x

    m_new = rot(m, q_left, q_right)
    var = v / c2 - (m / c1).square()
    var = rot(var, None if q_left is None else q_left.square(), None if q_right is None else q_right.square())
    v_new = (var + (m_new / c1).square()).abs() * c2
    return m_new, v_new


def _read(state: Dict[str, Any], key: str, signed: bool, block_size: int, acc: torch.dtype) -> torch.Tensor:
    t = _dist.local(state[key])
    if t.dtype == torch.uint8:
        return _ref.moments_dequantize_ref(t, _dist.local(state[ABSMAX_KEYS[key]]), signed=signed,
                                           block_size=block_size).to(acc)
    return t.to(acc)


def _write(state: Dict[str, Any], key: str, signed: bool, block_size: int, value: torch.Tensor) -> None:
    t = _dist.local(state[key])
    if t.dtype == torch.uint8:
        codes, absmax = _ref.moments_quantize_ref(value.to(torch.float32), signed=signed, block_size=block_size)
        t.copy_(codes)
        _dist.local(state[ABSMAX_KEYS[key]]).copy_(absmax)
    else:
        t.copy_(value)  # in place (a captured CUDA graph keeps its addresses); bfloat16: round to nearest


def transport_moments_(state: Dict[str, Any], fmt: MomentFormat, old: Sequence[torch.Tensor],
                       new: Sequence[torch.Tensor], side: str, betas: Tuple[float, float], steps: int) -> bool:
    """Transport ``state``'s ``exp_avg`` / ``exp_avg_sq`` (any format) from the projector
    ``old`` to ``new`` in place, ``steps`` the steps they have accumulated.

    ``old`` / ``new``: ``(P,)`` for right / left, ``(U, Vh)`` for full. Returns False (the
    moments untouched) when nothing is to be done: the projectors are equal, or
    ``steps == 0``; True when the moments were moved.
    """
    if steps <= 0 or all(torch.equal(_full(a), _full(b)) for a, b in zip(old, new)):
        return False
    if side == "full":
        q_left, q_right = change_of_basis(old[0], new[0], "left"), change_of_basis(old[1], new[1], "right")
    elif side == "left":
        q_left, q_right = change_of_basis(old[0], new[0], "left"), None
    else:
        q_left, q_right = None, change_of_basis(old[0], new[0], "right")
    beta1, beta2 = betas
    c1, c2 = 1.0 - beta1**steps, 1.0 - beta2**steps
    (mk, ms), (vk, vs) = ADAM_MOMENTS
    acc = torch.promote_types(_acc(q_left if q_left is not None else q_right), _dist.local(state[mk]).dtype)
    if acc not in (torch.float32, torch.float64):
        acc = torch.float32
    m = _read(state, mk, ms, fmt.block_size, acc)
    v = _read(state, vk, vs, fmt.block_size, acc)
    ql = None if q_left is None else q_left.to(device=m.device, dtype=acc)
    qr = None if q_right is None else q_right.to(device=m.device, dtype=acc)
    m_new, v_new = transport(m, v, ql, qr, c1, c2)
    _write(state, mk, ms, fmt.block_size, m_new)
    _write(state, vk, vs, fmt.block_size, v_new)
    return True


__all__ = ["change_of_basis", "transport", "transport_moments_"]
