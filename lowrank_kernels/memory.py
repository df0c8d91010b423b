"""Memory planner: how many bytes each optimizer needs on a model, without allocating it.

``python -m lowrank_kernels.memory --model-preset llama-7b --optimizers adamw,galore,dct --rank 1024``
(or ``--config CONFIG.json``, any Hugging Face causal-LM ``config.json``) builds the model on
the ``meta`` device (shapes and dtypes, no storage), gives every trainable parameter a meta
gradient, builds each optimizer with this package's usual param groups
(:func:`lowrank_kernels.optim.lowrank_param_groups`) and takes **one real optimizer step
on the meta tensors**: the optimizers' own state code runs (state init, projector refresh,
the projected step), so the state is exactly what a first step on real tensors creates,
with shapes and dtypes and no data. Then it reports, per optimizer:

``weights``
    bytes of the model's parameters and buffers (each storage once). For ``qgalore`` the
    attention/MLP Linear layers are first converted to INT8
    (:func:`lowrank_kernels.nn.quantize_linear_layers`, Q-GaLore's recipe), so its weights
    are counted as INT8 values plus the per-group float32 scale/minimum.
``gradients``
    one gradient per trainable parameter in its dtype; with ``--layerwise``
    (:func:`lowrank_kernels.optim.layerwise`: each parameter is stepped inside backward and
    its gradient freed) only the largest single parameter's gradient.
``optimizer_state``
    bytes of every tensor in the optimizer state after the first step (moments,
    projectors, DCT indices, APOLLO seeds, step counters: host-side scalars included),
    each storage once.
``total``
    the sum of the three. Activations and transient workspace are not included.

``--moment-bits 16|8`` (:func:`plan`'s ``moment_bits``) sets the ``moment_bits`` group key
of this package's optimizers (bfloat16 or 8-bit blockwise moments, see
:mod:`lowrank_kernels.optim.base`; 8-bit moments below ``min_8bit_size`` = 4096 elements
stay float32); the figure is again what their first step creates (uint8 codes plus float32
block maxima). The ``adamw`` row is ``torch.optim.AdamW`` and keeps its own moments.

How the step runs on meta tensors (the seams, all inside :func:`meta_step_seams`):

- the low-rank groups get ``skip_nonfinite=False`` (the non-finite check reads gradient
  norms back to the host, which meta tensors cannot do; it creates no state);
- host reads of a meta tensor's value (``bool(...)``, ``int(...)``: the "is the new
  projector finite" check after an SVD) answer ``True`` / 1 through a
  ``TorchDispatchMode`` instead of raising; ``torch.linalg.svd`` and this package's ops
  have meta (fake) kernels, so the projector tensors come out with their real shapes and
  dtypes without being computed;
- ``torch.Generator(device="meta")`` (APOLLO's seeded projection, FRUGAL's random
  subspaces) is given a CPU generator: meta ``randn`` takes one and draws nothing.

:func:`plan` is the library entry point; the test suite checks that its state figure
equals the state bytes of a real first step on a small CPU LLaMA, for every optimizer.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_kernels.optim import registry as _registry
from lowrank_kernels.optim.registry import optimizers_of, state_nbytes, tensors_nbytes  # noqa: F401

#: GaLore paper model configs (github.com/jiaweizzhao/GaLore, configs/llama_*.json):
#: vocabulary 32000, RMSNorm eps 1e-6, SiLU MLP, untied embeddings.
PRESETS: Dict[str, Dict[str, int]] = {
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
}
PRESET_COMMON = dict(vocab_size=32000, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

#: The Linear layers the low-rank methods project (the GaLore / APOLLO scripts' choice).
TARGET_MODULES = ("attn", "mlp")
LR = 1e-3
GAP = 200


# --------------------------------------------------------------------------- models
def preset_config(name: str):
    """A ``transformers.LlamaConfig`` for a preset name (see :data:`PRESETS`)."""
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"model preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return LlamaConfig(**PRESET_COMMON, **PRESETS[name])


def load_config(path: str):
    """A transformers config from a ``config.json`` (any causal-LM ``model_type``; default llama)."""
    from transformers import AutoConfig

    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"config {path!r}: expected a JSON object")
    d.pop("architectures", None)
    model_type = d.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **d)


def build_model(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "meta") -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` built on ``device`` (meta: no storage), in ``dtype``."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    # torch's device context redirects only the factory functions it cached on first use: if
    # that happened while e.g. torch.empty was monkeypatched (a test fixture), the Linear and
    # Embedding weights land on the default device. Move any such tensor; shapes and dtypes stay.
    if any(t.device != device for t in list(model.parameters()) + list(model.buffers())):
        model = model.to(device)
    return model.to(dtype)


# --------------------------------------------------------------------------- optimizers
@dataclass
class Method:
    """How the planner (and its test) builds one optimizer on a model."""

    groups: Callable[[nn.Module, int], List[Dict[str, Any]]]
    factory: Callable[[List[Dict[str, Any]]], torch.optim.Optimizer]
    prepare: Optional[Callable[[nn.Module], Any]] = None  # model change before the groups (Q-GaLore's INT8 weights)
    note: str = ""


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _quantize(model):
    from lowrank_kernels.nn.qlinear import quantize_linear_layers

    return quantize_linear_layers(model, TARGET_MODULES)


#: Planner-only facts per registered name: a model change before the groups, and a note.
_PREPARE: Dict[str, Callable[[nn.Module], Any]] = {"qgalore": _quantize}
_NOTES = {
    "adamw": "torch.optim.AdamW on every parameter",
    "qgalore": "attn/mlp weights INT8 (QLinear), counted as such",
    "apollo-mini": "rank 1, tensor-wise scaling",
    "frugal": "rank as given (not density)",
    "adafactor": "GaLoreAdafactor, beta1=None",
}


def _method_of(spec) -> Method:
    """How the planner builds the registered optimizer ``spec``: this package's usual param
    groups (:func:`~lowrank_kernels.optim.lowrank_param_groups` on :data:`TARGET_MODULES`,
    ``update_proj_gap`` :data:`GAP`; a preset constructor such as APOLLO-Mini's sets its own
    rank) or, for a full-rank baseline, one group of every trainable parameter."""
    if spec.lowrank:
        preset_rank = spec.constructor is not None

        def groups(model, rank):
            from lowrank_kernels.optim import lowrank_param_groups

            return lowrank_param_groups(model, TARGET_MODULES, rank=None if preset_rank else rank, update_proj_gap=GAP)
    else:
        def groups(model, rank):
            return [{"params": _trainable(model)}]
    return Method(groups, lambda gs: spec.build(gs, lr=LR), prepare=_PREPARE.get(spec.name),
                  note=_NOTES.get(spec.name, ""))


#: name -> how the planner builds it, for every optimizer of :mod:`lowrank_kernels.optim.registry`.
METHODS: Dict[str, Method] = {name: _method_of(spec) for name, spec in _registry.OPTIMIZERS.items()}


def _ours(name: str) -> bool:
    """Whether ``name`` is an optimizer of this package (the ``moment_bits`` key applies)."""
    return _registry.get(name).target.startswith("lowrank_kernels.")


def build_optimizer(name: str, model: nn.Module, rank: int, layerwise: bool = False, *,
                    skip_nonfinite: Optional[bool] = None, moment_bits: Optional[int] = None):
    """Optimizer ``name`` (:data:`METHODS`) on ``model`` (already prepared), as the planner builds it.

    Returns the optimizer, or the :class:`~lowrank_kernels.optim.LayerwiseOptimizer` when
    ``layerwise``. ``skip_nonfinite`` (when not None) is set in every group of this
    package's optimizers; ``moment_bits`` (when not None) is given to every group of this
    package's optimizers (not to ``adamw``, torch's).
    """
    method = _method(name)
    groups = method.groups(model, rank)
    if moment_bits is not None and _ours(name):
        groups = [{**g, "moment_bits": moment_bits} for g in groups]
    factory = method.factory
    if skip_nonfinite is not None:
        from lowrank_kernels.optim import LowRankOptimizer

        base = factory

        def factory(gs):  # noqa: F811 - wraps the method's factory
            opt = base(gs)
            if isinstance(opt, LowRankOptimizer):
                for g in opt.param_groups:
                    g["skip_nonfinite"] = skip_nonfinite
            return opt
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no parameter group is low-rank.*")
        if layerwise:
            from lowrank_kernels.optim import layerwise as _layerwise

            return _layerwise(groups, factory)
        return factory(groups)


def _method(name: str) -> Method:
    if name not in METHODS:
        if name not in _registry.OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(_registry.OPTIMIZERS)}")
        METHODS[name] = _method_of(_registry.OPTIMIZERS[name])  # registered after this module loaded
    return METHODS[name]


def step_once(opt) -> None:
    """One step of every (per-parameter) optimizer; a layer-wise one steps each parameter."""
    for o in optimizers_of(opt):
        o.step()
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()


# --------------------------------------------------------------------------- byte counting
# One counter for the planner, the benchmarks and users: lowrank_kernels.optim.state_nbytes.
# (tensors_nbytes, state_nbytes and optimizers_of are imported above and stay importable from here.)


def weights_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once; a QLinear's gradient
    placeholder owns one element)."""
    return tensors_nbytes(list(model.parameters()) + list(model.buffers()))


