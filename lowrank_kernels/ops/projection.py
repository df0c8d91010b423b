"""The projection family: project (+ Adam epilogue), back-project + apply, and the fused step.

One op per stage, whatever the projector's kind:

- ``projection_project(grad, proj, side, indices?, q_scale?, q_min?, rank, group_size) -> R``
  (the projection GEMM without an epilogue; float32, float64 for float64 input)
- ``projection_project_adam(grad, proj, exp_avg!, exp_avg_sq!, side, beta1, beta2, eps,
  indices?, q_scale?, q_min?, rank, group_size, m_absmax!?, v_absmax!?, block_size, moment_seed) -> N``
- ``projection_backproject_apply(param!, update, proj, side, alpha, decay,
  indices?, q_scale?, q_min?, rank, group_size, row_decay?, row_alpha?) -> ()``
  (``row_decay`` / ``row_alpha``: optional float32 per-row factors of length ``m``)
- ``projection_project_update_backproject(param!, grad, proj, exp_avg!, exp_avg_sq!, side,
  lr, beta1, beta2, eps, step, weight_decay, scale, indices?, q_scale?, q_min?, rank, group_size,
  m_absmax!?, v_absmax!?, block_size, moment_seed) -> ()``
- ``projection_foreach_project_update_backproject(..., Tensor? skip=None, Tensor? coeffs=None)``:
  the step over lists (see below); ``skip`` (bool/uint8, one flag per parameter) and
  ``coeffs`` (float32/float64 ``(n, 2)``: ``(step_size * scale, 1 - lr * wd)`` per parameter)
  are device tensors the backends read without a host sync (``capturable=True`` optimizers).

Moment formats (the ops' trailing moment arguments, all defaulted):

- **32-bit** (``m_absmax = v_absmax = None``, ``block_size = 0``, ``moment_seed = -1``): the
  moments are floating tensors (float32, float64, bfloat16 or the parameter's dtype), updated in
  float32 (float64 with float64 inputs) and rounded to nearest on store; ``N`` in the
  moments' dtype.
- **16-bit** (bfloat16 moments, ``moment_seed >= 0``): as above, but each store of an
  updated moment rounds stochastically to bfloat16 (reference/moments.py
  ``bf16_round_sr_ref``: 16 hashed random bits of ``(moment_seed, i)`` added below the
  kept bits, then truncated; ``i`` the flat index for ``exp_avg``, ``i + numel`` for
  ``exp_avg_sq``), so small updates of the second moment are not lost on average. Only
  bfloat16 moments may take a seed >= 0; the caller gives a fresh seed per step.
- **8-bit** (``m_absmax`` and ``v_absmax`` given): ``exp_avg`` / ``exp_avg_sq`` are
  contiguous uint8 codes of the low-rank shape, ``m_absmax`` / ``v_absmax`` float32 of shape
  ``shape[:-1] + (ceil(cols / block_size),)``, ``1 <= block_size <= 256``: blocks inside one
  row, bitsandbytes' dynamic map (signed for ``exp_avg``, unsigned for ``exp_avg_sq``),
  nearest rounding (reference/moments.py). The kernels dequantize, update in float32,
  compute ``N`` (float32) from the float32 values and requantize with a fresh absmax per
  block; the C++ and Triton backends never write a float32 moment of the low-rank shape
  to memory. A block holding NaN/inf gets absmax NaN (it decodes to NaN). Use
  :func:`moments8_zeros` for a fresh state.

The projector is carried by ``proj`` and the trailing optional arguments (all
defaulted, so a dense projector is passed exactly as before):

- **dense**: ``proj`` is ``P`` (``r x n`` for side="right", ``m x r`` for side="left");
  ``indices``, ``q_scale``, ``q_min`` are None, ``rank`` and ``group_size`` 0 (``rank`` may
  also repeat ``P``'s rank).
- **DCT** (:class:`~lowrank_kernels.ops.DCTProjector`): ``proj`` is the shared ``s x s``
  DCT basis and ``indices`` (int32/int64, length ``r``) the selected rows:
  ``P = basis[indices]`` (right) or its transpose (left).
- **packed INT4** (:class:`~lowrank_kernels.ops.Int4Projector`): ``proj`` is the uint8
  codes of the row-major dense ``P``, ``q_scale`` / ``q_min`` the float32 per-group scale
  and minimum, ``rank`` the rank and ``group_size`` the group size (even).

Each op has one validator covering the three kinds (errors name the argument by the
projector's field: ``proj``, ``basis`` / ``indices``, ``packed`` / ``scale`` /
``minimum``), one fake impl, one reference (reference/projection.py), one C++ kernel
``<op>_cpu`` whose panel loader reads the projector (csrc/cpu/projection/projector.h), and
one Triton launcher whose tile loader reads it (kernels/projection.py, ``PROJ_MODE``).
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import projection as ref

from . import _checks as C
from ._registry import define_op, eager_caller, fake_no_output

def _kernels():
    """The projection family's Triton launchers (``lowrank_kernels.kernels.projection``),
    imported on first use: triton is optional, and decides at import whether it interprets."""
    from lowrank_kernels.kernels import projection as kernels

    return kernels


INDEX_DTYPES = (torch.int32, torch.int64)


def _proj_rank(proj: torch.Tensor, side: str) -> int:
    return proj.shape[0] if side == "right" else proj.shape[1]


def lowrank_shape(m: int, n: int, rank: int, side: str) -> tuple:
    """Shape of ``R`` (and of the moments) for an ``m x n`` weight."""
    return (m, rank) if side == "right" else (rank, n)


# --------------------------------------------------------------------------- projector checks
def _check_dense_projector(op: str, m: int, n: int, proj: torch.Tensor, side: str, any_rank: bool = False) -> int:
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
    _check_rank(rank, m, n, side, op, any_rank)
    return rank


def _check_rank(rank, m, n, side, op, any_rank):
    if any_rank:  # the plain projection: any number of projector rows, up to its dimension
        k = n if side == "right" else m
        C.fail_value(1 <= rank <= k, op, lambda: f"rank of proj ({rank}) must be between 1 and {k}")
    else:
        C.check_rank(rank, m, n, op, "proj")


def check_basis(op: str, basis, s: int, side: str) -> None:
    """``basis`` is a floating ``s x s`` tensor (the DCT basis of the projected side's order)."""
    C.check_float(basis, "basis", op)
    C.check_shape(basis, "basis", op, (s, s), lambda: f"the DCT basis of order {'n' if side == 'right' else 'm'} = {s}")


def check_indices(op: str, indices, s: int, max_rank=None) -> int:
    """``indices``: a 1-D int32/int64 vector of 1..max_rank entries in ``[0, s)``; returns its length."""
    C.check_tensor(indices, "indices", op)
    C.fail_type(indices.dtype in INDEX_DTYPES, op, lambda: f"indices must be int32 or int64, got {indices.dtype}")
    C.check_ndim(indices, "indices", op, 1)
    r = indices.shape[0]
    hi = s if max_rank is None else max_rank
    C.fail_value(1 <= r <= hi, op, lambda: f"the number of indices ({r}) must be between 1 and {hi}")
    # Range check on CPU only: on CUDA it would cost a device sync per call (the
    # optimizer only ever passes indices produced by dct_score_topk).
    if indices.device.type == "cpu" and type(indices) is torch.Tensor and indices.numel() > 0:
        lo_t, hi_t = torch.aminmax(indices)  # one pass for both
        lo_v, hi_v = int(lo_t), int(hi_t)
        C.fail_value(0 <= lo_v and hi_v < s, op, lambda: f"indices must lie in [0, {s}), got values in [{lo_v}, {hi_v}]")
    return r


def check_group_size(group_size, op: str, even: bool) -> None:
    C.fail_value(
        isinstance(group_size, int) and group_size >= (2 if even else 1) and (not even or group_size % 2 == 0),
        op,
        lambda: f"group_size must be a positive{' even' if even else ''} int, got {group_size!r}",
    )


def check_uint8(t, name: str, op: str) -> None:
    C.check_tensor(t, name, op)
    C.fail_type(t.dtype == torch.uint8, op, lambda: f"{name} must be uint8, got {t.dtype}")
    C.fail_value(t.is_contiguous(), op, lambda: f"{name} must be contiguous")


def check_stats(scale, minimum, groups: int, op: str) -> None:
    for name, t in (("scale", scale), ("minimum", minimum)):
        C.check_tensor(t, name, op)
        C.fail_type(t.dtype == torch.float32, op, lambda: f"{name} must be float32, got {t.dtype}")
        C.check_shape(t, name, op, (groups,), "one value per group")
        C.fail_value(t.is_contiguous(), op, lambda: f"{name} must be contiguous")


def check_packed(packed, scale, minimum, numel: int, group_size: int, op: str) -> None:
    """A packed INT4 tensor of ``numel`` values: ``ceil(numel / 2)`` bytes, float32 stats per group."""
    check_uint8(packed, "packed", op)
    C.check_shape(packed, "packed", op, ((numel + 1) // 2,), "ceil(numel / 2) bytes")
    check_stats(scale, minimum, (numel + group_size - 1) // group_size, op)
    C.check_same_device(op, [("packed", packed), ("scale", scale), ("minimum", minimum)])


def check_projector(op, m, n, side, proj, indices, q_scale, q_min, rank, group_size, any_rank=False):
    """Validate a projector of any kind for an ``m x n`` matrix (``side`` already checked).

    The rank must lie in ``[1, min(m, n)]`` (the Adam ops), or with ``any_rank`` (the
    plain projection) in ``[1, K]``, ``K`` the projected dimension. Returns
    ``(rank, read)``: the projector's rank and its tensors as ``(name, tensor)`` pairs
    (for the device and aliasing checks).
    """
    if indices is None and q_scale is None and q_min is None:  # dense: the common case first
        r = _check_dense_projector(op, m, n, proj, side, any_rank)
        read = [("proj", proj)]
    elif indices is not None and q_scale is None and q_min is None:  # DCT
        s = n if side == "right" else m
        check_basis(op, proj, s, side)
        r = check_indices(op, indices, s, max_rank=None if any_rank else min(m, n))
        read = [("basis", proj), ("indices", indices)]
    elif indices is None and q_scale is not None and q_min is not None:  # packed INT4
        check_group_size(group_size, op, even=True)
        C.fail_value(isinstance(rank, int), op, lambda: f"rank must be an int, got {rank!r}")
        _check_rank(rank, m, n, side, op, any_rank)
        check_packed(proj, q_scale, q_min, rank * (n if side == "right" else m), group_size, op)
        return rank, [("packed", proj), ("scale", q_scale), ("minimum", q_min)]
    else:
        raise ValueError(
            f"{op}: a projector is dense (no indices, q_scale, q_min), DCT (indices) or packed INT4 "
            f"(q_scale and q_min), got indices={'set' if indices is not None else 'None'}, "
            f"q_scale={'set' if q_scale is not None else 'None'}, q_min={'set' if q_min is not None else 'None'}"
        )
    C.fail_value(rank == 0 or rank == r, op, lambda: f"rank must be 0 or the projector's rank {r}, got {rank!r}")
    C.fail_value(group_size == 0, op, lambda: f"group_size is for packed INT4 projectors only and must be 0, got {group_size!r}")
    return r, read


def _projector_rank(proj, side, indices, q_scale, rank) -> int:
    """The rank of an already validated projector (for the fake impls)."""
    if indices is not None:
        return indices.shape[0]
    if q_scale is not None:
        return rank
    return _proj_rank(proj, side)



def _check_hyper(op, beta1, beta2, eps):
    C.fail_value(0.0 <= beta1 < 1.0, op, lambda: f"beta1 must be in [0, 1), got {beta1}")
    C.fail_value(0.0 <= beta2 < 1.0, op, lambda: f"beta2 must be in [0, 1), got {beta2}")
    C.fail_value(eps >= 0.0, op, lambda: f"eps must be >= 0, got {eps}")


# --------------------------------------------------------------------------- validators
def validate_project(grad, proj, side, indices=None, q_scale=None, q_min=None, rank=0, group_size=0, *, op="project"):
    C.check_side(side, op)
    C.check_float(grad, "grad", op)
    C.check_ndim(grad, "grad", op, 2)
    m, n = grad.shape
    _, read = check_projector(op, m, n, side, proj, indices, q_scale, q_min, rank, group_size, any_rank=True)
    C.check_same_device(op, [("grad", grad)] + read)


def validate_project_adam(
    grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, indices=None, q_scale=None, q_min=None, rank=0,
    group_size=0, m_absmax=None, v_absmax=None, block_size=0, moment_seed=-1, *, op="project_adam_", _spans=None,
    _written=None,
):
    C.check_side(side, op)
    C.check_float(grad, "grad", op)
    C.check_ndim(grad, "grad", op, 2)
    m, n = grad.shape
    r, read = check_projector(op, m, n, side, proj, indices, q_scale, q_min, rank, group_size)
    written = C.check_moment_state(
        op, exp_avg, exp_avg_sq, lowrank_shape(m, n, r, side), grad.dtype, m_absmax, v_absmax, block_size,
        moment_seed,
    )
    _check_hyper(op, beta1, beta2, eps)
    C.check_same_device(op, [("grad", grad)] + read + written)
    C.check_no_overlap(op, written, [("grad", grad)] + read, spans=_spans)
    if _written is not None:
        _written.extend(written)
    return read


def validate_backproject_apply(
    param, update, proj, side, alpha, decay, indices=None, q_scale=None, q_min=None, rank=0, group_size=0,
    row_decay=None, row_alpha=None, *, op="backproject_apply_",
):
    C.check_side(side, op)
    C.check_float(param, "param", op)
    C.check_ndim(param, "param", op, 2)
    m, n = param.shape
    r, read = check_projector(op, m, n, side, proj, indices, q_scale, q_min, rank, group_size)
    C.check_float(update, "update", op)
    C.check_shape(update, "update", op, lowrank_shape(m, n, r, side), "the low-rank update's shape")
    for name, v in (("row_decay", row_decay), ("row_alpha", row_alpha)):
        if v is not None:
            C.check_tensor(v, name, op)
            C.fail_type(v.dtype == torch.float32, op, lambda: f"{name} must be float32, got {v.dtype}")
            C.check_shape(v, name, op, (m,), "one factor per row of param")
            read = read + [(name, v)]
    C.check_same_device(op, [("param", param), ("update", update)] + read)
    C.check_no_overlap(op, [("param", param)], [("update", update)] + read)


def validate_project_update_backproject(
    param, grad, proj, exp_avg, exp_avg_sq, side, lr, beta1, beta2, eps, step, weight_decay, scale, indices=None,
    q_scale=None, q_min=None, rank=0, group_size=0, m_absmax=None, v_absmax=None, block_size=0, moment_seed=-1, *,
    op="project_update_backproject_", _written=None,
):
    C.check_float(param, "param", op)
    C.check_ndim(param, "param", op, 2)
    spans = {}
    written = []
    read = validate_project_adam(
        grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, indices, q_scale, q_min, rank, group_size,
        m_absmax, v_absmax, block_size, moment_seed, op=op, _spans=spans, _written=written,
    )
    C.check_shape(grad, "grad", op, param.shape, "the parameter's shape")
    C.fail_value(step >= 1, op, lambda: f"step must be >= 1 (1-based, after increment), got {step}")
    C.fail_value(lr >= 0.0, op, lambda: f"lr must be >= 0, got {lr}")
    C.check_same_device(op, [("param", param), ("grad", grad)])
    C.check_no_overlap(op, [("param", param)] + written, [("grad", grad)] + read, spans=spans)
    if _written is not None:
        _written.extend(written)


# --------------------------------------------------------------------------- fakes
def _fake_project(grad, proj, side, indices=None, q_scale=None, q_min=None, rank=0, group_size=0):
    m, n = grad.shape
    r = _projector_rank(proj, side, indices, q_scale, rank)
    f64 = grad.dtype == torch.float64 or (q_scale is None and proj.dtype == torch.float64)
    return grad.new_empty(lowrank_shape(m, n, r, side), dtype=torch.float64 if f64 else torch.float32)


def _fake_project_adam(grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps, *projector):
    return exp_avg.new_empty(exp_avg.shape, dtype=ref.n_dtype(exp_avg))


# --------------------------------------------------------------------------- ops
_PROJECTOR_ARGS = "Tensor? indices=None, Tensor? q_scale=None, Tensor? q_min=None, int rank=0, int group_size=0"
# The moment format (8-bit: both absmax tensors; 16-bit stochastic rounding: moment_seed >= 0).
_MOMENT_ARGS = "Tensor(d!)? m_absmax=None, Tensor(e!)? v_absmax=None, int block_size=0, int moment_seed=-1"

project_op = define_op(
    "projection_project",
    f"(Tensor grad, Tensor proj, str side, {_PROJECTOR_ARGS}) -> Tensor",
    family="projection",
    triton=lambda: _kernels().projection_project_triton,
    cpp="projection_project_cpu",
    reference=ref.projection_project_ref,
    fake=_fake_project,
    validate=validate_project,
)

project_adam_op = define_op(
    "projection_project_adam",
    "(Tensor grad, Tensor proj, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, str side, "
    f"float beta1, float beta2, float eps, {_PROJECTOR_ARGS}, {_MOMENT_ARGS}) -> Tensor",
    family="projection",
    triton=lambda: _kernels().projection_project_adam_triton,
    cpp="projection_project_adam_cpu",
    reference=ref.projection_project_adam_ref,
    fake=_fake_project_adam,
    validate=validate_project_adam,
)

backproject_apply_op = define_op(
    "projection_backproject_apply",
    f"(Tensor(a!) param, Tensor update, Tensor proj, str side, float alpha, float decay, {_PROJECTOR_ARGS}, "
    "Tensor? row_decay=None, Tensor? row_alpha=None) -> ()",
    family="projection",
    triton=lambda: _kernels().projection_backproject_apply_triton,
    cpp="projection_backproject_apply_cpu",
    reference=ref.projection_backproject_apply_ref,
    fake=fake_no_output,
    validate=validate_backproject_apply,
)

project_update_backproject_op = define_op(
    "projection_project_update_backproject",
    "(Tensor(a!) param, Tensor grad, Tensor proj, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, str side, "
    f"float lr, float beta1, float beta2, float eps, int step, float weight_decay, float scale, {_PROJECTOR_ARGS}, "
    f"{_MOMENT_ARGS}) -> ()",
    family="projection",
    triton=lambda: _kernels().projection_project_update_backproject_triton,
    cpp="projection_project_update_backproject_cpu",
    reference=ref.projection_project_update_backproject_ref,
    fake=fake_no_output,
    validate=validate_project_update_backproject,
)


# --------------------------------------------------------------------------- multi-tensor form
projector_tail = ref.projector_tail


# One call for a bucket of parameters with one side, one projector kind and one set of
# Adam betas/eps: per-parameter tensors in lists, per-parameter lr / step / weight decay /
# scale in lists. The projector lists (indices, q_scale, q_min, rank) are empty when not
# given (a dense bucket; rank from the projectors), as the op schema has no optional lists. Reference: a loop over the single-tensor reference. C++: the same loop
# behind one dispatcher call. Triton: two grouped launches for the whole list
# (kernels/projection.py, "grouped kernels").
def _list_len(op, name, xs, n):
    C.fail_type(isinstance(xs, (list, tuple)), op, lambda: f"{name} must be a list, got {type(xs).__name__}")
    C.fail_value(len(xs) == n, op, lambda: f"{name} must have one entry per parameter ({n}), got {len(xs)}")


_LIST_NAMES = {"exp_avg": "exp_avgs", "exp_avg_sq": "exp_avg_sqs"}


def validate_foreach_project_update_backproject(
    params, grads, projs, exp_avgs, exp_avg_sqs, side, lr, beta1, beta2, eps, step, weight_decay, scale,
    indices=(), q_scale=(), q_min=(), rank=(), group_size=0, m_absmax=(), v_absmax=(), block_size=0, moment_seed=(),
    skip=None, coeffs=None, *, op="foreach_project_update_backproject_",
):
    n = len(params)
    for name, xs in (("grads", grads), ("projs", projs), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                     ("lr", lr), ("step", step), ("weight_decay", weight_decay), ("scale", scale)):
        _list_len(op, name, xs, n)
    for name, xs in (("indices", indices), ("q_scale", q_scale), ("q_min", q_min), ("rank", rank),
                     ("m_absmax", m_absmax), ("v_absmax", v_absmax), ("moment_seed", moment_seed)):
        if len(xs):  # an empty list: not given (the dense kind, rank taken from the projectors, plain moments)
            _list_len(op, name, xs, n)
    C.check_list_devices(op, [("params", params), ("grads", grads), ("projs", projs), ("exp_avgs", exp_avgs),
                              ("exp_avg_sqs", exp_avg_sqs), ("indices", indices), ("q_scale", q_scale),
                              ("q_min", q_min), ("m_absmax", m_absmax), ("v_absmax", v_absmax), ("skip", skip),
                              ("coeffs", coeffs)])
    written = []
    for i in range(n):
        tail = projector_tail(indices, q_scale, q_min, rank, group_size, i)
        mine = []
        validate_project_update_backproject(
            params[i], grads[i], projs[i], exp_avgs[i], exp_avg_sqs[i], side, lr[i], beta1, beta2, eps, step[i],
            weight_decay[i], scale[i], *tail, *ref.moment_tail(m_absmax, v_absmax, block_size, moment_seed, i),
            op=f"{op} (parameter {i})", _written=mine,
        )
        written += [(f"params[{i}]", params[i])] + [(f"{_LIST_NAMES.get(name, name)}[{i}]", t) for name, t in mine]
    flags = _check_device_flags(op, params, skip, coeffs)
    # Across parameters: no written tensor may share memory with another entry's tensors
    # (nor with the device flags).
    if n > 1 or flags:
        read = list(flags)
        for i in range(n if n > 1 else 0):
            read += [(f"grads[{i}]", grads[i]), (f"projs[{i}]", projs[i])]
        C.check_no_overlap(op, written, read)


def _check_device_flags(op, params, skip, coeffs) -> list:
    """``skip``: None or a bool/uint8 vector with one entry per parameter; ``coeffs``: None or
    a float32/float64 ``(n, 2)`` tensor; both contiguous, on the parameters' device. Returns
    the given ones as ``(name, tensor)`` pairs (for the aliasing check)."""
    n = len(params)
    out = []
    device = params[0].device if n else None
    for name, t, dtypes, shape in (("skip", skip, (torch.bool, torch.uint8), (n,)),
                                   ("coeffs", coeffs, (torch.float32, torch.float64), (n, 2))):
        if t is None:
            continue
        C.fail_type(isinstance(t, torch.Tensor), op, lambda: f"{name} must be a Tensor or None, got {type(t).__name__}")
        C.fail_type(t.dtype in dtypes, op,
                    lambda: f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
        C.fail_value(tuple(t.shape) == shape, op,
                     lambda: f"{name} must have shape {shape} (one entry per parameter), got {tuple(t.shape)}")
        C.fail_value(device is None or t.device == device, op,
                     lambda: f"{name} must be on the parameters' device {device}, got {t.device}")
        C.fail_value(t.is_contiguous(), op, lambda: f"{name} must be contiguous")
        out.append((name, t))
    return out


def _foreach_cache_key(
    params, grads, projs, exp_avgs, exp_avg_sqs, side, lr, beta1, beta2, eps, step, weight_decay, scale,
    indices=(), q_scale=(), q_min=(), rank=(), group_size=0, m_absmax=(), v_absmax=(), block_size=0, moment_seed=(),
    skip=None, coeffs=None,
):
    """What the structural checks of :func:`validate_foreach_project_update_backproject` read:
    every tensor's signature (pointer, shape, strides, dtype, device, per list; for the
    gradients and the device flags all but the pointer), the side, ranks, group size, block
    size, which moment seeds are given (>= 0), the list lengths and the CPU DCT indices'
    version counters. The rest (betas, eps, lr, step, the gradients' and flags' memory) is
    :func:`_foreach_recheck`'s."""
    sig = C.tensor_signature(params, projs, exp_avgs, exp_avg_sqs, indices, q_scale, q_min, m_absmax, v_absmax)
    grads_sig = C.layout_signature(grads)
    flags_sig = C.layout_signature([t for t in (skip, coeffs) if t is not None])
    if sig is None or grads_sig is None or flags_sig is None:
        return None
    # The CPU DCT indices' version counters: their values are read again (full validation)
    # only after an in-place write, so a cached call reads no tensor value (capturable=True);
    # a refresh stores new index tensors, which changes the signature.
    try:
        versions = tuple(t._version for t in indices) if len(indices) and indices[0].device.type == "cpu" else ()
    except RuntimeError:  # inference tensors have no version counter: not cached
        return None
    return (side, tuple(rank), group_size, block_size, tuple(s >= 0 for s in moment_seed), len(lr), len(step),
            len(weight_decay), len(scale), skip is None, coeffs is None, versions, sig, grads_sig, flags_sig)


def _foreach_remember(
    params, grads, projs, exp_avgs, exp_avg_sqs, side, lr, beta1, beta2, eps, step, weight_decay, scale,
    indices=(), q_scale=(), q_min=(), rank=(), group_size=0, m_absmax=(), v_absmax=(), block_size=0, moment_seed=(),
    skip=None, coeffs=None,
):
    """The in-place outputs' memory of a validated call, for :func:`_foreach_recheck`'s gradient check."""
    return C.SpanIndex([*params, *exp_avgs, *exp_avg_sqs, *m_absmax, *v_absmax])


def _foreach_recheck(
    written, params, grads, projs, exp_avgs, exp_avg_sqs, side, lr, beta1, beta2, eps, step, weight_decay, scale,
    indices=(), q_scale=(), q_min=(), rank=(), group_size=0, m_absmax=(), v_absmax=(), block_size=0, moment_seed=(),
    skip=None, coeffs=None,
):
    """The checks a cached key does not cover, in a few comparisons: scalar ranges, no
    gradient or device flag in the memory of an in-place output (``written``, the
    :class:`~._checks.SpanIndex` of the validated call). The DCT indices' values are covered
    by the key (their version counters). When one fails, the full validator runs and raises
    its exact error."""
    ok = 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and eps >= 0.0
    ok = ok and all(t >= 1 for t in step) and all(x >= 0.0 for x in lr)
    ok = ok and not written.any_overlap(grads)
    ok = ok and not written.any_overlap((skip, coeffs))
    if not ok:
        validate_foreach_project_update_backproject(
            params, grads, projs, exp_avgs, exp_avg_sqs, side, lr, beta1, beta2, eps, step, weight_decay, scale,
            indices, q_scale, q_min, rank, group_size, m_absmax, v_absmax, block_size, moment_seed, skip, coeffs,
        )


foreach_project_update_backproject_op = define_op(
    "projection_foreach_project_update_backproject",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] projs, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "str side, float[] lr, float beta1, float beta2, float eps, int[] step, float[] weight_decay, float[] scale, "
    "Tensor[] indices, Tensor[] q_scale, Tensor[] q_min, int[] rank, int group_size, Tensor(d!)[] m_absmax, "
    "Tensor(e!)[] v_absmax, int block_size, int[] moment_seed, Tensor? skip=None, Tensor? coeffs=None) -> ()",
    family="projection",
    triton=lambda: _kernels().projection_foreach_project_update_backproject_triton,
    cpp="projection_foreach_project_update_backproject_cpu",
    reference=ref.projection_foreach_project_update_backproject_ref,
    fake=fake_no_output,
    validate=validate_foreach_project_update_backproject,
    cache_key=_foreach_cache_key,
    recheck=_foreach_recheck,
    remember=_foreach_remember,
)


# --------------------------------------------------------------------------- structured projectors
# A projector need not be a dense tensor. A projector type either maps itself onto the
# ops' projector arguments (``op_args``: DCTProjector, Int4Projector), or, for a kind the
# ops do not know, supplies its own implementation of each public function.
_STRUCTURED = {}


def register_projector_type(cls, *, op_args=None, project_adam_=None, backproject_apply_=None,
                            project_update_backproject_=None):
    """Let ``cls`` instances stand in for ``proj`` in the public projection functions.

    Either ``op_args(proj, side, m, n, op) -> (proj_tensor, indices, q_scale, q_min, rank,
    group_size)``, the projector as the ops' projector arguments (see the module doc;
    it may raise a clear error for a projector that does not fit ``side`` / ``m x n``),
    or all three callables, each taking the public function's arguments (``proj`` being
    the ``cls`` instance), validating them and running the step on its own ops.
    """
    impls = (project_adam_, backproject_apply_, project_update_backproject_)
    if op_args is None and any(f is None for f in impls):
        raise TypeError("register_projector_type: give op_args, or project_adam_, backproject_apply_ and "
                        "project_update_backproject_")
    _STRUCTURED[cls] = {
        "op_args": op_args,
        "project_adam_": project_adam_,
        "backproject_apply_": backproject_apply_,
        "project_update_backproject_": project_update_backproject_,
    }


_DENSE_TAIL = (None, None, None, 0, 0)


def _structured(proj, fn_name):
    """None for a dense tensor, else the registered entry of ``proj``'s type."""
    if isinstance(proj, torch.Tensor):
        return None
    for cls, impls in _STRUCTURED.items():
        if isinstance(proj, cls):
            return impls
    raise TypeError(
        f"{fn_name}: proj must be a Tensor or one of {[c.__name__ for c in _STRUCTURED]}, got {type(proj).__name__}"
    )


def _matrix_shape(t, name, op):
    C.check_float(t, name, op)
    C.check_ndim(t, name, op, 2)
    return t.shape


def _op_args(entry, proj, side, mat, name, op):
    m, n = _matrix_shape(mat, name, op)
    C.check_side(side, op)
    return entry["op_args"](proj, side, m, n, op)


# --------------------------------------------------------------------------- public API
def project(grad, proj, *, side):
    """``R = G P^T`` (``side="right"``) or ``P^T G`` (``side="left"``): the projection alone.

    ``proj`` is a dense tensor, a :class:`~lowrank_kernels.ops.DCTProjector` or an
    :class:`~lowrank_kernels.ops.Int4Projector`. Returns a new float32 tensor (float64 when
    the gradient or a dense/DCT projector is float64) of the low-rank shape.
    """
    entry = _structured(proj, "project")
    if entry is None:
        return _eager_project_op(grad, proj, side)
    if entry["op_args"] is None:
        raise TypeError(f"project: {type(proj).__name__} does not map onto the projection ops' projector arguments")
    p, *tail = _op_args(entry, proj, side, grad, "grad", "project")
    return _eager_project_op(grad, p, side, *tail)


def moment_op_args(m_absmax, v_absmax, block_size, moment_seed) -> tuple:
    """The ops' trailing moment arguments from the public keywords: ``block_size`` is
    passed only for 8-bit moments (0 otherwise), ``moment_seed`` None -> -1."""
    eight = m_absmax is not None or v_absmax is not None
    return m_absmax, v_absmax, (block_size if eight else 0), (-1 if moment_seed is None else moment_seed)


def _plain_moments(m_absmax, v_absmax, moment_seed) -> bool:
    return m_absmax is None and v_absmax is None and (moment_seed is None or moment_seed < 0)


def project_adam_(grad, proj, exp_avg, exp_avg_sq, *, side, beta1=0.9, beta2=0.999, eps=1e-8, m_absmax=None,
                  v_absmax=None, block_size=256, moment_seed=None):
    """Project the gradient and run the Adam moment update in the subspace.

    ``R = G P^T`` (``side="right"``, ``proj`` is ``r x n``) or ``R = P^T G``
    (``side="left"``, ``proj`` is ``m x r``), computed with float32 accumulation;
    then ``exp_avg <- beta1 exp_avg + (1 - beta1) R`` and
    ``exp_avg_sq <- beta2 exp_avg_sq + (1 - beta2) R^2`` in place. ``proj`` may also be a
    :class:`~lowrank_kernels.ops.DCTProjector` or an :class:`~lowrank_kernels.ops.Int4Projector`.

    Moment formats (module doc): plain floating moments; bfloat16 moments stored with
    stochastic rounding when ``moment_seed`` is an int >= 0; 8-bit moments when
    ``m_absmax`` and ``v_absmax`` are given (``exp_avg`` / ``exp_avg_sq`` then hold uint8
    codes, blocks of ``block_size`` along the last dim; see :func:`moments8_zeros`).

    Returns ``N = exp_avg / (sqrt(exp_avg_sq) + eps)`` (no bias correction), a new
    tensor of the low-rank shape in the moments' dtype (float32 for 8-bit moments).
    """
    entry = _structured(proj, "project_adam_")
    hyper = (side, float(beta1), float(beta2), float(eps))
    mom = moment_op_args(m_absmax, v_absmax, block_size, moment_seed)
    if entry is None:
        if _plain_moments(m_absmax, v_absmax, moment_seed):
            return _eager_project_adam_op(grad, proj, exp_avg, exp_avg_sq, *hyper)
        return _eager_project_adam_op(grad, proj, exp_avg, exp_avg_sq, *hyper, *_DENSE_TAIL, *mom)
    if entry["op_args"] is None:
        _no_custom_moments(proj, m_absmax, v_absmax, moment_seed, "project_adam_")
        return entry["project_adam_"](grad, proj, exp_avg, exp_avg_sq, side=side, beta1=beta1, beta2=beta2, eps=eps)
    p, *tail = _op_args(entry, proj, side, grad, "grad", "project_adam_")
    return _eager_project_adam_op(grad, p, exp_avg, exp_avg_sq, *hyper, *tail, *mom)


def _no_custom_moments(proj, m_absmax, v_absmax, moment_seed, fn):
    if not _plain_moments(m_absmax, v_absmax, moment_seed):
        raise TypeError(f"{fn}: 8-bit / stochastically rounded moments are not supported for {type(proj).__name__}")


def backproject_apply_(param, update, proj, *, side, alpha, decay=1.0, row_decay=None, row_alpha=None):
    """``param <- decay * param + alpha * back(update)`` in place, with no full-size temporary.

    ``back(N) = N P`` for ``side="right"`` and ``P N`` for ``side="left"``; ``proj`` as in
    :func:`project_adam_`.

    ``row_decay`` / ``row_alpha``: optional float32 vectors of length ``m`` (one factor per
    row of ``param``, either side), combined with the scalars:
    ``param <- diag(decay * row_decay) param + diag(alpha * row_alpha) back(update)``
    (e.g. per-row weight decay and per-row learning rates).
    """
    entry = _structured(proj, "backproject_apply_")
    rows = () if row_decay is None and row_alpha is None else (row_decay, row_alpha)
    if entry is None:
        if rows:
            _eager_backproject_apply_op(param, update, proj, side, float(alpha), float(decay), *_DENSE_TAIL, *rows)
        else:
            _eager_backproject_apply_op(param, update, proj, side, float(alpha), float(decay))
        return
    if entry["op_args"] is None:
        if rows:
            raise TypeError(f"backproject_apply_: row_decay / row_alpha are not supported for {type(proj).__name__}")
        return entry["backproject_apply_"](param, update, proj, side=side, alpha=alpha, decay=decay)
    p, *tail = _op_args(entry, proj, side, param, "param", "backproject_apply_")
    _eager_backproject_apply_op(param, update, p, side, float(alpha), float(decay), *tail, *rows)


def project_update_backproject_(
    param, grad, proj, exp_avg, exp_avg_sq, *, side, lr, beta1=0.9, beta2=0.999, eps=1e-8, step,
    weight_decay=0.0, scale=1.0, m_absmax=None, v_absmax=None, block_size=256, moment_seed=None,
):
    """One GaLore-Adam step on a 2-D parameter, in place.

    ``N = project_adam_(...)``; with ``step_size = lr * sqrt(1 - beta2^step) / (1 - beta1^step)``:
    ``param <- (1 - lr * weight_decay) * param - step_size * scale * back(N)``
    (torch.optim.AdamW's order: decay first, on the old weight). ``step`` is 1-based.
    ``proj`` and the moment format (``m_absmax``, ``v_absmax``, ``block_size``,
    ``moment_seed``) as in :func:`project_adam_`.
    """
    entry = _structured(proj, "project_update_backproject_")
    hyper = (side, float(lr), float(beta1), float(beta2), float(eps), int(step), float(weight_decay), float(scale))
    mom = moment_op_args(m_absmax, v_absmax, block_size, moment_seed)
    if entry is None:
        if _plain_moments(m_absmax, v_absmax, moment_seed):
            _eager_project_update_backproject_op(param, grad, proj, exp_avg, exp_avg_sq, *hyper)
        else:
            _eager_project_update_backproject_op(param, grad, proj, exp_avg, exp_avg_sq, *hyper, *_DENSE_TAIL, *mom)
        return
    if entry["op_args"] is None:
        _no_custom_moments(proj, m_absmax, v_absmax, moment_seed, "project_update_backproject_")
        return entry["project_update_backproject_"](
            param, grad, proj, exp_avg, exp_avg_sq, side=side, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            step=step, weight_decay=weight_decay, scale=scale,
        )
    p, *tail = _op_args(entry, proj, side, param, "param", "project_update_backproject_")
    _eager_project_update_backproject_op(param, grad, p, exp_avg, exp_avg_sq, *hyper, *tail, *mom)


def foreach_project_update_backproject_(
    params, grads, projs, exp_avgs, exp_avg_sqs, *, side, lr, beta1=0.9, beta2=0.999, eps=1e-8, step,
    weight_decay=0.0, scale=1.0, m_absmax=None, v_absmax=None, block_size=256, moment_seed=None, skip=None,
    coeffs=None,
):
    """:func:`project_update_backproject_` over lists of parameters in one op call.

    ``params``, ``grads``, ``projs``, ``exp_avgs``, ``exp_avg_sqs``: one entry per
    parameter; ``lr``, ``step``, ``weight_decay``, ``scale``: a number for all or a list
    with one per parameter. One ``side``; ``projs`` all dense tensors, all
    :class:`~lowrank_kernels.ops.DCTProjector`, or all :class:`~lowrank_kernels.ops.Int4Projector`
    (one bucket: one projector kind). Everything is validated before anything is written.

    Moment format (one bucket: one format): ``m_absmax`` / ``v_absmax`` None or lists with
    one float32 absmax tensor per parameter (8-bit moments, blocks of ``block_size``);
    ``moment_seed`` None or a list with one int per parameter (bfloat16 stochastic
    rounding where >= 0, None entries -> -1).

    Device-side control (no host read of a tensor value, so the call can be captured in a
    CUDA graph):

    - ``skip``: None or a bool/uint8 tensor of shape ``(n,)`` on the parameters' device; a
      parameter whose entry is nonzero is left exactly as it was (weight, moments, 8-bit
      absmax). The C++ backend reads the flags through a data pointer, the Triton kernels
      load them and mask every store off, the reference restores with ``torch.where``.
    - ``coeffs``: None or a float32/float64 tensor of shape ``(n, 2)`` on the parameters'
      device: per parameter ``(a, d)`` with ``param <- d * param - a * back(N)``, i.e.
      ``a = step_size * scale`` and ``d = 1 - lr * weight_decay`` computed on the device
      (e.g. from device step counts). When given, ``lr``, ``step``, ``weight_decay`` and
      ``scale`` are validated but not used.
    """
    op = "foreach_project_update_backproject_"
    n = len(params)

    def per_param(name, v, cast):
        if isinstance(v, (list, tuple)):
            return [cast(x) for x in v]
        return [cast(v)] * n

    lr_l, step_l = per_param("lr", lr, float), per_param("step", step, int)
    wd_l, sc_l = per_param("weight_decay", weight_decay, float), per_param("scale", scale, float)
    projs = list(projs)
    C.fail_value(len(projs) == n, op, lambda: f"projs must have one entry per parameter ({n}), got {len(projs)}")
    kinds = {type(p) for p in projs}
    if not projs or all(isinstance(p, torch.Tensor) for p in projs):
        tail = ([], [], [], [], 0)
        dense = projs
    else:
        C.fail_type(len(kinds) == 1, op, lambda: f"projs must all be of one kind, got {sorted(k.__name__ for k in kinds)}")
        entry = _structured(projs[0], op)
        C.fail_type(entry is not None and entry["op_args"] is not None, op,
                    lambda: f"{type(projs[0]).__name__} does not map onto the projection ops' projector arguments")
        args = None
        if side in ("left", "right") and all(type(w) in C._PLAIN_TENSOR_TYPES for w in params):
            # Plain tensors: the projector arguments without the per-parameter checks of
            # _op_args (the op's validator checks every parameter); on any failure the
            # checked path below raises its error.
            op_args = entry["op_args"]
            try:
                args = [op_args(p, side, *w.shape, op) for p, w in zip(projs, params)]
            except Exception:  # noqa: BLE001 - re-run with the checks for the exact error
                args = None
        if args is None:
            args = [_op_args(entry, p, side, w, "params", op) for p, w in zip(projs, params)]
        dense = [a[0] for a in args]
        idx, qs, qm, rk, gs = zip(*[a[1:] for a in args])
        C.fail_value(len(set(gs)) == 1, op, lambda: f"projs must share one group_size, got {sorted(set(gs))}")
        tail = (
            [] if idx[0] is None else list(idx), [] if qs[0] is None else list(qs),
            [] if qm[0] is None else list(qm), list(rk), gs[0],
        )
    _eager_foreach_project_update_backproject_op(
        list(params), list(grads), dense, list(exp_avgs), list(exp_avg_sqs), side, lr_l, float(beta1), float(beta2),
        float(eps), step_l, wd_l, sc_l, *tail, *foreach_moment_args(op, m_absmax, v_absmax, block_size, moment_seed),
        *(() if skip is None and coeffs is None else (skip, coeffs)),
    )


def foreach_moment_args(op, m_absmax, v_absmax, block_size, moment_seed) -> tuple:
    """The multi-tensor ops' moment lists from the public keywords (None -> empty list)."""
    def as_list(name, v):
        if v is None:
            return []
        C.fail_type(isinstance(v, (list, tuple)), op, lambda: f"{name} must be a list or None, got {type(v).__name__}")
        return list(v)

    ma, va = as_list("m_absmax", m_absmax), as_list("v_absmax", v_absmax)
    seeds = [-1 if x is None else x for x in as_list("moment_seed", moment_seed)]
    eight = m_absmax is not None or v_absmax is not None
    return ma, va, (block_size if eight else 0), seeds


# Eager callers of the ops (see _registry.eager_caller): the public functions above call these.
_eager_project_op = eager_caller(project_op)
_eager_project_adam_op = eager_caller(project_adam_op)
_eager_backproject_apply_op = eager_caller(backproject_apply_op)
_eager_project_update_backproject_op = eager_caller(project_update_backproject_op)
_eager_foreach_project_update_backproject_op = eager_caller(foreach_project_update_backproject_op)


# --------------------------------------------------------------------------- sample inputs
from ._projection_samples import _sample_moments8, sample_inputs  # noqa: E402,F401


# Old spelling, kept for one release (warns).
from lowrank_kernels._deprecation import deprecated_names as _deprecated_names  # noqa: E402

__getattr__ = _deprecated_names(__name__, {"low_rank_shape": "lowrank_shape"})
