"""Projector refreshes shared across the ranks of a data-parallel group.

Under DDP every rank holds the same (all-reduced) gradient, and under FSDP2 a refresh that
needs the whole gradient all-gathers it, so without sharing every rank computes every
projector of the model (an SVD per weight): the same work ``world`` times over. With
``refresh_sharing="owner"`` (the default, a param-group key) the refreshes due in a step
are split over the ranks instead: each weight's projector is computed by one rank, its
*owner*, and the results are broadcast, so per refresh the ranks together compute each
projector once. The numbers are bitwise those of ``"replicate"`` (every rank computing
every projector itself): the owner runs the very same computation on the very same bits,
and the results travel as raw bytes.

**Where it hooks in.** :meth:`LowRankOptimizer.step` calls :func:`prepare` once per step,
after the non-finite probe and before the per-parameter loop. :func:`prepare` finds the
parameters whose refresh is due in this step, assigns owners, lets each rank run the
method's ``_compute_projector(p, grad, state, group, step)`` for the weights it owns, and
exchanges the results. The per-parameter loop then takes each refresh as usual
(``_refresh_projector``: moment transport, INT4 packing, gap adaptation and the like stay
per rank), with ``_compute_projector`` answering from the exchanged results
(:func:`serving`). So whichever projector a method computes (SVD, randomized SVD, DCT
scores, ...) is shared, as long as it is made by ``_compute_projector``.

**What is shared.** A method says what one refresh of ``p`` costs through
``_refresh_cost(p, group)`` (0: not worth sharing, e.g. APOLLO's and FRUGAL's seeded
projections, which regenerate for less than a broadcast costs; DCT scores of an FSDP2
shard, which are already split over the ranks); the cost also drives the schedule. A
group of due weights is shared only when it holds at least two weights.

**The groups.**

- DTensor parameters (FSDP2, HSDP, tensor parallel and their combinations): on a 1-D mesh
  of more than one rank, the mesh's group; on a multi-dimensional mesh that covers the whole
  world (FSDP2 x TP on ("dp", "tp"), HSDP), the default group. The refresh all-gathers the
  gradient on every rank of the mesh, as without sharing (the SVD needs all of it); only the
  owner then computes. A multi-dimensional mesh over part of the world keeps computing on
  every rank.
- Plain tensors (DDP) when ``torch.distributed`` is initialized with more than one rank:
  the default process group. Sharing is only correct when every rank holds the same
  gradient, so each shared refresh first all-gathers a small signature of the due
  weights (their count, shapes, steps and a checksum of each gradient): when any rank
  differs (no DDP, pipeline stages, ...), the optimizer warns once and computes every
  refresh locally from then on. Every rank's first :meth:`step` joins that check, so
  every rank of the default group must step this optimizer (as under DDP); otherwise
  pass ``refresh_sharing="replicate"`` (in every group: then the optimizer issues no
  collective of its own).

**The schedule** (:func:`schedule`): largest first (by ``_refresh_cost``, ties by
position), each to the rank with the least work so far (ties: the lowest rank); the same
on every rank, no communication.

**The exchange**: one ``all_gather_object`` of what each rank computed (shapes, dtypes, a
failure), then one broadcast of a byte buffer from each rank that owns something. A
refresh that failed on its owner (the SVD did not converge) fails on every rank, as in
``"replicate"``; an exception on the owner is raised on every rank, naming the owner.
"""
from __future__ import annotations

import contextlib
import heapq
import warnings
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import distributed as _dist
from .config import REFRESH_SHARING

#: values of the ``refresh_sharing`` group key (checked with the other flags, config.check_flags).
SHARING_MODES = REFRESH_SHARING
#: byte alignment of each tensor in an exchanged buffer (so every dtype views in place).
_ALIGN = 16


