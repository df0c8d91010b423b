"""The gradnormlorp family: GradNormLoRP's non-refresh step over a list of weights in one op call.

Op (``torch.ops.lowrank_kernels.*``):

- ``gradnormlorp_foreach_update(params![], grads[], projs[], exp_avg![], exp_avg_sq![], wn_g![],
  wn_vnorm![], exp_avg_g![], exp_avg_sq_g![], side, beta1, beta2, eps, step_size, scale, decay,
  m_absmax![], v_absmax![], block_size, moment_seed) -> ()`` (Python: :func:`foreach_gradnormlorp_update_`).

Per entry (the specification: ``lowrank_kernels/reference/gradnormlorp.py``): the gradients of
the per-row weight normalization (``a = dL/dg``, ``Gv = dL/dV``), GaLore's projected Adam on
``Gv`` (``project_adam_``, any moment format), Adam on the magnitude ``g``, the new row norms of
``V`` without an ``m x n`` temporary, then the per-row fused back-projection
``W <- diag(d) W + diag(b) back(N)``. Bit-identical on CPU to ``GradNormLoRPAdamW``'s
per-parameter step.

Backends: the reference (a loop; serves every device), C++ (the loop behind one dispatcher
call, float32 weights on CPU: the projection family's C++ kernels for ``project_adam_`` and
the back-projection, the per-row arithmetic in plain loops) and Triton
(``kernels/gradnormlorp.py``: the Adam update of the whole list in one grouped launch, the
back-projections the projection family's Triton kernel per entry).
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import gradnormlorp as ref
from lowrank_kernels.reference.projection import moment_tail

from . import _checks as C
from ._registry import define_op, eager_caller, fake_no_output
from .projection import _check_hyper, foreach_moment_args


def _kernels():
    """The family's Triton launcher module, imported on first use (triton is optional)."""
    from lowrank_kernels.kernels import gradnormlorp as kernels

    return kernels


_OP = "foreach_gradnormlorp_update_"
_VECTORS = ("wn_g", "wn_vnorm", "exp_avg_g", "exp_avg_sq_g")


def validate_foreach_gradnormlorp_update(params, grads, projs, exp_avg, exp_avg_sq, wn_g, wn_vnorm, exp_avg_g,
                                         exp_avg_sq_g, side, beta1, beta2, eps, step_size, scale, decay, m_absmax=(),
                                         v_absmax=(), block_size=0, moment_seed=(), *, op=_OP):
    n = len(params)
    vectors = (wn_g, wn_vnorm, exp_avg_g, exp_avg_sq_g)
    C.check_lists(op, n, (("grads", grads), ("projs", projs), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                          *zip(_VECTORS, vectors), ("step_size", step_size), ("scale", scale), ("decay", decay)),
                  (("m_absmax", m_absmax), ("v_absmax", v_absmax), ("moment_seed", moment_seed)))
    C.check_side(side, op)
    _check_hyper(op, beta1, beta2, eps)
    C.check_list_devices(op, [("params", params), ("grads", grads), ("projs", projs), ("exp_avg", exp_avg),
                              ("exp_avg_sq", exp_avg_sq), *zip(_VECTORS, vectors), ("m_absmax", m_absmax),
                              ("v_absmax", v_absmax)])
    written = []
    for i in range(n):
        where = f"{op} (entry {i})"
        p, g, pr = params[i], grads[i], projs[i]
        m, k, r = C.check_dense_projector_entry(p, g, pr, side, where)
        shape = (m, r) if side == "right" else (r, k)
        mine = C.check_moment_state(where, exp_avg[i], exp_avg_sq[i], shape, p.dtype,
                                    *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i))
        for name, vs in zip(_VECTORS, vectors):
            t = vs[i]
            C.check_tensor(t, name, where)
            C.check_float(t, name, where, (torch.float32,))
            C.check_shape(t, name, where, (m,), "one value per row of the weight")
            C.fail_value(t.is_contiguous(), where, lambda: f"{name} must be contiguous")
            mine.append((name, t))
        C.check_same_device(where, [("params", p), ("grads", g), ("projs", pr)] + mine)
        written += [(f"params[{i}]", p)] + [(f"{name}[{i}]", t) for name, t in mine]
    C.check_no_overlap(op, written, [(f"grads[{i}]", g) for i, g in enumerate(grads)] +
                       [(f"projs[{i}]", t) for i, t in enumerate(projs)])


def _cache_key(params, grads, projs, exp_avg, exp_avg_sq, wn_g, wn_vnorm, exp_avg_g, exp_avg_sq_g, side, beta1, beta2,
               eps, step_size, scale, decay, m_absmax=(), v_absmax=(), block_size=0, moment_seed=()):
    """What the structural checks read: the tensors' signatures (the gradients' without their
    pointers), the side, block size, which moment seeds are given and the list lengths."""
    sig = C.tensor_signature(params, projs, exp_avg, exp_avg_sq, wn_g, wn_vnorm, exp_avg_g, exp_avg_sq_g, m_absmax,
                             v_absmax)
    grads_sig = C.layout_signature(grads)
    if sig is None or grads_sig is None:
        return None
    return (side, block_size, tuple(s >= 0 for s in moment_seed), len(step_size), len(scale), len(decay), sig,
            grads_sig)


def _remember(params, grads, projs, exp_avg, exp_avg_sq, wn_g, wn_vnorm, exp_avg_g, exp_avg_sq_g, *rest):
    m_absmax, v_absmax = (rest[7], rest[8]) if len(rest) > 8 else ((), ())
    return C.SpanIndex([*params, *exp_avg, *exp_avg_sq, *wn_g, *wn_vnorm, *exp_avg_g, *exp_avg_sq_g, *m_absmax,
                        *v_absmax])


