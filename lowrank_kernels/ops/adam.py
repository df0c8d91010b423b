"""The adam family: the Adam moment update on an already projected ``R``.

APOLLO and FRUGAL project the gradient themselves (a random or column projection) and
then need only Adam's elementwise step on the low-rank ``R``; this op does that without
pushing ``R`` through an identity-projector GEMM.

Op (``torch.ops.lowrank_kernels.*``):

- ``adam_update(r, exp_avg!, exp_avg_sq!, beta1, beta2, eps, m_absmax!?, v_absmax!?, block_size,
  moment_seed) -> N``
- ``adam_foreach_update(r[], exp_avg![], exp_avg_sq![], n![], beta1, beta2, eps, m_absmax![],
  v_absmax![], block_size, moment_seed[]) -> ()`` (Python: :func:`foreach_adam_update_`): the
  same over lists in one call, ``N``
  written into the caller's ``n`` list (an op returning a tensor list next to mutated lists
  cannot be functionalized by torch.compile) (reference: a loop; C++: the loop behind one
  dispatcher call; Triton: one grouped launch for the whole list, kernels/adam.py).
  Empty moment lists: not given; one call = one moment format.

Moment formats, as in the projection family (ops/projection.py's module doc):

- **32-bit**: floating moments of ``r``'s shape, ``N`` in their dtype;
- **16-bit**: bfloat16 moments with ``moment_seed >= 0``: stochastic rounding on store
  (counters: the flat index for ``exp_avg``, ``i + numel`` for ``exp_avg_sq``);
- **8-bit**: ``m_absmax`` / ``v_absmax`` given; the moments are contiguous uint8 codes of
  ``r``'s shape (``r`` at least 1-D), blocks of ``block_size`` (1..256) along the last
  dim, absmax float32 of shape ``r.shape[:-1] + (ceil(cols / block_size),)``; dequantize,
  update in float32, ``N`` (float32) from the float32 values, requantize.
  :func:`moments8_zeros` makes a fresh state.
"""
from __future__ import annotations

import warnings

import torch

from lowrank_kernels.reference import adam as ref

from . import _checks as C
from ._registry import define_op, eager_caller, fake_no_output
from lowrank_kernels.reference.projection import moment_tail, n_dtype

from .projection import _MOMENT_ARGS, _check_hyper, foreach_moment_args, moment_op_args


def _kernels():
    """The adam family's Triton launchers (``lowrank_kernels.kernels.adam``), imported on
    first use: triton is optional, and decides at import whether it interprets."""
    from lowrank_kernels.kernels import adam as kernels

    return kernels


def validate_adam_update(r, exp_avg, exp_avg_sq, beta1, beta2, eps, m_absmax=None, v_absmax=None, block_size=0,
                         moment_seed=-1, *, op="adam_update_", _written=None):
    C.check_float(r, "r", op)
    if C.is_8bit(m_absmax, v_absmax):
        C.fail_value(r.dim() >= 1, op, "r must have at least one dimension for 8-bit moments (blocks run along "
                     "the last), got a 0-d tensor")
    written = C.check_moment_state(op, exp_avg, exp_avg_sq, r.shape, r.dtype, m_absmax, v_absmax, block_size,
                                   moment_seed)
    _check_hyper(op, beta1, beta2, eps)
    C.check_same_device(op, [("r", r)] + written)
    C.check_no_overlap(op, written, [("r", r)])
    if _written is not None:
        _written.extend(written)


def _fake_adam_update(r, exp_avg, exp_avg_sq, beta1, beta2, eps, *moments):
    return exp_avg.new_empty(exp_avg.shape, dtype=n_dtype(exp_avg))


adam_update_op = define_op(
    "adam_update",
    "(Tensor r, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, float beta1, float beta2, float eps, "
    f"{_MOMENT_ARGS}) -> Tensor",
    family="adam",
    triton=lambda: _kernels().adam_update_triton,
    cpp="adam_update_cpu",
    reference=ref.adam_update_ref,
    fake=_fake_adam_update,
    validate=validate_adam_update,
)


