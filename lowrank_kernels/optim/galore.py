"""GaLore-AdamW (Zhao et al. 2024): Adam in the span of the gradient's top singular vectors."""
from __future__ import annotations

from typing import Optional, Tuple, Unpack

import torch

from lowrank_kernels import ops

from . import distributed as _dist
from . import moments
from . import refresh as _refresh
from . import transport as _transport
from .refresh_share import svd_cost
from .base import LowRankOptimizer
from .common import PROJ_TYPES, adam_step_size, assign_, mix_seed, project_fp32
from .config import OptimizerConfig, SharedOptions, shared_signature

SVD_MODES = ("exact", "lowrank")
#: extra columns drawn by the randomized SVD beyond the rank, and its power iterations.
LOWRANK_OVERSAMPLE = 8
LOWRANK_NITER = 2


def randomized_svd(a: torch.Tensor, k: int, *, niter: int, generator: torch.Generator):
    """Halko-Martinsson-Tropp randomized SVD of ``a`` (the algorithm of ``torch.svd_lowrank``).

    Returns ``U (m x q), S (q), Vh (q x n)`` with ``q = min(k + oversample, m, n)``.
    Draws its test matrix from ``generator``, so a refresh is reproducible (a resumed
    run makes the same projector as an uninterrupted one).
    """
    m, n = a.shape
    q = min(k + LOWRANK_OVERSAMPLE, m, n)
    omega = torch.randn(n, q, generator=generator, device=a.device, dtype=a.dtype)
    y = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        z = torch.linalg.qr(a.T @ y).Q
        y = torch.linalg.qr(a @ z).Q
    ub, s, vh = torch.linalg.svd(y.T @ a, full_matrices=False)
    return y @ ub, s, vh