def svd_cost(m: int, n: int, k: Optional[int] = None) -> int:
    """The work of an SVD-like refresh of an ``m x n`` matrix: ``m n k`` (``k = min(m, n)``
    for an exact SVD, about the sketch width times its passes for a randomized one)."""
    return int(m) * int(n) * int(min(m, n) if k is None else k)


def schedule(costs: Sequence[int], world: int) -> List[int]:
    """The owner rank of each item: largest cost first (ties by position), each to the rank
    with the least total cost so far (ties: the lowest rank). Deterministic."""
    if world < 1:
        raise ValueError(f"schedule: world must be >= 1, got {world}")
    owners = [0] * len(costs)
    loads = [(0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + int(costs[i]), r))
    return owners


# --------------------------------------------------------------------------- per-step state
def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def computing(opt) -> bool:
    """Whether ``opt`` is computing shared refreshes right now (a method then computes one
    projector per call, e.g. DCT does not score its whole bucket)."""
    return bool(opt.__dict__.get("_share_computing", False))


def has_result(opt, p: torch.Tensor) -> bool:
    """Whether this step's refresh of ``p`` was computed by the shared exchange."""
    results = opt.__dict__.get("_share_results")
    return bool(results) and p in results


def clear(opt) -> None:
    """Forget this step's exchanged results (end of a step)."""
    opt.__dict__.pop("_share_results", None)


@contextlib.contextmanager
def serving(opt, p: torch.Tensor, instead=None) -> Iterator[None]:
    """While ``p``'s refresh is taken: ``opt._compute_projector`` answers ``p``'s exchanged
    result (once) instead of computing it, or, given ``instead`` (a function with
    ``_compute_projector``'s arguments), what ``instead`` returns; nothing otherwise."""
    results = opt.__dict__.get("_share_results")
    if instead is None and (not results or p not in results):
        yield
        return
    result = results.pop(p) if instead is None else None

    def answer(q, grad, state, group, step):
        if q is not p:  # a method that computes another parameter's projector: its own code
            return type(opt)._compute_projector(opt, q, grad, state, group, step)
        return result if instead is None else instead(q, grad, state, group, step)

    opt.__dict__["_compute_projector"] = answer
    try:
        yield
    finally:
        opt.__dict__.pop("_compute_projector", None)


# --------------------------------------------------------------------------- which refreshes, which group
def _due(opt, group: Dict[str, Any], p: torch.Tensor):
    """``(state, step)`` when ``p``'s refresh is due in this step (a fresh parameter gets a
    scratch state with ``step`` and ``side``), else None."""
    state = opt.state.get(p)
    if state:
        step = opt._host_int(state["step"]) + 1
    else:
        state, step = {}, 1
        from .base import LowRankOptimizer  # (base imports this module)

        LowRankOptimizer._init_state(opt, p, state, group)  # step and side only: no moments
    return (state, step) if opt._should_refresh(p, state, group, step) else None


def _set_key(p: torch.Tensor):
    """``(kind, mesh)`` of the group that may share ``p``'s refresh, or None."""
    if _dist.is_dtensor(p):
        mesh = p.device_mesh
        placed = all(isinstance(pl, (_dist.Replicate, _dist.Shard)) or _dist.shard_dim(pl) is not None
                     for pl in p.placements)
        if mesh.size() < 2 or not placed:
            return None
        if mesh.ndim > 1 and (not _dist_ready() or mesh.size() != torch.distributed.get_world_size()):
            return None  # a multi-dimensional mesh over part of the world: every rank computes
        # Every rank of the mesh gathers the whole gradient at a refresh (FSDP2, HSDP, tensor
        # parallel alike), so any of them can compute the projector: a 1-D mesh shares over its
        # group, a multi-dimensional one over the world it covers.
        return ("mesh", mesh)
    if not _dist_ready() or torch.distributed.get_world_size() < 2:
        return None
    return ("world", None)


def _first_step_pending(opt) -> bool:
    return "_share_verdict" not in opt.__dict__ and _dist_ready() and torch.distributed.get_world_size() > 1


