"""The shared base of the low-rank optimizers: :class:`LowRankOptimizer`.

It owns everything the methods have in common, so that each method file only says
how its projector is made and how one projected step is taken:

- **param selection per group**: a group is *low-rank* when :meth:`_is_lowrank`
  says so (by default: ``group["rank"]`` is not None, the galore-torch convention);
  every other group gets plain AdamW, computed by ``torch.optim.adamw.adamw`` so it
  is bit-identical to ``torch.optim.AdamW``;
- **validation with clear errors** (:meth:`add_param_group`), before anything is
  stored: hyper-parameters, 2-D parameters in low-rank groups, rank range, one
  device per group. Errors name the optimizer, the group, the parameter and the
  problem;
- **state init** (:meth:`_init_state`), **the refresh schedule**
  (:meth:`_should_refresh`: at steps 1, T+1, 2T+1, ... i.e. ``(t - 1) % T == 0``
  with ``t`` the 1-based step), and **the side decision**: made once per parameter
  from its shape and ``proj_type`` (:func:`resolve_side`) and stored in
  ``state["side"]``, then used for projection and back-projection alike (the
  reference packages re-derive the back-projection side from the moment's shape,
  which is wrong for ``reverse_std`` when ``rank >= min(m, n)``);
- **state-dict handling**: state holds tensors only, so ``state_dict()`` survives
  ``torch.save`` + ``torch.load(weights_only=True)``. :meth:`load_state_dict` keeps
  every saved tensor's dtype (torch's default casts floating state to the
  parameter's dtype) and keeps the host-side bookkeeping tensors
  (:attr:`host_state_keys`: ``step``, ``side``, ``seed``, ...) on the CPU, so that
  reading them never synchronizes with an accelerator;
- **non-finite gradients**: with ``skip_nonfinite=True`` (the default, a group key)
  a parameter whose gradient holds a NaN or an infinity is *skipped*: its weight,
  its moments, its projector and its step count stay exactly as they were; the
  other parameters are updated normally, and :attr:`nonfinite_skips` counts the
  skipped parameter-steps. The check costs one host synchronization per
  :meth:`step` call (one fused inf-norm per device, read back once), never one per
  parameter. With ``skip_nonfinite=False`` nothing is checked and a non-finite
  gradient propagates as in ``torch.optim.AdamW``;
- **moment dtype** (``moment_dtype``, a group key, default ``"float32"``): the
  Adam moments of every parameter, projected or plain, are stored in float32
  (float64 for float64 parameters) even when the parameter is bfloat16 or float16.
  ``moment_dtype="param"`` stores them in the parameter's dtype instead (as
  torch.optim.AdamW and the reference packages do), on explicit request only,
  because 16-bit moments break Adam: in bfloat16 (8 significant bits) ``0.999 * V``
  rounds back to ``V``, so the second moment stops decaying (``beta2 > 1 - 2^-9``
  has no effect), and in float16 ``(1 - beta2) R^2`` underflows to zero for
  ``|R| < ~5e-3`` at ``beta2 = 0.999`` (below half the smallest float16 subnormal,
  2^-25), so ``V`` stays 0 and the step becomes
  ``M / eps``. A checkpoint's moments keep their saved dtype;
- **moment formats** (group keys ``moment_bits`` = 32 (default) | 16 | 8,
  ``block_size`` (256, in [1, 256]) and ``min_8bit_size`` (4096), for every optimizer and
  for the plain-AdamW groups; :data:`MOMENT_BITS_DEFAULTS`). ``32``: the moments above.
  ``16`` (any parameter dtype, float32 master weights included): ``exp_avg`` / ``exp_avg_sq`` are
  bfloat16 and every store of an updated moment rounds *stochastically* (seed
  :meth:`LowRankOptimizer._moment_seed`, a hash of the parameter's position and the
  step: deterministic and resumable), so the second moment
  keeps decaying in expectation (round-to-nearest bfloat16 would freeze it, see above).
  ``8``: ``exp_avg`` / ``exp_avg_sq`` are uint8 codes of the moment's shape and
  ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` float32 block maxima of shape
  ``shape[:-1] + (ceil(cols / block_size),)`` (blocks of <= ``block_size`` elements inside
  one row; bitsandbytes' dynamic map, signed for ``exp_avg``, unsigned for ``exp_avg_sq``:
  :mod:`lowrank_kernels.reference.moments`), i.e. ``2 numel + 8 rows ceil(cols / 256)``
  bytes for the pair instead of ``8 numel``. The kernels dequantize, update in float32,
  compute ``N`` from the float32 values and requantize in the same pass. A moment with
  fewer than ``min_8bit_size`` elements (or a 0-d one) stays in the 32-bit format. The
  format of a parameter is fixed when its state is created and read back from the state
  tensors' dtypes (uint8: 8-bit; bfloat16 in a ``moment_bits=16`` group: 16-bit with
  stochastic rounding). :meth:`LowRankOptimizer.load_state_dict` keeps *this* optimizer's
  ``moment_bits`` / ``block_size`` / ``min_8bit_size`` (the saved groups' other keys are
  restored, as torch does) and converts the saved moments to that format: float moments
  loaded into a ``moment_bits=8`` group are quantized (moments below ``min_8bit_size``
  stay float), float32/float64 moments loaded into a ``moment_bits=16`` group are rounded
  to bfloat16 (to nearest), 8-bit moments are dequantized (with the
  saved group's ``block_size``) into a ``moment_bits=32`` / ``16`` group or requantized for
  another ``block_size``; bfloat16 moments in a ``moment_bits=32`` group keep their dtype
  (as ``moment_dtype="param"`` ones). So a float32 checkpoint resumes as 8-bit by loading
  it into an optimizer built with ``moment_bits=8``. 8-bit and 16-bit formats need
  ``moment_dtype="float32"`` (the default);
- **failed projector refreshes**: when making a new projector fails (the SVD
  raises or returns non-finite values), the previous projector is kept and the step
  is taken with it; when there is no previous projector (the parameter's first
  step) the parameter is skipped and no state is created for it. Either way no NaN
  reaches the weights;
- **capturable** (``capturable=True``, a group key of the optimizers that set
  :attr:`LowRankOptimizer.supports_capturable`): ``step`` lives on the parameter's device,
  the non-finite check and the bias-corrected step sizes are computed on the device and a
  non-refresh step reads no tensor value on the host (:meth:`_capturable_step`), so it can be
  captured in a CUDA graph; refresh steps synchronize. ``lr`` may then be a 0-dim device
  tensor. Skips are counted on the device (:meth:`nonfinite_skip_count`);
  :meth:`sync_step_counts` re-reads the device step counts after graph replays;
- **compat mode** (``compat``, a group key or constructor argument of the
  optimizers that declare it in :attr:`LowRankOptimizer.compat_modes`):
  ``compat="galore-torch"`` / ``"apollo-torch"`` reproduces the official package's
  arithmetic in *every* group: the transformers-style AdamW of those packages
  (``denom = sqrt(v) + eps`` before bias correction, ``step_size = lr * sqrt(1 -
  b2^t) / (1 - b1^t)``, weight decay *after* the update, ``W <- W - lr * wd * W`` on
  the updated weight) for the plain groups (:meth:`_plain_step_compat`), and the
  decay-after-update order in the projected groups (:meth:`_post_decay`). The
  default ``compat=None`` keeps torch.optim.AdamW's conventions (decay first, eps
  after bias correction) for the plain groups.

Extension points (what a subclass overrides; the DCT and Q-GaLore optimizers are
built this way):

``_is_lowrank(group)``
    whether a group is projected.
``_group_rank(group, shape)``
    the rank used for a parameter of ``shape`` (FRUGAL derives it from ``density``).
``_validate_lowrank_group(group, gi)``
    extra per-group checks (call ``super()``).
``_init_state(p, state, group)``
    fill a fresh state dict: the base sets ``step`` (CPU float32 tensor, as in
    torch's AdamW) and ``side`` (CPU int8 tensor: 0 right, 1 left, 2 full); a
    subclass adds its moments.
``_should_refresh(p, state, group, step)``
    whether step ``step`` (1-based) makes a new projector. Default: no projector
    yet (:meth:`_has_projector`) or ``(step - 1) % update_proj_gap == 0``.
``_refresh_projector(p, grad, state, group, step) -> bool``
    make the new projector and store it in ``state``; return False (and change
    nothing) on failure. The default calls :meth:`_compute_projector` and stores its
    result as ``state["projector"]``.
``_compute_projector(p, grad, state, group, step)``
    the projection-producing part: return the new projector tensor, or None on
    failure.
``_get_projector(p, state, group)``
    what the step passes as ``proj`` to ``lowrank_kernels.ops`` (a tensor, or a
    structured projector registered with ``ops.register_projector_type``).
``_project_step(p, grad, state, group, step)``
    the update itself, through ``lowrank_kernels.ops``; ``state["step"]`` has
    already been incremented to ``step``.

Hot-path rules: no ``.item()`` on accelerator tensors per parameter (``step``,
``side`` and ``seed`` live on the CPU), no ``torch.cuda`` calls, no ``p.data``
swapping; all projected math goes through ``lowrank_kernels.ops``.

Host cost of a step: ``step`` and ``side`` are read through host mirrors
(:meth:`LowRankOptimizer._host_int`: a Python int per tensor, used while the tensor is the
same object with an unchanged version counter, so a count changed in place or replaced,
``load_state_dict`` included, is read again); a bucket's step counts are incremented with
one ``torch._foreach_add_`` and their mirrors updated, so a bucketed non-refresh step reads
no bookkeeping tensor; the non-finite probe is one ``_foreach_norm``, a ``stack``, a ``max``
and one host read per device when every gradient is finite (the exact per-gradient check
runs only otherwise). The multi-tensor op validates a bucket's structure once and then
only rechecks scalars, gradient memory and DCT index values (``ops/_registry.py``).
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from itertools import chain
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as _adamw_functional

from lowrank_kernels import ops
from lowrank_kernels.ops._checks import _native_helpers
from lowrank_kernels.ops._registry import plain_eager
from lowrank_kernels.reference import moments as _moments

from . import distributed as _dist

SIDE_NAMES = ("right", "left", "full")
SIDE_CODES = {name: code for code, name in enumerate(SIDE_NAMES)}
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
#: every ``compat`` value some optimizer of this package accepts (see the module docstring).
COMPAT_MODES = ("galore-torch", "apollo-torch")
#: values of the ``moment_dtype`` group key (see the module docstring).
MOMENT_DTYPES = ("float32", "param")
#: values of the ``moment_bits`` group key (see the module docstring).
MOMENT_BITS = (32, 16, 8)
#: the moment-format group keys and their defaults (see the module docstring).
MOMENT_BITS_DEFAULTS = {"moment_bits": 32, "block_size": 256, "min_8bit_size": 4096}
#: ``state`` key of the float32 block maxima of each 8-bit moment.
ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}


def resolve_side(shape: Tuple[int, int], proj_type: str) -> str:
    """The projection side of an ``m x n`` weight for a galore-torch ``proj_type``.

    ``std``: right when ``m >= n`` (projector ``r x n``), left otherwise, so the
    projector sits on the smaller side; ``reverse_std``: the opposite; ``left``,
    ``right``, ``full``: as named.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}; expected one of {', '.join(PROJ_TYPES)}")