def adam_update_(r, exp_avg, exp_avg_sq, *, beta1=0.9, beta2=0.999, eps=1e-8, m_absmax=None, v_absmax=None,
                 block_size=256, moment_seed=None) -> torch.Tensor:
    """The Adam moment update on ``r`` (e.g. an already projected gradient), in place.

    ``exp_avg <- beta1 exp_avg + (1 - beta1) r``, ``exp_avg_sq <- beta2 exp_avg_sq +
    (1 - beta2) r^2``, computed in float32 (float64 for float64 inputs). Returns
    ``N = exp_avg / (sqrt(exp_avg_sq) + eps)`` (no bias correction), a new tensor of
    ``r``'s shape in the moments' dtype (float32 for 8-bit moments): what
    :func:`project_adam_` returns with an identity projector, without the GEMM.

    Moment format (module doc): ``m_absmax`` and ``v_absmax`` given: 8-bit moments
    (uint8 codes, blocks of ``block_size`` along the last dim); ``moment_seed`` an int
    >= 0: bfloat16 moments stored with stochastic rounding.
    """
    hyper = (float(beta1), float(beta2), float(eps))
    if m_absmax is None and v_absmax is None and (moment_seed is None or moment_seed < 0):
        return _eager_adam_update_op(r, exp_avg, exp_avg_sq, *hyper)
    return _eager_adam_update_op(r, exp_avg, exp_avg_sq, *hyper, *moment_op_args(m_absmax, v_absmax, block_size, moment_seed))


def moments8_zeros(shape, device="cpu", block_size=256) -> dict:
    """A fresh 8-bit Adam moment state of ``shape`` (blocks of ``block_size`` along the last dim).

    Returns ``dict(exp_avg=uint8 zeros, exp_avg_sq=uint8 zeros, m_absmax=float32 zeros,
    v_absmax=float32 zeros)``, absmax of shape ``shape[:-1] + (ceil(shape[-1] / block_size),)``;
    an absmax of 0 decodes to 0 whatever the codes. Pass the four tensors to the ops'
    ``exp_avg``, ``exp_avg_sq``, ``m_absmax``, ``v_absmax`` with the same ``block_size``.
    """
    shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)))
    if len(shape) < 1:
        raise ValueError("moments8_zeros: shape must have at least one dimension (blocks run along the last)")
    if any(d < 0 for d in shape):
        raise ValueError(f"moments8_zeros: shape must have non-negative sizes, got {shape}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= C.MAX_BLOCK_SIZE:
        raise ValueError(f"moments8_zeros: block_size must be an int in [1, {C.MAX_BLOCK_SIZE}], got {block_size!r}")
    ashape = C._absmax_shape(shape, block_size)
    return dict(
        exp_avg=torch.zeros(shape, dtype=torch.uint8, device=device),
        exp_avg_sq=torch.zeros(shape, dtype=torch.uint8, device=device),
        m_absmax=torch.zeros(ashape, dtype=torch.float32, device=device),
        v_absmax=torch.zeros(ashape, dtype=torch.float32, device=device),
    )


def validate_foreach_update(r, exp_avg, exp_avg_sq, out, beta1, beta2, eps, m_absmax=(), v_absmax=(), block_size=0,
                            moment_seed=(), *, op="foreach_adam_update_"):
    n = len(r)
    for name, xs in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("n", out)):
        C.fail_value(len(xs) == n, op, lambda: f"{name} must have one entry per tensor of r ({n}), got {len(xs)}")
    for name, xs in (("m_absmax", m_absmax), ("v_absmax", v_absmax), ("moment_seed", moment_seed)):
        C.fail_value(len(xs) in (0, n), op,
                     lambda: f"{name} must be empty (not given) or have one entry per tensor of r ({n}), got {len(xs)}")
    C.check_list_devices(op, [("r", r), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("n", out),
                              ("m_absmax", m_absmax), ("v_absmax", v_absmax)])
    written = []
    for i in range(n):
        mine = []
        validate_adam_update(r[i], exp_avg[i], exp_avg_sq[i], beta1, beta2, eps,
                             *moment_tail(m_absmax, v_absmax, block_size, moment_seed, i), op=f"{op} (entry {i})",
                             _written=mine)
        want = n_dtype(exp_avg[i])
        C.check_tensor(out[i], "n", f"{op} (entry {i})")
        C.fail_type(out[i].dtype == want, f"{op} (entry {i})",
                    lambda: f"n must have N's dtype {want} (the moments' dtype, float32 for 8-bit), got {out[i].dtype}")
        C.check_shape(out[i], "n", f"{op} (entry {i})", r[i].shape, "r's shape")
        C.fail_value(out[i].is_contiguous(), f"{op} (entry {i})", "n must be contiguous")
        C.check_same_device(f"{op} (entry {i})", [("r", r[i]), ("n", out[i])])
        written += [(f"{name}[{i}]", t) for name, t in mine] + [(f"n[{i}]", out[i])]
    # a written tensor must not share memory with another argument (across entries too)
    C.check_no_overlap(op, written, [(f"r[{i}]", r[i]) for i in range(n)])


