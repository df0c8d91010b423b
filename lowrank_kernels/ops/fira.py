"""The fira family: Fira's non-refresh step over a list of weights in one op call.

Op (``torch.ops.lowrank_kernels.*``):

- ``fira_foreach_update(params![], grads[], projs[], indices[], exp_avg![], exp_avg_sq![],
  prev_norm![], side, beta1, beta2, eps, scale, mix, gamma, alpha, decay, m_absmax![],
  v_absmax![], block_size, moment_seed) -> ()`` (Python: :func:`foreach_fira_update_`).

Per entry (the specification: ``lowrank_kernels/reference/fira.py``): ``R`` = the projected
gradient (dense projector, or DCT basis rows picked by ``indices``), its Adam update ``N``
(any moment format, as ``adam_update_``), the scaling factors ``s = ||N|| / (||R|| + 1e-8)``
over the rank dimension, the optional norm-growth limiter against ``prev_norm`` (one scalar
per weight, updated in place; its norm is :func:`residual_sumsq`'s pass), then
``W <- decay W + alpha (back(scale N - mix s R) + s G)`` (:func:`residual_apply_`'s pass).
Bit-identical on CPU to ``FiraAdamW``'s per-parameter step; no host read of a tensor value.

Backends: the reference (a loop; serves every device), C++ (the loop behind one dispatcher
call, float32 weights on CPU) and Triton (``kernels/fira.py``: the projections, the Adam update,
the residual norms and the applies of the whole list each in one grouped launch).
"""
from __future__ import annotations

import math

import torch

from lowrank_kernels.reference import fira as ref
from lowrank_kernels.reference.projection import moment_tail

from . import _checks as C
from ._registry import define_op, eager_caller, fake_no_output
from .projection import _check_hyper, check_projector, foreach_moment_args


def _kernels():
    """The family's Triton launcher module, imported on first use (triton is optional)."""
    from lowrank_kernels.kernels import fira as kernels

    return kernels


_OP = "foreach_fira_update_"


def validate_foreach_fira_update(params, grads, projs, indices, exp_avg, exp_avg_sq, prev_norm, side, beta1, beta2, eps,
                                 scale, mix, gamma, alpha, decay, m_absmax=(), v_absmax=(), block_size=0,
                                 moment_seed=(), *, op=_OP):
    n = len(params)
    C.check_lists(op, n, (("grads", grads), ("projs", projs), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                   ("scale", scale), ("mix", mix), ("alpha", alpha), ("decay", decay)),
                  (("indices", indices), ("prev_norm", prev_norm), ("m_absmax", m_absmax), ("v_absmax", v_absmax),
                   ("moment_seed", moment_seed)))
    C.fail_value(len(gamma) == len(prev_norm), op,
                 lambda: f"gamma must have one entry per prev_norm ({len(prev_norm)}), got {len(gamma)}")
    for g in gamma:
        C.fail_value(math.isfinite(g) and g >= 1.0, op, lambda: f"gamma must be finite and >= 1, got {g}")
    C.check_side(side, op)
    _check_hyper(op, beta1, beta2, eps)
    C.check_list_devices(op, [("params", params), ("grads", grads), ("projs", projs), ("indices", indices),
                              ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("prev_norm", prev_norm),
                              ("m_absmax", m_absmax), ("v_absmax", v_absmax)])
    written, read = [], []
    for i in range(n):
        where = f"{op} (entry {i})"
        p, g, pr = params[i], grads[i], projs[i]
        C.check_step_entry(p, g, where)
        m, k = p.shape
        idx = indices[i] if len(indices) else None
        C.check_float(pr, "projs", where, (torch.float32,))
        r, proj_read = check_projector(where, m, k, side, pr, idx, None, None, 0, 0)
        shape = (m, r) if side == "right" else (r, k)
        mine = C.check_moment_state(where, exp_avg[i], exp_avg_sq[i], shape, p.dtype,
                                    *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i))
        if len(prev_norm):
            t = prev_norm[i]
            C.check_float(t, "prev_norm", where, (torch.float32,))
            C.fail_value(t.numel() == 1, where, lambda: f"prev_norm must hold one value, got shape {tuple(t.shape)}")
            mine.append(("prev_norm", t))
        C.check_same_device(where, [("params", p), ("grads", g)] + proj_read + mine)
        written += [(f"params[{i}]", p)] + [(f"{name}[{i}]", t) for name, t in mine]
        read += [(f"grads[{i}]", g)] + [(f"{name}[{i}]", t) for name, t in proj_read]
    C.check_no_overlap(op, written, read)


