"""The frugal family: FRUGAL's non-refresh step over a list of weights in one op call.

Op (``torch.ops.lowrank_kernels.*``):

- ``frugal_foreach_update(params![], grads[], projs[], exp_avg![], exp_avg_sq![], side, signsgd,
  beta1, beta2, eps, alpha, decay, free_alpha, m_absmax![], v_absmax![], block_size, moment_seed) -> ()``
  (Python: :func:`foreach_frugal_update_`).

Per entry (the specification: ``lowrank_kernels/reference/frugal.py``): ``R`` = the projected
gradient, its Adam update ``N`` (any moment format, as ``adam_update_``), the residual
``G - back(R)`` when the rank is below the projected dimension, then
``W <- decay W + alpha back(N) + free_alpha * sign(residual)`` (or the residual itself with
``signsgd=False``). Bit-identical on CPU to ``FrugalAdamW``'s per-parameter step.

Backends: the reference (a loop; serves every device), C++ (the loop behind one
dispatcher call, float32 weights on CPU) and Triton (``kernels/frugal.py``: the Adam update of
the whole list in one grouped launch, the rest per entry).
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import frugal as ref
from lowrank_kernels.reference.projection import moment_tail

from . import _checks as C
from ._registry import define_op, eager_caller, fake_no_output
from .projection import _check_hyper, foreach_moment_args

def _kernels():
    """The family's Triton launcher module, imported on first use (triton is optional)."""
    from lowrank_kernels.kernels import frugal as kernels

    return kernels


_OP = "foreach_frugal_update_"


def validate_foreach_frugal_update(params, grads, projs, exp_avg, exp_avg_sq, side, signsgd, beta1, beta2, eps, alpha,
                                   decay, free_alpha, m_absmax=(), v_absmax=(), block_size=0, moment_seed=(), *,
                                   op=_OP):
    n = len(params)
    C.check_lists(op, n, (("grads", grads), ("projs", projs), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                   ("alpha", alpha), ("decay", decay), ("free_alpha", free_alpha)),
                  (("m_absmax", m_absmax), ("v_absmax", v_absmax), ("moment_seed", moment_seed)))
    C.check_side(side, op)
    _check_hyper(op, beta1, beta2, eps)
    C.check_list_devices(op, [("params", params), ("grads", grads), ("projs", projs), ("exp_avg", exp_avg),
                              ("exp_avg_sq", exp_avg_sq), ("m_absmax", m_absmax), ("v_absmax", v_absmax)])
    written = []
    for i in range(n):
        where = f"{op} (entry {i})"
        p, g, pr = params[i], grads[i], projs[i]
        m, k, r = C.check_dense_projector_entry(p, g, pr, side, where)
        shape = (m, r) if side == "right" else (r, k)
        mine = C.check_moment_state(where, exp_avg[i], exp_avg_sq[i], shape, p.dtype,
                                    *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i))
        C.check_same_device(where, [("params", p), ("grads", g), ("projs", pr)] + mine)
        written += [(f"params[{i}]", p)] + [(f"{name}[{i}]", t) for name, t in mine]
    C.check_no_overlap(op, written, [(f"grads[{i}]", g) for i, g in enumerate(grads)] +
                       [(f"projs[{i}]", t) for i, t in enumerate(projs)])


def _cache_key(params, grads, projs, exp_avg, exp_avg_sq, side, signsgd, beta1, beta2, eps, alpha, decay, free_alpha,
               m_absmax=(), v_absmax=(), block_size=0, moment_seed=()):
    """What the structural checks read: the tensors' signatures (the gradients' without their
    pointers), the side, block size, which moment seeds are given and the list lengths."""
    sig = C.tensor_signature(params, projs, exp_avg, exp_avg_sq, m_absmax, v_absmax)
    grads_sig = C.layout_signature(grads)
    if sig is None or grads_sig is None:
        return None
    return (side, block_size, tuple(s >= 0 for s in moment_seed), len(alpha), len(decay), len(free_alpha), sig,
            grads_sig)


def _remember(params, grads, projs, exp_avg, exp_avg_sq, *rest):
    m_absmax, v_absmax = (rest[8], rest[9]) if len(rest) > 9 else ((), ())
    return C.SpanIndex([*params, *exp_avg, *exp_avg_sq, *m_absmax, *v_absmax])


