"""The optimizers the step and memory suites compare, on one stack of parameters.

``OPTIMIZERS`` maps a provider name to its builder and whether it projects. Every optimizer of
ours that takes the ``moment_bits`` group key also appears as ``<name>-16bit``
(bfloat16 moments, stochastic rounding) and ``<name>-8bit`` (uint8 block-wise codes with
float32 absmax per block); :data:`MOMENT_VARIANTS` maps each such name to its base and its
``moment_bits``. ``ours-AdamW`` is a plain group (``rank=None``) of ours, the full-rank Adam
our optimizers give every non-projected parameter, so its ``-8bit`` row compares with
``bitsandbytes-adamw8bit``. The step suite times 32- and 8-bit rows; the memory suite measures
all three formats (16-bit bfloat16 moments for every parameter dtype, float32 included). A ``-8bit`` / ``-16bit`` row whose state does not hold the format it asked
for (an optimizer without the key yet) is a skip row saying so, never a number; moments
smaller than ``min_8bit_size`` (default 4096 elements, e.g. APOLLO-Mini's rank-1 moments on
the CPU stack) stay float32 by design, and the row's note counts them. (q-galore-torch's
optimizer is not among them: its ``AdamW8bit`` needs a bitsandbytes of its own era
(``KeyError: 'percentile_clipping'`` with bitsandbytes 0.50); its INT4 projector
quantizer is measured in the quant suite.) Each
optimizer is built once per run on the stack (``make_params``) and first stepped by
:func:`first_steps`, which also records the memory figures the memory suite reports
(so the slow SVD refreshes of the SVD-based methods run once for both suites).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from lowrank_kernels.optim import state_nbytes

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


# Every builder below is ``builder(params, rank, gap, **keys)``: ``keys`` are extra group keys
# (the moment format of the ``-8bit`` / ``-16bit`` variants); builders of other packages take none.


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


def _fira_pkg(params, rank, gap):
    """The ``fira`` package's FiraAdamW (its group key for the scale is ``alpha``): the reference for ``ours-FiraAdamW``."""
    cls = _need("fira", "FiraAdamW")
    return cls([dict(params=params, rank=rank, update_proj_gap=gap, alpha=0.25, proj_type="std")], lr=LR,
               weight_decay=0.0, no_deprecation_warning=True)


def _bnb_adamw8bit(params, rank, gap):
    """bitsandbytes' full-rank 8-bit AdamW (its CPU path is used on a CPU): the reference for ``ours-AdamW-8bit``."""
    cls = _need("bitsandbytes.optim", "AdamW8bit")
    return cls(params, lr=LR, weight_decay=0.0)


def _galore_torch_8bit(params, rank, gap):
    """galore-torch's GaLoreAdamW8bit (bitsandbytes underneath; it synchronizes CUDA, so CUDA only)."""
    cls = _need("galore_torch", "GaLoreAdamW8bit")
    if not torch.cuda.is_available():
        raise Unavailable("galore_torch.GaLoreAdamW8bit calls torch.cuda.synchronize (CUDA only)")
    return cls(_group(params, rank, gap, 0.25), lr=LR, weight_decay=0.0)


def _spec(name: str):
    """The registered optimizer ``name`` (:mod:`lowrank_kernels.optim.registry`), its class importable."""
    registry = _need("lowrank_kernels.optim.registry")
    spec = registry.get(name)
    try:
        spec.cls
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"{spec.target} does not exist yet ({type(e).__name__})") from None
    return spec


def _ours(name: str, **kwargs):
    """Registered optimizer ``name`` on the stack, one low-rank group (its own defaults for the
    scale and a preset's rank, e.g. APOLLO-Mini's 1); ``kwargs`` go to the constructor."""
    def build(params, rank, gap, **keys):
        spec = _spec(name)
        if spec.constructor is not None:
            rank = spec.defaults.get("rank", rank)
        group = _group(params, rank, gap, spec.defaults.get("scale", 1.0), **keys)
        if "update_proj_gap" not in spec.defaults:  # no refresh schedule (Trion re-selects every step)
            del group[0]["update_proj_gap"]
        return spec.build(group, lr=LR, weight_decay=0.0, **kwargs)
    return build


