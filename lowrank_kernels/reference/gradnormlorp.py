r"""Pure-PyTorch reference of the gradnormlorp family: GradNormLoRP's non-refresh step over a
list of weights (the arithmetic of ``GradNormLoRPAdamW``'s per-parameter step, operation for
operation; the method: :mod:`lowrank_kernels.optim.gradnormlorp`).

Per entry ``i`` (weight ``W`` of shape ``m x n``, gradient ``G``, dense projector ``P``; the
length-``m`` vectors ``g = wn_g[i]``, ``vnorm = wn_vnorm[i]``, ``m_g = exp_avg_g[i]``,
``v_g = exp_avg_sq_g[i]``; ``c = step_size[i]``, ``cs = c * scale[i]``, ``d = decay[i]``):

- ``a, Gv, s, wsq = weight_norm_grads(W, G, g, vnorm)`` (``dL/dg``, ``dL/dV``);
- ``N = project_adam_(Gv, P, exp_avg, exp_avg_sq)`` (any moment format; NaN -> 0 when ``eps = 0``);
- ``m_g <- b1 m_g + (1 - b1) a``, ``v_g <- b2 v_g + (1 - b2) a^2``, ``dg = -c m_g / (sqrt(v_g) + eps)``;
- ``vd = d vnorm``, ``g' = d g + dg``, ``vnorm' = sqrt(new_row_norms_sq(...))``, ``k = g' / vnorm'``;
- ``W <- diag(k vd sign(g) / s) W + diag(-cs k) back(N)`` (``backproject_apply_`` with row
  factors); ``g <- g'``, ``vnorm <- vnorm'``.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch

from .projection import moment_tail, projection_backproject_apply_ref, projection_project_adam_ref

#: floor of a row norm used as a divisor (a zero row of W stays zero).
NORM_FLOOR = 1e-12
#: elements per row panel of the panel loops (bounded float32 scratch: 4 MiB).
PANEL_ELEMS = 1 << 20


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 ``t``, else float32: the dtype of the per-row math."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def panels(m: int, n: int) -> Iterator[slice]:
    """Row panels of an ``m x n`` matrix of at most :data:`PANEL_ELEMS` elements (one row at least)."""
    rows = max(1, PANEL_ELEMS // max(n, 1))
    for i in range(0, m, rows):
        yield slice(i, min(m, i + rows))


def safe_div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x / y`` where ``y > 0``, else 0 (a degenerate row gets no update instead of a NaN)."""
    return torch.where(y > 0, x / torch.where(y > 0, y, torch.ones_like(y)), torch.zeros_like(x))


def row_dots(x: torch.Tensor, y: torch.Tensor, acc: Optional[torch.dtype] = None) -> torch.Tensor:
    """``rowsum(x * y)`` of two ``m x n`` matrices in ``acc`` (float32 by default), in row
    panels: the scratch is bounded by :data:`PANEL_ELEMS` elements, never ``m x n``."""
    acc = acc or acc_dtype(x)
    out = torch.empty(x.shape[0], dtype=acc, device=x.device)
    for sl in panels(*x.shape):
        out[sl] = (x[sl].to(acc) * y[sl].to(acc)).sum(1)
    return out


