"""Suite ``memory``: optimizer-state bytes per optimizer on the step suite's stack.

``optimizer_state``
    Bytes of every tensor the optimizer holds after two steps (moments, projectors,
    indices, seeds, step counters), found by walking ``optimizer.state`` including the
    attributes of Python objects kept there (galore-torch keeps a projector object);
    each storage is counted once.
``peak_extra_first_step`` / ``peak_extra_step`` (CUDA only)
    ``torch.cuda.max_memory_allocated`` during the first step (state allocation and
    projector refresh) and during a later step, above what was allocated before it:
    the transient workspace an optimizer needs on top of its state.

``mem_ratio`` is against ``torch-adamw-fused``. When the step suite ran first, its
warm-up steps supplied these figures (the same optimizer, the same two steps).

Every optimizer of ours is measured with each moment format (``moment_bits`` 32, 16, 8: rows
``<name>``, ``<name>-16bit``, ``<name>-8bit``; see ``bench/optimizers.py``); the note of each
row of ours counts its ``exp_avg`` / ``exp_avg_sq`` tensors by dtype, so a table shows which
format the bytes were measured with. ``python -m bench.readme`` turns these rows into the
README's state-size table (optimizer x moment format).
"""
from __future__ import annotations

import torch

from . import optimizers as O
from .harness import Ctx, Row, fmt_bytes, free_memory, plot_bars, progress, short

SUITE = "memory"


def run(ctx: Ctx) -> None:
    stack = ctx.sizes.stack
    kw = dict(shape=stack.label(), rank=ctx.sizes.stack_rank)
    measured = ctx.shared.get("optimizer_memory", {})
    params = None
    for name in progress(O.names_for(SUITE), "memory", ctx):
        mem = measured.get(name)
        if mem is None:
            if params is None:
                params = O.make_params(ctx)
            opt = O.build(ctx, SUITE, "optimizer_state", name, params, O.BIG_GAP, kw)
            if opt is None:
                continue
            try:
                ctx.check_budget()
                mem = O.first_steps(ctx, opt, name)
            except Exception as e:  # noqa: BLE001
                ctx.skip(SUITE, "optimizer_state", name, f"{type(e).__name__}: {short(e)}", **kw)
                continue
            finally:
                del opt
                free_memory(ctx.device, collect=True)
        pbytes = sum(m * n for m, n in stack.shapes()) * ctx.esize
        note = "; ".join(x for x in (f"params {fmt_bytes(pbytes)}", mem.get("format_note", "")) if x)
        ctx.add(Row(suite=SUITE, kernel="optimizer_state", provider=name, bytes=mem["state_bytes"], note=note, **kw))
        if mem["peak_first"] is not None:
            ctx.add(Row(suite=SUITE, kernel="peak_extra_first_step", provider=name, bytes=mem["peak_first"], **kw))
            ctx.add(Row(suite=SUITE, kernel="peak_extra_step", provider=name, bytes=mem["peak_step"], **kw))
    del params
    free_memory(ctx.device, collect=True)
    ctx.set_baseline(SUITE, O.BASELINE)
    # galore-torch keeps its moments in the parameters' dtype; ours keep float32 by default, so with
    # bfloat16 parameters the like-for-like row is ours with 16-bit (bfloat16) moments.
    ours = "ours-GaLoreAdamW-16bit" if ctx.dtype == torch.bfloat16 else "ours-GaLoreAdamW"
    what = " (bfloat16 moments, as galore-torch's here)" if ours.endswith("-16bit") else ""
    ctx.target(SUITE, f"{ours} optimizer-state bytes / galore-torch's{what}",
               ctx.ratio(SUITE, "optimizer_state", ours, "galore-torch", memory=True), 1.0,
               higher_is_better=False)


def plot(ctx: Ctx):
    panels = []
    for kernel, label in (("optimizer_state", "optimizer state (MiB)"),
                          ("peak_extra_step", "peak extra memory of a step (MiB)")):
        data = [(r.provider, r.bytes / 2 ** 20) for r in ctx.rows
                if r.suite == SUITE and r.kernel == kernel and not r.skipped and r.bytes is not None]
        panels.append((label, data))
    return [plot_bars(ctx, "memory", panels, f"Optimizer memory, {ctx.sizes.stack.label()}, rank "
                                              f"{ctx.sizes.stack_rank}, {ctx.dtype_name} ({ctx.device_name})")]
