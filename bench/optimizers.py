"""The optimizers the step and memory suites compare, on one stack of parameters.

``OPTIMIZERS`` maps a provider name to its builder and whether it projects. (q-galore-torch's
optimizer is not among them: its ``AdamW8bit`` needs a bitsandbytes of its own era
(``KeyError: 'percentile_clipping'`` with bitsandbytes 0.50); its INT4 projector
quantizer is measured in the quant suite.) Each
optimizer is built once per run on the stack (``make_params``) and first stepped by
:func:`first_steps`, which also records the memory figures the memory suite reports
(so the slow SVD refreshes of the SVD-based methods run once for both suites).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .harness import Ctx, short, sync

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
    cls = _need("lowrank_kernels.optim", "FrugalAdamW")  # SVD subspace + signSGD on the residual
    return cls(_group(params, rank, gap, 1.0), lr=LR, weight_decay=0.0)


def _ours_adafactor(params, rank, gap):
    cls = _need("lowrank_kernels.optim", "GaLoreAdafactor")  # HF Trainer's settings: external lr, no scaling
    return cls(_group(params, rank, gap, 0.25), lr=LR, relative_step=False, scale_parameter=False)


class _OwLoreStep:
    """GaLoreAdamW behind OwLore's :class:`~lowrank_kernels.owlore.LayerSampler` (``state="drop"``),
    on its own copy of the stack (the suites share one parameter list with fixed gradients,
    which freezing layers and dropping their gradients would change for the other providers).

    The stack's weights are grouped into its LLaMA layers (7 per layer); ``gamma`` is half of
    them (at least 1), re-drawn every step (``period=1``, uniform probabilities) so the
    timing covers state being dropped and rebuilt. Before each step the active layers get
    their fixed gradients back (the sampler drops frozen layers' gradients). ``step()`` and
    ``state`` are what the step and memory suites use. With a one-layer stack (the CPU sizes)
    every step trains that layer: the row then equals GaLore by construction.
    """

    def __init__(self, params, rank, gap):
        opt_cls = _need("lowrank_kernels.optim", "GaLoreAdamW")
        sampler_cls = _need("lowrank_kernels.owlore", "LayerSampler")
        own = []
        for p in params:
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad.detach().clone()
            own.append(q)
        self._grads = {q: q.grad for q in own}
        L = max(1, len(own) // 7)
        per_layer = [[] for _ in range(L)]
        for i, q in enumerate(own):  # Stack.shapes(): 4L x (h, h), then 2L x (i, h), then L x (h, i)
            layer = i // 4 if i < 4 * L else (i - 4 * L) // 2 if i < 6 * L else i - 6 * L
            per_layer[min(layer, L - 1)].append(q)
        self.layers = torch.nn.ModuleList(torch.nn.ParameterList(ps) for ps in per_layer)
        self.optimizer = opt_cls(_group(own, rank, gap, 0.25), lr=LR, weight_decay=0.0)
        self.sampler = sampler_cls(self.layers, None, gamma=max(1, L // 2), period=1, seed=111,
                                   state="drop", optimizer=self.optimizer)
        self._t = 0

    @property
    def state(self):
        return self.optimizer.state

    def step(self):
        self.sampler.on_step(self._t)
        self._t += 1
        for q, g in self._grads.items():
            if q.requires_grad and q.grad is None:
                q.grad = g
        self.optimizer.step()


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
    "ours-GradNormLoRPAdamW": (_ours("GradNormLoRPAdamW", scale=1.0), True),
    "ours-GaLoreAdafactor": (_ours_adafactor, True),
    "ours-GaLore+OwLore": (_OwLoreStep, True),
}


def build(ctx: Ctx, suite: str, kernel: str, name: str, params, gap: int, kw: dict):
    """The optimizer ``name`` on ``params``, or None after recording a skip row saying why."""
    builder, _ = OPTIMIZERS[name]
    try:
        return builder(params, ctx.sizes.stack_rank, gap)
    except Unavailable as e:
        ctx.skip(suite, kernel, name, str(e), **kw)
    except Exception as e:  # noqa: BLE001
        ctx.skip(suite, kernel, name, f"constructor failed: {type(e).__name__}: {short(e)}", **kw)
    return None


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


def first_steps(ctx: Ctx, opt: torch.optim.Optimizer) -> dict:
    """Take the optimizer's first two steps; return its state bytes and (CUDA) peak extra memory of each."""
    cuda = ctx.device.type == "cuda"
    peaks = []
    for _ in range(2):
        if cuda:
            sync(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
            before = torch.cuda.memory_allocated(ctx.device)
        opt.step()
        sync(ctx.device)
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated(ctx.device) - before)
    return dict(state_bytes=state_bytes(opt), peak_first=peaks[0] if cuda else None,
                peak_step=peaks[1] if cuda else None)
