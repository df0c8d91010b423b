"""DTensor (FSDP2, tensor parallelism) handlers of the ``lowrank_kernels`` ops.

A parameter sharded by ``torch.distributed.fsdp.fully_shard`` is a ``DTensor`` split
into row blocks (dim 0). The projection, Adam, DCT and INT4-projector ops get DTensor
handlers (:func:`install_op_handlers`) that check the placements, run the op on the
local shards (left side: one ``r x n`` all-reduce, then the Adam step on the replicated
``R``) and wrap the results. The multi-tensor (list) ops get handlers too: per list,
the shard-local entries run in one list-op call on the local shards and the others
through the single op's handler, in list order, with its collectives (bitwise the
per-parameter path). A layout the handlers cannot serve raises :class:`ShardingError`
instead of gathering silently. :func:`sharded_project` writes out the projection
``G P^T`` / ``P^T G`` of a row-sharded gradient. A weight also sharded on dim 1 (tensor
parallelism) takes the "2-D layouts" path below: per rank a block of rows and columns, one
all-reduce of the low-rank block per mesh dimension sharding the contracted dimension.

This module is the op layer's part of the distributed support; what the optimizers
need on top (state placement, the non-finite probe, the full gradient at a refresh)
lives in :mod:`lowrank_kernels.optim.distributed`, which also describes the layouts
and their communication.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

try:  # torch.distributed may be absent in some builds; every helper then degrades to a no-op.
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    try:  # the shards FSDP2 makes of a tensor-parallel weight (not a Shard subclass)
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - depends on the torch build
        _StridedShard = Shard
    HAVE_DTENSOR = True
except Exception:  # pragma: no cover - depends on the torch build
    HAVE_DTENSOR = False
    DTensor = ()  # isinstance(x, ()) is always False


# --------------------------------------------------------------------------- detection
def shard_dim(pl) -> Optional[int]:
    """The tensor dimension a placement shards (``Shard`` or FSDP2's ``_StridedShard`` of a
    tensor-parallel weight), or None (``Replicate``, ``Partial``)."""
    return pl.dim if HAVE_DTENSOR and isinstance(pl, (Shard, _StridedShard)) else None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return HAVE_DTENSOR and isinstance(t, DTensor)


def is_row_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor sharded on dim 0 over some mesh dimension (FSDP2's layout)."""
    return is_dtensor(t) and any(shard_dim(pl) == 0 for pl in t.placements)


def local_rows(p: torch.Tensor) -> Tuple[int, int]:
    """``(offset, count)`` of the rows of the global ``p`` that this rank holds."""
    if not is_row_sharded(p):
        return 0, p.shape[0]
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]), int(shape[0])


def _partial_placements(p) -> list:
    """``p``'s placements with every ``Shard(0)`` turned into a pending sum."""
    return [Partial() if shard_dim(pl) is not None else Replicate() for pl in p.placements]


def _replicate(t):
    """A DTensor made ``Replicate`` on every mesh dim (all-reduces a ``Partial``); plain tensors as is."""
    if not is_dtensor(t):
        return t
    if all(isinstance(pl, Replicate) for pl in t.placements):
        return t
    if any(shard_dim(pl) is not None for pl in t.placements):
        raise ValueError(
            f"expected a replicated (or pending-sum) DTensor of shape {tuple(t.shape)}, got placements "
            f"{tuple(t.placements)}: replicating it would gather a sharded tensor"
        )
    return t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)


# --------------------------------------------------------------------------- DTensor op handlers
_ROW_IF_RIGHT = ("exp_avg", "exp_avg_sq", "update", "m_absmax", "v_absmax")
_ROW_IF_LEFT = ("proj",)
_ROW_ALWAYS = ("param", "grad", "row_decay", "row_alpha")
#: The projection ops take the projector as ``proj`` plus optional ``indices`` (DCT: ``proj`` is the
#: shared basis, replicated) or ``q_scale``/``q_min`` (Q-GaLore's packed INT4 projector: replicated on
#: the right; on the left this shard's rows are dequantized, the packing groups do not follow rows).
#: Only a dense left projector is row-sharded like the weight.
_PROJECTION_OPS = (
    "projection_project", "projection_project_adam", "projection_backproject_apply",
    "projection_project_update_backproject",
)
_installed = False


class ShardingError(ValueError):
    """A lowrank_kernels op was called on DTensors in a layout it cannot serve shard-locally."""


def _role(name: str, side: str, kind: str) -> str:
    if name in _ROW_ALWAYS:
        return "row"
    if name in _ROW_IF_RIGHT:
        return "row" if side == "right" else "rep"
    if name in _ROW_IF_LEFT:
        return "row" if side == "left" and kind == "dense" else "rep"
    return "rep"  # a DCT basis or a packed INT4 projector, indices, q_scale, q_min


def _kind(names, bound) -> str:
    """The projector kind of a projection op call: ``"dense"``, ``"dct"`` or ``"int4"``."""
    if bound[names.index("indices")] is not None:
        return "dct"
    if bound[names.index("q_scale")] is not None:
        return "int4"
    return "dense"


def _rank_of(names, args, side, kind) -> int:
    if kind == "dct":
        return args[names.index("indices")].numel()
    if kind == "int4":
        return args[names.index("rank")]
    proj = args[names.index("proj")]
    return proj.shape[0] if side == "right" else proj.shape[1]


