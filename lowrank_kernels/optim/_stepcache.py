"""Host cost of a step: memos that spare the host work, and the non-finite gradient probe.

Bookkeeping only: nothing here changes a number an optimizer computes.

- :class:`StepCache` (one per optimizer): host mirrors of the bookkeeping scalars
  (``state["step"]``, ``state["side"]``) so a step reads no tensor for them, the bucket-key
  memo per parameter, the token memo per group and a step serial.
- :func:`increment_steps`: a bucket's step counts ``+ 1`` in one call.
- :func:`finite_flags`: whether each gradient is finite, with one host synchronization per
  device (or none, through the extension's bit test on CPU).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from lowrank_kernels.ops._checks import _native_helpers
from lowrank_kernels.ops._registry import plain_eager

from . import distributed as _dist

#: dtypes a mirror is kept for, with the bound below which every integer and its successor
#: are exact in that dtype (float32: 2^24); other dtypes (bfloat16, float16 counts from an odd
#: checkpoint) are read every time.
MIRROR_EXACT = {torch.float32: 1 << 24, torch.float64: 1 << 53, torch.int64: 1 << 62, torch.int32: (1 << 31) - 1,
                torch.int16: (1 << 15) - 1, torch.int8: 127, torch.uint8: 255}


class StepCache:
    """The host-side memos of one optimizer (see the module docstring).

    ``nparams`` / ``ngroups`` (the optimizer's counts, updated at each :meth:`new_step`) size
    the memos: a memo grown well past them holds entries of tensors, parameters or groups no
    longer there and is cleared.
    """

    __slots__ = ("mirrors", "bucket_keys", "group_tokens", "serial", "own_fused", "nparams", "ngroups")

    def __init__(self, nparams: int = 0, ngroups: int = 0):
        #: ``id(t) -> (t, t._version, value)``: the host value of a bookkeeping scalar ``t``.
        self.mirrors: Dict[int, tuple] = {}
        #: ``id(p) -> (p, state, group token, state values, side version, dtype, device, key)``.
        self.bucket_keys: Dict[int, tuple] = {}
        #: ``id(group) -> (group, token, serial)``.
        self.group_tokens: Dict[int, tuple] = {}
        #: the step serial: per-step memos (:meth:`group_token`) start afresh at each step.
        self.serial = 0
        #: ``class -> bool``: see ``LowRankOptimizer._own_fused_step``.
        self.own_fused: Dict[type, bool] = {}
        self.nparams = nparams
        self.ngroups = ngroups

    def new_step(self, nparams: int, ngroups: int) -> None:
        """A new optimizer step begins (``nparams`` parameters in ``ngroups`` groups)."""
        self.serial += 1
        self.nparams = nparams
        self.ngroups = ngroups

    # ------------------------------------------------------------------ host mirrors
    def host_int(self, t) -> int:
        """``int(t)`` for a host bookkeeping scalar (``step``, ``side``), read from its mirror
        when ``t`` is unchanged since it was read or written here, else from the tensor.

        The mirror of ``t`` is ``(t, t._version, value)``: it is used only while ``t`` is the same
        object (the mirror holds it, so its ``id`` cannot be reused) and its version counter has
        not moved, i.e. no in-place write reached it (``copy_``, ``+=``, ``fill_``, an optimizer
        step, ...); a replaced tensor (``load_state_dict``, a subclass's reset) is another object.
        Writes that bypass the version counter (through ``.data``, numpy views or raw pointers)
        are not seen: change ``state["step"]`` with tensor ops or by assignment.
        """
        m = self.mirrors.get(id(t))
        if m is not None and m[0] is t and m[1] == t._version:
            return m[2]
        value = int(t)
        self.remember(t, value)
        return value

    def remember(self, t, value: int) -> None:
        """Record that ``t`` (a host scalar, just read or written) holds the integer ``value``.
        Values outside ``[0, bound)`` of :data:`MIRROR_EXACT` (where ``+ 1`` stops being exact in
        ``t``'s dtype: 2^24 for float32), other dtypes and tensors without a version counter
        (inference tensors) get no mirror. Device tensors (``capturable=True`` step counts) get
        one too: their values are then the host's copy (``LowRankOptimizer.sync_step_counts``)."""
        if type(t) is not torch.Tensor or t.is_inference():
            return
        mirrors = self.mirrors
        if not 0 <= value < MIRROR_EXACT.get(t.dtype, 0):
            mirrors.pop(id(t), None)
            return
        if len(mirrors) > 4 * self.nparams + 64:  # replaced tensors' stale mirrors
            mirrors.clear()
        mirrors[id(t)] = (t, t._version, value)

    def remember_steps(self, steps: List[torch.Tensor], values: List[int]) -> None:
        """:meth:`remember` for the step tensors of a bucket just incremented in place: the
        tensors mirrored when they were read (so plain CPU tensors) get their new values."""
        mirrors = self.mirrors
        for t, value in zip(steps, values):
            m = mirrors.get(id(t))
            if m is not None and m[0] is t:
                if value < MIRROR_EXACT.get(t.dtype, 0):
                    mirrors[id(t)] = (t, t._version, value)
                else:
                    del mirrors[id(t)]

    def forget_mirrors(self) -> None:
        """Drop every mirror (after ``load_state_dict``: every state tensor is new)."""
        self.mirrors = {}

    # ------------------------------------------------------------------ bucket keys
    def bucket_key(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any],
                   compute: Callable[..., Optional[tuple]]) -> Optional[tuple]:
        """``compute(p, state, group)`` (the optimizer's bucket key), remembered per parameter
        while nothing it may read has changed.

        A remembered key is reused only when ``p`` has the same dtype and device, its state is
        the same dict holding the very same objects (identity, in order: a refresh that changes a
        tensor's shape or dtype, ``load_state_dict`` or a format change stores new ones; a refresh
        writing in place keeps every key input the same), the ``side`` tensor's version
        counter has not moved, and its group holds the same objects under every key but ``lr``
        (which no key reads; schedulers replace it every step). Anything else computes the key
        again. Bookkeeping only: the key is the same either way."""
        cache = self.bucket_keys
        gtok = self.group_token(group)
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
        key = compute(p, state, group)
        if len(cache) > 2 * self.nparams + 64:  # parameters no longer here
            cache.clear()
        cache[id(p)] = (p, state, gtok, tuple(state.values()), side_v, p.dtype, p.device, key)
        return key

    def group_token(self, group: Dict[str, Any]) -> tuple:
        """An object standing for ``group``'s values (all but ``lr``) as they are now: the same
        object as long as every value is the same object, a new one after any change."""
        memo = self.group_tokens
        serial = self.serial
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
        if len(memo) > 4 * self.ngroups + 16:
            memo.clear()
        memo[id(group)] = (group, values, serial)
        return values


def increment_steps(steps: List[torch.Tensor]) -> None:
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


def finite_flags(work: List[Tuple[Dict[str, Any], torch.Tensor]]) -> List[bool]:
    """Per ``(group, p)`` entry of ``work``: whether ``p.grad`` is finite (True where the group
    sets ``skip_nonfinite=False``: nothing is checked there).

    Plain contiguous floating CPU gradients (the extension built): one C++ pass over their bits
    (:func:`_native_nonfinite_flags`, no ATen op). Otherwise per device: the largest L2 norm
    (four ATen ops, one host read), and the exact per-gradient inf-norms only when it is not
    finite."""
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
