"""Trion (IST-DASLab, ICLR 2026): low-rank Muon on the DCT basis.

Per projected ``m x n`` weight a full-size momentum buffer ``M`` accumulates the gradient;
each step picks the ``r`` DCT basis vectors best aligned with ``M`` (L1 scores, the DCT
family's scoring and top-k), takes the selected slice ``m`` of ``M`` in that basis, decays
only that part of the momentum (``M -= (1 - mu) back(m)``), orthogonalizes the small ``m`` by
Newton-Schulz (the orth family) and applies ``back(orth(m))`` to the weight. Every step
re-selects the basis vectors: there is no projector refresh schedule. AdamW serves the
parameters of the plain groups (the library's plain path).
"""
from __future__ import annotations

import math
import threading
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union, Unpack

import torch
import torch.distributed as dist

from lowrank_kernels import ops
from lowrank_kernels.ops import orth as _orth

from . import distributed as _dist
from . import moments, report
from ._stepcache import finite_flags
from .base import LowRankOptimizer
from .config import OptimizerConfig, SharedOptions, _is_real, shared_signature

#: the update scalings of the original, ``f(m, n)`` for an ``m x n`` weight.
SCALING_TYPES = ("kj", "none", "kimi", "dion")
#: the L1 norm of the alignment scores (the original's).
SCORE_NORM = 1

_BASIS_T: Dict[Tuple[int, torch.dtype, str], torch.Tensor] = {}
_BASIS_T_LOCK = threading.Lock()


def update_scaling(scaling_type: str, m: int, n: int) -> float:
    """The factor of the orthogonalized update of an ``m x n`` weight: ``kj``
    ``sqrt(max(1, m / n))`` (Keller Jordan's Muon), ``none`` 1, ``kimi`` ``0.2 sqrt(max(m, n))``
    (Moonshot's RMS matching), ``dion`` ``sqrt(m / n)``."""
    if scaling_type == "kj":
        return max(1.0, m / n) ** 0.5
    if scaling_type == "none":
        return 1.0
    if scaling_type == "kimi":
        return 0.2 * math.sqrt(max(m, n))
    if scaling_type == "dion":
        return (m / n) ** 0.5
    raise ValueError(f"Trion: scaling_type must be one of {', '.join(map(repr, SCALING_TYPES))}, got {scaling_type!r}")


def trion_basis(size: int, side: str, dtype: torch.dtype, device) -> torch.Tensor:
    """The basis Trion selects from, as the ``basis`` argument of the DCT ops (rows are the
    basis vectors): the orthonormal DCT-II matrix ``C`` (:func:`lowrank_kernels.ops.dct_basis`)
    on the left, its transpose on the right (cached, contiguous).

    The original scores ``M C`` on the right (``C``'s columns, the DCT-III vectors) and
    ``C M`` on the left (``C``'s rows), so the right side takes ``C^T``."""
    basis = ops.dct_basis(size, dtype, device)
    if side == "left":
        return basis
    key = (size, dtype, str(basis.device))
    hit = _BASIS_T.get(key)
    if hit is None:
        with _BASIS_T_LOCK:
            hit = _BASIS_T.get(key)
            if hit is None:
                hit = _BASIS_T[key] = basis.t().contiguous()
    return hit


