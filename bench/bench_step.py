"""Suite ``step``: a whole optimizer step on a stack of LLaMA-1B-shaped layers.

The stack (per layer 4 x 2048x2048, 2 x 5461x2048, 1 x 2048x5461; 4 layers = 201M
params on CUDA, one narrower layer on CPU) holds parameters with fixed random
gradients; every optimizer steps the same parameters. Kernels:

``step``          median step with no projector refresh (gap 10^9, after the first step)
``refresh_step``  median step that refreshes every projector (a second optimizer with gap 1;
                  its first step, the state allocation included, counts: at most 4 timed)
``step_gap200``   ``(199 x step + refresh_step) / 200``: derived from the two rows above

Providers: ``torch-adamw-fused`` (the baseline), ``torch-adamw-foreach``, bitsandbytes'
``AdamW8bit``, the official packages ``galore-torch`` (and its ``GaLoreAdamW8bit``, CUDA
only) and ``apollo-torch`` where importable, and ours (``lowrank_kernels.optim``) as they
exist, each with float32 moments and, as ``<name>-8bit``, with ``moment_bits=8``
(``bench/optimizers.py``; the 16-bit rows are in the memory suite only). The first two steps of each optimizer
(state allocation, first refresh, compilation) are the warm-up; they also give the
memory suite its figures (``bench/optimizers.py``).
"""
from __future__ import annotations

import torch

from . import optimizers as O
from .harness import Ctx, Row, free_memory, gpu_check_args, plot_bars, progress

SUITE = "step"


def run(ctx: Ctx) -> None:
    stack = ctx.sizes.stack
    kw = dict(shape=stack.label(), rank=ctx.sizes.stack_rank)
    ctx.log(f"  step: stack {stack.label()} ({stack.numel / 1e6:.3g}M params), rank {ctx.sizes.stack_rank}")
    params = O.make_params(ctx)
    memory = ctx.shared.setdefault("optimizer_memory", {})
    for name in progress(O.names_for(SUITE), "step", ctx):
        lowrank = O.OPTIMIZERS[name][1]
        ctx.log(f"  step {name}")
        opt = O.build(ctx, SUITE, "step", name, params, O.BIG_GAP, kw)
        if opt is None:
            continue
        note = "plain float params (no QLinear)" if name == "ours-QGaLoreAdamW" else ""
        try:
            ctx.check_budget()
            memory[name] = O.first_steps(ctx, opt, name)  # warm-up: state allocation, first refresh, compilation
        except Exception as e:  # noqa: BLE001 - measure() below records budget and failures alike
            ctx.skip(SUITE, "step", name, f"first steps failed: {type(e).__name__}: {e}"[:200], **kw)
            del opt
            free_memory(ctx.device, collect=True)
            continue
        steady = ctx.measure(SUITE, "step", name, opt.step, note=note, time_kw=dict(warmup=0), **kw)
        del opt
        free_memory(ctx.device, collect=True)
        refresh = None
        if lowrank and steady is not None:
            opt = O.build(ctx, SUITE, "refresh_step", name, params, 1, kw)
            if opt is not None:
                # Every kernel is compiled by now, so the first refresh step counts (SVD refreshes take
                # seconds); at most 4 more: Q-GaLore's adaptive gap may double after 5 similar refreshes.
                refresh = ctx.measure(SUITE, "refresh_step", name, opt.step, note=note,
                                      time_kw=dict(warmup=0, min_reps=1, max_reps=4), **kw)
            del opt
            free_memory(ctx.device, collect=True)
        if steady is not None:
            if not lowrank:
                _derived(ctx, name, steady, steady, "no projector: every step costs the same", kw)
            elif refresh is not None:
                _derived(ctx, name, steady, refresh, "derived: (199 x step + refresh_step) / 200", kw)
    del params
    free_memory(ctx.device, collect=True)
    _host_cost(ctx)
    ctx.set_baseline(SUITE, O.BASELINE)
    _targets(ctx)