def _ours_plain(params, rank, gap, **keys):
    """A plain group of ours (``rank=None``): full-rank AdamW on every parameter, as our optimizers
    step the parameters they do not project (the 'no low-rank group' warning is expected here)."""
    import warnings

    spec = _spec("galore")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spec.build([dict(params=params, rank=None, density=None, **keys)], lr=LR, weight_decay=0.0)


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


def _ours_table() -> Dict[str, Tuple[Callable, bool, bool]]:
    """Ours, in table order: (builder, low-rank?, also with 16- and 8-bit moments?). Every
    projecting optimizer of the registry as ``ours-<label>`` (with the moment-format rows when
    it has the formats), between the bench's own rows: the plain group of ours first, then
    GaLore-Adafactor with a first moment (its moment format applies to that moment) and
    GaLore behind OwLore's layer sampler."""
    from lowrank_kernels.optim import registry

    table: Dict[str, Tuple[Callable, bool, bool]] = {"ours-AdamW": (_ours_plain, False, True)}
    for name in registry.names(lowrank=True):
        spec = registry.get(name)
        table["ours-" + spec.label] = (_ours(name), True, len(spec.capabilities.moment_bits) > 1)
    table["ours-GaLoreAdafactor-beta1"] = (_ours("adafactor", beta1=0.9), True, True)
    table["ours-GaLore+OwLore"] = (_OwLoreStep, True, False)
    return table


_OURS = _ours_table()
#: ``moment_bits`` of the non-default moment formats, and the provider-name suffix of each.
MOMENT_FORMATS = {16: "-16bit", 8: "-8bit"}


def _with_bits(builder: Callable, bits: int) -> Callable:
    def build(params, rank, gap, **keys):
        return builder(params, rank, gap, moment_bits=bits, **keys)
    build.moment_bits = bits
    return build


# name -> (builder(params, rank, gap), low-rank?). Order = order in tables and plots.
OPTIMIZERS: Dict[str, Tuple[Callable, bool]] = {
    "torch-adamw-fused": (_torch_adamw("fused"), False),
    "torch-adamw-foreach": (_torch_adamw("foreach"), False),
    "bitsandbytes-adamw8bit": (_bnb_adamw8bit, False),
    "galore-torch": (_galore_torch, True),
    "galore-torch-8bit": (_galore_torch_8bit, True),
    "apollo-torch": (_apollo_torch, True),
    "fira": (_fira_pkg, True),
}
#: provider name -> (its 32-bit base provider, moment_bits) for every row of ours with a moment format.
MOMENT_VARIANTS: Dict[str, Tuple[str, int]] = {}
for _name, (_builder, _lowrank, _variants) in _OURS.items():
    OPTIMIZERS[_name] = (_builder, _lowrank)
    if _variants:
        MOMENT_VARIANTS[_name] = (_name, 32)
        for _bits, _suffix in MOMENT_FORMATS.items():
            OPTIMIZERS[_name + _suffix] = (_with_bits(_builder, _bits), _lowrank)
            MOMENT_VARIANTS[_name + _suffix] = (_name, _bits)
del _name, _builder, _lowrank, _variants, _bits, _suffix

# Moment formats each suite runs: the step suite times the default and the 8-bit rows only (a
# CPU run is long enough); the memory suite measures every format.
SUITE_BITS = {"step": (32, 8), "memory": (32, 16, 8)}
#: group key of the tiny smoke run: its moments (a few hundred elements) are below the default
#: ``min_8bit_size`` (4096), so the run lowers it to exercise the 8-bit path.
TINY_KEYS = {"min_8bit_size": 1}


def moment_bits_of(name: str) -> int:
    """The provider's ``moment_bits`` (32 for every provider without a moment format)."""
    return MOMENT_VARIANTS.get(name, (name, 32))[1]


def names_for(suite: str) -> List[str]:
    """The providers ``suite`` runs, in table order."""
    bits = SUITE_BITS[suite]
    return [n for n in OPTIMIZERS if moment_bits_of(n) in bits]


