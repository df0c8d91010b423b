"""The projection family: project + Adam epilogue, back-project + apply, and the fused step.

Ops (``torch.ops.lowrank_kernels.*``):

- ``projection_project_adam(grad, proj, exp_avg!, exp_avg_sq!, side, beta1, beta2, eps) -> N``
- ``projection_backproject_apply(param!, update, proj, side, alpha, decay) -> ()``
- ``projection_project_update_backproject(param!, grad, proj, exp_avg!, exp_avg_sq!, side,
  lr, beta1, beta2, eps, step, weight_decay, scale) -> ()``
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import projection as ref

from . import _checks as C
from ._registry import define_op, fake_no_output


def _proj_rank(proj: torch.Tensor, side: str) -> int:
    return proj.shape[0] if side == "right" else proj.shape[1]


def low_rank_shape(m: int, n: int, rank: int, side: str) -> tuple:
    """Shape of ``R`` (and of the moments) for an ``m x n`` weight."""
    return (m, rank) if side == "right" else (rank, n)


def _check_projector(op: str, m: int, n: int, proj: torch.Tensor, side: str) -> int:
    C.check_float(proj, "proj", op)
    C.check_ndim(proj, "proj", op, 2)
    if side == "right":
        C.fail_value(
            proj.shape[1] == n, op, lambda: f"side='right' needs proj of shape (rank, n) = (rank, {n}), got {tuple(proj.shape)}"
        )
    else:
        C.fail_value(
            proj.shape[0] == m, op, lambda: f"side='left' needs proj of shape (m, rank) = ({m}, rank), got {tuple(proj.shape)}"
        )
    rank = _proj_rank(proj, side)
    C.check_rank(rank, m, n, op, "proj")
    return rank


def _check_moments(op, exp_avg, exp_avg_sq, shape, param_dtype):
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        C.check_float(t, name, op)
        C.check_shape(t, name, op, shape, "the low-rank gradient's shape")
        C.check_moment_dtype(t, name, param_dtype, op)
    if exp_avg.dtype != exp_avg_sq.dtype:
        raise TypeError(f"{op}: exp_avg ({exp_avg.dtype}) and exp_avg_sq ({exp_avg_sq.dtype}) must have one dtype")


def _check_hyper(op, beta1, beta2, eps):
    C.fail_value(0.0 <= beta1 < 1.0, op, lambda: f"beta1 must be in [0, 1), got {beta1}")
    C.fail_value(0.0 <= beta2 < 1.0, op, lambda: f"beta2 must be in [0, 1), got {beta2}")
    C.fail_value(eps >= 0.0, op, lambda: f"eps must be >= 0, got {eps}")


def validate_project_adam(grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, *, op="project_adam_", _spans=None):
    C.check_side(side, op)
    C.check_float(grad, "grad", op)
    C.check_ndim(grad, "grad", op, 2)
    m, n = grad.shape
    rank = _check_projector(op, m, n, proj, side)
    _check_moments(op, exp_avg, exp_avg_sq, low_rank_shape(m, n, rank, side), grad.dtype)
    _check_hyper(op, beta1, beta2, eps)
    C.check_same_device(op, [("grad", grad), ("proj", proj), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)])
    C.check_no_overlap(op, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)], [("grad", grad), ("proj", proj)], spans=_spans)


def validate_backproject_apply(param, update, proj, side, alpha, decay, *, op="backproject_apply_"):
    C.check_side(side, op)
    C.check_float(param, "param", op)
    C.check_ndim(param, "param", op, 2)
    m, n = param.shape
    rank = _check_projector(op, m, n, proj, side)
    C.check_float(update, "update", op)
    C.check_shape(update, "update", op, low_rank_shape(m, n, rank, side), "the low-rank update's shape")
    C.check_same_device(op, [("param", param), ("update", update), ("proj", proj)])
    C.check_no_overlap(op, [("param", param)], [("update", update), ("proj", proj)])


def validate_project_update_backproject(
    param, grad, proj, exp_avg, exp_avg_sq, side, lr, beta1, beta2, eps, step, weight_decay, scale,
    *, op="project_update_backproject_",
):
    C.check_float(param, "param", op)
    C.check_ndim(param, "param", op, 2)
    spans = {}
    validate_project_adam(grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, op=op, _spans=spans)
    C.check_shape(grad, "grad", op, param.shape, "the parameter's shape")
    C.fail_value(step >= 1, op, lambda: f"step must be >= 1 (1-based, after increment), got {step}")
    C.fail_value(lr >= 0.0, op, lambda: f"lr must be >= 0, got {lr}")
    C.check_same_device(op, [("param", param), ("grad", grad)])
    C.check_no_overlap(
        op,
        [("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)],
        [("grad", grad), ("proj", proj)],
        spans=spans,
    )


def _fake_project_adam(grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps):
    return exp_avg.new_empty(exp_avg.shape)



project_adam_op = define_op(
    "projection_project_adam",
    "(Tensor grad, Tensor proj, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, str side, "
    "float beta1, float beta2, float eps) -> Tensor",
    family="projection",
    reference=ref.projection_project_adam_ref,
    fake=_fake_project_adam,
    validate=validate_project_adam,
)

backproject_apply_op = define_op(
    "projection_backproject_apply",
    "(Tensor(a!) param, Tensor update, Tensor proj, str side, float alpha, float decay) -> ()",
    family="projection",
    reference=ref.projection_backproject_apply_ref,
    fake=fake_no_output,
    validate=validate_backproject_apply,
)

project_update_backproject_op = define_op(
    "projection_project_update_backproject",
    "(Tensor(a!) param, Tensor grad, Tensor proj, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, str side, "
    "float lr, float beta1, float beta2, float eps, int step, float weight_decay, float scale) -> ()",
    family="projection",
    reference=ref.projection_project_update_backproject_ref,
    fake=fake_no_output,
    validate=validate_project_update_backproject,
)


# --------------------------------------------------------------------------- structured projectors
# A projector need not be a dense tensor: the DCT family passes basis indices, the
# quant family a packed INT4 projector. Such a type registers the ops that serve it,
# and the public functions below route to them, with the same keyword arguments.
_STRUCTURED = {}


def register_projector_type(cls, *, project_adam_, backproject_apply_, project_update_backproject_):
    """Let ``cls`` instances stand in for ``proj`` in the public projection functions.

    Each callable takes the public function's arguments (``proj`` being the ``cls``
    instance) and must validate them and run the step on its own ops.
    """
    _STRUCTURED[cls] = {
        "project_adam_": project_adam_,
        "backproject_apply_": backproject_apply_,
        "project_update_backproject_": project_update_backproject_,
    }


def _structured(proj, fn_name):
    if isinstance(proj, torch.Tensor):
        return None
    for cls, impls in _STRUCTURED.items():
        if isinstance(proj, cls):
            return impls[fn_name]
    raise TypeError(
        f"{fn_name}: proj must be a Tensor or one of {[c.__name__ for c in _STRUCTURED]}, got {type(proj).__name__}"
    )


# --------------------------------------------------------------------------- public API
def project_adam_(grad, proj, exp_avg, exp_avg_sq, *, side, beta1=0.9, beta2=0.999, eps=1e-8):
    """Project the gradient and run the Adam moment update in the subspace.

    ``R = G P^T`` (``side="right"``, ``proj`` is ``r x n``) or ``R = P^T G``
    (``side="left"``, ``proj`` is ``m x r``), computed with float32 accumulation;
    then ``exp_avg <- beta1 exp_avg + (1 - beta1) R`` and
    ``exp_avg_sq <- beta2 exp_avg_sq + (1 - beta2) R^2`` in place.

    Returns ``N = exp_avg / (sqrt(exp_avg_sq) + eps)`` (no bias correction), a new
    tensor of the low-rank shape in the moments' dtype.
    """
    impl = _structured(proj, "project_adam_")
    if impl is not None:
        return impl(grad, proj, exp_avg, exp_avg_sq, side=side, beta1=beta1, beta2=beta2, eps=eps)
    return project_adam_op(grad, proj, exp_avg, exp_avg_sq, side, float(beta1), float(beta2), float(eps))


def backproject_apply_(param, update, proj, *, side, alpha, decay=1.0):
    """``param <- decay * param + alpha * back(update)`` in place, with no full-size temporary.

    ``back(N) = N P`` for ``side="right"`` and ``P N`` for ``side="left"``.
    """
    impl = _structured(proj, "backproject_apply_")
    if impl is not None:
        return impl(param, update, proj, side=side, alpha=alpha, decay=decay)
    backproject_apply_op(param, update, proj, side, float(alpha), float(decay))


def project_update_backproject_(
    param, grad, proj, exp_avg, exp_avg_sq, *, side, lr, beta1=0.9, beta2=0.999, eps=1e-8, step,
    weight_decay=0.0, scale=1.0,
):
    """One GaLore-Adam step on a 2-D parameter, in place.

    ``N = project_adam_(...)``; with ``step_size = lr * sqrt(1 - beta2^step) / (1 - beta1^step)``:
    ``param <- (1 - lr * weight_decay) * param - step_size * scale * back(N)``
    (torch.optim.AdamW's order: decay first, on the old weight). ``step`` is 1-based.
    """
    impl = _structured(proj, "project_update_backproject_")
    if impl is not None:
        return impl(
            param, grad, proj, exp_avg, exp_avg_sq, side=side, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            step=step, weight_decay=weight_decay, scale=scale,
        )
    project_update_backproject_op(
        param, grad, proj, exp_avg, exp_avg_sq, side, float(lr), float(beta1), float(beta2), float(eps),
        int(step), float(weight_decay), float(scale),
    )