def row_panel_matmul(w: torch.Tensor, right: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``w @ right`` (``m x n`` times ``n x r``) in ``acc``, converting ``w`` one row panel at a time."""
    rt = right.to(acc)
    out = torch.empty(w.shape[0], right.shape[1], dtype=acc, device=w.device)
    for sl in panels(*w.shape):
        torch.matmul(w[sl].to(acc), rt, out=out[sl])
    return out


def weight_norm_grads(
    weight: torch.Tensor, grad: torch.Tensor, g: torch.Tensor, vnorm: torch.Tensor, *, out_dtype=None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The gradients of a per-row weight-normalized weight, from ``W`` and ``dL/dW`` alone.

    With ``W_i = g_i V_i / ||V_i||`` (rows, ``dim=0``), ``vnorm = ||V||_row``:
    ``s = max(||W||_row, 1e-12)``, ``Vh = sign(g) W / s`` (the unit direction ``V / ||V||``),
    ``a = rowsum(G * Vh) = dL/dg`` and ``Gv = (g / vnorm) (G - a Vh) = dL/dV``.

    Returns ``(a, Gv, s, wsq)``: ``a`` and ``s`` and ``wsq = ||W||^2_row`` as length-``m``
    vectors in float32 (float64 for float64 ``weight``), ``Gv`` as an ``m x n`` tensor in
    ``out_dtype`` (default: ``grad``'s dtype), built in row panels from float32 math.
    A row with ``vnorm = 0`` gets ``Gv = 0``; a zero row of ``W`` gets ``a = 0``.
    """
    acc = acc_dtype(weight)
    g = g.to(acc)
    vnorm = vnorm.to(acc)
    wsq = row_dots(weight, weight, acc)
    s = wsq.sqrt().clamp_min(NORM_FLOOR)
    sg = torch.sign(g)
    a = sg * row_dots(grad, weight, acc) / s
    k1 = safe_div(g, vnorm)  # g / vnorm
    k2 = k1 * a * sg / s  # (g / vnorm) a sign(g) / s: the coefficient of W in Gv
    gv = torch.empty(weight.shape, dtype=out_dtype or grad.dtype, device=weight.device)
    for sl in panels(*weight.shape):
        gv[sl] = grad[sl].to(acc) * k1[sl, None] - weight[sl].to(acc) * k2[sl, None]
    return a, gv, s, wsq


def new_row_norms_sq(
    weight: torch.Tensor, update: torch.Tensor, proj: torch.Tensor, side: str, *,
    vd: torch.Tensor, sg: torch.Tensor, s: torch.Tensor, wsq: torch.Tensor, cs: float,
) -> torch.Tensor:
    r"""``||V'||^2_row`` of ``V' = vd Vh - cs back(N)`` with ``Vh = sg W / s``, without an
    ``m x n`` temporary (``N = update``, ``P = proj``, per-row vectors ``vd``, ``sg``, ``s``,
    ``wsq = ||W||^2_row``):

    ``||V'_i||^2 = vd_i^2 wsq_i / s_i^2 - 2 cs vd_i (sg_i / s_i) <W_i, back(N)_i> + cs^2 ||back(N)_i||^2``

    - right (``back(N) = N P``, ``P`` is ``r x n``): ``<W_i, N_i P> = <(W P^T)_i, N_i>``;
      ``||N_i P||^2 = ||N_i||^2`` for a float32/float64 ``P`` with orthonormal rows (GaLore's
      SVD projectors); for a 16-bit ``P`` (not orthonormal to working precision)
      ``||N_i P||^2 = N_i (P P^T) N_i^T`` through the ``r x r`` Gram of ``P``, exact for any ``P``;
    - left (``back(N) = P N``, ``P`` is ``m x r``): ``<W_i, P_i N> = <P_i, (W N^T)_i>`` and
      ``||P_i N||^2 = P_i (N N^T) P_i^T`` through the ``r x r`` Gram ``N N^T``, exact for any ``P``.

    Scratch: ``m x r`` and ``r x r`` in float32 (float64 for float64 weights), plus bounded
    row panels of ``W``. Returns float32 (float64) of length ``m``, clamped at 0.
    """
    acc = acc_dtype(weight)
    n_ = update.to(acc)
    p_ = proj.to(acc)
    if side == "right":
        wp = row_panel_matmul(weight, p_.T, acc)  # W P^T, m x r
        cross = (wp * n_).sum(1)
        if proj.dtype in (torch.float32, torch.float64):
            bsq = (n_ * n_).sum(1)  # orthonormal rows: ||N P|| = ||N||
        else:
            bsq = ((n_ @ (p_ @ p_.T)) * n_).sum(1)
    else:
        wn = row_panel_matmul(weight, n_.T, acc)  # W N^T, m x r
        cross = (wn * p_).sum(1)
        bsq = ((p_ @ (n_ @ n_.T)) * p_).sum(1)
    vsq = vd * vd * (wsq / (s * s)) - (2.0 * cs) * vd * (sg / s) * cross + (cs * cs) * bsq
    return vsq.clamp_min(0.0)


def magnitude_step_(
    weight: torch.Tensor, update: torch.Tensor, proj: torch.Tensor, side: str, *, a: torch.Tensor, s: torch.Tensor,
    wsq: torch.Tensor, g: torch.Tensor, vnorm: torch.Tensor, exp_avg_g: torch.Tensor, exp_avg_sq_g: torch.Tensor,
    beta1: float, beta2: float, eps: float, step_size: float, scale: float, decay: float,
    apply: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """The step after the projected Adam update ``N = update``: Adam on the magnitude ``g``
    (``exp_avg_g``, ``exp_avg_sq_g`` in place), the new row norms of ``V``, then
    ``apply(row_decay, row_alpha)`` (``W <- diag(row_decay) W + diag(row_alpha) back(N)``) and
    ``g``, ``vnorm`` updated in place (see the module doc)."""
    c = step_size
    cs = c * scale
    exp_avg_g.mul_(beta1).add_(a, alpha=1.0 - beta1)
    exp_avg_sq_g.mul_(beta2).addcmul_(a, a, value=1.0 - beta2)
    dg = -c * safe_div(exp_avg_g, exp_avg_sq_g.sqrt() + eps)
    sg = torch.sign(g)
    vd = vnorm * decay
    g_new = g * decay + dg
    vnorm_new = new_row_norms_sq(weight, update, proj, side, vd=vd, sg=sg, s=s, wsq=wsq, cs=cs).sqrt()
    k = safe_div(g_new, vnorm_new)
    apply(k * vd * sg / s, -cs * k)
    g.copy_(g_new)
    vnorm.copy_(vnorm_new)


def gradnormlorp_entry_(param, grad, proj, exp_avg, exp_avg_sq, g, vnorm, exp_avg_g, exp_avg_sq_g, side, beta1, beta2,
                        eps, step_size, scale, decay, m_absmax=None, v_absmax=None, block_size=0, moment_seed=-1, *,
                        project_adam=projection_project_adam_ref, backproject_apply=projection_backproject_apply_ref):
    """One float32 entry's step (see the module doc); ``project_adam`` / ``backproject_apply``:
    projection backends taking the ops' positional arguments."""
    a, gv, s, wsq = weight_norm_grads(param, grad, g, vnorm)
    n = project_adam(gv, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, None, None, None, 0, 0, m_absmax,
                     v_absmax, block_size, moment_seed)
    if eps == 0.0:  # 0/0 where a coordinate never had a gradient (zero rows): no update, not NaN
        n = torch.nan_to_num_(n, nan=0.0)

    def apply(row_decay, row_alpha):
        backproject_apply(param, n, proj, side, 1.0, 1.0, None, None, None, 0, 0, row_decay.to(torch.float32),
                          row_alpha.to(torch.float32))

    magnitude_step_(param, n, proj, side, a=a, s=s, wsq=wsq, g=g, vnorm=vnorm, exp_avg_g=exp_avg_g,
                    exp_avg_sq_g=exp_avg_sq_g, beta1=beta1, beta2=beta2, eps=eps, step_size=step_size, scale=scale,
                    decay=decay, apply=apply)


def gradnormlorp_foreach_update_ref(params, grads, projs, exp_avg, exp_avg_sq, wn_g, wn_vnorm, exp_avg_g, exp_avg_sq_g,
                                    side, beta1, beta2, eps, step_size, scale, decay, m_absmax=(), v_absmax=(),
                                    block_size=0, moment_seed=(), *, project_adam=projection_project_adam_ref,
                                    backproject_apply=projection_backproject_apply_ref):
    """Each entry in turn (see the module doc). ``project_adam`` / ``backproject_apply``: as
    :func:`gradnormlorp_entry_` (the projection ops themselves give the per-parameter step's
    arithmetic on their dispatched backend)."""
    for i in range(len(params)):
        gradnormlorp_entry_(params[i], grads[i], projs[i], exp_avg[i], exp_avg_sq[i], wn_g[i], wn_vnorm[i],
                            exp_avg_g[i], exp_avg_sq_g[i], side, beta1, beta2, eps, step_size[i], scale[i], decay[i],
                            *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i), project_adam=project_adam,
                            backproject_apply=backproject_apply)
