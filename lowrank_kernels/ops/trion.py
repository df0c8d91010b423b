"""The trion family: Trion's step over a list of weights in one op call.

Op (``torch.ops.lowrank_kernels.*``):

- ``trion_foreach_update(params![], grads[], momentum![], basis, side, rank, norm, coefficients,
  eps, mu, alpha, decay) -> ()`` (Python: :func:`foreach_trion_update_`).

Per entry (the specification: ``lowrank_kernels/reference/trion.py``): ``M += G``; the
``rank`` DCT basis vectors best aligned with ``M`` (``dct_score_topk``); the selected slice
``m`` of ``M`` (the projection onto them); ``M -= (1 - mu) back(m)``; ``O`` = Newton-Schulz of
``m``; ``W <- decay W + alpha back(O)``. Bit-identical on CPU to ``Trion``'s per-parameter
step.

Backends: the reference (a loop; serves every device), C++ (the per-parameter step's own
kernels behind one dispatcher call) and Triton (``kernels/trion.py``: the scoring of the whole
list in one launch, the projections and Newton-Schulz per entry).
"""
from __future__ import annotations

import torch

from lowrank_kernels.reference import trion as ref

from . import _checks as C
from ._registry import define_op, eager_caller, fake_no_output
from .dct import _check_norm
from .orth import NS_EPS, _check_coefficients, ns_coefficients

def _kernels():
    """The family's Triton launcher module, imported on first use (triton is optional)."""
    from lowrank_kernels.kernels import trion as kernels

    return kernels


_OP = "foreach_trion_update_"


def validate_foreach_trion_update(params, grads, momentum, basis, side, rank, norm, coefficients, eps, mu, alpha,
                                  decay, *, op=_OP):
    n = len(params)
    C.check_lists(op, n, (("grads", grads), ("momentum", momentum), ("mu", mu), ("alpha", alpha), ("decay", decay)))
    C.check_side(side, op)
    _check_norm(op, norm)
    C.fail_type(isinstance(rank, int) and not isinstance(rank, bool), op, lambda: f"rank must be an int, got {rank!r}")
    _check_coefficients(op, coefficients, eps)
    for i, v in enumerate(mu):
        C.fail_value(0.0 <= v < 1.0, op, lambda: f"mu[{i}] must be in [0, 1), got {v!r}")
    C.check_float(basis, "basis", op)
    C.check_ndim(basis, "basis", op, 2)
    C.check_list_devices(op, [("params", params), ("grads", grads), ("momentum", momentum), ("basis", basis)])
    written = []
    for i in range(n):
        where = f"{op} (entry {i})"
        p, g, M = params[i], grads[i], momentum[i]
        C.check_float(p, "params", where)
        C.check_ndim(p, "params", where, 2)
        C.check_float(g, "grads", where)
        C.check_shape(g, "grads", where, p.shape, "the weight's shape")
        C.check_float(M, "momentum", where)
        C.check_shape(M, "momentum", where, p.shape, "the weight's shape")
        C.fail_type(M.dtype == momentum[0].dtype, where,
                    lambda: f"momentum must share one dtype, got {M.dtype} and {momentum[0].dtype} (entry 0)")
        m, k = p.shape
        C.check_rank(rank, m, k, where, "rank")
        s = k if side == "right" else m
        C.check_shape(basis, "basis", where, (s, s),
                      lambda: f"the DCT basis of order {'n' if side == 'right' else 'm'} = {s}")
        C.check_same_device(where, [("params", p), ("grads", g), ("momentum", M), ("basis", basis)])
        written += [(f"params[{i}]", p), (f"momentum[{i}]", M)]
    C.check_no_overlap(op, written, [(f"grads[{i}]", g) for i, g in enumerate(grads)] + [("basis", basis)])


def _cache_key(params, grads, momentum, basis, side, rank, norm, coefficients, eps, mu, alpha, decay):
    """What the structural checks read: the tensors' signatures (the gradients' without their
    pointers), side, rank, norm, the coefficients, eps and the list lengths. The values of
    ``mu`` and the gradients' memory are the recheck's."""
    sig = C.tensor_signature(params, momentum, [basis])
    grads_sig = C.layout_signature(grads)
    if sig is None or grads_sig is None:
        return None
    return (side, rank, norm, tuple(coefficients), eps, len(mu), len(alpha), len(decay), sig, grads_sig)


def _remember(params, grads, momentum, *rest):
    return C.SpanIndex([*params, *momentum])


def _recheck(written, params, grads, momentum, basis, side, rank, norm, coefficients, eps, mu, *rest):
    if not all(0.0 <= v < 1.0 for v in mu) or written.any_overlap(grads):
        validate_foreach_trion_update(params, grads, momentum, basis, side, rank, norm, coefficients, eps, mu, *rest)


