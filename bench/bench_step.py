"""Suite ``step``: a whole optimizer step on a stack of LLaMA-1B-shaped layers (issue 3).

The stack (per layer 4 x 2048x2048, 2 x 5461x2048, 1 x 2048x5461; 4 layers = 201M
params on CUDA, one narrower layer on CPU) holds parameters with fixed random
gradients; every optimizer steps the same parameters. Kernels:

``step``          median step with no projector refresh (gap 10^9, after the first step)
``refresh_step``  median step that refreshes every projector (a second optimizer with gap 1;
                  its first step, the state allocation included, counts: at most 4 timed)
``step_gap200``   ``(199 x step + refresh_step) / 200``: derived from the two rows above

Providers: ``torch-adamw-fused`` (the baseline), ``torch-adamw-foreach``, the official
packages ``galore-torch`` and ``apollo-torch`` where importable, and ours
(``lowrank_kernels.optim``) as they exist. The first two steps of each optimizer
(state allocation, first refresh, compilation) are the warm-up; they also give the
memory suite its figures (``bench/optimizers.py``).
"""
from __future__ import annotations

import torch

from . import optimizers as O
from .harness import Ctx, Row, free_memory, plot_bars, progress

SUITE = "step"


def run(ctx: Ctx) -> None:
    stack = ctx.sizes.stack
    kw = dict(shape=stack.label(), rank=ctx.sizes.stack_rank)
    ctx.log(f"  step: stack {stack.label()} ({stack.numel / 1e6:.3g}M params), rank {ctx.sizes.stack_rank}")
    params = O.make_params(ctx)
    memory = ctx.shared.setdefault("optimizer_memory", {})
    for name in progress(O.OPTIMIZERS, "step", ctx):
        lowrank = O.OPTIMIZERS[name][1]
        ctx.log(f"  step {name}")
        opt = O.build(ctx, SUITE, "step", name, params, O.BIG_GAP, kw)
        if opt is None:
            continue
        note = "plain float params (no QLinear)" if name == "ours-QGaLoreAdamW" else ""
        try:
            ctx.check_budget()
            memory[name] = O.first_steps(ctx, opt)  # warm-up: state allocation, first refresh, compilation
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
    ctx.set_baseline(SUITE, O.BASELINE)
    _targets(ctx)


def _derived(ctx: Ctx, name: str, steady: Row, refresh: Row, note: str, kw: dict) -> None:
    def amort(a, b):
        return (199 * a + b) / 200

    ctx.add(Row(suite=SUITE, kernel="step_gap200", provider=name, median_ms=amort(steady.median_ms, refresh.median_ms),
                p20_ms=amort(steady.p20_ms, refresh.p20_ms), p80_ms=amort(steady.p80_ms, refresh.p80_ms),
                note=note, **kw))


def _targets(ctx: Ctx) -> None:
    full = ctx.device.type == "cuda" and ctx.sizes.stack.layers == 4 and ctx.dtype == torch.bfloat16
    # Not an issue's target: the project's own bar, not slower than the official package.
    # (No goal against fused AdamW: a projected step does two GEMMs that AdamW does not.)
    ctx.target(SUITE, "ours-GaLoreAdamW step (no refresh) vs galore-torch (project goal, not from an issue)",
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

