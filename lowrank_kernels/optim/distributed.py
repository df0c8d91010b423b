"""DDP, FSDP2 and tensor-parallel (DTensor) support for the low-rank optimizers.

**DDP** needs nothing: gradients are already all-reduced and parameters are plain
tensors, so every rank runs the same step on the same numbers. (Q-GaLore's INT8
``QLinear`` weights: build DDP with ``init_sync=False`` and the same seed on every
rank; DDP's initial broadcast cannot write the stride-0 gradient placeholder.)

**FSDP2** (``torch.distributed.fsdp.fully_shard``) turns each parameter into a
``DTensor`` sharded on dim 0 (HSDP: ``(Replicate(), Shard(0))``). An ``m x n``
weight is split into row blocks ``W_i`` (``m_i x n``, possibly uneven or empty), and
so is its gradient. The optimizers step on these shards, with no full-parameter
gather:

- **right side** (projector ``P``, ``r x n``, replicated): ``R_i = G_i P^T`` and
  ``back(N)_i = N_i P`` are row-local; the moments (``m x r``) are sharded on dim 0
  like the weight. **No communication** per step.
- **left side** (``P``, ``m x r``, stored sharded like the weight):
  ``R = P^T G = sum_i P_i^T G_i`` is summed over the shards, **one all-reduce of
  ``r x n`` per step**; the moments (``r x n``) are replicated; ``back(N)_i = P_i N``
  is row-local again. ``proj_type="right"`` makes every weight shard-local
  (``"std"`` picks the left side for wide weights, ``m < n``).
- **refresh**: APOLLO and FRUGAL ``random`` / ``columns`` regenerate their projection
  from a seed every rank shares (no communication). An SVD (GaLore / Q-GaLore
  ``svd="exact"`` or ``"lowrank"``, FRUGAL ``"svd"``) needs the whole gradient:
  :func:`full_gradient` all-gathers it (``m x n``), **at a refresh only**, and every
  rank computes the same SVD of the same numbers. DCT selection all-reduces the
  score vector (length ``n``, right side); on the left side the ``s x n`` score
  matrix (gradient-sized), so use ``proj_type="right"`` with DCT.
- the non-finite check: one all-reduce (max) of one value per parameter per step,
  so every rank skips the same parameters.
- 8-bit moments (``moment_bits=8``): the float32 block maxima follow their codes (sharded
  like the weight on the right side, replicated on the left); blocks lie inside one row, so
  every dim-0 shard is block-aligned and a shard's step is the single-process step on its
  rows. 16-bit moments round stochastically from the *local* element index of a shard, so
  their draws (not their distribution) differ from a single process.

How it is wired: ``LowRankOptimizer.step`` runs each low-rank parameter under
:func:`param_context` (DTensor's implicit replication: the plain projectors that
every rank computed identically act as replicated DTensors); elementwise math and
norms on DTensors are sharded by DTensor itself; the projection ``G P^T`` / ``P^T G``
is written out (:func:`sharded_project`); the ``lowrank_kernels`` projection, DCT and
INT4-projector ops get DTensor handlers (:mod:`lowrank_kernels.ops.dtensor`) that check the
placements, run the op on the local shards (left side: the ``r x n`` all-reduce, then
the Adam step on the replicated ``R``) and wrap the results. The multi-tensor (list) ops
get handlers too, so the bucketed step takes DTensors (:func:`bucketable`): per list,
the shard-local entries run in one list-op call on the local shards and the others
through the single op's handler, in list order, with its collectives: bitwise the
per-parameter path. A layout the handlers cannot serve raises :class:`ShardingError`
instead of gathering silently.
:func:`place_state` keeps the row-aligned state (right-side moments, left-side
projector) sharded like the weight, so ``torch.distributed.checkpoint`` saves it
sharded and resumes on the same world size.

**Tensor parallelism** (``RowwiseParallel``: ``Shard(1)``; with FSDP2 on a ("dp", "tp") mesh
``(Shard(0), Shard(1))``; ``ColwiseParallel`` x FSDP2 gives ``(_StridedShard(0), Shard(0))``,
rows only, served as above): a rank holds a block ``W[I, J]``. The projection's partial
product of the block is summed by one all-reduce of the low-rank block per mesh dimension
that shards the contracted dimension (right: ``|I| x r``; left: ``r x |J|``); ``R``, the
moments and ``N`` keep the weight's shards of the kept dimension
(:func:`lowrank_placements`); the back-projection of the block is local
(:mod:`lowrank_kernels.ops.dtensor`, "2-D layouts"). :func:`place_state` lays out the state
so (:func:`_place_block_state`: row-aligned keys take the weight's row shards, the left
moments its column shards); :func:`addcmul_` applies APOLLO's row or column factors to the
block. A refresh may gather: an SVD the whole gradient, DCT scoring the columns over the
dimensions that shard them. Placements no path serves (``Partial``, shards of other
dimensions) are refused when the param group is added (:func:`unsupported_placement`), and
so are flattened parameters (:func:`flat_parameter_error`: FSDP1 ``use_orig_params=False``,
DeepSpeed ZeRO).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from lowrank_kernels.ops.dtensor import (  # noqa: F401  (the op layer's DTensor helpers, re-exported)
    HAVE_DTENSOR,
    ShardingError,
    _block_of_shape,
    _replicate,
    _to_local_rep,
    install_op_handlers,
    is_dtensor,
    is_row_sharded,
    has_col_shard,
    is_sharded,
    local_rows,
    lowrank_placements,
    shard_dim,
    sharded_project,
)

if HAVE_DTENSOR:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import implicit_replication
else:  # pragma: no cover - depends on the torch build
    DTensor = ()  # isinstance(x, ()) is always False

#: state keys that are row-aligned with the weight (first dim ``m``), per projection side.
ROW_STATE_KEYS = {
    # 8-bit moments: the absmax (m x ceil(r / block_size)) is row-aligned with the codes
    "right": ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"),
    "left": ("projector",),
    "full": ("projector",),
}
#: state keys that are column-aligned with the weight (second dim ``n``), per projection side:
#: sharded like the weight's columns when tensor parallelism shards dim 1 (replicated under FSDP2).
COL_STATE_KEYS = {
    "left": ("exp_avg", "exp_avg_sq"),
}


# --------------------------------------------------------------------------- detection
def unsupported_placement(p: torch.Tensor) -> Optional[str]:
    """None when the optimizers can step the 2-D weight ``p``, else why not.

    Served: a plain tensor, or a DTensor whose every placement is ``Replicate()`` or a
    shard of dim 0 or dim 1 (``Shard``, ``_StridedShard``) on a mesh of any number of
    dimensions: FSDP2, HSDP, tensor parallelism (ColwiseParallel ``Shard(0)``,
    RowwiseParallel ``Shard(1)``) and their combinations. Refused: pending sums
    (``Partial``) and shards of other dimensions.
    """
    if not is_dtensor(p):
        return None
    bad = [pl for pl in p.placements if not (isinstance(pl, Replicate) or shard_dim(pl) in (0, 1))]
    if bad:
        return (
            f"DTensor placements {tuple(p.placements)} are not supported: a low-rank group takes weights that are "
            "replicated or sharded on dim 0 / dim 1 per mesh dimension (FSDP2, HSDP, tensor parallelism); "
            f"{tuple(bad)} is not; redistribute the parameter (e.g. reduce a Partial) or put it in a group with "
            "rank=None"
        )
    return None


def block_moment_error(p: torch.Tensor, side: str, rank: int, group: Dict[str, Any]) -> Optional[str]:
    """Why the low-rank moments of ``p`` cannot take the group's format, when ``p`` is sharded
    on dim 1 (tensor parallelism) and its ``side="left"`` moments (``r x n``, sharded on
    columns like the weight) would be 8-bit: their blocks run along the columns the shards
    split. None otherwise. Checked when the group is added, so no step starts."""
    from . import moments  # the moment formats (no import cycle at module load)

    if side != "left" or not has_col_shard(p):
        return None
    if moments.bits_for((rank, p.shape[1]), moments.format_of(group)) != 8:
        return None
    return (f"has placements {tuple(p.placements)} (sharded on dim 1) and 8-bit moments on the left side, whose "
            "blocks would straddle the column shards; use proj_type='right' or moment_bits=16 / 32 for it")


def flat_parameter_error(p: torch.Tensor) -> Optional[str]:
    """Why a 1-D parameter in a low-rank group cannot be stepped, naming the fix, when it is a
    flattened parameter (FSDP1 ``use_orig_params=False``'s ``FlatParameter``, DeepSpeed
    ZeRO's partitions); None for any other parameter."""
    if p.dim() != 1:
        return None
    flat = type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False)
    zero = hasattr(p, "ds_id") or hasattr(p, "ds_numel") or hasattr(p, "ds_tensor")
    if not (flat or zero):
        return None
    what = "an FSDP1 FlatParameter (use_orig_params=False)" if flat else "a DeepSpeed ZeRO partition"
    return (
        f"is {what} of {p.numel()} elements: the weight matrices were flattened into one 1-D buffer, so there "
        "is no matrix to project; use FSDP2 (torch.distributed.fsdp.fully_shard) or FSDP1 with "
        "use_orig_params=True (DeepSpeed ZeRO is not supported: it always flattens)"
    )