def _cache_key(params, grads, projs, indices, exp_avg, exp_avg_sq, prev_norm, side, beta1, beta2, eps, scale, mix,
               gamma, alpha, decay, m_absmax=(), v_absmax=(), block_size=0, moment_seed=()):
    """What the structural checks read: the tensors' signatures (the gradients' without their
    pointers), the side, block size, which moment seeds are given, the list lengths, the gammas
    and the CPU DCT indices' version counters (their values are read again only after an
    in-place write). The betas, eps and the gradients' memory are the recheck's."""
    sig = C.tensor_signature(params, projs, indices, exp_avg, exp_avg_sq, prev_norm, m_absmax, v_absmax)
    grads_sig = C.layout_signature(grads)
    if sig is None or grads_sig is None:
        return None
    try:
        versions = tuple(t._version for t in indices) if len(indices) and indices[0].device.type == "cpu" else ()
    except RuntimeError:  # inference tensors have no version counter: not cached
        return None
    return (side, block_size, tuple(s >= 0 for s in moment_seed), len(scale), len(mix), len(alpha), len(decay),
            tuple(gamma), versions, sig, grads_sig)


def _remember(params, grads, projs, indices, exp_avg, exp_avg_sq, prev_norm, *rest):
    m_absmax, v_absmax = (rest[9], rest[10]) if len(rest) > 10 else ((), ())
    return C.SpanIndex([*params, *exp_avg, *exp_avg_sq, *prev_norm, *m_absmax, *v_absmax])


def _recheck(written, params, grads, projs, indices, exp_avg, exp_avg_sq, prev_norm, side, beta1, beta2, eps, *rest):
    ok = 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and eps >= 0.0 and not written.any_overlap(grads)
    if not ok:
        validate_foreach_fira_update(params, grads, projs, indices, exp_avg, exp_avg_sq, prev_norm, side, beta1, beta2,
                                     eps, *rest)


foreach_fira_update_op = define_op(
    "fira_foreach_update",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] projs, Tensor[] indices, Tensor(b!)[] exp_avg, "
    "Tensor(c!)[] exp_avg_sq, Tensor(d!)[] prev_norm, str side, float beta1, float beta2, float eps, float[] scale, "
    "float[] mix, float[] gamma, float[] alpha, float[] decay, Tensor(e!)[] m_absmax, Tensor(f!)[] v_absmax, "
    "int block_size, int[] moment_seed) -> ()",
    family="fira",
    triton=lambda: _kernels().fira_foreach_update_triton,
    cpp="fira_foreach_update_cpu",
    reference=ref.fira_foreach_update_ref,
    fake=fake_no_output,
    validate=validate_foreach_fira_update,
    cache_key=_cache_key,
    recheck=_recheck,
    remember=_remember,
)
_eager_op = eager_caller(foreach_fira_update_op)