# --------------------------------------------------------------------------- host-cost table
def _host_cost(ctx: Ctx) -> None:
    """Kernel ``host_cost``: bench/host_cost.py's non-refresh step on 28 tiny weights (host time
    dominates) on the present device, every optimizer; the note holds the op counts."""
    from . import host_cost as H

    rounds, reps = (2, 1) if ctx.tiny else ((10, 3) if ctx.quick else (30, 5))
    ctx.log(f"  step: host cost, {len(H.stack_shapes())} tiny weights, {rounds} rounds of {reps}")
    shape = f"{len(H.stack_shapes())} x tiny (d={H.D}, f={H.F})"
    kw = dict(shape=shape, rank=H.RANK, dtype="fp32")
    try:
        ctx.check_budget()
        # The smoke run (--tiny) exercises the path on the two optimizers with host-cost goals and the baselines.
        names = ["torch-adamw-fused", H.BASELINE, *H.TARGETS] if ctx.tiny else None
        result = H.rows(rounds, reps, backend=None, device=ctx.device, profile_ops=False, names=names)
    except Exception as e:  # noqa: BLE001 - recorded as a skip, the suite goes on
        ctx.skip(SUITE, "host_cost", "-", f"host cost failed: {type(e).__name__}: {e}"[:200], **kw)
        return
    by = {}
    for r in result:
        if r.get("skipped"):
            ctx.skip(SUITE, "host_cost", r["optimizer"], r["skipped"], **kw)
            continue
        by[r["optimizer"]] = r
        ctx.add(Row(suite=SUITE, kernel="host_cost", provider=r["optimizer"], median_ms=r["median_ms"],
                    p20_ms=r["p20_ms"], p80_ms=r["p80_ms"], reps=rounds * reps,
                    note=f"{r['lk_ops']} lk op calls, {r['aten_ops']} aten ops ({r['host_reads']} host reads) per step; "
                         f"CPU time {r['cpu_ms']:.3g} ms",
                    **kw))
    cpu = ctx.device.type == "cpu"
    for name in H.TARGETS:
        r, base = by.get(name), by.get(H.BASELINE)
        ctx.target(SUITE, f"{name} host-cost step time / {H.BASELINE} (goal on CPU: <= 1)",
                   r["median_ms"] / base["median_ms"] if r and base else None, 1.0, higher_is_better=False,
                   applies=cpu, stated_for="CPU")
        ctx.target(SUITE, f"{name} lowrank_kernels op calls per non-refresh step",
                   r["lk_ops"] if r else None, H.MAX_LK_OPS, higher_is_better=False, unit="", stated_for="any device")
        if name in H.ATEN_TARGETS:
            ctx.target(SUITE, f"{name} aten ops per non-refresh step",
                       r["aten_ops"] if r else None, H.MAX_ATEN_OPS, higher_is_better=False, unit="",
                       stated_for="any device")


def _derived(ctx: Ctx, name: str, steady: Row, refresh: Row, note: str, kw: dict) -> None:
    def amort(a, b):
        return (199 * a + b) / 200

    ctx.add(Row(suite=SUITE, kernel="step_gap200", provider=name, median_ms=amort(steady.median_ms, refresh.median_ms),
                p20_ms=amort(steady.p20_ms, refresh.p20_ms), p80_ms=amort(steady.p80_ms, refresh.p80_ms),
                note=note, **kw))


def _targets(ctx: Ctx) -> None:
    full = ctx.device.type == "cuda" and ctx.sizes.stack.layers == 4 and ctx.dtype == torch.bfloat16
    # The project's bar: not slower than the official package.
    # (No goal against fused AdamW: a projected step does two GEMMs that AdamW does not.)
    ctx.target(SUITE, "ours-GaLoreAdamW step (no refresh) vs galore-torch",
               ctx.ratio(SUITE, "step", "ours-GaLoreAdamW", "galore-torch"), 1.0, applies=full)


def plot(ctx: Ctx):
    panels = []
    for kernel, label in (("step", "step, no refresh (ms)"), ("refresh_step", "refresh step (ms)"),
                          ("step_gap200", "amortized step at gap 200 (ms)")):
        data = [(r.provider, r.median_ms) for r in ctx.rows
                if r.suite == SUITE and r.kernel == kernel and not r.skipped]
        panels.append((label, data))
    return [plot_bars(ctx, "step", panels, f"Optimizer step, {ctx.sizes.stack.label()}, rank {ctx.sizes.stack_rank}, "
                                            f"{ctx.dtype_name} ({ctx.device_name})")]



# --------------------------------------------------------------------------- bench/gpu_check.sh speed rows
# ``python -m bench.bench_step --gpu-check [--tiny] [--out FILE.csv]``: the step figures the
# GPU check reports, in one process and without the harness (so it fits its budget):
#   1. the 4-layer LLaMA-1B-shaped stack (rank 512): median step of torch's fused AdamW and of
#      ours (GaLore, DCT, Q-GaLore INT4) in the same run, no projector refresh (the refreshes
#      happen in the warm-up steps, with the randomized SVD to save time: the timed steps do the
#      same work either way), plus each step's host time (step() returning, no synchronization)
#      per parameter, on its own line;
#   2. like-for-like rows, printed as ratios with their goal next to them: ours with
#      ``moment_bits=16`` (bf16 moments) against fused AdamW on bf16 parameters (bf16 moments
#      too); ours with float32 moments (bf16 weights) against fused AdamW on float32 master
#      weights (float32 moments); the bucketed step (one grouped launch per bucket) against
#      ``foreach=False`` (one launch per parameter);
#   3. one 4096x11008 bf16 weight at rank 512: Q-GaLore's INT4-projector step over GaLore's
#      bf16-projector step (goal <= 1.15x, the quant suite's target).
# The goals are reported, not enforced (a timing threshold would fail on a busy machine); the
# check line ``check speed-rows:`` fails when a step fails or leaves a non-finite weight.
# GPU timing with CUDA events (median of the repetitions after warm-up); CPU (--tiny, tiny
# sizes) with perf_counter. Exit status 1 if a step fails or leaves a non-finite weight.

