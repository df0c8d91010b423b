"""What the refresh-sharing tests run in each of their 2 gloo processes (CPU).

Per optimizer configuration and layout (DDP: plain tensors with all-reduced gradients;
FSDP2: DTensor shards), the same model is trained by an optimizer with the default
``refresh_sharing="owner"`` and by one with ``"replicate"``, and we record: the weights and
the optimizer state of both (bitwise comparison), and how many projectors each rank
computed at each step (``torch.linalg.svd`` calls for the SVD methods, DCT scorings for
the DCT ones), so that the test can add them up over the ranks.
"""
from __future__ import annotations

import contextlib
import traceback
import warnings

import torch
import torch.distributed as dist

from .._dist import rank_session
from ._worker import GAP, LR, _groups, _loss, batch, fsdp_model, make_model

STEPS = 4  # refreshes at steps 1 and 3


def configs():
    from lowrank_kernels.optim import DCTAdamW, FrugalAdamW, GaLoreAdamW, QGaLoreAdamW

    return {
        "galore": (lambda m, **kw: GaLoreAdamW(_groups(m, rank=2, update_proj_gap=GAP, scale=0.5), lr=LR,
                                               weight_decay=0.1, **kw), "svd"),
        "galore_right_lowrank": (lambda m, **kw: GaLoreAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, proj_type="right"), lr=LR, svd="lowrank", **kw), "svd"),
        "galore_full": (lambda m, **kw: GaLoreAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, proj_type="full"), lr=LR, **kw), "svd"),
        "qgalore_int4": (lambda m, **kw: QGaLoreAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, quant_group_size=8), lr=LR, weight_decay=0.1, **kw), "svd"),
        "frugal_svd": (lambda m, **kw: FrugalAdamW(_groups(m, density=0.25, update_proj_gap=GAP), lr=LR, **kw),
                       "svd"),
        "dct_std": (lambda m, **kw: DCTAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, moment_refresh="reindex"), lr=LR, **kw), "dct"),
        "frugal_dct": (lambda m, **kw: FrugalAdamW(
            _groups(m, density=0.4, update_proj_gap=GAP, projection="dct"), lr=LR, **kw), "dct"),
    }


class Counter:
    """Counts ``torch.linalg.svd`` calls and DCT scorings (rows of the list op included)."""

    def __init__(self):
        self.n = 0

    @contextlib.contextmanager
    def patched(self):
        from lowrank_kernels import ops

        svd, score, foreach_score = torch.linalg.svd, ops.dct_score_topk, ops.foreach_dct_score_topk

        def svd_counted(*a, **k):
            self.n += 1
            return svd(*a, **k)

        def score_counted(*a, **k):
            self.n += 1
            return score(*a, **k)

        def foreach_counted(grads, *a, **k):
            self.n += len(grads)
            return foreach_score(grads, *a, **k)

        torch.linalg.svd, ops.dct_score_topk, ops.foreach_dct_score_topk = svd_counted, score_counted, foreach_counted
        try:
            yield
        finally:
            torch.linalg.svd, ops.dct_score_topk, ops.foreach_dct_score_topk = svd, score, foreach_score


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def snapshot(model, opt):
    """Every weight and state tensor (local shards), in a fixed order."""
    out = [_local(p).detach().clone() for p in model.parameters()]
    for p in model.parameters():
        st = opt.state.get(p, {})
        for k in sorted(st):
            v = st[k]
            if isinstance(v, torch.Tensor):
                out.append(_local(v).detach().clone())
    return out