def gradient_nbytes(model: nn.Module, layerwise: bool) -> int:
    """One gradient per trainable parameter (its dtype); the largest single one when ``layerwise``."""
    sizes = [p.numel() * p.element_size() for p in _trainable(model)]
    if not sizes:
        return 0
    return max(sizes) if layerwise else sum(sizes)


# --------------------------------------------------------------------------- meta seams
class _MetaScalars(TorchDispatchMode):
    """Host reads of a meta tensor's value answer True / 1 / 1.0 instead of raising."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            t = args[0]
            if t.dtype == torch.bool:
                return True
            return 1.0 if t.is_floating_point() else 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_step_seams():
    """Let an optimizer step run on meta tensors (see the module docstring)."""
    real_generator = torch.Generator

    def generator(device=None, *args, **kwargs):
        if device is not None and torch.device(device).type == "meta":
            device = "cpu"
        return real_generator(device, *args, **kwargs) if device is not None else real_generator(*args, **kwargs)

    torch.Generator = generator
    try:
        with _MetaScalars():
            yield
    finally:
        torch.Generator = real_generator


def give_gradients(model: nn.Module) -> None:
    """An (uninitialized) gradient of each trainable parameter's shape and dtype, on its device."""
    for p in _trainable(model):
        p.grad = torch.empty(p.shape, dtype=p.dtype, device=p.device)


