"""Fira (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"): GaLore plus the gradient outside the subspace, scaled by the low-rank Adam
update's own norm ratio, with a norm-growth limiter."""
from __future__ import annotations

import math
from typing import Optional, Unpack

import torch

from lowrank_kernels import ops

from . import distributed as _dist
from . import moments
from .base import _PLAIN_TENSORS, LowRankOptimizer
from .common import adam_step_size, assign_
from .config import OptimizerConfig, SharedOptions, shared_signature
from .dct import NORMS, reindex_moments8_, reindex_moments_
from .galore import GaLoreAdamW

PROJECTORS = ("svd", "dct")
#: the package's constant in the scaling factor's denominator and the limiter's
_TINY = 1e-8


def _norm(t: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=dim)


class FiraAdamW(GaLoreAdamW):
    r"""Fira: GaLore-AdamW plus the scaled residual of the gradient, a drop-in for ``fira.FiraAdamW``.

    Param groups that set ``rank`` are projected as in :class:`GaLoreAdamW` (same projector,
    same refresh schedule and path: ``projector="svd"`` is GaLore's SVD projector, ``"dct"``
    the DCT rows best aligned with the gradient as :class:`DCTAdamW` picks them, an SVD-free
    Fira); every other group is plain ``torch.optim.AdamW`` (bit-identical). Per projected
    ``m x n`` weight and step ``t``, with ``R = project(G)`` and the low-rank Adam direction
    ``N = M / (sqrt(V) + eps)`` (moments of ``R``):

    - **norm-based scaling**: ``s = ||N||_k / (||R||_k + 1e-8)``, the norms taken over the rank
      dimension, one factor per index ``k`` of the dimension the projection keeps (per row for
      the right side, ``R`` is ``m x r``; per column for the left side, ``R`` is ``r x n``);
    - the scaled residual ``Q = s * (G - back(R))`` (the gradient outside the subspace);
    - **norm-growth limiter** (``gamma``, default 1.01; None turns it off): from the second
      step on, ``Q /= max(||Q|| / (prev + 1e-8), gamma) / gamma`` so that ``||Q||`` grows at
      most by ``gamma`` per step; ``prev = ||Q||`` after the division (state
      ``residual_norm``, +inf before the first step);
    - ``W <- (1 - lr wd) W - lr sqrt(1 - b2^t) / (1 - b1^t) * (scale * back(N) + Q)``.

    The residual never exists as a full-size tensor: since ``s`` runs along the kept dimension,
    ``scale * back(N) + Q = back(scale * N - s * R) + s * G``, one back-projection GEMM whose
    epilogue reads ``G`` (:func:`lowrank_kernels.ops.residual_apply_`); ``||Q||`` is a second
    GEMM pass with a square-sum epilogue (:func:`lowrank_kernels.ops.residual_sumsq`), run
    before it because the limiter needs the whole norm. No host synchronization.

    ``compat="fira"`` reproduces the ``fira`` package (1.0.2): weight decay after the update,
    its transformers-style AdamW in the plain groups, and its residual ``G - scale * back(R)``
    (the package's back-projection multiplies by ``scale``, its ``alpha``, so for ``scale != 1``
    it is not the orthogonal complement). eps sits as in the package and GaLore
    (``sqrt(V) + eps`` before the bias correction).

    Args:
        params: parameters or param groups (e.g. from :func:`lowrank_param_groups`).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (``eps`` defaults to 1e-6 like
            the package).
        rank, update_proj_gap, scale, proj_type: as :class:`GaLoreAdamW` (``proj_type``:
            ``std``, ``reverse_std``, ``left`` or ``right``; ``full`` has no kept dimension
            to scale along and is refused).
        projector: ``"svd"`` (default, GaLore's projector, ``svd="exact"|"lowrank"``) or
            ``"dct"`` (DCT basis rows chosen by :func:`lowrank_kernels.ops.dct_score_topk`
            with the ``norm`` key, 1 or 2; only ``rank`` int32 indices are stored). Moments
            are kept across a refresh, as GaLore does, unless ``moment_transport=True``.
        gamma: the limiter's growth bound (a float >= 1), None to turn the limiter off.
        moment_transport: as :class:`GaLoreAdamW` (projection-aware moments at a refresh;
            with ``projector="dct"`` the moments of kept rows move to their new positions,
            as :class:`DCTAdamW` does).
        refresh, random_after, refresh_seed: as :class:`GaLoreAdamW` (``"sample"``: SARA,
            ``"random"``: GoLore after ``random_after`` steps); ``projector="svd"`` only.
        skip_nonfinite, foreach, moment_dtype, moment_bits, block_size, min_8bit_size:
            as :class:`GaLoreAdamW` (``foreach``: the non-refresh steps of the float32 weights
            of a bucket are one :func:`lowrank_kernels.ops.foreach_fira_update_` call:
            projections, Adam updates, scalings, limiters and both residual passes; ``False``:
            per parameter, bit-identical: a float32 weight on the CPU steps through the same
            op with a one-entry list).
        compat: None or ``"fira"`` (above). Also a group key.

    State per projected parameter: GaLore's (``step``, ``side``, ``exp_avg``, ``exp_avg_sq``
    in the moment format, and ``projector`` in the parameter's dtype, or ``indices`` (int32,
    ``rank``) with ``projector="dct"``), plus ``residual_norm``: one float32 scalar (float64 for
    float64 parameters) on the parameter's device.
    """

    proj_types = ("std", "reverse_std", "left", "right")
    compat_modes = ("fira",)
    supports_capturable = False

    @shared_signature(eps=1e-6, scale=0.25)
    def __init__(self, params, *, projector: str = "svd", svd: str = "exact", norm: int = 1,
                 gamma: Optional[float] = 1.01, compat: Optional[str] = None, moment_transport: bool = False,
                 refresh: str = "svd", random_after: int = 0, refresh_seed: int = 0,
                 **options: Unpack[SharedOptions]):
        defaults = OptimizerConfig.from_arguments(locals()).defaults(
            projector=projector, svd=svd, norm=norm, gamma=gamma, moment_transport=moment_transport,
            refresh=refresh, random_after=random_after, refresh_seed=refresh_seed)
        if compat is not None:
            defaults["compat"] = compat
        LowRankOptimizer.__init__(self, params, defaults)

    # ------------------------------------------------------------------ groups and state
    def _validate_lowrank_group(self, group, gi):
        if group.get("projector") not in PROJECTORS:
            raise ValueError(self._err(gi, f"projector must be 'svd' or 'dct', got {group.get('projector')!r}"))
        norm = group.get("norm")
        if type(norm) is not int or norm not in NORMS:
            raise ValueError(self._err(gi, f"norm must be 1 or 2, got {norm!r}"))
        gamma = group.get("gamma")
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))
                                  or not math.isfinite(gamma) or gamma < 1.0):
            raise ValueError(self._err(gi, f"gamma must be a finite float >= 1 or None, got {gamma!r}"))
        super()._validate_lowrank_group(group, gi)
        if group["projector"] == "dct" and group.get("refresh", "svd") != "svd":
            raise ValueError(self._err(gi, f"refresh={group['refresh']!r} picks singular vectors or a random "
                                           "subspace; projector='dct' scores the DCT basis and takes only "
                                           "refresh='svd' (the default)"))
        for pi, p in enumerate(group["params"]):
            if _dist.is_dtensor(p):
                raise ValueError(self._err(gi, f"parameter {pi} is a DTensor: {type(self).__name__} does not support "
                                               "FSDP2-sharded parameters yet"))

    def _init_state(self, p, state, group):
        super()._init_state(p, state, group)
        # +inf: no previous norm yet, so the first step is not limited (the package's first step).
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        state["residual_norm"] = torch.full((), math.inf, dtype=dtype, device=p.device)

    # ------------------------------------------------------------------ projector
    def _has_projector(self, state):
        return "projector" in state or "indices" in state

    def _compute_projector(self, p, grad, state, group, step):
        """GaLore's projector (``projector="svd"``), or the int32 indices of the ``rank`` DCT
        rows best aligned with the gradient (``"dct"``)."""
        if group["projector"] == "dct":
            r = self._group_rank(group, tuple(p.shape))
            return ops.dct_score_topk(grad, r, side=self._side(state), norm=group["norm"])
        return super()._compute_projector(p, grad, state, group, step)

    def _refresh_projector(self, p, grad, state, group, step):
        if group["projector"] == "dct":
            idx = self._compute_projector(p, grad, state, group, step)
            if group.get("moment_transport", False) and "indices" in state:
                # LDAdam's rule for a 0/1 selection is DCTAdamW's re-indexing.
                side = self._side(state)
                size = p.shape[1] if side == "right" else p.shape[0]
                if state["exp_avg"].dtype == torch.uint8:
                    reindex_moments8_(state, state["indices"], idx, side, size, int(group["block_size"]))
                else:
                    reindex_moments_(state["exp_avg"], state["exp_avg_sq"], state["indices"], idx, side, size)
            assign_(state, "indices", idx)
            return True
        return super()._refresh_projector(p, grad, state, group, step)

    def _get_projector(self, p, state, group):
        idx = state.get("indices")
        if idx is None:
            return state["projector"]
        m, n = p.shape
        size = n if self._side(state) == "right" else m
        return ops.DCTProjector(ops.dct_basis(size, p.dtype, p.device), idx)

    # ------------------------------------------------------------------ step
    def _project_step(self, p, grad, state, group, step):
        if p.device.type == "cpu" and grad is p.grad:
            key = self._bucket_key(p, state, group)
            if key is not None:
                # A weight the bucketed step would take: its op on a one-entry list, the same
                # arithmetic (bit-identical; on the CPU the op's raw path for small weights is
                # not the per-weight ops' arithmetic below).
                self._bucket_step(key, [(p, state, group, step)])
                return
        beta1, beta2 = group["betas"]
        proj = self._get_projector(p, state, group)
        low = ops.project(grad, proj, side=self._side(state))
        exp_avg = state["exp_avg"]
        n_lr = ops.adam_update_(low.to(moments.update_dtype(state, exp_avg.dtype)), exp_avg, state["exp_avg_sq"],
                                beta1=beta1, beta2=beta2, eps=group["eps"],
                                **self._moment_kwargs(p, state, group, step))
        self._residual_step(p, grad, state, group, step, proj, low, n_lr)

    def _residual_step(self, p, grad, state, group, step, proj, low, n_lr):
        """The part after the Adam update: scaling, limiter, the fused apply (the bucketed
        step's op, ``ops.foreach_fira_update_``, repeats this arithmetic per weight)."""
        side = self._side(state)
        beta1, beta2 = group["betas"]
        right = side == "right"
        rank_dim = 1 if right else 0
        n32 = n_lr.to(low.dtype)
        s = _norm(n32, rank_dim) / (_norm(low, rank_dim) + _TINY)  # one factor per kept index
        # The package's residual is G - alpha * back(R) (alpha = scale); ours the orthogonal complement.
        a = group["scale"] if group.get("compat") == "fira" else 1.0
        gamma = group["gamma"]
        if gamma is not None:
            s_b = s.unsqueeze(1) if right else s.unsqueeze(0)
            norm = ops.residual_sumsq(grad, low * s_b * (-a), proj, s, side=side).sqrt()
            prev = state["residual_norm"]
            limiter = torch.clamp(norm / (prev.to(norm.dtype) + _TINY), min=gamma) / gamma
            s = s / limiter.to(s.dtype)
            prev.copy_(norm / limiter)
        s_b = s.unsqueeze(1) if right else s.unsqueeze(0)
        update = n32 * group["scale"] - low * s_b * a
        step_size = adam_step_size(group["lr"], beta1, beta2, step)
        ops.residual_apply_(p, grad, update, proj, s, side=side, alpha=-step_size * self._post_decay(group),
                            decay=1.0 - group["lr"] * group["weight_decay"])

    # ------------------------------------------------------------------ bucketed (multi-tensor) step
    def _bucket_key(self, p, state, group):
        """Float32 weights of this class's own step share a bucket per (device, projector kind,
        side, limiter on or off, betas, eps, moment format); other dtypes and DTensors step
        per parameter."""
        if not self._own_fused_step(FiraAdamW):
            return None
        if p.dtype != torch.float32 or type(p) not in _PLAIN_TENSORS or p.grad.dtype != torch.float32:
            return None
        beta1, beta2 = group["betas"]
        kind = "dct" if "indices" in state else "dense"
        if kind == "dense" and state["projector"].dtype != torch.float32:
            return None
        return ("fira", kind, self._side(state), p.device, group["gamma"] is not None, state["exp_avg"].dtype, beta1,
                beta2, group["eps"], moments.bucket_part(state, moments.format_of(group)))

    def _bucket_step(self, key, entries, skip=None, coeffs=None):
        """One ``ops.foreach_fira_update_`` call: :meth:`_project_step`'s arithmetic for every
        weight of the bucket (projection, Adam update, scaling, limiter, both residual passes),
        bitwise the same results on CPU."""
        if skip is not None or coeffs is not None:  # pragma: no cover - not capturable
            raise RuntimeError("FiraAdamW has no capturable step")
        _, kind, side, _, limiter, _, beta1, beta2, eps, _ = key
        dct = kind == "dct"
        sts = [st for _, st, _, _ in entries]
        if dct:
            basis = ops.dct_basis
            projs = [basis(p.shape[1] if side == "right" else p.shape[0], p.dtype, p.device) for p, _, _, _ in entries]
        else:
            projs = [st["projector"] for st in sts]
        coef = {}  # (group, step) -> its numbers, computed once (a bucket's weights mostly share both)
        per = []
        for _, _, g, t in entries:
            c = coef.get((id(g), t))
            if c is None:
                c = coef[(id(g), t)] = (
                    g["scale"], g["scale"] if g.get("compat") == "fira" else 1.0, g["gamma"],
                    -adam_step_size(g["lr"], beta1, beta2, t) * self._post_decay(g), 1.0 - g["lr"] * g["weight_decay"])
            per.append(c)
        scale, mix, gamma, alpha, decay = (list(x) for x in zip(*per))
        ops.foreach_fira_update_(
            [p for p, _, _, _ in entries], [p.grad for p, _, _, _ in entries], projs,
            [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts], side=side,
            beta1=beta1, beta2=beta2, eps=eps, scale=scale, mix=mix, alpha=alpha, decay=decay,
            indices=[st["indices"] for st in sts] if dct else None,
            prev_norm=[st["residual_norm"] for st in sts] if limiter else None,
            gamma=gamma if limiter else None, **self._foreach_moment_kwargs(entries),
        )
