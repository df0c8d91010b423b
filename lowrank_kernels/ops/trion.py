"""The trion family: Trion's step over a list of weights in one op call.

Ops (``torch.ops.lowrank_kernels.*``):

- ``trion_foreach_update(params![], grads[], momentum![], basis, side, rank, norm, coefficients,
  eps, mu, alpha, decay) -> ()`` (Python: :func:`foreach_trion_update_`);
- ``trion_foreach_orth(grads[], momentum![], basis, side, rank, norm, coefficients, eps, mu,
  orths![], indices!) -> ()`` and ``trion_foreach_apply(params![], orths[], indices, basis, side,
  alpha, decay) -> ()`` (:func:`foreach_trion_orth_`, :func:`foreach_trion_apply_`): the two
  halves of the step, which Trion's sharded form runs on different ranks; together bitwise the
  whole step on the same backend on CPU.

Per entry (the specification: ``lowrank_kernels/reference/trion.py``): ``M += G``; the
``rank`` DCT basis vectors best aligned with ``M`` (``dct_score_topk``); the selected slice
``m`` of ``M`` (the projection onto them); ``M -= (1 - mu) back(m)``; ``O`` = Newton-Schulz of
``m``; ``W <- decay W + alpha back(O)``. ``Trion``'s per-parameter step is this op on a
one-entry list.

Backends: the reference (a loop; serves every device), C++ (``csrc/cpu/trion.cpp``: a float32
fast path with no ATen op for small contiguous float32 entries, within float32 rounding of the
reference; otherwise the single ops' kernels, bitwise the reference sequence's ops on C++) and
Triton (``kernels/trion.py``: the scoring of the whole
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


def _check_entries(op, params, grads, momentum, basis, side, rank):
    """The per-entry checks shared by the family's ops (``params`` None: no weights); returns the
    tensors written in place (name, tensor)."""
    C.check_float(basis, "basis", op)
    C.check_ndim(basis, "basis", op, 2)
    written = []
    for i in range(len(momentum)):
        where = f"{op} (entry {i})"
        g, M = grads[i], momentum[i]
        C.check_float(M, "momentum", where)
        C.check_ndim(M, "momentum", where, 2)
        C.fail_type(M.dtype == momentum[0].dtype, where,
                    lambda: f"momentum must share one dtype, got {M.dtype} and {momentum[0].dtype} (entry 0)")
        if params is not None:
            p = params[i]
            C.check_float(p, "params", where)
            C.check_ndim(p, "params", where, 2)
            C.check_shape(M, "momentum", where, p.shape, "the weight's shape")
        C.check_float(g, "grads", where)
        C.check_shape(g, "grads", where, M.shape,
                      "the weight's shape" if params is not None else "the momentum's shape")
        m, k = M.shape
        C.check_rank(rank, m, k, where, "rank")
        s = k if side == "right" else m
        C.check_shape(basis, "basis", where, (s, s),
                      lambda: f"the DCT basis of order {'n' if side == 'right' else 'm'} = {s}")
        C.check_same_device(where, [("grads", g), ("momentum", M), ("basis", basis)]
                            + ([("params", params[i])] if params is not None else []))
        if params is not None:
            written.append((f"params[{i}]", params[i]))
        written.append((f"momentum[{i}]", M))
    return written


def _check_step_args(op, side, rank, norm, coefficients, eps, mu, basis):
    """The checks of the step's scalar arguments and basis, shared by the whole step and its
    first half."""
    C.check_side(side, op)
    _check_norm(op, norm)
    C.fail_type(isinstance(rank, int) and not isinstance(rank, bool), op, lambda: f"rank must be an int, got {rank!r}")
    _check_coefficients(op, coefficients, eps)
    for i, v in enumerate(mu):
        C.fail_value(0.0 <= v < 1.0, op, lambda: f"mu[{i}] must be in [0, 1), got {v!r}")
    C.check_float(basis, "basis", op)
    C.check_ndim(basis, "basis", op, 2)


def validate_foreach_trion_update(params, grads, momentum, basis, side, rank, norm, coefficients, eps, mu, alpha,
                                  decay, *, op=_OP):
    n = len(params)
    C.check_lists(op, n, (("grads", grads), ("momentum", momentum), ("mu", mu), ("alpha", alpha), ("decay", decay)))
    _check_step_args(op, side, rank, norm, coefficients, eps, mu, basis)
    C.check_list_devices(op, [("params", params), ("grads", grads), ("momentum", momentum), ("basis", basis)])
    written = _check_entries(op, params, grads, momentum, basis, side, rank)
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
    weight. Every entry is validated before anything is written. Each entry is bitwise this op
    on a one-entry list (Trion's per-parameter step) on the same backend on CPU; on the
    reference backend, and on C++ outside its float32 fast path, also bitwise the single ops'
    sequence (``dct_score_topk``, ``dct_project``, ``backproject_apply_``, ``newton_schulz``,
    ``backproject_apply_``). The C++ fast path (float32 weight, gradient, momentum and basis,
    contiguous, ``rank <= 32``, ``m n s <= 2^22``) runs the step on raw pointers, within
    float32 rounding of that sequence.
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


# --------------------------------------------------------------------------- the sharded step's halves
_ORTH_OP = "foreach_trion_orth_"
_APPLY_OP = "foreach_trion_apply_"


def validate_foreach_trion_orth(grads, momentum, basis, side, rank, norm, coefficients, eps, mu, orths, indices, *,
                                op=_ORTH_OP):
    n = len(momentum)
    C.check_lists(op, n, (("grads", grads), ("mu", mu), ("orths", orths)))
    _check_step_args(op, side, rank, norm, coefficients, eps, mu, basis)
    C.check_tensor(indices, "indices", op)
    C.fail_type(indices.dtype == torch.int32, op, lambda: f"indices must be int32, got {indices.dtype}")
    C.check_shape(indices, "indices", op, (n, rank), "one row of rank indices per weight")
    C.check_list_devices(op, [("grads", grads), ("momentum", momentum), ("basis", basis), ("orths", orths),
                              ("indices", indices)])
    written = _check_entries(op, None, grads, momentum, basis, side, rank)
    for i, (M, o) in enumerate(zip(momentum, orths)):
        where = f"{op} (entry {i})"
        m, k = M.shape
        want = torch.float64 if M.dtype == torch.float64 else torch.float32
        C.fail_type(o.dtype == want, where, lambda: f"orths must be {want} (the momentum's Newton-Schulz dtype), "
                                                    f"got {o.dtype}")
        C.check_shape(o, "orths", where, (m, rank) if side == "right" else (rank, k), "the low-rank shape")
        written.append((f"orths[{i}]", o))
    written.append(("indices", indices))
    C.check_no_overlap(op, written, [(f"grads[{i}]", g) for i, g in enumerate(grads)] + [("basis", basis)])


foreach_trion_orth_op = define_op(
    "trion_foreach_orth",
    "(Tensor[] grads, Tensor(a!)[] momentum, Tensor basis, str side, int rank, int norm, float[] coefficients, "
    "float eps, float[] mu, Tensor(b!)[] orths, Tensor(c!) indices) -> ()",
    family="trion",
    triton=lambda: _kernels().trion_foreach_orth_triton,
    cpp="trion_foreach_orth_cpu",
    reference=ref.trion_foreach_orth_ref,
    fake=fake_no_output,
    validate=validate_foreach_trion_orth,
)


def validate_foreach_trion_apply(params, orths, indices, basis, side, alpha, decay, *, op=_APPLY_OP):
    n = len(params)
    C.check_lists(op, n, (("orths", orths), ("alpha", alpha), ("decay", decay)))
    C.check_side(side, op)
    C.check_float(basis, "basis", op)
    C.check_ndim(basis, "basis", op, 2)
    C.fail_type(indices.dtype in (torch.int32, torch.int64), op,
                lambda: f"indices must be int32 or int64, got {indices.dtype}")
    C.check_ndim(indices, "indices", op, 2)
    C.fail_value(indices.shape[0] == n, op,
                 lambda: f"indices must have one row per weight ({n}), got {indices.shape[0]}")
    C.check_list_devices(op, [("params", params), ("orths", orths), ("indices", indices), ("basis", basis)])
    rank = indices.shape[1]
    written = []
    for i in range(n):
        where = f"{op} (entry {i})"
        p, o = params[i], orths[i]
        C.check_float(p, "params", where)
        C.check_ndim(p, "params", where, 2)
        m, k = p.shape
        C.check_rank(rank, m, k, where, "indices.shape[1]")
        s = k if side == "right" else m
        C.check_shape(basis, "basis", where, (s, s),
                      lambda: f"the DCT basis of order {'n' if side == 'right' else 'm'} = {s}")
        C.check_float(o, "orths", where)
        C.check_shape(o, "orths", where, (m, rank) if side == "right" else (rank, k), "the low-rank shape")
        written.append((f"params[{i}]", p))
    # The values on CPU only (a device read elsewhere; the optimizer passes the orth op's own).
    if n and indices.device.type == "cpu" and type(indices) is torch.Tensor and indices.numel() > 0:
        lo_t, hi_t = torch.aminmax(indices)
        lo, hi, s = int(lo_t), int(hi_t), basis.shape[0]
        C.fail_value(0 <= lo and hi < s, op, lambda: f"indices must lie in [0, {s}), got values in [{lo}, {hi}]")
    C.check_no_overlap(op, written, [(f"orths[{i}]", o) for i, o in enumerate(orths)]
                       + [("indices", indices), ("basis", basis)])


foreach_trion_apply_op = define_op(
    "trion_foreach_apply",
    "(Tensor(a!)[] params, Tensor[] orths, Tensor indices, Tensor basis, str side, float[] alpha, float[] decay) -> ()",
    family="trion",
    triton=lambda: _kernels().trion_foreach_apply_triton,
    cpp="trion_foreach_apply_cpu",
    reference=ref.trion_foreach_apply_ref,
    fake=fake_no_output,
    validate=validate_foreach_trion_apply,
)
_eager_orth = eager_caller(foreach_trion_orth_op)
_eager_apply = eager_caller(foreach_trion_apply_op)


def foreach_trion_orth_(grads, momentum, basis, *, side, rank, mu, coefficients="dion", norm=1, eps=NS_EPS):
    """Steps 1-5 of :func:`foreach_trion_update_` (``M += G`` up to ``O = newton_schulz(m)``)
    on every entry, the momentum buffers updated in place; returns ``(orths, indices)``: ``O``
    per entry in the low-rank shape (``m x rank`` on the right, ``rank x n`` on the left;
    float32, float64 for float64 momentum) and the ``len x rank`` int32 basis indices.

    With :func:`foreach_trion_apply_` the two halves of Trion's step that its sharded form
    (``shard_work=True``) runs on different ranks: on the same backend on CPU, the two together
    are bitwise :func:`foreach_trion_update_`."""
    op = _ORTH_OP
    for name, xs in (("grads", grads), ("momentum", momentum), ("mu", mu)):
        C.fail_type(isinstance(xs, (list, tuple)), op, lambda: f"{name} must be a list, got {type(xs).__name__}")
    C.fail_type(isinstance(rank, int) and not isinstance(rank, bool), op, lambda: f"rank must be an int, got {rank!r}")
    flat = coefficients if isinstance(coefficients, list) and all(type(v) is float for v in coefficients) \
        else ns_coefficients(coefficients, op=op)
    orths = []
    for M in momentum:
        m, n = M.shape
        shape = (m, rank) if side == "right" else (rank, n)
        orths.append(torch.empty(shape, dtype=torch.float64 if M.dtype == torch.float64 else torch.float32,
                                 device=M.device))
    indices = torch.empty((len(momentum), rank), dtype=torch.int32, device=basis.device)
    _eager_orth(list(grads), list(momentum), basis, side, rank, int(norm), flat, float(eps), [float(x) for x in mu],
                orths, indices)
    return orths, indices


def foreach_trion_apply_(params, orths, indices, basis, *, side, alpha, decay) -> None:
    """Step 6 of :func:`foreach_trion_update_` on every entry, in place:
    ``W <- decay[i] W + alpha[i] back(orths[i])`` with ``P`` the rows ``indices[i]`` of
    ``basis`` (``indices``: ``len x rank``, int32 or int64; ``orths[i]`` in the low-rank shape,
    as :func:`foreach_trion_orth_` returns them)."""
    op = _APPLY_OP
    for name, xs in (("params", params), ("orths", orths), ("alpha", alpha), ("decay", decay)):
        C.fail_type(isinstance(xs, (list, tuple)), op, lambda: f"{name} must be a list, got {type(xs).__name__}")
    _eager_apply(list(params), list(orths), indices, basis, side, [float(x) for x in alpha],
                 [float(x) for x in decay])


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
    b = dct_basis_float64(9).float().T.contiguous()
    out.append(("trion_foreach_orth", "right", (
        [randn(7, 9), randn(4, 9)], [randn(7, 9), randn(4, 9)], b, "right", 3, 1, flat(NS_COEFFICIENTS["dion"]),
        NS_EPS, [0.95, 0.5], [torch.empty(7, 3), torch.empty(4, 3)], torch.empty(2, 3, dtype=torch.int32))))
    out.append(("trion_foreach_apply", "right", (
        [randn(7, 9), randn(4, 9)], [randn(7, 3), randn(4, 3)], torch.tensor([[0, 4, 8], [2, 1, 3]], dtype=torch.int32),
        b, "right", [-0.02, -0.01], [1.0, 0.999])))
    bl = dct_basis_float64(6).float()
    out.append(("trion_foreach_orth", "left-l2", (
        [randn(6, 11)], [randn(6, 11)], bl, "left", 2, 2, flat(NS_COEFFICIENTS["muon"]), NS_EPS, [0.9],
        [torch.empty(2, 11)], torch.empty(1, 2, dtype=torch.int32))))
    out.append(("trion_foreach_apply", "left", (
        [randn(6, 11)], [randn(2, 11)], torch.tensor([[5, 0]]), bl, "left", [-0.02], [0.99])))
    out.append(("trion_foreach_update", "bf16-params", (
        [randn(5, 8, dtype=torch.bfloat16)], [randn(5, 8, dtype=torch.bfloat16)], [randn(5, 8)],
        dct_basis_float64(8).float().T.contiguous(), "right", 2, 1, flat(NS_COEFFICIENTS["dion"]), NS_EPS, [0.95],
        [-0.02], [1.0])))
    return out
