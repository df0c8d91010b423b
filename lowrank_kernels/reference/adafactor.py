"""Pure-PyTorch reference of the adafactor family: GaLore-Adafactor's non-refresh step over a
list of weights (the arithmetic of ``GaLoreAdafactor``'s per-parameter step, operation for
operation).

Per entry ``i`` (weight ``W``, gradient ``G``, dense projector ``P``; ``R`` = the projected
gradient, ``rows x cols``):

- ``R = G P^T`` (right) or ``P^T G`` (left) in float32;
- ``lr_t = lr[i]``, times ``max(eps2, RMS(W))`` with ``scale_parameter``;
- ``U = R^2 + eps1``; ``row <- b2 row + (1 - b2) mean_cols(U)``,
  ``col <- b2 col + (1 - b2) mean_rows(U)`` with ``b2 = beta2t[i]``;
- ``upd = (rsqrt(row / mean(row))[:, None] * rsqrt(col)[None, :]) * R``,
  ``upd /= max(1, RMS(upd) / clip_threshold)``, ``upd *= lr_t``;
- with a first moment (``exp_avg`` given): ``m <- beta1 m + (1 - beta1) upd`` in float32
  (8-bit: dequantized, updated, requantized; 16-bit: stored with stochastic rounding),
  ``upd = m`` (its float32 value);
- decay: ``W <- W + (-wd lr_t) W`` with ``scale_parameter`` (``lr_t`` a tensor there),
  else ``decay = 1 - wd lr_t``; then ``W <- decay W + alpha[i] back(upd)``.
"""
from __future__ import annotations

import math

import torch

from . import moments as _moments
from .projection import projection_backproject_apply_ref


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square (0-d tensor, accumulated in float32), as ``GaLoreAdafactor``'s."""
    return torch.linalg.vector_norm(x, dtype=torch.float32) / math.sqrt(x.numel())


def adafactor_factors(g, row, col, eps1, beta2t):
    """Update the factored second moment ``row`` / ``col`` of ``g`` (2-D float32) in place and
    return the row and column factors ``rsqrt(row / mean(row))`` and ``rsqrt(col)``."""
    sq = g.square().add_(eps1)
    row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
    col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
    return (row / row.mean(dim=-1, keepdim=True)).rsqrt_(), col.rsqrt()


def adafactor_clip_scale_(upd, clip_threshold, lr_t):
    """``upd / max(1, RMS(upd) / clip_threshold) * lr_t``, in place."""
    upd.div_((_rms(upd) / clip_threshold).clamp_(min=1.0))
    return upd.mul_(lr_t)


def adafactor_factored_update(g, row, col, eps1, beta2t, clip_threshold, lr_t):
    """The factored Adafactor update of ``g`` (2-D float32), scaled by ``lr_t`` (a float or a
    0-d tensor); updates ``row`` and ``col`` in place."""
    r_factor, c_factor = adafactor_factors(g, row, col, eps1, beta2t)
    upd = torch.mul(r_factor.unsqueeze(-1), c_factor.unsqueeze(-2)).mul_(g)
    return adafactor_clip_scale_(upd, clip_threshold, lr_t)


def adafactor_lr(p, lr, eps2, scale_parameter):
    """``lr_t``: ``lr``, times ``max(eps2, RMS(W))`` (a 0-d tensor) with ``scale_parameter``."""
    return torch.clamp(_rms(p), min=eps2) * lr if scale_parameter else lr


def adafactor_apply_(p, upd, proj, side, lr_t, weight_decay, scale_parameter, alpha, backproject_apply):
    """The decay and the back-projection: ``W <- decay W + alpha back(upd)``."""
    decay = 1.0
    if weight_decay != 0.0:
        if scale_parameter:  # lr_t is a tensor: W + (-wd lr_t) W in place
            p.addcmul_(p, (-weight_decay * lr_t).to(p.dtype))
        else:
            decay = 1.0 - weight_decay * lr_t
    backproject_apply(p, upd, proj, side, alpha, decay)


def adafactor_first_moment(upd, m, beta1, absmax=None, block_size=0, moment_seed=-1):
    """``m <- beta1 m + (1 - beta1) upd`` in ``m``'s format; returns the float32 moment (``m``
    itself when it is float32)."""
    if m.dtype == torch.uint8:  # 8-bit: dequantize, update in float32, requantize
        mf = _moments.moments_dequantize_ref(m, absmax, signed=True, block_size=block_size)
        mf.mul_(beta1).add_(upd, alpha=1.0 - beta1)
        codes, new_absmax = _moments.moments_quantize_ref(mf, signed=True, block_size=block_size)
        m.copy_(codes)
        absmax.copy_(new_absmax)
        return mf
    if m.dtype == torch.bfloat16:  # 16-bit: stochastic rounding on store
        mf = m.to(torch.float32).mul_(beta1).add_(upd, alpha=1.0 - beta1)
        m.copy_(_moments.bf16_round_sr_ref(mf, moment_seed))
        return mf
    return m.mul_(beta1).add_(upd, alpha=1.0 - beta1)


def adafactor_foreach_update_ref(params, grads, projs, exp_avg_sq_row, exp_avg_sq_col, exp_avg, m_absmax, side, eps1,
                                 eps2, clip_threshold, beta1, scale_parameter, beta2t, lr, weight_decay, alpha,
                                 block_size=0, moment_seed=(), backproject_apply=projection_backproject_apply_ref):
    """Each entry in turn (see the module doc). ``backproject_apply``: the back-projection
    backend, with the op's positional arguments ``(param, update, proj, side, alpha, decay)``."""
    for i, (p, g, proj) in enumerate(zip(params, grads, projs)):
        low = g @ proj.T if side == "right" else proj.T @ g
        lr_t = adafactor_lr(p, lr[i], eps2, scale_parameter)
        upd = adafactor_factored_update(low, exp_avg_sq_row[i], exp_avg_sq_col[i], eps1, beta2t[i], clip_threshold,
                                        lr_t)
        if len(exp_avg):
            upd = adafactor_first_moment(upd, exp_avg[i], beta1, m_absmax[i] if len(m_absmax) else None, block_size,
                                         moment_seed[i] if len(moment_seed) else -1)
        adafactor_apply_(p, upd, proj, side, lr_t, weight_decay[i], scale_parameter, alpha[i], backproject_apply)