#: ratios the GPU check prints: (label, numerator row, denominator row, goal: at most this).
GPU_CHECK_RATIOS = (
    ("16-bit moments, bf16 weights: ours-GaLoreAdamW-16bit / torch-adamw-fused",
     "ours-GaLoreAdamW-16bit", "torch-adamw-fused", 1.0),
    ("16-bit moments, bf16 weights: ours-DCTAdamW-16bit / torch-adamw-fused",
     "ours-DCTAdamW-16bit", "torch-adamw-fused", 1.0),
    ("float32 moments: ours-GaLoreAdamW (bf16 weights) / torch-adamw-fused-fp32 (float32 master weights)",
     "ours-GaLoreAdamW", "torch-adamw-fused-fp32", 1.0),
    ("float32 moments: ours-DCTAdamW (bf16 weights) / torch-adamw-fused-fp32 (float32 master weights)",
     "ours-DCTAdamW", "torch-adamw-fused-fp32", 1.0),
    ("bucketed / per-parameter: ours-GaLoreAdamW / ours-GaLoreAdamW-per-param (foreach=False)",
     "ours-GaLoreAdamW", "ours-GaLoreAdamW-per-param", 1.0),
)
#: the quant suite's goal for the INT4-projector step over the 16-bit-projector step.
INT4_STEP_GOAL = 1.15


def _gpu_check_time(opt, device, reps: int):
    import statistics
    import time

    cuda = device.type == "cuda"
    dev_ms, host_ms = [], []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            dev_ms.append(start.elapsed_time(end))
        else:
            dev_ms.append((t1 - t0) * 1e3)
        host_ms.append((t1 - t0) * 1e3)
    q = statistics.quantiles(dev_ms, n=5) if len(dev_ms) >= 5 else [min(dev_ms)] * 4
    return statistics.median(dev_ms), q[0], q[3], statistics.median(host_ms)