# --------------------------------------------------------------------------- the plan
@dataclass
class Row:
    """One optimizer's memory figures, in bytes."""

    optimizer: str
    weights: int
    gradients: int
    optimizer_state: int
    total: int
    projected: int  # weights in a low-rank group
    params: int  # trainable parameters (tensors)
    notes: str = ""


def _projected_count(opt) -> int:
    from lowrank_kernels.optim import LowRankOptimizer

    n = 0
    for o in optimizers_of(opt):
        if isinstance(o, LowRankOptimizer):
            n += sum(1 for p, s in o.state.items() if "side" in s)
    return n


def plan_one(name: str, config, rank: int, dtype: torch.dtype = torch.float32, layerwise: bool = False,
             moment_bits: int = 32) -> Row:
    """Build ``config``'s model on meta, take optimizer ``name``'s first step there, count the bytes."""
    method = _method(name)
    model = build_model(config, dtype, "meta")
    notes = [method.note] if method.note else []
    if moment_bits != 32:
        notes.append(f"moment_bits={moment_bits}" if _ours(name) else "torch's own moments")
    with meta_step_seams():
        if method.prepare is not None:
            method.prepare(model)
        give_gradients(model)
        opt = build_optimizer(name, model, rank, layerwise, skip_nonfinite=False,
                              moment_bits=None if moment_bits == 32 else moment_bits)
        step_once(opt)
    w = weights_nbytes(model)
    g = gradient_nbytes(model, layerwise)
    s = state_nbytes(opt)
    projected = _projected_count(opt)
    if projected == 0 and _registry.get(name).lowrank:
        notes.append(f"no weight projected (rank {rank} >= min dim?): plain AdamW")
    return Row(name, w, g, s, w + g + s, projected, len(_trainable(model)), "; ".join(notes))