def local(t: Any) -> Any:
    """The local shard of a DTensor (a view that shares its storage); anything else as is."""
    return t.to_local() if is_dtensor(t) else t



# --------------------------------------------------------------------------- optimizer hooks
@contextlib.contextmanager
def param_context(p: torch.Tensor) -> Iterator[None]:
    """The context a parameter's low-rank step runs in: for a DTensor, DTensor's implicit
    replication (plain tensors that every rank computed identically, such as seeded or
    SVD projectors and identities, act as replicated DTensors); otherwise nothing."""
    if is_dtensor(p):
        install_op_handlers()
        with implicit_replication():
            yield
    else:
        yield


def full_gradient(grad: torch.Tensor) -> torch.Tensor:
    """The full gradient as a plain tensor: for a sharded DTensor an all-gather of
    ``m x n`` elements. Called at an SVD refresh only (never in the steady state)."""
    return grad.full_tensor() if is_dtensor(grad) else grad


def _probe_norms(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """One float32 value per tensor that is finite exactly when the tensor is finite.

    The fused L2 norm is the fast path (the max-norm is an order of magnitude slower
    on CPU). Its sum of squares can overflow for a finite tensor with huge elements
    (about 1e19 in float32), so a non-finite L2 norm is re-checked with the exact
    max-norm, for those tensors only: the answer is exact either way.
    """
    norms = [n.to(torch.float32) for n in torch._foreach_norm(tensors, 2)]
    flags = torch.stack(norms).isfinite()
    if bool(flags.all()):
        return norms
    for i in (~flags).nonzero().flatten().tolist():
        norms[i] = torch.linalg.vector_norm(tensors[i], float("inf")).to(torch.float32)
    return norms


def inf_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float32 per gradient, finite exactly when the gradient is, the same on every rank.

    Plain tensors: one fused ``_foreach_norm`` (see :func:`_probe_norms`). DTensors:
    the local shards' values, then **one** all-reduce (max) per distinct mesh and
    placements (FSDP2: one in all), so every rank takes the same skip decision.
    """
    if not grads or not is_dtensor(grads[0]):
        return torch.stack(_probe_norms(list(grads)))
    locs = [g.to_local() for g in grads]
    vec = torch.zeros(len(locs), dtype=torch.float32, device=locs[0].device)
    full = [i for i, t in enumerate(locs) if t.numel() > 0]  # a shard may hold no row at all
    if full:
        norms = _probe_norms([locs[i] for i in full])
        vec[torch.tensor(full, device=vec.device)] = torch.stack(norms)
    vec = torch.nan_to_num(vec, nan=float("inf"))  # a max-reduction may drop NaN, never inf
    layouts: Dict[tuple, list] = {}
    for i, g in enumerate(grads):
        layouts.setdefault((g.device_mesh, tuple(g.placements)), []).append(i)  # meshes compare by value
    for members in layouts.values():
        g0 = grads[members[0]]
        pending = [Partial("max") if shard_dim(pl) is not None else Replicate() for pl in g0.placements]
        if all(isinstance(pl, Replicate) for pl in pending):
            continue
        idx = torch.tensor(members, device=vec.device)
        vec[idx] = DTensor.from_local(vec[idx], g0.device_mesh, pending, run_check=False).full_tensor()
    return vec


def place_state(p: torch.Tensor, state: Dict[str, Any], side: str, host_keys=frozenset()) -> None:
    """Give the state of a DTensor parameter its placements, in place (no-op otherwise).

    Row-aligned entries (:data:`ROW_STATE_KEYS` of ``side``: right-side moments,
    left-side projector) that are still plain full tensors become DTensors with the
    parameter's placements: a local slice, no communication. Pending sums
    (``Partial``, e.g. a norm kept by APOLLO's limiter) are reduced to ``Replicate``.
    Other plain tensors (replicated projectors and moments) stay plain.
    """
    if not is_dtensor(p):
        return
    if has_col_shard(p):
        _place_block_state(p, state, side, host_keys)
        return
    rows = ROW_STATE_KEYS.get(side, ())
    for key, value in list(state.items()):
        if key in host_keys or not isinstance(value, torch.Tensor):
            continue
        if is_dtensor(value):
            if any(isinstance(pl, Partial) for pl in value.placements):
                value = state[key] = _replicate(value)
            if (key in rows and value.dim() >= 1 and value.shape[0] == p.shape[0] and is_row_sharded(p)
                    and all(isinstance(pl, Replicate) for pl in value.placements)):
                state[key] = value.redistribute(p.device_mesh, p.placements)  # a local slice
        elif key in rows and value.dim() >= 1 and value.shape[0] == p.shape[0] and is_row_sharded(p):
            state[key] = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)


def _pending_to_replicate(value):
    """A DTensor with every ``Partial`` placement reduced to ``Replicate`` (shards kept)."""
    if not any(isinstance(pl, Partial) for pl in value.placements):
        return value
    target = [Replicate() if isinstance(pl, Partial) else pl for pl in value.placements]
    return value.redistribute(value.device_mesh, target)


def _place_block_state(p: torch.Tensor, state: Dict[str, Any], side: str, host_keys) -> None:
    """:func:`place_state` for a weight sharded on dim 1 (tensor parallelism).

    Row-aligned entries (:data:`ROW_STATE_KEYS`: right-side moments ``m x r``, the left
    projector ``m x r``) take ``p``'s shards of dim 0; column-aligned ones
    (:data:`COL_STATE_KEYS`: left-side moments ``r x n``) take ``p``'s shards of dim 1;
    both are replicated over the other mesh dimensions. A local slice each, no
    communication. Other tensors (the right projector ``r x n``, DCT indices, INT4 codes,
    seeds) stay as they are (plain, the same on every rank); pending sums are reduced.
    """
    mesh = p.device_mesh
    targets = {}
    for key in ROW_STATE_KEYS.get(side, ()):
        targets[key] = (0, lowrank_placements(p, "right"))
    for key in COL_STATE_KEYS.get(side, ()):
        targets[key] = (1, lowrank_placements(p, "left"))
    for key, value in list(state.items()):
        if key in host_keys or not isinstance(value, torch.Tensor):
            continue
        if is_dtensor(value):
            value = state[key] = _pending_to_replicate(value)
        target = targets.get(key)
        if target is None or value.dim() != 2 or value.shape[target[0]] != p.shape[target[0]]:
            continue
        dim, placements = target
        if is_dtensor(value):
            if tuple(value.placements) != tuple(placements):
                if not all(isinstance(pl, Replicate) for pl in value.placements):
                    value = value.redistribute(mesh, [Replicate()] * mesh.ndim)
                state[key] = value.redistribute(mesh, placements)  # a local slice
        elif not all(isinstance(pl, Replicate) for pl in placements):
            state[key] = distribute_tensor(value, mesh, placements, src_data_rank=None)


def addcmul_(p: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor) -> None:
    """``p.addcmul_(grad, coef)`` with ``coef`` either row-aligned (``m x 1``, sharded like
    ``p``) or broadcast over the rows (``1 x n`` or 0-d, replicated), on the local rows.

    (DTensor refuses the in-place op when a one-row weight is sharded, because it reads
    the ``1 x n`` factor as a broadcast; here the roles are explicit.)
    """
    if has_col_shard(p):
        _addcmul_block(p, grad, coef)
        return
    if not is_row_sharded(p):
        p.addcmul_(grad, coef)
        return
    if is_row_sharded(coef):
        c = coef.to_local()
    else:
        c = _to_local_rep(coef, "coef", "addcmul_", False)
    p_l = p.to_local()
    if p_l.shape[0] > 0:
        p_l.addcmul_(grad.to_local(), c)


def _addcmul_block(p: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor) -> None:
    """:func:`addcmul_` for a weight sharded on dim 1: ``coef`` (``m x 1``, ``1 x n`` or 0-d,
    a DTensor or the same plain tensor on every rank) is laid out like ``p`` on its
    non-broadcast dimension (a vector-sized redistribution at most), then applied to the
    local block."""
    mesh = p.device_mesh
    if is_dtensor(coef):
        coef = _pending_to_replicate(coef)
        if coef.dim() == 2:
            target = [pl if shard_dim(pl) is not None and coef.shape[pl.dim] == p.shape[pl.dim] > 1 else Replicate()
                      for pl in p.placements]
            if tuple(coef.placements) != tuple(target):
                coef = coef.redistribute(mesh, target)
            c = coef.to_local()
        else:
            c = coef.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()
    else:
        c = coef
        if c.dim() == 2:
            rows, cols = _block_of_shape(p.shape, mesh, p.placements)
            c = c[rows if c.shape[0] > 1 else slice(None), cols if c.shape[1] > 1 else slice(None)]
    if not is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements):
        raise ShardingError(f"addcmul_: the gradient must be laid out like the parameter {tuple(p.placements)}, got "
                            f"{tuple(grad.placements) if is_dtensor(grad) else 'a plain tensor'}")
    p_l = p.to_local()
    if p_l.numel() > 0:
        p_l.addcmul_(grad.to_local(), c)


def bucketable(p: torch.Tensor) -> bool:
    """Whether ``p`` may take the bucketed (multi-tensor) step: a plain tensor with a plain
    gradient, or a DTensor the list-op handlers serve (``Shard(0)`` / ``Replicate()``
    placements, the gradient laid out like the parameter; the handlers are installed here)."""
    g = p.grad
    if not is_dtensor(p):
        return not is_dtensor(g)
    if (not is_dtensor(g) or unsupported_placement(p) is not None or tuple(g.placements) != tuple(p.placements)
            or has_col_shard(p)):  # sharded on dim 1: the per-parameter path (its all-reduce per step)
        return False
    install_op_handlers()
    return True


__all__ = [
    "is_dtensor",
    "is_row_sharded",
    "unsupported_placement",
    "local",
    "local_rows",
    "param_context",
    "full_gradient",
    "sharded_project",
    "addcmul_",
    "inf_norms",
    "place_state",
    "install_op_handlers",
    "bucketable",
    "ShardingError",
    "ROW_STATE_KEYS",
    "COL_STATE_KEYS",
    "has_col_shard",
    "is_sharded",
    "lowrank_placements",
    "flat_parameter_error",
    "block_moment_error",
]