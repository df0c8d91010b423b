"""Every method of the demo as one :class:`Recipe` entry: its optimizer and its hyper-parameters.

Every recipe has two learning rates: ``lr`` for the projected weights (the attention
and MLP linears that :func:`lowrank_kernels.optim.lowrank_param_groups` selects) and
``other_lr`` for every other parameter (embeddings, LM head, norms), which every
optimizer here trains with plain AdamW (except ``adafactor``: plain Adafactor, as
galore-torch's GaLoreAdafactor does). The low-rank recipes take the papers' values
(the papers use one lr for both); the AdamW baseline's pair is chosen per preset by
the tuning grid (``--tune adamw``) on the tuning split, and its result file is in
``bench/results/``. The control row ``frozen`` is the low-rank recipes' treatment of
the other parameters (AdamW at their ``other_lr``) with the projected weights frozen
at their initial values: a low-rank method that does not beat it clearly has not
learned anything through its projected updates.

Adding a method is one :func:`register` call, e.g. for an optimizer ``"foo"`` of the
optimizer registry (:mod:`lowrank_kernels.optim.registry`) that takes the usual low-rank
groups::

    register(Recipe("foo", lowrank_builder("foo", proj_type="std"),
                    dict(lr=1e-2, other_lr=1e-2, scale=0.25),
                    requires=requires_of("foo"),
                    source="Foo paper, Table 3: lr 0.01, scale 0.25"))

(placed above ``METHODS`` at the end of this file). When its class does not import, the
row is listed as unavailable instead of failing. The optimizer itself (class, preset
constructor, settings) comes from the registry; a recipe holds only the demo's
hyper-parameters. The row then appears in
``python -m bench.convergence`` (``--optimizers foo``), in the table against AdamW and
the control, and in the tests: a ``role="lowrank"`` method must beat the frozen control.

``lowrank_builder`` covers optimizers that take ``lowrank_param_groups`` (with extra
group keys, optimizer keyword arguments, or a model preparation such as INT8
quantization); a method
that needs something else passes its own ``build(model, preset, hp)``, and one that
acts between steps (e.g. a layer sampler) a ``callback(model, optimizer, preset, hp)``
factory returning ``f(step)``, called after every optimizer step.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional

import torch

from .presets import Preset

# Attention and MLP linears of LlamaForCausalLM live under "...self_attn.*" / "...mlp.*".
TARGET_MODULES = ("attn", "mlp")

HP = Mapping[str, Any]
Builder = Callable[[torch.nn.Module, Preset, dict], torch.optim.Optimizer]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One method of the demo.

    ``hparams`` are the defaults (numbers, or callables of the :class:`Preset` for
    values that scale with the model); ``per_preset`` overrides them for one preset
    (e.g. the tuned AdamW pair). ``role`` is ``"baseline"`` (AdamW), ``"control"``
    (the frozen-weights control) or ``"lowrank"`` (a method that must beat the control).
    ``requires`` lists ``(module, attribute)`` pairs that must import for the method to
    run; ``source`` says where the values come from.

    ``tune`` is the method's tuning grid for the protocol (:mod:`.protocol`), one entry
    per hyper-parameter: numbers, or strings ``"x0.5"`` (multiples of the recipe's own
    value); None takes :data:`~bench.convergence.protocol.DEFAULT_GRID` (the baseline
    and low-rank methods) or tunes nothing (the control). ``headline=False`` marks a
    study variant: run only when named in ``--optimizers``, never by default.
    """

    name: str
    build: Builder
    hparams: HP
    role: str = "lowrank"
    requires: tuple = ()
    per_preset: Mapping[str, HP] = dataclasses.field(default_factory=dict)
    source: str = ""
    callback: Optional[Callable] = None
    tune: Optional[Mapping[str, tuple]] = None
    headline: bool = True

    def __post_init__(self):
        if self.role not in ("baseline", "control", "lowrank"):
            raise ValueError(f"Recipe {self.name!r}: role must be baseline, control or lowrank, got {self.role!r}")
        needed = {"other_lr"} if self.role == "control" else {"lr", "other_lr"}
        missing = needed - set(self.hparams)
        if missing:
            raise ValueError(f"Recipe {self.name!r}: hparams lacks {sorted(missing)}")

    def resolve(self, preset: Preset, overrides: Optional[HP] = None) -> dict:
        """The hyper-parameters for ``preset``: defaults, then ``per_preset``, then ``overrides``."""
        hp = dict(self.hparams)
        hp.update(self.per_preset.get(preset.name, {}))
        for k, v in (overrides or {}).items():
            if k not in hp:
                raise ValueError(f"{self.name}: no hyper-parameter {k!r} (has {', '.join(sorted(hp))})")
            hp[k] = v
        return {k: (v(preset) if callable(v) else v) for k, v in hp.items()}

    def why_unavailable(self) -> Optional[str]:
        """``None`` when everything in ``requires`` imports, else the reason."""
        for module, name in self.requires:
            try:
                mod = importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 - any import failure makes the method unavailable
                return f"cannot import {module} ({type(e).__name__}: {e})"
            obj = mod
            for part in name.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    return f"{module}.{name} does not exist yet"
        return None


