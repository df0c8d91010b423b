"""The 8-bit-moment checks of ``test_moment_bits_dist.py``, run in each of 2 gloo processes (CPU).

Per config (8-bit moments everywhere: ``min_8bit_size=0``, ``block_size=4`` so the small
moments hold several blocks per row): one process on the whole batch with 8-bit moments,
the same with float32 moments, and FSDP2 (every Linear ``fully_shard``-ed, rows split
unevenly) with 8-bit moments on each rank's half of the batch. Each rank writes
``{check: [ok, detail]}`` to ``<outdir>/rank<r>.json``.
"""
from __future__ import annotations

import traceback

import torch

from .._dist import rank_session
from . import _worker as W

#: 8-bit FSDP2 vs 8-bit single process: the two runs differ only in the gradient's summation
#: order (~1e-7 relative), as the 32-bit parity tests (same bound, _worker.TOL); a value could
#: cross a code boundary of the 8-bit map and move by one code step, but measured errors stay
#: at 1e-7..7e-7. The 8-bit vs float32 distance (1e-3..5e-3) must be 10x larger than the error:
#: the runs did use 8-bit moments.
TOL = 1e-4
FMT = dict(moment_bits=8, min_8bit_size=0, block_size=4)


def configs():
    from lowrank_kernels.optim import APOLLOAdamW, DCTAdamW, FrugalAdamW, GaLoreAdamW

    gap, lr = W.GAP, W.LR

    def g(m, **low):
        # the biases (plain AdamW) stay 32-bit: FSDP2 shards a 1-D parameter along its blocks
        groups = W._groups(m, **low)
        groups[-1]["moment_bits"] = 32
        return groups

    return {
        "galore": lambda m, **f: GaLoreAdamW(g(m, rank=2, update_proj_gap=gap, scale=0.5), lr=lr, weight_decay=0.1,
                                             **f),
        "galore_right": lambda m, **f: GaLoreAdamW(g(m, rank=2, update_proj_gap=gap, proj_type="right"), lr=lr, **f),
        "dct_right_reindex": lambda m, **f: DCTAdamW(
            g(m, rank=2, update_proj_gap=gap, proj_type="right", moment_refresh="reindex"), lr=lr, **f),
        "apollo": lambda m, **f: APOLLOAdamW(g(m, rank=2, update_proj_gap=gap), lr=lr, weight_decay=0.1, **f),
        "frugal_columns": lambda m, **f: FrugalAdamW(
            g(m, density=0.4, update_proj_gap=gap, projection="columns"), lr=lr, **f),
    }


def check(name, make_opt, rank, ws, results):
    from torch.distributed.tensor import DTensor

    x, y = W.batch()
    lo, hi = rank * x.shape[0] // ws, (rank + 1) * x.shape[0] // ws

    single = W.make_model()
    init = [p.detach().clone() for p in single.parameters()]
    opt8 = make_opt(single, **FMT)
    W.train(single, opt8, x, y, W.STEPS)
    ref8 = [p.detach().clone() for p in single.parameters()]
    single32 = W.make_model()
    W.train(single32, make_opt(single32), x, y, W.STEPS)
    ref32 = [p.detach().clone() for p in single32.parameters()]

    model = W.fsdp_model()
    opt = make_opt(model, **FMT)
    W.train(model, opt, x[lo:hi], y[lo:hi], W.STEPS)
    err = W.rel_change_err(W.full_params(model), ref8, init)
    fmt_err = W.rel_change_err(ref8, ref32, init)
    # every projected moment with rows of more than one element is 8-bit (the 1 x 3 weight's rank-1
    # moment has one-element rows: float32 is smaller there); the right-side (17 x 12 weight) moments
    # and absmax are row-sharded
    w1 = model[0].weight
    st = opt.state[w1]
    formats = sorted({str(s["exp_avg"].dtype) for s in opt.state.values()
                      if "exp_avg" in s and "side" in s and s["exp_avg"].shape[-1] > 1})
    sharded = all(isinstance(st[k], DTensor) and st[k].placements == w1.placements
                  for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"))
    ok = err < TOL and fmt_err > 10 * err and formats == ["torch.uint8"] and sharded
    results[f"fsdp8[{name}]"] = [ok, f"rel err vs 8-bit single {err:.2e} (tol {TOL:.0e}); 8-bit vs fp32 single "
                                     f"{fmt_err:.2e}; formats {formats}; right-side state row-sharded {sharded}"]


def worker(rank, ws, port, outdir, names):
    with rank_session(rank, ws, port, outdir) as results:
        cfgs = configs()
        for name in names:
            try:
                check(name, cfgs[name], rank, ws, results)
            except Exception:
                results[f"fsdp8[{name}]"] = [False, traceback.format_exc()]
