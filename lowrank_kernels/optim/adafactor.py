"""GaLore-Adafactor: Adafactor (Shazeer & Stern 2018) on GaLore's projected gradient.

A drop-in for galore-torch's ``GaLoreAdafactor`` (``galore_torch/adafactor.py``: its
API, defaults and math, with this package's tensor-only state and stored projection side).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union, Unpack

import torch

from lowrank_kernels import ops

from lowrank_kernels.reference import moments as _moments

from . import capturable, config, moments
from . import distributed as _dist
from .base import _PLAIN_TENSORS, LowRankOptimizer
from .common import PROJ_TYPES, project_fp32
from .config import OptimizerConfig, SharedOptions, shared_signature, _is_real
from .galore import SVD_MODES, GaLoreAdamW


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square (0-d tensor, accumulated in float32; float64 stays float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dtype=acc) / math.sqrt(x.numel())


class GaLoreAdafactor(LowRankOptimizer):
    r"""Adafactor with GaLore projection, a drop-in for ``galore_torch.GaLoreAdafactor``.

    Param groups that set ``rank`` (galore-torch keys ``rank``, ``update_proj_gap``,
    ``scale``, ``proj_type``; ``std``, ``reverse_std``, ``left``, ``right``, ``full``)
    are projected; every other group gets plain Adafactor, as galore-torch does
    (factored second moment for parameters with >= 2 dims, full for 1-D ones). Per
    projected ``m x n`` weight ``W`` and step ``t`` (1-based):

    - at ``t = 1, T+1, 2T+1, ...`` the projector is remade from the gradient's SVD
      exactly as :class:`~lowrank_kernels.optim.GaLoreAdamW` does (``svd="exact"`` or
      ``"lowrank"``; stored in the parameter's dtype);
    - ``R = G P^T`` (right) or ``P^T G`` (left; ``U^T G Vh^T`` for ``full``), in
      float32 (a torch matmul: the projection ops fuse Adam, not Adafactor);
    - factored second moment on ``R`` (always factored: ``R`` is 2-D), with
      ``b2t = 1 - t^decay_rate`` and ``U = R^2 + eps[0]``:
      ``row <- b2t row + (1 - b2t) mean_cols(U)``, ``col <- b2t col + (1 - b2t) mean_rows(U)``;
    - ``upd = R * rsqrt(row / mean(row))[:, None] * rsqrt(col)[None, :]``,
      ``upd /= max(1, RMS(upd) / clip_threshold)``, ``upd *= lr_t`` with
      ``lr_t = rel * (max(eps[1], RMS(W)) if scale_parameter else 1)`` and
      ``rel = min(1e-6 t if warmup_init else 1e-2, 1 / sqrt(t))`` if ``relative_step``
      else ``lr``;
    - with ``beta1``: ``m <- beta1 m + (1 - beta1) upd``, ``upd = m``;
    - ``W <- (1 - lr_t wd) W - scale * back(upd)`` (one
      :func:`lowrank_kernels.ops.backproject_apply_`, the decay fused into it; when ``lr_t``
      depends on ``RMS(W)`` the decay is a separate in-place ``W += (-wd lr_t) W`` with
      ``lr_t`` kept on the device, no host synchronization).

    Args:
        params: parameters or param groups (e.g. from :func:`lowrank_param_groups`).
        lr: external learning rate; must be None with ``relative_step=True`` and given
            otherwise (HF's Trainer uses ``relative_step=False, scale_parameter=False``).
        eps: ``(eps1, eps2)``: added to the squared gradient; floor of the parameter
            scale.
        clip_threshold: RMS threshold of the update (> 0).
        decay_rate: exponent of the second-moment decay (<= 0; -0.8).
        beta1: first-moment coefficient in [0, 1), or None for no first moment.
        weight_decay: decoupled, scaled by ``lr_t``.
        scale_parameter, relative_step, warmup_init: Adafactor's learning-rate options
            (``warmup_init`` needs ``relative_step``).
        rank, update_proj_gap, scale, proj_type, svd: GaLore keys, defaults of the
            groups (``rank=None`` leaves a group plain Adafactor).
        skip_nonfinite: skip a parameter whose gradient is not finite (see
            :mod:`lowrank_kernels.optim.base`).
        foreach: None / True (default: bucketed) or False. The non-refresh steps of float32
            weights with a dense right/left projector go by bucket, one
            :func:`lowrank_kernels.ops.foreach_adafactor_update_` call per bucket, bit-identical
            on CPU to the per-parameter path that ``foreach=False`` forces (``full``
            projections, other dtypes and refresh steps always step per parameter).
        moment_dtype: ``"float32"`` only (default): Adafactor's state is float32 (float64
            for float64 parameters); ``"param"`` is refused.
        moment_bits, block_size, min_8bit_size: the format of the **first moment**
            ``exp_avg`` (only kept with ``beta1``), projected and plain: 32 (float32), 16
            (bfloat16, stochastic rounding) or 8 (uint8 codes of the signed dynamic map plus
            float32 ``exp_avg_absmax`` per block of ``block_size`` inside a row; moments below
            ``min_8bit_size`` elements stay float32), as for the Adam optimizers (see
            :mod:`lowrank_kernels.optim.base`). The factored second moment (a row and a column
            vector, ``O(m + n)``) and a 1-D parameter's full second moment always stay float32:
            Adafactor has no second-moment tensor of ``R``'s shape to compress. The first
            moment is updated in float32 (dequantize, ``m <- b1 m + (1 - b1) upd``, the update
            taken from the float32 value, requantize as
            :mod:`lowrank_kernels.reference.moments`), in torch per parameter and inside
            :func:`~lowrank_kernels.ops.foreach_adafactor_update_` by bucket, with the same
            bits. Without ``beta1`` the key has no effect.

    State per projected parameter (tensors only, ``weights_only``-safe): ``step`` (CPU
    float32), ``side`` (CPU int8), ``projector`` (and ``projector_right`` for
    ``full``), ``exp_avg_sq_row`` (rows of ``R``) and ``exp_avg_sq_col`` (columns of
    ``R``), float32, and ``exp_avg`` (``R``'s shape, float32) only with ``beta1``.
    Plain parameters: ``step``, ``exp_avg_sq_row`` / ``exp_avg_sq_col`` (>= 2 dims) or
    ``exp_avg_sq`` (1-D), ``exp_avg`` with ``beta1``; float32 (float64 for float64
    parameters), like galore-torch's for float32 parameters. FSDP2 (DTensor)
    parameters are not supported.
    """

    proj_types = PROJ_TYPES

    @shared_signature(absent=("betas",), scale=0.25)
    def __init__(
        self,
        params,
        lr: Optional[float] = None,
        eps: Tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: Optional[float] = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        svd: str = "exact",
        **options: Unpack[SharedOptions],
    ):
        # Adafactor has no betas (beta1 and decay_rate instead); lr may be None, eps is a pair.
        defaults = OptimizerConfig.from_arguments(locals(), betas=None).defaults(
            clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1, scale_parameter=scale_parameter,
            relative_step=relative_step, warmup_init=warmup_init, svd=svd,
        )
        super().__init__(params, defaults)

    def _warn_selection(self, plain_name: str = "plain Adafactor", stacklevel: int = 5) -> None:
        # Plain Adafactor is a legitimate use (galore-torch's class does it without rank).
        super()._warn_selection(plain_name, stacklevel)

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: Dict[str, Any], gi: int) -> None:
        err = lambda msg: self._err(gi, msg)  # noqa: E731
        self._validate_params(group, gi)
        capturable.validate(type(self), group, err)
        for pi, p in enumerate(group["params"]):
            if _dist.is_dtensor(p):
                raise ValueError(self._err(gi, f"parameter {pi} is a DTensor: GaLoreAdafactor does not support FSDP2"))
        for key in ("scale_parameter", "relative_step", "warmup_init"):
            if not isinstance(group.get(key), bool):
                raise TypeError(self._err(gi, f"{key} must be a bool, got {group.get(key)!r}"))
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            raise TypeError(self._err(gi, "a Tensor lr is not supported; pass a float"))
        if group["relative_step"]:
            if lr is not None:
                raise ValueError(self._err(gi, "lr must be None with relative_step=True (the step size is "
                                               "computed); pass relative_step=False to use lr"))
        elif not _is_real(lr) or not lr >= 0.0:
            raise ValueError(self._err(gi, f"lr must be a float >= 0 with relative_step=False, got {lr!r}"))
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError(self._err(gi, "warmup_init=True requires relative_step=True"))
        eps = group.get("eps")
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2 and all(_is_real(e) and e >= 0.0 for e in eps)):
            raise ValueError(self._err(gi, f"eps must be a pair of floats >= 0, got {eps!r}"))
        clip = group.get("clip_threshold")
        if not _is_real(clip) or not clip > 0.0:
            raise ValueError(self._err(gi, f"clip_threshold must be a float > 0, got {clip!r}"))
        dr = group.get("decay_rate")
        if not _is_real(dr) or not dr <= 0.0:
            raise ValueError(self._err(gi, f"decay_rate must be a float <= 0, got {dr!r}"))
        b1 = group.get("beta1")
        if b1 is not None and (not _is_real(b1) or not 0.0 <= b1 < 1.0):
            raise ValueError(self._err(gi, f"beta1 must be None or a float in [0, 1), got {b1!r}"))
        config.check_weight_decay(group, err)
        config.check_flags(group, err)
        moments.validate(group, err)
        if group.get("moment_dtype", "float32") != "float32":
            raise ValueError(err(f"moment_dtype must be 'float32' (Adafactor keeps float32 state), got "
                                 f"{group.get('moment_dtype')!r}"))
        if self._is_lowrank(group):
            self._validate_lowrank_group(group, gi)
        self._validate_compat(group, gi)

    def _validate_lowrank_group(self, group, gi):
        super()._validate_lowrank_group(group, gi)
        if group.get("svd") not in SVD_MODES:
            raise ValueError(self._err(gi, f"svd must be 'exact' or 'lowrank', got {group.get('svd')!r}"))

    # GaLore's projector: the same SVD refresh (GaLoreAdamW's methods, which use no super()).
    _svd = GaLoreAdamW._svd
    _select_factors = GaLoreAdamW._select_factors
    _compute_projector = GaLoreAdamW._compute_projector
    _refresh_projector = GaLoreAdamW._refresh_projector
    _refresh_cost = GaLoreAdamW._refresh_cost
    _placeholder_projector = GaLoreAdamW._placeholder_projector

    # ------------------------------------------------------------------ state
    @staticmethod
    def _acc(p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    #: the one moment ``moment_bits`` applies to (the first; see the class docstring).
    moment_keys = (("exp_avg", True),)

    def _init_factored(self, p, state, shape, group, dtype, device) -> None:
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=dtype, device=device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=dtype, device=device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        if group["beta1"] is not None:
            fmt = moments.format_of(group)
            if moments.bits_for(shape, fmt) != 32:
                moments.init(state, fmt, shape, device=p.device, param_dtype=p.dtype, keys=("exp_avg",))
            else:
                state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)

    def _init_state(self, p, state, group):
        super()._init_state(p, state, group)
        shape = self._moment_shape(p, state, group)
        self._init_factored(p, state, tuple(shape), group, self._acc(p), p.device)

    # ------------------------------------------------------------------ the math
    def _first_moment_seed(self, p, state, group, step: int) -> int:
        """The stochastic-rounding seed of a 16-bit ``exp_avg`` at ``step``, else -1."""
        if moments.stored_bits(state, moments.format_of(group)) == 16:
            return self._moment_seed(p, step)
        return -1

    @staticmethod
    def _rel_lr(group, step: int) -> float:
        """``lr_t`` before the parameter scale: ``lr``, or the relative step size."""
        lr = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        return lr

    @staticmethod
    def _lr(group, step: int, p: torch.Tensor) -> Union[float, torch.Tensor]:
        """``lr_t``: a float, or a 0-d device tensor when it depends on ``RMS(W)``."""
        lr = GaLoreAdafactor._rel_lr(group, step)
        if group["scale_parameter"]:
            return torch.clamp(_rms(p), min=group["eps"][1]) * lr
        return lr

    @staticmethod
    def _update(g: torch.Tensor, state, group, step: int, lr_t, moment_seed: int = -1) -> torch.Tensor:
        """The Adafactor update of ``g`` (float32), already scaled by ``lr_t``; updates the moments
        (``moment_seed``: the stochastic rounding of a 16-bit first moment)."""
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        sq = g.square().add_(group["eps"][0])
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            upd = torch.mul(r_factor, c_factor).mul_(g)
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            upd = v.rsqrt().mul_(g)
        upd.div_((_rms(upd) / group["clip_threshold"]).clamp_(min=1.0))
        upd.mul_(lr_t)
        if group["beta1"] is not None:
            m = state["exp_avg"]
            b1 = group["beta1"]
            if m.dtype == torch.uint8:  # 8-bit: dequantize, update in float32, requantize
                bs = int(group["block_size"])
                absmax = state["exp_avg_absmax"]
                mf = _moments.moments_dequantize_ref(m, absmax, signed=True, block_size=bs)
                mf.mul_(b1).add_(upd, alpha=1.0 - b1)
                codes, new_absmax = _moments.moments_quantize_ref(mf, signed=True, block_size=bs)
                m.copy_(codes)
                absmax.copy_(new_absmax)
                upd = mf
            elif m.dtype == torch.bfloat16 and moment_seed >= 0:  # 16-bit: stochastic rounding on store
                mf = m.to(torch.float32).mul_(b1).add_(upd, alpha=1.0 - b1)
                m.copy_(_moments.bf16_round_sr_ref(mf, moment_seed))
                upd = mf
            else:
                m.mul_(b1).add_(upd, alpha=1.0 - b1)
                upd = m
        return upd

    def _project_step(self, p, grad, state, group, step):
        side = self._side(state)
        exp_dtype = state["exp_avg_sq_row"].dtype
        if side == "full":
            u, vh = state["projector"], state["projector_right"]
            low = project_fp32(project_fp32(grad, u, "left"), vh, "right").to(exp_dtype)  # U^T G Vh^T
        else:
            u = vh = None
            low = project_fp32(grad, state["projector"], side).to(exp_dtype)
        lr_t = self._lr(group, step, p)
        upd = self._update(low, state, group, step, lr_t, self._first_moment_seed(p, state, group, step))
        wd = group["weight_decay"]
        decay = 1.0
        if wd != 0.0:
            if isinstance(lr_t, torch.Tensor):  # W + (-wd lr_t) W, in place, lr_t on the device
                p.addcmul_(p, (-wd * lr_t).to(p.dtype))
            else:
                decay = 1.0 - wd * lr_t
        if side == "full":
            half = upd @ vh.to(upd.dtype)  # upd Vh, r x n
            ops.backproject_apply_(p, half, u, side="left", alpha=-group["scale"], decay=decay)
        else:
            ops.backproject_apply_(p, upd, state["projector"], side=side, alpha=-group["scale"], decay=decay)

    # ------------------------------------------------------------------ bucketed step
    def _bucket_key(self, p, state, group):
        """Float32 weights of this class's own step with a dense right/left projector share a
        bucket per (device, side, eps, clip threshold, beta1, scale_parameter, first-moment
        format); ``full``, other dtypes and subclasses that change the step stay per parameter."""
        if not self._own_fused_step(GaLoreAdafactor):
            return None
        side = self._side(state)
        if side == "full":
            return None
        proj = state.get("projector")
        if (p.dtype != torch.float32 or type(p) not in _PLAIN_TENSORS or p.grad.dtype != torch.float32
                or not isinstance(proj, torch.Tensor) or proj.dtype != torch.float32
                or state["exp_avg_sq_row"].dtype != torch.float32):
            return None
        beta1 = group["beta1"]
        fmt = ()
        if beta1 is not None:
            m = state["exp_avg"]
            if m.dtype not in (torch.float32, torch.bfloat16, torch.uint8):
                return None
            fmt = moments.bucket_part(state, moments.format_of(group))
            if m.dtype == torch.bfloat16 and fmt[0] != 16:  # bf16 without stochastic rounding: per parameter
                return None
        eps1, eps2 = group["eps"]
        return ("adafactor", p.device, side, float(eps1), float(eps2), float(group["clip_threshold"]), beta1,
                bool(group["scale_parameter"]), fmt)

    def _bucket_step(self, key, entries, skip=None, coeffs=None):
        """One ``ops.foreach_adafactor_update_`` call with the arguments of :meth:`_project_step`
        per parameter (its step size, second-moment decay, weight decay and scale)."""
        _, _, side, eps1, eps2, clip, beta1, scale_parameter, fmt = key
        first = beta1 is not None
        kw = {}
        if first:
            kw["exp_avg"] = [st["exp_avg"] for _, st, _, _ in entries]
            if fmt[0] == 8:
                kw.update(m_absmax=[st["exp_avg_absmax"] for _, st, _, _ in entries], block_size=fmt[1])
            elif fmt[0] == 16:
                kw["moment_seed"] = [self._moment_seed(p, t) for p, _, _, t in entries]
        ops.foreach_adafactor_update_(
            [p for p, _, _, _ in entries], [p.grad for p, _, _, _ in entries],
            [st["projector"] for _, st, _, _ in entries], [st["exp_avg_sq_row"] for _, st, _, _ in entries],
            [st["exp_avg_sq_col"] for _, st, _, _ in entries], side=side, eps1=eps1, eps2=eps2, clip_threshold=clip,
            beta2t=[1.0 - math.pow(t, g["decay_rate"]) for _, _, g, t in entries],
            lr=[self._rel_lr(g, t) for _, _, g, t in entries], weight_decay=[g["weight_decay"] for _, _, g, _ in entries],
            alpha=[-g["scale"] for _, _, g, _ in entries], scale_parameter=scale_parameter,
            beta1=beta1 if first else 0.0, **kw,
        )

    def _plain_step(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        """Plain Adafactor (galore-torch's path for a group without ``rank``)."""
        for p in params:
            state = self.state[p]
            grad = p.grad
            acc = self._acc(p)
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                self._init_factored(p, state, tuple(grad.shape), group, acc, p.device)
            state["step"] += 1
            step = int(state["step"])
            w = p if p.dtype == acc else p.to(acc)
            lr_t = self._lr(group, step, w)
            upd = self._update(grad.to(acc), state, group, step, lr_t, self._first_moment_seed(p, state, group, step))
            wd = group["weight_decay"]
            if wd != 0.0:
                if isinstance(lr_t, torch.Tensor):
                    w.addcmul_(w, (-wd * lr_t).to(w.dtype))
                else:
                    w.add_(w, alpha=-wd * lr_t)
            w.sub_(upd)
            if w is not p:
                p.copy_(w)


__all__ = ["GaLoreAdafactor"]
