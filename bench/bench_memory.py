"""Suite ``memory``: optimizer-state bytes per optimizer on the step suite's stack (issues 3, 6).

``optimizer_state``
    Bytes of every tensor the optimizer holds after two steps (moments, projectors,
    indices, seeds, step counters), found by walking ``optimizer.state`` including the
    attributes of Python objects kept there (galore-torch keeps a projector object);
    each storage is counted once.
``peak_extra_first_step`` / ``peak_extra_step`` (CUDA only)
    ``torch.cuda.max_memory_allocated`` during the first step (state allocation and
    projector refresh) and during a later step, above what was allocated before it:
    the transient workspace an optimizer needs on top of its state.

``mem_ratio`` is against ``torch-adamw-fused``.
"""
from __future__ import annotations

import torch

from . import bench_step as S
from .harness import Ctx, Row, fmt_bytes, free_memory, plot_bars, progress, short, sync

SUITE = "memory"


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of every tensor reachable from ``opt.state`` (4 levels of objects deep)."""
    seen = set()
    seen_obj = set()

    def walk(x, depth: int) -> int:
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            key = (st.data_ptr(), x.device) if st.data_ptr() else ("t", id(x))
            if key in seen:
                return 0
            seen.add(key)
            return st.nbytes() if st.data_ptr() else x.numel() * x.element_size()
        if depth > 4 or id(x) in seen_obj or isinstance(x, (str, bytes, int, float, bool, type(None))):
            return 0
        seen_obj.add(id(x))
        if isinstance(x, dict):
            return sum(walk(v, depth + 1) for v in x.values())
        if isinstance(x, (list, tuple, set)):
            return sum(walk(v, depth + 1) for v in x)
        if isinstance(x, (torch.nn.Module, torch.optim.Optimizer)):
            return 0
        d = getattr(x, "__dict__", None)
        return sum(walk(v, depth + 1) for v in d.values()) if d else 0

    return sum(walk(s, 0) for s in opt.state.values())


def run(ctx: Ctx) -> None:
    stack = ctx.sizes.stack
    kw = dict(shape=stack.label(), rank=ctx.sizes.stack_rank)
    cuda = ctx.device.type == "cuda"
    params = S.make_params(ctx)
    pbytes = sum(p.numel() * p.element_size() for p in params)
    ctx.log(f"  memory: stack {stack.label()}, params {fmt_bytes(pbytes)}")
    for name in progress(S.OPTIMIZERS, "memory", ctx):
        try:
            ctx.check_budget()
        except Exception as e:  # noqa: BLE001
            ctx.skip(SUITE, "optimizer_state", name, str(e), **kw)
            continue
        opt = S.build(ctx, SUITE, name, params, S.BIG_GAP, kw)
        if opt is None:
            continue
        try:
            peaks = []
            for _ in range(2):
                if cuda:
                    sync(ctx.device)
                    torch.cuda.reset_peak_memory_stats(ctx.device)
                    before = torch.cuda.memory_allocated(ctx.device)
                opt.step()
                if cuda:
                    sync(ctx.device)
                    peaks.append(torch.cuda.max_memory_allocated(ctx.device) - before)
            nbytes = state_bytes(opt)
        except Exception as e:  # noqa: BLE001
            ctx.skip(SUITE, "optimizer_state", name, f"step failed: {type(e).__name__}: {short(e)}", **kw)
            del opt
            free_memory(ctx.device, collect=True)
            continue
        ctx.add(Row(suite=SUITE, kernel="optimizer_state", provider=name, bytes=nbytes,
                    note=f"params {fmt_bytes(pbytes)}", **kw))
        if cuda:
            ctx.add(Row(suite=SUITE, kernel="peak_extra_first_step", provider=name, bytes=peaks[0], **kw))
            ctx.add(Row(suite=SUITE, kernel="peak_extra_step", provider=name, bytes=peaks[1], **kw))
        del opt
        free_memory(ctx.device, collect=True)
    del params
    free_memory(ctx.device, collect=True)
    ctx.set_baseline(SUITE, S.BASELINE)
    ctx.target(SUITE, "ours-GaLoreAdamW optimizer-state bytes vs galore-torch (ratio)",
               ctx.ratio(SUITE, "optimizer_state", "ours-GaLoreAdamW", "galore-torch", memory=True), 1.0,
               higher_is_better=False, applies=True)


def plot(ctx: Ctx):
    panels = []
    for kernel, label in (("optimizer_state", "optimizer state (MiB)"),
                          ("peak_extra_step", "peak extra memory of a step (MiB)")):
        data = [(r.provider, r.bytes / 2 ** 20) for r in ctx.rows
                if r.suite == SUITE and r.kernel == kernel and not r.skipped and r.bytes is not None]
        panels.append((label, data))
    return [plot_bars(ctx, "memory", panels, f"Optimizer memory, {ctx.sizes.stack.label()}, rank "
                                              f"{ctx.sizes.stack_rank}, {ctx.dtype_name} ({ctx.device_name})")]