foreach_update_op = define_op(
    "adam_foreach_update",
    "(Tensor[] r, Tensor(a!)[] exp_avg, Tensor(b!)[] exp_avg_sq, Tensor(c!)[] n, float beta1, float beta2, "
    "float eps, Tensor(d!)[] m_absmax, Tensor(e!)[] v_absmax, int block_size, int[] moment_seed) -> ()",
    family="adam",
    triton=lambda: _kernels().adam_foreach_update_triton,
    cpp="adam_foreach_update_cpu",
    reference=ref.adam_foreach_update_ref,
    fake=fake_no_output,
    validate=validate_foreach_update,
)


def _is_subclass(t) -> bool:
    return type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter


def foreach_adam_update_(r, exp_avg, exp_avg_sq, *, beta1=0.9, beta2=0.999, eps=1e-8, m_absmax=None,
                         v_absmax=None, block_size=256, moment_seed=None):
    """:func:`adam_update_` over lists (``r[i]``, ``exp_avg[i]``, ``exp_avg_sq[i]``) in one op call.

    Returns the list of ``N`` (new tensors in the moments' dtypes, float32 for 8-bit
    moments). Every entry is validated before anything is written. ``m_absmax`` /
    ``v_absmax``: None or lists with one absmax tensor per entry (8-bit moments);
    ``moment_seed``: None or a list with one int per entry (one call = one format).
    """
    exp_avg = list(exp_avg)
    # A DTensor moment (FSDP2) gets an N laid out like it (empty_like keeps its placements).
    out = [(torch.empty_like(m, dtype=n_dtype(m), memory_format=torch.contiguous_format) if _is_subclass(m)
            else torch.empty(m.shape, dtype=n_dtype(m), device=m.device)) if isinstance(m, torch.Tensor) else m
           for m in exp_avg]
    _eager_foreach_update_op(list(r), exp_avg, list(exp_avg_sq), out, float(beta1), float(beta2), float(eps),
                      *foreach_moment_args("foreach_adam_update_", m_absmax, v_absmax, block_size, moment_seed))
    return out


def adam_foreach_update_(*args, **kwargs):
    """Deprecated alias of :func:`foreach_adam_update_` (multi-tensor functions are named
    ``foreach_`` + the single-tensor name, as torch's ``_foreach_*``); removed in the next release."""
    warnings.warn("lowrank_kernels.ops.adam_foreach_update_ is deprecated, use foreach_adam_update_",
                  DeprecationWarning, stacklevel=2)
    return foreach_adam_update_(*args, **kwargs)


# Eager callers of the ops (see _registry.eager_caller).
_eager_adam_update_op = eager_caller(adam_update_op)
_eager_foreach_update_op = eager_caller(foreach_update_op)


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the adam family's ops, for ``torch.library.opcheck``.

    Returns ``[(op name, label, args), ...]``, made afresh at each call (the ops write into
    their arguments): float32, bfloat16 ``r`` with float32 moments, 8-bit moments, and for
    the list op entries of different shapes and bfloat16 moments with stochastic rounding.
    """
    from .projection import _sample_moments8

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    def rand(*shape):
        return torch.rand(shape, generator=gen)

    bf16 = torch.bfloat16
    out = [
        ("adam_update", "f32", (randn(20, 7), randn(20, 7), rand(20, 7), 0.9, 0.999, 1e-8)),
        ("adam_update", "bf16-r-f32-moments", (randn(5, 9, dtype=bf16), randn(5, 9), rand(5, 9), 0.8, 0.9, 1e-6)),
    ]
    st = _sample_moments8((4, 7), 3, gen)
    out.append(("adam_update", "8bit", (randn(4, 7), st[0], st[1], 0.9, 0.99, 1e-8, st[2], st[3], 3, -1)))
    out.append(("adam_foreach_update", "f32-two-shapes", (
        [randn(6, 2), randn(3, 5)], [randn(6, 2), randn(3, 5)], [rand(6, 2), rand(3, 5)],
        [torch.zeros(6, 2), torch.zeros(3, 5)], 0.9, 0.99, 1e-8, [], [], 0, [])))
    st = _sample_moments8((4, 7), 3, gen)
    out.append(("adam_foreach_update", "8bit", (
        [randn(4, 7)], [st[0]], [st[1]], [torch.zeros(4, 7)], 0.9, 0.99, 1e-8, [st[2]], [st[3]], 3, [])))
    out.append(("adam_foreach_update", "bf16-sr", (
        [randn(5, 6, dtype=bf16)], [torch.zeros(5, 6, dtype=bf16)], [torch.zeros(5, 6, dtype=bf16)],
        [torch.zeros(5, 6, dtype=bf16)], 0.9, 0.99, 1e-8, [], [], 0, [9])))
    return out
