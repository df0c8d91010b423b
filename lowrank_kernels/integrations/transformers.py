"""Hugging Face ``transformers.Trainer`` drop-in: every optimizer of this package by name.

``TrainingArguments.optim`` only accepts transformers' own names, so the supported door
is ``Trainer(optimizer_cls_and_kwargs=(factory, kwargs))``: for a ``factory`` that is not
a ``torch.optim.Optimizer`` subclass the Trainer calls ``factory()(model, **kwargs)``
(``Trainer.create_optimizer``), after any wrapping it does before creating the
optimizer. :func:`lowrank_optimizer` returns that pair::

    from transformers import Trainer, TrainingArguments
    from lowrank_kernels.integrations.transformers import lowrank_optimizer

    trainer = Trainer(
        model=model, args=TrainingArguments(..., lr_scheduler_type="cosine"), train_dataset=ds,
        optimizer_cls_and_kwargs=lowrank_optimizer(
            "galore_adamw", target_modules=["attn", "mlp"], optim_args="rank=128,update_proj_gap=200",
            lr=1e-2, weight_decay=0.01,
        ),
    )

Compared with transformers' own ``optim="galore_adamw"`` path (5.24), which passes only
``lr`` to GaLore (``weight_decay``, ``betas`` and ``eps`` are silently dropped), puts
frozen parameters in the optimizer, projects ``lm_head`` under ``"all-linear"`` and
decays biases and norms:

- ``lr``, ``weight_decay`` and the given ``betas`` and ``eps`` are set in every param group
  (``galore_adafactor``: no ``betas``; its ``eps`` is Adafactor's pair, see :func:`lowrank_optimizer`);
- the Trainer's no-decay rule is kept (``Trainer.get_decay_parameter_names``: biases
  and norm weights get ``weight_decay=0``);
- parameters with ``requires_grad=False`` are left out;
- the output embedding (``lm_head``) and weights with ``min(m, n) <= rank`` stay plain
  AdamW unless ``project_lm_head=True`` / ``project_small=True``;
- ``layerwise=True`` steps each parameter inside backward with this package's
  :func:`lowrank_kernels.optim.layerwise` and saves and resumes every per-parameter
  state (see :class:`TrainerLayerwiseOptimizer`).

The Trainer does not pass ``TrainingArguments.learning_rate``, ``weight_decay`` or the
Adam settings to a factory: give them to :func:`lowrank_optimizer`. The schedule
(``lr_scheduler_type``, warm-up) still comes from ``TrainingArguments``.

Only this module's functions import transformers (and only when called), so
``import lowrank_kernels.integrations.transformers`` works without it.
"""
from __future__ import annotations

import inspect
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer

from lowrank_kernels import optim as _optim
from lowrank_kernels.optim import registry as _registry
from lowrank_kernels.optim.layerwise import LayerwiseOptimizer

TargetModules = Union[str, Sequence[str]]


@dataclass(frozen=True)
class _Entry:
    """One optimizer name: the class in :mod:`lowrank_kernels.optim` (looked up when
    used, so a name can be listed before its class lands), the defaults the name
    implies for its keys (``optim_args`` and keyword arguments override them),
    constructor arguments it fixes, and an optional classmethod that builds it."""

    cls_name: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    preset: Optional[str] = None


_RANK128 = {"rank": 128}  # transformers' default rank for its GaLore / APOLLO names
#: transformers' names for a moment-format variant of a registered name: name -> (base, fixed keys).
_VARIANTS = {"galore_adamw_8bit": ("galore", {"moment_bits": 8})}


def _entry(spec, fixed: Optional[Mapping[str, Any]] = None) -> _Entry:
    """The Trainer entry of a registered optimizer (:mod:`lowrank_kernels.optim.registry`):
    its class and preset constructor, the settings the name implies (a preset's own values,
    e.g. APOLLO-Mini's rank 1) and transformers' ``rank=128`` for a rank-sized method
    without a preset; the registry's fixed settings stay fixed."""
    defaults: Dict[str, Any] = {}
    if spec.constructor is not None:
        base = _registry.ctor_defaults(spec.cls)
        defaults.update({k: v for k, v in spec.defaults.items() if k not in _EXPLICIT and base.get(k) != v})
    elif spec.subspace == "rank":
        defaults.update(_RANK128)
    defaults.update({k: v for k, v in spec.settings.items() if k not in spec.fixed})
    fixed_keys = {k: spec.settings[k] for k in spec.fixed}
    fixed_keys.update(fixed or {})
    return _Entry(spec.cls_name, defaults, fixed=fixed_keys, preset=spec.constructor)