class GaLoreAdamW(LowRankOptimizer):
    r"""AdamW with GaLore gradient projection, a drop-in for ``galore_torch.GaLoreAdamW``.

    Param groups that set ``rank`` (galore-torch keys: ``rank``, ``update_proj_gap``,
    ``scale``, ``proj_type``) are projected; every other group is plain
    ``torch.optim.AdamW`` (bit-identical). Per projected ``m x n`` weight and step
    ``t`` (1-based):

    - at ``t = 1, T+1, 2T+1, ...`` (``T = update_proj_gap``) the projector is remade
      from the gradient: ``svd="exact"``: ``torch.linalg.svd`` in float32;
      ``svd="lowrank"``: a seeded randomized SVD (``torch.svd_lowrank``'s algorithm,
      reproducible). Right side: ``P = Vh[:r]`` (``r x n``); left: ``P = U[:, :r]``;
      ``full``: both. ``P`` is stored in the parameter's dtype (as galore-torch);
    - then one fused step through ``lowrank_kernels.ops.project_update_backproject_``:
      ``R = G P^T`` (or ``P^T G``), Adam moments on ``R`` (not reset at a refresh),
      ``N = M / (sqrt(V) + eps)`` and
      ``W <- (1 - lr wd) W - lr sqrt(1 - b2^t) / (1 - b1^t) * scale * back(N)``.

    Weight decay uses torch.optim.AdamW's order (decay the old weight first);
    galore-torch decays after the update, so the two agree only at ``weight_decay=0``,
    and its plain groups use a transformers-style AdamW (eps added before the bias
    correction). ``compat="galore-torch"`` reproduces galore-torch in every group
    (see :mod:`lowrank_kernels.optim.base`).

    Args:
        params: parameters or param groups (e.g. from :func:`lowrank_param_groups`).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (``eps`` defaults to 1e-6
            like galore-torch).
        rank: default rank of every group that does not set ``rank`` itself; None
            (default) leaves such groups plain AdamW. Must satisfy
            ``1 <= rank <= min(m, n)`` for each weight of a low-rank group.
        update_proj_gap, scale, proj_type: defaults for the low-rank groups
            (``proj_type`` in ``std``, ``reverse_std``, ``left``, ``right``, ``full``).
        svd: ``"exact"`` or ``"lowrank"``.
        refresh_sharing: ``"owner"`` (default): under DDP / FSDP2 each projector refresh is
            computed by one rank of the data-parallel group and broadcast (bitwise the same
            result); ``"replicate"``: every rank computes every refresh itself (see
            :mod:`lowrank_kernels.optim.refresh_share`). Also a group key, of every optimizer.
        skip_nonfinite: skip a parameter whose gradient is not finite (see
            :mod:`lowrank_kernels.optim.base`).
        foreach: passed to torch's AdamW for the plain groups; also a group key of the
            projected groups: None/True (default) steps the parameters that take the plain
            fused step (no refresh due) by bucket, one
            ``ops.foreach_project_update_backproject_`` call per (side, dtype) bucket;
            False forces one op call per parameter (bit-identical results either way).
        compat: None (default) or ``"galore-torch"``: reproduce
            ``galore_torch.GaLoreAdamW`` exactly (decay after the update, its AdamW
            for the plain groups). Also a group key.
        moment_dtype: ``"float32"`` (default: float32 moments, float64 for float64
            parameters) or ``"param"`` (moments in the parameter's dtype, as galore-torch;
            unsafe for bfloat16/float16, see :mod:`lowrank_kernels.optim.moments`).
        moment_bits, block_size, min_8bit_size: the moment format (also group keys): 32
            (default), 16 (bfloat16 with stochastic rounding, for any parameter dtype) or 8
            (uint8 codes + float32 absmax per ``block_size`` elements of a row, fused into the
            kernels; moments under ``min_8bit_size`` elements stay float32). See
            :mod:`lowrank_kernels.optim.moments`.
        moment_transport: False (default) or True: at a refresh that changes the projector,
            rotate the moments into the new subspace (LDAdam's projection-aware rule, see
            :mod:`lowrank_kernels.optim.transport`) instead of keeping them in the old
            coordinates. An unchanged projector leaves them untouched (bit-identical steps).
            Every moment format (8-bit: dequantize, transport, requantize). Also a group key.
        refresh: how a refresh picks the subspace (:mod:`lowrank_kernels.optim.refresh`):
            ``"svd"`` (default: the top ``r`` singular vectors), ``"sample"`` (SARA: ``r``
            singular vectors drawn without replacement with probability proportional to
            their singular values) or ``"random"`` (GoLore: refreshes at steps
            ``t > random_after`` draw a uniformly random orthonormal projector, no SVD;
            earlier ones take the SVD). Also a group key.
        random_after: the last step whose refresh takes the SVD with ``refresh="random"``
            (default 0: every refresh is random).
        refresh_seed: the seed of the sampled / random projectors, mixed with the step and
            the parameter's position (never the global RNG): every rank, a resumed run and
            two optimizers built alike draw the same projectors.
        capturable: False (default) or True: step counts on the parameter's device and a
            non-refresh step with no host synchronization, so it can be captured in a CUDA
            graph (see :mod:`lowrank_kernels.optim.capturable`
            and the README). Also a group key; ``lr`` may then be a 0-dim device tensor.

    State per projected parameter (tensors only): ``step`` (CPU float32),
    ``side`` (CPU int8: 0 right, 1 left, 2 full), ``projector`` (``r x n`` or
    ``m x r``; the left factor ``m x r`` for ``full``), ``projector_right``
    (``full`` only, ``r x n``), ``exp_avg`` and ``exp_avg_sq`` (``m x r``, ``r x n``
    or ``r x r``, float32 unless ``moment_dtype="param"``; uint8 codes plus float32
    ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` with ``moment_bits=8``, bfloat16 with ``16``).
    """

    proj_types = PROJ_TYPES
    compat_modes = ("galore-torch",)
    supports_capturable = True

    #: whether ``moment_transport=True`` is accepted (subclasses whose moments or projector
    #: the transport does not cover refuse it).
    supports_moment_transport = True

    @shared_signature(eps=1e-6, scale=0.25)
    def __init__(self, params, correct_bias: bool = True, no_deprecation_warning: bool = True, *, svd: str = "exact",
                 compat: Optional[str] = None, capturable: bool = False, moment_transport: bool = False,
                 refresh: str = "svd", random_after: int = 0, refresh_seed: int = 0,
                 **options: Unpack[SharedOptions]):
        if not correct_bias:
            raise NotImplementedError(f"{type(self).__name__}: correct_bias=False is not supported")
        defaults = OptimizerConfig.from_arguments(locals()).defaults(
            svd=svd, moment_transport=moment_transport, refresh=refresh, random_after=random_after,
            refresh_seed=refresh_seed)
        if capturable:  # only then, so subclasses that do not support it keep their defaults
            defaults["capturable"] = capturable
        if compat is not None:  # only then, so subclasses without a compat mode keep their defaults
            defaults["compat"] = compat
        super().__init__(params, defaults)

    def _validate_lowrank_group(self, group, gi):
        super()._validate_lowrank_group(group, gi)
        if group.get("svd") not in SVD_MODES:
            raise ValueError(self._err(gi, f"svd must be 'exact' or 'lowrank', got {group.get('svd')!r}"))
        _refresh.validate(group, lambda msg: self._err(gi, msg))
        mt = group.get("moment_transport", False)
        if not isinstance(mt, bool):
            raise TypeError(self._err(gi, f"moment_transport must be a bool, got {mt!r}"))
        if mt and not self.supports_moment_transport:
            raise ValueError(self._err(gi, f"moment_transport=True is not supported by {type(self).__name__}: "
                                           f"{self._no_transport_reason}"))

    #: why a subclass refuses ``moment_transport=True`` (shown in the error).
    _no_transport_reason = ""

    def _init_state(self, p, state, group):
        super()._init_state(p, state, group)
        shape = self._moment_shape(p, state, group)
        moments.init(state, moments.format_of(group), shape, device=p.device, param_dtype=p.dtype)

    # ------------------------------------------------------------------ projector
    def _svd(self, p, grad, group, step: int):
        grad = _dist.full_gradient(grad)  # FSDP2: all-gather of the gradient, at a refresh only
        g = grad.to(torch.float32) if grad.dtype != torch.float64 else grad
        r = self._group_rank(group, tuple(p.shape))
        try:
            if group["svd"] == "exact":
                return torch.linalg.svd(g, full_matrices=False)
            gen = torch.Generator(device=g.device)
            gen.manual_seed(mix_seed(self._param_seed(p), step))
            return randomized_svd(g, r, niter=LOWRANK_NITER, generator=gen)
        except torch.linalg.LinAlgError:  # no convergence; other errors (e.g. out of memory) propagate
            return None

    def _refresh_cost(self, p, group):
        """An SVD's work (``m n min(m, n)``; the randomized SVD: ``m n`` times its sketch
        width and passes): the ranks of a data-parallel group share these refreshes."""
        m, n = p.shape
        if group["svd"] == "exact":
            return svd_cost(m, n)
        q = min(self._group_rank(group, (m, n)) + LOWRANK_OVERSAMPLE, m, n)
        return svd_cost(m, n, q * (2 * LOWRANK_NITER + 2))

    def _placeholder_projector(self, p, grad, state, group, step):
        """Zeros of the projector's shapes (``init_state``: no SVD of the zero gradient)."""
        (m, n), r, side = p.shape, self._group_rank(group, tuple(p.shape)), self._side(state)
        left = torch.zeros(m, r, dtype=p.dtype, device=p.device)
        right = torch.zeros(r, n, dtype=p.dtype, device=p.device)
        return (left, right) if side == "full" else (right if side == "right" else left)

    def _select_factors(self, p, grad, group, step: int, side: str):
        """The new subspace in float32 (float64 for float64 gradients) by ``group["refresh"]``
        (:mod:`lowrank_kernels.optim.refresh`): ``(U_r, Vh_r)`` with the factor ``side`` does
        not use left as None, or None when the SVD failed.

        ``"svd"``: the top ``r`` singular vectors; ``"sample"``: ``r`` of them drawn with
        probability proportional to their singular values (SARA); ``"random"``: from step
        ``random_after + 1`` on, a random orthonormal projector (GoLore), before that the SVD.
        """
        r = self._group_rank(group, tuple(p.shape))
        if _refresh.is_random(group, step):
            acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
            proj = _refresh.random_projector(tuple(p.shape), r, side, group, step, self._param_seed(p),
                                             device=p.device, dtype=acc)
            if side == "full":
                return proj
            return (proj, None) if side == "left" else (None, proj)
        usv = self._svd(p, grad, group, step)
        if usv is None:
            return None
        u, s, vh = usv
        if group.get("refresh", "svd") == "sample":
            gen = _refresh.sampling_seed_generator(group, step, self._param_seed(p))
            idx = _refresh.sample_indices(s, r, gen).to(s.device)
            u_r, vh_r = u.index_select(1, idx), vh.index_select(0, idx)
        else:
            u_r, vh_r = u[:, :r], vh[:r]
        return (u_r if side != "right" else None), (vh_r if side != "left" else None)

    def _compute_projector(self, p, grad, state, group, step):
        """The new projector in the parameter's dtype, or None when the SVD failed.

        Right: ``Vh[:r]``; left: ``U[:, :r]``; full: the pair ``(U[:, :r], Vh[:r])`` (with
        ``refresh="sample"`` / ``"random"`` the sampled / random factors instead).
        """
        side = self._side(state)
        factors = self._select_factors(p, grad, group, step, side)
        if factors is None:
            return None
        u, vh = factors
        if side == "right":
            out = (vh,)
        elif side == "left":
            out = (u,)
        else:
            out = (u, vh)
        # One host sync, on refresh steps only.
        if not all(bool(torch.isfinite(t).all()) for t in out):
            return None
        out = tuple(t.to(p.dtype).contiguous() for t in out)
        return out if side == "full" else out[0]

    def _refresh_projector(self, p, grad, state, group, step):
        proj = self._compute_projector(p, grad, state, group, step)
        if proj is None:
            return False
        if group.get("moment_transport", False) and self._has_projector(state):
            self._transport_moments(p, state, group, proj)
        # In place once the state exists (same shape and dtype): a captured CUDA graph stays valid.
        if isinstance(proj, tuple):
            assign_(state, "projector", proj[0])
            assign_(state, "projector_right", proj[1])
        else:
            assign_(state, "projector", proj)
        return True

    def _transport_moments(self, p, state, group, proj) -> bool:
        """``moment_transport=True``: move the moments from the projector in use to ``proj``
        (the one about to be stored), in place (:mod:`lowrank_kernels.optim.transport`).
        Returns whether they moved (False for an unchanged projector)."""
        side = self._side(state)
        new = proj if isinstance(proj, tuple) else (proj,)
        old = (state["projector"], state["projector_right"]) if side == "full" else (state["projector"],)
        steps = self._host_int(state["step"])
        return _transport.transport_moments_(state, moments.format_of(group), old, new, side, group["betas"], steps)

    # ------------------------------------------------------------------ step
    def _project_step(self, p, grad, state, group, step):
        beta1, beta2 = group["betas"]
        side = self._side(state)
        if side == "full":
            self._full_step(p, grad, state, group, step)
            return
        ops.project_update_backproject_(
            p, grad, self._get_projector(p, state, group), state["exp_avg"], state["exp_avg_sq"],
            side=side, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], step=step,
            weight_decay=group["weight_decay"], scale=group["scale"] * self._post_decay(group),
            **self._moment_kwargs(p, state, group, step),
        )

    def _bucket_key(self, p, state, group):
        """Dense right/left projectors of this class's own step share a bucket per
        (device, side, dtypes, betas, eps, moment format); ``full`` and subclasses that change the step
        stay out of this bucket (Q-GaLore and GradNormLoRP key their own)."""
        if not self._own_fused_step(GaLoreAdamW):
            return None
        side = self._side(state)
        if side == "full":
            return None
        proj = state["projector"]
        if not isinstance(proj, torch.Tensor):
            return None
        beta1, beta2 = group["betas"]
        return ("dense", side, p.device, p.dtype, proj.dtype, state["exp_avg"].dtype, beta1, beta2, group["eps"],
                moments.bucket_part(state, moments.format_of(group)))

    def _bucket_step(self, key, entries, skip=None, coeffs=None):
        """One ``ops.foreach_project_update_backproject_`` call with the arguments
        :meth:`_project_step` passes per parameter (``skip`` / ``coeffs``: the capturable
        step's device flags and coefficients, which replace lr / weight decay / scale)."""
        _, side, _, _, _, _, beta1, beta2, eps, _ = key
        dev = coeffs is not None  # then lr, weight decay and scale are not read (a Tensor lr stays unread)
        ops.foreach_project_update_backproject_(
            [p for p, _, _, _ in entries], [p.grad for p, _, _, _ in entries],
            [st["projector"] for _, st, _, _ in entries], [st["exp_avg"] for _, st, _, _ in entries],
            [st["exp_avg_sq"] for _, st, _, _ in entries], side=side,
            lr=0.0 if dev else [g["lr"] for _, _, g, _ in entries], beta1=beta1, beta2=beta2, eps=eps,
            step=[t for _, _, _, t in entries],
            weight_decay=0.0 if dev else [g["weight_decay"] for _, _, g, _ in entries],
            scale=1.0 if dev else [g["scale"] * self._post_decay(g) for _, _, g, _ in entries],
            skip=skip, coeffs=coeffs, **self._foreach_moment_kwargs(entries),
        )

    def _full_step(self, p, grad, state, group, step):
        """``proj_type="full"``: ``R = U^T G Vh^T`` (``r x r``), ``back(N) = U N Vh``."""
        beta1, beta2 = group["betas"]
        u, vh = state["projector"], state["projector_right"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        left = project_fp32(grad, u, "left").to(moments.update_dtype(state, exp_avg.dtype))  # U^T G, r x n
        n = ops.project_adam_(left, vh, exp_avg, exp_avg_sq, side="right", beta1=beta1, beta2=beta2, eps=group["eps"],
                              **self._moment_kwargs(p, state, group, step))
        half = n.to(torch.float32) @ vh.to(torch.float32)  # N Vh, r x n
        step_size = adam_step_size(group["lr"], beta1, beta2, step)
        ops.backproject_apply_(
            p, half, u, side="left", alpha=-step_size * group["scale"] * self._post_decay(group),
            decay=1.0 - group["lr"] * group["weight_decay"],
        )
