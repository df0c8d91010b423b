"""What test_foreach_dtensor.py runs in each of its 2 gloo processes (CPU): the list ops on
DTensor lists, and the bucketed optimizer step under FSDP2.

Each rank writes ``{check: [ok, detail]}`` to ``<outdir>/rank<r>.json``.
"""
from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

from .._dist import rank_session
from . import _worker as W

# Weights of the op-level checks: rows split unevenly (9/8, 5/5), fewer rows than the rank on
# one rank (3 rows: 2/1, rank 2), and one row (rank 1 holds none).
SHAPES = [(17, 12), (10, 17), (3, 10), (1, 3), (9, 9)]
OP_TOL = 1e-4  # DTensor vs plain: shard-sized GEMM panels and the left side's all-reduce sum in another order


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def _shard(t, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(t.clone(), mesh, [Shard(0)])


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


class _Calls:
    """Counts calls of public ``lowrank_kernels.ops`` functions (the optimizers look them up on
    the module at call time) made with at least one DTensor among the first argument's list."""

    def __init__(self, *names):
        import lowrank_kernels.ops as ops

        self.ops, self.names, self.counts, self.saved = ops, names, {n: 0 for n in names}, {}

    def __enter__(self):
        from torch.distributed.tensor import DTensor

        for name in self.names:
            real = self.saved[name] = getattr(self.ops, name)

            def wrapped(*args, _real=real, _name=name, **kwargs):
                if any(isinstance(t, DTensor) for t in args[0]):
                    self.counts[_name] += 1
                return _real(*args, **kwargs)

            setattr(self.ops, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(self.ops, name, real)


def check_projection_list(results):
    """``foreach_project_update_backproject_`` on DTensor lists == the single op per entry on
    DTensors (bitwise) == plain tensors in one process (to rounding), both sides, dense and DCT."""
    from lowrank_kernels import ops

    mesh = _mesh()
    for side in ("right", "left"):
        for kind in ("dense", "dct"):
            gen = torch.Generator().manual_seed(3)
            ranks = [1 if min(s) == 1 else 2 for s in SHAPES]
            ws = [torch.randn(s, generator=gen) for s in SHAPES]
            gs = [torch.randn(s, generator=gen) for s in SHAPES]
            lshape = [ops.lowrank_shape(m, n, r, side) for (m, n), r in zip(SHAPES, ranks)]
            ms = [torch.randn(s, generator=gen) for s in lshape]
            vs = [torch.rand(s, generator=gen) for s in lshape]
            projs = []
            for (m, n), r in zip(SHAPES, ranks):
                if kind == "dense":
                    projs.append(torch.randn((r, n) if side == "right" else (m, r), generator=gen))
                else:
                    size = n if side == "right" else m
                    projs.append(ops.DCTProjector(ops.dct_basis(size), torch.randperm(size, generator=gen)[:r].int()))
            hyper = dict(side=side, lr=[1e-2 * (i + 1) for i in range(len(SHAPES))], step=[3] * len(SHAPES),
                         weight_decay=0.1, scale=0.5)

            def dist_copies():
                p = [_shard(w, mesh) for w in ws]
                g = [_shard(x, mesh) for x in gs]
                # right: moments m x r, row-aligned like the weight; left: r x n, replicated (plain)
                m_ = [_shard(x, mesh) if side == "right" else x.clone() for x in ms]
                v_ = [_shard(x, mesh) if side == "right" else x.clone() for x in vs]
                pr = [_shard(x, mesh) if (kind == "dense" and side == "left") else x for x in projs]
                return p, g, pr, m_, v_

            plain = [[t.clone() for t in xs] for xs in (ws, gs, ms, vs)]
            ops.foreach_project_update_backproject_(plain[0], plain[1], projs, plain[2], plain[3], **hyper)
            lst = dist_copies()
            ops.foreach_project_update_backproject_(*lst, **hyper)
            one = dist_copies()
            for i in range(len(SHAPES)):
                ops.project_update_backproject_(
                    one[0][i], one[1][i], one[2][i], one[3][i], one[4][i], side=side, lr=hyper["lr"][i],
                    step=3, weight_decay=0.1, scale=0.5)
            same = all(torch.equal(_full(a), _full(b)) for xs, ys in ((lst[0], one[0]), (lst[3], one[3]), (lst[4], one[4]))
                       for a, b in zip(xs, ys))
            err = max(_rel(_full(a) - w0, b - w0) for a, b, w0 in zip(lst[0], plain[0], ws))
            err_m = max(_rel(_full(a), b) for a, b in zip(lst[3], plain[2]))
            results[f"projection_list[{side},{kind}]"] = [
                same and err < OP_TOL and err_m < OP_TOL,
                f"list == per-entry: {same}; vs plain: update rel err {err:.1e}, exp_avg {err_m:.1e}"]


def check_bad_list(results):
    """A bad entry in a DTensor list (a moment of the wrong shape in entry 2) raises a clear
    ValueError before anything is written: entries 0 and 1 stay as they were."""
    from lowrank_kernels import ops

    mesh = _mesh()
    gen = torch.Generator().manual_seed(9)
    shapes = [(17, 12), (9, 9), (10, 12)]
    ws = [_shard(torch.randn(s, generator=gen), mesh) for s in shapes]
    gs = [_shard(torch.randn(s, generator=gen), mesh) for s in shapes]
    projs = [torch.randn(2, s[1], generator=gen) for s in shapes]
    ms = [_shard(torch.zeros(s[0], 2), mesh) for s in shapes]
    vs = [_shard(torch.zeros(s[0], 2), mesh) for s in shapes]
    ms[2] = _shard(torch.zeros(shapes[2][0], 3), mesh)
    before = [_full(w).clone() for w in ws]
    try:
        ops.foreach_project_update_backproject_(ws, gs, projs, ms, vs, side="right", lr=1e-2, step=1)
        results["bad_list"] = [False, "no error"]
        return
    except ValueError as e:
        msg = str(e)
    untouched = all(torch.equal(_full(w), b) for w, b in zip(ws, before)) and not any(_full(m).any() for m in ms)
    results["bad_list"] = ["(parameter 2)" in msg and "exp_avg must have shape" in msg and untouched,
                           f"untouched {untouched}: {msg}"]


def check_adam_list(results):
    """``foreach_adam_update_`` on DTensor lists (row-sharded and replicated entries) == the
    single op per entry (bitwise) == plain tensors."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    from lowrank_kernels import ops

    mesh = _mesh()
    gen = torch.Generator().manual_seed(5)
    shapes = [(17, 3), (1, 4), (6, 5)]
    rs = [torch.randn(s, generator=gen) for s in shapes]
    ms = [torch.randn(s, generator=gen) for s in shapes]
    vs = [torch.rand(s, generator=gen) for s in shapes]

    def lay(i, t):  # entry 2 replicated, the others row-sharded
        return distribute_tensor(t.clone(), mesh, [Replicate()]) if i == 2 else _shard(t, mesh)

    plain_m, plain_v = [m.clone() for m in ms], [v.clone() for v in vs]
    n_plain = ops.foreach_adam_update_(rs, plain_m, plain_v, beta1=0.8, beta2=0.99, eps=1e-6)
    lm, lv = [lay(i, m) for i, m in enumerate(ms)], [lay(i, v) for i, v in enumerate(vs)]
    n_list = ops.foreach_adam_update_([lay(i, r) for i, r in enumerate(rs)], lm, lv, beta1=0.8, beta2=0.99, eps=1e-6)
    om, ov = [lay(i, m) for i, m in enumerate(ms)], [lay(i, v) for i, v in enumerate(vs)]
    n_one = [ops.adam_update_(lay(i, r), om[i], ov[i], beta1=0.8, beta2=0.99, eps=1e-6) for i, r in enumerate(rs)]
    same = all(torch.equal(_full(a), _full(b)) for xs, ys in ((n_list, n_one), (lm, om), (lv, ov)) for a, b in zip(xs, ys))
    err = max(_rel(_full(a), b) for xs, ys in ((n_list, n_plain), (lm, plain_m), (lv, plain_v)) for a, b in zip(xs, ys))
    layouts = [tuple(t.placements) for t in n_list]
    results["adam_list"] = [same and err < OP_TOL and layouts == [tuple(t.placements) for t in lm],
                            f"list == per-entry: {same}; vs plain rel err {err:.1e}; N layouts {layouts}"]


def check_adam_list_8bit(results):
    """The same with 8-bit moments (uint8 codes + per-row-block absmax, sharded with the rows):
    two updates, list == per-entry bitwise, == plain tensors."""
    from lowrank_kernels import ops

    mesh = _mesh()
    gen = torch.Generator().manual_seed(6)
    shapes = [(17, 40), (6, 9)]
    rs = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    kw = dict(beta1=0.9, beta2=0.99, eps=1e-8, block_size=16)

    def state(layout):
        st = [ops.moments8_zeros(s, block_size=16) for s in shapes]
        return [{k: layout(v) for k, v in d.items()} for d in st]

    def run_list(st, layout):
        for r in rs:
            n = ops.foreach_adam_update_([layout(x) for x in r], [d["exp_avg"] for d in st],
                                         [d["exp_avg_sq"] for d in st], m_absmax=[d["m_absmax"] for d in st],
                                         v_absmax=[d["v_absmax"] for d in st], **kw)
        return n

    plain = state(lambda t: t.clone())
    n_plain = run_list(plain, lambda t: t)
    lst = state(lambda t: _shard(t, mesh))
    n_list = run_list(lst, lambda t: _shard(t, mesh))
    one = state(lambda t: _shard(t, mesh))
    for r in rs:
        n_one = [ops.adam_update_(_shard(x, mesh), d["exp_avg"], d["exp_avg_sq"], m_absmax=d["m_absmax"],
                                  v_absmax=d["v_absmax"], **kw) for x, d in zip(r, one)]
    same = all(torch.equal(_full(a), _full(b)) for a, b in zip(n_list, n_one)) and all(
        torch.equal(_full(a[k]), _full(b[k])) for a, b in zip(lst, one) for k in a)
    to_plain = all(torch.equal(_full(a[k]), b[k]) for a, b in zip(lst, plain) for k in ("exp_avg", "exp_avg_sq")) \
        and max(_rel(_full(a), b) for a, b in zip(n_list, n_plain)) < OP_TOL
    results["adam_list_8bit"] = [same and to_plain, f"list == per-entry: {same}; == plain: {to_plain}"]


def check_dct_list(results):
    """``foreach_dct_score_topk`` on row-sharded gradients == ``dct_score_topk`` per gradient
    (bitwise), the same on every rank; the top-k of the plain scores up to near-ties."""
    from lowrank_kernels import ops

    mesh = _mesh()
    gen = torch.Generator().manual_seed(7)
    for side in ("right", "left"):
        gs = [torch.randn(17, 12, generator=gen) for _ in range(3)]
        k = 4
        lst = ops.foreach_dct_score_topk([_shard(g, mesh) for g in gs], k, side=side, norm=1)
        one = torch.stack([ops.dct_score_topk(_shard(g, mesh), k, side=side, norm=1) for g in gs])
        plain = ops.foreach_dct_score_topk(gs, k, side=side, norm=1)
        everyone = [torch.zeros_like(lst) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, lst.contiguous())
        agree = all(torch.equal(x, lst) for x in everyone)
        overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(lst, plain)) / plain.numel()
        ok = torch.equal(lst, one) and agree and overlap >= 0.9 and type(lst) is torch.Tensor
        results[f"dct_list[{side}]"] = [ok, f"list == per-entry {torch.equal(lst, one)}, ranks agree {agree}, "
                                            f"overlap with plain {overlap:.2f}"]


BUCKET_CONFIGS = ["galore", "galore_right", "dct_right", "dct_std_l2"]


def _make(name, model, foreach):
    from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW

    g = dict(update_proj_gap=W.GAP, foreach=foreach)
    if name == "galore":
        return GaLoreAdamW(W._groups(model, rank=2, scale=0.5, **g), lr=W.LR, weight_decay=0.1)
    if name == "galore_right":
        return GaLoreAdamW(W._groups(model, rank=2, proj_type="right", **g), lr=W.LR)
    if name == "dct_right":
        return DCTAdamW(W._groups(model, rank=2, proj_type="right", moment_refresh="reindex", **g), lr=W.LR)
    return DCTAdamW(W._groups(model, rank=2, norm=2, **g), lr=W.LR, weight_decay=0.1)


def check_bucketed_fsdp(name, rank, ws, results):
    """FSDP2: the bucketed step (foreach default) == the per-parameter step (foreach=False),
    bitwise, with the same collectives per step; both == single-process training; the list
    ops really ran on DTensors."""
    x, y = W.batch()
    lo, hi = rank * x.shape[0] // ws, (rank + 1) * x.shape[0] // ws
    single = W.make_model()
    init = [p.detach().clone() for p in single.parameters()]
    W.train(single, _make(name, single, None), x, y, W.STEPS)
    ref = [p.detach().clone() for p in single.parameters()]

    runs = {}
    for foreach in (None, False):
        model = W.fsdp_model()
        comm = W._Comm()
        with _Calls("foreach_project_update_backproject_", "foreach_dct_score_topk") as calls:
            W.train(model, _make(name, model, foreach), x[lo:hi], y[lo:hi], W.STEPS, on_step=comm)
        runs[foreach] = (W.full_params(model), comm.per_step, dict(calls.counts))
    (pb, cb, nb), (pp, cp, npp) = runs[None], runs[False]
    same = all(torch.equal(a, b) for a, b in zip(pb, pp))
    err = W.rel_change_err(pb, ref, init)
    steady = W.STEPS - W.STEPS // W.GAP  # steps without a refresh
    want_refresh = W.STEPS // W.GAP if name.startswith("dct") else 0
    used = (nb["foreach_project_update_backproject_"] >= steady and npp["foreach_project_update_backproject_"] == 0
            and nb["foreach_dct_score_topk"] >= want_refresh and npp["foreach_dct_score_topk"] == 0)
    ok = same and cb == cp and err < W.TOL and used
    results[f"bucketed_fsdp[{name}]"] = [ok, f"bucketed == per-param: {same}; same collectives: {cb == cp} "
                                             f"({cb} vs {cp}); vs single rel err {err:.1e}; list calls {nb} / {npp}"]


def worker(rank, ws, port, outdir):
    with rank_session(rank, ws, port, outdir) as results:
        from lowrank_kernels.optim import distributed as lk_dist

        lk_dist.install_op_handlers()  # the optimizers install them; direct op calls need them too
        checks = [("projection_list", lambda: check_projection_list(results)),
                  ("adam_list", lambda: check_adam_list(results)),
                  ("adam_list_8bit", lambda: check_adam_list_8bit(results)),
                  ("bad_list", lambda: check_bad_list(results)),
                  ("dct_list", lambda: check_dct_list(results))]
        checks += [(f"bucketed_fsdp[{n}]", lambda n=n: check_bucketed_fsdp(n, rank, ws, results))
                   for n in BUCKET_CONFIGS]
        for name, fn in checks:
            try:
                fn()
            except Exception:
                results[name] = [False, traceback.format_exc()]
