"""DDP and FSDP2 (DTensor) support for the low-rank optimizers.

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
INT4-projector ops get DTensor handlers (:func:`install_op_handlers`) that check the
placements, run the op on the local shards (left side: the ``r x n`` all-reduce, then
the Adam step on the replicated ``R``) and wrap the results. A layout the handlers
cannot serve raises :class:`ShardingError` instead of gathering silently.
:func:`place_state` keeps the row-aligned state (right-side moments, left-side
projector) sharded like the weight, so ``torch.distributed.checkpoint`` saves it
sharded and resumes on the same world size. Placements other than ``Shard(0)`` /
``Replicate()`` (tensor parallelism) are refused when the param group is added.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

try:  # torch.distributed may be absent in some builds; every helper then degrades to a no-op.
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.experimental import implicit_replication

    HAVE_DTENSOR = True
except Exception:  # pragma: no cover - depends on the torch build
    HAVE_DTENSOR = False
    DTensor = ()  # isinstance(x, ()) is always False

#: state keys that are row-aligned with the weight (first dim ``m``), per projection side.
ROW_STATE_KEYS = {
    # 8-bit moments: the absmax (m x ceil(r / block_size)) is row-aligned with the codes
    "right": ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"),
    "left": ("projector",),
    "full": ("projector",),
}


# --------------------------------------------------------------------------- detection
def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return HAVE_DTENSOR and isinstance(t, DTensor)


def is_row_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor sharded on dim 0 over some mesh dimension (FSDP2's layout)."""
    return is_dtensor(t) and any(isinstance(pl, Shard) and pl.dim == 0 for pl in t.placements)


def unsupported_placement(p: torch.Tensor) -> Optional[str]:
    """None when the optimizers can step ``p``, else why not (placements other than
    ``Shard(0)`` / ``Replicate()``, e.g. tensor parallelism's ``Shard(1)``)."""
    if not is_dtensor(p):
        return None
    bad = [pl for pl in p.placements if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0))]
    if bad:
        return (
            f"DTensor placements {tuple(p.placements)} are not supported: the low-rank optimizers take "
            "parameters sharded on dim 0 (FSDP2 fully_shard) or replicated"
        )
    return None


def local(t: Any) -> Any:
    """The local shard of a DTensor (a view that shares its storage); anything else as is."""
    return t.to_local() if is_dtensor(t) else t


def local_rows(p: torch.Tensor) -> Tuple[int, int]:
    """``(offset, count)`` of the rows of the global ``p`` that this rank holds."""
    if not is_row_sharded(p):
        return 0, p.shape[0]
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]), int(shape[0])


def _partial_placements(p) -> list:
    """``p``'s placements with every ``Shard(0)`` turned into a pending sum."""
    return [Partial() if isinstance(pl, Shard) else Replicate() for pl in p.placements]


def _replicate(t):
    """A DTensor made ``Replicate`` on every mesh dim (all-reduces a ``Partial``); plain tensors as is."""
    if not is_dtensor(t):
        return t
    if all(isinstance(pl, Replicate) for pl in t.placements):
        return t
    if any(isinstance(pl, Shard) for pl in t.placements):
        raise ValueError(
            f"expected a replicated (or pending-sum) DTensor of shape {tuple(t.shape)}, got placements "
            f"{tuple(t.placements)}: replicating it would gather a sharded tensor"
        )
    return t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)


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
        pending = [Partial("max") if isinstance(pl, Shard) else Replicate() for pl in g0.placements]
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


def addcmul_(p: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor) -> None:
    """``p.addcmul_(grad, coef)`` with ``coef`` either row-aligned (``m x 1``, sharded like
    ``p``) or broadcast over the rows (``1 x n`` or 0-d, replicated), on the local rows.

    (DTensor refuses the in-place op when a one-row weight is sharded, because it reads
    the ``1 x n`` factor as a broadcast; here the roles are explicit.)
    """
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


def _generic_handler(op_call, args, kwargs):
    """Run a projection / DCT op on local shards (see the module docstring)."""
    schema = op_call._schema
    opname = schema.name.split("::")[-1]
    # Arguments left out take the schema's defaults (the projector's optional arguments).
    bound = list(args) + [kwargs[a.name] if a.name in kwargs else a.default_value
                          for a in schema.arguments[len(args):]]
    names = [a.name for a in schema.arguments]
    kind = _kind(names, bound)
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    side = bound[names.index("side")]
    dts = [a for a in bound if is_dtensor(a)]
    mesh = dts[0].device_mesh
    row = next((bound[names.index(n)] for n in _ROW_ALWAYS if n in names and is_row_sharded(bound[names.index(n)])),
               None)
    if row is not None and side == "left":
        return _left_sharded(opname, names, bound, row, written, kind)
    local_args = []
    for name, a in zip(names, bound):
        if not isinstance(a, torch.Tensor):
            local_args.append(a)
        elif row is not None and _role(name, side, kind) == "row":
            local_args.append(_to_local_row(a, name, row, opname, name in written))
        else:
            local_args.append(_to_local_rep(a, name, opname, name in written))
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
    sharded = is_row_sharded(like)
    local = []
    for name, a in zip(names, bound):
        if not isinstance(a, torch.Tensor):
            local.append(a)
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
    if not is_row_sharded(grad):
        out = op_call(_to_local_rep(grad, "grad", opname, False), _to_local_rep(basis, "basis", opname, False),
                      k, side, norm)
        mesh_src = grad if is_dtensor(grad) else basis
        return _wrap(out, mesh_src, mesh_src.device_mesh, False, None)
    scores = _dct_scores_handler(torch.ops.lowrank_kernels.dct_scores.default, (grad, basis, side, norm), {})
    from lowrank_kernels.reference.dct import topk_indices

    return topk_indices(scores, k)


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
    _installed = True


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
    "ShardingError",
    "ROW_STATE_KEYS",
]