def foreach_fira_update_(params, grads, projs, exp_avg, exp_avg_sq, *, side, beta1, beta2, eps, scale, mix, alpha,
                         decay, indices=None, prev_norm=None, gamma=None, m_absmax=None, v_absmax=None,
                         block_size=256, moment_seed=None) -> None:
    """Fira's non-refresh step on a list of 2-D float32 weights, in place, in one op call.

    Per weight ``i``: ``R`` = the gradient projected by ``projs[i]`` (dense float32, ``r x n``
    for ``side="right"``, ``m x r`` for ``"left"``; or, with ``indices``, the float32 DCT basis
    whose rows ``indices[i]`` form the projector), ``N`` its Adam update (moments
    ``exp_avg[i]``, ``exp_avg_sq[i]`` of ``R``'s shape, any moment format as
    :func:`adam_update_`), ``s = ||N|| / (||R|| + 1e-8)`` along the rank dimension (one factor
    per row for ``"right"``, per column for ``"left"``); with ``prev_norm`` (one-value float32
    tensors, updated in place) and ``gamma`` (one bound >= 1 per weight) the norm-growth
    limiter on ``||s (G - mix[i] back(R))||``; then
    ``W <- decay[i] W + alpha[i] (back(scale[i] N - mix[i] s R) + s G)``. ``scale``, ``mix``,
    ``alpha``, ``decay``: one number per weight. Every entry is validated before anything is
    written; nothing reads a tensor value on the host.
    """
    limiter = prev_norm is not None
    C.fail_value(limiter == (gamma is not None), _OP, "prev_norm and gamma go together (the limiter)")
    _eager_op(list(params), list(grads), list(projs), [] if indices is None else list(indices), list(exp_avg),
              list(exp_avg_sq), list(prev_norm) if limiter else [], side, float(beta1), float(beta2), float(eps),
              [float(x) for x in scale], [float(x) for x in mix], [float(x) for x in gamma] if limiter else [],
              [float(x) for x in alpha], [float(x) for x in decay],
              *foreach_moment_args(_OP, m_absmax, v_absmax, block_size, moment_seed))


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the fira family's op, for ``torch.library.opcheck``: both sides,
    dense and DCT projectors, with and without the limiter, 8-bit and 16-bit moments."""
    from .dct import dct_basis
    from .projection import _sample_moments8

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    out = []
    shapes = [(6, 9), (7, 5)]
    r = 2
    for side, dct, limiter in (("right", False, True), ("left", False, False), ("left", True, True),
                               ("right", True, False)):
        low = [(m, r) if side == "right" else (r, n) for m, n in shapes]
        if dct:
            projs = [dct_basis(n if side == "right" else m).clone() for m, n in shapes]
            idx = [torch.tensor([1, 0], dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32)]
        else:
            projs = [randn(r, n) if side == "right" else randn(m, r) for m, n in shapes]
            idx = []
        out.append(("fira_foreach_update", f"{side}-{'dct' if dct else 'dense'}-{'limiter' if limiter else 'free'}", (
            [randn(*s) for s in shapes], [randn(*s) for s in shapes], projs, idx, [randn(*s) for s in low],
            [randn(*s).abs() for s in low], [randn(1).abs().reshape(()) for _ in shapes] if limiter else [], side,
            0.9, 0.999, 1e-6, [0.25, 0.5], [1.0, 0.25], [1.01, 1.5] if limiter else [], [-1e-2, -2e-2], [0.99, 1.0],
            [], [], 0, [])))
    st = _sample_moments8((6, 2), 2, gen)
    out.append(("fira_foreach_update", "8bit", (
        [randn(6, 9)], [randn(6, 9)], [randn(2, 9)], [], [st[0]], [st[1]], [torch.tensor(2.0)], "right", 0.9, 0.999,
        1e-6, [0.25], [1.0], [1.01], [-1e-2], [1.0], [st[2]], [st[3]], 2, [])))
    out.append(("fira_foreach_update", "bf16-sr", (
        [randn(6, 9)], [randn(6, 9)], [randn(6, 2)], [], [torch.zeros(2, 9, dtype=torch.bfloat16)],
        [torch.zeros(2, 9, dtype=torch.bfloat16)], [torch.tensor(math.inf)], "left", 0.9, 0.999, 1e-6, [0.25], [0.25],
        [1.01], [-1e-2], [1.0], [], [], 0, [7])))
    return out