def project_fp32(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """``R = G P^T`` (right) or ``P^T G`` (left) in float32 (float64 stays float64).

    For methods that need ``R`` itself (APOLLO's scaling, FRUGAL's residual); the
    plain GaLore step never materializes it.
    """
    acc = torch.float64 if torch.float64 in (grad.dtype, proj.dtype) else torch.float32
    g = grad.to(acc)
    p = proj.to(acc)
    if _dist.is_row_sharded(g):  # FSDP2: row-local on the right, one r x n all-reduce on the left
        return _dist.sharded_project(g, p, side)
    return g @ p.T if side == "right" else p.T @ g


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 finalizer)."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for part in parts:
        x = (x ^ (int(part) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x & ((1 << 63) - 1)


#: parameter / gradient types that are never DTensors (the bucketing's fast type test).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
#: the empty mirror table of an optimizer that has none yet (read-only use).
_NO_MIRRORS: Dict[int, tuple] = {}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)



def _increment_steps(steps: List[torch.Tensor]) -> None:
    """``torch._foreach_add_(steps, 1.0)``; in plain eager mode (no tracing or dispatch mode) on
    plain float32 CPU step counts, the extension's ``add_one_`` does the same (value + 1, version
    counter bumped) without an ATen op."""
    native = _native_helpers()
    if native is not None and plain_eager() and native.add_one_(steps):
        return
    torch._foreach_add_(steps, 1.0)


def _native_nonfinite_flags(grads):
    """Whether each CPU gradient of ``grads`` is finite, from the extension's bit test
    (``lowrank_kernels._C.nonfinite_flags``): True when all are, else a list of bools; None
    when it cannot answer (no extension, or a gradient that is not a plain contiguous
    floating CPU tensor), and the ATen probe decides."""
    native = _native_helpers()
    if native is None or torch.compiler.is_compiling():
        return None
    try:
        out = native.nonfinite_flags(grads)
    except ValueError:
        return None
    return True if out is None else out

class LowRankOptimizer(Optimizer):
    """Base class of the low-rank AdamW optimizers (see the module docstring).

    Subclasses pass ``defaults`` that contain at least ``lr``, ``betas``, ``eps``,
    ``weight_decay`` and ``skip_nonfinite``, plus their low-rank keys.
    """

    #: proj_type values a low-rank group may use.
    proj_types: Tuple[str, ...] = ("std", "reverse_std", "left", "right")
    #: smallest rank a low-rank group may ask for.
    min_rank: int = 1
    #: state keys kept as CPU tensors (bookkeeping read on the host every step).
    host_state_keys = frozenset({"step", "side", "seed", "subspace_step"})
    #: the Adam-style moments a ``moment_bits`` format applies to: ``(state key, signed map)``.
    moment_keys: Tuple[Tuple[str, bool], ...] = (("exp_avg", True), ("exp_avg_sq", False))
    #: ``compat`` values this optimizer reproduces (see the module docstring). Read
    #: from the class itself, not inherited: a subclass that changes the step must
    #: declare the modes it still reproduces exactly.
    compat_modes: Tuple[str, ...] = ()
    #: step the projected parameters that take the plain fused step (no refresh due) by
    #: bucket, one multi-tensor op call per bucket (same side, dtypes, projector kind, betas
    #: and eps); bit-identical to the per-parameter path. False (or the group key
    #: ``foreach=False``) forces one op call per parameter.
    bucketed: bool = True
    #: whether ``capturable=True`` (group key) is supported. Read from the class itself, not
    #: inherited: a subclass that changes the step must declare it again.
    supports_capturable: bool = False

    def __init__(self, params, defaults: Dict[str, Any]):
        self._param_index: Dict[torch.Tensor, int] = {}
        #: number of parameter-steps skipped because the gradient was not finite.
        self.nonfinite_skips = 0
        #: number of projector refreshes that failed and kept the previous projector.
        self.failed_refreshes = 0
        defaults = {"moment_dtype": "float32", **MOMENT_BITS_DEFAULTS, **defaults}
        super().__init__(params, defaults)
        if not any(self._is_lowrank(g) for g in self.param_groups if g["params"]):
            warnings.warn(
                f"{type(self).__name__}: no parameter group is low-rank (no group sets "
                f"'rank'), so every parameter gets plain AdamW; pass rank=... or use "
                f"lowrank_kernels.optim.lowrank_param_groups(model, rank=...)",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ groups and validation
    def _is_lowrank(self, group: Dict[str, Any]) -> bool:
        return group.get("rank") is not None

    def _group_rank(self, group: Dict[str, Any], shape: Tuple[int, int]) -> int:
        return int(group["rank"])

    def _err(self, gi: int, msg: str) -> str:
        return f"{type(self).__name__}: param group {gi}: {msg}"

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Validate ``param_group`` (with the defaults filled in), then add it.

        Raises ``ValueError`` / ``TypeError`` naming the group, the parameter and the
        problem; nothing is added when a check fails.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"{type(self).__name__}: a param group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                f"{type(self).__name__}: parameters must be an ordered collection (list, tuple), not a set"
            )
        else:
            params = list(params)
        preview = dict(self.defaults)
        preview.update(param_group)
        preview["params"] = params
        gi = len(self.param_groups)
        self._validate_group(preview, gi)
        param_group["params"] = params
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._param_index.setdefault(p, len(self._param_index) + 1)

    def _validate_params(self, group: Dict[str, Any], gi: int) -> None:
        """Every parameter a floating-point Tensor, all on one device."""
        for pi, p in enumerate(group["params"]):
            if not isinstance(p, torch.Tensor):
                raise TypeError(self._err(gi, f"parameter {pi} must be a Tensor, got {type(p).__name__}"))
            if not p.is_floating_point():
                raise TypeError(self._err(gi, f"parameter {pi} must be floating point, got {p.dtype}"))
        devices = sorted({str(p.device) for p in group["params"]})
        if len(devices) > 1:
            raise ValueError(
                self._err(gi, f"parameters on several devices ({', '.join(devices)}); put the parameters "
                              "of each device in their own param group")
            )

    def _validate_group(self, group: Dict[str, Any], gi: int) -> None:
        self._validate_params(group, gi)
        capturable = group.get("capturable", False)
        if not isinstance(capturable, bool):
            raise TypeError(self._err(gi, f"capturable must be a bool, got {type(capturable).__name__}"))
        if capturable:
            self._validate_capturable(group, gi)
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            if not capturable:
                raise TypeError(self._err(gi, "a Tensor lr is supported only with capturable=True; pass a float"))
            devices = {p.device for p in group["params"]}
            if lr.dim() != 0 or not lr.is_floating_point() or (devices and {lr.device} != devices):
                raise ValueError(
                    self._err(gi, f"a Tensor lr must be a 0-dim floating tensor on the parameters' device, got "
                                  f"{lr.dtype} of shape {tuple(lr.shape)} on {lr.device}")
                )
            if not float(lr) >= 0.0:  # read once, when the group is added
                raise ValueError(self._err(gi, f"lr must be >= 0, got {float(lr)}"))
        elif not _is_real(lr) or not lr >= 0.0:
            raise ValueError(self._err(gi, f"lr must be a float >= 0, got {lr!r}"))
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) for b in betas)):
            raise ValueError(self._err(gi, f"betas must be a pair of floats, got {betas!r}"))
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(self._err(gi, f"betas[{i}] must be in [0, 1), got {b}"))
        eps = group.get("eps")
        if not _is_real(eps) or not eps >= 0.0:
            raise ValueError(self._err(gi, f"eps must be a float >= 0, got {eps!r}"))
        wd = group.get("weight_decay")
        if not _is_real(wd) or not wd >= 0.0:
            raise ValueError(self._err(gi, f"weight_decay must be a float >= 0, got {wd!r}"))
        md = group.get("moment_dtype", "float32")
        if not isinstance(md, str) or md not in MOMENT_DTYPES:
            raise ValueError(
                self._err(gi, f"moment_dtype must be 'float32' (default) or 'param' (16-bit moments for 16-bit "
                              f"parameters; unsafe, see lowrank_kernels.optim.base), got {md!r}")
            )
        self._validate_moment_bits(group, gi)
        if self._is_lowrank(group):
            self._validate_lowrank_group(group, gi)
        self._validate_compat(group, gi)

    def _validate_moment_bits(self, group: Dict[str, Any], gi: int) -> None:
        """``moment_bits`` in 32 | 16 | 8, ``block_size`` an int in [1, 256], ``min_8bit_size``
        an int >= 0; 16/8-bit moments need ``moment_dtype="float32"``."""
        bits = group.get("moment_bits", 32)
        if not _is_int(bits) or bits not in MOMENT_BITS:
            raise ValueError(self._err(gi, f"moment_bits must be 32, 16 or 8 (the bits per stored Adam moment "
                                           f"value), got {bits!r}"))
        bs = group.get("block_size", 256)
        if not _is_int(bs) or not 1 <= bs <= 256:
            raise ValueError(self._err(gi, f"block_size must be an int in [1, 256] (elements per 8-bit moment "
                                           f"block), got {bs!r}"))
        small = group.get("min_8bit_size", 4096)
        if not _is_int(small) or small < 0:
            raise ValueError(self._err(gi, f"min_8bit_size must be an int >= 0, got {small!r}"))
        if bits != 32 and group.get("moment_dtype", "float32") != "float32":
            raise ValueError(self._err(gi, f"moment_bits={bits} needs moment_dtype='float32' (the default), got "
                                           f"moment_dtype={group.get('moment_dtype')!r}"))

    def _validate_capturable(self, group: Dict[str, Any], gi: int) -> None:
        """``capturable=True`` needs an optimizer that declares it (:attr:`supports_capturable`,
        read from the class itself) and no ``compat`` mode."""
        if not type(self).__dict__.get("supports_capturable", False):
            raise ValueError(
                self._err(gi, f"capturable=True is not supported by {type(self).__name__} (supported by GaLoreAdamW "
                              "and DCTAdamW)")
            )
        if group.get("compat") is not None:
            raise ValueError(self._err(gi, f"capturable=True cannot be combined with compat={group['compat']!r}"))
        if group.get("moment_bits", 32) != 32:
            # 16-bit: the stochastic-rounding seed is a host int per step (a captured graph would
            # replay one seed); 8-bit: the capturable plain-AdamW path keeps float moments only.
            raise ValueError(self._err(gi, f"capturable=True needs moment_bits=32, got "
                                           f"moment_bits={group['moment_bits']!r} (not supported yet)"))

    def _validate_compat(self, group: Dict[str, Any], gi: int) -> None:
        """``compat`` must be None or one of the modes the optimizer's own class declares."""
        compat = group.get("compat")
        if compat is None:
            return
        accepted = type(self).__dict__.get("compat_modes", ())
        if not isinstance(compat, str) or compat not in accepted:
            what = (f"one of {', '.join(map(repr, accepted))} or None" if accepted
                    else f"None: {type(self).__name__} has no compat mode (it reproduces no official package exactly)")
            raise ValueError(self._err(gi, f"compat must be {what}, got {compat!r}"))

    def _validate_lowrank_group(self, group: Dict[str, Any], gi: int) -> None:
        """Checks of a low-rank group; subclasses extend it (call ``super()``)."""
        rank = group.get("rank")
        if rank is not None and (not _is_int(rank) or rank < self.min_rank):
            raise ValueError(self._err(gi, f"rank must be an int >= {self.min_rank}, got {rank!r}"))
        gap = group.get("update_proj_gap")
        if not _is_int(gap) or gap < 1:
            raise ValueError(self._err(gi, f"update_proj_gap must be an int >= 1, got {gap!r}"))
        scale = group.get("scale")
        if not _is_real(scale) or not math.isfinite(scale):
            raise ValueError(self._err(gi, f"scale must be a finite float, got {scale!r}"))
        proj_type = group.get("proj_type")
        if proj_type not in self.proj_types:
            raise ValueError(
                self._err(gi, f"proj_type must be one of {', '.join(map(repr, self.proj_types))}, got {proj_type!r}")
            )
        for pi, p in enumerate(group["params"]):
            reason = _dist.unsupported_placement(p)
            if reason is not None:
                raise ValueError(self._err(gi, f"parameter {pi}: {reason}"))
            if p.dim() != 2:
                raise ValueError(
                    self._err(
                        gi,
                        f"parameter {pi} has shape {tuple(p.shape)}: a low-rank group takes 2-D weights only; "
                        "put it in a group with rank=None (lowrank_kernels.optim.lowrank_param_groups does this)",
                    )
                )
            r = self._group_rank(group, tuple(p.shape))
            k = min(p.shape)
            if not self.min_rank <= r <= k:
                raise ValueError(
                    self._err(
                        gi,
                        f"rank {r} is out of range for parameter {pi} of shape {tuple(p.shape)}: "
                        f"need {self.min_rank} <= rank <= min(m, n) = {k}",
                    )
                )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient.

        ``closure`` (optional) re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # A new serial per step: per-step memos (see _group_token) start afresh.
        self.__dict__["_step_serial"] = self.__dict__.get("_step_serial", 0) + 1
        work: List[Tuple[Dict[str, Any], torch.Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                work.append((group, p))
        if self._capturable_step(work):
            return loss
        self._sync_device_steps(work)
        finite = self._finite_flags(work)
        plain: Dict[int, List[torch.Tensor]] = defaultdict(list)
        buckets: Dict[tuple, list] = {}
        kinds: Dict[int, Tuple[bool, bool]] = {}  # per group: (low-rank, bucketed), decided once per step
        for (group, p), ok in zip(work, finite):
            if not ok:
                self.nonfinite_skips += 1
                continue
            kind = kinds.get(id(group))
            if kind is None:
                low = self._is_lowrank(group)
                kind = kinds[id(group)] = (low, low and self._bucketing(group))
            if kind[0]:
                entry = self._bucket_entry(p, group) if kind[1] else None
                if entry is not None:  # the plain fused step, taken below with its bucket
                    key, step, state = entry
                    bucket = buckets.get(key)
                    if bucket is None:
                        bucket = buckets[key] = []
                    bucket.append((p, state, group, step))
                    continue
                # FSDP2: a DTensor parameter steps on its shards (see optim/distributed.py).
                with _dist.param_context(p):
                    self._lowrank_step(p, p.grad, self.state[p], group)
            else:
                plain[id(group)].append(p)
        for key, entries in buckets.items():
            self._bucket_step(key, entries)
            # One op for the bucket's (CPU float32) step counts; exact, as ``+= 1`` per parameter;
            # then their host mirrors, so the next step reads no step tensor.
            steps = [state["step"] for _, state, _, _ in entries]
            _increment_steps(steps)
            self._remember_steps(steps, [step for _, _, _, step in entries])
        for group in self.param_groups:
            if plain.get(id(group)):
                self._plain_step(group, plain[id(group)])
        return loss

    # ------------------------------------------------------------------ capturable (device-side) steps
    def _capturable_plain(self, p: torch.Tensor, group: Dict[str, Any]) -> bool:
        """Whether ``p`` of a low-rank group takes plain AdamW (DCTAdamW's non-projected
        parameters); the base projects every parameter of a low-rank group."""
        return False

    def _capturable_step(self, work) -> bool:
        """The step with no host read of a tensor value (``capturable=True``), when it applies:
        every parameter with a gradient is in a capturable group and either takes the plain
        bucketed fused step (no refresh due, by the host mirrors of the step counts) or plain
        AdamW. Returns False (nothing done) otherwise: the caller then takes the synchronizing
        path (refresh steps, first steps, DTensors, ``proj_type="full"``).

        Per bucket: one inf-norm over the gradients gives the device skip flags (a non-finite
        gradient -> skipped, with ``skip_nonfinite``), the step counts are stacked and the
        per-parameter coefficients ``(step_size * scale, 1 - lr * wd)`` computed on the device
        in float64 in the host's order of operations; one multi-tensor op call reads them; the
        step counts grow by one where not skipped. The host mirror of a step count assumes the
        step was taken (a skip is unknown to the host) and does not see graph replays: the
        refresh schedule is re-read from the device counts at the next synchronizing step or by
        :meth:`sync_step_counts`.
        """
        if not work or not all(g.get("capturable", False) for g, _ in work):
            return False
        buckets: Dict[tuple, list] = {}
        plain: Dict[int, Tuple[Dict[str, Any], List[torch.Tensor]]] = {}
        for group, p in work:
            state = self.state.get(p)
            if state and isinstance(state.get("step"), torch.Tensor) and state["step"].device != p.device:
                return False  # moved to the device by the synchronizing path
            if self._is_lowrank(group) and not self._capturable_plain(p, group):
                entry = self._bucket_entry(p, group)
                if entry is None:
                    return False
                key, step, state = entry
                buckets.setdefault(key, []).append((p, state, group, step))
            else:
                plain.setdefault(id(group), (group, []))[1].append(p)
        for key, entries in buckets.items():
            order = {}  # entries of one group next to each other: one coefficient fill per group
            for e in entries:
                order.setdefault(id(e[2]), []).append(e)
            entries = [e for es in order.values() for e in es]
            skip = self._device_skip([p.grad for p, _, _, _ in entries], [g for _, _, g, _ in entries])
            steps = [st["step"] for _, st, _, _ in entries]
            t = torch.stack(steps).to(torch.float64).add_(1.0)
            coeffs = torch.empty((len(entries), 2), dtype=torch.float64, device=t.device)
            beta1, beta2 = entries[0][2]["betas"]
            lo = 0
            for es in order.values():
                g = es[0][2]
                hi = lo + len(es)
                tt = t[lo:hi]
                lr = g["lr"]
                # adam_step_size's order: lr * sqrt(1 - b2^t) / (1 - b1^t), then * scale
                a = (torch.pow(beta2, tt).neg_().add_(1.0).sqrt_().mul_(lr)).div_(torch.pow(beta1, tt).neg_().add_(1.0))
                coeffs[lo:hi, 0] = a.mul_(g["scale"])
                coeffs[lo:hi, 1] = (1.0 - lr * g["weight_decay"]) if not isinstance(lr, torch.Tensor) \
                    else lr.to(torch.float64).mul(-g["weight_decay"]).add_(1.0)
                lo = hi
            self._bucket_step(key, entries, skip=skip, coeffs=coeffs)
            if skip is None:
                torch._foreach_add_(steps, 1.0)
            else:
                torch._foreach_add_(steps, list(skip.logical_not().to(torch.float32).unbind(0)))
            for st_t, (_, _, _, step) in zip(steps, entries):
                self._remember_host_int(st_t, step)
        for group, params in plain.values():
            self._plain_step_capturable(group, params, device_flags=True)
        return True

    def _device_skip(self, grads: List[torch.Tensor], groups: List[Dict[str, Any]]) -> Optional[torch.Tensor]:
        """Device bool flags, one per gradient: not finite (its inf-norm, in float32, is NaN or
        inf) in a group with ``skip_nonfinite``; None when no group checks. No host read; the
        count of skips accumulates in a device tensor (:meth:`nonfinite_skip_count`)."""
        checks = [g.get("skip_nonfinite", True) for g in groups]
        if not any(checks):
            return None
        norms = torch._foreach_norm(grads, float("inf"), dtype=torch.float32)
        skip = torch.stack(norms).isfinite().logical_not_()
        if not all(checks):
            for i, c in enumerate(checks):
                if not c:
                    skip[i] = False
        counters = self.__dict__.setdefault("_device_skips", {})
        dev = skip.device
        if dev not in counters:
            counters[dev] = torch.zeros((), dtype=torch.int64, device=dev)
        counters[dev].add_(skip.sum())
        return skip

    def nonfinite_skip_count(self) -> int:
        """:attr:`nonfinite_skips` plus the skips counted on the device by capturable steps
        (reads the device counters: one host synchronization per device)."""
        return self.nonfinite_skips + sum(int(c) for c in self.__dict__.get("_device_skips", {}).values())

    def sync_step_counts(self) -> None:
        """Re-read the device step counts of the capturable groups into the host's copies (one
        host synchronization per device).

        The host decides refreshes from its own copy of each step count, which a captured
        step's replay (``torch.cuda.CUDAGraph.replay``) does not advance, and which assumes a
        step was not skipped. Call this after replaying captured steps and before the next
        eager :meth:`step` (e.g. the refresh step): the eager steps then follow the device
        counts. A synchronizing step (a refresh) re-reads them by itself."""
        self._sync_device_steps([(g, p) for g in self.param_groups for p in g["params"]])

    def _sync_device_steps(self, work) -> None:
        """Before a synchronizing step: move the step counts of capturable groups to the
        parameter's device (a state made or loaded elsewhere) and refresh their host mirrors
        from the device (one read per device), so the refresh schedule follows the counts the
        device kept (capturable steps skip on the device, unseen by the host)."""
        if not any(g.get("capturable", False) for g in self.param_groups):
            return
        by_device: Dict[torch.device, List[torch.Tensor]] = defaultdict(list)
        for group, p in work:
            if not group.get("capturable", False):
                continue
            state = self.state.get(p)
            if not state or not isinstance(state.get("step"), torch.Tensor):
                continue
            t = state["step"]
            if t.device != p.device:
                t = state["step"] = t.to(device=p.device, dtype=torch.float32)
            by_device[t.device].append(t)
        for ts in by_device.values():
            for t, v in zip(ts, torch.stack(ts).tolist()):
                self._remember_host_int(t, int(v))

    def _plain_step_capturable(self, group: Dict[str, Any], params: List[torch.Tensor],
                               device_flags: bool = False) -> None:
        """torch.optim.AdamW's math (decay first, eps after the bias correction) with the step
        count on the device and every write masked by a device flag: with ``device_flags``,
        a parameter with a non-finite gradient (``skip_nonfinite``) keeps its weight, moments
        and step count (``torch.where``; no host read). Moments and the new weight in the
        moments' dtype, rounded once into the parameter. Equal to :meth:`_plain_step` up to
        rounding (another order of operations than torch's foreach kernels)."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            if len(self.state[p]) == 0:
                self._init_plain_state(p, self.state[p], group)
        skip = None
        if device_flags:
            skip = self._device_skip([p.grad for p in params], [group] * len(params))
        for i, p in enumerate(params):
            state = self.state[p]
            m, v, st = state["exp_avg"], state["exp_avg_sq"], state["step"]
            if st.device != p.device:
                st = state["step"] = st.to(device=p.device, dtype=torch.float32)
            keep = None if skip is None else skip[i].logical_not()
            g = p.grad if keep is None else torch.where(keep, p.grad, 0)
            g = g.to(m.dtype)
            if keep is None:
                st.add_(1.0)
            else:
                st.add_(keep.to(st.dtype))
            # bias corrections in float64, as torch's AdamW computes them on the host
            t = st.to(torch.float64)
            bc1 = torch.pow(beta1, t).neg_().add_(1.0)
            step_size = (lr.to(torch.float64) if isinstance(lr, torch.Tensor) else torch.full_like(bc1, lr)).div(bc1)
            bc2_sqrt = torch.pow(beta2, t).neg_().add_(1.0).sqrt_()
            m_new = m.lerp(g, 1 - beta1)
            v_new = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v_new.sqrt() / bc2_sqrt).add_(eps)
            w = p.to(m.dtype, copy=True)
            w.mul_(1 - lr * wd)
            w.sub_(m_new / denom * step_size)
            if keep is None:
                m.copy_(m_new)
                v.copy_(v_new)
                p.copy_(w)
            else:
                m.copy_(torch.where(keep, m_new, m))
                v.copy_(torch.where(keep, v_new, v))
                p.copy_(torch.where(keep, w.to(p.dtype), p))

    # ------------------------------------------------------------------ bucketed (multi-tensor) steps
    def _bucketing(self, group: Dict[str, Any]) -> bool:
        """Whether the projected parameters of ``group`` may step by bucket: :attr:`bucketed`
        is true and the group does not set ``foreach=False`` (which forces the per-parameter
        path, the reference the bucketed step is bit-identical to)."""
        return self.bucketed and group.get("foreach") is not False

    def _bucket_entry(self, p: torch.Tensor, group: Dict[str, Any]):
        """``(key, step, state)`` when ``p`` takes the plain fused step this step (state and
        projector exist, no refresh due, a plain tensor or a DTensor the list ops serve
        (:func:`~lowrank_kernels.optim.distributed.bucketable`), and :meth:`_bucket_key` gives
        a key), else None.

        ``step`` is the 1-based step about to be taken, ``state`` is ``self.state[p]``. Called
        for finite gradients only.
        """
        if not self._bucketing(group):
            return None
        if not ((type(p) in _PLAIN_TENSORS and type(p.grad) in _PLAIN_TENSORS) or _dist.bucketable(p)):
            return None
        state = self.state.get(p)
        if not state or not self._has_projector(state):
            return None
        step = self._host_int(state["step"]) + 1
        if self._should_refresh(p, state, group, step):
            return None
        key = self._cached_bucket_key(p, state, group)
        return None if key is None else (key, step, state)

    def _cached_bucket_key(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> Optional[tuple]:
        """:meth:`_bucket_key`, remembered per parameter while nothing it may read has changed.

        A remembered key is reused only when ``p`` has the same dtype and device, its state is
        the same dict holding the very same objects (identity, in order: a refresh, a reset,
        ``load_state_dict`` or a format change stores new ones), the ``side`` tensor's version
        counter has not moved, and its group holds the same objects under every key but
        ``lr`` (which no key reads; schedulers replace it every step). Anything else computes
        the key again. Bookkeeping only: the key is the same either way."""
        cache = self.__dict__.get("_bucket_key_cache")
        if cache is None:
            cache = self.__dict__["_bucket_key_cache"] = {}
        gtok = self._group_token(group)
        side = state.get("side")
        side_v = side._version if isinstance(side, torch.Tensor) else None
        rec = cache.get(id(p))
        if (rec is not None and rec[0] is p and rec[1] is state and rec[2] is gtok and rec[4] == side_v
                and rec[5] is p.dtype and rec[6] == p.device and len(rec[3]) == len(state)):
            for a, b in zip(rec[3], state.values()):
                if a is not b:
                    break
            else:
                return rec[7]
        key = self._bucket_key(p, state, group)
        if len(cache) > 2 * len(self._param_index) + 64:  # parameters no longer here
            cache.clear()
        cache[id(p)] = (p, state, gtok, tuple(state.values()), side_v, p.dtype, p.device, key)
        return key

    def _group_token(self, group: Dict[str, Any]) -> tuple:
        """An object standing for ``group``'s values (all but ``lr``) as they are now: the same
        object as long as every value is the same object, a new one after any change."""
        memo = self.__dict__.get("_group_tokens")
        if memo is None:
            memo = self.__dict__["_group_tokens"] = {}
        serial = self.__dict__.get("_step_serial", 0)
        old = memo.get(id(group))
        if old is not None and old[0] is group and old[2] == serial:
            return old[1]  # looked at already in this step (nothing runs in between)
        values = tuple(v for k, v in group.items() if k != "lr")
        if old is not None and old[0] is group and len(old[1]) == len(values):
            for a, b in zip(old[1], values):
                if a is not b:
                    break
            else:
                memo[id(group)] = (group, old[1], serial)
                return old[1]
        if len(memo) > 4 * len(self.param_groups) + 16:
            memo.clear()
        memo[id(group)] = (group, values, serial)
        return values

    def _bucket_key(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> Optional[tuple]:
        """The bucket of a parameter that takes the plain fused step: parameters with equal
        keys step together in one :meth:`_bucket_step`. None (the default): per parameter."""
        return None

    def _own_fused_step(self, cls) -> bool:
        """Whether this optimizer's per-parameter path is exactly ``cls``'s (no subclass
        overrides a method the bucketed step bypasses), so bucketing stays bit-identical."""
        t = type(self)
        cached = self.__dict__.get("_own_fused_cache")
        if cached is None:
            cached = self.__dict__["_own_fused_cache"] = {}
        ok = cached.get(cls)
        if ok is None:
            names = ("_project_step", "_lowrank_step", "_get_projector", "_should_refresh", "_has_projector", "step")
            ok = cached[cls] = all(getattr(t, n) is getattr(cls, n) for n in names)
        return ok

    def _bucket_step(self, key: tuple, entries: List[tuple]) -> None:
        """Step the parameters of one bucket; ``entries`` holds ``(p, state, group, step)``.
        ``state["step"]`` is incremented by the caller after this returns."""
        raise NotImplementedError

    def _finite_flags(self, work) -> List[bool]:
        """Per entry of ``work``: whether its gradient is finite (one host sync per device).

        Plain contiguous floating CPU gradients (the extension built): one C++ pass over their
        bits (``lowrank_kernels._C.nonfinite_flags``, no ATen op). Otherwise per device: the
        largest L2 norm (four ATen ops, one host read), and the exact per-gradient inf-norms
        only when it is not finite."""
        flags = [True] * len(work)
        checked = [(i, p.grad) for i, (group, p) in enumerate(work) if group.get("skip_nonfinite", True)]
        if not checked:
            return flags
        ok = _native_nonfinite_flags([g for _, g in checked])
        if ok is not None:
            if ok is not True:
                for (i, _), good in zip(checked, ok):
                    flags[i] = good
            return flags
        by_device: Dict[tuple, List[Tuple[int, torch.Tensor]]] = defaultdict(list)
        for i, g in checked:
            # DTensor gradients (FSDP2) in their own list: their norms are reduced over the shards.
            by_device[(g.device, _dist.is_dtensor(g))].append((i, g))
        for (_, is_dtensor), entries in by_device.items():
            grads = [g for _, g in entries]
            if not is_dtensor:
                # The common case in four ops and one host read: the largest L2 norm is finite
                # exactly when every norm is (max propagates NaN), and a finite L2 norm means a
                # finite gradient. Otherwise the exact per-gradient probe below decides.
                f32 = torch.float32
                norms = [n if n.dtype is f32 else n.to(f32) for n in torch._foreach_norm(grads, 2)]
                if math.isfinite(torch.stack(norms).max().item()):
                    continue
            ok = _dist.inf_norms(grads).isfinite().tolist()
            for (i, _), good in zip(entries, ok):
                flags[i] = good
        return flags

    def _init_plain_state(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        """torch.optim.AdamW's state layout (``step`` CPU float32, moments of :meth:`_state_dtype`),
        shared by :meth:`_plain_step` and :meth:`_plain_step_compat` so checkpoints move between them."""
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=self._step_device(p, group))
        bits = self._moment_bits_for(tuple(p.shape), group, p.dtype)
        if bits == 8 and _dist.is_dtensor(p) and p.dim() < 2:
            bits = 32  # FSDP2 shards a 1-D parameter along its blocks: its moments stay 32-bit
        if bits == 16:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
            return
        if bits == 8:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
                nblocks = -(-p.shape[-1] // int(group["block_size"]))
                absmax = torch.zeros(tuple(p.shape[:-1]) + (nblocks,), dtype=torch.float32, device=p.device)
                if _dist.is_dtensor(p):  # row-aligned with the codes: this rank's rows (no communication)
                    absmax = _dist.distribute_tensor(absmax, p.device_mesh, p.placements, src_data_rank=None)
                state[ABSMAX_KEYS[key]] = absmax
            return
        dtype = self._state_dtype(p, group)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _plain_step(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        """torch.optim.AdamW on ``params`` (same state layout, same kernels).

        Moments in the parameter's dtype (float32/float64 parameters, or
        ``moment_dtype="param"``) go through torch's AdamW kernels (bit-identical);
        float32 moments of a 16-bit parameter through :meth:`_plain_step_wide`.
        With ``compat`` set, the official packages' AdamW (:meth:`_plain_step_compat`).
        8-bit and 16-bit moments (``moment_bits``) through :meth:`_plain_step_lowbit`.
        """
        lowbit = []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._init_plain_state(p, state, group)
            if self._lowbit(state, group):
                lowbit.append(p)
        if lowbit:
            self._plain_step_lowbit(group, lowbit)
            params = [p for p in params if not self._lowbit(self.state[p], group)]
            if not params:
                return
        if group.get("compat") is not None:
            self._plain_step_compat(group, params)
            return
        if group.get("capturable", False):
            self._plain_step_capturable(group, params)
            return
        same, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        wide = []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._init_plain_state(p, state, group)
            if state["exp_avg"].dtype != p.dtype:
                wide.append(p)
                continue
            same.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if wide:
            self._plain_step_wide(group, wide)
        if not same:
            return
        beta1, beta2 = group["betas"]
        _adamw_functional(
            same, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=group.get("foreach"), capturable=False, differentiable=False, fused=None,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )

    def _plain_step_compat(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        """The transformers-style AdamW of galore-torch / apollo-torch, in their order of operations.

        Per parameter, with ``t`` the 1-based step: ``m <- b1 m + (1 - b1) g``,
        ``v <- b2 v + (1 - b2) g^2``, ``W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) *
        m / (sqrt(v) + eps)``, then ``W <- W - lr wd W``. Same state layout as
        :meth:`_plain_step` (``step`` CPU float32, ``exp_avg``, ``exp_avg_sq`` of
        :meth:`_state_dtype`), so a checkpoint moves between the two modes. Parameters
        are bucketed by step count (one bucket in a normal run), one
        ``torch._foreach_*`` call per operation; moments wider than the parameter are
        updated with the weight computed in their dtype and rounded once.
        """
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        buckets: Dict[int, List[torch.Tensor]] = defaultdict(list)
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._init_plain_state(p, state, group)
            state["step"] += 1
            buckets[int(state["step"])].append(p)
        for t, ps in buckets.items():
            exp_avgs = [self.state[p]["exp_avg"] for p in ps]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in ps]
            wide = [m.dtype != p.dtype for p, m in zip(ps, exp_avgs)]
            grads = [p.grad.to(m.dtype) if w else p.grad for p, m, w in zip(ps, exp_avgs, wide)]
            weights = [p.to(m.dtype, copy=True) if w else p for p, m, w in zip(ps, exp_avgs, wide)]
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            del grads
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denoms, eps)
            updates = torch._foreach_div(exp_avgs, denoms)
            del denoms
            step_size = adam_step_size(lr, beta1, beta2, t)
            torch._foreach_add_(weights, updates, alpha=-step_size)
            if wd > 0.0:
                torch._foreach_add_(weights, weights, alpha=-lr * wd)
            for p, w, is_wide in zip(ps, weights, wide):
                if is_wide:
                    p.copy_(w)

    def _plain_step_lowbit(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        """AdamW with 8-bit or 16-bit moments: ``ops.adam_update_`` (or ``ops.foreach_adam_update_``
        per bucket of step count and format) then the weight update.

        The op returns ``N = m / (sqrt(v) + eps')`` with no bias correction; the update is
        ``W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) N``. **eps convention**: by default
        ``eps' = eps sqrt(1 - b2^t)``, which makes this torch.optim.AdamW's
        ``lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` exactly (in real arithmetic),
        with the decay first (``W <- (1 - lr wd) W`` on the old weight); with ``compat`` set,
        ``eps' = eps`` (the transformers-style AdamW of the official packages) and the decay
        after the update. A 16-bit weight is updated in float32 and rounded once.
        ``foreach=False`` in the group: one ``adam_update_`` call per parameter (the same numbers).
        """
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        compat = group.get("compat") is not None
        buckets: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
        for p in params:
            state = self.state[p]
            state["step"] += 1
            m = state["exp_avg"]
            buckets[(int(state["step"]), m.dtype, m.device)].append(p)
        for (t, _, _), ps in buckets.items():
            bc2 = 1.0 - beta2**t
            step_size = lr * math.sqrt(bc2) / (1.0 - beta1**t)
            eps_t = eps if compat else eps * math.sqrt(bc2)
            states = [self.state[p] for p in ps]
            grads = [p.grad.to(self._low_dtype(st, group, p.grad.dtype)) for p, st in zip(ps, states)]
            if group.get("foreach") is False or len(ps) == 1 or any(_dist.is_dtensor(p) for p in ps):
                ns = [ops.adam_update_(g, st["exp_avg"], st["exp_avg_sq"], beta1=beta1, beta2=beta2, eps=eps_t,
                                       **self._moment_kwargs(p, st, group, t))
                      for p, g, st in zip(ps, grads, states)]
            else:
                fmt = self._foreach_moment_kwargs([(p, st, group, t) for p, st in zip(ps, states)])
                ns = ops.foreach_adam_update_(
                    grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], beta1=beta1,
                    beta2=beta2, eps=eps_t, **fmt,
                )
            del grads
            wide = [p.dtype not in (torch.float32, torch.float64) for p in ps]
            ws = [p.to(torch.float32) if w else p for p, w in zip(ps, wide)]
            ns = [n.to(w.dtype) for n, w in zip(ns, ws)]
            if not compat and wd != 0.0:
                torch._foreach_mul_(ws, 1.0 - lr * wd)
            torch._foreach_add_(ws, ns, alpha=-step_size)
            if compat and wd != 0.0:
                torch._foreach_add_(ws, ws, alpha=-lr * wd)
            for p, w, is_wide in zip(ps, ws, wide):
                if is_wide:
                    p.copy_(w)

    def _post_decay(self, group: Dict[str, Any]) -> float:
        """The factor a projected update is multiplied by so that a decay-first kernel
        (``W <- d W - a U``, ``d = 1 - lr wd``) yields the official packages' order
        ``W <- d (W - a U)``: ``d`` with ``compat`` set, else 1."""
        if group.get("compat") is None:
            return 1.0
        return 1.0 - group["lr"] * group["weight_decay"]
    def _plain_step_wide(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        """torch.optim.AdamW's math (its order of operations) with moments wider than the
        parameter: moments and the new weight are computed in the moments' dtype and the
        weight is rounded once into the parameter (one transient copy of one parameter)."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            t = float(state["step"])
            g = p.grad.to(m.dtype)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            del g
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            w = p.to(m.dtype, copy=True)
            w.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - beta1**t))
            p.copy_(w)

    def _lowrank_step(self, p: torch.Tensor, grad: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]):
        """Init (on first use), refresh on schedule, then :meth:`_project_step`.

        A state is created only once its first projector exists, so a parameter
        whose first refresh fails is left exactly as it was.
        """
        fresh = len(state) == 0
        work_state = {} if fresh else state
        if fresh:
            self._init_state(p, work_state, group)
        step = self._host_int(work_state["step"]) + 1
        if self._should_refresh(p, work_state, group, step):
            ok = self._refresh_projector(p, grad, work_state, group, step)
            if not ok:
                self.failed_refreshes += 1
                if fresh or not self._has_projector(work_state):
                    return
        if fresh:
            state.update(work_state)
        # FSDP2: row-aligned state sharded like the weight (no-op for plain tensors).
        _dist.place_state(p, state, self._side(state), self.host_state_keys)
        state["step"] += 1
        self._remember_host_int(state["step"], step)
        self._project_step(p, grad, state, group, step)
        _dist.place_state(p, state, self._side(state), self.host_state_keys)

    # ------------------------------------------------------------------ extension points
    def _state_dtype(self, p: torch.Tensor, group: Dict[str, Any]) -> torch.dtype:
        """dtype of new moments: float32 (float64 for float64 parameters), or the
        parameter's with ``moment_dtype="param"`` (see the module docstring)."""
        if group.get("moment_dtype", "float32") == "param":
            return p.dtype
        return torch.promote_types(p.dtype, torch.float32)

    # ------------------------------------------------------------------ moment formats
    def _moment_bits_for(self, shape: Tuple[int, ...], group: Dict[str, Any], dtype: torch.dtype) -> int:
        """The format (32, 16 or 8) new moments of ``shape`` get in ``group`` for a parameter of
        ``dtype``: ``moment_bits``, except that 0-d moments are 32, 8 falls back to 32 below
        ``min_8bit_size`` elements or where codes + absmax would take no fewer bytes than
        float32 (rows of one element: APOLLO-Mini's rank-1 moments). 16 (bfloat16 moments with
        stochastic rounding) applies to every parameter dtype (float32 master weights included)."""
        bits = group.get("moment_bits", 32)
        if len(shape) == 0:
            return 32
        if bits == 8 and math.prod(shape) < group.get("min_8bit_size", 4096):
            return 32
        if bits == 8:
            numel, rows = math.prod(shape), math.prod(shape[:-1])
            if numel + 4 * rows * -(-shape[-1] // int(group.get("block_size", 256))) >= 4 * numel:
                return 32  # rows of one element (APOLLO-Mini's rank 1): codes + absmax outweigh float32
        return bits

    def _init_moments(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any], shape,
                      keys: Tuple[str, ...] = ("exp_avg", "exp_avg_sq")) -> None:
        """Zero moments ``keys`` of ``shape`` on ``p``'s device in the group's format
        (:meth:`_moment_bits_for`): 8-bit codes (uint8) + float32 absmax (:data:`ABSMAX_KEYS`;
        absmax 0 decodes to 0), bfloat16, or :meth:`_state_dtype`."""
        shape = tuple(int(s) for s in shape)
        bits = self._moment_bits_for(shape, group, p.dtype)
        for key in keys:
            if bits == 8:
                nblocks = -(-shape[-1] // int(group["block_size"]))
                state[key] = torch.zeros(shape, dtype=torch.uint8, device=p.device)
                state[ABSMAX_KEYS[key]] = torch.zeros(shape[:-1] + (nblocks,), dtype=torch.float32, device=p.device)
            else:
                dtype = torch.bfloat16 if bits == 16 else self._state_dtype(p, group)
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)

    @staticmethod
    def _lowbit(state: Dict[str, Any], group: Dict[str, Any]) -> bool:
        """Whether ``state``'s Adam moments are 8-bit, or bfloat16 with ``moment_bits=16``."""
        m = state.get("exp_avg")
        if m is None:
            return False
        return m.dtype == torch.uint8 or (m.dtype == torch.bfloat16 and group.get("moment_bits", 32) == 16)

    def _moment_seed(self, p: torch.Tensor, step: int) -> int:
        """The stochastic-rounding seed of ``p``'s 16-bit moments at ``step`` (1-based): a hash of
        the parameter's position and the step (the same in a resumed run)."""
        return mix_seed(self._param_seed(p), step, 0x16B)

    def _moment_kwargs(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any],
                       step: int) -> Dict[str, Any]:
        """The moment-format arguments of the projection / adam ops for ``state``'s moments:
        ``m_absmax``, ``v_absmax``, ``block_size`` (8-bit), ``moment_seed`` (16-bit), or none."""
        m = state["exp_avg"]
        if m.dtype == torch.uint8:
            return dict(m_absmax=state["exp_avg_absmax"], v_absmax=state["exp_avg_sq_absmax"],
                        block_size=int(group["block_size"]))
        if m.dtype == torch.bfloat16 and group.get("moment_bits", 32) == 16:
            return dict(moment_seed=self._moment_seed(p, step))
        return {}

    def _format_key(self, state: Dict[str, Any], group: Dict[str, Any]) -> tuple:
        """The moment format of ``state`` as a bucket-key part: one multi-tensor op call takes
        one format (8-bit with one ``block_size``, 16-bit with stochastic rounding, or plain)."""
        m = state["exp_avg"]
        if m.dtype == torch.uint8:
            return (8, int(group["block_size"]))
        return (16, 0) if self._lowbit(state, group) else (32, 0)

    def _foreach_moment_kwargs(self, entries: List[tuple]) -> Dict[str, Any]:
        """:meth:`_moment_kwargs` of a bucket's ``(p, state, group, step)`` entries (one format)
        as the list arguments of the multi-tensor ops."""
        kws = [self._moment_kwargs(p, st, g, t) for p, st, g, t in entries]
        if not kws or not kws[0]:
            return {}
        if "m_absmax" in kws[0]:
            return dict(m_absmax=[k["m_absmax"] for k in kws], v_absmax=[k["v_absmax"] for k in kws],
                        block_size=kws[0]["block_size"])
        return dict(moment_seed=[k["moment_seed"] for k in kws])

    @staticmethod
    def _low_dtype(state: Dict[str, Any], group: Dict[str, Any], default: torch.dtype) -> torch.dtype:
        """dtype of an ``R`` (projected gradient, or a plain gradient) handed to the adam ops
        with ``state``'s moments: float32 for 8-bit moments (the update is computed in
        float32), else ``default`` (the moments' dtype for the projected methods)."""
        return torch.float32 if state["exp_avg"].dtype == torch.uint8 else default

    @staticmethod
    def _zero_moments(state: Dict[str, Any], keys: Tuple[str, ...] = ("exp_avg", "exp_avg_sq")) -> None:
        """Zero the moments ``keys`` in place, whatever their format (8-bit: codes and absmax)."""
        for key in keys:
            if key in state:
                state[key].zero_()
            if ABSMAX_KEYS[key] in state:
                state[ABSMAX_KEYS[key]].zero_()

    def _side(self, state: Dict[str, Any]) -> str:
        return SIDE_NAMES[self._host_int(state["side"])]

    # ------------------------------------------------------------------ host mirrors of bookkeeping scalars
    #: dtypes a mirror is kept for, with the bound below which every integer and its successor
    #: are exact in that dtype (float32: 2^24); other dtypes (bfloat16, float16 counts from
    #: an odd checkpoint) are read every time.
    _MIRROR_EXACT = {torch.float32: 1 << 24, torch.float64: 1 << 53, torch.int64: 1 << 62, torch.int32: (1 << 31) - 1,
                     torch.int16: (1 << 15) - 1, torch.int8: 127, torch.uint8: 255}

    def _host_int(self, t) -> int:
        """``int(t)`` for a host bookkeeping scalar (``step``, ``side``), read from a host mirror
        when ``t`` is unchanged since it was read or written here, else from the tensor.

        The mirror of ``t`` is ``(t, t._version, value)``: it is used only while ``t`` is the same
        object (the mirror holds it, so its ``id`` cannot be reused) and its version counter has
        not moved, i.e. no in-place write reached it (``copy_``, ``+=``, ``fill_``, an optimizer
        step, ...); a replaced tensor (``load_state_dict``, a subclass's reset) is another object.
        Writes that bypass the version counter (through ``.data``, numpy views or raw pointers)
        are not seen: change ``state["step"]`` with tensor ops or by assignment.
        """
        m = self.__dict__.get("_host_mirrors", _NO_MIRRORS).get(id(t))
        if m is not None and m[0] is t and m[1] == t._version:
            return m[2]
        value = int(t)
        self._remember_host_int(t, value)
        return value

    def _remember_host_int(self, t, value: int) -> None:
        """Record that ``t`` (a host scalar, just read or written) holds the integer ``value``.
        Values outside ``[0, bound)`` of :attr:`_MIRROR_EXACT` (where ``+ 1`` stops being exact
        in ``t``'s dtype: 2^24 for float32), other dtypes and tensors without a version counter
        (inference tensors) get no mirror. Device tensors (``capturable=True`` step counts) get
        one too: their values are then the host's copy, see :meth:`sync_step_counts`."""
        if type(t) is not torch.Tensor or t.is_inference():
            return
        mirrors = self.__dict__.get("_host_mirrors")
        if mirrors is None:
            mirrors = self.__dict__["_host_mirrors"] = {}
        if not 0 <= value < self._MIRROR_EXACT.get(t.dtype, 0):
            mirrors.pop(id(t), None)
            return
        if len(mirrors) > 4 * len(self._param_index) + 64:  # replaced tensors' stale mirrors
            mirrors.clear()
        mirrors[id(t)] = (t, t._version, value)

    def _step_device(self, p: torch.Tensor, group: Dict[str, Any]) -> torch.device:
        """Where ``state["step"]`` lives: the parameter's device with ``capturable=True`` (as
        torch's capturable AdamW), else the CPU (read on the host without a sync)."""
        return p.device if group.get("capturable", False) else torch.device("cpu")

    def _remember_steps(self, steps: List[torch.Tensor], values: List[int]) -> None:
        """:meth:`_remember_host_int` for the step tensors of a bucket just incremented in place:
        the tensors mirrored when they were read (so plain CPU tensors) get their new values."""
        mirrors = self.__dict__.get("_host_mirrors", _NO_MIRRORS)
        exact = self._MIRROR_EXACT
        for t, value in zip(steps, values):
            m = mirrors.get(id(t))
            if m is not None and m[0] is t:
                if value < exact.get(t.dtype, 0):
                    mirrors[id(t)] = (t, t._version, value)
                else:
                    del mirrors[id(t)]

    def _init_state(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=self._step_device(p, group))
        side = resolve_side(tuple(p.shape), group["proj_type"])
        state["side"] = torch.tensor(SIDE_CODES[side], dtype=torch.int8)

    def _has_projector(self, state: Dict[str, Any]) -> bool:
        return "projector" in state

    def _should_refresh(self, p, state, group, step: int) -> bool:
        return not self._has_projector(state) or (step - 1) % group["update_proj_gap"] == 0

    def _refresh_projector(self, p, grad, state, group, step: int) -> bool:
        proj = self._compute_projector(p, grad, state, group, step)
        if proj is None:
            return False
        state["projector"] = proj
        return True

    def _compute_projector(self, p, grad, state, group, step: int) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def _get_projector(self, p, state, group):
        return state["projector"]

    def _project_step(self, p, grad, state, group, step: int) -> None:
        raise NotImplementedError

    def _param_seed(self, p: torch.Tensor) -> int:
        """1-based position of ``p`` among all parameters, in the order they were added."""
        return self._param_index[p]

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`.

        Unlike torch's default, every tensor keeps its saved dtype (moments kept in
        float32 for a bfloat16 parameter stay float32), and the keys of
        :attr:`host_state_keys` stay on the CPU; the others move to the parameter's
        device.
        """
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        self._check_saved_moments(state_dict)
        # The moment format is this optimizer's (its groups' keys survive the load, unlike the
        # other hyper-parameters); saved moments are converted to it below.
        formats = [{k: g[k] for k in MOMENT_BITS_DEFAULTS if k in g} for g in self.param_groups]
        saved_bs = [int(sg.get("block_size", 256)) for sg in saved_groups]
        # capturable is how this optimizer runs, not saved state: each group keeps its own.
        capturable = [g.get("capturable", False) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, fmt in zip(self.param_groups, formats):
            g.update(fmt)
        for g, c in zip(self.param_groups, capturable):
            g["capturable"] = c
        self.__dict__.pop("_host_mirrors", None)  # every state tensor is new: read them again
        id_map = zip(
            chain.from_iterable(g["params"] for g in saved_groups),
            chain.from_iterable(g["params"] for g in self.param_groups),
        )
        where = {p: (g, bs) for g, bs in zip(self.param_groups, saved_bs) for p in g["params"]}
        capt = {id(p) for g in self.param_groups if g["capturable"] for p in g["params"]}
        for saved_id, p in id_map:
            if saved_id in saved_state:
                self.state[p] = {
                    k: self._load_value(p, k, v, id(p) in capt) for k, v in saved_state[saved_id].items()
                }
                for key in ("step", "side"):  # host values now, so the next steps read no tensor
                    new, saved = self.state[p].get(key), saved_state[saved_id].get(key)
                    if (isinstance(new, torch.Tensor) and isinstance(saved, torch.Tensor)
                            and saved.device.type == "cpu" and saved.numel() == 1):
                        self._remember_host_int(new, int(saved))
                self._convert_moments(p, self.state[p], *where[p])

    def _check_saved_moments(self, state_dict) -> None:
        """Before anything is loaded: every saved 8-bit moment (uint8 codes) has its float32
        absmax of the shape the *saved* group's ``block_size`` gives, else a ``ValueError``
        naming the parameter (the moments could not be decoded)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            return  # torch's load_state_dict reports a malformed state dict
        saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            return
        for gi, (sg, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(group["params"]):
                return
            bs = int(sg.get("block_size", 256))
            for pi, saved_id in enumerate(sg["params"]):
                st = saved_state.get(saved_id) or {}
                for key, _ in self.moment_keys:
                    t = st.get(key)
                    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
                        continue
                    where = f"{type(self).__name__}.load_state_dict: param group {gi}, parameter {pi}"
                    am = st.get(ABSMAX_KEYS[key])
                    want = tuple(t.shape[:-1]) + (-(-t.shape[-1] // bs),) if t.dim() >= 1 else None
                    if not isinstance(am, torch.Tensor) or am.dtype != torch.float32 or tuple(am.shape) != want:
                        got = (f"{am.dtype} {tuple(am.shape)}" if isinstance(am, torch.Tensor) else repr(am))
                        raise ValueError(
                            f"{where}: the saved 8-bit {key} (shape {tuple(t.shape)}) needs a float32 "
                            f"{ABSMAX_KEYS[key]} of shape {want} for the saved group's block_size {bs}, got {got}"
                        )

    def _convert_moments(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any],
                         saved_block_size: int) -> None:
        """Bring loaded moments (:attr:`moment_keys`) to the group's ``moment_bits`` and
        ``block_size`` (see the module docstring); ``saved_block_size`` decodes saved 8-bit
        moments. DTensor (FSDP2) state is left as loaded."""
        keys = [(k, s) for k, s in self.moment_keys if isinstance(state.get(k), torch.Tensor)]
        if not keys or any(_dist.is_dtensor(state[k]) for k, _ in keys):
            return
        bits = group.get("moment_bits", 32)
        bs = int(group.get("block_size", 256))
        for key, signed in keys:
            t = state[key]
            if t.dtype == torch.uint8:
                if bits == 8 and bs == saved_block_size:
                    continue
                val = _moments.moments_dequantize_ref(t, state.pop(ABSMAX_KEYS[key]), signed=signed,
                                                      block_size=saved_block_size)
                if bits == 8:  # another block size: requantize
                    state[key], state[ABSMAX_KEYS[key]] = _moments.moments_quantize_ref(val, signed=signed,
                                                                                        block_size=bs)
                else:
                    state[key] = val.to(torch.bfloat16 if self._moment_bits_for(tuple(t.shape), group, p.dtype) == 16
                                        else self._state_dtype(p, group))
            elif bits == 8 and self._moment_bits_for(tuple(t.shape), group, p.dtype) == 8:
                codes, absmax = _moments.moments_quantize_ref(t, signed=signed, block_size=bs)
                state[key], state[ABSMAX_KEYS[key]] = codes, absmax
            elif (bits == 16 and t.dtype in (torch.float32, torch.float64)
                  and self._moment_bits_for(tuple(t.shape), group, p.dtype) == 16):
                state[key] = t.to(torch.bfloat16)

    def _load_value(self, p: torch.Tensor, key: str, value, capturable: bool = False):
        """A saved state tensor placed for ``p``: ``step`` on ``p``'s device (float32) in a
        capturable group, the other :attr:`host_state_keys` (and ``step`` otherwise) on the
        CPU, the rest on ``p``'s device; dtypes kept."""
        if not isinstance(value, torch.Tensor):
            return value
        if key == "step" and capturable:
            return value.detach().to(device=p.device, dtype=torch.float32, copy=True)
        if key in self.host_state_keys:
            return value.detach().to(device="cpu", copy=True)
        return value.detach().to(device=p.device, copy=True)


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``: the bias-corrected step of the projected methods."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


__all__ = [
    "LowRankOptimizer",
    "resolve_side",
    "project_fp32",
    "mix_seed",
    "adam_step_size",
    "SIDE_NAMES",
    "SIDE_CODES",
    "PROJ_TYPES",
    "COMPAT_MODES",
    "MOMENT_DTYPES",
    "MOMENT_BITS",
    "MOMENT_BITS_DEFAULTS",
    "ABSMAX_KEYS",
]
