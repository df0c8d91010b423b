"""The adafactor family: GaLore-Adafactor's non-refresh step over a list of weights in one op call.

Op (``torch.ops.lowrank_kernels.*``):

- ``adafactor_foreach_update(params![], grads[], projs[], exp_avg_sq_row![], exp_avg_sq_col![],
  exp_avg![], m_absmax![], side, eps1, eps2, clip_threshold, beta1, scale_parameter, beta2t, lr,
  weight_decay, alpha, block_size, moment_seed) -> ()`` (Python: :func:`foreach_adafactor_update_`).

Per entry (the specification: ``lowrank_kernels/reference/adafactor.py``): ``R`` = the projected
gradient, the factored second moment of ``R^2 + eps1`` (row and column moving averages), the
update ``R`` scaled by their reciprocal square roots, clipped to RMS ``clip_threshold`` and
multiplied by the step size (relative, optionally times ``max(eps2, RMS(W))``), the optional
first moment (float32, bfloat16 with stochastic rounding, or 8-bit), the decoupled weight decay,
then ``W <- decay W + alpha back(upd)``. Bit-identical on CPU to ``GaLoreAdafactor``'s
per-parameter step.

Backends: the reference (a loop; serves every device), C++ (the loop behind one dispatcher
call, float32 weights on CPU) and Triton (``kernels/adafactor.py``: the scaling of every
entry's update by its factored second moment in one grouped launch, the rest per entry).
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import adafactor as ref

from . import _checks as C
from ._registry import define_op, eager_caller, fake_no_output


def _kernels():
    """The family's Triton launcher module, imported on first use (triton is optional)."""
    from lowrank_kernels.kernels import adafactor as kernels

    return kernels


_OP = "foreach_adafactor_update_"


def _check_hyper(op, eps1, eps2, clip_threshold, beta1, beta2t):
    C.fail_value(eps1 >= 0.0, op, lambda: f"eps1 must be >= 0, got {eps1}")
    C.fail_value(eps2 >= 0.0, op, lambda: f"eps2 must be >= 0, got {eps2}")
    C.fail_value(clip_threshold > 0.0, op, lambda: f"clip_threshold must be > 0, got {clip_threshold}")
    C.fail_value(0.0 <= beta1 < 1.0, op, lambda: f"beta1 must be in [0, 1), got {beta1}")
    for i, b in enumerate(beta2t):
        C.fail_value(0.0 <= b < 1.0, op, lambda: f"beta2t must be in [0, 1), got {b} at entry {i}")


