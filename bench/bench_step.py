"""Suite ``step``: a whole optimizer step on a stack of LLaMA-1B-shaped layers (issue 3).

The stack (per layer 4 x 2048x2048, 2 x 5461x2048, 1 x 2048x5461; 4 layers = 201M
params on CUDA, one narrower layer on CPU) holds parameters with fixed random
gradients; every optimizer steps the same parameters. Kernels:

``step``          median step with no projector refresh (gap 10^9, after the first step)
``refresh_step``  median step that refreshes every projector (gap 1; at most 4 timed)
``step_gap200``   ``(199 x step + refresh_step) / 200``: derived from the two rows above

Providers: ``torch-adamw-fused`` (the baseline), ``torch-adamw-foreach``, the official
packages ``galore-torch`` and ``apollo-torch`` where importable, and ours
(``lowrank_kernels.optim``) as they exist. ``OPTIMIZERS`` is shared with the memory suite.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .harness import Ctx, Row, free_memory, plot_bars, progress, short, sync

SUITE = "step"
LR = 1e-3
BIG_GAP = 10 ** 9
BASELINE = "torch-adamw-fused"


def make_params(ctx: Ctx) -> List[torch.nn.Parameter]:
    """The stack's parameters, each with a fixed random gradient."""
    params = []
    for m, n in ctx.sizes.stack.shapes():
        p = torch.nn.Parameter((0.02 * torch.randn(m, n, device=ctx.device)).to(ctx.dtype))
        p.grad = torch.randn(m, n, device=ctx.device, dtype=ctx.dtype)
        params.append(p)
    return params


def _group(params, rank: int, gap: int, scale: float, **extra) -> List[dict]:
    return [dict(params=params, rank=rank, update_proj_gap=gap, scale=scale, proj_type="std", **extra)]


