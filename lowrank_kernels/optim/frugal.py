"""FRUGAL (Zmushko et al. 2024): AdamW in a subspace plus a state-free update of the rest."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Unpack

import torch

from lowrank_kernels import ops

from . import distributed as _dist
from . import moments
from .refresh_share import svd_cost
from ._stepcache import increment_steps
from .base import _PLAIN_TENSORS, LowRankOptimizer
from .common import adam_step_size, assign_, mix_seed, project_fp32, resolve_side
from .config import OptimizerConfig, SharedOptions, shared_signature

UPDATES = ("signsgd", "sgd")

# A projection method: (optimizer, p, grad, state, group, step, rank, side) -> projector or None.
# The projector has orthonormal rows (right, ``r x n``) or columns (left, ``m x r``).
ProjectionFn = Callable[..., Optional[torch.Tensor]]


def _generator(opt: "FrugalAdamW", p: torch.Tensor, step: int) -> torch.Generator:
    gen = torch.Generator(device=p.device)
    gen.manual_seed(mix_seed(opt._param_seed(p), step, 0xF2))
    return gen


def svd_projection(opt, p, grad, state, group, step, rank, side):
    """Top-``rank`` singular vectors of the gradient (exact SVD in float32)."""
    grad = _dist.full_gradient(grad)  # FSDP2: all-gather of the gradient, at a refresh only
    g = grad.to(torch.float32) if grad.dtype != torch.float64 else grad
    try:
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
    except torch.linalg.LinAlgError:  # no convergence; other errors (e.g. out of memory) propagate
        return None
    proj = vh[:rank] if side == "right" else u[:, :rank]
    if not bool(torch.isfinite(proj).all()):  # one host sync, refresh steps only
        return None
    return proj


def random_projection(opt, p, grad, state, group, step, rank, side):
    """A random orthonormal basis (QR of a seeded Gaussian matrix)."""
    dim = p.shape[1] if side == "right" else p.shape[0]
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    gauss = torch.randn(dim, rank, generator=_generator(opt, p, step), device=p.device, dtype=acc)
    q = torch.linalg.qr(gauss).Q
    return q.T if side == "right" else q


def columns_projection(opt, p, grad, state, group, step, rank, side):
    """A random subset of ``rank`` columns (right) or rows (left), kept in order."""
    dim = p.shape[1] if side == "right" else p.shape[0]
    idx = torch.randperm(dim, generator=_generator(opt, p, step), device=p.device)[:rank].sort().values
    arange = torch.arange(rank, device=p.device)
    if side == "right":
        proj = torch.zeros(rank, dim, device=p.device, dtype=torch.float32)
        proj[arange, idx] = 1.0
    else:
        proj = torch.zeros(dim, rank, device=p.device, dtype=torch.float32)
        proj[idx, arange] = 1.0
    return proj


def dct_projection(opt, p, grad, state, group, step, rank, side):
    """The ``rank`` DCT basis vectors best aligned with the gradient (L1 scores, or the
    group's ``norm`` key; :func:`lowrank_kernels.ops.dct_score_topk`), as a dense projector
    (``rank x n`` right, ``m x rank`` left: FrugalAdamW stores dense projectors). DCTAdamW
    (:mod:`lowrank_kernels.optim.dct`) keeps the indices instead."""
    norm = group.get("norm", 1)
    idx = ops.dct_score_topk(grad, rank, side=side, norm=norm)
    size = p.shape[1] if side == "right" else p.shape[0]
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    return ops.DCTProjector(ops.dct_basis(size, acc, p.device), idx).dense(side)


class FrugalAdamW(LowRankOptimizer):
    r"""FRUGAL with a state-full AdamW part and a state-free part.

    Param groups that set ``density`` or ``rank`` are split; every other group
    (``rank=None`` and ``density=None``) is plain ``torch.optim.AdamW``. Per split
    ``m x n`` weight (rank ``r = rank`` or ``round(density * min(m, n))``, ``0 <= r
    <= min(m, n)``), sides as galore's ``proj_type``:

    - every ``update_proj_gap`` steps (``t = 1, T+1, ...``) a new subspace ``P``
      (orthonormal, stored in the parameter's dtype): ``projection="svd"`` (top
      singular vectors of the gradient), ``"random"`` (seeded random orthonormal),
      ``"columns"`` (a seeded random subset of columns / rows), ``"dct"`` (the DCT-II
      basis vectors best aligned with the gradient, :func:`dct_projection`), or any method
      added with :meth:`register_projection`. **At each subspace
      change the moments are zeroed and the bias-correction step restarts**
      (``state["subspace_step"]``);
    - state-full part: ``R = G P^T`` (``P^T G``), ``N = adam_update_(R)`` and
      ``W <- (1 - lr wd) W - lr sqrt(1 - b2^k) / (1 - b1^k) * scale * back(N)``
      (``k`` counts steps since the subspace change);
    - state-free part, on the residual ``G - back(R)``: ``update="signsgd"``:
      ``W <- W - lr * inactive_lr_scale * sign(residual)``; ``"sgd"``: without the
      sign. With ``r`` equal to the projected dimension the residual is empty and
      skipped (density 1 with ``"columns"`` is AdamW); with ``r = 0`` there is no
      state-full part (density 0 is signSGD / SGD).

    A failed refresh (SVD error or non-finite result) keeps the previous subspace
    and its moments. ``eps`` (1e-8) sits outside the bias correction as in the
    other projected methods: ``N = M / (sqrt(V) + eps)``.

    State per split parameter: ``step`` and ``subspace_step`` (CPU float32),
    ``side`` (CPU int8) and, when ``r > 0``, ``projector`` (``r x n`` / ``m x r``),
    ``exp_avg``, ``exp_avg_sq`` (low-rank shape, float32 unless ``moment_dtype="param"``; with
    ``moment_bits=8`` uint8 codes plus ``exp_avg_absmax`` / ``exp_avg_sq_absmax``, with ``16``
    bfloat16, see :mod:`lowrank_kernels.optim.moments`; a subspace change zeroes codes and absmax).
    """

    min_rank = 0
    projections: Dict[str, ProjectionFn] = {
        "svd": svd_projection,
        "random": random_projection,
        "columns": columns_projection,
        "dct": dct_projection,
    }

    @shared_signature(eps=1e-8, weight_decay=0.01, scale=1.0)
    def __init__(self, params, *, density: Optional[float] = 0.25, projection: str = "svd", update: str = "signsgd",
                 inactive_lr_scale: float = 1.0, **options: Unpack[SharedOptions]):
        defaults = OptimizerConfig.from_arguments(locals()).defaults(
            density=density, projection=projection, update=update, inactive_lr_scale=inactive_lr_scale)
        super().__init__(params, defaults)

    @classmethod
    def register_projection(cls, name: str, fn: ProjectionFn) -> None:
        """Add a projection method ``name`` to this class and its subclasses.

        ``fn(optimizer, p, grad, state, group, step, rank, side)`` returns the
        orthonormal projector (right ``rank x n``, left ``m x rank``, any float
        dtype) or None when it fails (the previous subspace is then kept).
        """
        cls.projections = {**cls.projections, name: fn}

    # ------------------------------------------------------------------ groups
    def _is_lowrank(self, group):
        return group.get("rank") is not None or group.get("density") is not None

    def _group_rank(self, group, shape):
        if group.get("rank") is not None:
            return int(group["rank"])
        return int(round(float(group["density"]) * min(shape)))

    def _validate_lowrank_group(self, group, gi):
        density = group.get("density")
        if group.get("rank") is None:
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
                raise ValueError(self._err(gi, f"density must be a float in [0, 1], got {density!r}"))
        super()._validate_lowrank_group(group, gi)
        if group.get("projection") not in self.projections:
            raise ValueError(
                self._err(gi, f"projection must be one of {', '.join(map(repr, self.projections))}, "
                              f"got {group.get('projection')!r}")
            )
        if group.get("update") not in UPDATES:
            raise ValueError(self._err(gi, f"update must be 'signsgd' or 'sgd', got {group.get('update')!r}"))
        ils = group.get("inactive_lr_scale")
        if isinstance(ils, bool) or not isinstance(ils, (int, float)) or not ils >= 0.0:
            raise ValueError(self._err(gi, f"inactive_lr_scale must be a float >= 0, got {ils!r}"))

    # ------------------------------------------------------------------ state and subspace
    def _init_state(self, p, state, group):
        super()._init_state(p, state, group)
        m, n = p.shape
        r = self._group_rank(group, (m, n))
        if r > 0:
            shape = ops.lowrank_shape(m, n, r, self._side(state))
            moments.init(state, moments.format_of(group), shape, device=p.device, param_dtype=p.dtype)

    def _has_projector(self, state):
        return "subspace_step" in state

    def _placeholder_projector(self, p, grad, state, group, step):
        """Zeros of the projector's shape (``init_state``: nothing computed)."""
        m, n = p.shape
        r = self._group_rank(group, (m, n))
        shape = (r, n) if self._side(state) == "right" else (m, r)
        return torch.zeros(shape, dtype=p.dtype, device=p.device)

    def _refresh_cost(self, p, group):
        """``"svd"``: an SVD's work; ``"dct"`` on a plain gradient: the scoring's (the ranks of
        a data-parallel group share these refreshes). 0 for the seeded projections (cheaper to
        regenerate than to send), ``"dct"`` on an FSDP2 shard (already split over the shards)
        and projections added with :meth:`register_projection`."""
        m, n = p.shape
        if self._group_rank(group, (m, n)) <= 0:
            return 0
        if group["projection"] == "svd":
            return svd_cost(m, n)
        if group["projection"] == "dct" and not _dist.is_dtensor(p):
            return m * n * (n if resolve_side((m, n), group["proj_type"]) == "right" else m)
        return 0

    def _compute_projector(self, p, grad, state, group, step):
        r = self._group_rank(group, tuple(p.shape))
        fn = self.projections[group["projection"]]
        proj = fn(self, p, grad, state, group, step, r, self._side(state))
        return None if proj is None else proj.to(p.dtype).contiguous()

    def _refresh_projector(self, p, grad, state, group, step):
        if self._group_rank(group, tuple(p.shape)) > 0:
            proj = self._compute_projector(p, grad, state, group, step)
            if proj is None:
                return False
            assign_(state, "projector", proj)  # in place once it exists: a captured CUDA graph stays valid
            moments.zero(state)  # in place; 8-bit: codes and absmax
        assign_(state, "subspace_step", torch.tensor(0.0, dtype=torch.float32))
        return True

    # ------------------------------------------------------------------ step
    def _project_step(self, p, grad, state, group, step):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        side = self._side(state)
        decay = 1.0 - lr * group["weight_decay"]
        state["subspace_step"] += 1
        m, n = p.shape
        r = self._group_rank(group, (m, n))
        residual = grad
        if r > 0:
            proj = self._get_projector(p, state, group)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            low = project_fp32(grad, proj, side)  # R, needed for the residual as well
            # R is already projected: Adam's elementwise step on it (no identity-projector GEMM).
            n_lr = ops.adam_update_(low.to(moments.update_dtype(state, exp_avg.dtype)), exp_avg, exp_avg_sq,
                                    beta1=beta1, beta2=beta2, eps=group["eps"],
                                    **self._moment_kwargs(p, state, group, step))
            full_dim = n if side == "right" else m
            if r < full_dim:
                residual = grad.to(low.dtype, copy=True)
                ops.backproject_apply_(residual, low, proj, side=side, alpha=-1.0, decay=1.0)
            else:
                residual = None
            step_size = adam_step_size(lr, beta1, beta2, int(state["subspace_step"]))
            ops.backproject_apply_(p, n_lr, proj, side=side, alpha=-step_size * group["scale"], decay=decay)
            decay = 1.0
        if residual is not None:
            if decay != 1.0:
                p.mul_(decay)
            free = residual.sign() if group["update"] == "signsgd" else residual
            p.add_(free, alpha=-lr * group["inactive_lr_scale"])

    # ------------------------------------------------------------------ bucketed step
    def _bucket_key(self, p, state, group):
        """Float32 weights of this class's own step with a state-full part (rank > 0) share a
        bucket per (device, side, update rule, betas, eps, moment format); other dtypes,
        DTensors, rank 0 and subclasses that change the step stay per parameter."""
        if not self._own_fused_step(FrugalAdamW) or "projector" not in state:
            return None
        if p.dtype != torch.float32 or type(p) not in _PLAIN_TENSORS or p.grad.dtype != torch.float32:
            return None
        if state["projector"].dtype != torch.float32 or state["subspace_step"].dtype != torch.float32:
            return None
        beta1, beta2 = group["betas"]
        return ("frugal", p.device, self._side(state), group["update"] == "signsgd", state["exp_avg"].dtype, beta1,
                beta2, group["eps"], moments.bucket_part(state, moments.format_of(group)))

    def _bucket_step(self, key, entries, skip=None, coeffs=None):
        """One ``ops.foreach_frugal_update_`` call with what :meth:`_project_step` computes per
        parameter; the subspace step counts grow in one call (their host mirrors follow)."""
        _, _, side, signsgd, _, beta1, beta2, eps, _ = key
        counts = [st["subspace_step"] for _, st, _, _ in entries]
        ks = [self._host_int(c) + 1 for c in counts]
        increment_steps(counts)
        self._steps.remember_steps(counts, ks)
        ops.foreach_frugal_update_(
            [p for p, _, _, _ in entries], [p.grad for p, _, _, _ in entries],
            [st["projector"] for _, st, _, _ in entries], [st["exp_avg"] for _, st, _, _ in entries],
            [st["exp_avg_sq"] for _, st, _, _ in entries], side=side, signsgd=signsgd, beta1=beta1, beta2=beta2,
            eps=eps, alpha=[-adam_step_size(g["lr"], beta1, beta2, k) * g["scale"] for (_, _, g, _), k in zip(entries, ks)],
            decay=[1.0 - g["lr"] * g["weight_decay"] for _, _, g, _ in entries],
            free_alpha=[-g["lr"] * g["inactive_lr_scale"] for _, _, g, _ in entries],
            **self._foreach_moment_kwargs(entries),
        )