RECIPES: dict[str, Recipe] = {}

# The protocol's second row of a method whose tuned hyper-parameters differ from its
# recipe's: "galore (paper recipe)" next to the tuned "galore".
PAPER_SUFFIX = " (paper recipe)"


def base_of(row: str) -> str:
    """The recipe name of a table row: ``"galore (paper recipe)"`` -> ``"galore"``."""
    return row[: -len(PAPER_SUFFIX)] if row.endswith(PAPER_SUFFIX) else row


def recipe_of(row: str) -> Optional[Recipe]:
    """The :class:`Recipe` of a table row, or None for a row of an unknown method."""
    return RECIPES.get(base_of(row))


def register(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to :data:`RECIPES` (a name can be registered once)."""
    if recipe.name in RECIPES:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


# ----------------------------------------------------------------------------- groups

def is_plain_group(group: dict) -> bool:
    """The group ``lowrank_param_groups`` leaves to plain AdamW (marked rank=None, density=None)."""
    return "rank" in group and group["rank"] is None and "density" in group and group["density"] is None


def split_groups(model: torch.nn.Module, preset: Preset, hp: dict, *, rank: Optional[int],
                 plain_keys: Optional[dict] = None, gap: Optional[int] = None, **extra) -> list[dict]:
    """``lowrank_param_groups`` for the demo's target modules, each group with its own lr.

    The projected group gets ``hp["lr"]`` (and ``hp["scale"]`` when the recipe has one),
    ``update_proj_gap`` ``gap`` (default: the preset's) and ``extra``, the plain group
    ``hp["other_lr"]`` and ``plain_keys``.
    """
    from lowrank_kernels.optim import lowrank_param_groups

    groups = lowrank_param_groups(model, target_modules=TARGET_MODULES, rank=rank,
                                  update_proj_gap=preset.gap if gap is None else gap,
                                  scale=hp.get("scale"), **extra)
    for g in groups:
        g["lr"] = hp["other_lr"] if is_plain_group(g) else hp["lr"]
        if is_plain_group(g):
            g.update(plain_keys or {})
    return groups


def _spec(name: str):
    """The registered optimizer ``name`` (:mod:`lowrank_kernels.optim.registry`), or None."""
    from lowrank_kernels.optim import registry

    return registry.OPTIMIZERS.get(name)


def lowrank_builder(name: str, *, rank: Optional[Callable[[Preset], Optional[int]]] = None,
                    group_keys: Optional[Callable[[dict], dict]] = None,
                    plain_group_keys: Optional[Callable[[dict], dict]] = None,
                    opt_kwargs: Optional[Callable[[dict], dict]] = None,
                    prepare: Optional[Callable[[torch.nn.Module], None]] = None,
                    constructor: Optional[str] = None, gap: Optional[Callable[[Preset], int]] = None,
                    **fixed_group_keys) -> Builder:
    """A builder for optimizer ``name`` on :func:`split_groups`.

    ``name`` is a name of :mod:`lowrank_kernels.optim.registry` (``"galore"``,
    ``"apollo-mini"``: its class, preset constructor and settings come from there) or a
    class of ``lowrank_kernels.optim`` (``"FooAdamW"``). ``rank(preset)`` (default: the
    preset's rank), ``group_keys(hp)`` / ``fixed_group_keys`` (extra keys of the projected
    group), ``plain_group_keys(hp)`` (extra keys of the plain group, e.g. its moment
    format), ``opt_kwargs(hp)`` (optimizer keyword arguments), ``prepare(model)`` (run
    first, e.g. INT8 quantization), ``constructor`` (a class method to call instead of
    the class, e.g. ``"mini"``; a registered name brings its own) and ``gap(preset)``
    (the projector refresh gap; default: the preset's).
    """

    def build(model, preset, hp):
        spec = _spec(name)
        if prepare is not None:
            prepare(model)
        r = preset.rank if rank is None else rank(preset)
        keys = dict(fixed_group_keys)
        keys.update(group_keys(hp) if group_keys else {})
        groups = split_groups(model, preset, hp, rank=r,
                              plain_keys=plain_group_keys(hp) if plain_group_keys else None,
                              gap=None if gap is None else gap(preset), **keys)
        kwargs = dict(lr=hp["lr"], weight_decay=0.0, **(opt_kwargs(hp) if opt_kwargs else {}))
        if spec is not None and constructor is None:
            return spec.build(groups, **kwargs)
        cls = spec.cls if spec is not None else getattr(importlib.import_module(_OPTIM), name)
        ctor = getattr(cls, constructor) if constructor else cls
        return ctor(groups, **kwargs)

    build.__name__ = f"build_{name}"
    return build


def requires_of(name: str) -> tuple:
    """``requires`` of a recipe on registered optimizer ``name``: its class (and preset
    constructor) and ``lowrank_param_groups``."""
    spec = _spec(name)
    if spec is None:
        raise ValueError(f"{name!r} is not a registered optimizer (lowrank_kernels.optim.registry)")
    module, _, cls_name = spec.target.rpartition(".")
    attr = f"{cls_name}.{spec.constructor}" if spec.constructor else cls_name
    return (_GROUPS, (module, attr))


def _adamw(model, preset, hp):
    """torch AdamW with the projected weights at ``lr`` and the other parameters at ``other_lr``."""
    groups = split_groups(model, preset, hp, rank=preset.rank)
    return torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups], lr=hp["lr"],
                             weight_decay=0.0)


def _frozen(model, preset, hp):
    """The control: the projected weights frozen (no gradient), AdamW at ``other_lr`` on the rest."""
    groups = split_groups(model, preset, dict(hp, lr=0.0), rank=preset.rank)
    plain = [g for g in groups if is_plain_group(g)]
    for g in groups:
        if not is_plain_group(g):
            for p in g["params"]:
                p.requires_grad_(False)
    return torch.optim.AdamW([{"params": g["params"], "lr": hp["other_lr"]} for g in plain], lr=hp["other_lr"],
                             weight_decay=0.0)


def _quantize(model):
    from lowrank_kernels.nn import quantize_linear_layers

    quantize_linear_layers(model, target_modules=TARGET_MODULES)


_OPTIM = "lowrank_kernels.optim"
_GROUPS = (_OPTIM, "lowrank_param_groups")

# The best (lr, other_lr) of the AdamW grid on the quick preset's tuning split:
# bench/results/convergence_tuning-adamw.json (a test checks the two agree).
ADAMW_QUICK = dict(lr=2e-3, other_lr=1e-1)

# AdamW: torch's, no paper value carries over to this model size, so both lrs come from
# the tuning grid (3 x 3 on the tuning split, extended until the best pair was inside it,
# ``--tune adamw``) for the quick preset;
# the gpu preset (not tuned: no GPU run yet) uses the GaLore paper's AdamW lr 1e-3.
register(Recipe(
    "adamw", _adamw, dict(lr=1e-3, other_lr=1e-3), role="baseline",
    per_preset={"quick": ADAMW_QUICK, "tiny": ADAMW_QUICK},
    source="quick: best pair of the lr x other_lr grid (3x3, extended until the best was inside) in "
           "bench/results/convergence_tuning-adamw.json; "
           "gpu: GaLore paper's AdamW lr 1e-3 (LLaMA-60M), not tuned here; tiny (tests only): quick's pair"))
# The control: what every low-rank recipe does with the non-projected parameters (AdamW
# at lr 0.01), with the projected weights frozen at their initial values.
register(Recipe(
    "frozen", _frozen, dict(other_lr=1e-2), role="control",
    source="the low-rank recipes' other_lr (0.01); projected weights frozen"))
# GaLore paper: lr 0.01 (every parameter), scale 0.25, rank 1/4 of hidden, gap 200.
register(Recipe(
    "galore", lowrank_builder("galore", proj_type="std"), dict(lr=1e-2, other_lr=1e-2, scale=0.25),
    requires=requires_of("galore"),
    source="GaLore paper (Zhao et al. 2024), LLaMA pre-training: lr 0.01, scale 0.25"))
# DCT-AdamW: GaLore's recipe with the DCT projector (the paper reuses GaLore's setup).
register(Recipe(
    "dct", lowrank_builder("dct", proj_type="std"), dict(lr=1e-2, other_lr=1e-2, scale=0.25),
    requires=requires_of("dct"),
    source="DCT-AdamW paper (Modoranu et al. 2025) reuses GaLore's recipe: lr 0.01, scale 0.25"))
# Fira: the LLaMA-60M pre-training script of the Fira repository (xichen-fy/Fira,
# pre_training_c4/scripts/llama_60m.sh): lr 0.01, alpha (our scale) 0.25, gap 200, weight decay 0;
# with the SVD projector and with the DCT one (an SVD-free Fira, not in the paper).
register(Recipe(
    "fira", lowrank_builder("fira", proj_type="std"), dict(lr=1e-2, other_lr=1e-2, scale=0.25),
    requires=requires_of("fira"),
    source="Fira repository's LLaMA-60M pre-training script (Chen et al. 2024): lr 0.01, alpha 0.25, gap 200"))
register(Recipe(
    "fira-dct", lowrank_builder("fira-dct", proj_type="std"), dict(lr=1e-2, other_lr=1e-2, scale=0.25),
    requires=requires_of("fira-dct"),
    source="the fira recipe (lr 0.01, scale 0.25) with projector='dct' (DCT rows as DCT-AdamW picks them)"))
# Q-GaLore: GaLore's lr and scale with the INT4 projector and INT8 weights.
register(Recipe(
    "qgalore", lowrank_builder("qgalore", prepare=_quantize, proj_type="std"),
    dict(lr=1e-2, other_lr=1e-2, scale=0.25),
    requires=requires_of("qgalore") + (("lowrank_kernels.nn", "quantize_linear_layers"),),
    source="Q-GaLore paper (Zhang et al. 2024): GaLore's lr 0.01 and scale 0.25"))
# APOLLO paper: lr 0.01, scale 1, channel-wise, rank 1/4 of the dimension.
register(Recipe(
    "apollo", lowrank_builder("apollo", proj_type="std", scale_type="channel"),
    dict(lr=1e-2, other_lr=1e-2, scale=1.0),
    requires=requires_of("apollo"),
    source="APOLLO paper (Zhu et al. 2025): lr 0.01, scale 1, channel-wise"))
# APOLLO-Mini: lr 0.01, rank 1, tensor-wise, scale 128 at LLaMA-60M (hidden 512). With
# rank 1 the tensor-wise factor makes the update norm ~ sqrt(scale / n) of Adam's (n =
# hidden for LLaMA linears), which is why APOLLO raises the scale for larger models;
# keeping that ratio gives scale = 128 * hidden / 512 (32 for quick, 128 for gpu).
register(Recipe(
    "apollo-mini", lowrank_builder("apollo-mini", rank=lambda p: 1, proj_type="std", scale_type="tensor"),
    dict(lr=1e-2, other_lr=1e-2, scale=lambda p: 128.0 * p.hidden / 512),
    requires=requires_of("apollo-mini"),
    source="APOLLO paper: APOLLO-Mini lr 0.01, rank 1, scale 128 at hidden 512 (scaled with hidden)"))
# FRUGAL paper: AdamW's lr for the state-full part, density 0.25, signSGD on the
# residual with inactive_lr_scale 1.0 (pre-training). The paper's AdamW lr is its tuned
# baseline's, so FRUGAL follows the tuned AdamW pair of the preset.
register(Recipe(
    "frugal", lowrank_builder("frugal", rank=lambda p: None, group_keys=lambda hp: {"density": hp["density"]},
                              opt_kwargs=lambda hp: dict(projection="svd", update="signsgd",
                                                         inactive_lr_scale=hp["inactive_lr_scale"]),
                              proj_type="std"),
    dict(lr=lambda p: RECIPES["adamw"].resolve(p)["lr"], other_lr=lambda p: RECIPES["adamw"].resolve(p)["other_lr"],
         density=0.25, inactive_lr_scale=1.0),
    requires=requires_of("frugal"),
    source="FRUGAL paper (Zmushko et al. 2025): the AdamW baseline's lr, density 0.25, signSGD residual"))

# GradNormLoRP (our interpretation: GaLore-Adam on the weight-normalized direction, Adam
# on the row norms): the official repo's torch_main.sh values for its
# weight_norm_galore_adamw runs, lr 0.01 and scale 0.25 (GaLore's recipe).
register(Recipe(
    "gradnormlorp", lowrank_builder("gradnormlorp", proj_type="std"), dict(lr=1e-2, other_lr=1e-2, scale=0.25),
    requires=requires_of("gradnormlorp"),
    source="GradNormLoRP official scripts (torch_main.sh, --optimizer weight_norm_galore_adamw): lr 0.01, "
           "scale 0.25"))
# GaLore-Adafactor: galore-torch's torchrun_main.py builds GaLoreAdafactor with the
# command line's lr and HF-style options relative_step=False, scale_parameter=False,
# warmup_init=False (beta1 None = no first moment, its default --beta1 0.0), eps
# (1e-30, 1e-3), clip 1.0, decay_rate -0.8; lr and scale as the GaLore recipe. Its
# non-projected parameters get plain Adafactor (galore-torch's behaviour), not AdamW.
register(Recipe(
    "adafactor", lowrank_builder("adafactor", proj_type="std",
                                 opt_kwargs=lambda hp: dict(scale_parameter=False, relative_step=False,
                                                            warmup_init=False, beta1=None)),
    dict(lr=1e-2, other_lr=1e-2, scale=0.25),
    requires=requires_of("adafactor"),
    source="galore-torch torchrun_main.py (--optimizer galore_adafactor): relative_step=False, "
           "scale_parameter=False, warmup_init=False, beta1 None; lr 0.01 and scale 0.25 as GaLore's recipe"))


# 8-bit moments: GaLore's and DCT-AdamW's recipes with moment_bits=8 on every group,
# as galore-torch's GaLoreAdamW8bit does (bitsandbytes' 8-bit Adam on the projected and the
# other parameters): uint8 block-wise codes, float32 absmax per block of 256, moments with
# fewer than min_8bit_size elements (bitsandbytes' default 4096: here the norms) in float32.
# The quick preset's smallest projected moment (128 x 32) has exactly 4096 elements; the
# tiny preset's are smaller, so the tests' preset lowers the threshold to keep them 8-bit.
def _moments_keys(hp: dict) -> dict:
    return {"moment_bits": int(hp["moment_bits"]), "min_8bit_size": int(hp["min_8bit_size"])}


def _check_moment_format(model, optimizer, preset, hp):
    """After the first step: every moment of ``min_8bit_size`` elements or more must be uint8
    (an optimizer that ignored ``moment_bits`` would otherwise train in float32 under this name)."""
    def check(step: int) -> None:
        if step != 0:
            return
        moments = [t for st in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")
                   if isinstance(t := st.get(k), torch.Tensor)]
        big = [t for t in moments if t.numel() >= hp["min_8bit_size"]]
        wrong = [t for t in big if t.dtype != torch.uint8]
        if not big or wrong:
            raise RuntimeError(f"moment_bits={hp['moment_bits']}: {len(wrong)} of {len(big)} moments with >= "
                               f"{hp['min_8bit_size']} elements are not uint8 (dtypes "
                               f"{sorted({str(t.dtype) for t in moments})}); the optimizer did not apply moment_bits")
    return check


_M8 = dict(moment_bits=8, min_8bit_size=4096)
_M8_TINY = {"tiny": dict(min_8bit_size=512)}
register(Recipe(
    "galore-8bit", lowrank_builder("galore", proj_type="std", group_keys=_moments_keys,
                                   plain_group_keys=_moments_keys),
    dict(lr=1e-2, other_lr=1e-2, scale=0.25, **_M8), per_preset=_M8_TINY,
    requires=requires_of("galore"), callback=_check_moment_format,
    source="GaLore's recipe (lr 0.01, scale 0.25) with 8-bit moments on every group as galore-torch's "
           "GaLoreAdamW8bit (bitsandbytes' min_8bit_size 4096); tiny (tests only): min_8bit_size 512"))
register(Recipe(
    "dct-8bit", lowrank_builder("dct", proj_type="std", group_keys=_moments_keys,
                                plain_group_keys=_moments_keys),
    dict(lr=1e-2, other_lr=1e-2, scale=0.25, **_M8), per_preset=_M8_TINY,
    requires=requires_of("dct"), callback=_check_moment_format,
    source="the dct recipe (lr 0.01, scale 0.25) with 8-bit moments on every group, as galore-8bit; "
           "tiny (tests only): min_8bit_size 512"))

# Projection-aware moments (LDAdam, Robert et al. 2025): GaLore's and DCT-AdamW's recipes with
# moment_transport=True, so each refresh rotates the moments into the new subspace (for DCT:
# re-indexes them) instead of keeping them in the old coordinates.
register(Recipe(
    "galore-transport", lowrank_builder("galore", proj_type="std", moment_transport=True),
    dict(lr=1e-2, other_lr=1e-2, scale=0.25),
    requires=requires_of("galore"),
    source="GaLore's recipe (lr 0.01, scale 0.25) with moment_transport=True (LDAdam's projection-aware "
           "moments; LDAdam itself tunes no separate lr for it)"))
register(Recipe(
    "dct-transport", lowrank_builder("dct", proj_type="std", moment_transport=True),
    dict(lr=1e-2, other_lr=1e-2, scale=0.25),
    requires=requires_of("dct"),
    source="the dct recipe (lr 0.01, scale 0.25) with moment_transport=True (moments re-indexed at a refresh)"))
# Trion: the package's defaults for its Muon groups (lr 0.02, momentum 0.95) with the
# original's "kj" scaling and Triton Newton-Schulz schedule; it has no refresh schedule, so
# the preset's gap is left out of its groups. The other parameters take AdamW at the demo's
# other_lr, as in every low-rank recipe.
def _trion_build(model, preset, hp):
    groups = split_groups(model, preset, hp, rank=preset.rank, proj_type="std")
    for g in groups:
        g.pop("update_proj_gap", None)
    return _spec("trion").build(groups, lr=hp["lr"], weight_decay=0.0)


register(Recipe(
    "trion", _trion_build, dict(lr=2e-2, other_lr=1e-2),
    requires=requires_of("trion"),
    source="Trion (IST-DASLab, ICLR 2026), ista-daslab-optimizers 1.1.15 defaults: lr 0.02, momentum 0.95; "
           "scaling 'kj', Newton-Schulz 'dion'; other parameters AdamW at 0.01 as the other low-rank recipes"))
# DCT-AdamW variants for the DCT-vs-GaLore study (docs/dct_gap.md; run only when named,
# e.g. --optimizers dct,dct-t1): what the official code (ista-daslab-optimizers
# DCTAdamW) does differently from the dct row. Its defaults refresh the index set every
# step (update_proj_gap=1) and keep the moments as they are (rotate_subspace=False);
# rotate_subspace=True carries them over, which for a shared orthonormal basis is our
# moment_refresh="reindex". Its update has no scale factor (scale 1): lr x scale is the
# only product that enters the projected update, so that is a choice of lr (the tuning grid).
for _name, _gap, _refresh, _norm, _why in (
        ("dct-t1", 1, "keep", 1, "the official code's defaults: refresh every step, moments kept"),
        ("dct-t1-reindex", 1, "reindex", 1, "refresh every step, moments carried over (rotate_subspace=True)"),
        ("dct-reindex", None, "reindex", 1, "the preset's gap, moments carried over at a refresh"),
        ("dct-l2", None, "keep", 2, "the preset's gap, L2 alignment scores")):
    register(Recipe(
        _name, lowrank_builder("dct", proj_type="std", moment_refresh=_refresh, norm=_norm,
                               gap=None if _gap is None else (lambda p, g=_gap: g)),
        dict(lr=1e-2, other_lr=1e-2, scale=0.25), requires=requires_of("dct"), headline=False,
        source=f"the dct recipe (lr 0.01, scale 0.25), {_why}"))
del _name, _gap, _refresh, _norm, _why

# APOLLO-Mini study (run only when named): APOLLO-Mini differs from APOLLO in two ways at
# once, rank 1 instead of the preset's rank and one scaling factor per tensor instead of one
# per channel; each variant changes one of them on the apollo recipe.
for _name, _rank, _scaling, _why in (
        ("apollo-rank1", lambda p: 1, "channel", "rank 1, channel-wise scaling (APOLLO-Mini's rank only)"),
        ("apollo-tensor", None, "tensor", "the preset's rank, tensor-wise scaling (APOLLO-Mini's scaling only)")):
    register(Recipe(
        _name, lowrank_builder("apollo", rank=_rank, proj_type="std", scale_type=_scaling),
        dict(lr=1e-2, other_lr=1e-2, scale=1.0), requires=requires_of("apollo"), headline=False,
        source=f"the apollo recipe (lr 0.01, scale 1), {_why}"))
del _name, _rank, _scaling, _why

# New methods: a register(...) call above this line. (The command line reads RECIPES
# itself, so a recipe registered elsewhere before it runs is also available.)
METHODS = tuple(RECIPES)
# What a run without --optimizers trains (the study variants only when named).
HEADLINE = tuple(m for m, r in RECIPES.items() if r.headline)
