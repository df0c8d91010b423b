"""The optimizer registry: one place that knows every optimizer of this package by name.

Each :class:`OptimizerSpec` says, for one name:

- which class builds it (and through which classmethod, e.g. :meth:`APOLLOAdamW.mini`),
  plus the settings the name implies (``settings``) and those a caller may not change
  (``fixed``);
- its default hyper-parameters (:attr:`OptimizerSpec.defaults`), read from the class
  itself (the constructor's signature, the classmethod's preset) so they cannot drift;
- its capabilities (:class:`Capabilities`: bucketed multi-tensor step, ``capturable``,
  moment formats, FSDP2/DTensor parameters);
- a formula for the bytes of its state (:meth:`OptimizerSpec.param_state_nbytes`, one
  parameter; :meth:`OptimizerSpec.expected_state_nbytes`, a list of param groups), which
  the test suite checks against :func:`state_nbytes` of a real first step, entry by entry.

The Hugging Face integration (:mod:`lowrank_kernels.integrations.transformers`), the
memory planner (:mod:`lowrank_kernels.memory`) and the benchmarks read this table, so
adding an optimizer is one :func:`register` call here::

    register(OptimizerSpec("foo", "lowrank_kernels.optim.FooAdamW", _galore_bytes,
                           Capabilities(bucketed=True, capturable=False, moment_bits=(32, 16, 8),
                                        distributed=True),
                           aliases=("foo_adamw",)))

:func:`state_nbytes` counts the bytes an optimizer's state holds (each storage once),
the figure the planner and the benchmarks report.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import warnings
from functools import cached_property
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "Capabilities",
    "OptimizerSpec",
    "OPTIMIZERS",
    "register",
    "get",
    "names",
    "spec_for",
    "ctor_defaults",
    "state_nbytes",
    "tensors_nbytes",
    "optimizers_of",
]


# --------------------------------------------------------------------------- byte counting
def optimizers_of(opt) -> List[Any]:
    """The optimizer itself, or the per-parameter optimizers of a layer-wise one
    (:class:`~lowrank_kernels.optim.LayerwiseOptimizer`)."""
    inner = getattr(opt, "optimizers", None)
    return list(inner) if inner is not None else [opt]


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta":
        return ("meta", id(t))
    ptr = t.untyped_storage().data_ptr()
    return (str(t.device), ptr) if ptr else ("empty", id(t))


def tensors_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``.

    A meta tensor counts ``min(storage bytes, numel * element size)``: its strides come
    from the meta kernel and need not be those of a real device (e.g. a slice of a meta
    SVD's output keeps the whole output's storage, where the real kernels make a compact
    copy), while a stride-0 expansion (QLinear's gradient placeholder) owns one element.
    """
    seen = set()
    total = 0
    for t in tensors:
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.untyped_storage().nbytes()
        if t.device.type == "meta":
            nbytes = min(nbytes, t.numel() * t.element_size())
        total += nbytes
    return total


def _state_tensors(x, depth=0):
    if isinstance(x, torch.Tensor):
        yield x
    elif depth < 4 and isinstance(x, dict):
        for v in x.values():
            yield from _state_tensors(v, depth + 1)
    elif depth < 4 and isinstance(x, (list, tuple)):
        for v in x:
            yield from _state_tensors(v, depth + 1)