def _to_local_row(t, name: str, row: torch.Tensor, opname: str, written: bool):
    """The local rows of a row-aligned argument ``t`` of the op (``row`` is the sharded param/grad)."""
    if is_dtensor(t) and not written and t.shape[0] == row.shape[0] and all(
        isinstance(pl, Replicate) for pl in t.placements
    ):
        off, cnt = local_rows(row)  # replicated: every rank holds all rows, take ours (no communication)
        return t.to_local()[off:off + cnt]
    if is_dtensor(t):
        if tuple(t.placements) != tuple(row.placements) or t.shape[0] != row.shape[0]:
            raise ShardingError(
                f"{opname}: {name} (shape {tuple(t.shape)}, placements {tuple(t.placements)}) must be sharded "
                f"on dim 0 like the parameter (shape {tuple(row.shape)}, placements {tuple(row.placements)})"
            )
        return t.to_local()
    if written:
        raise ShardingError(
            f"{opname}: {name} is written in place and must be a DTensor sharded like the parameter, got a plain "
            f"tensor of shape {tuple(t.shape)} (lowrank_kernels.optim.distributed.place_state does this)"
        )
    if t.shape[0] != row.shape[0]:
        raise ShardingError(f"{opname}: {name} has {t.shape[0]} rows, the parameter {row.shape[0]}")
    off, cnt = local_rows(row)
    return t[off:off + cnt]


def _to_local_rep(t, name: str, opname: str, written: bool):
    if not is_dtensor(t):
        return t
    if written and not all(isinstance(pl, Replicate) for pl in t.placements):
        raise ShardingError(f"{opname}: {name} is written in place and must be replicated, got {tuple(t.placements)}")
    try:
        return _replicate(t).to_local()
    except ValueError as e:
        raise ShardingError(f"{opname}: {name}: {e}") from None


def _wrap(out: torch.Tensor, like: Optional[torch.Tensor], mesh, row: bool, global_shape):
    if like is None:
        return out
    if row:
        return DTensor.from_local(out, mesh, like.placements, run_check=False, shape=torch.Size(global_shape),
                                  stride=_contiguous_stride(global_shape))
    return DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _contiguous_stride(shape) -> Tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


def _bind(op_call, args, kwargs) -> list:
    """The op's arguments in schema order; those left out take the schema's defaults."""
    schema = op_call._schema
    return list(args) + [kwargs[a.name] if a.name in kwargs else a.default_value
                         for a in schema.arguments[len(args):]]


def _row_of(names, bound):
    """The row-sharded tensor that fixes a projection op's row layout (param, grad or a
    per-row factor), or None."""
    return next((bound[names.index(n)] for n in _ROW_ALWAYS if n in names and is_row_sharded(bound[names.index(n)])),
                None)


def _local_args(opname, names, bound, row, side, kind, written) -> list:
    """A projection op's arguments on this rank's shards (right side, or no row-sharded tensor)."""
    local_args = []
    for name, a in zip(names, bound):
        if not isinstance(a, torch.Tensor):
            local_args.append(a)
        elif row is not None and _role(name, side, kind) == "row":
            local_args.append(_to_local_row(a, name, row, opname, name in written))
        else:
            local_args.append(_to_local_rep(a, name, opname, name in written))
    return local_args


def _generic_handler(op_call, args, kwargs):
    """Run a projection / DCT op on local shards (see the module docstring)."""
    schema = op_call._schema
    opname = schema.name.split("::")[-1]
    # Arguments left out take the schema's defaults (the projector's optional arguments).
    bound = _bind(op_call, args, kwargs)
    names = [a.name for a in schema.arguments]
    kind = _kind(names, bound)
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    side = bound[names.index("side")]
    col = _col_sharded_of(names, bound)
    if col is not None:  # tensor parallelism: a block of rows and columns per rank
        return _block_handler(opname, names, bound, col, written, kind)
    dts = [a for a in bound if is_dtensor(a)]
    mesh = dts[0].device_mesh
    row = _row_of(names, bound)
    if row is not None and side == "left":
        return _left_sharded(opname, names, bound, row, written, kind)
    local_args = _local_args(opname, names, bound, row, side, kind, written)
    returns = schema.returns
    if row is not None and local_rows(row)[1] == 0:
        # An empty shard (more ranks than rows): nothing to update, empty outputs.
        if not returns:
            return None
        out = torch.empty((0,) + tuple(local_args[names.index("exp_avg")].shape[1:]) if "exp_avg" in names
                          else (0, _rank_of(names, local_args, side, kind)),
                          dtype=torch.float32, device=row.device)
    elif row is not None and _local_rank_too_big(names, local_args, side, kind):
        # A shard with fewer rows than the rank (many ranks, small weight): the ops check
        # 1 <= rank <= min(m, n) for their own (global) inputs, so run the reference math.
        out = _reference(opname)(*local_args)
    else:
        out = op_call(*local_args)
    if not returns:
        return None
    like = None
    row_out = row is not None and side == "right"
    if "exp_avg" in names:  # project_adam: N has the moments' layout
        ref = bound[names.index("exp_avg")]
        like = ref if is_dtensor(ref) else (row if row_out else dts[0])
        gshape = ref.shape
    else:  # projection_project: R is (m, r) on the right
        like = row if row is not None else dts[0]
        k = _rank_of(names, bound, side, kind)
        gshape = (row.shape[0], k) if row_out else None
    if row_out:
        return _wrap(out, like, mesh, True, gshape)
    return _wrap(out, like, mesh, False, None)