class Trion(LowRankOptimizer):
    r"""Low-rank Muon on the DCT basis (Trion, IST-DASLab, ICLR 2026).

    Per projected ``m x n`` weight ``W`` with gradient ``G`` and momentum buffer ``M``, every
    step (``side`` fixed once from ``proj_type``; ``std``: right when ``m >= n``; ``B`` the
    basis of :func:`trion_basis`):

    1. ``M <- M + G``;
    2. ``idx = topk_r(L1 scores of M in B)`` (:func:`lowrank_kernels.ops.dct_score_topk`),
       ``P = B[idx]`` (right) or ``B[idx]^T`` (left);
    3. ``m = M P^T`` (right, ``m x r``) or ``P^T M`` (left, ``r x n``);
    4. ``M <- M - (1 - momentum) back(m)`` (only the selected part of the momentum decays);
    5. ``O = newton_schulz(m)`` (:func:`lowrank_kernels.ops.newton_schulz`, float32);
    6. ``W <- (1 - lr wd) W - lr * s * back(O)`` with ``s`` from ``scaling_type``
       (:func:`update_scaling`).

    ``back(N) = N P`` (right) or ``P N`` (left); the kernels gather the selected basis rows, no
    dense projector exists. Groups without ``rank`` are plain AdamW (torch's kernels; the
    original's AdamW for non-matrix parameters, with eps after the bias correction as
    torch): put embeddings, the output head, norms and biases there
    (:func:`~lowrank_kernels.optim.lowrank_param_groups`). Such a group that does not set
    ``lr`` takes ``adamw_lr``.

    Non-refresh steps by bucket: there is no projector to keep, so after a parameter's first
    step every step goes by bucket (same side, basis size, dtypes, rank and Newton-Schulz
    coefficients): the whole step of a bucket (steps 1-6) is one
    :func:`~lowrank_kernels.ops.foreach_trion_update_` call. Bit-identical to ``foreach=False`` (the same op on a
    one-entry list per parameter).

    Args:
        params: parameters or param groups.
        lr: learning rate of the low-rank groups (0.02, the original's Muon default).
        betas, eps, weight_decay: ``betas`` and ``eps`` of the plain AdamW groups
            ((0.9, 0.95) and 1e-10, the original's); ``weight_decay`` of every group
            (decoupled, decay first).
        rank: rank of every group that does not set ``rank``; None leaves such groups plain.
        momentum: ``mu`` in [0, 1) (0.95).
        scaling_type: ``"kj"``, ``"none"``, ``"kimi"`` or ``"dion"`` (see :func:`update_scaling`).
        ns_coefficients: ``"dion"`` (the original's Triton Newton-Schulz, five per-step
            triples), ``"muon"`` (its ``ns_type="torch"``: 5 x ``(3.4445, -4.7750, 2.0315)``)
            or a sequence of ``(a, b, c)`` triples.
        adamw_lr: ``lr`` of the plain groups that do not set one (3e-4, the original's).
        proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.
        skip_nonfinite, foreach: as GaLoreAdamW.
        (A group's ``update_proj_gap`` or ``scale``, e.g. from
        :func:`~lowrank_kernels.optim.lowrank_param_groups`, has no effect here: a value other
        than 1 warns.)
        moment_dtype: the momentum buffer's dtype: ``"float32"`` (default) or ``"param"``
            (the original's, the parameter's dtype); also the plain groups' moments.
        moment_bits, block_size, min_8bit_size: the plain groups' AdamW moment format; a
            low-rank group takes ``moment_bits=32`` only (the momentum buffer is not an Adam
            moment).
        shard_work: with ``torch.distributed`` initialized (more than one rank) and replicated
            weights and gradients (DDP), compute each matrix's update on one rank only (its
            owner: the parameter's position modulo the world size) and broadcast the
            ``r``-sized update and its indices to the others, as the original's distributed
            form; each rank then keeps the momentum buffers of the matrices it owns only. The
            weights equal the unsharded step's bitwise. Without a process group (or with one
            rank) it changes nothing.

    State per projected parameter: ``step`` (CPU float32), ``side`` (CPU int8) and
    ``momentum_buffer`` (``m x n``). The orthogonalized update is ``r``-sized and the basis
    shared (``ops.dct_basis``), so nothing else is kept. Not supported: ``capturable``,
    FSDP2 (DTensor) parameters, ``compat``.
    """

    proj_types = ("std", "reverse_std", "left", "right")
    supports_capturable = False

    @shared_signature(absent=("update_proj_gap", "scale"), lr=0.02, betas=(0.9, 0.95), eps=1e-10)
    def __init__(self, params, *, momentum: float = 0.95, scaling_type: str = "kj",
                 ns_coefficients: Union[str, Sequence[Sequence[float]]] = "dion", adamw_lr: float = 3e-4,
                 shard_work: bool = False, **options: Unpack[SharedOptions]):
        if not isinstance(shard_work, bool):
            raise TypeError(f"Trion: shard_work must be a bool, got {shard_work!r}")
        defaults = OptimizerConfig.from_arguments(locals(), update_proj_gap=1, scale=1.0).defaults(
            momentum=momentum, scaling_type=scaling_type, ns_coefficients=ns_coefficients, adamw_lr=adamw_lr)
        self._ns_flat: Dict[int, Tuple[object, tuple]] = {}
        self._ns_list: Dict[tuple, list] = {}
        #: compute each matrix's update on one rank and broadcast it (see :meth:`step`).
        self.shard_work = shard_work
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group):
        """As :meth:`LowRankOptimizer.add_param_group`; a plain group (``rank`` None) that does
        not set ``lr`` takes ``adamw_lr``."""
        if isinstance(param_group, dict) and "lr" not in param_group:
            rank = param_group.get("rank", self.defaults.get("rank"))
            if rank is None:
                adamw_lr = param_group.get("adamw_lr", self.defaults.get("adamw_lr"))
                if not _is_real(adamw_lr) or not adamw_lr >= 0.0:
                    raise ValueError(f"{type(self).__name__}: param group {len(self.param_groups)}: adamw_lr must "
                                     f"be a float >= 0, got {adamw_lr!r}")
                param_group = dict(param_group, lr=adamw_lr)
        super().add_param_group(param_group)

    def _validate_lowrank_group(self, group, gi):
        mu = group.get("momentum")
        if not _is_real(mu) or not 0.0 <= mu < 1.0:
            raise ValueError(self._err(gi, f"momentum must be a float in [0, 1), got {mu!r}"))
        if group.get("scaling_type") not in SCALING_TYPES:
            raise ValueError(self._err(gi, f"scaling_type must be one of {', '.join(map(repr, SCALING_TYPES))}, "
                                           f"got {group.get('scaling_type')!r}"))
        _, problem = _orth.coefficients_problem(group.get("ns_coefficients"), "ns_coefficients")
        if problem is not None:
            raise problem[0](self._err(gi, problem[1]))
        if group.get("moment_bits", 32) != 32:
            raise ValueError(self._err(gi, f"moment_bits must be 32 in a low-rank group (the momentum buffer is "
                                           f"float32 or the parameter's dtype, see moment_dtype), got "
                                           f"{group.get('moment_bits')!r}"))
        super()._validate_lowrank_group(group, gi)
        for key, inert in (("update_proj_gap", 1), ("scale", 1.0)):
            if group.get(key, inert) != inert:
                warnings.warn(self._err(gi, f"{key}={group[key]!r} has no effect: Trion re-selects the basis "
                                            "vectors every step and scales its update by scaling_type"),
                              UserWarning, stacklevel=4)
        for pi, p in enumerate(group["params"]):
            if _dist.is_dtensor(p):
                raise ValueError(self._err(
                    gi, f"parameter {pi} is a DTensor: {type(self).__name__} does not support FSDP2-sharded "
                        "parameters yet"))

    # ------------------------------------------------------------------ hooks
    def _init_state(self, p, state, group):
        super()._init_state(p, state, group)
        dtype = moments.state_dtype(p.dtype, moments.format_of(group))
        state["momentum_buffer"] = torch.zeros(p.shape, dtype=dtype, device=p.device)

    def _has_projector(self, state):
        return "momentum_buffer" in state

    def _should_refresh(self, p, state, group, step):
        # The basis vectors are re-selected inside every step (from the momentum, after the
        # gradient is added): no projector is kept, so none is ever refreshed.
        return False

    def _coefficients(self, group) -> tuple:
        """The Newton-Schulz ``(a, b, c)`` triples of ``group`` (converted once per value)."""
        spec = group["ns_coefficients"]
        hit = self._ns_flat.get(id(group))
        if hit is None or hit[0] is not spec:
            flat = _orth.ns_coefficients(spec)
            hit = self._ns_flat[id(group)] = (spec, tuple(tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)))
        return hit[1]

    def _basis(self, p, state, M) -> torch.Tensor:
        m, n = p.shape
        side = self._side(state)
        return trion_basis(n if side == "right" else m, side, M.dtype, M.device)

    def _project_step(self, p, grad, state, group, step):
        # The per-parameter step is the list op on a one-entry list: the bucketed step's very
        # arithmetic (its float32 fast path included).
        M = state["momentum_buffer"]
        side = self._side(state)
        ops.foreach_trion_update_([p], [grad], [M], self._basis(p, state, M), side=side,
                                  rank=self._group_rank(group, tuple(p.shape)), mu=[group["momentum"]],
                                  alpha=[self._alpha(p, group)], decay=[1.0 - group["lr"] * group["weight_decay"]],
                                  coefficients=self._flat_coefficients(self._coefficients(group)), norm=SCORE_NORM)

    @staticmethod
    def _alpha(p, group) -> float:
        """``-lr * s`` of the weight update (step 6 of the class docstring)."""
        rows, cols = p.shape
        return -group["lr"] * update_scaling(group["scaling_type"], rows, cols)

    # ------------------------------------------------------------------ work shared by the ranks
    def _sharing(self) -> bool:
        return (self.shard_work and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    @torch.no_grad()
    def step(self, closure=None):
        """One step (see the class docstring). With ``shard_work`` and a process group of more
        than one rank, the low-rank updates are computed by their owner ranks and broadcast
        (:meth:`_shared_step`); otherwise the base step loop."""
        if not self._sharing():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._shared_step()
        return loss

    def _shared_step(self) -> None:
        """The sharded step: every rank walks the same parameters in the same order (replicated
        gradients, so the same non-finite skips); the owner of a low-rank matrix runs steps 1-5
        of the class docstring on it, every rank receives ``O`` and the indices by broadcast
        (asynchronous, all in flight at once) and applies step 6 to its replica. Plain groups
        take AdamW on every rank, as without sharing."""
        self._steps.new_step(len(self._param_index), len(self.param_groups))
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    work.append((group, p))
        rank, world = dist.get_rank(), dist.get_world_size()
        plain_params: Dict[int, list] = {}
        pending = []
        for (group, p), ok in zip(work, finite_flags(work)):
            if not ok:
                self.nonfinite_skips += 1
                if not self._warned["nonfinite"]:
                    report.warn_nonfinite(self, group, p)
                continue
            if not self._is_lowrank(group):
                plain_params.setdefault(id(group), (group, []))[1].append(p)
                continue
            owner = (self._param_index[p] - 1) % world
            state = self.state[p]
            if not state:
                if owner == rank:
                    self._init_state(p, state, group)
                else:
                    LowRankOptimizer._init_state(self, p, state, group)
            side = self._side(state)
            r = self._group_rank(group, tuple(p.shape))
            m_dtype = moments.state_dtype(p.dtype, moments.format_of(group))
            basis = trion_basis(p.shape[1] if side == "right" else p.shape[0], side, m_dtype, p.device)
            if owner == rank:
                orths, indices = ops.foreach_trion_orth_(
                    [p.grad], [state["momentum_buffer"]], basis, side=side, rank=r, mu=[group["momentum"]],
                    coefficients=self._flat_coefficients(self._coefficients(group)), norm=SCORE_NORM)
                orth, idx = orths[0], indices[0]
            else:
                out = torch.float64 if m_dtype == torch.float64 else torch.float32
                orth = torch.empty(ops.lowrank_shape(p.shape[0], p.shape[1], r, side), dtype=out, device=p.device)
                idx = torch.empty(r, dtype=torch.int32, device=p.device)
            handles = [dist.broadcast(orth, owner, async_op=True), dist.broadcast(idx, owner, async_op=True)]
            pending.append((p, group, state, basis, side, orth, idx, handles))
        for p, group, state, basis, side, orth, idx, handles in pending:
            for h in handles:
                h.wait()
            ops.foreach_trion_apply_([p], [orth], idx.view(1, -1), basis, side=side, alpha=[self._alpha(p, group)],
                                     decay=[1.0 - group["lr"] * group["weight_decay"]])
            state["step"] += 1
        for group, params in plain_params.values():
            self._plain_step(group, params)

    # ------------------------------------------------------------------ bucketed step
    def _bucket_key(self, p, state, group):
        if not self._own_fused_step(Trion):
            return None
        M = state["momentum_buffer"]
        side = self._side(state)
        # One basis per bucket: the weights share its order (n on the right, m on the left),
        # not necessarily their other dimension.
        return (side, p.shape[1] if side == "right" else p.shape[0], M.dtype, p.dtype, p.grad.dtype, p.device,
                self._group_rank(group, tuple(p.shape)), self._coefficients(group))

    def _bucket_step(self, key, entries, skip=None, coeffs=None):
        side, _size, _mdt, _pdt, _gdt, _dev, r, ns = key
        params, grads, Ms, mus, alphas, decays = [], [], [], [], [], []
        for p, st, group, _ in entries:
            params.append(p)
            grads.append(p.grad)
            Ms.append(st["momentum_buffer"])
            mus.append(group["momentum"])
            alphas.append(self._alpha(p, group))
            decays.append(1.0 - group["lr"] * group["weight_decay"])
        basis = self._basis(entries[0][0], entries[0][1], Ms[0])
        ops.foreach_trion_update_(params, grads, Ms, basis, side=side, rank=r, mu=mus, alpha=alphas, decay=decays,
                                  coefficients=self._flat_coefficients(ns), norm=SCORE_NORM)

    def _flat_coefficients(self, ns: tuple) -> list:
        """The ops' flat coefficient list of the triples ``ns`` (as ``ns_coefficients`` makes it)."""
        hit = self._ns_list.get(ns)
        if hit is None:
            hit = self._ns_list[ns] = _orth.ns_coefficients(ns)
        return hit
