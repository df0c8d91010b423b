"""Layer-wise updates: step each parameter inside backward and free its gradient at once.

Peak memory then holds one parameter's gradient at a time instead of all of them
(the trick of the GaLore 7B-on-24GB recipe), with two corrections over the
reference scripts: gradient accumulation works (the update runs after the last
micro-batch, on the summed gradient) and the learning-rate schedule advances once
per optimizer step.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from .base import LowRankOptimizer


class LayerwiseOptimizer:
    """Per-parameter optimizers driven by ``register_post_accumulate_grad_hook``.

    Built by :func:`layerwise`. After ``loss.backward()`` of the
    ``accumulation_steps``-th micro-batch, each parameter has already been updated
    (once its gradient was complete) and its ``.grad`` freed; in between, gradients
    accumulate in ``.grad`` as usual. :meth:`step` and :meth:`zero_grad` exist so
    that a training loop runs unchanged: ``step()`` does nothing (the updates
    happened in backward) and ``zero_grad()`` clears whatever gradients remain.

    Each parameter counts its own micro-batches (hook calls), so every parameter
    must receive a gradient in every micro-batch; a parameter that gets none keeps
    its count and falls out of step with the others.

    The non-finite check of this package's optimizers (``skip_nonfinite``) then runs
    once per parameter, i.e. one host synchronization per parameter; pass
    ``skip_nonfinite=False`` to the optimizers to avoid it. Each per-parameter
    optimizer of this package is told the parameter's position among all the
    parameters, so seeded projections (APOLLO, FRUGAL ``random``/``columns``, the
    randomized SVD) are the ones a single optimizer over the same groups draws.
    """

    def __init__(
        self,
        groups: List[Dict[str, Any]],
        optimizer_factory: Callable[[List[Dict[str, Any]]], Optimizer],
        accumulation_steps: int = 1,
        scheduler_factory: Optional[Callable[[Optimizer], Any]] = None,
    ):
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"layerwise: accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        self.accumulation_steps = accumulation_steps
        self.params: List[torch.Tensor] = []
        self.optimizers: List[Optimizer] = []
        self.schedulers: List[Any] = []
        self._micro: List[int] = []
        self._warned: Dict[str, bool] = {"nonfinite": False, "window": False}
        self._grad_version: List[Optional[int]] = []
        self._handles = []
        seen = set()
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                with warnings.catch_warnings():
                    # A per-parameter optimizer of a plain parameter has no low-rank group, by design.
                    warnings.filterwarnings("ignore", message=".*no parameter group is low-rank.*")
                    opt = optimizer_factory([{"params": [p], **options}])
                if not isinstance(opt, Optimizer):
                    raise TypeError(
                        f"layerwise: optimizer_factory must return a torch.optim.Optimizer, got {type(opt).__name__}"
                    )
                if any(g.get("capturable", False) for g in opt.param_groups):
                    raise ValueError(
                        "layerwise: capturable=True is not supported: each parameter steps inside backward "
                        "(a gradient hook), so there is no optimizer step to capture in a CUDA graph; pass "
                        "capturable=False (or capture the whole training step without layerwise)"
                    )
                index = len(self.params)
                if isinstance(opt, LowRankOptimizer):
                    # Seeds (APOLLO's projection, FRUGAL's random subspaces, the randomized SVD)
                    # derive from the parameter's position: give it the position it has among
                    # all parameters, as in one optimizer over the same groups.
                    opt._param_index[p] = index + 1
                    opt._warned = self._warned  # warnings shown once for the whole layer-wise optimizer
                self.params.append(p)
                self.optimizers.append(opt)
                self.schedulers.append(scheduler_factory(opt) if scheduler_factory is not None else None)
                self._micro.append(0)
                self._grad_version.append(-2)
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(index)))
        if not self.params:
            raise ValueError("layerwise: no parameter requires grad")

    def _make_hook(self, index: int):
        def hook(p: torch.Tensor) -> None:
            g = p.grad
            # Mid-window, the gradient must be the one the last micro-batch left, grown by exactly
            # one in-place accumulation: a zero_grad() in between (set to None or zeroed) breaks that.
            last = self._grad_version[index]  # None: unknown (a loaded state dict)
            if self._micro[index] > 0 and last is not None and (g is None or g._version != last + 1):
                self._warn_window_reset(f"the gradient of parameter {index} (shape {tuple(p.shape)}) was reset "
                                        f"(zero_grad: set to None or zeroed) after micro-batch {self._micro[index]}")
            self._micro[index] += 1
            if self._micro[index] < self.accumulation_steps:
                self._grad_version[index] = g._version if g is not None else -2
                return  # keep accumulating into p.grad
            self._micro[index] = 0
            opt = self.optimizers[index]
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched = self.schedulers[index]
            if sched is not None:
                sched.step()

        return hook

    # ------------------------------------------------------------------ training-loop API
    def step(self, closure=None):
        """Nothing to do: every parameter was stepped inside backward. Returns ``closure()`` if given."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def nonfinite_skip_count(self) -> int:
        """Parameter-steps skipped for a non-finite gradient, over every per-parameter optimizer."""
        return sum(int(opt.nonfinite_skip_count()) for opt in self.optimizers if hasattr(opt, "nonfinite_skip_count"))

    def _warn_window_reset(self, what: str) -> None:
        """The one warning of an accumulation window cut short (shown once per optimizer)."""
        if self._warned.get("window"):
            return
        self._warned["window"] = True
        warnings.warn(
            f"layerwise: {what}, before the last of the accumulation_steps={self.accumulation_steps} micro-batches, so "
            "the step will use only the gradients accumulated since; call zero_grad() only after the last "
            "micro-batch of a window (this warning is shown once)", UserWarning, stacklevel=3)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear any gradient left and restart the micro-batch count. Called in the middle of
        an accumulation window (gradients of earlier micro-batches pending), it warns once:
        those micro-batches are discarded."""
        if self.accumulation_steps > 1 and any(self._micro):
            pending = max(self._micro)
            self._warn_window_reset(f"zero_grad() was called after micro-batch {pending}, which discards the "
                                    "gradients accumulated so far")
        for i, p in enumerate(self.params):
            self._micro[i] = 0
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def clip_grad_norm_(self, *args, **kwargs):
        """Always raises: clipping by the global norm needs every gradient at once,
        but layer-wise updates step (and free) each gradient as soon as it exists."""
        raise RuntimeError(
            "layerwise: gradient clipping by global norm is impossible with layer-wise updates "
            "(each parameter is updated and its gradient freed during backward, before the global "
            "norm is known); use a standard optimizer to clip, or clip per parameter in the optimizer"
        )

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """All per-parameter groups (for logging the learning rate)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    def get_last_lr(self) -> List[float]:
        """The current learning rate of every parameter, in order."""
        return [opt.param_groups[0]["lr"] for opt in self.optimizers]

    def remove_hooks(self) -> None:
        """Detach the backward hooks (the parameters then need an ordinary optimizer)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Every per-parameter optimizer's and scheduler's state and the micro-batch counts."""
        return {
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [s.state_dict() if s is not None else None for s in self.schedulers],
            "micro_steps": list(self._micro),
            "accumulation_steps": self.accumulation_steps,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        opts = state_dict["optimizers"]
        if len(opts) != len(self.optimizers):
            raise ValueError(
                f"layerwise: the state dict has {len(opts)} per-parameter optimizers, this one {len(self.optimizers)}"
            )
        for opt, sd in zip(self.optimizers, opts):
            opt.load_state_dict(sd)
        for sched, sd in zip(self.schedulers, state_dict.get("schedulers", [None] * len(self.schedulers))):
            if sched is not None and sd is not None:
                sched.load_state_dict(sd)
        self._micro = list(state_dict.get("micro_steps", [0] * len(self.optimizers)))
        self._grad_version = [None] * len(self.optimizers)


def layerwise(
    model_or_params,
    optimizer_factory: Callable[[List[Dict[str, Any]]], Optimizer],
    *,
    accumulation_steps: int = 1,
    scheduler_factory: Optional[Callable[[Optimizer], Any]] = None,
) -> LayerwiseOptimizer:
    """Step each parameter inside backward (``register_post_accumulate_grad_hook``).

    Args:
        model_or_params: an ``nn.Module``, an iterable of parameters, or a list of
            param-group dicts (e.g. from :func:`lowrank_param_groups`): each
            parameter gets its own optimizer with its group's options.
        optimizer_factory: called once per parameter with a one-group list
            ``[{"params": [p], **group_options}]``; returns the optimizer, e.g.
            ``lambda groups: GaLoreAdamW(groups, lr=1e-2)``.
        accumulation_steps: micro-batches per optimizer step; the update runs in the
            backward of the last one, on the summed gradient.
        scheduler_factory: optional, called with each per-parameter optimizer; the
            scheduler steps once per optimizer step of its parameter.

    Returns a :class:`LayerwiseOptimizer`. Gradient clipping by global norm is not
    possible (its ``clip_grad_norm_`` raises). Call ``remove_hooks()`` to detach.
    """
    if isinstance(model_or_params, nn.Module):
        groups = [{"params": list(model_or_params.parameters())}]
    else:
        items = list(model_or_params)
        if items and all(isinstance(g, dict) for g in items):
            groups = [
                dict(g, params=[g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"]))
                for g in items
            ]
        elif all(isinstance(p, torch.Tensor) for p in items):
            groups = [{"params": items}]
        else:
            raise TypeError("layerwise: pass an nn.Module, an iterable of Tensors, or a list of param-group dicts")
    return LayerwiseOptimizer(groups, optimizer_factory, accumulation_steps, scheduler_factory)