def validate_foreach_adafactor_update(params, grads, projs, exp_avg_sq_row, exp_avg_sq_col, exp_avg, m_absmax, side,
                                      eps1, eps2, clip_threshold, beta1, scale_parameter, beta2t, lr, weight_decay,
                                      alpha, block_size=0, moment_seed=(), *, op=_OP):
    n = len(params)
    C.check_lists(op, n, (("grads", grads), ("projs", projs), ("exp_avg_sq_row", exp_avg_sq_row),
                          ("exp_avg_sq_col", exp_avg_sq_col), ("beta2t", beta2t), ("lr", lr),
                          ("weight_decay", weight_decay), ("alpha", alpha)),
                  (("exp_avg", exp_avg), ("m_absmax", m_absmax), ("moment_seed", moment_seed)))
    C.check_side(side, op)
    _check_hyper(op, eps1, eps2, clip_threshold, beta1, beta2t)
    C.fail_value(len(m_absmax) == 0 or len(exp_avg) > 0, op, "m_absmax is given without exp_avg")
    C.fail_value(len(moment_seed) == 0 or len(exp_avg) > 0, op, "moment_seed is given without exp_avg")
    eight = len(m_absmax) > 0
    C.fail_value(block_size == 0 or eight, op,
                 lambda: f"block_size is for an 8-bit exp_avg (m_absmax given) only and must be 0, got {block_size}")
    if eight:
        C.fail_value(1 <= block_size <= 256, op, lambda: f"block_size must be in [1, 256] for 8-bit moments, got "
                                                         f"{block_size}")
    C.check_list_devices(op, [("params", params), ("grads", grads), ("projs", projs), ("exp_avg_sq_row", exp_avg_sq_row),
                              ("exp_avg_sq_col", exp_avg_sq_col), ("exp_avg", exp_avg), ("m_absmax", m_absmax)])
    written = []
    for i in range(n):
        where = f"{op} (entry {i})"
        p, g, pr = params[i], grads[i], projs[i]
        m, k, r = C.check_dense_projector_entry(p, g, pr, side, where)
        rows, cols = (m, r) if side == "right" else (r, k)
        mine = []
        for name, t, length, what in (("exp_avg_sq_row", exp_avg_sq_row[i], rows, "R's rows"),
                                      ("exp_avg_sq_col", exp_avg_sq_col[i], cols, "R's columns")):
            C.check_float(t, name, where, (torch.float32,))
            C.check_shape(t, name, where, (length,), f"one value per {what}")
            C.fail_value(t.is_contiguous(), where, lambda: f"{name} must be contiguous")
            mine.append((name, t))
        if len(exp_avg):
            ea = exp_avg[i]
            C.check_tensor(ea, "exp_avg", where)
            C.check_shape(ea, "exp_avg", where, (rows, cols), "the low-rank gradient's shape")
            C.fail_value(ea.is_contiguous(), where, "exp_avg must be contiguous")
            seed = moment_seed[i] if len(moment_seed) else -1
            C.fail_type(isinstance(seed, int) and not isinstance(seed, bool), where,
                        lambda: f"moment_seed must be an int, got {seed!r}")
            if eight:
                C.fail_type(ea.dtype == torch.uint8, where,
                            lambda: f"exp_avg must be uint8 codes for an 8-bit first moment, got {ea.dtype}")
                C.fail_value(seed < 0, where, "moment_seed >= 0 (stochastic rounding) is for a bfloat16 exp_avg; "
                                              "8-bit moments round to nearest")
                am = m_absmax[i]
                C.check_tensor(am, "m_absmax", where)
                C.fail_type(am.dtype == torch.float32, where, lambda: f"m_absmax must be float32, got {am.dtype}")
                C.check_shape(am, "m_absmax", where, (rows, -(-cols // block_size)),
                              lambda: f"(rows, ceil(cols / block_size)) with block_size {block_size}")
                C.fail_value(am.is_contiguous(), where, "m_absmax must be contiguous")
                mine.append(("m_absmax", am))
            else:
                C.fail_type(ea.dtype in (torch.float32, torch.bfloat16), where,
                            lambda: f"exp_avg must be float32, bfloat16 (with moment_seed) or uint8 codes (with "
                                    f"m_absmax), got {ea.dtype}")
                C.fail_value((ea.dtype == torch.bfloat16) == (seed >= 0), where,
                             lambda: f"a bfloat16 exp_avg needs moment_seed >= 0 (stochastic rounding) and only it "
                                     f"takes one, got {ea.dtype} and moment_seed={seed}")
            mine.append(("exp_avg", ea))
        C.check_same_device(where, [("params", p), ("grads", g), ("projs", pr)] + mine)
        written += [(f"params[{i}]", p)] + [(f"{name}[{i}]", t) for name, t in mine]
    C.check_no_overlap(op, written, [(f"grads[{i}]", g) for i, g in enumerate(grads)] +
                       [(f"projs[{i}]", t) for i, t in enumerate(projs)])


def _cache_key(params, grads, projs, exp_avg_sq_row, exp_avg_sq_col, exp_avg, m_absmax, side, eps1, eps2,
               clip_threshold, beta1, scale_parameter, beta2t, lr, weight_decay, alpha, block_size=0, moment_seed=()):
    """What the structural checks read: the tensors' signatures (the gradients' without their
    pointers), the side, block size, which moment seeds are given and the list lengths. The
    hyper-parameters and the gradients' memory are the recheck's."""
    sig = C.tensor_signature(params, projs, exp_avg_sq_row, exp_avg_sq_col, exp_avg, m_absmax)
    grads_sig = C.layout_signature(grads)
    if sig is None or grads_sig is None:
        return None
    return (side, block_size, tuple(type(s) is int and s >= 0 for s in moment_seed), len(moment_seed), len(beta2t),
            len(lr), len(weight_decay), len(alpha), sig, grads_sig)


def _remember(params, grads, projs, exp_avg_sq_row, exp_avg_sq_col, exp_avg, m_absmax, *rest):
    return C.SpanIndex([*params, *exp_avg_sq_row, *exp_avg_sq_col, *exp_avg, *m_absmax])


def _recheck(written, params, grads, projs, exp_avg_sq_row, exp_avg_sq_col, exp_avg, m_absmax, side, eps1, eps2,
             clip_threshold, beta1, scale_parameter, beta2t, *rest):
    ok = (eps1 >= 0.0 and eps2 >= 0.0 and clip_threshold > 0.0 and 0.0 <= beta1 < 1.0
          and all(0.0 <= b < 1.0 for b in beta2t) and not written.any_overlap(grads))
    if not ok:
        validate_foreach_adafactor_update(params, grads, projs, exp_avg_sq_row, exp_avg_sq_col, exp_avg, m_absmax,
                                          side, eps1, eps2, clip_threshold, beta1, scale_parameter, beta2t, *rest)


foreach_adafactor_update_op = define_op(
    "adafactor_foreach_update",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] projs, Tensor(b!)[] exp_avg_sq_row, Tensor(c!)[] exp_avg_sq_col, "
    "Tensor(d!)[] exp_avg, Tensor(e!)[] m_absmax, str side, float eps1, float eps2, float clip_threshold, "
    "float beta1, bool scale_parameter, float[] beta2t, float[] lr, float[] weight_decay, float[] alpha, "
    "int block_size, int[] moment_seed) -> ()",
    family="adafactor",
    triton=lambda: _kernels().adafactor_foreach_update_triton,
    cpp="adafactor_foreach_update_cpu",
    reference=ref.adafactor_foreach_update_ref,
    fake=fake_no_output,
    validate=validate_foreach_adafactor_update,
    cache_key=_cache_key,
    recheck=_recheck,
    remember=_remember,
)
_eager_op = eager_caller(foreach_adafactor_update_op)


def foreach_adafactor_update_(params, grads, projs, exp_avg_sq_row, exp_avg_sq_col, *, side, eps1, eps2,
                              clip_threshold, beta2t, lr, weight_decay, alpha, scale_parameter=False, beta1=0.0,
                              exp_avg=None, m_absmax=None, block_size=256, moment_seed=None) -> None:
    """GaLore-Adafactor's non-refresh step on a list of 2-D float32 weights, in place, in one op call.

    Per weight ``i`` with its dense projector ``projs[i]`` (``r x n`` for ``side="right"``,
    ``m x r`` for ``"left"``, float32) and ``R`` = the projected gradient (``rows x cols``):
    ``U = R^2 + eps1``; the factored second moment ``exp_avg_sq_row[i]`` (``rows``) and
    ``exp_avg_sq_col[i]`` (``cols``), float32, move towards ``U``'s row and column means with
    weight ``1 - beta2t[i]``; ``upd = R * rsqrt(row / mean(row))[:, None] * rsqrt(col)[None, :]``,
    divided by ``max(1, RMS(upd) / clip_threshold)``, times ``lr_t = lr[i]`` (times
    ``max(eps2, RMS(W))`` with ``scale_parameter``). With ``exp_avg`` (``R``'s shape: float32,
    bfloat16 with ``moment_seed`` for stochastic rounding, or uint8 codes with ``m_absmax`` and
    ``block_size`` for 8-bit): ``m <- beta1 m + (1 - beta1) upd``, ``upd = m``. Then the decay
    ``1 - weight_decay[i] lr_t`` and ``W <- decay W + alpha[i] back(upd)``. ``beta2t``, ``lr``,
    ``weight_decay``, ``alpha``: one number per weight. Every entry is validated before anything
    is written.
    """
    ea = [] if exp_avg is None else list(exp_avg)
    ma = [] if m_absmax is None else list(m_absmax)
    seeds = [] if moment_seed is None else [-1 if s is None else int(s) for s in moment_seed]
    _eager_op(list(params), list(grads), list(projs), list(exp_avg_sq_row), list(exp_avg_sq_col), ea, ma, side,
              float(eps1), float(eps2), float(clip_threshold), float(beta1), bool(scale_parameter),
              [float(x) for x in beta2t], [float(x) for x in lr], [float(x) for x in weight_decay],
              [float(x) for x in alpha], int(block_size) if ma else 0, seeds)


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the adafactor family's op, for ``torch.library.opcheck``: both sides,
    with and without the first moment (float32, 8-bit, bf16 stochastic rounding), with and
    without ``scale_parameter`` and weight decay."""
    from lowrank_kernels.reference.moments import moments_quantize_ref

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    def orth(k, r):
        return torch.linalg.qr(randn(k, r)).Q.contiguous()

    out = []
    shapes, r = [(6, 9), (7, 5)], 2
    for side, first, scale_param in (("right", False, False), ("left", True, True), ("right", True, False)):
        projs = [orth(n, r).T.contiguous() if side == "right" else orth(m, r) for m, n in shapes]
        low = [(m, r) if side == "right" else (r, n) for m, n in shapes]
        out.append(("adafactor_foreach_update", f"{side}-{'beta1' if first else 'nobeta1'}-"
                    f"{'scaled' if scale_param else 'plain'}", (
                        [randn(*s) for s in shapes], [randn(*s) for s in shapes], projs,
                        [randn(s[0]).abs() for s in low], [randn(s[1]).abs() for s in low],
                        [randn(*s) for s in low] if first else [], [], side, 1e-30, 1e-3, 1.0, 0.9 if first else 0.0,
                        scale_param, [0.5, 0.8], [1e-2, 2e-2], [0.1, 0.0], [-1.0, -0.5], 0, [])))
    codes, absmax = moments_quantize_ref(randn(6, 2), signed=True, block_size=2)
    out.append(("adafactor_foreach_update", "8bit", (
        [randn(6, 9)], [randn(6, 9)], [orth(9, 2).T.contiguous()], [randn(6).abs()], [randn(2).abs()], [codes],
        [absmax], "right", 1e-30, 1e-3, 1.0, 0.9, False, [0.5], [1e-2], [0.0], [-1.0], 2, [])))
    out.append(("adafactor_foreach_update", "bf16-sr", (
        [randn(6, 9)], [randn(6, 9)], [orth(9, 2).T.contiguous()], [randn(6).abs()], [randn(2).abs()],
        [torch.zeros(6, 2, dtype=torch.bfloat16)], [], "right", 1e-30, 1e-3, 1.0, 0.9, False, [0.5], [1e-2], [0.0],
        [-1.0], 0, [7])))
    return out