# --------------------------------------------------------------------------- the pre-pass
def prepare(opt, work: Sequence[Tuple[Dict[str, Any], torch.Tensor]], finite: Sequence[bool]) -> None:
    """Compute this step's due refreshes on their owners and exchange the results; they are
    then served by :func:`serving` in the per-parameter loop. No-op (and no communication)
    when nothing can be shared; see the module docstring."""
    opt.__dict__.pop("_share_results", None)
    if opt.__dict__.get("_placeholder_refresh"):  # init_state(): no projector is computed
        return
    if not any(opt._is_lowrank(g) and g.get("refresh_sharing", "owner") == "owner" for g in opt.param_groups):
        return  # nothing may be shared: no communication at all
    first = _first_step_pending(opt)
    sets: Dict[Any, list] = {}
    if first or _dist_ready():
        for (group, p), ok in zip(work, finite):
            if not ok or not opt._is_lowrank(group) or group.get("refresh_sharing", "owner") != "owner":
                continue
            key = _set_key(p)
            if key is None:
                continue
            cost = opt._refresh_cost(p, group)
            if not cost:
                continue
            due = _due(opt, group, p)
            if due is not None:
                sets.setdefault(key, []).append((p, group, due[0], due[1], int(cost)))
    results: Dict[torch.Tensor, Any] = {}
    plain = sets.pop(("world", None), [])
    if first or len(plain) >= 2:  # after a passed first check the ranks step in lockstep (DDP)
        if _verify_plain(opt, plain, first) and len(plain) >= 2:
            results.update(_share(opt, plain, None))
    for (_, mesh), items in sets.items():  # one mesh per FSDP2 model; meshes compare by value
        if len(items) >= 2:
            results.update(_share(opt, items, mesh))
    if results:
        opt.__dict__["_share_results"] = results


def _checksums(grads: List[torch.Tensor]) -> bytes:
    """Two float64 numbers per gradient (its sum and its norm), as bytes."""
    if not grads:
        return b""
    vals = torch.stack([torch.stack([g.sum(dtype=torch.float64), torch.linalg.vector_norm(g, dtype=torch.float64)])
                        for g in grads])
    return vals.cpu().numpy().tobytes()


def _verify_plain(opt, items: list, first: bool) -> bool:
    """Whether every rank of the default group holds the same due plain weights with the same
    gradients (one all-gather of two int64 per rank). The first check fixes the verdict for
    the run when it fails (a warning, then every refresh computed locally)."""
    verdict = opt.__dict__.get("_share_verdict")
    if verdict is False:
        return False
    sig = zlib.crc32(repr([(tuple(p.shape), str(p.dtype), step) for p, _, _, step, _ in items]).encode())
    sig = zlib.crc32(_checksums([p.grad for p, _, _, _, _ in items]), sig)
    mine = torch.tensor([len(items), sig], dtype=torch.int64)
    backend = torch.distributed.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = mine.to(dev)
    every = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, mine)
    same = all(bool(torch.equal(e, mine)) for e in every)
    if first:
        opt.__dict__["_share_verdict"] = same
    if not same:
        opt.__dict__["_share_verdict"] = False
        if not opt._warned.get("refresh_sharing"):
            opt._warned["refresh_sharing"] = True
            warnings.warn(
                f"{type(opt).__name__}: refresh_sharing='owner': the ranks do not hold the same projected weights "
                "and gradients (no DDP, or pipeline stages?); every rank now computes its own projector refreshes. "
                "Pass refresh_sharing='replicate' to skip this check.", RuntimeWarning, stacklevel=4)
    return same