def _elementwise_handler(op_call, args, kwargs):
    """``adam_update`` on DTensors: elementwise, so every tensor follows the moments' layout
    (row-sharded like the weight, or replicated; a plain tensor counts as replicated); it
    runs on the local shards and ``N`` gets the moments' layout."""
    schema = op_call._schema
    opname = schema.name.split("::")[-1]
    bound = list(args) + [kwargs[a.name] if a.name in kwargs else a.default_value
                          for a in schema.arguments[len(args):]]
    names = [a.name for a in schema.arguments]
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    like = bound[names.index("exp_avg")]
    if not is_dtensor(like):
        like = next(a for a in bound if is_dtensor(a))
    sharded = is_row_sharded(like) or has_col_shard(like)
    local = []
    for name, a in zip(names, bound):
        if not isinstance(a, torch.Tensor):
            local.append(a)
        elif has_col_shard(like):  # the left side of a weight sharded on dim 1: moments sharded on columns
            local.append(_local_like_block(a, name, like, opname, name in written))
        elif sharded:
            local.append(_to_local_row(a, name, like, opname, name in written))
        else:
            local.append(_to_local_rep(a, name, opname, name in written))
    out = op_call(*local)
    if sharded:
        return _wrap(out, like, like.device_mesh, True, like.shape)
    return _wrap(out, like, like.device_mesh, False, None)


def _all_reduce_rows(row, partial: torch.Tensor) -> torch.Tensor:
    """Sum ``partial`` (a per-shard contribution) over the shards of ``row``: one all-reduce."""
    mesh = row.device_mesh
    return DTensor.from_local(partial, mesh, _partial_placements(row), run_check=False).redistribute(
        mesh, [Replicate()] * mesh.ndim
    ).to_local()


def _left_projector_rows(opname, names, bound, row, off, cnt, kind) -> torch.Tensor:
    """This shard's rows of the left projector ``P`` (``m x r``), dense."""
    if kind == "int4":
        packed, scale, minimum = (_to_local_rep(bound[names.index(k)], k, opname, False)
                                  for k in ("proj", "q_scale", "q_min"))
        shape = [row.shape[0], bound[names.index("rank")]]
        dense = torch.ops.lowrank_kernels.quant_int4_unpack.default(
            packed, scale, minimum, shape, torch.float32, bound[names.index("group_size")])
        return dense[off:off + cnt]
    if kind == "dct":
        basis = _to_local_rep(bound[names.index("proj")], "basis", opname, False)
        idx = _to_local_rep(bound[names.index("indices")], "indices", opname, False)
        # P = C[idx]^T: its rows are the basis columns off..off+cnt of the selected basis rows.
        return basis.index_select(0, idx.long())[:, off:off + cnt].T
    return _to_local_row(bound[names.index("proj")], "proj", row, opname, False)


def _backproject_local(param_l, update, proj_l, alpha, decay, row_decay=None, row_alpha=None) -> None:
    """``param_l <- decay * param_l + alpha * proj_l @ update`` on this shard's rows (with the
    shard's rows of the per-row factors, when given)."""
    if param_l.shape[0] == 0:
        return
    r = proj_l.shape[1]
    rows = () if row_decay is None and row_alpha is None else (None, None, None, 0, 0, row_decay, row_alpha)
    if r > min(param_l.shape[0], param_l.shape[1]):
        _reference("projection_backproject_apply")(param_l, update, proj_l, "left", alpha, decay, *rows)
    else:
        torch.ops.lowrank_kernels.projection_backproject_apply.default(
            param_l, update, proj_l, "left", alpha, decay, *rows)


