"""Host cost of one non-refresh optimizer step on a stack of tiny weights (issue 12, part 4).

The stack: 4 LLaMA-shaped layers x 7 linears (q, k, v, o: ``d x d``; gate, up: ``f x d``;
down: ``d x f``) at tiny sizes (``d=64, f=172``), rank 8, so host time dominates. Per
optimizer it reports, for one non-refresh step:

- the ``lowrank_kernels`` op calls and the aten op calls (counted by a
  ``TorchDispatchMode``; the custom ops' own inner aten calls of the reference backend are
  counted too, the C++ backend's are not visible);
- the median wall time of ``step()`` over many repetitions, the optimizers interleaved
  round by round (a loaded machine slows all of them alike), with the 20th/80th percentiles;
- for the bucketed optimizers, the time of the bucket grouping alone (``_bucket_entry`` over
  every parameter), to show it is cheap.

``python -m bench.host_cost [--rounds N] [--reps N] [--backend cpp|reference|triton] [--threads N]``.
Not yet a suite of ``python -m bench``: ``rows(...)`` returns plain dicts a suite can add.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

D, F, LAYERS, RANK = 64, 172, 4, 8


def stack_shapes(d: int = D, f: int = F, layers: int = LAYERS) -> List[tuple]:
    """The 28 weight shapes: per layer q, k, v, o, gate, up, down."""
    return [s for _ in range(layers) for s in ((d, d),) * 4 + ((f, d), (f, d), (d, f))]


class CountOps(TorchDispatchMode):
    """Counts every op that reaches the Python dispatcher, by namespace."""

    def __init__(self):
        super().__init__()
        self.custom = 0
        self.aten = 0
        self.names: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        if ns == "lowrank_kernels":
            self.custom += 1
        elif ns == "aten":
            self.aten += 1
        name = str(func.overloadpacket)
        self.names[name] = self.names.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def make_optimizers(device="cpu", dtype=torch.float32):
    """``{name: (optimizer, params)}``, each on its own copy of the same weights and gradients."""
    from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW

    gen = torch.Generator().manual_seed(0)
    shapes = stack_shapes()
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    g0 = [torch.randn(s, generator=gen) for s in shapes]

    def params():
        ps = [torch.nn.Parameter(w.to(device, dtype).clone()) for w in w0]
        for p, g in zip(ps, g0):
            p.grad = g.to(device, dtype).clone()
        return ps

    lowrank = dict(rank=RANK, update_proj_gap=10**9, scale=0.25, proj_type="std")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls, foreach in (("GaLoreAdamW", GaLoreAdamW, None), ("GaLoreAdamW per-param", GaLoreAdamW, False),
                                   ("DCTAdamW", DCTAdamW, None), ("DCTAdamW per-param", DCTAdamW, False)):
            ps = params()
            out[name] = (cls([{"params": ps, **lowrank, "foreach": foreach}], lr=1e-3), ps)
        ps = params()
        out["torch AdamW foreach"] = (torch.optim.AdamW(ps, lr=1e-3, foreach=True), ps)
        ps = params()
        out["torch AdamW fused"] = (torch.optim.AdamW(ps, lr=1e-3, fused=True), ps)
    return out


def grouping_ms(opt, reps: int = 200) -> float:
    """Median time of the bucket grouping alone over every parameter (ms)."""
    entries = [(g, p) for g in opt.param_groups for p in g["params"]]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for g, p in entries:
            opt._bucket_entry(p, g)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rows(rounds: int = 60, reps: int = 5, backend: str = "cpp") -> List[dict]:
    """One row per optimizer: op counts per non-refresh step and step-time percentiles (ms)."""
    from lowrank_kernels.ops import use_backend

    opts = make_optimizers()
    result = []
    with use_backend(backend):
        for opt, _ in opts.values():  # the first step refreshes; then warm up
            for _ in range(3):
                opt.step()
        counts = {}
        for name, (opt, _) in opts.items():
            with CountOps() as mode:
                opt.step()
            counts[name] = mode
        times = {name: [] for name in opts}
        for _ in range(rounds):  # interleaved: every optimizer once per round
            for name, (opt, _) in opts.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    opt.step()
                times[name].append((time.perf_counter() - t0) * 1e3 / reps)
    for name, (opt, _) in opts.items():
        q = statistics.quantiles(times[name], n=5)
        row = dict(optimizer=name, backend=backend, n_weights=len(stack_shapes()), custom_ops=counts[name].custom,
                   aten_ops=counts[name].aten, median_ms=round(statistics.median(times[name]), 4),
                   p20_ms=round(q[0], 4), p80_ms=round(q[3], 4))
        if hasattr(opt, "_bucket_entry"):
            row["grouping_ms"] = round(grouping_ms(opt), 4)
        result.append(row)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="cpp", choices=("cpp", "reference", "triton"))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = rows(args.rounds, args.reps, args.backend)
    print(f"non-refresh step, {out[0]['n_weights']} weights (4 layers x 7, d={D}, f={F}, rank {RANK}), "
          f"backend {args.backend}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print(f"{'optimizer':24s} {'lk ops':>6s} {'aten':>5s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'grouping ms':>12s}")
    for r in out:
        print(f"{r['optimizer']:24s} {r['custom_ops']:6d} {r['aten_ops']:5d} {r['median_ms']:10.3f} {r['p20_ms']:8.3f} "
              f"{r['p80_ms']:8.3f} {r.get('grouping_ms', float('nan')):12.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
