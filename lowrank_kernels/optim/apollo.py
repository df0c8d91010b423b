"""APOLLO / APOLLO-Mini (Zhu et al. 2024): SGD-like memory, AdamW-like scaling from a random projection."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple, Unpack

import torch

from lowrank_kernels import ops

from . import distributed as _dist
from . import moments
from .base import _PLAIN_TENSORS, LowRankOptimizer
from .common import adam_step_size, assign_, mix_seed, project_fp32
from .config import OptimizerConfig, SharedOptions, shared_signature

SCALE_TYPES = ("channel", "tensor")
_LIMIT = 1.01  # Fira's norm-growth limiter: at most 1% growth of the update norm per step


def _norm(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Euclidean norm accumulated in float32 (float64 stays float64), without a converted copy."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=dim, dtype=acc)


def apollo_torch_next_seed(seed: int) -> int:
    """apollo-torch's seed sequence: the 15th of ``torch.randint(0, 2**63 - 1)``
    draws from a CPU generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen)[-1])


class APOLLOAdamW(LowRankOptimizer):
    r"""APOLLO, a drop-in for ``apollo_torch.APOLLOAdamW`` (random projection).

    Param groups that set ``rank`` (keys ``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type``, ``scale_type``; apollo-torch's ``proj="random"`` is accepted) are
    projected; every other group is plain ``torch.optim.AdamW``. Per projected
    ``m x n`` weight and step ``t``:

    - the projection is random, ``P = randn(shape) / sqrt(r)`` (right ``r x n``,
      left ``m x r``, sides as galore's ``std``) drawn on the parameter's device from
      a ``torch.Generator`` seeded with ``state["seed"]``. **Only the seed is
      stored** and ``P`` is regenerated at every step; at ``t = T+1, 2T+1, ...`` the
      seed advances (:meth:`_next_seed`), giving a new subspace. The first seed is
      the parameter's 1-based position in the optimizer (as apollo-torch);
    - ``R`` is the projected gradient; ``N = adam_update_(R)``
      (``lowrank_kernels.ops``: Adam moments on ``R``, not reset at a refresh);
    - scaling factor ``s``: ``scale_type="channel"``: ``||N_j|| / (||R_j|| + 1e-8)``
      per channel of the full dimension (norms along the low-rank dimension);
      ``"tensor"``: ``||N||_F / (||R||_F + 1e-8)``;
    - ``Gt = G * s``; norm-growth limiter (Fira, on by default,
      ``norm_growth_limiter=False`` disables it): when a previous norm exists,
      ``Gt <- Gt / (max(||Gt|| / (prev + 1e-8), 1.01) / 1.01)``; ``prev <- ||Gt||``;
    - ``W <- (1 - lr wd) W - lr sqrt(1 - b2^t) / (1 - b1^t) * sqrt(scale) * Gt``.

    The limiter runs on device tensors (no host sync). Weight decay uses torch's
    order (decay first); apollo-torch decays after the update, runs its plain groups
    with a transformers-style AdamW and advances the seed with its own sequence:
    ``compat="apollo-torch"`` (constructor or group key) reproduces all three, so
    the weights equal ``apollo_torch.APOLLOAdamW``'s (see
    :mod:`lowrank_kernels.optim.base`). apollo-torch's
    constructor flags are accepted: ``scale_front=True`` multiplies by
    ``sqrt(scale)`` before the limiter, ``disable_nl=True`` turns the limiter off
    (group keys ``scale_front``, ``norm_growth_limiter``).

    To reproduce another implementation's projections (parity tests), override
    :meth:`_projection` (``(shape, seed, device) -> float32 tensor``) and
    :meth:`_next_seed`.

    State per projected parameter: ``step`` (CPU float32), ``side`` (CPU int8),
    ``seed`` (CPU int64, the seed of the current projection), ``exp_avg``,
    ``exp_avg_sq`` (low-rank shape, float32 unless ``moment_dtype="param"``; 8-bit codes plus
    ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` or bfloat16 with ``moment_bits=8`` / ``16``, see
    :mod:`lowrank_kernels.optim.moments`) and, with the limiter on,
    ``scaled_grad_norm`` (the previous step's ``||Gt||``: 0-d float32 on the
    parameter's device).

    Use :meth:`mini` for APOLLO-Mini (rank 1, tensor-wise scaling, scale 128).
    """

    compat_modes = ("apollo-torch",)

    @shared_signature(eps=1e-6, scale=1.0)
    def __init__(
        self,
        params,
        correct_bias: bool = True,
        scale_front: bool = False,
        disable_nl: bool = False,
        no_deprecation_warning: bool = True,
        *,
        scale_type: str = "channel",
        proj: str = "random",
        norm_growth_limiter: Optional[bool] = None,
        compat: Optional[str] = None,
        **options: Unpack[SharedOptions],
    ):
        if not correct_bias:
            raise NotImplementedError(f"{type(self).__name__}: correct_bias=False is not supported")
        if norm_growth_limiter is None:
            norm_growth_limiter = not disable_nl
        defaults = OptimizerConfig.from_arguments(locals()).defaults(
            scale_type=scale_type, proj=proj, scale_front=bool(scale_front),
            norm_growth_limiter=bool(norm_growth_limiter),
        )
        if compat is not None:
            defaults["compat"] = compat
        super().__init__(params, defaults)

    @classmethod
    def mini(cls, params, lr: float = 1e-2, **kwargs) -> "APOLLOAdamW":
        """APOLLO-Mini: rank 1, tensor-wise scaling, ``scale=128``, ``update_proj_gap=200``.

        These become the defaults of every group that does not set them (groups with
        ``rank=None`` stay plain AdamW); other keyword arguments go to the
        constructor and may override the preset.
        """
        preset = dict(rank=1, scale_type="tensor", scale=128.0, update_proj_gap=200)
        if not isinstance(params, torch.Tensor):
            params = list(params)
            for gi, g in enumerate(params):
                if not isinstance(g, dict):
                    continue
                over = [f"{k}={g[k]!r}" for k in ("rank", "scale", "scale_type")
                        if g.get(k) is not None and g[k] != preset[k]]
                if over:
                    warnings.warn(
                        f"APOLLOAdamW.mini: param group {gi} sets {', '.join(over)}, which overrides the Mini preset "
                        "(rank=1, scale=128.0, scale_type='tensor') in that group; build the groups without these "
                        "keys (lowrank_param_groups(model) without rank) or use APOLLOAdamW(...) with your values",
                        UserWarning, stacklevel=2)
        preset.update(kwargs)
        return cls(params, lr=lr, **preset)

    def _validate_lowrank_group(self, group, gi):
        super()._validate_lowrank_group(group, gi)
        if group.get("scale_type") not in SCALE_TYPES:
            raise ValueError(self._err(gi, f"scale_type must be 'channel' or 'tensor', got {group.get('scale_type')!r}"))
        if group.get("proj", "random") != "random":
            raise ValueError(
                self._err(gi, f"proj={group.get('proj')!r} is not supported: APOLLOAdamW projects with 'random' "
                              "(use GaLoreAdamW for SVD projections)")
            )

    def _init_state(self, p, state, group):
        super()._init_state(p, state, group)
        shape = self._moment_shape(p, state, group)
        moments.init(state, moments.format_of(group), shape, device=p.device, param_dtype=p.dtype)

    # ------------------------------------------------------------------ seeded projection
    @staticmethod
    def _next_seed(seed: int) -> int:
        """The seed of the next subspace (deterministic)."""
        return mix_seed(seed, 0xA90110)

    @staticmethod
    def _projection(shape, seed: int, device: torch.device) -> torch.Tensor:
        """``randn(shape)`` in float32 from a generator seeded with ``seed`` on ``device``."""
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    def _has_projector(self, state):
        return "seed" in state

    def _refresh_projector(self, p, grad, state, group, step):
        if "seed" in state:
            seed = int(state["seed"])
            new = apollo_torch_next_seed(seed) if group.get("compat") == "apollo-torch" else self._next_seed(seed)
        else:
            new = self._param_seed(p)
        assign_(state, "seed", torch.tensor(new, dtype=torch.int64))
        return True

    def _get_projector(self, p, state, group):
        """``P = randn / sqrt(r)`` regenerated from ``state["seed"]``, in the parameter's dtype."""
        m, n = p.shape
        r = self._group_rank(group, (m, n))
        shape = (r, n) if self._side(state) == "right" else (m, r)
        proj = self._projection(shape, int(state["seed"]), p.device) / math.sqrt(r)
        return proj.to(p.dtype)

    # ------------------------------------------------------------------ step
    def _project_step(self, p, grad, state, group, step):
        beta1, beta2 = group["betas"]
        side = self._side(state)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        proj = self._get_projector(p, state, group)
        r_lr = project_fp32(grad, proj, side).to(moments.update_dtype(state, exp_avg.dtype))  # R, low-rank shape
        # R is already projected: Adam's elementwise step on it (no identity-projector GEMM).
        n_lr = ops.adam_update_(r_lr, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=group["eps"],
                                **self._moment_kwargs(p, state, group, step))
        if group["scale_type"] == "channel":
            dim = 1 if side == "right" else 0  # the low-rank dimension
            s = _norm(n_lr, dim) / (_norm(r_lr, dim) + 1e-8)
            scaled_norm = _norm(s * _norm(grad, dim))
            coef = s.unsqueeze(1) if side == "right" else s.unsqueeze(0)
        else:
            s = _norm(n_lr) / (_norm(r_lr) + 1e-8)
            scaled_norm = s * _norm(grad)
            coef = s
        root_scale = math.sqrt(group["scale"])
        if group.get("scale_front", False):  # sqrt(scale) before the limiter (apollo-torch's scale_front)
            coef = coef * root_scale
            scaled_norm = scaled_norm * root_scale
            root_scale = 1.0
        if group["norm_growth_limiter"]:
            prev = state.get("scaled_grad_norm")
            if prev is not None:
                limiter = torch.clamp(scaled_norm / (prev + 1e-8), min=_LIMIT) / _LIMIT
                coef = coef / limiter
                scaled_norm = scaled_norm / limiter
            state["scaled_grad_norm"] = scaled_norm.detach().clone()
        step_size = adam_step_size(group["lr"], beta1, beta2, step)
        coef = coef * (-step_size * root_scale * self._post_decay(group))
        if group["weight_decay"] != 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        _dist.addcmul_(p, grad, coef)  # p.addcmul_(grad, coef), on the local rows under FSDP2

    # ------------------------------------------------------------------ bucketed step
    def _bucket_key(self, p, state, group):
        """Float32 weights of this class's own step (projection and seed sequence not overridden)
        share a bucket per (device, side, rank, scaling, limiter, betas, eps, moment format);
        other dtypes, DTensors and subclasses that change the step stay per parameter."""
        if not self._own_fused_step(APOLLOAdamW) or not self._own_projection():
            return None
        if p.dtype != torch.float32 or type(p) not in _PLAIN_TENSORS or p.grad.dtype != torch.float32:
            return None
        limiter = bool(group["norm_growth_limiter"])
        if limiter:
            prev = state.get("scaled_grad_norm")
            if prev is None or prev.dtype != torch.float32 or prev.device != p.device:
                return None
        beta1, beta2 = group["betas"]
        return ("apollo", p.device, self._side(state), self._group_rank(group, tuple(p.shape)),
                group["scale_type"] == "channel", limiter, state["exp_avg"].dtype, beta1, beta2, group["eps"],
                moments.bucket_part(state, moments.format_of(group)))

    def _own_projection(self) -> bool:
        t = type(self)
        return t._projection is APOLLOAdamW._projection and t._get_projector is APOLLOAdamW._get_projector

    def _bucket_step(self, key, entries, skip=None, coeffs=None):
        """One ``ops.foreach_apollo_update_`` call: the per-parameter step's arithmetic
        (:meth:`_project_step`), with each weight's seed, scale factors and decay."""
        _, _, side, rank, channel, limiter, _, beta1, beta2, eps, _ = key
        front, alpha, decay = [], [], []
        for _, _, g, t in entries:
            root = math.sqrt(g["scale"])
            scale_front = bool(g.get("scale_front", False))
            front.append(root if scale_front else 1.0)
            step_size = adam_step_size(g["lr"], beta1, beta2, t)
            alpha.append(-step_size * (1.0 if scale_front else root) * self._post_decay(g))
            decay.append(1.0 - g["lr"] * g["weight_decay"] if g["weight_decay"] != 0.0 else 1.0)
        ops.foreach_apollo_update_(
            [p for p, _, _, _ in entries], [p.grad for p, _, _, _ in entries],
            [st["seed"] for _, st, _, _ in entries], [st["exp_avg"] for _, st, _, _ in entries],
            [st["exp_avg_sq"] for _, st, _, _ in entries], side=side, rank=rank, channel=channel, beta1=beta1,
            beta2=beta2, eps=eps, front=front, alpha=alpha, decay=decay,
            prev_norm=[st["scaled_grad_norm"] for _, st, _, _ in entries] if limiter else None,
            **self._foreach_moment_kwargs(entries),
        )