def _left_sharded(opname, names, bound, row, written, kind):
    """A left-side op on a weight sharded on dim 0. ``R = P^T G = sum_i P_i^T G_i`` is a sum
    over the shards: one all-reduce of ``r x n``; the Adam step then runs on the
    replicated ``R`` (moments ``r x n``, replicated) and the back-projection
    ``P_i N`` is row-local again."""
    from lowrank_kernels.reference import projection as pref

    def arg(n):
        return bound[names.index(n)]

    mesh = row.device_mesh
    off, cnt = local_rows(row)
    proj_l = _left_projector_rows(opname, names, bound, row, off, cnt, kind)
    if opname.endswith("backproject_apply"):
        param_l = _to_local_row(arg("param"), "param", row, opname, True)
        update = _to_local_rep(arg("update"), "update", opname, False)
        factors = [None if arg(k) is None else _to_local_row(arg(k), k, row, opname, False)
                   for k in ("row_decay", "row_alpha")]
        _backproject_local(param_l, update, proj_l, arg("alpha"), arg("decay"), *factors)
        return None
    grad_l = _to_local_row(arg("grad"), "grad", row, opname, False)
    acc = torch.float64 if torch.float64 in (grad_l.dtype, proj_l.dtype) else torch.float32
    r_full = _all_reduce_rows(row, proj_l.to(acc).T @ grad_l.to(acc))  # r x n, the same on every rank
    if opname == "projection_project":
        return DTensor.from_local(r_full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    exp_avg = _to_local_rep(arg("exp_avg"), "exp_avg", opname, True)
    exp_avg_sq = _to_local_rep(arg("exp_avg_sq"), "exp_avg_sq", opname, True)
    if exp_avg.dtype == torch.float64:
        r_full = r_full.to(torch.float64)
    fmt = _moment_format_args(names, bound, opname)
    if fmt is not None:
        # 8-bit / stochastically rounded 16-bit moments (replicated): the adam op on R, N in float32
        # (8-bit) or the moments' dtype, as the fused ops.
        n_lr = torch.ops.lowrank_kernels.adam_update.default(
            r_full, exp_avg, exp_avg_sq, arg("beta1"), arg("beta2"), arg("eps"), *fmt)
    else:
        # The reference's Adam on R (float32 math, N rounded to the moments' dtype), as the fused ops.
        n_lr = pref.adam_moments_(r_full, exp_avg, exp_avg_sq, arg("beta1"), arg("beta2"), arg("eps")).to(
            exp_avg.dtype)
    if opname.endswith("project_adam"):
        return DTensor.from_local(n_lr, mesh, [Replicate()] * mesh.ndim, run_check=False)
    # project_update_backproject: param <- (1 - lr wd) param - step_size * scale * P N
    param_l = _to_local_row(arg("param"), "param", row, opname, True)
    step_size = pref.adam_step_size(arg("lr"), arg("beta1"), arg("beta2"), arg("step"))
    scale = arg("scale")
    _backproject_local(param_l, n_lr, proj_l, -step_size * scale, 1.0 - arg("lr") * arg("weight_decay"))
    return None


def _moment_format_args(names, bound, opname):
    """``(m_absmax, v_absmax, block_size, moment_seed)`` (local, replicated) when a projection
    op call carries 8-bit moments or a stochastic-rounding seed, else None."""
    if "m_absmax" not in names:
        return None
    m_abs, v_abs = bound[names.index("m_absmax")], bound[names.index("v_absmax")]
    seed = bound[names.index("moment_seed")]
    if m_abs is None and v_abs is None and (seed is None or seed < 0):
        return None
    m_abs = None if m_abs is None else _to_local_rep(m_abs, "m_absmax", opname, True)
    v_abs = None if v_abs is None else _to_local_rep(v_abs, "v_absmax", opname, True)
    return (m_abs, v_abs, bound[names.index("block_size")], -1 if seed is None else seed)


def _local_rank_too_big(names, local_args, side, kind) -> bool:
    row_t = local_args[names.index("param" if "param" in names else "grad")]
    rank = _rank_of(names, local_args, side, kind)
    return rank > min(row_t.shape[0], row_t.shape[1])


def _reference(opname: str):
    from lowrank_kernels.ops import _registry

    return _registry.OPS[opname].reference


def sharded_project(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """``R = G P^T`` (right) or ``P^T G`` (left) for a gradient sharded on dim 0.

    Right: each shard computes its rows (``P`` replicated), no communication; the
    result is sharded like ``G``. Left: each shard computes ``P_i^T G_i`` with its rows
    of ``P`` and one all-reduce sums them; the result is replicated. (Written out rather
    than left to DTensor's matmul strategies, which may pick an all-gather of ``G``
    for unevenly sharded inputs.)
    """
    opname = "project"
    if has_col_shard(grad):  # tensor parallelism: one all-reduce of the low-rank block
        return _block_handler("projection_project", ["grad", "proj", "side"], [grad, proj, side], grad, set(), "dense")
    g = grad.to_local()
    mesh = grad.device_mesh
    if side == "right":
        p = _to_local_rep(proj, "proj", opname, False)
        out = g @ p.T
        shape = (grad.shape[0], p.shape[0])
        return DTensor.from_local(out, mesh, grad.placements, run_check=False, shape=torch.Size(shape),
                                  stride=_contiguous_stride(shape))
    p_rows = _to_local_row(proj, "proj", grad, opname, False)
    out = _all_reduce_rows(grad, p_rows.T @ g)
    return DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _dct_scores_local(grad_local, basis_local, side, norm):
    return torch.ops.lowrank_kernels.dct_scores.default(grad_local, basis_local, side, norm)


def _combine_scores(p, local_scores: torch.Tensor, norm: int) -> torch.Tensor:
    """Per-shard column norms -> global column norms: one all-reduce of the score vector."""
    mesh = p.device_mesh
    part = local_scores if norm == 1 else local_scores.square()
    total = DTensor.from_local(part, mesh, _partial_placements(p), run_check=False).redistribute(
        mesh, [Replicate()] * mesh.ndim
    ).to_local()
    return total if norm == 1 else total.sqrt()


def _dct_scores_handler(op_call, args, kwargs):
    """``dct_scores`` on a row-sharded gradient. Right side: the local column norms, then
    one all-reduce of the length-``n`` score vector. Left side: an all-reduce of the
    ``s x n`` score matrix (gradient-sized; ``proj_type="right"`` avoids it). The result
    is a plain tensor, the same on every rank (small, and index math on it stays plain)."""
    grad, basis, side, norm = (list(args) + [kwargs.get(k) for k in ("grad", "basis", "side", "norm")[len(args):]])[:4]
    opname = op_call._schema.name.split("::")[-1]
    if has_col_shard(grad):  # at a refresh: gather the columns, then score the row shards
        grad = _without_col_shards(grad)
        if not is_row_sharded(grad):  # plain scores, the same on every rank (as the row-sharded path)
            return op_call(grad.to_local(), _to_local_rep(basis, "basis", opname, False), side, norm)
    if not is_row_sharded(grad):
        out = op_call(_to_local_rep(grad, "grad", opname, False), _to_local_rep(basis, "basis", opname, False),
                      side, norm)
        return _wrap(out, grad if is_dtensor(grad) else basis, (grad if is_dtensor(grad) else basis).device_mesh,
                     False, None)
    basis_l = _to_local_rep(basis, "basis", opname, False)
    g = grad.to_local()
    if side != "right":
        # score_i = ||(C G)[i, :]||_p needs C G = sum_i C[:, rows_i] G_i before the norm: an
        # all-reduce of the s x n score matrix (gradient-sized). proj_type="right" avoids it.
        off, cnt = local_rows(grad)
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        s_full = _all_reduce_rows(grad, basis_l[:, off:off + cnt].to(acc) @ g.to(acc))
        return torch.linalg.vector_norm(s_full, ord=norm, dim=1)
    if g.shape[0] == 0:
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        scores = torch.zeros(basis_l.shape[0], dtype=acc, device=g.device)
    else:
        scores = _dct_scores_local(g, basis_l, side, norm)
    return _combine_scores(grad, scores, norm)


def _dct_score_topk_handler(op_call, args, kwargs):
    """``dct_score_topk`` on a row-sharded gradient: all-reduced scores, then the same
    deterministic top-k as the op (descending, ties to the lower index); plain int32
    indices, the same on every rank."""
    grad, basis, k, side, norm = (list(args) + [kwargs.get(x) for x in ("grad", "basis", "k", "side", "norm")[len(args):]])[:5]
    opname = op_call._schema.name.split("::")[-1]
    if has_col_shard(grad):  # at a refresh: gather the columns, then score the row shards
        grad = _without_col_shards(grad)
        if not is_row_sharded(grad):  # plain indices, the same on every rank (as the row-sharded path)
            return op_call(grad.to_local(), _to_local_rep(basis, "basis", opname, False), k, side, norm)
    if not is_row_sharded(grad):
        out = op_call(_to_local_rep(grad, "grad", opname, False), _to_local_rep(basis, "basis", opname, False),
                      k, side, norm)
        mesh_src = grad if is_dtensor(grad) else basis
        return _wrap(out, mesh_src, mesh_src.device_mesh, False, None)
    scores = _dct_scores_handler(torch.ops.lowrank_kernels.dct_scores.default, (grad, basis, side, norm), {})
    from lowrank_kernels.reference.dct import topk_indices

    return topk_indices(scores, k)


# --------------------------------------------------------------------------- 2-D layouts (tensor parallelism)
# A weight sharded on dim 1 over some mesh dimension (tensor parallelism's RowwiseParallel:
# ``Shard(1)``; with FSDP2 on a ("dp", "tp") mesh ``(Shard(0), Shard(1))``) holds a block
# ``W[I, J]`` of rows I and columns J on each rank. The projection contracts one dimension
# (right: ``R = G P^T`` contracts the columns; left: ``R = P^T G`` the rows): each rank computes
# its block's partial product and ONE all-reduce of the low-rank block (right: ``|I| x r``,
# left: ``r x |J|``) over the mesh dimensions that shard the contracted dimension sums it. ``R``,
# the moments and ``N`` are laid out like the weight on the kept dimension (right: rows,
# left: columns) and replicated over the others (:func:`lowrank_placements`); the
# back-projection ``N P[:, J]`` / ``P[I, :] N`` of the local block needs no communication.
# Layouts sharded on dim 0 only (FSDP2, ColwiseParallel, both together) keep the row paths above.
def has_col_shard(t: Any) -> bool:
    """Whether ``t`` is a DTensor sharded on dim 1 over some mesh dimension (tensor parallelism)."""
    return is_dtensor(t) and any(shard_dim(pl) == 1 for pl in t.placements)


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor sharded on some dimension over some mesh dimension."""
    return is_dtensor(t) and any(shard_dim(pl) is not None for pl in t.placements)


def lowrank_placements(p, side: str) -> tuple:
    """The placements of the ``side``-projected quantities of a 2-D weight ``p`` (``R``, the
    moments, ``N``): ``p``'s shards of the dimension the projection keeps (right: dim 0,
    ``m x r``; left: dim 1, ``r x n``), ``Replicate()`` on every other mesh dimension."""
    keep = 0 if side == "right" else 1
    return tuple(pl if shard_dim(pl) == keep else Replicate() for pl in p.placements)


def _block_of_shape(shape, mesh, placements) -> Tuple[slice, ...]:
    """The slices of a tensor of global ``shape`` laid out by ``placements`` that this rank holds."""
    lshape, offset = compute_local_shape_and_global_offset(torch.Size(shape), mesh, placements)
    return tuple(slice(int(o), int(o) + int(s)) for o, s in zip(offset, lshape))


def _local_in(t, name: str, shape, mesh, placements, opname: str, written: bool) -> torch.Tensor:
    """This rank's block of ``t`` (global ``shape``) in the layout ``placements``: a DTensor
    laid out so gives its local tensor; a replicated DTensor or a plain tensor (the same on
    every rank) its slice, unless the op writes it (it must then be laid out so already)."""
    placements = tuple(placements)
    replicated = all(isinstance(pl, Replicate) for pl in placements)
    if tuple(t.shape) != tuple(shape):
        raise ShardingError(f"{opname}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if is_dtensor(t):
        if tuple(t.placements) == placements:
            return t.to_local()
        if all(isinstance(pl, Replicate) for pl in t.placements) and not written:
            return t.to_local()[_block_of_shape(shape, mesh, placements)]
        raise ShardingError(
            f"{opname}: {name} (shape {tuple(t.shape)}) has placements {tuple(t.placements)}, expected {placements} "
            "(laid out like the weight on the dimension the projection keeps)")
    if written and not replicated:
        raise ShardingError(
            f"{opname}: {name} is written in place and must be a DTensor with placements {placements}, got a plain "
            f"tensor of shape {tuple(t.shape)} (lowrank_kernels.optim.distributed.place_state does this)")
    return t if replicated else t[_block_of_shape(shape, mesh, placements)]


def _all_reduce_dim(p, dim: int, partial: torch.Tensor) -> torch.Tensor:
    """Sum ``partial`` over the mesh dimensions that shard dim ``dim`` of ``p``: one all-reduce
    (none when no mesh dimension shards it)."""
    mesh = p.device_mesh
    pending = [Partial() if shard_dim(pl) == dim else Replicate() for pl in p.placements]
    if all(isinstance(pl, Replicate) for pl in pending):
        return partial
    return DTensor.from_local(partial, mesh, pending, run_check=False).redistribute(
        mesh, [Replicate()] * mesh.ndim).to_local()


def _block_projector(opname, names, bound, p, side, kind) -> torch.Tensor:
    """The dense projector's part that meets this rank's block of ``p``: right ``P[:, J]``
    (``r x |J|``), left ``P[I, :]`` (``|I| x r``)."""
    m, n = p.shape
    rows, cols = _block_of_shape(p.shape, p.device_mesh, p.placements)
    proj = bound[names.index("proj")]
    if kind == "dense":
        if side == "right":
            return _to_local_rep(proj, "proj", opname, False)[:, cols]
        row_pl = lowrank_placements(p, "right")  # the left projector (m x r) is row-aligned
        return _local_in(proj, "proj", (m, proj.shape[1]), p.device_mesh, row_pl, opname, False)
    if kind == "dct":
        basis = _to_local_rep(proj, "basis", opname, False)
        idx = _to_local_rep(bound[names.index("indices")], "indices", opname, False)
        sel = basis.index_select(0, idx.long())  # right: P = C[idx] (r x n); left: P = C[idx]^T (m x r)
        return sel[:, cols] if side == "right" else sel[:, rows].T
    packed, scale, minimum = (_to_local_rep(bound[names.index(k)], k, opname, False)
                              for k in ("proj", "q_scale", "q_min"))
    r = bound[names.index("rank")]
    shape = [r, n] if side == "right" else [m, r]
    dense = torch.ops.lowrank_kernels.quant_int4_unpack.default(
        packed, scale, minimum, shape, torch.float32, bound[names.index("group_size")])
    return dense[:, cols] if side == "right" else dense[rows]


def _apply_block(param_l, update_l, proj_l, side, alpha, decay, row_decay=None, row_alpha=None) -> None:
    """``param_l <- decay * param_l + alpha * back(update_l)`` on this rank's block."""
    if param_l.numel() == 0:
        return
    r = proj_l.shape[0] if side == "right" else proj_l.shape[1]
    rows = () if row_decay is None and row_alpha is None else (None, None, None, 0, 0, row_decay, row_alpha)
    fn = (_reference("projection_backproject_apply") if r > min(param_l.shape)
          else torch.ops.lowrank_kernels.projection_backproject_apply.default)
    fn(param_l, update_l, proj_l, side, alpha, decay, *rows)


def _block_handler(opname, names, bound, p, written, kind):
    """A projection op on a weight sharded on dim 1 (see the section comment): the partial
    product of the local block, one all-reduce over the mesh dimensions sharding the
    contracted dimension, Adam on the local block of ``R``, the local back-projection."""
    from lowrank_kernels.reference import projection as pref

    def arg(n):
        return bound[names.index(n)]

    side = arg("side")
    if side not in ("right", "left"):
        raise ShardingError(f"{opname}: side={side!r} on a weight sharded on dim 1 ({tuple(p.placements)})")
    mesh = p.device_mesh
    m, n = p.shape
    r = _rank_of(names, bound, side, kind)
    lr_shape = (m, r) if side == "right" else (r, n)
    lr_pl = lowrank_placements(p, side)
    proj_l = _block_projector(opname, names, bound, p, side, kind)
    if opname.endswith("backproject_apply"):
        param_l = _local_in(arg("param"), "param", p.shape, mesh, p.placements, opname, True)
        update_l = _local_in(arg("update"), "update", lr_shape, mesh, lr_pl, opname, False)
        row_pl = lowrank_placements(p, "right")
        factors = [None if arg(k) is None else _local_in(arg(k), k, (m,), mesh, row_pl, opname, False)
                   for k in ("row_decay", "row_alpha")]
        _apply_block(param_l, update_l, proj_l, side, arg("alpha"), arg("decay"), *factors)
        return None
    grad_l = _local_in(arg("grad"), "grad", p.shape, mesh, p.placements, opname, False)
    acc = torch.float64 if torch.float64 in (grad_l.dtype, proj_l.dtype) else torch.float32
    part = grad_l.to(acc) @ proj_l.to(acc).T if side == "right" else proj_l.to(acc).T @ grad_l.to(acc)
    r_l = _all_reduce_dim(p, 1 if side == "right" else 0, part)

    def wrap(t):
        return DTensor.from_local(t, mesh, lr_pl, run_check=False, shape=torch.Size(lr_shape),
                                  stride=_contiguous_stride(lr_shape))

    if opname == "projection_project":
        return wrap(r_l)
    exp_avg = _local_in(arg("exp_avg"), "exp_avg", lr_shape, mesh, lr_pl, opname, True)
    exp_avg_sq = _local_in(arg("exp_avg_sq"), "exp_avg_sq", lr_shape, mesh, lr_pl, opname, True)
    if exp_avg.dtype == torch.float64:
        r_l = r_l.to(torch.float64)
    m_abs, v_abs = arg("m_absmax"), arg("v_absmax")
    seed = arg("moment_seed")
    if m_abs is not None or v_abs is not None:
        if side != "right":
            raise ShardingError(
                f"{opname}: 8-bit moments on the left side of a weight sharded on dim 1 ({tuple(p.placements)}): "
                "their blocks would straddle the column shards; use proj_type='right' or moment_bits=16/32")
        ab = [None if a is None else _local_in(a, k, (m, a.shape[1]), mesh, lr_pl, opname, True)
              for k, a in (("m_absmax", m_abs), ("v_absmax", v_abs))]
        n_l = torch.ops.lowrank_kernels.adam_update.default(
            r_l, exp_avg, exp_avg_sq, arg("beta1"), arg("beta2"), arg("eps"), ab[0], ab[1], arg("block_size"),
            -1 if seed is None else seed)
    elif seed is not None and seed >= 0:
        n_l = torch.ops.lowrank_kernels.adam_update.default(
            r_l, exp_avg, exp_avg_sq, arg("beta1"), arg("beta2"), arg("eps"), None, None, 0, seed)
    else:
        n_l = pref.adam_moments_(r_l, exp_avg, exp_avg_sq, arg("beta1"), arg("beta2"), arg("eps")).to(exp_avg.dtype)
    if opname.endswith("project_adam"):
        return wrap(n_l)
    # project_update_backproject: param <- (1 - lr wd) param - step_size * scale * back(N)
    param_l = _local_in(arg("param"), "param", p.shape, mesh, p.placements, opname, True)
    step_size = pref.adam_step_size(arg("lr"), arg("beta1"), arg("beta2"), arg("step"))
    _apply_block(param_l, n_l, proj_l, side, -step_size * arg("scale"), 1.0 - arg("lr") * arg("weight_decay"))
    return None


def _col_sharded_of(names, bound):
    """The weight-shaped argument (param or grad) of a projection op call when it is sharded on dim 1, else None."""
    return next((bound[names.index(n)] for n in ("param", "grad")
                 if n in names and has_col_shard(bound[names.index(n)])), None)


def _local_like_block(t, name: str, like, opname: str, written: bool) -> torch.Tensor:
    """An elementwise op's argument on the local block of ``like`` (a moment sharded on dim 1):
    it must have ``like``'s shape (8-bit block maxima do not follow column shards)."""
    if tuple(t.shape) != tuple(like.shape):
        raise ShardingError(
            f"{opname}: {name} has shape {tuple(t.shape)}, the moments {tuple(like.shape)} are sharded on dim 1 "
            f"({tuple(like.placements)}): 8-bit moments keep one maximum per block of a row, which the column "
            "shards would split; use moment_bits=16 or 32 for this parameter (a low-rank group: or proj_type='right')")
    return _local_in(t, name, like.shape, like.device_mesh, like.placements, opname, written)


def _without_col_shards(t):
    """``t`` redistributed so that no mesh dimension shards dim 1 (an all-gather of the columns
    over those dimensions): for a refresh's scoring, which then takes the row-sharded path."""
    target = [Replicate() if shard_dim(pl) == 1 else pl for pl in t.placements]
    return t.redistribute(t.device_mesh, target)


# --------------------------------------------------------------------------- multi-tensor (list) ops
# A list op on DTensors equals its single-tensor op on each entry: the entries that run on
# this rank's shards with no communication (a right-side projection step on a row-sharded
# or replicated weight, every elementwise Adam entry, plain tensors) go through ONE call of
# the list op on the local shards; the others (a left-side step: its r x n all-reduce; an
# empty shard; a shard with fewer rows than the rank; a row-sharded DCT scoring) go through
# the single-tensor op's handler one by one, in list order, with the collectives of the
# per-parameter path. The whole list is validated (global shapes) before anything runs.
_PLURAL = {"param": "params", "grad": "grads", "proj": "projs", "exp_avg": "exp_avgs", "exp_avg_sq": "exp_avg_sqs"}


def _is_list_arg(arg) -> bool:
    return isinstance(arg.type, torch.ListType)


def _entries(foreach_call, single_call, bound):
    """Per list entry, the single-tensor op's arguments: list arguments give their entry (an
    empty list: the single op's default), the others pass through."""
    f_args = foreach_call._schema.arguments
    f_names = [a.name for a in f_args]
    n = len(bound[0])
    out = []
    for i in range(n):
        entry = []
        for a in single_call._schema.arguments:
            fname = _PLURAL.get(a.name, a.name) if _PLURAL.get(a.name, a.name) in f_names else a.name
            if fname not in f_names:
                entry.append(a.default_value)
                continue
            v = bound[f_names.index(fname)]
            if _is_list_arg(f_args[f_names.index(fname)]):
                entry.append(v[i] if len(v) else a.default_value)
            else:
                entry.append(v)
        out.append(entry)
    return out


def _regroup(foreach_call, single_call, bound, local_entries):
    """The list op's arguments for ``local_entries`` (single-op argument lists): every list
    argument rebuilt from the entries (kept empty where the caller gave it empty)."""
    f_args = foreach_call._schema.arguments
    s_names = [a.name for a in single_call._schema.arguments]
    out = []
    for a, v in zip(f_args, bound):
        if not _is_list_arg(a) or not len(v):
            out.append(v)
            continue
        sname = next((k for k, pl in _PLURAL.items() if pl == a.name), a.name)
        j = s_names.index(sname)
        out.append([e[j] for e in local_entries])
    return out


def _validate_list(opname: str, bound) -> None:
    from lowrank_kernels.ops import _registry as reg  # noqa: F401  (the ops are defined)
    from lowrank_kernels.ops import adam as ops_adam
    from lowrank_kernels.ops import dct as ops_dct
    from lowrank_kernels.ops import projection as ops_proj

    validate = {
        "projection_foreach_project_update_backproject": ops_proj.validate_foreach_project_update_backproject,
        "adam_foreach_update": ops_adam.validate_foreach_update,
        "dct_foreach_score_topk": ops_dct.validate_foreach_score_topk,
    }[opname]
    validate(*bound)


def _foreach_projection_handler(op_call, args, kwargs):
    """``projection_foreach_project_update_backproject`` on DTensors (see above)."""
    opname = op_call._schema.name.split("::")[-1]
    bound = _bind(op_call, args, kwargs)
    _validate_list(opname, bound)
    single = torch.ops.lowrank_kernels.projection_project_update_backproject.default
    s_schema = single._schema
    s_names = [a.name for a in s_schema.arguments]
    written = {a.name for a in s_schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    local_entries, per_entry = [], []
    for entry in _entries(op_call, single, bound):
        if not any(is_dtensor(a) for a in entry):
            local_entries.append(entry)
            continue
        side, kind = entry[s_names.index("side")], _kind(s_names, entry)
        row = _row_of(s_names, entry)
        if _col_sharded_of(s_names, entry) is not None:
            per_entry.append(entry)  # sharded on dim 1: the single op's block path, with its all-reduce
            continue
        if row is not None and (side == "left" or local_rows(row)[1] == 0):
            per_entry.append(entry)  # left: the r x n all-reduce; an empty shard: nothing to run
            continue
        local = _local_args(opname, s_names, entry, row, side, kind, written)
        if row is not None and _local_rank_too_big(s_names, local, side, kind):
            per_entry.append(entry)  # fewer rows than the rank: the single op's reference path
            continue
        local_entries.append(local)
    if local_entries:
        op_call(*_regroup(op_call, single, bound, local_entries))
    for entry in per_entry:
        single(*entry)
    return None


def _foreach_adam_handler(op_call, args, kwargs):
    """``adam_foreach_update`` on DTensors: elementwise, so every entry runs on its local
    shards (each tensor of an entry laid out like its ``exp_avg``; a plain tensor counts as
    replicated): one list-op call on the local shards, no communication."""
    opname = op_call._schema.name.split("::")[-1]
    bound = _bind(op_call, args, kwargs)
    _validate_list(opname, bound)
    f_args = op_call._schema.arguments
    names = [a.name for a in f_args]
    written = {a.name for a in f_args if a.alias_info is not None and a.alias_info.is_write}
    lists = [i for i, a in enumerate(f_args) if _is_list_arg(a) and len(bound[i])]
    local = [list(v) if i in lists else v for i, v in enumerate(bound)]
    for e in range(len(bound[names.index("exp_avg")])):
        like = bound[names.index("exp_avg")][e]
        sharded = is_row_sharded(like)
        for i in lists:
            t = bound[i][e]
            if not isinstance(t, torch.Tensor):
                continue
            name = f"{names[i]}[{e}]"
            if has_col_shard(like):
                local[i][e] = _local_like_block(t, name, like, opname, names[i] in written)
                continue
            local[i][e] = (_to_local_row(t, name, like, opname, names[i] in written) if sharded
                           else _to_local_rep(t, name, opname, names[i] in written))
    op_call(*local)
    return None


def _dct_foreach_score_topk_handler(op_call, args, kwargs):
    """``dct_foreach_score_topk`` on DTensors: a row-sharded gradient is scored as by
    ``dct_score_topk``'s handler (local scores, one all-reduce per gradient, in list order);
    the other entries in one list-op call on their local tensors. Plain int32 indices, the
    same on every rank."""
    opname = op_call._schema.name.split("::")[-1]
    grads, basis, k, side, norm = _bind(op_call, args, kwargs)
    _validate_list(opname, [grads, basis, k, side, norm])
    rows: List[Optional[torch.Tensor]] = [None] * len(grads)
    rest = [i for i, g in enumerate(grads) if not is_sharded(g)]
    basis_l = _to_local_rep(basis, "basis", opname, False)
    if rest:
        out = op_call([_to_local_rep(grads[i], f"grads[{i}]", opname, False) for i in rest], basis_l, k, side, norm)
        for i, r in zip(rest, out.unbind(0)):
            rows[i] = r
    single = torch.ops.lowrank_kernels.dct_score_topk.default
    for i, g in enumerate(grads):
        if rows[i] is None:
            rows[i] = _dct_score_topk_handler(single, (g, basis_l, k, side, norm), {})
    if not rows:
        return torch.zeros((0, k), dtype=torch.int32, device=basis_l.device)
    return torch.stack(rows)


def install_op_handlers() -> None:
    """Register the DTensor handlers of the ``lowrank_kernels`` projection and DCT ops (idempotent).

    Uses ``DTensor._op_dispatcher._custom_op_handlers`` (the hook torch's own loss
    parallelism uses): a handler sees the DTensor arguments, checks their placements,
    runs the op on the local shards and wraps the outputs.
    """
    global _installed
    if _installed or not HAVE_DTENSOR:
        return
    import lowrank_kernels.ops  # noqa: F401  (defines the ops)

    lib = torch.ops.lowrank_kernels
    handlers = DTensor._op_dispatcher._custom_op_handlers
    for name in _PROJECTION_OPS:
        if hasattr(lib, name):
            handlers[getattr(lib, name).default] = _generic_handler
    if hasattr(lib, "adam_update"):
        handlers[lib.adam_update.default] = _elementwise_handler
    if hasattr(lib, "dct_scores"):
        handlers[lib.dct_scores.default] = _dct_scores_handler
    if hasattr(lib, "dct_score_topk"):
        handlers[lib.dct_score_topk.default] = _dct_score_topk_handler
    for name, handler in (("projection_foreach_project_update_backproject", _foreach_projection_handler),
                          ("adam_foreach_update", _foreach_adam_handler),
                          ("dct_foreach_score_topk", _dct_foreach_score_topk_handler)):
        if hasattr(lib, name):
            handlers[getattr(lib, name).default] = handler
    _installed = True


__all__ = [
    "HAVE_DTENSOR",
    "is_dtensor",
    "is_row_sharded",
    "shard_dim",
    "local_rows",
    "sharded_project",
    "install_op_handlers",
    "ShardingError",
]
