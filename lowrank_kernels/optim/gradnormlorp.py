r"""GradNormLoRP-AdamW: GaLore on the direction of a per-row weight-normalized weight.

**Our interpretation** of GradNormLoRP (Huang, Shen, Zhu, Rudinac, Kanoulas, AAAI 2025,
arXiv 2412.19616). The official code cannot reproduce the paper (it keeps a full copy
of ``V``, resets the magnitude every step, omits the projection term of the direction
gradient, gives NaN on zero rows); what is built here is the method as the paper states
it, written out below.

Each projected ``m x n`` weight is re-parametrized per **output row** (``dim=0``, the
rows of ``W`` whatever the projection side) as ``W_i = g_i V_i / ||V_i||``
(Salimans & Kingma 2016). ``W`` already holds the direction ``V_i / ||V_i||`` (up to the
sign of ``g_i``), so ``V`` matters only through its row norms: the state keeps
``wn_g = g`` and ``wn_vnorm = ||V||_row`` (length ``m``), never an ``m x n`` copy of
``V``. Per step ``t`` (1-based; float32 math, float64 for float64 weights):

.. code-block:: text

    s  = max(||W||_row, 1e-12);  Vh = sign(g) W / s          (a zero row stays zero)
    a  = rowsum(G * Vh)                                        dL/dg
    Gv = (g / vnorm) (G - a Vh)                                dL/dV
    refresh P from Gv when (t - 1) % T == 0                    (GaLore's exact or lowrank SVD)
    N  = project_adam_(Gv, P, exp_avg, exp_avg_sq)             low-rank Adam on V
    c  = lr sqrt(1 - b2^t) / (1 - b1^t)
    Adam on a (length m):  dg = -c m_g / (sqrt(v_g) + eps)
    g <- (1 - lr wd) g;  vnorm <- (1 - lr wd) vnorm            torch.optim.AdamW's order
    V' = vnorm Vh - c scale back(N);  vnorm' = ||V'||_row;  g' = g + dg
    W <- (g' / vnorm') V'  (in place);  store g', vnorm'

The last line is ``W <- diag(d) W + diag(b) back(N)`` with per-row
``d = (g'/vnorm') vnorm sign(g) / s`` and ``b = -(g'/vnorm') c scale``
(:func:`apply_rows`), and ``||V'||_row`` comes without an ``m x n`` temporary
(:func:`new_row_norms_sq`). With an identity projector (``rank = n``) and ``eps = 0``
this is exactly ``torch.optim.Adam`` on the ``(g, V)`` parameters of
``torch.nn.utils.parametrizations.weight_norm(dim=0)`` (tested).
"""
from __future__ import annotations

from typing import Unpack

import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _checks
from lowrank_kernels.ops import projection as _projection
from lowrank_kernels.reference.gradnormlorp import (  # noqa: F401  (the per-row math, shared with the list op)
    NORM_FLOOR, PANEL_ELEMS, acc_dtype as _acc, magnitude_step_, new_row_norms_sq, row_dots, weight_norm_grads,
)

from . import distributed as _dist
from . import moments
from .base import _PLAIN_TENSORS
from .common import adam_step_size
from .config import OptimizerConfig, SharedOptions, shared_signature
from .galore import GaLoreAdamW


def apply_rows(
    param: torch.Tensor, update: torch.Tensor, proj: torch.Tensor, side: str, *,
    decay: torch.Tensor, alpha: torch.Tensor,
) -> None:
    r"""``W <- diag(decay) W + diag(alpha) back(N)`` in place, with no ``m x n`` temporary.

    ``decay`` / ``alpha``: length-``m`` vectors in float32 (float64 for a float64 ``W``).
    float32 and 16-bit ``W`` go through the fused per-row form of
    ``ops.backproject_apply_`` (``row_decay`` / ``row_alpha``), which rounds ``W`` to its
    dtype once per step on every backend.

    - float64 ``W``: the op's per-row factors are float32 (rounding float64 factors to
      float32 would cost ``~6e-8`` relative per step), so the exact fold stays: ``alpha``
      goes into the small factor in float64 (right: ``diag(alpha) N P`` scales ``N``'s rows;
      left: ``diag(alpha) P N`` scales ``P``'s rows, an ``m x r`` copy), then
      ``W *= decay[:, None]`` in place and a scalar ``backproject_apply_``.

    Everything is validated before ``W`` is written: bad input raises ``ValueError`` /
    ``TypeError`` naming the argument, with ``W`` unchanged.
    """
    _validate_apply_rows(param, update, proj, side, decay, alpha)
    if param.dtype == torch.float64:
        if side == "right":
            ops.backproject_apply_(param.mul_(decay[:, None]), update.to(torch.float64) * alpha[:, None], proj,
                                   side="right", alpha=1.0, decay=1.0)
        else:
            ops.backproject_apply_(param.mul_(decay[:, None]), update, proj.to(torch.float64) * alpha[:, None],
                                   side="left", alpha=1.0, decay=1.0)
        return
    decay = decay.to(torch.float32)
    alpha = alpha.to(torch.float32)
    ops.backproject_apply_(param, update, proj, side=side, alpha=1.0, decay=1.0, row_decay=decay, row_alpha=alpha)


