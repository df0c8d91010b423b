"""DCT-AdamW (Modoranu et al. 2025): SVD-free low-rank AdamW on a shared DCT basis.

Per projected ``m x n`` weight the projector is ``r`` rows of the orthonormal DCT-II
basis of the projected side's size, chosen at each refresh by their alignment with
the gradient (``lowrank_kernels.ops.dct_score_topk``: one GEMM with a fused norm
reduction plus a sort, instead of an SVD). The basis is shared by every layer of
that size (``ops.dct_basis``, cached), so the optimizer state holds only the ``r``
int32 indices per layer, never a float projector.

(FRUGAL's ``projection="dct"`` lives in :mod:`lowrank_kernels.optim.frugal`.)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Unpack

import torch

from lowrank_kernels import ops

from lowrank_kernels.reference import moments as _moments

from . import distributed as _dist
from . import moments, refresh_share
from .base import LowRankOptimizer
from .common import assign_, resolve_side
from .config import OptimizerConfig, SharedOptions, shared_signature
from .frugal import dct_projection  # noqa: F401  (its former home)
from .moments import ABSMAX_KEYS

MOMENT_REFRESH = ("keep", "reindex", "reset")
NORMS = (1, 2)


def reindex_moments_(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, old_idx: torch.Tensor, new_idx: torch.Tensor, side: str, size: int
) -> None:
    """Carry the moments over to a new index set, in place (no host synchronization).

    The basis is shared and orthonormal, so rotating the moments from the subspace of
    ``old_idx`` to that of ``new_idx`` is a re-indexing: the moment row (left) or
    column (right) of a basis vector that stays selected moves to its new position,
    and newly selected vectors start at zero.
    """
    r = new_idx.shape[0]
    dev = new_idx.device
    pos = torch.full((size,), -1, dtype=torch.long, device=dev)
    pos[old_idx.long()] = torch.arange(old_idx.shape[0], device=dev)
    src = pos[new_idx.long()]  # position in the old moments, or -1
    keep = src >= 0
    src = src.clamp(min=0)
    dim = 1 if side == "right" else 0
    shape = (1, r) if side == "right" else (r, 1)
    keep = keep.view(shape)
    for t in (exp_avg, exp_avg_sq):
        t = _dist.local(t)  # FSDP2: the re-indexed dim is never the sharded one (rows of m)
        moved = t.index_select(dim, src)
        t.copy_(torch.where(keep, moved, torch.zeros((), dtype=t.dtype, device=t.device)))


def reindex_moments8_(
    state, old_idx: torch.Tensor, new_idx: torch.Tensor, side: str, size: int, block_size: int
) -> None:
    """:func:`reindex_moments_` for 8-bit moments (``state``'s uint8 ``exp_avg`` /
    ``exp_avg_sq`` and their float32 ``exp_avg_absmax`` / ``exp_avg_sq_absmax``), in place.

    Left side (moments ``r x n``, one row per basis vector): whole rows move with their
    absmax (blocks lie inside rows), exactly, and new rows get code 0 with absmax 0 (zero).
    Right side (``m x r``, a column per basis vector, blocks along the columns): the
    moments are dequantized, re-indexed and requantized (new block maxima), one
    ``m x r`` float32 temporary at a refresh only.
    """
    if side == "left":
        reindex_moments_(state["exp_avg"], state["exp_avg_sq"], old_idx, new_idx, side, size)
        reindex_moments_(state["exp_avg_absmax"], state["exp_avg_sq_absmax"], old_idx, new_idx, side, size)
        return
    vals = {}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = _dist.local(state[key]), _dist.local(state[ABSMAX_KEYS[key]])
        vals[key] = _moments.moments_dequantize_ref(codes, absmax, signed=signed, block_size=block_size)
    reindex_moments_(vals["exp_avg"], vals["exp_avg_sq"], old_idx, new_idx, side, size)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = _moments.moments_quantize_ref(vals[key], signed=signed, block_size=block_size)
        _dist.local(state[key]).copy_(codes)
        _dist.local(state[ABSMAX_KEYS[key]]).copy_(absmax)


class DCTAdamW(LowRankOptimizer):
    r"""AdamW in a subspace spanned by DCT basis vectors chosen from the gradient (no SVD).

    Same param-group keys as :class:`~lowrank_kernels.optim.GaLoreAdamW` (``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``), so a galore-torch script ports by
    changing the class. Per projected ``m x n`` weight and step ``t`` (1-based), with
    ``side`` fixed once from ``proj_type`` (``std``: right when ``m >= n``) and ``C``
    the orthonormal DCT-II basis of order ``s`` (``n`` right, ``m`` left):

    - at ``t = 1, T+1, 2T+1, ...`` (``T = update_proj_gap``; ``T = 1`` refreshes every
      step, the paper's default) the ``r`` basis vectors best aligned with the gradient
      are selected: ``idx = topk(||G C^T||_p column norms)`` (right) or row norms of
      ``C G`` (left), ``p = norm`` (1 or 2), ties to the lower index; the projector is
      ``P = C[idx]`` (right) or ``C[idx]^T`` (left). At a refresh the moments are
      ``moment_refresh="keep"``: left as they are (GaLore's rule, the default),
      ``"reindex"``: carried over to the new subspace (a re-indexing, see
      :func:`reindex_moments_`), ``"reset"``: zeroed (FRUGAL's rule);
    - then one fused step through ``lowrank_kernels.ops.project_update_backproject_``
      with the :class:`~lowrank_kernels.ops.DCTProjector`: ``R = G P^T`` (``P^T G``),
      Adam moments on ``R``, ``N = M / (sqrt(V) + eps)`` and
      ``W <- (1 - lr wd) W - lr sqrt(1 - b2^t) / (1 - b1^t) * scale * back(N)``; the
      kernels gather the selected basis rows themselves.

    A low-rank group takes 2-D weights with ``rank <= min(m, n)`` (anything else is a
    ``ValueError``, as in GaLoreAdamW); its weights with a dimension ``>= max_dim``
    (embeddings, lm_head; ``max_dim=None`` projects them too) get plain AdamW (torch's
    kernels, same state layout). Groups without ``rank`` are plain AdamW.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (``eps`` 1e-6 like
            GaLoreAdamW); weight decay in torch's order (decay the old weight first).
        rank: default rank of every group that does not set ``rank``; None leaves
            such groups plain AdamW.
        update_proj_gap: steps between refreshes (200 as GaLore; 1 = every step).
        scale: multiplier of the projected update (0.25 as GaLoreAdamW).
        proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.
        norm: 1 or 2, the norm of the alignment scores.
        moment_refresh: ``"keep"``, ``"reindex"`` or ``"reset"`` (see above).
        max_dim: parameters with a dimension at least this large are plain AdamW.
        skip_nonfinite, foreach, moment_dtype: as GaLoreAdamW (float32 moments by default;
            non-refresh steps by bucket unless ``foreach=False``).
        moment_bits, block_size, min_8bit_size: the moment format, 32 | 16 | 8 (see
            :mod:`lowrank_kernels.optim.moments`); ``moment_refresh="reindex"`` carries 8-bit
            moments over through :func:`reindex_moments8_`, ``"reset"`` zeroes codes and absmax.
        capturable: as GaLoreAdamW (a non-refresh step with no host synchronization).
        moment_transport: False (default) or True: projection-aware moments (LDAdam's rule,
            :mod:`lowrank_kernels.optim.transport`), which for the DCT's 0/1 change of basis is
            exactly ``moment_refresh="reindex"``: the moments of basis vectors that stay
            selected move to their new positions, new ones start at zero (an unchanged index
            set leaves the step bit-identical). Refused with ``moment_refresh="reset"``.

    State per projected parameter (tensors only): ``step`` (CPU float32), ``side``
    (CPU int8: 0 right, 1 left), ``indices`` (int32, length ``rank``, on the
    parameter's device), ``exp_avg`` and ``exp_avg_sq`` (``m x r`` or ``r x n``,
    float32 unless ``moment_dtype="param"``; uint8 plus ``exp_avg_absmax`` / ``exp_avg_sq_absmax``
    with ``moment_bits=8``, bfloat16 with ``16``). No float projector: the basis is shared through
    ``ops.dct_basis`` and rebuilt (cached) after loading a state dict.
    """

    proj_types = ("std", "reverse_std", "left", "right")
    supports_capturable = True

    @shared_signature(eps=1e-6, scale=0.25)
    def __init__(self, params, *, norm: int = 1, moment_refresh: str = "keep", max_dim: Optional[int] = 32000,
                 capturable: bool = False, moment_transport: bool = False, **options: Unpack[SharedOptions]):
        defaults = OptimizerConfig.from_arguments(locals()).defaults(
            norm=norm, moment_refresh=moment_refresh, max_dim=max_dim, moment_transport=moment_transport)
        if capturable:
            defaults["capturable"] = capturable
        self._pending_plain: Dict[int, Tuple[dict, List[torch.Tensor]]] = {}
        self._reset_refresh_batch()
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ which params are projected
    def _projected(self, p: torch.Tensor, group) -> bool:
        if p.dim() != 2:
            return False
        max_dim = group.get("max_dim")
        if max_dim is not None and max(p.shape) >= max_dim:
            return False
        return min(p.shape) >= self._group_rank(group, tuple(p.shape))

    def _validate_lowrank_group(self, group, gi):
        norm = group.get("norm")
        if type(norm) is not int or norm not in NORMS:
            raise ValueError(self._err(gi, f"norm must be 1 or 2, got {norm!r}"))
        if group.get("moment_refresh") not in MOMENT_REFRESH:
            raise ValueError(
                self._err(gi, f"moment_refresh must be one of {', '.join(map(repr, MOMENT_REFRESH))}, "
                              f"got {group.get('moment_refresh')!r}")
            )
        mt = group.get("moment_transport", False)
        if not isinstance(mt, bool):
            raise TypeError(self._err(gi, f"moment_transport must be a bool, got {mt!r}"))
        if mt and group.get("moment_refresh") == "reset":
            raise ValueError(self._err(gi, "moment_transport=True carries the moments over at a refresh, "
                                           "moment_refresh='reset' zeroes them: choose one"))
        max_dim = group.get("max_dim")
        if max_dim is not None and (type(max_dim) is not int or max_dim < 1):
            raise ValueError(self._err(gi, f"max_dim must be a positive int or None, got {max_dim!r}"))
        rank = group.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < self.min_rank:
            raise ValueError(self._err(gi, f"rank must be an int >= {self.min_rank}, got {rank!r}"))
        # The base checks every parameter but those max_dim leaves plain (2-D weights only, rank <= min(m, n):
        # refused as GaLore and APOLLO do, never a quiet fallback to AdamW).
        super()._validate_lowrank_group(group, gi)

    def _plain_in_lowrank_group(self, p: torch.Tensor, group) -> bool:
        """A 2-D weight with a dimension >= ``max_dim``: plain AdamW (embeddings, lm_head)."""
        max_dim = group.get("max_dim")
        return p.dim() == 2 and max_dim is not None and max(p.shape) >= max_dim

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (see the class docstring). ``closure`` re-evaluates the loss."""
        self._pending_plain = {}
        self._reset_refresh_batch()
        try:
            loss = super().step(closure)
        finally:
            self._reset_refresh_batch()
        # Non-projected parameters of low-rank groups: one AdamW call per group.
        pending, self._pending_plain = self._pending_plain, {}
        for group, params in pending.values():
            self._plain_step(group, params)
        return loss

    def _lowrank_step(self, p, grad, state, group):
        if not self._projected(p, group):
            self._pending_plain.setdefault(id(group), (group, []))[1].append(p)
            return
        self._stepped.add(p)  # taken (or being taken) this step: no longer part of a batched refresh
        super()._lowrank_step(p, grad, state, group)

    def _init_state(self, p, state, group):
        super()._init_state(p, state, group)
        m, n = p.shape
        r = self._group_rank(group, (m, n))
        shape = ops.lowrank_shape(m, n, r, self._side(state))
        moments.init(state, moments.format_of(group), shape, device=p.device, param_dtype=p.dtype)

    def _has_projector(self, state):
        return "indices" in state

    def _basis(self, p, state) -> torch.Tensor:
        m, n = p.shape
        size = n if self._side(state) == "right" else m
        return ops.dct_basis(size, p.dtype, p.device)

    def _placeholder_projector(self, p, grad, state, group, step):
        """The first ``rank`` indices (``init_state``: no scoring)."""
        r = self._group_rank(group, tuple(p.shape))
        return torch.arange(r, dtype=torch.int32, device=p.device)

    def _refresh_cost(self, p, group):
        """The scoring's work (``m n`` times the scored dimension) for a plain gradient (DDP:
        the ranks share these refreshes); 0 for a DTensor (FSDP2 already splits the scoring
        over the shards) and for weights left plain."""
        if not self._projected(p, group) or _dist.is_dtensor(p):
            return 0
        m, n = p.shape
        return m * n * (n if resolve_side((m, n), group["proj_type"]) == "right" else m)

    def _compute_projector(self, p, grad, state, group, step):
        """The new int32 indices (``dct_score_topk``; it has no failure mode).

        Batched refresh: the first refresh of a step scores every parameter due for a
        refresh in this step at once, one ``ops.foreach_dct_score_topk`` call per bucket of
        same-shape gradients (:meth:`_refresh_batch`); each parameter then takes its own
        row, bitwise what the per-parameter call below would return. ``foreach=False`` in
        a group keeps its refreshes per parameter.
        """
        if self._batched is None and self._refresh_batching(p, group):
            self._batched = self._refresh_batch(p)
        hit = self._batched.pop(p, None) if self._batched else None
        if hit is not None and hit[0] is grad:
            return hit[1]
        r = self._group_rank(group, tuple(p.shape))
        return ops.dct_score_topk(grad, r, side=self._side(state), norm=group["norm"])

    # ------------------------------------------------------------------ batched refresh
    def _reset_refresh_batch(self) -> None:
        #: param -> (the gradient it was scored from, its new indices), filled at the first
        #: refresh of a step; None until then. Cleared when the step ends.
        self._batched: Optional[Dict[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None
        #: parameters whose low-rank step was taken (or begun) in this step.
        self._stepped = set()

    def _refresh_batching(self, p, group) -> bool:
        """Whether ``p``'s refresh may be scored with its bucket: the group steps by bucket
        (``foreach`` not False) and this class's refresh path is DCTAdamW's own."""
        t = type(self)
        if refresh_share.computing(self):  # the shared refreshes are computed one by one, on their owners
            return False
        return (self._bucketing(group) and t._compute_projector is DCTAdamW._compute_projector
                and t._should_refresh is DCTAdamW._should_refresh and t._lowrank_step is DCTAdamW._lowrank_step)

    def _refresh_key(self, q, group):
        """``(bucket key, rank)`` of a parameter due for a refresh in this step, else None.

        The key groups what one ``foreach_dct_score_topk`` call can score: one side, shape,
        gradient dtype and device, rank and norm (hence one basis). DTensor gradients
        (FSDP2) bucket only when row-sharded (their scores are all-reduced per parameter,
        as in the per-parameter path); other DTensor layouts stay per parameter."""
        grad = q.grad
        if grad is None or grad.is_sparse or not self._projected(q, group) or not self._refresh_batching(q, group):
            return None
        sharded = _dist.is_row_sharded(grad)
        if _dist.is_dtensor(grad) and not sharded:
            return None
        state = self.state.get(q)
        if state:
            side, step = self._side(state), self._host_int(state["step"]) + 1  # its host mirror: no device read
        else:  # a fresh parameter: its first step makes its first projector
            side, step, state = resolve_side(tuple(q.shape), group["proj_type"]), 1, {}
        if not self._should_refresh(q, state, group, step):
            return None
        rank = self._group_rank(group, tuple(q.shape))
        return (side, tuple(q.shape), grad.dtype, grad.device, rank, group["norm"], sharded), rank

    def _refresh_batch(self, first) -> Dict[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Score every parameter due for a refresh in this step whose low-rank step is still
        to come (``first``, the one asking, included): one ``ops.foreach_dct_score_topk``
        per bucket (:meth:`_refresh_key`). Parameters whose gradient later proves
        non-finite are scored too and their rows dropped (their step is skipped)."""
        buckets: Dict[tuple, List[torch.Tensor]] = {}
        for group in self.param_groups:
            if not self._is_lowrank(group):
                continue
            for q in group["params"]:
                if (q in self._stepped and q is not first) or refresh_share.has_result(self, q):
                    continue
                found = self._refresh_key(q, group)
                if found is not None:
                    buckets.setdefault(found[0], []).append(q)
        out: Dict[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = {}
        for (side, _, _, _, rank, norm, sharded), qs in buckets.items():
            grads = [q.grad for q in qs]
            if sharded:
                _dist.install_op_handlers()
            idx = ops.foreach_dct_score_topk(grads, rank, side=side, norm=norm)
            for q, g, row in zip(qs, grads, idx.unbind(0)):
                out[q] = (g, row.clone())  # its own storage, as a per-parameter refresh's indices
        return out

    def _refresh_projector(self, p, grad, state, group, step):
        idx = self._compute_projector(p, grad, state, group, step)
        if idx is None:
            return False
        # moment_transport: LDAdam's projection-aware rule, which for a 0/1 selection is exactly
        # the re-indexing (see lowrank_kernels.optim.transport).
        mode = "reindex" if group.get("moment_transport", False) else group["moment_refresh"]
        if "indices" in state and mode == "reindex":
            side = self._side(state)
            size = p.shape[1] if side == "right" else p.shape[0]
            if state["exp_avg"].dtype == torch.uint8:
                reindex_moments8_(state, state["indices"], idx, side, size, int(group["block_size"]))
            else:
                reindex_moments_(state["exp_avg"], state["exp_avg_sq"], state["indices"], idx, side, size)
        elif mode == "reset":
            moments.zero(state)
        assign_(state, "indices", idx)  # in place once it exists: a captured CUDA graph stays valid
        return True

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict):
        """Load a state saved by :meth:`state_dict`, after checking every stored index set.

        The kernels gather ``basis[indices]`` and, on a GPU, do not range-check what they
        load, so a corrupted or mismatched checkpoint must fail here. Per projected
        parameter the saved ``indices`` must be an int32 vector of length ``rank`` (the
        parameter's group rank), every value in ``[0, s)`` with ``s`` the basis order of
        the saved side (``n`` right, ``m`` left), with no value repeated (the projector's
        rows must be distinct orthonormal basis vectors). The saved ``side`` must be 0
        (right) or 1 (left). On a failure a ``ValueError`` / ``TypeError`` names the
        parameter (group, position and shape) and the problem, and nothing is loaded.
        """
        self._check_saved_state(state_dict)
        self._check_saved_indices(state_dict)
        super().load_state_dict(state_dict)

    def _check_saved_indices(self, state_dict) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            return  # torch's load_state_dict reports a malformed state dict
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            return  # torch's load_state_dict reports the mismatch
        if any(len(sg["params"]) != len(g["params"]) for sg, g in zip(saved_groups, self.param_groups)):
            return
        for gi, (sg, group) in enumerate(zip(saved_groups, self.param_groups)):
            for pi, (saved_id, p) in enumerate(zip(sg["params"], group["params"])):
                st = saved_state.get(saved_id)
                if not st or "indices" not in st:
                    continue
                where = f"{name}.load_state_dict: param group {gi}, parameter {pi} (shape {tuple(p.shape)})"
                if not self._is_lowrank(group) or not self._projected(p, group):
                    raise ValueError(f"{where}: the saved state has DCT indices but this parameter is not projected")
                side_t = st.get("side")
                if not isinstance(side_t, torch.Tensor) or side_t.numel() != 1 or int(side_t) not in (0, 1):
                    raise ValueError(
                        f"{where}: the saved side must be a one-element tensor holding 0 (right) or 1 (left), "
                        f"got {side_t!r}"
                    )
                side = "right" if int(side_t) == 0 else "left"
                size = p.shape[1] if side == "right" else p.shape[0]
                rank = self._group_rank(group, tuple(p.shape))
                idx = st["indices"]
                if not isinstance(idx, torch.Tensor):
                    raise TypeError(f"{where}: saved indices must be a Tensor, got {type(idx).__name__}")
                if idx.dtype != torch.int32:
                    raise TypeError(f"{where}: saved indices must be int32, got {idx.dtype}")
                if tuple(idx.shape) != (rank,):
                    raise ValueError(
                        f"{where}: saved indices must have shape ({rank},) (the group's rank), got {tuple(idx.shape)}"
                    )
                host = idx.detach().to("cpu", torch.int64)  # at load time only
                lo, hi = int(host.min()), int(host.max())
                if lo < 0 or hi >= size:
                    raise ValueError(
                        f"{where}: saved indices must lie in [0, {size}) (the DCT basis order of the {side} side), "
                        f"got values in [{lo}, {hi}]"
                    )
                if host.unique().numel() != rank:
                    raise ValueError(f"{where}: saved indices must be distinct basis vectors, got repeated values")

    def _get_projector(self, p, state, group):
        return ops.DCTProjector(self._basis(p, state), state["indices"])

    def _bucket_key(self, p, state, group):
        """Projected parameters of this class's own step share a bucket per (device, side,
        dtypes, betas, eps); one ``DCTProjector`` kind, so one op call per bucket."""
        if not self._projected(p, group) or not self._own_fused_step(DCTAdamW):
            return None
        beta1, beta2 = group["betas"]
        return ("dct", self._side(state), p.device, p.dtype, state["exp_avg"].dtype, beta1, beta2, group["eps"],
                moments.bucket_part(state, moments.format_of(group)))

    def _bucket_step(self, key, entries, skip=None, coeffs=None):
        """One ``ops.foreach_project_update_backproject_`` call with the arguments
        :meth:`_project_step` passes per parameter (``skip`` / ``coeffs``: the capturable
        step's device flags and coefficients, which replace lr / weight decay / scale)."""
        _, side, _, _, _, beta1, beta2, eps, _ = key
        dev = coeffs is not None
        ops.foreach_project_update_backproject_(
            [p for p, _, _, _ in entries], [p.grad for p, _, _, _ in entries],
            [self._get_projector(p, st, g) for p, st, g, _ in entries], [st["exp_avg"] for _, st, _, _ in entries],
            [st["exp_avg_sq"] for _, st, _, _ in entries], side=side,
            lr=0.0 if dev else [g["lr"] for _, _, g, _ in entries], beta1=beta1, beta2=beta2, eps=eps,
            step=[t for _, _, _, t in entries], weight_decay=0.0 if dev else [g["weight_decay"] for _, _, g, _ in entries],
            scale=1.0 if dev else [g["scale"] for _, _, g, _ in entries], skip=skip, coeffs=coeffs,
            **self._foreach_moment_kwargs(entries),
        )

    def _capturable_plain(self, p, group):
        return not self._projected(p, group)

    def _project_step(self, p, grad, state, group, step):
        beta1, beta2 = group["betas"]
        ops.project_update_backproject_(
            p, grad, self._get_projector(p, state, group), state["exp_avg"], state["exp_avg_sq"],
            side=self._side(state), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], step=step,
            weight_decay=group["weight_decay"], scale=group["scale"],
            **self._moment_kwargs(p, state, group, step),
        )