def _need(module: str, name: Optional[str] = None):
    """Import ``module`` (and its attribute ``name``) or raise ``Unavailable`` saying why."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure makes the provider unavailable
        raise Unavailable(f"cannot import {module} ({type(e).__name__}: {short(e, 100)})") from None
    if name is None:
        return mod
    obj = getattr(mod, name, None)
    if obj is None:
        raise Unavailable(f"{module}.{name} does not exist yet")
    return obj


class Unavailable(RuntimeError):
    """An optimizer that cannot be built here (package missing, API not there yet)."""


def _torch_adamw(kind: str):
    def build(params, rank, gap):
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, **{kind: True})
    return build


def _galore_torch(params, rank, gap):
    cls = _need("galore_torch", "GaLoreAdamW")
    return cls(_group(params, rank, gap, 0.25), lr=LR, weight_decay=0.0, no_deprecation_warning=True)


def _apollo_torch(params, rank, gap):
    cls = _need("apollo_torch", "APOLLOAdamW")
    return cls(_group(params, rank, gap, 1.0, proj="random", scale_type="channel"), lr=LR, weight_decay=0.0)


def _ours(name: str, scale: float = 0.25, **extra):
    def build(params, rank, gap):
        cls = _need("lowrank_kernels.optim", name)
        return cls(_group(params, rank, gap, scale, **extra), lr=LR, weight_decay=0.0)
    return build


def _ours_apollo_mini(params, rank, gap):
    cls = _need("lowrank_kernels.optim", "APOLLOAdamW")
    if not callable(getattr(cls, "mini", None)):
        raise Unavailable("APOLLOAdamW.mini does not exist yet")
    return cls.mini(_group(params, 1, gap, 128.0, scale_type="tensor"), lr=LR, weight_decay=0.0)


def _ours_frugal(params, rank, gap):
    cls = _need("lowrank_kernels.optim", "FrugalAdamW")
    density = rank / min(min(p.shape) for p in params)
    return cls(_group(params, rank, gap, 1.0, density=density), lr=LR, weight_decay=0.0)


# name -> (builder(params, rank, gap), low-rank?). Order = order in tables and plots.
OPTIMIZERS: Dict[str, Tuple[Callable, bool]] = {
    "torch-adamw-fused": (_torch_adamw("fused"), False),
    "torch-adamw-foreach": (_torch_adamw("foreach"), False),
    "galore-torch": (_galore_torch, True),
    "apollo-torch": (_apollo_torch, True),
    "ours-GaLoreAdamW": (_ours("GaLoreAdamW"), True),
    "ours-DCTAdamW": (_ours("DCTAdamW"), True),
    "ours-QGaLoreAdamW": (_ours("QGaLoreAdamW"), True),
    "ours-APOLLOAdamW": (_ours("APOLLOAdamW", scale=1.0, scale_type="channel"), True),
    "ours-APOLLO-Mini": (_ours_apollo_mini, True),
    "ours-FrugalAdamW": (_ours_frugal, True),
}


def build(ctx: Ctx, suite: str, name: str, params, gap: int, kw: dict):
    """The optimizer ``name`` on ``params``, or None after recording a skip row saying why."""
    builder, _ = OPTIMIZERS[name]
    try:
        return builder(params, ctx.sizes.stack_rank, gap)
    except Unavailable as e:
        ctx.skip(suite, "step" if suite == SUITE else "optimizer_state", name, str(e), **kw)
    except Exception as e:  # noqa: BLE001
        ctx.skip(suite, "step" if suite == SUITE else "optimizer_state", name,
                 f"constructor failed: {type(e).__name__}: {short(e)}", **kw)
    return None


def run(ctx: Ctx) -> None:
    stack = ctx.sizes.stack
    kw = dict(shape=stack.label(), rank=ctx.sizes.stack_rank)
    ctx.log(f"  step: stack {stack.label()} ({stack.numel / 1e6:.0f}M params), rank {ctx.sizes.stack_rank}")
    params = make_params(ctx)
    note = "QLinear weights not used here (plain float params)"
    for name in progress(OPTIMIZERS, "step", ctx):
        lowrank = OPTIMIZERS[name][1]
        ctx.log(f"  step {name}")
        opt = build(ctx, SUITE, name, params, BIG_GAP, kw)
        if opt is None:
            continue
        extra = dict(note=note) if name == "ours-QGaLoreAdamW" else {}
        steady = ctx.measure(SUITE, "step", name, opt.step, **kw, **extra)
        del opt
        free_memory(ctx.device, collect=True)
        refresh = None
        if lowrank and steady is not None:
            opt = build(ctx, SUITE, name, params, 1, kw)
            if opt is not None:
                # At most 4 timed refreshes: Q-GaLore's adaptive gap may double after 5 similar ones.
                refresh = ctx.measure(SUITE, "refresh_step", name, opt.step, **kw,
                                      time_kw=dict(min_reps=1, max_reps=4))
            del opt
            free_memory(ctx.device, collect=True)
        if steady is not None:
            if not lowrank:
                _derived(ctx, name, steady, steady, "no projector: every step costs the same", kw)
            elif refresh is not None:
                _derived(ctx, name, steady, refresh, "derived: (199 x step + refresh_step) / 200", kw)
    del params
    free_memory(ctx.device, collect=True)
    ctx.set_baseline(SUITE, BASELINE)
    _targets(ctx)


def _derived(ctx: Ctx, name: str, steady: Row, refresh: Row, note: str, kw: dict) -> None:
    def amort(a, b):
        return (199 * a + b) / 200

    ctx.add(Row(suite=SUITE, kernel="step_gap200", provider=name, median_ms=amort(steady.median_ms, refresh.median_ms),
                p20_ms=amort(steady.p20_ms, refresh.p20_ms), p80_ms=amort(steady.p80_ms, refresh.p80_ms),
                note=note, **kw))


def _targets(ctx: Ctx) -> None:
    full = ctx.device.type == "cuda" and ctx.sizes.stack.layers == 4 and ctx.dtype == torch.bfloat16
    ctx.target(SUITE, "ours-GaLoreAdamW step (no refresh) vs torch-adamw-fused",
               ctx.ratio(SUITE, "step", "ours-GaLoreAdamW", BASELINE), 1.0, applies=full)
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


__all__ = ["OPTIMIZERS", "build", "make_params", "run", "plot", "sync"]