def _trainer_table() -> Dict[str, _Entry]:
    table: Dict[str, _Entry] = {}
    for spec in _registry.OPTIMIZERS.values():
        if spec.trainer_name is None or not spec.target.startswith("lowrank_kernels."):
            continue
        table[spec.trainer_name] = _entry(spec)
        for variant, (base, fixed) in _VARIANTS.items():
            if base == spec.name:
                table[variant] = _entry(spec, fixed)
    return table


# Set by lowrank_optimizer's explicit arguments, never through optim_args / **kw.
_EXPLICIT = ("lr", "weight_decay", "betas", "eps")

#: name -> optimizer: every optimizer of :mod:`lowrank_kernels.optim.registry` under its
#: Trainer spelling (``galore_adamw``, ...), plus transformers' ``galore_adamw_8bit``. A name
#: whose class (or fixed argument) this version lacks raises a ValueError saying so when used.
OPTIMIZERS: Dict[str, _Entry] = _trainer_table()


def _check_adam_args(name: str, cls: type, betas, eps) -> None:
    """``betas`` / ``eps`` against the optimizer's own arguments. An AdamW-like class takes
    both as given. A class without ``betas`` (GaLoreAdafactor: its first moment is
    ``beta1``, its second-moment decay ``decay_rate``) refuses ``betas``, and its ``eps``
    is Adafactor's pair ``(eps1, eps2)``: a single AdamW-style float is refused rather than
    guessed into one of the two."""
    params = _ctor_params(cls)
    if betas is not None and "betas" not in params:
        raise ValueError(
            f"lowrank_optimizer: {name!r} ({cls.__name__}) has no betas; set its first-moment decay with "
            f"beta1=... and its second-moment decay with decay_rate=... (keywords or optim_args)"
        )
    if eps is not None and "betas" not in params and not isinstance(eps, (tuple, list)):
        raise ValueError(
            f"lowrank_optimizer: {name!r} ({cls.__name__}) takes eps as Adafactor's pair (eps1, eps2), "
            f"default (1e-30, 1e-3); got {eps!r}"
        )


# ---------------------------------------------------------------------------------- names
def _resolve(name: str) -> Tuple[_Entry, type]:
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"lowrank_optimizer: unknown optimizer name {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    entry = OPTIMIZERS[name]
    cls = getattr(_optim, entry.cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise ValueError(
            f"lowrank_optimizer: {name!r} needs lowrank_kernels.optim.{entry.cls_name}, which this version of "
            f"lowrank_kernels does not have"
        )
    params = _ctor_params(cls)
    for key in entry.fixed:
        if key not in params:
            raise ValueError(
                f"lowrank_optimizer: {name!r} needs {entry.cls_name}({key}=...), which this version of "
                f"lowrank_kernels does not support"
            )
    return entry, cls


def _ctor_params(cls: type) -> Dict[str, inspect.Parameter]:
    """The keyword arguments of ``cls.__init__`` (less ``self`` and ``params``)."""
    sig = inspect.signature(cls.__init__)
    return {
        k: v for k, v in sig.parameters.items()
        if k not in ("self", "params") and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)
    }


# ---------------------------------------------------------------------------------- optim_args
def _kind(param: inspect.Parameter) -> str:
    """'bool' | 'int' | 'float' | 'str' | 'any' from the annotation (or the default)."""
    ann = param.annotation
    if isinstance(ann, type):
        ann = ann.__name__
    if isinstance(ann, str):
        ann = ann.replace(" ", "")
        m = re.fullmatch(r"Optional\[(\w+)\]|(\w+)(?:\|None)?", ann)
        base = (m.group(1) or m.group(2)) if m else None
        if base in ("bool", "int", "float", "str"):
            return base
    d = param.default
    if isinstance(d, bool):
        return "bool"
    if isinstance(d, (int, float, str)):
        return type(d).__name__
    return "any"