def run(make_opt, layout, rank, ws, x, y, **kw):
    """Train ``STEPS`` steps; returns (snapshot, projectors computed per step, optimizer)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if layout == "ddp":
        model = DDP(make_model())
        inner = model.module
    elif layout == "fsdp":
        model = inner = fsdp_model()
    else:  # "local": no DDP, every rank its own batch
        model = inner = make_model()
    opt = make_opt(inner, **kw)
    counter, per_step = Counter(), []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        before = counter.n
        with counter.patched():
            opt.step()
        per_step.append(counter.n - before)
    return snapshot(inner, opt), per_step, opt


def bitwise(a, b):
    return len(a) == len(b) and all(s.dtype == t.dtype and s.shape == t.shape and torch.equal(s, t)
                                    for s, t in zip(a, b))


def check(name, make_opt, layout, rank, ws, results):
    x, y = batch()
    lo, hi = rank * x.shape[0] // ws, (rank + 1) * x.shape[0] // ws
    owner, count_owner, opt = run(make_opt, layout, rank, ws, x[lo:hi], y[lo:hi])
    rep, count_rep, _ = run(make_opt, layout, rank, ws, x[lo:hi], y[lo:hi], refresh_sharing="replicate")
    results[f"bitwise[{name},{layout}]"] = [bitwise(owner, rep), f"{len(owner)} tensors"]
    results[f"count[{name},{layout}]"] = [True, {"owner": count_owner, "replicate": count_rep,
                                                 "failed": opt.failed_refreshes}]


def check_mismatch(rank, ws, results):
    """No DDP and a different batch per rank: the owner mode notices, warns, and every rank
    computes its own refreshes (bitwise its own replicate run)."""
    make_opt = configs()["galore"][0]
    x, y = batch()
    x, y = x + rank, y - rank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        owner, count_owner, _ = run(make_opt, "local", rank, ws, x, y)
    rep, _, _ = run(make_opt, "local", rank, ws, x, y, refresh_sharing="replicate")
    warned = [str(w.message) for w in caught if "refresh_sharing" in str(w.message)]
    results["mismatch"] = [bitwise(owner, rep) and len(warned) == 1 and count_owner[0] == 4,
                           {"warned": warned, "count": count_owner}]


def check_replicate_is_silent(rank, ws, results):
    """``refresh_sharing="replicate"`` in every group: no collective from the optimizer at all
    (not even the first step's check), so it may run on some ranks only."""
    make_opt = configs()["galore"][0]
    x, y = batch()
    calls = []
    gather, gather_obj, bcast = dist.all_gather, dist.all_gather_object, dist.broadcast
    dist.all_gather = lambda *a, **k: calls.append("all_gather") or gather(*a, **k)
    dist.all_gather_object = lambda *a, **k: calls.append("all_gather_object") or gather_obj(*a, **k)
    dist.broadcast = lambda *a, **k: calls.append("broadcast") or bcast(*a, **k)
    try:
        run(make_opt, "local", rank, ws, x, y, refresh_sharing="replicate")
    finally:
        dist.all_gather, dist.all_gather_object, dist.broadcast = gather, gather_obj, bcast
    results["replicate_silent"] = [not calls, calls]


def check_owner_error(rank, ws, results):
    """An exception in a refresh on its owner is raised on every rank, naming the owner."""
    make_opt = configs()["galore"][0]
    x, y = batch()
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = make_opt(model.module)
    _loss(model, x, y).backward()
    svd = torch.linalg.svd

    def broken(*a, **k):
        raise MemoryError("simulated out of memory")

    torch.linalg.svd = broken if rank == 1 else svd
    try:
        opt.step()
        results["owner_error"] = [False, "no error"]
    except RuntimeError as e:
        msg = str(e)
        results["owner_error"] = ["on rank 1, its owner" in msg and "simulated out of memory" in msg
                                  and not opt.state, msg]
    finally:
        torch.linalg.svd = svd


def worker(rank, ws, port, outdir, cases):
    with rank_session(rank, ws, port, outdir) as results:
        cfgs = configs()
        for name, layout in cases:
            try:
                check(name, cfgs[name][0], layout, rank, ws, results)
            except Exception:
                results[f"bitwise[{name},{layout}]"] = [False, traceback.format_exc()]
        for key, fn in (("mismatch", check_mismatch), ("owner_error", check_owner_error),
                        ("replicate_silent", check_replicate_is_silent)):
            try:
                fn(rank, ws, results)
            except Exception:
                results[key] = [False, traceback.format_exc()]
        dist.barrier()