def _full_grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient an owner computes from: plain as is; a DTensor's whole tensor (an
    all-gather, on every rank of the mesh, as a refresh without sharing does)."""
    g = p.grad
    return g.full_tensor() if _dist.is_dtensor(g) else g


def _flatten(result) -> Tuple[Any, List[torch.Tensor]]:
    """``(structure, tensors)`` of a ``_compute_projector`` result (a tensor, a tuple of
    tensors, or None)."""
    if result is None:
        return ("none",), []
    if isinstance(result, torch.Tensor):
        return ("tensor",), [result]
    if isinstance(result, tuple) and all(isinstance(t, torch.Tensor) for t in result):
        return ("tuple", len(result)), list(result)
    raise TypeError(f"refresh sharing: a projector must be a tensor, a tuple of tensors or None, got "
                    f"{type(result).__name__}; pass refresh_sharing='replicate'")


def _share(opt, items: list, mesh) -> Dict[torch.Tensor, Any]:
    """Owners compute, then the exchange (see the module docstring)."""
    pg = mesh.get_group() if mesh is not None and mesh.ndim == 1 else None
    world = torch.distributed.get_world_size(pg)
    me = torch.distributed.get_rank(pg)
    owners = schedule([c for *_, c in items], world)
    grads = [_full_grad(p) for p, *_ in items]  # DTensors: the all-gathers, in the same order on every rank
    device = grads[0].device
    mine: Dict[int, Any] = {}
    opt.__dict__["_share_computing"] = True
    try:
        for i, ((p, group, state, step, _), g) in enumerate(zip(items, grads)):
            if owners[i] != me:
                continue
            try:
                mine[i] = _flatten(opt._compute_projector(p, g, state, group, step))
            except Exception as e:  # noqa: BLE001  (raised on every rank below, naming the owner)
                mine[i] = (("error", f"{type(e).__name__}: {e}"), [])
    finally:
        opt.__dict__.pop("_share_computing", None)
    meta = {i: (s, [(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in ts]) for i, (s, ts) in mine.items()}
    every: List[Any] = [None] * world
    torch.distributed.all_gather_object(every, meta, group=pg)
    for r, m in enumerate(every):
        for i, (s, _) in m.items():
            if s[0] == "error":
                raise RuntimeError(f"{type(opt).__name__}: the projector refresh of a weight of shape "
                                   f"{tuple(items[i][0].shape)} failed on rank {r}, its owner: {s[1]}")
    out: Dict[torch.Tensor, Any] = {}
    for r in range(world):
        entries = sorted(every[r].items())
        nbytes = sum(_padded(_numel(shape) * _itemsize(dt)) for _, (_, specs) in entries for shape, dt in specs)
        if r == me:
            for i, (s, ts) in sorted(mine.items()):
                out[items[i][0]] = _unflatten(s, ts)
            if nbytes:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
                off = 0
                for _, (_, ts) in sorted(mine.items()):
                    for t in ts:
                        b = t.detach().contiguous().reshape(-1).view(torch.uint8)
                        buf[off:off + b.numel()] = b
                        off += _padded(b.numel())
        elif nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        if not nbytes:
            continue
        torch.distributed.broadcast(buf, src=torch.distributed.get_global_rank(pg, r) if pg is not None else r,
                                    group=pg)
        if r == me:
            continue
        off = 0
        for i, (s, specs) in entries:
            ts = []
            for shape, dt in specs:
                k = _numel(shape) * _itemsize(dt)
                ts.append(buf[off:off + k].view(getattr(torch, dt)).reshape(shape).clone())
                off += _padded(k)
            out[items[i][0]] = _unflatten(s, ts)
    for r in range(world):  # owners of results with no bytes (failures, empty tensors)
        if r == me:
            continue
        for i, (s, specs) in every[r].items():
            if items[i][0] not in out:
                out[items[i][0]] = _unflatten(s, [torch.empty(shape, dtype=getattr(torch, dt), device=device)
                                                  for shape, dt in specs])
    return out


def _unflatten(structure, tensors: List[torch.Tensor]):
    if structure[0] == "none":
        return None
    if structure[0] == "tensor":
        return tensors[0]
    return tuple(tensors)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


__all__ = ["SHARING_MODES", "svd_cost", "schedule", "prepare", "serving", "computing", "has_result",
           "clear"]