def _convert(key: str, text: str, kind: str) -> Any:
    low = text.lower()
    if kind != "str" and low == "none":
        return None
    try:
        if kind == "bool":
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ValueError(f"lowrank_optimizer: optim_args: {key}={text!r} is not a valid {kind}") from None
    if kind == "str":
        return text
    for conv in (int, float):  # untyped: a number when it reads as one
        try:
            return conv(text)
        except ValueError:
            pass
    if low in ("true", "false"):
        return low == "true"
    return text


def parse_optim_args(optim_args: Optional[str], cls: type) -> Dict[str, Any]:
    """transformers' ``optim_args`` string (``"rank=128,update_proj_gap=200"``; spaces are
    ignored) as typed keyword arguments of ``cls``: each value is converted to the type of
    the constructor argument of that name (int, float, bool ``true``/``false``, str;
    ``none`` is None). Raises ValueError for a malformed item or an unknown key."""
    if optim_args is None or optim_args == "":
        return {}
    if not isinstance(optim_args, str):
        raise TypeError(f"lowrank_optimizer: optim_args must be a string like 'rank=128,scale=0.25', "
                        f"got {type(optim_args).__name__}")
    params = _ctor_params(cls)
    out: Dict[str, Any] = {}
    for item in optim_args.replace(" ", "").split(","):
        if item == "":
            continue
        key, sep, text = item.partition("=")
        if not sep or not key or "=" in text:
            raise ValueError(f"lowrank_optimizer: optim_args item {item!r} is not key=value")
        if key in _EXPLICIT:
            raise ValueError(f"lowrank_optimizer: optim_args: set {key} with lowrank_optimizer({key}=...)")
        if key not in params:
            raise ValueError(
                f"lowrank_optimizer: optim_args: {cls.__name__} has no argument {key!r}; "
                f"known: {', '.join(k for k in params if k not in _EXPLICIT)}"
            )
        if key in out:
            raise ValueError(f"lowrank_optimizer: optim_args sets {key!r} twice")
        out[key] = _convert(key, text, _kind(params[key]))
    return out


# ---------------------------------------------------------------------------------- selection
def _check_target_modules(target_modules) -> None:
    ok = isinstance(target_modules, str) or (
        isinstance(target_modules, (list, tuple)) and len(target_modules) > 0
        and all(isinstance(t, str) for t in target_modules)
    )
    if not ok:
        raise TypeError(
            "lowrank_optimizer: target_modules must be a non-empty list of strings (exact names, substrings or "
            f"regexes), a regex string, or 'all-linear'; got {target_modules!r}"
        )


def _is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"


