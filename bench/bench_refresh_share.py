"""Refresh wall time per rank with the refreshes shared across the ranks or replicated.

``python -m bench.bench_refresh_share [--worlds 1,2,4] [--layers 2] [--dim 512] [--rank 128]``

Each of ``world`` gloo processes (CPU, one intra-op thread each) holds the same stack of
LLaMA-shaped weights (per layer ``q, k, v, o: d x d``, ``gate, up: f x d``, ``down: d x f``,
``f = 2.6875 d``) with the same gradient on every rank (what DDP gives), and times
``GaLoreAdamW.step()`` with ``update_proj_gap=1`` (every step an exact-SVD refresh) under
``refresh_sharing="owner"`` and ``"replicate"``. Reported per world size: the median over
``--repeat`` steps of the slowest rank's step time (the ranks meet at the exchange, so that
is the wall time of a refresh), and the SVDs each rank computed per refresh.

Figures from a shared, loaded CPU are noisy: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def shapes(layers: int, d: int):
    f = int(round(d * 2.6875))
    return [s for _ in range(layers) for s in [(d, d)] * 4 + [(f, d), (f, d), (d, f)]]


def _rank(rank, world, port, outdir, args):
    import torch.distributed as dist

    from lowrank_kernels.optim import GaLoreAdamW

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    gen = torch.Generator().manual_seed(0)
    for mode in ("replicate", "owner"):
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes(args["layers"], args["dim"])]
        opt = GaLoreAdamW(params, lr=1e-3, rank=args["rank"], update_proj_gap=1, refresh_sharing=mode)
        svd, calls = torch.linalg.svd, [0]

        def counted(*a, **k):
            calls[0] += 1
            return svd(*a, **k)

        times = []
        torch.linalg.svd = counted
        try:
            for _ in range(args["repeat"] + 1):  # the first step also creates the state: not timed
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
        finally:
            torch.linalg.svd = svd
        out[mode] = {"times": times[1:], "svds_per_refresh": calls[0] / (args["repeat"] + 1)}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def run(world: int, args: dict) -> dict:
    import torch.multiprocessing as mp

    from python_tests._dist import free_port

    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_rank, args=(world, free_port(), outdir, args), nprocs=world, start_method="spawn")
        ranks = []
        for r in range(world):
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    row = {"world": world}
    for mode in ("replicate", "owner"):
        slowest = [max(rk[mode]["times"][i] for rk in ranks) for i in range(args["repeat"])]
        row[mode] = {"ms": 1e3 * statistics.median(slowest),
                     "svds": [rk[mode]["svds_per_refresh"] for rk in ranks]}
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_refresh_share", description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    args = {"layers": a.layers, "dim": a.dim, "rank": a.rank, "repeat": a.repeat}
    n = len(shapes(a.layers, a.dim))
    print(f"GaLoreAdamW exact-SVD refresh of {n} weights ({a.layers} LLaMA layers, d={a.dim}, rank {a.rank}), "
          f"gloo on CPU, 1 thread per rank, torch {torch.__version__}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}")
    print("| world | replicate: ms per refresh step | SVDs per rank | owner: ms per refresh step | SVDs per rank "
          "| speed-up |")
    print("|---|---|---|---|---|---|")
    for w in [int(x) for x in a.worlds.split(",")]:
        row = run(w, args)
        rep, own = row["replicate"], row["owner"]
        print(f"| {w} | {rep['ms']:.0f} | {'/'.join(f'{s:g}' for s in rep['svds'])} | {own['ms']:.0f} | "
              f"{'/'.join(f'{s:g}' for s in own['svds'])} | {rep['ms'] / own['ms']:.2f}x |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