def _recheck(written, params, grads, projs, exp_avg, exp_avg_sq, side, signsgd, beta1, beta2, eps, *rest):
    ok = 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and eps >= 0.0 and not written.any_overlap(grads)
    if not ok:
        validate_foreach_frugal_update(params, grads, projs, exp_avg, exp_avg_sq, side, signsgd, beta1, beta2, eps,
                                       *rest)


foreach_frugal_update_op = define_op(
    "frugal_foreach_update",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] projs, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, str side, "
    "bool signsgd, float beta1, float beta2, float eps, float[] alpha, float[] decay, float[] free_alpha, "
    "Tensor(d!)[] m_absmax, Tensor(e!)[] v_absmax, int block_size, int[] moment_seed) -> ()",
    family="frugal",
    triton=lambda: _kernels().frugal_foreach_update_triton,
    cpp="frugal_foreach_update_cpu",
    reference=ref.frugal_foreach_update_ref,
    fake=fake_no_output,
    validate=validate_foreach_frugal_update,
    cache_key=_cache_key,
    recheck=_recheck,
    remember=_remember,
)
_eager_op = eager_caller(foreach_frugal_update_op)


def foreach_frugal_update_(params, grads, projs, exp_avg, exp_avg_sq, *, side, signsgd, beta1, beta2, eps, alpha,
                           decay, free_alpha, m_absmax=None, v_absmax=None, block_size=256, moment_seed=None) -> None:
    """FRUGAL's non-refresh step on a list of 2-D float32 weights, in place, in one op call.

    Per weight ``i`` with its dense projector ``projs[i]`` (``r x n`` for ``side="right"``,
    ``m x r`` for ``"left"``, float32): ``R`` = the projected gradient, ``N`` its Adam update
    (moments ``exp_avg[i]``, ``exp_avg_sq[i]`` of ``R``'s shape, any moment format as
    :func:`adam_update_`), ``W <- decay[i] W + alpha[i] back(N)``, then, when ``r`` is less
    than the projected dimension, ``W <- W + free_alpha[i] * sign(G - back(R))`` (``signsgd``;
    without the sign otherwise). Every entry is validated before anything is written.
    """
    _eager_op(list(params), list(grads), list(projs), list(exp_avg), list(exp_avg_sq), side, bool(signsgd),
              float(beta1), float(beta2), float(eps), [float(x) for x in alpha], [float(x) for x in decay],
              [float(x) for x in free_alpha], *foreach_moment_args(_OP, m_absmax, v_absmax, block_size, moment_seed))


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the frugal family's op, for ``torch.library.opcheck``: both sides,
    signSGD and SGD, a full-rank entry (no residual), 8-bit and 16-bit moments."""
    from .projection import _sample_moments8

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    def orth(k, r):
        return torch.linalg.qr(randn(k, r)).Q.contiguous()

    out = []
    for side, signsgd in (("right", True), ("left", False)):
        shapes, ranks = [(6, 9), (7, 5)], [2, 5 if side == "right" else 3]
        projs = [orth(n, r).T.contiguous() if side == "right" else orth(m, r) for (m, n), r in zip(shapes, ranks)]
        low = [(m, r) if side == "right" else (r, n) for (m, n), r in zip(shapes, ranks)]
        out.append(("frugal_foreach_update", f"{side}-{'signsgd' if signsgd else 'sgd'}", (
            [randn(*s) for s in shapes], [randn(*s) for s in shapes], projs, [randn(*s) for s in low],
            [randn(*s).abs() for s in low], side, signsgd, 0.9, 0.999, 1e-8, [-1e-2, -2e-2], [0.99, 1.0],
            [-1e-3, -2e-3], [], [], 0, [])))
    st = _sample_moments8((6, 2), 2, gen)
    out.append(("frugal_foreach_update", "8bit", (
        [randn(6, 9)], [randn(6, 9)], [orth(9, 2).T.contiguous()], [st[0]], [st[1]], "right", True, 0.9, 0.999,
        1e-8, [-1e-2], [1.0], [-1e-3], [st[2]], [st[3]], 2, [])))
    out.append(("frugal_foreach_update", "bf16-sr", (
        [randn(6, 9)], [randn(6, 9)], [orth(9, 2).T.contiguous()], [torch.zeros(6, 2, dtype=torch.bfloat16)],
        [torch.zeros(6, 2, dtype=torch.bfloat16)], "right", True, 0.9, 0.999, 1e-8, [-1e-2], [1.0], [-1e-3], [], [],
        0, [7])))
    return out