def gpu_check(argv=None) -> int:
    import csv
    import warnings

    from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW, QGaLoreAdamW

    args, device = gpu_check_args("bench.bench_step", argv)
    if device is None:
        return 1
    dtype = torch.bfloat16
    if args.tiny:
        h, i, layers, rank, big, big_rank, reps = 32, 48, 1, 4, (64, 176), 8, args.reps or 3
    else:
        h, i, layers, rank, big, big_rank, reps = 2048, 5461, 4, 512, (4096, 11008), 512, args.reps or 20
    shapes = [(h, h)] * 4 * layers + [(i, h)] * 2 * layers + [(h, i)] * layers
    gen = torch.Generator(device=device).manual_seed(0)

    def params_for(shape_list, pdtype=dtype):
        ps = []
        for m, n in shape_list:
            p = torch.nn.Parameter((0.02 * torch.randn(m, n, device=device, generator=gen)).to(pdtype))
            p.grad = torch.randn(m, n, device=device, generator=gen).to(pdtype)
            ps.append(p)
        return ps

    def group(ps, r, **kw):
        return [dict(params=ps, rank=r, update_proj_gap=10**9, scale=0.25, proj_type="std", **kw)]

    builders = {
        "torch-adamw-fused": lambda ps, r: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, fused=True),
        "torch-adamw-fused-fp32": lambda ps, r: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, fused=True),
        "ours-GaLoreAdamW": lambda ps, r: GaLoreAdamW(group(ps, r), lr=1e-3, svd="lowrank"),
        "ours-GaLoreAdamW-16bit": lambda ps, r: GaLoreAdamW(group(ps, r, moment_bits=16), lr=1e-3, svd="lowrank"),
        "ours-GaLoreAdamW-per-param": lambda ps, r: GaLoreAdamW(group(ps, r, foreach=False), lr=1e-3, svd="lowrank"),
        "ours-DCTAdamW": lambda ps, r: DCTAdamW(group(ps, r), lr=1e-3),
        "ours-DCTAdamW-16bit": lambda ps, r: DCTAdamW(group(ps, r, moment_bits=16), lr=1e-3),
        "ours-QGaLoreAdamW-int4": lambda ps, r: QGaLoreAdamW(group(ps, r), lr=1e-3, svd="lowrank", quant=True),
    }
    #: float32 parameters (master weights) for these rows, bf16 for the others
    fp32_rows = {"torch-adamw-fused-fp32"}
    rows, failed = [], 0
    label = f"{layers}L-h{h}-i{i}"
    print(f"step: stack {label} ({sum(m * n for m, n in shapes) / 1e6:.4g}M params, {len(shapes)} matrices), "
          f"rank {rank}, {dtype}, {device}")

    def measure(what, name, ps, r, shape_label):
        nonlocal failed
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = builders[name](ps, r)
            opt.step()  # warm-up: state, first refresh, compilation
            opt.step()
            med, p20, p80, host = _gpu_check_time(opt, device, reps)
            finite = all(bool(torch.isfinite(p).all()) for p in ps)
        except Exception as e:  # noqa: BLE001 - reported as a failed row
            print(f"FAIL  {what} {name}: {type(e).__name__}: {str(e)[:300]}")
            failed += 1
            return None
        if not finite:
            print(f"FAIL  {what} {name}: non-finite weights after the steps")
            failed += 1
        row = dict(kernel=what, provider=name, shape=shape_label, rank=r,
                   dtype="fp32" if ps[0].dtype == torch.float32 else "bf16", device=str(device),
                   median_ms=round(med, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4), host_ms=round(host, 4),
                   host_us_per_param=round(host * 1e3 / len(ps), 3), n_params=len(ps))
        rows.append(row)
        del opt
        return row

    stack_rows = {}
    for name in builders:
        ps = params_for(shapes, torch.float32 if name in fp32_rows else dtype)
        stack_rows[name] = measure("step", name, ps, rank, label)
        del ps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = stack_rows.get("torch-adamw-fused")
    for name, row in stack_rows.items():
        if row is None:
            continue
        ratio = f"{row['median_ms'] / base['median_ms']:.3g}x torch-adamw-fused" if base else "no baseline"
        row["ratio"] = ratio
        print(f"step {name:24s} {row['median_ms']:9.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})  "
              f"{ratio}")
    for name, row in stack_rows.items():
        if row is not None:
            print(f"host time per parameter: {name} {row['host_us_per_param']:.2f} us "
                  f"(step() returns after {row['host_ms']:.3f} ms, {row['n_params']} parameters)")
    ratios = []
    for text, num, den, goal in GPU_CHECK_RATIOS:
        a, b = stack_rows.get(num), stack_rows.get(den)
        if a is None or b is None:
            print(f"speed {text}: not measured (a step failed)")
            continue
        ratio = a["median_ms"] / b["median_ms"]
        verdict = "met" if ratio <= goal else "missed"
        if device.type != "cuda" or args.tiny:
            verdict = "not measured on the target (tiny sizes / CPU)"
        ratios.append(f"{ratio:.3g}x")
        print(f"speed {text}: {ratio:.3f}x (goal <= {goal:g}x: {verdict}; "
              f"{a['median_ms']:.3f} ms / {b['median_ms']:.3f} ms)")

    big_label = f"{big[0]}x{big[1]}"
    pair = {}
    for name in ("ours-GaLoreAdamW", "ours-QGaLoreAdamW-int4"):
        ps = params_for([big])
        pair[name] = measure("step_single", name, ps, big_rank, big_label)
        del ps
    if all(pair.values()):
        ratio = pair["ours-QGaLoreAdamW-int4"]["median_ms"] / pair["ours-GaLoreAdamW"]["median_ms"]
        pair["ours-QGaLoreAdamW-int4"]["ratio"] = f"{ratio:.3g}x ours-GaLoreAdamW (bf16 projector)"
        pair["ours-GaLoreAdamW"]["ratio"] = "baseline"
        print(f"INT4-projector step / bf16-projector step at {big_label} rank {big_rank}: {ratio:.3f} "
              f"({pair['ours-QGaLoreAdamW-int4']['median_ms']:.3f} ms / {pair['ours-GaLoreAdamW']['median_ms']:.3f} ms; "
              f"goal <= {INT4_STEP_GOAL:g}x)")
        ratios.append(f"INT4 {ratio:.3g}x")
    if args.out and rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=cols)
            wr.writeheader()
            wr.writerows(rows)
    print(f"bench_step --gpu-check: {len(rows)} rows, {failed} failed")
    print(f"check speed-rows: {'fail' if failed else 'pass'} {len(rows)} rows measured, {failed} failed; "
          f"ratios {', '.join(ratios) or 'none'} (goals reported above, not enforced)")
    return 1 if failed else 0


if __name__ == "__main__":
    import sys

    sys.exit(gpu_check(sys.argv[1:]))