def state_nbytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, projectors, indices, seeds,
    step counters, host-side scalars included), each storage once.

    Works for any ``torch.optim.Optimizer`` (this package's or torch's), a layer-wise
    optimizer (the sum over its per-parameter optimizers) and anything with a ``state``
    mapping of parameter -> dict; meta tensors count their shapes' bytes (the memory
    planner's first step on the ``meta`` device).
    """
    return tensors_nbytes(t for o in optimizers_of(optimizer) for s in o.state.values()
                          for t in _state_tensors(s))


# --------------------------------------------------------------------------- state formulas
# Formulas for one parameter of ``shape`` and ``dtype``: ``rank`` None is a plain (AdamW)
# parameter, otherwise a projected 2-D weight; ``o`` holds the group's hyper-parameters
# (the entry's defaults, then the group's keys). They restate the optimizers' state layout
# independently of the code that allocates it (the test suite compares the two).
_F32 = 4


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _moment_format(shape: Tuple[int, ...], o: Mapping[str, Any]) -> int:
    """32, 16 or 8: the format moments of ``shape`` take (8-bit falls back to float32 below
    ``min_8bit_size`` elements and where codes + block maxima would not be smaller)."""
    bits = int(o.get("moment_bits", 32))
    if not shape:
        return 32
    numel = math.prod(shape)
    if bits == 8:
        rows, blocks = math.prod(shape[:-1]), -(-shape[-1] // int(o.get("block_size", 256)))
        if numel < int(o.get("min_8bit_size", 4096)) or numel + _F32 * rows * blocks >= _F32 * numel:
            return 32
    return bits


def _moments_nbytes(shape, dtype, o, count: int = 2) -> int:
    """``count`` Adam moments of ``shape``: float32 (``moment_dtype="param"``: the parameter's
    dtype), bfloat16, or uint8 codes plus one float32 maximum per block of a row."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    bits = _moment_format(shape, o)
    if bits == 16:
        return count * numel * 2
    if bits == 8:
        rows, blocks = math.prod(shape[:-1]), -(-shape[-1] // int(o.get("block_size", 256)))
        return count * (numel + _F32 * rows * blocks)
    size = _esize(dtype) if o.get("moment_dtype") == "param" or dtype == torch.float64 else _F32
    return count * numel * size


def _side(shape, o) -> str:
    from .base import resolve_side

    return resolve_side(tuple(shape), o.get("proj_type", "std"))


def _lowrank_shape(shape, rank: int, side: str) -> Tuple[int, int]:
    m, n = shape
    return (m, rank) if side == "right" else (rank, n)


def _projector_numel(shape, rank: int, side: str) -> int:
    m, n = shape
    return rank * n if side == "right" else m * rank


def _adamw_bytes(shape, dtype, rank, o) -> int:
    """A plain parameter: ``step`` (float32 scalar) and two moments of its shape."""
    return _F32 + _moments_nbytes(shape, dtype, o)


def _head(shape, rank, o) -> Tuple[str, Tuple[int, int], int]:
    """Side, low-rank shape, and the ``step`` + ``side`` bytes every projected weight holds."""
    side = _side(shape, o)
    return side, _lowrank_shape(shape, rank, side), _F32 + 1


def _galore_bytes(shape, dtype, rank, o) -> int:
    """GaLore: moments of the low-rank shape and the dense projector (parameter dtype)."""
    if rank is None:
        return _adamw_bytes(shape, dtype, rank, o)
    side, lshape, head = _head(shape, rank, o)
    return head + _moments_nbytes(lshape, dtype, o) + _projector_numel(shape, rank, side) * _esize(dtype)


def _dct_bytes(shape, dtype, rank, o) -> int:
    """DCT-AdamW: low-rank moments and the ``rank`` int32 indices of the chosen DCT rows
    (the basis is shared and not state)."""
    if rank is None:
        return _adamw_bytes(shape, dtype, rank, o)
    side, lshape, head = _head(shape, rank, o)
    return head + _moments_nbytes(lshape, dtype, o) + 4 * rank


def _qgalore_bytes(shape, dtype, rank, o) -> int:
    """Q-GaLore: low-rank moments; the projector as INT4 (two per byte, a float32 scale and
    minimum per ``quant_group_size`` values) or dense; the adaptive-gap bookkeeping
    (``proj_gap``, ``svd_count``, ``sim_count`` int64, ``queue_size`` float32 similarities)
    and the previous projector's first vector (float32)."""
    if rank is None:
        return _adamw_bytes(shape, dtype, rank, o)
    side, lshape, head = _head(shape, rank, o)
    numel = _projector_numel(shape, rank, side)
    if o.get("quant", True):
        groups = -(-numel // int(o.get("quant_group_size", 256)))
        proj = -(-numel // 2) + 2 * _F32 * groups
    else:
        proj = numel * _esize(dtype)
    past = shape[1] if side == "right" else shape[0]
    return head + _moments_nbytes(lshape, dtype, o) + proj + 3 * 8 + _F32 * int(o.get("queue_size", 5)) + _F32 * past


def _apollo_bytes(shape, dtype, rank, o) -> int:
    """APOLLO: low-rank moments, the int64 seed of the random projection (no projector is
    stored) and, with the norm-growth limiter, the previous scaled norm (float32)."""
    if rank is None:
        return _adamw_bytes(shape, dtype, rank, o)
    side, lshape, head = _head(shape, rank, o)
    limiter = o.get("norm_growth_limiter")
    if limiter is None:
        limiter = not o.get("disable_nl", False)
    return head + _moments_nbytes(lshape, dtype, o) + 8 + (_F32 if limiter else 0)


def _frugal_bytes(shape, dtype, rank, o) -> int:
    """FRUGAL (``projection="svd"``): low-rank moments, the dense projector and the
    ``subspace_step`` counter (float32). ``rank`` None with a ``density``: the rank is
    ``round(density * min(m, n))``."""
    if rank is None and o.get("density") is None:
        return _adamw_bytes(shape, dtype, rank, o)
    if rank is None:
        rank = int(round(float(o["density"]) * min(shape)))
    side, lshape, head = _head(shape, rank, o)
    return head + _moments_nbytes(lshape, dtype, o) + _projector_numel(shape, rank, side) * _esize(dtype) + _F32


def _fira_bytes(shape, dtype, rank, o) -> int:
    """Fira: GaLore's state (``projector="svd"``: the dense projector in the parameter's dtype;
    ``"dct"``: ``rank`` int32 indices) plus the limiter's previous norm (one float32; float64 for
    float64 parameters)."""
    if rank is None:
        return _adamw_bytes(shape, dtype, rank, o)
    side, lshape, head = _head(shape, rank, o)
    proj = 4 * rank if o.get("projector", "svd") == "dct" else _projector_numel(shape, rank, side) * _esize(dtype)
    return head + _moments_nbytes(lshape, dtype, o) + proj + (8 if dtype == torch.float64 else _F32)


def _adafactor_second(shape, o) -> int:
    """Adafactor's second moment (float32): a row and a column vector for 2-D and up, else full."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return _F32 * (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:]))
    return _F32 * math.prod(shape)


def _adafactor_bytes(shape, dtype, rank, o) -> int:
    """GaLore-Adafactor: the factored second moment of the low-rank shape (plain parameters:
    of their own shape), the dense projector, and with ``beta1`` a first moment."""
    first = o.get("beta1") is not None
    if rank is None:
        return _F32 + _adafactor_second(shape, o) + (_moments_nbytes(shape, dtype, o, 1) if first else 0)
    side, lshape, head = _head(shape, rank, o)
    return (head + _adafactor_second(lshape, o) + (_moments_nbytes(lshape, dtype, o, 1) if first else 0)
            + _projector_numel(shape, rank, side) * _esize(dtype))


def _gradnormlorp_bytes(shape, dtype, rank, o) -> int:
    """GradNormLoRP: GaLore's state for the direction plus four float32 row vectors (the
    magnitude, the row norms and the magnitude's two Adam moments)."""
    if rank is None:
        return _adamw_bytes(shape, dtype, rank, o)
    return _galore_bytes(shape, dtype, rank, o) + 4 * _F32 * shape[0]


def _trion_bytes(shape, dtype, rank, o) -> int:
    """Trion: the full-size momentum buffer (float32, or the parameter's dtype with
    ``moment_dtype="param"``; float64 for float64) and ``step`` + ``side``; nothing of the
    low-rank shape (the indices and the orthogonalized update live only inside a step)."""
    if rank is None:
        return _adamw_bytes(shape, dtype, rank, o)
    size = _esize(dtype) if o.get("moment_dtype") == "param" or dtype == torch.float64 else _F32
    return _F32 + 1 + math.prod(shape) * size


# --------------------------------------------------------------------------- the entries
@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What an optimizer supports.

    ``bucketed``: projected weights that take the plain fused step are stepped in buckets,
    one multi-tensor op call per bucket (``foreach=False`` turns it off).
    ``capturable``: the ``capturable=True`` group key (step counts on the device, CUDA graphs).
    ``moment_bits``: the moment formats the name's state can take (``moment_bits`` group key:
    32 float32, 16 bfloat16, 8 block-wise uint8).
    ``distributed``: FSDP2 (DTensor) parameters; DDP works for every optimizer.
    """

    bucketed: bool
    capturable: bool
    moment_bits: Tuple[int, ...]
    distributed: bool


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer name (see the module docstring).

    ``target``: ``"module.Class"`` of the optimizer class (imported when used).
    ``state_bytes``: ``f(shape, dtype, rank, options) -> int``, the state bytes of one
    parameter after its first step (``rank`` None: a parameter of a plain group).
    ``constructor``: a classmethod to build with instead of the class (``"mini"``).
    ``settings``: constructor arguments the name implies (over the class defaults).
    ``fixed``: the keys of ``settings`` a caller may not change.
    ``subspace``: how a projected group is sized, ``"rank"`` or ``"density"``; None for a
    full-rank optimizer (every parameter plain).
    ``aliases``: other names :func:`get` accepts (the first is the Hugging Face
    ``Trainer`` spelling, see :mod:`lowrank_kernels.integrations.transformers`).
    ``label``: the name in benchmark tables.
    """

    name: str
    target: str
    state_bytes: Callable[..., int]
    capabilities: Capabilities
    constructor: Optional[str] = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fixed: Tuple[str, ...] = ()
    subspace: Optional[str] = "rank"
    aliases: Tuple[str, ...] = ()
    label: str = ""
    summary: str = ""

    @property
    def cls(self) -> type:
        """The optimizer class (imported on first use)."""
        module, _, attr = self.target.rpartition(".")
        return getattr(importlib.import_module(module), attr)

    @property
    def cls_name(self) -> str:
        return self.target.rpartition(".")[2]

    @property
    def lowrank(self) -> bool:
        """Whether the optimizer projects (False: a full-rank baseline such as torch's AdamW)."""
        return self.subspace is not None

    @property
    def trainer_name(self) -> Optional[str]:
        """The Hugging Face ``Trainer`` spelling (the first alias), if any."""
        return self.aliases[0] if self.aliases else None

    @cached_property
    def defaults(self) -> Dict[str, Any]:
        """Every hyper-parameter the name builds with when none is given: the class's
        constructor defaults (:func:`ctor_defaults`), the classmethod's preset when the
        name uses one (read from an optimizer it builds on a placeholder), then ``settings``."""
        out = ctor_defaults(self.cls)
        if self.constructor is not None:  # the preset: what the classmethod builds differently
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no parameter group is low-rank": by design
                plain, preset = (make([{"params": [torch.zeros(2, 2, requires_grad=True)], "rank": None,
                                        "density": None}]).defaults
                                 for make in (self.cls, getattr(self.cls, self.constructor)))
            out.update({k: v for k, v in preset.items() if k in out and plain.get(k) != v})
        out.update(self.settings)
        return out

    def build(self, params, **kwargs: Any):
        """The optimizer on ``params`` (a list of tensors or param groups): the name's
        ``settings``, then ``kwargs``. Changing a ``fixed`` setting is a ValueError."""
        for key in self.fixed:
            if key in kwargs and kwargs[key] != self.settings[key]:
                raise ValueError(f"optimizer {self.name!r} fixes {key}={self.settings[key]!r}; got {kwargs[key]!r}")
        ctor = getattr(self.cls, self.constructor) if self.constructor else self.cls
        return ctor(params, **{**self.settings, **kwargs})

    def param_state_nbytes(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                           rank: Optional[int] = None, **group: Any) -> int:
        """Bytes of one parameter's state after its first step (formula, nothing allocated).

        ``rank`` None is a parameter of a plain group; otherwise a projected 2-D weight at
        that rank. ``group`` holds the group's keys that differ from :attr:`defaults`
        (``moment_bits``, ``proj_type``, ``density``, ...).
        """
        o = {**self.defaults, **group}
        if rank is None and "density" not in group:
            o["density"] = None  # plain, also for a density-sized optimizer
        return int(self.state_bytes(tuple(int(s) for s in shape), dtype, rank, o))

    def expected_state_nbytes(self, param_groups: Sequence[Mapping[str, Any]], **kwargs: Any) -> int:
        """:meth:`param_state_nbytes` summed over ``param_groups`` (as given to :meth:`build`,
        with ``kwargs`` its keyword arguments): parameters of a group with a ``rank`` (or,
        for a density-sized optimizer, a ``density``) and two dimensions are projected."""
        total = 0
        for g in param_groups:
            o = {**self.defaults, **kwargs, **{k: v for k, v in g.items() if k != "params"}}
            rank = o.pop("rank", None)
            projected = self.lowrank and (rank is not None or (self.subspace == "density"
                                                               and o.get("density") is not None))
            for p in g["params"]:
                if projected and p.dim() == 2:
                    total += self.state_bytes(tuple(p.shape), p.dtype, rank, o)
                else:
                    total += self.state_bytes(tuple(p.shape), p.dtype, None, {**o, "density": None})
        return total


def ctor_defaults(cls: type) -> Dict[str, Any]:
    """The keyword arguments of ``cls.__init__`` that have defaults (``params`` left out)."""
    sig = inspect.signature(cls.__init__)
    return {k: v.default for k, v in sig.parameters.items()
            if k not in ("self", "params") and v.default is not inspect.Parameter.empty
            and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}


#: name -> spec, in table order (baseline first).
OPTIMIZERS: Dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to :data:`OPTIMIZERS` (a name or alias can be registered once)."""
    taken = {n for s in OPTIMIZERS.values() for n in (s.name, *s.aliases)}
    for n in (spec.name, *spec.aliases):
        if n in taken:
            raise ValueError(f"optimizer name {n!r} is already registered")
    OPTIMIZERS[spec.name] = spec
    return spec


def names(lowrank: Optional[bool] = None) -> List[str]:
    """The registered names in table order (only the projecting ones with ``lowrank=True``,
    only the baselines with ``lowrank=False``)."""
    return [n for n, s in OPTIMIZERS.items() if lowrank is None or s.lowrank == lowrank]


def get(name: str) -> OptimizerSpec:
    """The spec of ``name`` (a registered name or alias); ValueError naming the known ones."""
    if isinstance(name, str):
        spec = OPTIMIZERS.get(name)
        if spec is not None:
            return spec
        for s in OPTIMIZERS.values():
            if name in s.aliases:
                return s
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def spec_for(cls: type) -> List[OptimizerSpec]:
    """Every spec whose class is ``cls``."""
    return [s for s in OPTIMIZERS.values() if s.cls is cls]


_OPTIM = "lowrank_kernels.optim."
_ALL_BITS = (32, 16, 8)

register(OptimizerSpec(
    "adamw", "torch.optim.AdamW", _adamw_bytes,
    Capabilities(bucketed=True, capturable=True, moment_bits=(32,), distributed=True),
    subspace=None, label="torch-AdamW", summary="torch.optim.AdamW on every parameter (the baseline)"))

# The capabilities of the fused-step optimizers (capturable too), and of the other bucketed ones.
_FUSED = Capabilities(bucketed=True, capturable=True, moment_bits=_ALL_BITS, distributed=True)
#: multi-tensor steps by bucket, no capturable step.
_BUCKETED = Capabilities(bucketed=True, capturable=False, moment_bits=_ALL_BITS, distributed=True)


def _register_ours(name: str, cls: str, state_bytes, capabilities: Capabilities, alias: str, summary: str,
                   **kw) -> None:
    """Register this package's optimizer class ``cls`` (lowrank_kernels.optim) under ``name``,
    with the Hugging Face spelling ``alias``; its benchmark label is the class name unless given."""
    kw.setdefault("label", cls)
    register(OptimizerSpec(name, _OPTIM + cls, state_bytes, capabilities, aliases=(alias,), summary=summary, **kw))


_register_ours("galore", "GaLoreAdamW", _galore_bytes, _FUSED, "galore_adamw",
               "SVD projector, fused project-Adam-back-project step")
_register_ours("dct", "DCTAdamW", _dct_bytes, _FUSED, "dct_adamw", "DCT rows picked by gradient alignment (no SVD)")
_register_ours("qgalore", "QGaLoreAdamW", _qgalore_bytes, _BUCKETED, "qgalore_adamw",
               "GaLore with an INT4 projector and adaptive refresh")
_register_ours("apollo", "APOLLOAdamW", _apollo_bytes, _BUCKETED, "apollo_adamw",
               "seeded random projection, channel-wise scaling")
_register_ours("apollo-mini", "APOLLOAdamW", _apollo_bytes, _BUCKETED, "apollo_mini",
               "APOLLO at rank 1 with tensor-wise scaling (APOLLOAdamW.mini)", constructor="mini", label="APOLLO-Mini")
_register_ours("frugal", "FrugalAdamW", _frugal_bytes, _BUCKETED, "frugal_adamw",
               "AdamW in a subspace, signSGD on the residual", subspace="density")
_register_ours("gradnormlorp", "GradNormLoRPAdamW", _gradnormlorp_bytes,
               Capabilities(bucketed=True, capturable=False, moment_bits=_ALL_BITS, distributed=False),
               "gradnormlorp_adamw", "GaLore on the weight-normalized direction, Adam on its magnitude")
_register_ours("fira", "FiraAdamW", _fira_bytes,
               Capabilities(bucketed=True, capturable=False, moment_bits=_ALL_BITS, distributed=False),
               "fira_adamw", "GaLore plus the norm-scaled residual gradient, norm-growth limiter")
_register_ours("fira-dct", "FiraAdamW", _fira_bytes,
               Capabilities(bucketed=True, capturable=False, moment_bits=_ALL_BITS, distributed=False),
               "fira_dct_adamw", "Fira on DCT rows picked by gradient alignment (no SVD)",
               settings={"projector": "dct"}, label="FiraAdamW-DCT")
# Adafactor with an external learning rate (transformers' galore_adafactor, galore-torch's
# scripts): relative_step=False is what makes lr count, so the name fixes it. Its default
# beta1=None keeps no first moment: moment_bits (which applies to that moment) changes nothing.
_register_ours("adafactor", "GaLoreAdafactor", _adafactor_bytes,
               Capabilities(bucketed=True, capturable=False, moment_bits=(32,), distributed=False),
               "galore_adafactor", "GaLore's projector with Adafactor (factored second moment)",
               settings={"relative_step": False, "scale_parameter": False}, fixed=("relative_step",))
# Trion's AdamW groups take every moment format, its low-rank groups keep a float32 (or
# parameter-dtype) momentum buffer: moment_bits is refused there, so the entry says 32 only.
_register_ours("trion", "Trion", _trion_bytes,
               Capabilities(bucketed=True, capturable=False, moment_bits=(32,), distributed=False),
               "trion", "low-rank Muon: DCT rows picked from the momentum, Newton-Schulz on the slice")