def _validate_apply_rows(param, update, proj, side, decay, alpha) -> None:
    op = "apply_rows"
    _checks.check_tensor(param, "param", op)
    _checks.check_ndim(param, "param", op, 2)
    for name, v in (("decay", decay), ("alpha", alpha)):
        _checks.check_tensor(v, name, op)
        _checks.check_float(v, name, op, (torch.float32, torch.float64))
        _checks.check_shape(v, name, op, (param.shape[0],), "one factor per row of param")
        _checks.check_same_device(op, [("param", param), (name, v)])
    _projection.validate_backproject_apply(param, update, proj, side, 1.0, 1.0, op=op)


class GradNormLoRPAdamW(GaLoreAdamW):
    r"""GradNormLoRP-AdamW (**our interpretation**, see the module docstring): GaLore-Adam on
    the direction ``V`` of a per-row weight-normalized weight ``W = g V / ||V||`` and plain
    Adam on the magnitude ``g``, with no ``m x n`` copy of ``V``.

    Param groups that set ``rank`` (galore-torch keys ``rank``, ``update_proj_gap``,
    ``scale``, ``proj_type`` in ``std``, ``reverse_std``, ``left``, ``right``) are
    weight-normalized per output row (``dim=0``) and projected; every other group is plain
    ``torch.optim.AdamW`` (bit-identical), as in :class:`GaLoreAdamW`. The projector is
    made from the direction gradient ``dL/dV`` at steps ``1, T+1, 2T+1, ...`` by
    ``torch.linalg.svd`` (``svd="exact"``) or a seeded randomized SVD
    (``svd="lowrank"``), stored in the parameter's dtype.

    At a parameter's first step ``g = ||V|| = ||W||_row``. Weight decay follows
    torch.optim.AdamW's order on the ``(g, V)`` parameters (both shrink by
    ``1 - lr wd`` first). Rows that are zero stay zero and never give NaN.

    Args:
        params: parameters or param groups (e.g. from :func:`lowrank_param_groups`).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (``eps`` defaults to 1e-6).
        rank: default rank of the groups that do not set it; None leaves them plain AdamW.
        update_proj_gap: ``T`` (default 200). scale: multiplies the direction update
            (default 1.0). proj_type: default ``"std"`` (``"full"`` is not supported).
        svd: ``"exact"`` or ``"lowrank"``.
        skip_nonfinite: skip a parameter whose gradient is not finite (weight and state untouched).
        foreach: passed to torch's AdamW for the plain groups; also a group key of the
            projected groups: None/True (default) steps the float32 parameters that take a
            non-refresh step by bucket, one ``ops.foreach_gradnormlorp_update_`` call per
            (side, moment format) bucket; False forces the per-parameter path (bit-identical
            results either way on CPU).
        moment_dtype: ``"float32"`` (default) or ``"param"``: the dtype of the projected and
            plain moments, as :class:`GaLoreAdamW` (``"param"`` is unsafe for 16-bit
            parameters, see :mod:`lowrank_kernels.optim.moments`).
        moment_bits, block_size, min_8bit_size: the format of the projected moments and of
            the plain groups' moments (32 | 16 | 8, see :mod:`lowrank_kernels.optim.moments`); the
            four length-``m`` magnitude vectors stay float32.

    State per projected parameter (tensors only): GaLore's (``step``, ``side``,
    ``projector``, ``exp_avg``, ``exp_avg_sq`` in the ``moment_dtype`` / ``moment_bits``
    format) plus four
    length-``m`` vectors in float32 (float64 for float64 weights): ``wn_g``,
    ``wn_vnorm``, ``exp_avg_g``, ``exp_avg_sq_g``, i.e. ``16 m`` more bytes than GaLore.
    FSDP2 (DTensor) parameters are not supported yet.
    """

    proj_types = ("std", "reverse_std", "left", "right")

    supports_moment_transport = False
    _no_transport_reason = "its refresh does not transport moments (GaLoreAdamW and DCTAdamW do)"

    @shared_signature(eps=1e-6, scale=1.0)
    def __init__(self, params, *, svd: str = "exact", **options: Unpack[SharedOptions]):
        self._wn_scratch = None
        super().__init__(params, svd=svd, **OptimizerConfig.from_arguments(locals()).defaults())

    def _validate_lowrank_group(self, group, gi):
        super()._validate_lowrank_group(group, gi)
        for pi, p in enumerate(group["params"]):
            if _dist.is_dtensor(p):
                raise ValueError(
                    self._err(gi, f"parameter {pi} is a DTensor: {type(self).__name__} does not support "
                                  "FSDP2-sharded parameters yet")
                )

    def _init_state(self, p, state, group):
        super()._init_state(p, state, group)
        acc = _acc(p)
        norms = row_dots(p, p, acc).sqrt()
        state["wn_g"] = norms.clone()
        state["wn_vnorm"] = norms
        state["exp_avg_g"] = torch.zeros_like(norms)
        state["exp_avg_sq_g"] = torch.zeros_like(norms)

    @torch.no_grad()
    def init_state(self) -> None:
        """:meth:`LowRankOptimizer.init_state`; the row renormalization of its zero-gradient
        step moves the weights by rounding even at ``lr = 0``, so they are copied back."""
        params = [p for g in self.param_groups for p in g["params"]]
        saved = None if self.state else [p.detach().clone() for p in params]
        super().init_state()
        if saved is not None:
            for p, w in zip(params, saved):
                p.copy_(w)

    def _refresh_cost(self, p, group):
        """0: the projector is made from the direction gradient ``Gv``, computed in the step
        itself, so every rank refreshes its own (no sharing across ranks)."""
        return 0

    def _lowrank_step(self, p, grad, state, group):
        """Compute ``a`` and ``Gv`` from ``W`` and ``G``, then run the base's step on ``Gv``
        (so the projector refresh and the projected Adam both see the direction gradient)."""
        if len(state) == 0:
            g = vnorm = row_dots(p, p, _acc(p)).sqrt()
        else:
            g, vnorm = state["wn_g"], state["wn_vnorm"]
        a, gv, s, wsq = weight_norm_grads(p, grad, g, vnorm)
        self._wn_scratch = (a, s, wsq)
        try:
            super()._lowrank_step(p, gv, state, group)
        finally:
            self._wn_scratch = None

    def _project_step(self, p, grad, state, group, step):
        a, s, wsq = self._wn_scratch
        side = self._side(state)
        proj = self._get_projector(p, state, group)
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        n = ops.project_adam_(
            grad, proj, state["exp_avg"], state["exp_avg_sq"], side=side, beta1=beta1, beta2=beta2, eps=eps,
            **self._moment_kwargs(p, state, group, step),
        )
        if eps == 0.0:  # 0/0 where a coordinate never had a gradient (zero rows): no update, not NaN
            n = torch.nan_to_num_(n, nan=0.0)
        magnitude_step_(
            p, n, proj, side, a=a, s=s, wsq=wsq, g=state["wn_g"], vnorm=state["wn_vnorm"],
            exp_avg_g=state["exp_avg_g"], exp_avg_sq_g=state["exp_avg_sq_g"], beta1=beta1, beta2=beta2, eps=eps,
            step_size=adam_step_size(lr, beta1, beta2, step), scale=group["scale"],
            decay=1.0 - lr * group["weight_decay"],
            apply=lambda row_decay, row_alpha: apply_rows(p, n, proj, side, decay=row_decay, alpha=row_alpha),
        )

    # ------------------------------------------------------------------ bucketed step
    def _bucket_key(self, p, state, group):
        """Float32 weights, gradients and projectors of this class's own step share a bucket per
        (device, side, betas, eps, moment format); other dtypes, DTensors and subclasses that
        change the step stay per parameter."""
        if not self._own_fused_step(GradNormLoRPAdamW):
            return None
        if p.dtype != torch.float32 or type(p) not in _PLAIN_TENSORS or p.grad.dtype != torch.float32:
            return None
        proj = state["projector"]
        if not isinstance(proj, torch.Tensor) or proj.dtype != torch.float32:
            return None
        side = self._side(state)
        if side not in ("right", "left"):
            return None
        beta1, beta2 = group["betas"]
        return ("gradnormlorp", p.device, side, state["exp_avg"].dtype, beta1, beta2, group["eps"],
                moments.bucket_part(state, moments.format_of(group)))

    def _bucket_step(self, key, entries, skip=None, coeffs=None):
        """One ``ops.foreach_gradnormlorp_update_`` call: the per-parameter step's arithmetic
        (:meth:`_lowrank_step` and :meth:`_project_step`) with each weight's step size, scale and decay."""
        _, _, side, _, beta1, beta2, eps, _ = key
        sts = [st for _, st, _, _ in entries]
        ops.foreach_gradnormlorp_update_(
            [p for p, _, _, _ in entries], [p.grad for p, _, _, _ in entries], [st["projector"] for st in sts],
            [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts], [st["wn_g"] for st in sts],
            [st["wn_vnorm"] for st in sts], [st["exp_avg_g"] for st in sts], [st["exp_avg_sq_g"] for st in sts],
            side=side, beta1=beta1, beta2=beta2, eps=eps,
            step_size=[adam_step_size(g["lr"], beta1, beta2, t) for _, _, g, t in entries],
            scale=[g["scale"] for _, _, g, _ in entries],
            decay=[1.0 - g["lr"] * g["weight_decay"] for _, _, g, _ in entries],
            **self._foreach_moment_kwargs(entries),
        )

__all__ = ["GradNormLoRPAdamW", "weight_norm_grads", "new_row_norms_sq", "apply_rows", "row_dots"]