foreach_trion_update_op = define_op(
    "trion_foreach_update",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum, Tensor basis, str side, int rank, int norm, "
    "float[] coefficients, float eps, float[] mu, float[] alpha, float[] decay) -> ()",
    family="trion",
    triton=lambda: _kernels().trion_foreach_update_triton,
    cpp="trion_foreach_update_cpu",
    reference=ref.trion_foreach_update_ref,
    fake=fake_no_output,
    validate=validate_foreach_trion_update,
    cache_key=_cache_key,
    recheck=_recheck,
    remember=_remember,
)
_eager_op = eager_caller(foreach_trion_update_op)


def foreach_trion_update_(params, grads, momentum, basis, *, side, rank, mu, alpha, decay, coefficients="dion",
                          norm=1, eps=NS_EPS) -> None:
    """Trion's step on a list of 2-D weights, in place, in one op call.

    Per weight ``i`` with gradient ``grads[i]`` and momentum buffer ``momentum[i]`` (``M``,
    the weight's shape, one dtype for the list), ``basis`` the shared ``s x s`` DCT basis whose
    rows are the basis vectors (``dct_basis(n)`` transposed on the right, ``dct_basis(m)`` on
    the left, as :func:`lowrank_kernels.optim.trion.trion_basis`): the weights may differ in
    shape, but all share ``s`` (``n`` on the right, ``m`` on the left):

    1. ``M <- M + G``;
    2. ``idx`` = the ``rank`` rows of ``basis`` best aligned with ``M`` (:func:`dct_score_topk`
       with ``norm``), ``P = basis[idx]`` (right) or its transpose (left);
    3. ``m = M P^T`` (right) or ``P^T M`` (left);
    4. ``M <- M - (1 - mu[i]) back(m)``;
    5. ``O = newton_schulz(m, coefficients, eps=eps)``;
    6. ``W <- decay[i] W + alpha[i] back(O)``.

    ``back(N) = N P`` (right) or ``P N`` (left). ``mu``, ``alpha``, ``decay``: one number per
    weight. Every entry is validated before anything is written. Each entry is bitwise the
    single ops' sequence (``dct_score_topk``, ``dct_project``, ``backproject_apply_``,
    ``newton_schulz``, ``backproject_apply_``) on the same backend on CPU.
    """
    op = _OP
    for name, xs in (("params", params), ("grads", grads), ("momentum", momentum), ("mu", mu), ("alpha", alpha),
                     ("decay", decay)):
        C.fail_type(isinstance(xs, (list, tuple)), op, lambda: f"{name} must be a list, got {type(xs).__name__}")
    C.fail_type(isinstance(rank, int) and not isinstance(rank, bool), op, lambda: f"rank must be an int, got {rank!r}")
    flat = coefficients if isinstance(coefficients, list) and all(type(v) is float for v in coefficients) \
        else ns_coefficients(coefficients, op=op)
    _eager_op(list(params), list(grads), list(momentum), basis, side, rank, int(norm), flat, float(eps),
              [float(x) for x in mu], [float(x) for x in alpha], [float(x) for x in decay])


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the trion family's op, for ``torch.library.opcheck``: both sides,
    both schedules, L1 and L2 scores, a bfloat16 list with float32 momentum."""
    from lowrank_kernels.reference.dct import dct_basis_float64
    from lowrank_kernels.reference.orth import NS_COEFFICIENTS, flat

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    out = []
    for side, shape, sched, norm in (("right", (7, 9), "dion", 1), ("left", (11, 6), "muon", 2)):
        s = shape[1] if side == "right" else shape[0]
        b = dct_basis_float64(s).float()
        basis = b.T.contiguous() if side == "right" else b
        out.append(("trion_foreach_update", f"{side}-{sched}-l{norm}", (
            [randn(*shape) for _ in range(2)], [randn(*shape) for _ in range(2)], [randn(*shape) for _ in range(2)],
            basis, side, 3, norm, flat(NS_COEFFICIENTS[sched]), NS_EPS, [0.95, 0.9], [-0.02, -0.01], [1.0, 0.999])))
    out.append(("trion_foreach_update", "bf16-params", (
        [randn(5, 8, dtype=torch.bfloat16)], [randn(5, 8, dtype=torch.bfloat16)], [randn(5, 8)],
        dct_basis_float64(8).float().T.contiguous(), "right", 2, 1, flat(NS_COEFFICIENTS["dion"]), NS_EPS, [0.95],
        [-0.02], [1.0])))
    return out