def _recheck(written, params, grads, projs, exp_avg, exp_avg_sq, wn_g, wn_vnorm, exp_avg_g, exp_avg_sq_g, side, beta1,
             beta2, eps, *rest):
    ok = 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and eps >= 0.0 and not written.any_overlap(grads)
    if not ok:
        validate_foreach_gradnormlorp_update(params, grads, projs, exp_avg, exp_avg_sq, wn_g, wn_vnorm, exp_avg_g,
                                             exp_avg_sq_g, side, beta1, beta2, eps, *rest)


foreach_gradnormlorp_update_op = define_op(
    "gradnormlorp_foreach_update",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] projs, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
    "Tensor(d!)[] wn_g, Tensor(e!)[] wn_vnorm, Tensor(f!)[] exp_avg_g, Tensor(g!)[] exp_avg_sq_g, str side, "
    "float beta1, float beta2, float eps, float[] step_size, float[] scale, float[] decay, Tensor(h!)[] m_absmax, "
    "Tensor(i!)[] v_absmax, int block_size, int[] moment_seed) -> ()",
    family="gradnormlorp",
    triton=lambda: _kernels().gradnormlorp_foreach_update_triton,
    cpp="gradnormlorp_foreach_update_cpu",
    reference=ref.gradnormlorp_foreach_update_ref,
    fake=fake_no_output,
    validate=validate_foreach_gradnormlorp_update,
    cache_key=_cache_key,
    recheck=_recheck,
    remember=_remember,
)
_eager_op = eager_caller(foreach_gradnormlorp_update_op)


def foreach_gradnormlorp_update_(params, grads, projs, exp_avg, exp_avg_sq, wn_g, wn_vnorm, exp_avg_g, exp_avg_sq_g, *,
                                 side, beta1, beta2, eps, step_size, scale, decay, m_absmax=None, v_absmax=None,
                                 block_size=256, moment_seed=None) -> None:
    """GradNormLoRP's non-refresh step on a list of 2-D float32 weights, in place, in one op call.

    Per weight ``i`` (``W = g V / ||V||`` per row, see :mod:`lowrank_kernels.optim.gradnormlorp`):
    with its dense float32 projector ``projs[i]`` (``r x n`` for ``side="right"``, ``m x r``
    for ``"left"``), GaLore's projected Adam on the direction gradient ``dL/dV`` (moments
    ``exp_avg[i]``, ``exp_avg_sq[i]``, any moment format as :func:`project_adam_`), Adam on the
    magnitude (``exp_avg_g[i]``, ``exp_avg_sq_g[i]``), then the weight, ``wn_g[i]`` (``g``) and
    ``wn_vnorm[i]`` (``||V||`` per row) in place; the four vectors are float32 of length ``m``.
    ``step_size[i]``: ``lr sqrt(1 - b2^t) / (1 - b1^t)``; ``scale[i]`` multiplies the direction
    update; ``decay[i]``: ``1 - lr wd``. Every entry is validated before anything is written.
    """
    _eager_op(list(params), list(grads), list(projs), list(exp_avg), list(exp_avg_sq), list(wn_g), list(wn_vnorm),
              list(exp_avg_g), list(exp_avg_sq_g), side, float(beta1), float(beta2), float(eps),
              [float(x) for x in step_size], [float(x) for x in scale], [float(x) for x in decay],
              *foreach_moment_args(_OP, m_absmax, v_absmax, block_size, moment_seed))


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the gradnormlorp family's op, for ``torch.library.opcheck``: both
    sides, 32-bit, 8-bit and 16-bit moments, eps = 0."""
    from .projection import _sample_moments8

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    def orth(k, r):
        return torch.linalg.qr(torch.randn(k, r, generator=gen)).Q

    def vectors(shapes):
        return ([randn(m) for m, _ in shapes], [randn(m).abs() + 0.5 for m, _ in shapes],
                [0.1 * randn(m) for m, _ in shapes], [0.01 * randn(m).abs() for m, _ in shapes])

    out = []
    shapes = [(6, 9), (7, 5)]
    r = 2
    for side, eps in (("right", 1e-6), ("left", 0.0)):
        low = [(m, r) if side == "right" else (r, n) for m, n in shapes]
        projs = [orth(n, r).T.contiguous() if side == "right" else orth(m, r).contiguous() for m, n in shapes]
        out.append(("gradnormlorp_foreach_update", f"{side}-eps{eps}", (
            [randn(*s) for s in shapes], [randn(*s) for s in shapes], projs, [randn(*s) for s in low],
            [randn(*s).abs() for s in low], *vectors(shapes), side, 0.9, 0.999, eps, [1e-2, 2e-2], [0.25, 1.0],
            [0.99, 1.0], [], [], 0, [])))
    st = _sample_moments8((6, 2), 2, gen)
    out.append(("gradnormlorp_foreach_update", "8bit", (
        [randn(6, 9)], [randn(6, 9)], [orth(9, 2).T.contiguous()], [st[0]], [st[1]], *vectors([(6, 9)]), "right", 0.9,
        0.999, 1e-6, [1e-2], [1.0], [1.0], [st[2]], [st[3]], 2, [])))
    out.append(("gradnormlorp_foreach_update", "bf16-sr", (
        [randn(6, 9)], [randn(6, 9)], [orth(9, 2).T.contiguous()], [torch.zeros(6, 2, dtype=torch.bfloat16)],
        [torch.zeros(6, 2, dtype=torch.bfloat16)], *vectors([(6, 9)]), "right", 0.9, 0.999, 1e-6, [1e-2], [1.0],
        [1.0], [], [], 0, [7])))
    return out