def module_matches(target_modules: TargetModules, name: str) -> bool:
    """transformers' matching of a module name (``check_target_module_exists``): a string
    is a regex that must match the whole name; a list matches when it contains the name,
    when one entry is a substring of it, or when one entry as a regex matches it whole."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    if any(t in name for t in target_modules):
        return True
    return any(re.fullmatch(t, name) is not None for t in target_modules)


def target_weight_names(model: nn.Module, target_modules: TargetModules) -> List[str]:
    """Names of the weights transformers' GaLore/APOLLO path projects: ``<module>.weight``
    of every ``nn.Linear`` whose name matches (every ``nn.Linear`` for ``"all-linear"``),
    before the rules of :func:`trainer_param_groups` (frozen, lm_head, small) apply."""
    _check_target_modules(target_modules)
    all_linear = _is_all_linear(target_modules)
    return [
        f"{name}.weight" for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (all_linear or module_matches(target_modules, name))
    ]


_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> List[str]:
    """The names the Trainer decays: ``transformers.Trainer.get_decay_parameter_names``
    (every parameter except biases, norm weights and ``nn.LayerNorm`` parameters), or
    the same rule written here when that method is not available."""
    try:
        from transformers import Trainer

        return list(Trainer.get_decay_parameter_names(None, model))
    except (ImportError, AttributeError, TypeError):
        pass
    pats = [re.compile(p) for p in _NO_DECAY_PATTERNS]
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            continue
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if not any(p.search(full.lower()) for p in pats):
                out.append(full)
    return out


def _output_embedding_ids(model: nn.Module) -> set:
    ids = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module) and isinstance(getattr(out, "weight", None), torch.Tensor):
            ids.add(id(out.weight))
    for name, module in model.named_modules():
        if name.split(".")[-1] == "lm_head" and isinstance(getattr(module, "weight", None), torch.Tensor):
            ids.add(id(module.weight))
    return ids


def trainer_param_groups(
    model: nn.Module,
    target_modules: TargetModules,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: Optional[Tuple[float, float]] = None,
    eps: Optional[Union[float, Tuple[float, float]]] = None,
    rank: Optional[int] = None,
    project_lm_head: bool = False,
    project_small: bool = False,
) -> List[Dict[str, Any]]:
    """The param groups :func:`lowrank_optimizer` gives its optimizer.

    Projected: the weights of :func:`target_weight_names` that require grad, except the
    output embedding (unless ``project_lm_head``) and, when ``rank`` is given, weights
    with ``min(m, n) <= rank`` (unless ``project_small``: then they are projected at rank
    ``min(m, n)`` when it is smaller). Everything else that requires grad is plain
    (``rank=None``, ``density=None``). Parameters the Trainer does not decay
    (:func:`decay_parameter_names`) get ``weight_decay=0``. Every group sets ``lr``,
    ``weight_decay`` and (when given) ``betas`` and ``eps``; groups are ordered projected
    then plain, decayed first, and empty groups are left out. Shared parameters appear
    once.
    """
    targets = set(target_weight_names(model, target_modules))
    if not targets:
        raise ValueError(f"lowrank_optimizer: no nn.Linear module matches target_modules={target_modules!r}")
    decay = set(decay_parameter_names(model))
    out_emb = set() if project_lm_head else _output_embedding_ids(model)
    buckets: Dict[Tuple[Any, bool], List[torch.Tensor]] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key_rank: Any = None  # None: plain; "default": the optimizer's rank; an int: that rank
        if name in targets and p.dim() == 2 and id(p) not in out_emb:
            k = min(p.shape)
            if rank is None or k > rank:
                key_rank = "default"
            elif project_small:
                key_rank = k if k < rank else "default"
        buckets.setdefault((key_rank, name in decay), []).append(p)

    def order(item):
        (r, decays), _ = item
        return (r is None, not decays, -1 if r == "default" else (r if isinstance(r, int) else 0))

    groups = []
    for (r, decays), params in sorted(buckets.items(), key=order):
        g: Dict[str, Any] = {"params": params, "lr": lr, "weight_decay": weight_decay if decays else 0.0}
        if betas is not None:
            g["betas"] = tuple(betas)
        if eps is not None:
            g["eps"] = tuple(eps) if isinstance(eps, (tuple, list)) else eps
        if r is None:
            g.update(rank=None, density=None)
        elif r == "default":
            if rank is not None:
                g["rank"] = rank
        else:
            g["rank"] = r
        groups.append(g)
    return groups


# ---------------------------------------------------------------------------------- layer-wise
def _accumulating() -> bool:
    """Whether the running accelerate loop is inside a gradient-accumulation cycle (the
    Trainer sets ``GradientState.sync_gradients`` False on every micro-batch but the last)."""
    try:
        from accelerate.state import GradientState
    except ImportError:
        return False
    if not GradientState._shared_state:
        return False
    return not GradientState().sync_gradients


class _TrainerLayerwise(LayerwiseOptimizer):
    """:class:`LayerwiseOptimizer` whose hooks refuse gradient accumulation before stepping."""

    def _make_hook(self, index: int):
        step_now = super()._make_hook(index)

        def hook(p: torch.Tensor) -> None:
            if _accumulating():
                # The Trainer's loop stops here; do not leave accelerate's shared state saying
                # "mid-accumulation" for whatever runs next in this process.
                from accelerate.state import GradientState

                GradientState()._set_sync_gradients(True)
                raise ValueError(
                    "lowrank_optimizer(layerwise=True) does not support gradient accumulation "
                    "(TrainingArguments.gradient_accumulation_steps > 1): each parameter is updated inside "
                    "backward, at every micro-batch; set gradient_accumulation_steps=1 or layerwise=False"
                )
            step_now(p)

        return hook


class TrainerLayerwiseOptimizer(Optimizer):
    """The optimizer the Trainer sees in layer-wise mode.

    The updates happen inside backward (:class:`lowrank_kernels.optim.LayerwiseOptimizer`:
    one optimizer per parameter, stepped by its post-accumulate-grad hook, its gradient
    freed at once), so :meth:`step` does nothing and :meth:`zero_grad` clears leftovers.

    - ``param_groups`` are the per-parameter optimizers' own group dicts, so the
      Trainer's ordinary LR scheduler (any ``lr_scheduler_type``) sets every
      parameter's learning rate, once per optimizer step, and is saved in
      ``scheduler.pt`` as usual. This gives the learning-rate sequence of transformers'
      per-parameter schedulers (``LayerWiseDummyScheduler``: parameter p's t-th update
      uses the rate after t-1 scheduler steps) and, unlike them, resumes it.
    - :meth:`state_dict` holds every per-parameter optimizer's state (tensors only), so
      ``optimizer.pt`` resumes exactly (transformers' own layer-wise mode saves none).
    - Gradient accumulation > 1 is refused with a ValueError at the first backward, and
      distributed training (world size > 1) when the optimizer is built;
      gradient clipping cannot act (the gradients are gone when the Trainer clips: its
      reported ``grad_norm`` is 0), so set ``max_grad_norm=0`` to say so.
    """

    def __init__(self, layerwise: LayerwiseOptimizer):
        if not isinstance(layerwise, LayerwiseOptimizer):
            raise TypeError(f"TrainerLayerwiseOptimizer: expected a LayerwiseOptimizer, got {type(layerwise).__name__}")
        self.layerwise = layerwise
        # torch's bookkeeping (hooks, profiling); the placeholder group is not kept (see param_groups).
        super().__init__([torch.zeros(1, requires_grad=True)], {"lr": 0.0})
        self.defaults = dict(layerwise.optimizers[0].defaults)

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """Every per-parameter optimizer's groups (the live dicts, also after a load)."""
        return [g for opt in self.layerwise.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns a list; not kept
        pass

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Only torch's own placeholder during construction; a layer-wise optimizer's
        parameters are fixed when it is built."""
        if getattr(self, "_built", False):
            raise RuntimeError("TrainerLayerwiseOptimizer: parameters cannot be added after construction")
        self._built = True

    def step(self, closure=None):
        """Nothing to do (every parameter was stepped in backward); returns ``closure()`` if given."""
        return self.layerwise.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.layerwise.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        """``{"layerwise": LayerwiseOptimizer.state_dict()}``: every per-parameter state."""
        return {"layerwise": self.layerwise.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "layerwise" not in state_dict:
            raise ValueError(
                "TrainerLayerwiseOptimizer.load_state_dict: not a layer-wise state dict (no 'layerwise' key); "
                "was the checkpoint saved with layerwise=False?"
            )
        self.layerwise.load_state_dict(state_dict["layerwise"])

    def remove_hooks(self) -> None:
        """Detach the backward hooks."""
        self.layerwise.remove_hooks()


# A layer-wise optimizer per model: a new one (e.g. create_optimizer called again) replaces
# the old one's hooks instead of adding a second update per backward.
_LAYERWISE_BY_MODEL: "weakref.WeakKeyDictionary[nn.Module, LayerwiseOptimizer]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------- the factory
def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    target_modules: TargetModules,
    lr: float,
    weight_decay: float = 0.0,
    betas: Optional[Tuple[float, float]] = None,
    eps: Optional[Union[float, Tuple[float, float]]] = None,
    layerwise: bool = False,
    project_lm_head: bool = False,
    project_small: bool = False,
    optimizer_kwargs: Optional[Dict[str, Any]] = None,
) -> Optimizer:
    """Build the optimizer :func:`lowrank_optimizer` describes, for ``model``.

    The Trainer calls this through :class:`TrainerOptimizerFactory`; call it directly to
    use the same selection in a plain training loop.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowrank_optimizer: the Trainer must pass an nn.Module, got {type(model).__name__}")
    entry, cls = _resolve(name)
    _check_adam_args(name, cls, betas, eps)
    kwargs = dict(entry.defaults)
    kwargs.update(optimizer_kwargs or {})
    kwargs.update(entry.fixed)
    rank = kwargs.get("rank")
    groups = trainer_param_groups(
        model, target_modules, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, rank=rank,
        project_lm_head=project_lm_head, project_small=project_small,
    )
    ctor = dict(kwargs, lr=lr, weight_decay=weight_decay)
    if betas is not None:
        ctor["betas"] = tuple(betas)
    if eps is not None:
        ctor["eps"] = tuple(eps) if isinstance(eps, (tuple, list)) else eps
    make: Callable[[List[Dict[str, Any]]], Optimizer]
    if entry.preset is not None:
        preset = getattr(cls, entry.preset)
        make = lambda g: preset(g, **ctor)  # noqa: E731
    else:
        make = lambda g: cls(g, **ctor)  # noqa: E731
    if not layerwise:
        return make(groups)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            "lowrank_optimizer(layerwise=True) does not support distributed training: each parameter is updated "
            "in backward as soon as its local gradient exists, before DDP/FSDP reduce it across ranks; use "
            "layerwise=False"
        )
    old = _LAYERWISE_BY_MODEL.get(model)
    if old is not None:
        old.remove_hooks()
    lw = _TrainerLayerwise(groups, make)
    _LAYERWISE_BY_MODEL[model] = lw
    return TrainerLayerwiseOptimizer(lw)


class TrainerOptimizerFactory:
    """What :func:`lowrank_optimizer` hands the Trainer: ``TrainerOptimizerFactory()(model,
    **kwargs)`` (the Trainer's call for an optimizer factory) is :func:`build_optimizer`."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> Optimizer:
        return build_optimizer(model, **kwargs)


def lowrank_optimizer(
    name: str,
    *,
    target_modules: TargetModules,
    optim_args: Optional[str] = None,
    lr: float,
    weight_decay: float = 0.0,
    betas: Optional[Tuple[float, float]] = None,
    eps: Optional[Union[float, Tuple[float, float]]] = None,
    layerwise: bool = False,
    project_lm_head: bool = False,
    project_small: bool = False,
    **kw: Any,
) -> Tuple[type, Dict[str, Any]]:
    """The ``(factory, kwargs)`` pair for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Args:
        name: one of :data:`OPTIMIZERS`: ``galore_adamw``, ``apollo_adamw``,
            ``apollo_mini`` (:meth:`APOLLOAdamW.mini`), ``dct_adamw``, ``qgalore_adamw``,
            ``frugal_adamw``, ``gradnormlorp_adamw`` (:class:`GradNormLoRPAdamW`),
            ``galore_adafactor`` (:class:`GaLoreAdafactor` with transformers' settings:
            the given ``lr``, ``relative_step=False`` (fixed, since ``lr`` is given) and
            ``scale_parameter=False`` (may be overridden)), and ``galore_adamw_8bit``
            (:class:`GaLoreAdamW` with ``moment_bits=8``, fixed: 8-bit Adam moments in the
            projected and plain groups; moments with fewer than ``min_8bit_size`` elements,
            default 4096, stay float32; pass ``min_8bit_size=...`` / ``block_size=...`` as
            keywords or in ``optim_args``). Every other Adam-style name takes
            ``moment_bits=16`` or ``8`` the same way (see :mod:`lowrank_kernels.optim.base`).
        target_modules: transformers' ``optim_target_modules``: a list (exact module
            names, substrings, or regexes matching a whole name), a regex string, or
            ``"all-linear"``; only ``nn.Linear`` weights are projected.
        optim_args: transformers' string format, ``"rank=128,update_proj_gap=200"``,
            converted to the types of the optimizer's arguments. Defaults as
            transformers: ``rank=128`` and the optimizer's own defaults
            (``update_proj_gap=200``, ``scale=0.25`` for GaLore, ``1.0`` for APOLLO,
            ``proj_type="std"``, APOLLO ``scale_type="channel"``).
        lr, weight_decay, betas, eps: set in every param group (the Trainer passes none
            of its own to a factory). ``betas=None`` / ``eps=None`` keep the optimizer's
            defaults (betas ``(0.9, 0.999)``; eps 1e-6 for GaLore / APOLLO / DCT /
            GradNormLoRP, as galore-torch; 1e-8 for Q-GaLore, FRUGAL). Biases and norm
            weights get ``weight_decay=0`` (the Trainer's rule). ``galore_adafactor``
            has no ``betas`` (a ValueError: use ``beta1=`` / ``decay_rate=``, as
            keywords or in ``optim_args``) and its ``eps`` is Adafactor's pair
            ``(eps1, eps2)``, default ``(1e-30, 1e-3)`` (a single float is a ValueError).
        layerwise: update each parameter inside backward (see
            :class:`TrainerLayerwiseOptimizer`); needs ``gradient_accumulation_steps=1``.
        project_lm_head: also project the output embedding when it matches.
        project_small: also project weights with ``min(m, n) <= rank`` (at rank
            ``min(m, n)``).
        **kw: other arguments of the optimizer (``compat="galore-torch"``,
            ``svd="lowrank"``, ``scale_type``, ...), as keyword values; a key may not be
            given both here and in ``optim_args``.

    Everything is checked here, before training starts, except what needs the model.
    """
    entry, cls = _resolve(name)
    _check_target_modules(target_modules)
    _check_adam_args(name, cls, betas, eps)
    flags = (("layerwise", layerwise), ("project_lm_head", project_lm_head), ("project_small", project_small))
    for flag, value in flags:
        if not isinstance(value, bool):
            raise TypeError(f"lowrank_optimizer: {flag} must be a bool, got {value!r}")
    parsed = parse_optim_args(optim_args, cls)
    params = _ctor_params(cls)
    for key in kw:
        if key not in params or key in _EXPLICIT:
            raise TypeError(f"lowrank_optimizer: {cls.__name__} has no keyword argument {key!r}")
        if key in parsed:
            raise ValueError(f"lowrank_optimizer: {key!r} is given both in optim_args and as a keyword")
    for key in entry.fixed:
        if key in parsed or key in kw:
            raise ValueError(f"lowrank_optimizer: {name!r} fixes {key}={entry.fixed[key]!r}; do not set it")
    # Check the hyper-parameters now (the optimizer's own validation, on a placeholder group).
    probe = torch.zeros(1, requires_grad=True)
    probe_group = {"params": [probe], "rank": None, "density": None}
    ctor = dict(entry.defaults)
    ctor.update(parsed, **kw)
    ctor.update(entry.fixed, lr=lr, weight_decay=weight_decay)
    if betas is not None:
        ctor["betas"] = betas
    if eps is not None:
        ctor["eps"] = eps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no parameter group is low-rank": by design here
        cls([probe_group], **ctor)
    spec = dict(
        name=name, target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        lr=lr, weight_decay=weight_decay, betas=None if betas is None else tuple(betas),
        eps=tuple(eps) if isinstance(eps, (tuple, list)) else eps, layerwise=layerwise,
        project_lm_head=project_lm_head, project_small=project_small, optimizer_kwargs=dict(parsed, **kw),
    )
    return TrainerOptimizerFactory, spec


__all__ = [
    "OPTIMIZERS",
    "lowrank_optimizer",
    "build_optimizer",
    "trainer_param_groups",
    "target_weight_names",
    "module_matches",
    "decay_parameter_names",
    "parse_optim_args",
    "TrainerOptimizerFactory",
    "TrainerLayerwiseOptimizer",
]
