"""The DCT family: a shared orthonormal DCT-II basis, fused scoring + top-k, and the
DCT projector (basis indices instead of a dense projector) of the projection family.

This is the SVD-free projector of DCT-AdamW (Modoranu et al. 2025): one basis per size ``s``
shared by every layer, ``r`` basis vectors chosen per layer by their alignment with
the gradient (one matmul plus a sort instead of an SVD), and only the ``r`` indices
stored per layer.

Ops (``torch.ops.lowrank_kernels.*``):

- ``dct_scores(grad, basis, side, norm) -> scores`` (float32; float64 for float64 input)
- ``dct_score_topk(grad, basis, k, side, norm) -> indices`` (int32)
- ``dct_foreach_score_topk(grads[], basis, k, side, norm) -> indices`` (``len(grads) x k``
  int32; Python: :func:`foreach_dct_score_topk`): the same for a list of same-shape gradients in one call (a DCTAdamW refresh of
  every weight of one shape); each row bitwise equal to ``dct_score_topk`` of that gradient
  alone, on every backend (reference and C++: a loop; Triton: one scoring launch over a
  table of the gradients' addresses, no stacked copy)

A :class:`DCTProjector` (basis + indices) is the projection family's DCT projector
kind: :func:`dct_project`, :func:`project_adam_`, :func:`backproject_apply_` and
:func:`project_update_backproject_` run the ``projection_*`` ops
(lowrank_kernels/ops/projection.py) with ``proj=basis, indices=indices``, whose kernels
gather the selected basis rows as they load projector tiles.
"""
from __future__ import annotations

import threading
import warnings
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from lowrank_kernels.reference import dct as ref

from . import _checks as C
from ._registry import define_op
from . import projection as _proj
from .projection import INDEX_DTYPES, register_projector_type  # noqa: F401
NORMS = (1, 2)

def _kernels():
    """The dct family's Triton launchers (``lowrank_kernels.kernels.dct``), imported on
    first use: triton is optional, and decides at import whether it interprets."""
    from lowrank_kernels.kernels import dct as kernels

    return kernels


# --------------------------------------------------------------------------- the basis
_BASIS_CACHE: Dict[tuple, torch.Tensor] = {}
_BASIS_LOCK = threading.Lock()