def plan(config, optimizers: Sequence[str], rank: int, dtype: torch.dtype = torch.float32,
         layerwise: bool = False, moment_bits: int = 32) -> List[Row]:
    """:func:`plan_one` for each name in ``optimizers`` (validated first); ``moment_bits`` (32, 16
    or 8) is the moment format of this package's optimizers."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if isinstance(moment_bits, bool) or moment_bits not in (32, 16, 8):
        raise ValueError(f"moment_bits must be 32, 16 or 8, got {moment_bits!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    names = list(optimizers)
    if not names:
        raise ValueError("optimizers: name at least one optimizer")
    for n in names:
        _method(n)
    return [plan_one(n, config, rank, dtype, layerwise, moment_bits) for n in names]


# --------------------------------------------------------------------------- output
def fmt_gib(n: int) -> str:
    return f"{n / 2 ** 30:.3f}"


def table(rows: List[Row]) -> str:
    """The rows as a fixed-width text table (GiB), state also as a ratio to adamw's when present."""
    base = next((r.optimizer_state for r in rows if r.optimizer == "adamw"), None)
    head = ["optimizer", "weights GiB", "grads GiB", "state GiB", "total GiB", "state/adamw", "projected", "notes"]
    body = []
    for r in rows:
        ratio = f"{r.optimizer_state / base:.3f}" if base else "-"
        body.append([r.optimizer, fmt_gib(r.weights), fmt_gib(r.gradients), fmt_gib(r.optimizer_state),
                     fmt_gib(r.total), ratio, f"{r.projected}/{r.params}", r.notes])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(rows: List[Row], path: str, meta: Dict[str, Any]) -> None:
    """One line per optimizer: the byte figures plus the run's settings (``meta``)."""
    keys = ["optimizer", "weights", "gradients", "optimizer_state", "total", "projected", "params", "notes"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + list(meta))
        for r in rows:
            d = asdict(r)
            w.writerow([d[k] for k in keys] + list(meta.values()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowrank_kernels.memory", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a Hugging Face causal-LM config.json")
    src.add_argument("--model-preset", choices=sorted(PRESETS), help="a GaLore-paper LLaMA config")
    ap.add_argument("--optimizers", default="adamw,galore,dct,qgalore,apollo,apollo-mini,frugal",
                    help=f"comma-separated, from: {', '.join(METHODS)}")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights, gradients and moments dtype")
    ap.add_argument("--layerwise", action="store_true", help="layer-wise updates: one parameter's gradient at a time")
    ap.add_argument("--moment-bits", type=int, default=32, choices=(32, 16, 8),
                    help="moment format of this package's optimizers (16: bfloat16, 8: blockwise 8-bit)")
    ap.add_argument("--csv", help="also write the figures (bytes) to this CSV file")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad:
        ap.error(f"--optimizers: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if args.rank < 1:
        ap.error(f"--rank must be >= 1, got {args.rank}")
    config = preset_config(args.model_preset) if args.model_preset else load_config(args.config)
    dtype = DTYPES[args.dtype]
    rows = plan(config, names, args.rank, dtype, args.layerwise, args.moment_bits)
    model_name = args.model_preset or args.config
    print(f"model {model_name}, dtype {args.dtype}, rank {args.rank}"
          f"{', layer-wise' if args.layerwise else ''}, moment_bits {args.moment_bits}; "
          "projected: attn/mlp Linear weights with min(m, n) > rank")
    print(table(rows))
    print("state: every tensor an optimizer holds after its first step (moments, projectors, indices, seeds, "
          "step counters); activations and transient workspace not included.")
    if args.csv:
        write_csv(rows, args.csv, dict(model=model_name, dtype=args.dtype, rank=args.rank, layerwise=args.layerwise,
                                       moment_bits=args.moment_bits))
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
