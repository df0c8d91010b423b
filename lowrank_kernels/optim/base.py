"""The shared base of the low-rank optimizers: :class:`LowRankOptimizer`, a step loop over
collaborators. Each method file (``galore.py``, ``dct.py``, ...) only says how its projector
is made and how one projected step is taken. The whole picture: docs/architecture.md, "Optimizers".

The collaborators (plain functions, called with explicit arguments):

- :mod:`~lowrank_kernels.optim.config`: the shared hyper-parameters (``lr``, ``betas``,
  ``eps``, ``weight_decay``, ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``,
  ``skip_nonfinite``, ``foreach`` and the moment format) and their one validation;
- :mod:`~lowrank_kernels.optim.moments`: moment formats (``moment_dtype``, ``moment_bits`` =
  32 | 16 | 8, ``block_size``, ``min_8bit_size``): new moments, the ops' arguments,
  conversion on load, zeroing;
- :mod:`~lowrank_kernels.optim.plain`: plain AdamW for the groups without ``rank``
  (bit-identical to ``torch.optim.AdamW``, or the official packages' AdamW with ``compat``);
- :mod:`~lowrank_kernels.optim.capturable`: the step a CUDA graph can capture
  (``capturable=True``);
- :mod:`~lowrank_kernels.optim._stepcache`: host mirrors of the step counts, the bucket-key
  memo and the non-finite probe (host cost only, no numbers change);
- :mod:`~lowrank_kernels.optim.common`: :func:`resolve_side`, :func:`project_fp32`,
  :func:`mix_seed`, :func:`adam_step_size` (importable from here as before).

Behaviour every optimizer shares:

- **param selection per group**: a group is *low-rank* when ``group["rank"]`` is not None
  (the galore-torch convention; FRUGAL also accepts ``density``); every other group gets
  plain AdamW;
- **validation with clear errors** (:meth:`LowRankOptimizer.add_param_group`), before
  anything is stored: errors name the optimizer, the group, the parameter and the problem;
- **the refresh schedule**: a new projector at steps 1, T+1, 2T+1, ... (``(t - 1) % T ==
  0``, ``t`` 1-based, ``T = update_proj_gap``); **the side decision** is made once per
  parameter from its shape and ``proj_type`` (:func:`resolve_side`) and stored in
  ``state["side"]``, then used for projection and back-projection alike (the reference
  packages re-derive the back-projection side from the moment's shape, which is wrong for
  ``reverse_std`` when ``rank >= min(m, n)``);
- **state-dict handling**: state holds tensors only, so ``state_dict()`` survives
  ``torch.save`` + ``torch.load(weights_only=True)``; :meth:`LowRankOptimizer.load_state_dict`
  keeps every saved tensor's dtype, keeps the host-side bookkeeping (``host_state_keys``:
  ``step``, ``side``, ``seed``, ...) on the CPU and converts moments to this optimizer's
  format (:func:`lowrank_kernels.optim.moments.convert`);
- **non-finite gradients**: with ``skip_nonfinite=True`` (the default, a group key) a
  parameter whose gradient holds a NaN or an infinity is *skipped*: its weight, moments,
  projector and step count stay as they were; :attr:`LowRankOptimizer.nonfinite_skips`
  counts the skipped parameter-steps (:meth:`LowRankOptimizer.nonfinite_skip_count`), and the
  first skip warns once per optimizer, naming the parameter. One host synchronization per :meth:`step` call
  (one probe per device), never one per parameter. With ``skip_nonfinite=False`` nothing
  is checked and a non-finite gradient propagates as in ``torch.optim.AdamW``;
- **failed projector refreshes**: when making a new projector fails (the SVD raises or
  returns non-finite values), the previous projector is kept and the step is taken with it;
  without a previous projector (the first step) the parameter is skipped and no state is
  created. Either way no NaN reaches the weights;
- **compat mode** (``compat``, for the optimizers that declare it in ``compat_modes``):
  ``"galore-torch"`` / ``"apollo-torch"`` reproduces the official package's arithmetic in
  every group: its transformers-style AdamW in the plain groups
  (:func:`lowrank_kernels.optim.plain.compat_step`) and the decay after the update in the
  projected ones (``_post_decay``). The default ``compat=None`` keeps torch.optim.AdamW's
  conventions (decay first, eps after the bias correction).

Hot-path rules: no ``.item()`` on accelerator tensors per parameter (``step``, ``side`` and
``seed`` live on the CPU, read through host mirrors), no ``torch.cuda`` calls, no ``p.data``
swapping; all projected math goes through ``lowrank_kernels.ops``.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.optim import Optimizer

from lowrank_kernels import ops

from . import capturable, checkpoint, config, moments, plain, refresh_share, report
from . import distributed as _dist
from ._stepcache import StepCache, _native_nonfinite_flags, finite_flags, increment_steps  # noqa: F401
from .common import (COMPAT_MODES, PROJ_TYPES, SIDE_CODES, SIDE_NAMES, adam_step_size, assign_, mix_seed,
                     project_fp32, resolve_side)
from .config import _is_int, _is_real  # noqa: F401  (their former home)
from .moments import ABSMAX_KEYS, MOMENT_BITS, MOMENT_BITS_DEFAULTS, MOMENT_DTYPES

#: parameter / gradient types that are never DTensors (the bucketing's fast type test).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class LowRankOptimizer(Optimizer):
    """Base class of the low-rank optimizers (see the module docstring for what they share).

    **The step loop** (:meth:`step`): collect the parameters with a gradient; if every one is
    in a ``capturable`` group and no refresh is due, take the capturable step
    (:mod:`~lowrank_kernels.optim.capturable`) and stop; else probe the gradients once
    (:func:`~lowrank_kernels.optim._stepcache.finite_flags`), skip the non-finite ones, and
    send each remaining parameter one of three ways: a parameter of a low-rank group with
    its projector and no refresh due joins a *bucket* (``_bucket_key``) and its bucket steps
    in one multi-tensor op call (``_bucket_step``); any other low-rank parameter takes
    ``_lowrank_step`` (state init on first use, refresh on schedule, then ``_project_step``);
    parameters of the other groups take plain AdamW per group (``_plain_step``,
    :mod:`~lowrank_kernels.optim.plain`). The bucketed and per-parameter paths are
    bit-identical.

    **Subclassing contract.** The hooks below are *private to this package*: the method files
    of ``lowrank_kernels.optim`` implement them, they are not a public extension API (their
    protocol is tied to the bucketed and capturable paths and may change). Arguments: ``p``
    the parameter, ``grad`` its gradient, ``state`` its state dict, ``group`` its param group,
    ``step`` the 1-based step being taken, ``gi`` the group's index.

    ``_is_lowrank(group)``, ``_group_rank(group, shape)``
        whether a group is projected (default: ``rank`` is set); the rank for a weight of
        ``shape`` (FRUGAL derives it from ``density``).
    ``_validate_lowrank_group(group, gi)``
        checks of a low-rank group; extend it and call ``super()``. Messages through
        ``_err(gi, msg)``.
    ``_init_state(p, state, group)``
        fill a fresh state: the base sets ``step`` (float32, CPU) and ``side`` (int8, CPU:
        0 right, 1 left, 2 full); a subclass adds its moments
        (:func:`lowrank_kernels.optim.moments.init`).
    ``_has_projector(state)``, ``_should_refresh(p, state, group, step)``
        whether a projector exists; whether this step makes a new one (default: none yet, or
        ``(step - 1) % update_proj_gap == 0``).
    ``_refresh_projector(p, grad, state, group, step) -> bool``
        make and store the new projector; False (state unchanged) on failure. The default
        stores ``_compute_projector(...)`` (None on failure) as ``state["projector"]``.
    ``_refresh_cost(p, group)``
        what computing ``p``'s projector costs; above 0, the ranks of a data-parallel group
        split those refreshes (:mod:`~lowrank_kernels.optim.refresh_share`): the owner runs
        ``_compute_projector`` ahead of the loop and every rank's ``_refresh_projector`` gets
        its result from ``_compute_projector``.
    ``_get_projector(p, state, group)``
        what the step passes as ``proj`` to ``lowrank_kernels.ops`` (a tensor or a structured
        projector such as ``ops.DCTProjector``).
    ``_project_step(p, grad, state, group, step)``
        the update itself, through ``lowrank_kernels.ops``; ``state["step"]`` already holds
        ``step``. Moment-format arguments of the ops: ``_moment_kwargs(p, state, group, step)``.
    ``_bucket_key(p, state, group)``, ``_bucket_step(key, entries, skip=None, coeffs=None)``
        optional: a hashable key for parameters that may step together (None: per parameter),
        and the multi-tensor step of one bucket (``entries``: ``(p, state, group, step)``;
        ``skip`` / ``coeffs``: the capturable step's device flags and coefficients). A key
        must be None when a subclass changed the per-parameter step
        (``_own_fused_step(cls)``).
    ``_plain_step(group, params)``, ``_capturable_plain(p, group)``
        plain AdamW of a group's parameters (Adafactor and Q-GaLore replace it); whether a
        parameter of a low-rank group is stepped as plain (DCTAdamW's non-projected ones).

    Class attributes: ``proj_types``, ``min_rank``, ``host_state_keys`` (state kept on the
    CPU), ``moment_keys`` (the moments ``moment_bits`` applies to), ``compat_modes`` and
    ``supports_capturable`` (read from the class itself, not inherited: a subclass that
    changes the step declares them again), ``bucketed``.

    Subclasses pass ``defaults`` that contain at least ``lr``, ``betas``, ``eps``,
    ``weight_decay`` and ``skip_nonfinite``, plus their low-rank keys: build them with
    :class:`~lowrank_kernels.optim.config.OptimizerConfig`.
    """

    #: proj_type values a low-rank group may use.
    proj_types: Tuple[str, ...] = ("std", "reverse_std", "left", "right")
    #: smallest rank a low-rank group may ask for.
    min_rank: int = 1
    #: state keys kept as CPU tensors (bookkeeping read on the host every step).
    host_state_keys = frozenset({"step", "side", "seed", "subspace_step"})
    #: the Adam-style moments a ``moment_bits`` format applies to: ``(state key, signed map)``.
    moment_keys: Tuple[Tuple[str, bool], ...] = moments.ADAM_MOMENTS
    #: ``compat`` values this optimizer reproduces. Read from the class itself, not inherited.
    compat_modes: Tuple[str, ...] = ()
    #: step the projected parameters that take the plain fused step (no refresh due) by
    #: bucket, one multi-tensor op call per bucket; bit-identical to the per-parameter path.
    #: False (or the group key ``foreach=False``) forces one op call per parameter.
    bucketed: bool = True
    #: whether ``capturable=True`` (group key) is supported. Read from the class itself.
    supports_capturable: bool = False

    def __init__(self, params, defaults: Dict[str, Any]):
        self._param_index: Dict[torch.Tensor, int] = {}
        #: number of parameter-steps skipped because the gradient was not finite.
        self.nonfinite_skips = 0
        #: the warnings shown once per optimizer (a layer-wise optimizer shares one dict).
        self._warned: Dict[str, bool] = {"nonfinite": False}
        #: number of projector refreshes that failed and kept the previous projector.
        self.failed_refreshes = 0
        defaults = {"moment_dtype": "float32", **MOMENT_BITS_DEFAULTS, **defaults}
        super().__init__(params, defaults)
        self._warn_selection()

    def _warn_selection(self, plain_name: str = "plain AdamW", stacklevel: int = 4) -> None:
        """Warn when nothing, or fewer than half of the eligible 2-D weights, is projected
        (:func:`lowrank_kernels.optim.report.warn_selection`)."""
        report.warn_selection(self, plain_name, stacklevel + 1)

    def summary(self, named_parameters=None) -> str:
        """A table of the parameters: name, shape, projected or plain, rank, side and the
        bytes of the state (:func:`lowrank_kernels.optim.report.summary`; names from
        ``named_parameters``, e.g. ``model.named_parameters()``, else a group's ``names``)."""
        return report.summary(self, named_parameters)

    @property
    def _skip_counters(self) -> Dict[torch.device, torch.Tensor]:
        """The capturable steps' device-side skip counters, one per device
        (:func:`lowrank_kernels.optim.capturable.ensure_counters`)."""
        return self.__dict__.setdefault("_device_skips", {})

    @property
    def _steps(self) -> StepCache:
        """The host-cost memos of this optimizer (made on first use)."""
        cache = self.__dict__.get("_step_cache")
        if cache is None:
            cache = self.__dict__["_step_cache"] = StepCache(len(self._param_index), len(self.param_groups))
        return cache

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
        if "rank" in param_group and param_group["rank"] is None:
            self.__dict__["_rank_none_given"] = True  # the plain group of lowrank_param_groups
        param_group["params"] = params
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._param_index.setdefault(p, len(self._param_index) + 1)
        if self.param_groups[-1].get("capturable", False):  # skip counters made before any capture
            capturable.ensure_counters(self._skip_counters, {p.device for p in self.param_groups[-1]["params"]})

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
        """The parameters, ``capturable``, the shared keys (:func:`config.validate`), the
        low-rank keys in a low-rank group and ``compat``."""
        err = lambda msg: self._err(gi, msg)  # noqa: E731
        self._validate_params(group, gi)
        capturable.validate(type(self), group, err)
        config.validate(group, err)
        if self._is_lowrank(group):
            self._validate_lowrank_group(group, gi)
        self._validate_compat(group, gi)

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
        """Checks of a low-rank group (its keys, then each parameter); subclasses extend it."""
        config.check_lowrank(group, lambda msg: self._err(gi, msg), proj_types=self.proj_types,
                             min_rank=self.min_rank)
        for pi, p in enumerate(group["params"]):
            if self._plain_in_lowrank_group(p, group):
                continue
            reason = _dist.unsupported_placement(p)
            if reason is not None:
                raise ValueError(self._err(gi, f"parameter {pi}: {reason}"))
            reason = _dist.flat_parameter_error(p)
            if reason is not None:
                raise ValueError(self._err(gi, f"parameter {pi} {reason}"))
            if p.dim() != 2:
                raise ValueError(self._err(
                    gi, f"parameter {pi} has shape {tuple(p.shape)}: a low-rank group takes 2-D weights only; "
                        "put it in a group with rank=None (lowrank_kernels.optim.lowrank_param_groups does this)"))
            r = self._group_rank(group, tuple(p.shape))
            k = min(p.shape)
            if not self.min_rank <= r <= k:
                raise ValueError(self._err(
                    gi, f"rank {r} is out of range for parameter {pi} of shape {tuple(p.shape)}: "
                        f"need {self.min_rank} <= rank <= min(m, n) = {k}"))
            if _dist.is_dtensor(p) and group.get("proj_type") in PROJ_TYPES:
                reason = _dist.block_moment_error(p, resolve_side(tuple(p.shape), group["proj_type"]), r, group)
                if reason is not None:
                    raise ValueError(self._err(gi, f"parameter {pi} {reason}"))

    def _plain_in_lowrank_group(self, p: torch.Tensor, group: Dict[str, Any]) -> bool:
        """Whether a low-rank group leaves ``p`` plain by an explicit option (DCTAdamW's
        ``max_dim``); such a parameter skips the low-rank checks. Default: never."""
        return False

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient (see the class docstring).

        ``closure`` (optional) re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._steps.new_step(len(self._param_index), len(self.param_groups))
        if self.__dict__.pop("_placeholder_state", False):
            self._drop_placeholder_state()
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
        capturable.sync_device_steps(self.param_groups, work, self.state, self._steps.remember, self._skip_counters)
        finite = finite_flags(work)
        # Refreshes due now, split over the ranks of a data-parallel group (optim/refresh_share.py).
        refresh_share.prepare(self, work, finite)  # (the next prepare drops what an exception left)
        plain_params: Dict[int, List[torch.Tensor]] = defaultdict(list)
        buckets: Dict[tuple, list] = {}
        kinds: Dict[int, Tuple[bool, bool]] = {}  # per group: (low-rank, bucketed), decided once per step
        for (group, p), ok in zip(work, finite):
            if not ok:
                self.nonfinite_skips += 1
                if not self._warned["nonfinite"]:
                    report.warn_nonfinite(self, group, p)
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
                plain_params[id(group)].append(p)
        for key, entries in buckets.items():
            self._bucket_step(key, entries)
            # One op for the bucket's (CPU float32) step counts; exact, as ``+= 1`` per parameter;
            # then their host mirrors, so the next step reads no step tensor.
            steps = [state["step"] for _, state, _, _ in entries]
            increment_steps(steps)
            self._steps.remember_steps(steps, [step for _, _, _, step in entries])
        for group in self.param_groups:
            if plain_params.get(id(group)):
                self._plain_step(group, plain_params[id(group)])
        refresh_share.clear(self)
        return loss

    def _lowrank_step(self, p: torch.Tensor, grad: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]):
        """Init (on first use), refresh on schedule, then ``_project_step``.

        A state is created only once its first projector exists, so a parameter whose first
        refresh fails is left exactly as it was.
        """
        fresh = len(state) == 0
        work_state = {} if fresh else state
        if fresh:
            self._init_state(p, work_state, group)
        step = self._host_int(work_state["step"]) + 1
        if self._should_refresh(p, work_state, group, step):
            placeholder = self._placeholder_projector if self.__dict__.get("_placeholder_refresh") else None
            with refresh_share.serving(self, p, placeholder):  # the ranks' shared result, or init_state's placeholder
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
        self._steps.remember(state["step"], step)
        self._project_step(p, grad, state, group, step)
        _dist.place_state(p, state, self._side(state), self.host_state_keys)

    # ------------------------------------------------------------------ state for checkpoint loading
    @torch.no_grad()
    def init_state(self) -> None:
        """Create every parameter's state without training: the tensors a checkpoint loader
        (``torch.distributed.checkpoint``, torchtitan) loads into, or saves at step 0.

        One step on zero gradients with ``lr = 0`` (the weights do not move) makes the state,
        with **placeholder projectors**: no projector is computed from the zero gradient (no
        SVD). Every step count is then 0, which marks the state as *not stepped*: the next
        :meth:`step` drops such a state and starts afresh (its first projector from the real
        gradient), so training after ``init_state()`` is bitwise training without it; a
        checkpoint loaded over it replaces it. No-op when any parameter already has a state
        or a gradient (as torchtitan's ``init_optim_state``).
        """
        params = [p for g in self.param_groups for p in g["params"]]
        if self.state or any(p.grad is not None for p in params):
            return
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        lrs = [g.get("lr") for g in self.param_groups]
        for g in self.param_groups:  # (None: an lr the optimizer computes, e.g. Adafactor's relative step)
            if g.get("lr") is not None:
                g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        self.__dict__["_placeholder_refresh"] = True
        try:
            self.step()
        finally:
            self.__dict__.pop("_placeholder_refresh", None)
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = lr
            for p in params:
                p.grad = None
        for st in self.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"].zero_()
        self._steps.forget_mirrors()
        self.__dict__["_placeholder_state"] = True

    def _drop_placeholder_state(self) -> None:
        """Forget the states :meth:`init_state` made that no step or checkpoint replaced
        (step count 0), so the parameters start afresh."""
        stale = [p for p, st in self.state.items()
                 if isinstance(st.get("step"), torch.Tensor) and float(st["step"]) == 0.0]
        for p in stale:
            del self.state[p]
        self._steps.forget_mirrors()

    def _placeholder_projector(self, p, grad, state, group, step: int):
        """What :meth:`init_state` stores as ``p``'s projector: of the real one's shape and
        dtype, its values unused (the first real step makes the projector). Default: the
        method's own ``_compute_projector`` on the (zero) gradient; the SVD methods return
        zeros instead of running an SVD."""
        return self._compute_projector(p, grad, state, group, step)

    def _plain_step(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        """Plain AdamW on ``params`` of ``group`` (:func:`lowrank_kernels.optim.plain.step`)."""
        plain.step(self.state, group, params, moment_seed=self._moment_seed)

    def _post_decay(self, group: Dict[str, Any]) -> float:
        """The factor a projected update is multiplied by so that a decay-first kernel
        (``W <- d W - a U``, ``d = 1 - lr wd``) yields the official packages' order
        ``W <- d (W - a U)``: ``d`` with ``compat`` set, else 1."""
        if group.get("compat") is None:
            return 1.0
        return 1.0 - group["lr"] * group["weight_decay"]

    # ------------------------------------------------------------------ capturable (device-side) steps
    def _capturable_plain(self, p: torch.Tensor, group: Dict[str, Any]) -> bool:
        return False  # whether p of a low-rank group takes plain AdamW; the base projects every one

    def _capturable_step(self, work) -> bool:
        """The capturable step when it applies (:func:`lowrank_kernels.optim.capturable.plan`);
        False (nothing done) otherwise, and the caller takes the synchronizing path."""
        made = capturable.plan(work, self.state, lambda p, g: self._is_lowrank(g) and not self._capturable_plain(p, g),
                               self._bucket_entry)
        if made is None:
            return False
        capturable.run(*made, state_of=self.state, bucket_step=self._bucket_step,
                       counters=self._skip_counters, remember=self._steps.remember)
        return True

    def nonfinite_skip_count(self) -> int:
        """:attr:`nonfinite_skips` plus the skips counted on the device by capturable steps
        (reads the device counters: one host synchronization per device)."""
        return self.nonfinite_skips + sum(int(c) for c in self._skip_counters.values())

    def sync_step_counts(self) -> None:
        """Re-read the device step counts of the capturable groups into the host's copies (one
        host synchronization per device).

        The host decides refreshes from its own copy of each step count, which a captured
        step's replay (``torch.cuda.CUDAGraph.replay``) does not advance, and which assumes a
        step was not skipped. Call this after replaying captured steps and before the next
        eager :meth:`step` (e.g. the refresh step): the eager steps then follow the device
        counts. A synchronizing step (a refresh) re-reads them by itself."""
        work = [(g, p) for g in self.param_groups for p in g["params"]]
        capturable.sync_device_steps(self.param_groups, work, self.state, self._steps.remember, self._skip_counters)

    # ------------------------------------------------------------------ bucketed (multi-tensor) steps
    def _bucketing(self, group: Dict[str, Any]) -> bool:
        """Whether the projected parameters of ``group`` may step by bucket: :attr:`bucketed`
        is true and the group does not set ``foreach=False``."""
        return self.bucketed and group.get("foreach") is not False

    def _bucket_entry(self, p: torch.Tensor, group: Dict[str, Any]):
        """``(key, step, state)`` when ``p`` takes the plain fused step this step (state and
        projector exist, no refresh due, a plain tensor or a DTensor the list ops serve
        (:func:`~lowrank_kernels.optim.distributed.bucketable`), and ``_bucket_key`` gives a
        key), else None. ``step`` is the 1-based step about to be taken."""
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
        """``_bucket_key``, remembered per parameter while nothing it may read has changed
        (:meth:`~lowrank_kernels.optim._stepcache.StepCache.bucket_key`)."""
        return self._steps.bucket_key(p, state, group, self._bucket_key)

    def _bucket_key(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> Optional[tuple]:
        """The bucket of a parameter that takes the plain fused step; None (default): per parameter."""
        return None

    def _bucket_step(self, key: tuple, entries: List[tuple], skip=None, coeffs=None) -> None:
        """Step the parameters of one bucket; ``entries`` holds ``(p, state, group, step)``.
        ``state["step"]`` is incremented by the caller after this returns."""
        raise NotImplementedError

    def _own_fused_step(self, cls) -> bool:
        """Whether this optimizer's per-parameter path is exactly ``cls``'s (no subclass
        overrides a method the bucketed step bypasses), so bucketing stays bit-identical."""
        cached = self._steps.own_fused
        ok = cached.get(cls)
        if ok is None:
            t = type(self)
            names = ("_project_step", "_lowrank_step", "_get_projector", "_should_refresh", "_has_projector", "step")
            ok = cached[cls] = all(getattr(t, n) is getattr(cls, n) for n in names)
        return ok

    # ------------------------------------------------------------------ hooks (see the class docstring)
    def _init_state(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=plain.step_device(p, group))
        side = resolve_side(tuple(p.shape), group["proj_type"])
        state["side"] = torch.tensor(SIDE_CODES[side], dtype=torch.int8)
        # their host mirrors: the first step reads neither back (a device step count would sync)
        self._steps.remember(state["step"], 0)
        self._steps.remember(state["side"], SIDE_CODES[side])

    def _has_projector(self, state: Dict[str, Any]) -> bool:
        return "projector" in state

    def _should_refresh(self, p, state, group, step: int) -> bool:
        return not self._has_projector(state) or (step - 1) % group["update_proj_gap"] == 0

    def _refresh_projector(self, p, grad, state, group, step: int) -> bool:
        proj = self._compute_projector(p, grad, state, group, step)
        if proj is None:
            return False
        assign_(state, "projector", proj)  # in place after the first: captured graphs stay valid
        return True

    def _compute_projector(self, p, grad, state, group, step: int) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def _refresh_cost(self, p: torch.Tensor, group: Dict[str, Any]) -> int:
        """What computing ``p``'s projector costs (arbitrary units, e.g. ``m n min(m, n)`` for an
        SVD): the ranks of a data-parallel group share the refreshes that cost anything
        (:mod:`~lowrank_kernels.optim.refresh_share`), balanced by this cost; 0 (default): every
        rank refreshes ``p`` itself. A method returning more than 0 makes its projector in
        ``_compute_projector`` from ``p``, ``grad``, ``state["side"]``, ``group`` and ``step``
        alone (a pure function of them)."""
        return 0

    def _get_projector(self, p, state, group):
        return state["projector"]

    def _project_step(self, p, grad, state, group, step: int) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ per-parameter helpers of the method files
    def _moment_shape(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> Tuple[int, int]:
        """The shape of ``p``'s projected gradient ``R`` (its moments): ``m x r`` / ``r x n`` by
        the stored side, ``r x r`` for ``full``."""
        (m, n), side = p.shape, self._side(state)
        r = self._group_rank(group, (m, n))
        return (r, r) if side == "full" else ops.lowrank_shape(m, n, r, side)

    def _side(self, state: Dict[str, Any]) -> str:
        """``state["side"]`` as ``"right"``, ``"left"`` or ``"full"`` (read through its host mirror)."""
        return SIDE_NAMES[self._steps.host_int(state["side"])]

    def _host_int(self, t) -> int:
        """``int(t)`` of a host bookkeeping scalar, through its host mirror
        (:meth:`~lowrank_kernels.optim._stepcache.StepCache.host_int`)."""
        return self._steps.host_int(t)

    def _param_seed(self, p: torch.Tensor) -> int:
        """1-based position of ``p`` among all parameters, in the order they were added."""
        return self._param_index[p]

    def _moment_seed(self, p: torch.Tensor, step: int) -> int:
        """The stochastic-rounding seed of ``p``'s 16-bit moments at ``step`` (1-based): a hash of
        the parameter's position and the step (the same in a resumed run)."""
        return mix_seed(self._param_seed(p), step, 0x16B)

    def _moment_kwargs(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any],
                       step: int) -> Dict[str, Any]:
        """The moment-format arguments of the ops for ``state``'s moments
        (:func:`lowrank_kernels.optim.moments.op_kwargs`, with ``p``'s seed at ``step``)."""
        return moments.op_kwargs(state, moments.format_of(group), lambda: self._moment_seed(p, step))

    def _foreach_moment_kwargs(self, entries: List[tuple]) -> Dict[str, Any]:
        """``_moment_kwargs`` of a bucket's ``(p, state, group, step)`` entries as the list
        arguments of the multi-tensor ops."""
        return moments.foreach_op_kwargs([self._moment_kwargs(p, st, g, t) for p, st, g, t in entries])

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`.

        Unlike torch's default, every tensor keeps its saved dtype (moments kept in float32 for
        a bfloat16 parameter stay float32), and the keys of :attr:`host_state_keys` stay on the
        CPU; the others move to the parameter's device. The moment format (``moment_bits``,
        ``block_size``, ``min_8bit_size``) and ``capturable`` stay this optimizer's; saved
        moments are converted to that format (:func:`lowrank_kernels.optim.moments.convert`).
        """
        self._check_saved_state(state_dict)
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        self._check_saved_moments(state_dict)
        formats = [{k: g[k] for k in MOMENT_BITS_DEFAULTS if k in g} for g in self.param_groups]
        saved_bs = [int(sg.get("block_size", 256)) for sg in saved_groups]
        caps = [g.get("capturable", False) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, fmt, c in zip(self.param_groups, formats, caps):
            g.update(fmt)
            g["capturable"] = c
        self._steps.forget_mirrors()  # every state tensor is new: read them again
        if any(isinstance(v, dict) and isinstance(v.get("step"), torch.Tensor) and v["step"].numel() == 1
               and float(v["step"]) == 0.0 for v in saved_state.values()):
            self.__dict__["_placeholder_state"] = True  # saved after init_state() alone: dropped at the next step
        id_map = zip(
            chain.from_iterable(g["params"] for g in saved_groups),
            chain.from_iterable(g["params"] for g in self.param_groups),
        )
        where = {p: (g, bs) for g, bs in zip(self.param_groups, saved_bs) for p in g["params"]}
        capt = {id(p) for g in self.param_groups if g["capturable"] for p in g["params"]}
        for saved_id, p in id_map:
            if saved_id in saved_state:
                self.state[p] = {
                    k: checkpoint.load_value(self, p, k, v, id(p) in capt) for k, v in saved_state[saved_id].items()
                }
                for key in ("step", "side"):  # host values now, so the next steps read no tensor
                    new, saved = self.state[p].get(key), saved_state[saved_id].get(key)
                    if (isinstance(new, torch.Tensor) and isinstance(saved, torch.Tensor)
                            and saved.device.type == "cpu" and saved.numel() == 1):
                        self._steps.remember(new, int(saved))
                checkpoint.convert_moments(self, p, self.state[p], *where[p])

    def _check_saved_state(self, state_dict) -> None:
        """Refuse another optimizer's state, a plain state for a projected parameter (or the
        reverse) and a changed rank (:func:`lowrank_kernels.optim.checkpoint.check_saved_state`)."""
        checkpoint.check_saved_state(self, state_dict)

    def _check_saved_moments(self, state_dict) -> None:
        """Refuse saved 8-bit moments without their absmax
        (:func:`lowrank_kernels.optim.checkpoint.check_saved_moments`)."""
        checkpoint.check_saved_moments(self, state_dict)


__all__ = ["LowRankOptimizer", "resolve_side", "project_fp32", "mix_seed", "adam_step_size", "SIDE_NAMES",
           "SIDE_CODES", "PROJ_TYPES", "COMPAT_MODES", "MOMENT_DTYPES", "MOMENT_BITS", "MOMENT_BITS_DEFAULTS",
           "ABSMAX_KEYS"]