def _device_key(device) -> torch.device:
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def dct_basis(size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix of order ``size``; rows are the cosine waveforms.

    ``C[k, j] = sqrt(2/size) * cos(pi * k * (2j + 1) / (2 * size))``, row 0 scaled by
    ``1/sqrt(2)``, so ``C C^T = I`` and ``C`` equals
    ``scipy.fft.dct(np.eye(size), norm="ortho", axis=0)``. Built in float64, then cast
    to ``dtype`` on ``device``; cached per ``(size, dtype, device)``, so every layer of
    one size shares one tensor. The returned tensor is the cached one: do not modify it.
    """
    if type(size) is int and type(device) is torch.device and (device.type == "cpu" or device.index is not None):
        # A hit on an already normalized key (an optimizer asks once per parameter per step):
        # only valid arguments were ever stored.
        basis = _BASIS_CACHE.get((size, dtype, device))
        if basis is not None:
            return basis
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"dct_basis: size must be a positive int, got {size!r}")
    if not isinstance(dtype, torch.dtype) or dtype not in C.FLOAT_DTYPES:
        raise TypeError(f"dct_basis: dtype must be one of float32, bfloat16, float16, float64, got {dtype!r}")
    dev = _device_key(device)
    key = (size, dtype, dev)
    basis = _BASIS_CACHE.get(key)
    if basis is None:
        with _BASIS_LOCK:
            basis = _BASIS_CACHE.get(key)
            if basis is None:
                basis = ref.dct_basis_float64(size).to(device=dev, dtype=dtype)
                _BASIS_CACHE[key] = basis
    return basis


def clear_basis_cache() -> None:
    """Drop every cached basis (frees their memory)."""
    with _BASIS_LOCK:
        _BASIS_CACHE.clear()


def basis_size(m: int, n: int, side: str) -> int:
    """Order of the basis for an ``m x n`` gradient: ``n`` on the right, ``m`` on the left."""
    return n if side == "right" else m


def _basis_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    # The basis is passed in the gradient's dtype: a bf16/fp16 gradient is scored with
    # a tensor-core GEMM on GPU, and float32/float64 stay exact.
    return grad_dtype if grad_dtype in C.FLOAT_DTYPES else torch.float32


# --------------------------------------------------------------------------- validation
def _check_grad_basis(op, grad, basis, side, batched=False):
    C.check_side(side, op)
    C.check_float(grad, "grad", op)
    if batched:
        C.fail_value(
            grad.dim() in (2, 3), op,
            lambda: f"grad must be 2-D (m, n) or 3-D (batch, m, n), got shape {tuple(grad.shape)}",
        )
    else:
        C.check_ndim(grad, "grad", op, 2)
    m, n = grad.shape[-2:]
    s = basis_size(m, n, side)
    C.check_float(basis, "basis", op)
    C.check_shape(basis, "basis", op, (s, s), lambda: f"the DCT basis of order {'n' if side == 'right' else 'm'} = {s}")
    C.check_same_device(op, [("grad", grad), ("basis", basis)])
    return m, n, s


def _check_norm(op, norm):
    C.fail_value(type(norm) is int and norm in NORMS, op, lambda: f"norm must be 1 or 2, got {norm!r}")


def validate_scores(grad, basis, side, norm, *, op="dct_scores"):
    _check_grad_basis(op, grad, basis, side, batched=True)
    _check_norm(op, norm)


def validate_score_topk(grad, basis, k, side, norm, *, op="dct_score_topk"):
    _, _, s = _check_grad_basis(op, grad, basis, side, batched=True)
    _check_norm(op, norm)
    C.fail_value(1 <= k <= s, op, lambda: f"k ({k}) must be between 1 and the basis order {s}")


def validate_foreach_score_topk(grads, basis, k, side, norm, *, op="dct_foreach_score_topk"):
    C.check_side(side, op)
    _check_norm(op, norm)
    C.fail_type(isinstance(grads, (list, tuple)), op, lambda: f"grads must be a list of tensors, got {type(grads).__name__}")
    C.check_list_devices(op, [("grads", grads), ("basis", basis)])
    C.check_float(basis, "basis", op)
    C.check_ndim(basis, "basis", op, 2)
    if len(grads) == 0:  # nothing to score; k is still checked against the basis
        C.check_shape(basis, "basis", op, (basis.shape[0], basis.shape[0]), "a square DCT basis")
        s = basis.shape[0]
    else:
        g0 = grads[0]
        for i, g in enumerate(grads):
            C.check_float(g, f"grads[{i}]", op)
            C.check_ndim(g, f"grads[{i}]", op, 2)
            if i:
                C.check_shape(g, f"grads[{i}]", op, tuple(g0.shape), "grads[0]'s shape: one call scores one shape")
                C.fail_type(g.dtype == g0.dtype, op,
                            lambda: f"grads[{i}] has dtype {g.dtype} but grads[0] {g0.dtype}: one call scores one dtype")
        m, n = g0.shape
        s = basis_size(m, n, side)
        C.check_shape(basis, "basis", op, (s, s), lambda: f"the DCT basis of order {'n' if side == 'right' else 'm'} = {s}")
        C.check_same_device(op, [("basis", basis)] + [(f"grads[{i}]", g) for i, g in enumerate(grads)])
    C.fail_value(1 <= k <= s, op, lambda: f"k ({k}) must be between 1 and the basis order {s}")


# --------------------------------------------------------------------------- fakes
def _acc_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _fake_scores(grad, basis, side, norm):
    s = basis_size(grad.shape[-2], grad.shape[-1], side)
    return grad.new_empty((*grad.shape[:-2], s), dtype=_acc_dtype(grad, basis))


def _fake_score_topk(grad, basis, k, side, norm):
    return grad.new_empty((*grad.shape[:-2], k), dtype=ref.INDEX_DTYPE)


def _fake_foreach_score_topk(grads, basis, k, side, norm):
    return basis.new_empty((len(grads), k), dtype=ref.INDEX_DTYPE)


# --------------------------------------------------------------------------- ops
scores_op = define_op(
    "dct_scores",
    "(Tensor grad, Tensor basis, str side, int norm) -> Tensor",
    family="dct",
    triton=lambda: _kernels().dct_scores_triton,
    cpp="dct_scores_cpu",
    reference=ref.dct_scores_ref,
    fake=_fake_scores,
    validate=validate_scores,
)

score_topk_op = define_op(
    "dct_score_topk",
    "(Tensor grad, Tensor basis, int k, str side, int norm) -> Tensor",
    family="dct",
    triton=lambda: _kernels().dct_score_topk_triton,
    cpp="dct_score_topk_cpu",
    reference=ref.dct_score_topk_ref,
    fake=_fake_score_topk,
    validate=validate_score_topk,
)


foreach_score_topk_op = define_op(
    "dct_foreach_score_topk",
    "(Tensor[] grads, Tensor basis, int k, str side, int norm) -> Tensor",
    family="dct",
    triton=lambda: _kernels().dct_foreach_score_topk_triton,
    cpp="dct_foreach_score_topk_cpu",
    reference=ref.dct_foreach_score_topk_ref,
    fake=_fake_foreach_score_topk,
    validate=validate_foreach_score_topk,
)


# --------------------------------------------------------------------------- public API
class DCTProjector(NamedTuple):
    """A projector given by DCT basis indices: ``P = basis[indices]`` (right) or its transpose (left).

    Pass it as ``proj`` to :func:`lowrank_kernels.ops.project_adam_`,
    :func:`~lowrank_kernels.ops.backproject_apply_` and
    :func:`~lowrank_kernels.ops.project_update_backproject_`: the kernels gather the
    selected basis rows themselves, so no dense per-layer projector is materialized.
    ``basis`` is the shared :func:`dct_basis` of the projected side's size; ``indices``
    an int32/int64 vector of length ``rank`` (from :func:`dct_score_topk`).
    """

    basis: torch.Tensor
    indices: torch.Tensor

    @property
    def rank(self) -> int:
        return self.indices.shape[0]

    def dense(self, side: str) -> torch.Tensor:
        """The dense projector this stands for (for tests and debugging)."""
        return ref.dense_projector(self.basis, self.indices, side)


def _default_basis(grad: torch.Tensor, side, basis: Optional[torch.Tensor], op: str) -> torch.Tensor:
    if basis is not None:
        return basis
    if isinstance(grad, torch.Tensor) and grad.dim() in (2, 3) and side in C.SIDES and grad.dtype in C.FLOAT_DTYPES:
        # Fast path (the op validates everything again): no torch._check calls here.
        return dct_basis(basis_size(grad.shape[-2], grad.shape[-1], side), grad.dtype, grad.device)
    C.check_side(side, op)
    C.check_float(grad, "grad", op)
    C.fail_value(grad.dim() in (2, 3), op, f"grad must be 2-D (m, n) or 3-D (batch, m, n), got shape {tuple(grad.shape)}")
    return dct_basis(basis_size(grad.shape[-2], grad.shape[-1], side), _basis_dtype(grad.dtype), grad.device)


def dct_scores(grad: torch.Tensor, *, side: str, norm: int = 1, basis: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Alignment of every DCT basis vector with the gradient.

    ``side="right"``: ``score_j = ||(G C^T)[:, j]||_p`` (``C`` of order ``n``);
    ``side="left"``: ``score_i = ||(C G)[i, :]||_p`` (``C`` of order ``m``); ``p = norm``
    (1 or 2). Returns a float32 vector (float64 for float64 input) of the basis order.
    ``basis`` defaults to the cached :func:`dct_basis` in the gradient's dtype.

    Batched: a 3-D ``grad`` (``batch x m x n``, e.g. the stacked gradients of every
    layer of one shape) gives ``batch x s`` scores in one kernel launch.
    """
    _check_norm("dct_scores", norm)
    basis = _default_basis(grad, side, basis, "dct_scores")
    return scores_op(grad, basis, side, norm)


def dct_score_topk(
    grad: torch.Tensor,
    k: int,
    *,
    side: str,
    norm: int = 1,
    return_lowrank: bool = False,
    basis: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """The ``k`` DCT basis vectors best aligned with the gradient, as int32 indices.

    Scores as :func:`dct_scores`; the result is ordered by descending score, ties broken
    by the lower index (so a zero gradient gives ``0, 1, ..., k-1``). A 3-D ``grad``
    (``batch x m x n``) gives ``batch x k`` indices from one launch (``return_lowrank``
    needs a 2-D ``grad``). On CUDA the score
    matrix ``S`` (``m x n``) is never written to memory: the Triton kernel reduces each
    GEMM tile's ``|S|`` (or ``S^2``) in its epilogue.

    With ``return_lowrank=True`` returns ``(indices, R)`` where ``R = S[:, idx]``
    (right, ``m x k``) or ``S[idx]`` (left, ``k x n``), float32. ``R`` is computed by a
    second, ``k/s``-sized GEMM over the gathered basis rows (``dct_project``), not
    kept from the scoring pass: keeping it would mean writing all of ``S``, which is
    what the fused scoring avoids. (DCTAdamW does not need it: its projected Adam step
    computes ``R`` anyway.)
    """
    _check_norm("dct_score_topk", norm)
    torch._check_type(
        isinstance(k, int) and not isinstance(k, bool), lambda: f"dct_score_topk: k must be an int, got {type(k).__name__}"
    )
    basis = _default_basis(grad, side, basis, "dct_score_topk")
    idx = score_topk_op(grad, basis, k, side, norm)
    if not return_lowrank:
        return idx
    C.fail_value(grad.dim() == 2, "dct_score_topk", "return_lowrank=True needs a 2-D grad")
    return idx, _proj.project_op(grad, basis, side, idx)


def foreach_dct_score_topk(
    grads, k: int, *, side: str, norm: int = 1, basis: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """:func:`dct_score_topk` for a list of gradients of one shape and dtype, in one op call.

    Returns ``len(grads) x k`` int32 indices; row ``i`` is bitwise what
    ``dct_score_topk(grads[i], k, side=side, norm=norm)`` returns, on every backend. No
    stacked copy of the gradients is made: the Triton backend scores the whole list in one
    launch that reads each gradient where it lies (a table of their addresses), the C++ and
    reference backends loop. ``basis`` defaults to the cached :func:`dct_basis` in the
    gradients' dtype (as for one gradient). This is how :class:`~lowrank_kernels.optim.DCTAdamW`
    refreshes all same-shape weights at once. (With Triton autotuning switched on,
    ``LOWRANK_KERNELS_TRITON_AUTOTUNE=1``, the list launch and the single launch are tuned
    separately and may take different tiles: their scores then agree to rounding only.)
    """
    op = "foreach_dct_score_topk"
    _check_norm(op, norm)
    torch._check_type(
        isinstance(k, int) and not isinstance(k, bool), lambda: f"{op}: k must be an int, got {type(k).__name__}"
    )
    C.fail_type(isinstance(grads, (list, tuple)), op, lambda: f"grads must be a list of tensors, got {type(grads).__name__}")
    grads = list(grads)
    if basis is None:
        C.fail_value(len(grads) > 0, op, "an empty grads list needs an explicit basis")
        g0 = grads[0]
        C.check_float(g0, "grads[0]", op)
        C.check_ndim(g0, "grads[0]", op, 2)
        C.check_side(side, op)
        basis = dct_basis(basis_size(g0.shape[0], g0.shape[1], side), _basis_dtype(g0.dtype), g0.device)
    return foreach_score_topk_op(grads, basis, k, side, norm)


def dct_foreach_score_topk(*args, **kwargs):
    """Deprecated alias of :func:`foreach_dct_score_topk` (multi-tensor functions are named
    ``foreach_`` + the single-tensor name, as torch's ``_foreach_*``); removed in the next release."""
    warnings.warn("lowrank_kernels.ops.dct_foreach_score_topk is deprecated, use foreach_dct_score_topk",
                  DeprecationWarning, stacklevel=2)
    return foreach_dct_score_topk(*args, **kwargs)


def dct_project(grad: torch.Tensor, proj: DCTProjector, *, side: str) -> torch.Tensor:
    """``R = G P^T`` (right) or ``P^T G`` (left) for ``P`` given by ``proj``; float32 (float64 for float64).

    The projection GEMM without an epilogue: the op ``projection_project`` with the DCT
    projector (the same as :func:`lowrank_kernels.ops.projection.project`).
    """
    _check_projector_type(proj, "dct_project")
    return _proj.project_op(grad, proj.basis, side, proj.indices)


def _check_projector_type(proj, op):
    torch._check_type(
        isinstance(proj, DCTProjector), lambda: f"{op}: proj must be a DCTProjector, got {type(proj).__name__}"
    )


def _op_args(proj: DCTProjector, side, m, n, op):
    # The ops' DCT projector kind: proj = the basis, indices = the rows (rank from them).
    return proj.basis, proj.indices, None, None, 0, 0


register_projector_type(DCTProjector, op_args=_op_args)


# --------------------------------------------------------------------------- sample inputs
def sample_inputs(seed: int = 0) -> list:
    """Sample arguments of the dct family's ops, for ``torch.library.opcheck``.

    Returns ``[(op name, label, args), ...]``, made afresh at each call: both sides, both
    norms, float32 and bfloat16, a batch of gradients for the top-k, and for the list op
    two gradients, one repeated bfloat16 gradient and an empty list. (The projection
    family's samples cover the DCT projector kind.)
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    g = randn(20, 13)
    br, bl = dct_basis(13), dct_basis(20)
    bf16 = torch.bfloat16
    return [
        ("dct_scores", "right-norm1", (g, br, "right", 1)),
        ("dct_scores", "left-bf16-norm2", (g.to(bf16), dct_basis(20, bf16), "left", 2)),
        ("dct_score_topk", "left-norm1", (g, bl, 5, "left", 1)),
        ("dct_score_topk", "batched-right-norm2", (randn(2, 20, 13), br, 3, "right", 2)),
        ("dct_foreach_score_topk", "right-two", ([randn(20, 13), randn(20, 13)], br, 5, "right", 1)),
        ("dct_foreach_score_topk", "left-bf16-repeated", ([randn(20, 13, dtype=bf16)] * 3, dct_basis(20, bf16), 2,
                                                          "left", 2)),
        ("dct_foreach_score_topk", "empty", ([], dct_basis(7), 3, "left", 1)),
    ]
