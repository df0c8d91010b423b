"""The sharded Trion step (``shard_work=True``) in each of 2 gloo processes (CPU).

Every rank builds the same model and gives it the same gradients (what DDP's all-reduce
leaves on every rank), steps a ``shard_work=True`` Trion, and compares with an unsharded
Trion stepped in the same process on a copy: the weights must be bitwise equal (the owner
runs the same ops on the same values and the broadcast copies its result exactly), each
momentum buffer must live on its owner rank only and equal the unsharded one bitwise, and a
non-finite gradient is skipped on every rank. Each rank writes ``{check: [ok, detail]}``.
"""
from __future__ import annotations

import copy
import traceback

import torch

from .._dist import rank_session


def _model():
    torch.manual_seed(0)
    # 5 matrices (both sides, two of one shape) and their biases: owners 0, 1, 0, 1, 0
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 16), torch.nn.Linear(16, 16),
                               torch.nn.Linear(16, 16), torch.nn.Linear(16, 30))


def _groups(model):
    from lowrank_kernels.optim import lowrank_param_groups

    return lowrank_param_groups(model, None, rank=4)


def worker(rank, world, port, outdir):
    with rank_session(rank, world, port, outdir) as results:
        try:
            from lowrank_kernels.optim import Trion

            sharded, single = _model(), _model()
            kw = dict(lr=0.02, weight_decay=0.1, scaling_type="kj")
            opt_s = Trion(_groups(sharded), shard_work=True, **kw)
            opt_1 = Trion(_groups(single), **kw)
            gen = torch.Generator().manual_seed(7)
            for step in range(4):
                for a, b in zip(sharded.parameters(), single.parameters()):
                    g = torch.randn(a.shape, generator=gen)
                    if step == 2 and a is sharded[1].weight:
                        g[0, 0] = float("nan")  # skipped on every rank
                    a.grad, b.grad = g.clone(), g.clone()
                opt_s.step()
                opt_1.step()
            same = all(torch.equal(a, b) for a, b in zip(sharded.parameters(), single.parameters()))
            results["weights"] = [same, "bitwise equal to the unsharded step" if same else "weights differ"]
            mats = [p for p in sharded.parameters() if p.dim() == 2]
            owned, ok = [], True
            for i, (p, q) in enumerate(zip(mats, [p for p in single.parameters() if p.dim() == 2])):
                st = opt_s.state[p]
                mine = "momentum_buffer" in st
                owner = (opt_s._param_index[p] - 1) % world
                ok &= mine == (owner == rank)
                if mine:
                    owned.append(i)
                    ok &= torch.equal(st["momentum_buffer"], opt_1.state[q]["momentum_buffer"])
                ok &= int(st["step"]) == int(opt_1.state[q]["step"])
            results["ownership"] = [ok and 0 < len(owned) < len(mats), f"rank {rank} owns matrices {owned}"]
            results["skips"] = [opt_s.nonfinite_skips == opt_1.nonfinite_skips == 1,
                                f"skips {opt_s.nonfinite_skips} / {opt_1.nonfinite_skips}"]
        except Exception:
            results["error"] = [False, traceback.format_exc()]
            raise