def build(ctx: Ctx, suite: str, kernel: str, name: str, params, gap: int, kw: dict):
    """The optimizer ``name`` on ``params``, or None after recording a skip row saying why."""
    builder, _ = OPTIMIZERS[name]
    keys = dict(TINY_KEYS) if ctx.tiny and moment_bits_of(name) == 8 else {}
    try:
        return builder(params, ctx.sizes.stack_rank, gap, **keys)
    except Unavailable as e:
        ctx.skip(suite, kernel, name, str(e), **kw)
    except Exception as e:  # noqa: BLE001
        ctx.skip(suite, kernel, name, f"constructor failed: {type(e).__name__}: {short(e)}", **kw)
    return None


MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_FORMAT_DTYPE = {8: torch.uint8, 16: torch.bfloat16}


def _moments(opt: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [t for st in opt.state.values() if isinstance(st, dict)
            for k in MOMENT_KEYS if isinstance(t := st.get(k), torch.Tensor)]


def moment_summary(opt: torch.optim.Optimizer) -> Dict[torch.dtype, int]:
    """How many ``exp_avg`` / ``exp_avg_sq`` state tensors of each dtype the optimizer holds."""
    out: Dict[torch.dtype, int] = {}
    for t in _moments(opt):
        out[t.dtype] = out.get(t.dtype, 0) + 1
    return out


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_format(name: str, opt: torch.optim.Optimizer, min_8bit_size: int = 4096) -> str:
    """The note on ``name``'s moment format after its first steps (e.g. ``moments: 14 uint8``).

    Raises :class:`Unavailable` when a ``-16bit`` provider holds a moment that is not bfloat16, or
    a ``-8bit`` provider a moment of ``min_8bit_size`` elements or more that is not uint8 (an
    optimizer without the ``moment_bits`` key, or one that ignores it), so that no number is
    reported under a format that was not used. Smaller moments and moments with one-element rows
    stay float32 by design (the note counts them)."""
    bits = moment_bits_of(name)
    moments = _moments(opt)
    if not moments:
        if bits != 32:
            raise Unavailable(f"the optimizer holds no exp_avg / exp_avg_sq state here, so moment_bits={bits} "
                              "changes nothing (the row would repeat the float32 one)")
        return ""
    note = "moments: " + ", ".join(f"{n} {_dt(dt)}" for dt, n in moment_summary(opt).items())
    if bits == 32:
        return note
    want = _FORMAT_DTYPE[bits]
    # 8-bit exempts what the optimizers keep in float32 by design: fewer than min_8bit_size
    # elements, or rows of one element (APOLLO-Mini's rank 1: codes + absmax would be larger)
    wrong = [t for t in moments if t.dtype != want
             and (bits == 16 or (t.numel() >= min_8bit_size and t.dim() >= 1 and t.shape[-1] > 1))]
    if wrong:
        raise Unavailable(f"moment_bits={bits} left {len(wrong)} moment(s) in {_dt(wrong[0].dtype)} ({note}): "
                          "the optimizer does not apply moment_bits here")
    if bits == 8 and want not in moment_summary(opt):
        note += (f" (every moment has fewer than min_8bit_size={min_8bit_size} elements or one-element rows: "
                 "kept float32)")
    return note


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Deprecated: :func:`lowrank_kernels.optim.state_nbytes` (the one state counter)."""
    warnings.warn("bench.optimizers.state_bytes is deprecated; use lowrank_kernels.optim.state_nbytes",
                  DeprecationWarning, stacklevel=2)
    return state_nbytes(opt)


def first_steps(ctx: Ctx, opt: torch.optim.Optimizer, name: Optional[str] = None) -> dict:
    """Take the optimizer's first two steps; return its state bytes, (CUDA) peak extra memory of each,
    and the note on its moment format (:func:`check_format`, which raises :class:`Unavailable` for a
    ``-8bit`` / ``-16bit`` provider whose state is not in that format)."""
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
    small = TINY_KEYS["min_8bit_size"] if ctx.tiny else 4096
    note = check_format(name, opt, small) if name is not None else ""
    return dict(state_bytes=state_nbytes(opt), peak_first=peaks[0] if cuda else None,
                peak_step=peaks[1] if cuda else None, format_note=note)
