"""Input checks shared by the ops' validators: each names the argument and the problem.

Every check runs twice per call path that matters: in the router before any backend
runs (eager, real tensors, plain Python ``bool`` conditions) and inside the fake impls
under ``torch.compile`` (FakeTensors, where a shape condition may be a ``SymBool``).
The eager path is the per-call overhead of every op, so a check costs one comparison
when it passes: a plain ``bool`` condition that holds returns at once, one that fails
raises ``ValueError`` / ``TypeError`` directly, and only a non-``bool`` condition (a
``SymBool``) goes through ``torch._check_value`` / ``torch._check_type``, which turn
it into a guard or runtime assert. Messages may be given as a zero-argument callable
so the error text is only formatted when the check fails; the exception type and text
are the same either way.
"""
from __future__ import annotations

import array
import bisect
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SIDES = ("left", "right")

Msg = Union[str, Callable[[], str]]


def _text(msg: Msg) -> str:
    return msg() if callable(msg) else msg


def fail_value(cond, op: str, msg: Msg) -> None:
    """Raise ``ValueError(f"{op}: {msg}")`` unless ``cond`` holds.

    ``msg`` is a string or a callable returning one (formatted only on failure).
    """
    if cond is True:
        return
    if cond is False:
        raise ValueError(f"{op}: {_text(msg)}")
    torch._check_value(cond, lambda: f"{op}: {_text(msg)}")  # SymBool (or a wrong type: its TypeError)


def fail_type(cond, op: str, msg: Msg) -> None:
    """Raise ``TypeError(f"{op}: {msg}")`` unless ``cond`` holds (see :func:`fail_value`)."""
    if cond is True:
        return
    if cond is False:
        raise TypeError(f"{op}: {_text(msg)}")
    torch._check_type(cond, lambda: f"{op}: {_text(msg)}")


def check_tensor(x, name: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")


def _dtype_names(allowed: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in allowed)


def check_float(x: torch.Tensor, name: str, op: str, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
    if x.dtype not in allowed:
        raise TypeError(f"{op}: {name} must have a floating dtype ({_dtype_names(allowed)}), got {x.dtype}")


def check_ndim(x: torch.Tensor, name: str, op: str, ndim: int) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_shape(x: torch.Tensor, name: str, op: str, shape: Sequence[int], what: Msg = "") -> None:
    """``x.shape == shape``; ``what`` (a string or a callable returning one) says why."""
    got = tuple(x.shape)
    want = tuple(shape)
    if got != want:  # tuple comparison: a plain bool even for SymInt sizes (it guards)
        what = _text(what)
        raise ValueError(f"{op}: {name} must have shape {want}{' (' + what + ')' if what else ''}, got {got}")


def check_same_device(op: str, named: Iterable[tuple]) -> None:
    named = list(named)
    dev0 = named[0][1].device
    for name, t in named[1:]:
        dev = t.device
        if dev != dev0:
            raise ValueError(
                f"{op}: all tensors must be on one device: {named[0][0]} is on {dev0} but {name} is on {dev}"
            )


def check_list_devices(op: str, named: Iterable[tuple]) -> None:
    """Every tensor of a multi-tensor call on one device, checked before anything runs.

    ``named``: ``(name, list of tensors)`` or ``(name, tensor or None)`` pairs, in the order
    the error should search them; entries that are not tensors (None, a missing optional)
    are skipped. ValueError naming the first tensor on another device than the first tensor
    seen, e.g. ``grads[2] is on meta, params[0] on cpu`` (the per-entry checks cannot see a
    list whose entries are each consistent but sit on different devices)."""
    first = None
    for name, xs in named:
        items = [(name, xs)] if not isinstance(xs, (list, tuple)) else [(f"{name}[{i}]", t) for i, t in enumerate(xs)]
        for label, t in items:
            if not isinstance(t, torch.Tensor):
                continue
            if first is None:
                first = (label, t.device)
            elif t.device != first[1]:
                raise ValueError(f"{op}: all tensors must be on one device: {label} is on {t.device}, "
                                 f"{first[0]} on {first[1]}")


def check_lists(op: str, n: int, required: Iterable[tuple], optional: Iterable[tuple] = ()) -> None:
    """Each ``(name, xs)`` is a list (or tuple) with one entry per weight (``n``); an
    ``optional`` one may also be empty."""
    for opt, named in ((False, required), (True, optional)):
        for name, xs in named:
            fail_type(isinstance(xs, (list, tuple)), op, lambda: f"{name} must be a list, got {type(xs).__name__}")
            if opt and len(xs) == 0:
                continue
            fail_value(len(xs) == n, op, lambda: f"{name} must have one entry per weight ({n}), got {len(xs)}")


def check_step_entry(p: torch.Tensor, g: torch.Tensor, where: str) -> None:
    """A method-step list op's weight and gradient: float32, 2-D, contiguous, same shape."""
    check_float(p, "params", where, (torch.float32,))
    check_ndim(p, "params", where, 2)
    fail_value(p.is_contiguous(), where, "params must be contiguous")
    check_float(g, "grads", where, (torch.float32,))
    check_shape(g, "grads", where, p.shape, "the weight's shape")
    fail_value(g.is_contiguous(), where, "grads must be contiguous")



def check_dense_projector_entry(p: torch.Tensor, g: torch.Tensor, pr: torch.Tensor, side: str,
                                where: str) -> tuple:
    """A method-step list op's weight, gradient and dense float32 projector (``r x n`` on the
    right, ``m x r`` on the left): :func:`check_step_entry`, then the projector's dtype, shape
    and rank. Returns ``(m, n, r)``."""
    check_step_entry(p, g, where)
    check_float(pr, "projs", where, (torch.float32,))
    check_ndim(pr, "projs", where, 2)
    m, k = p.shape
    inner = k if side == "right" else m
    fail_value((pr.shape[1] if side == "right" else pr.shape[0]) == inner, where,
               lambda: f"projs must be {'r x n' if side == 'right' else 'm x r'} for side={side!r} and a "
                       f"weight of shape {tuple(p.shape)}, got {tuple(pr.shape)}")
    r = pr.shape[0] if side == "right" else pr.shape[1]
    check_rank(r, m, k, where, "projs")
    return m, k, r

def check_side(side, op: str) -> None:
    if side not in SIDES:
        raise ValueError(f"{op}: side must be 'left' or 'right', got {side!r}")


def check_rank(rank: int, m: int, n: int, op: str, name: str) -> None:
    fail_value(
        1 <= rank <= min(m, n), op, lambda: f"rank of {name} ({rank}) must be between 1 and min(m, n) = {min(m, n)}"
    )


def check_moment_dtype(moment: torch.Tensor, name: str, param_dtype: torch.dtype, op: str) -> None:
    """Moments are float32, float64, bfloat16 (16-bit moments, for any parameter dtype) or the parameter's dtype."""
    if moment.dtype not in (torch.float32, param_dtype, torch.float64, torch.bfloat16):
        raise TypeError(
            f"{op}: {name} must be float32, float64, bfloat16 or the parameter dtype {param_dtype}, got {moment.dtype}"
        )


def check_no_overlap(op: str, written: Sequence[tuple], read: Sequence[tuple], spans: Optional[dict] = None) -> None:
    """An in-place output must not share memory with another argument nor overlap itself.

    Each tensor's memory span is computed once (None for FakeTensors, meta, empty or
    storage-less tensors, which never overlap); then the pairs are compared as integers,
    in the order ``written`` x (``written`` + ``read``), so the first overlapping pair is
    the one reported. Then each non-contiguous written tensor is checked on its own
    (:func:`check_no_self_overlap`: no two of its elements may share memory, e.g. a
    stride-0 ``expand()``; the kernels write every element, so such an output would get
    racing writes on a GPU and order-dependent results anywhere). ``spans``, a dict that
    one validator passes to several of these checks over the same arguments, keeps the
    spans between them (keyed by name).
    """
    ws = _spans_of(written, spans)
    for _, sw in ws:
        if sw is not None:
            break
    else:
        return  # e.g. FakeTensors under torch.compile: nothing to compare
    everyone = ws + _spans_of(read, spans)
    # Long lists (the multi-tensor ops): a sort-and-sweep first; the pairwise scan, which
    # names the first overlapping pair, runs only when some pair overlaps.
    pairs = ws
    if len(ws) * len(everyone) > _PAIRWISE_MAX and not _any_overlap(ws, everyone[len(ws):]):
        pairs = ()
    for wname, sw in pairs:
        if sw is None:
            continue
        dw, lw, hw = sw
        for rname, sr in everyone:
            if sr is None or rname == wname:
                continue
            if lw < sr[2] and sr[1] < hw and dw == sr[0]:
                raise ValueError(
                    f"{op}: {wname} and {rname} share memory; the in-place output must not alias another argument"
                )
    for (wname, t), (_, sw) in zip(written, ws):
        if sw is not None and not t.is_contiguous():
            check_no_self_overlap(t, wname, op)


# Above this many (written x all) pairs, check_no_overlap decides with _any_overlap
# (O(k log k)) whether it needs its pairwise scan at all.
_PAIRWISE_MAX = 64


def _any_overlap(ws, rs) -> bool:
    """Whether a written span overlaps any other span (written or read) on its device."""
    items = sorted(
        [(s[0], s[1], s[2], True) for _, s in ws if s is not None]
        + [(s[0], s[1], s[2], False) for _, s in rs if s is not None],
        key=lambda x: (str(x[0]), x[1]),
    )
    dev, hi_any, hi_written = None, 0, 0
    for d, lo, hi, written in items:
        if d != dev:
            dev, hi_any, hi_written = d, 0, 0
        # any earlier span reaching past lo overlaps this one (its lo <= this lo < its hi)
        if lo < (hi_any if written else hi_written):
            return True
        hi_any = max(hi_any, hi)
        if written:
            hi_written = max(hi_written, hi)
    return False


def check_no_self_overlap(t: torch.Tensor, name: str, op: str) -> None:
    """Raise ``ValueError`` when two elements of ``t`` share memory (internal overlap).

    Exact for every layout: a contiguous tensor never overlaps; otherwise the dims of
    size > 1 sorted by stride must each step past everything the smaller ones reach
    (a stride 0 never does), which decides every layout made by views, slices,
    ``expand`` and ``as_strided`` with nested strides; the rare interleaved layout that
    passes neither test is decided by enumerating its offsets.
    """
    if t.numel() <= 1 or t.is_contiguous():
        return
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    reach = 0  # largest offset (in elements) the dims seen so far can reach
    for st, sz in dims:
        if st == 0:
            raise ValueError(
                f"{op}: {name} overlaps itself (shape {tuple(t.shape)}, stride {tuple(t.stride())}: a stride-0 "
                f"dim, e.g. from expand()); an in-place output needs one memory location per element: pass "
                f"{name}.contiguous() or .clone()"
            )
        if st <= reach:
            break  # interleaved strides: decide exactly below
        reach += (sz - 1) * st
    else:
        return
    offsets = torch.zeros((), dtype=torch.int64)
    for sz, st in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(sz, dtype=torch.int64) * st).reshape(-1)
    if offsets.unique().numel() != t.numel():
        raise ValueError(
            f"{op}: {name} overlaps itself (shape {tuple(t.shape)}, stride {tuple(t.stride())}: two elements share "
            f"memory); an in-place output needs one memory location per element: pass {name}.contiguous() or .clone()"
        )


_Tensor = torch.Tensor


_MISSING = object()


def _spans_of(named, spans: Optional[dict]) -> list:
    if spans is None:
        return [(name, _span(t)) for name, t in named]
    out = []
    for name, t in named:
        s = spans.get(name, _MISSING)
        if s is _MISSING:
            s = spans[name] = _span(t)
        out.append((name, s))
    return out


def _span(t: torch.Tensor):
    """``(device, first byte, one past the last byte)`` of ``t``'s memory, or None."""
    if type(t) is not _Tensor and isinstance(t, FakeTensor):
        return None
    n = t.numel()
    if n == 0 or t.is_meta:  # a meta view's data_ptr() is its byte offset, not memory
        return None
    try:
        p = t.data_ptr()
    except Exception:  # fake / functional tensors and subclasses without storage
        return None
    if p == 0:  # meta tensors (and anything else without memory)
        return None
    if t.is_contiguous():
        extent = n
    else:
        extent = 1
        for s, st in zip(t.shape, t.stride()):
            extent += (s - 1) * st
    return t.device, p, p + extent * t.itemsize


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` intersect (real tensors only)."""
    sa, sb = _span(a), _span(b)
    if sa is None or sb is None:
        return False
    return sa[0] == sb[0] and sa[1] < sb[2] and sb[1] < sa[2]


# --------------------------------------------------------------------------- moment state
MAX_BLOCK_SIZE = 256


def _absmax_shape(shape: Sequence[int], block_size: int) -> tuple:
    cols = shape[-1]
    return tuple(shape[:-1]) + ((cols + block_size - 1) // block_size,)


def check_moment_state(
    op: str, exp_avg, exp_avg_sq, shape, param_dtype: torch.dtype, m_absmax=None, v_absmax=None,
    block_size: int = 0, moment_seed: int = -1,
) -> list:
    """Validate the Adam moment state of one tensor in any of the three formats.

    - 32-bit / plain: ``exp_avg`` / ``exp_avg_sq`` floating, of ``shape``, one dtype
      (float32, float64 or the parameter's dtype); ``block_size`` 0.
    - 16-bit with stochastic rounding: as plain, with ``moment_seed >= 0``, which only
      bfloat16 moments may take.
    - 8-bit: ``m_absmax`` and ``v_absmax`` both given; the moments are contiguous uint8
      codes of ``shape``, each absmax a contiguous float32 tensor of shape
      ``shape[:-1] + (ceil(shape[-1] / block_size),)``, ``1 <= block_size <= 256``,
      ``moment_seed < 0`` (8-bit moments round to nearest).

    Returns the written tensors as ``(name, tensor)`` pairs (for the device and aliasing
    checks). Raises ``TypeError`` / ``ValueError`` naming the argument.
    """
    fail_type(
        isinstance(block_size, int) and not isinstance(block_size, bool), op,
        lambda: f"block_size must be an int, got {block_size!r}",
    )
    fail_type(
        isinstance(moment_seed, int) and not isinstance(moment_seed, bool), op,
        lambda: f"moment_seed must be an int, got {moment_seed!r}",
    )
    if m_absmax is None and v_absmax is None:
        for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            check_float(t, name, op)
            check_shape(t, name, op, shape, "the low-rank gradient's shape")
            check_moment_dtype(t, name, param_dtype, op)
        if exp_avg.dtype != exp_avg_sq.dtype:
            raise TypeError(f"{op}: exp_avg ({exp_avg.dtype}) and exp_avg_sq ({exp_avg_sq.dtype}) must have one dtype")
        fail_value(
            block_size == 0, op,
            lambda: f"block_size is for 8-bit moments (m_absmax and v_absmax given) only and must be 0, got {block_size}",
        )
        fail_value(
            moment_seed < 0 or exp_avg.dtype == torch.bfloat16, op,
            lambda: f"moment_seed >= 0 (stochastic rounding) needs bfloat16 moments, got {exp_avg.dtype} "
            f"moments and moment_seed={moment_seed}",
        )
        return [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    for name, t, other in (("m_absmax", m_absmax, "v_absmax"), ("v_absmax", v_absmax, "m_absmax")):
        fail_value(
            t is not None, op,
            lambda: f"8-bit moments need both m_absmax and v_absmax; {other} was given but {name} is None",
        )
    fail_value(
        1 <= block_size <= MAX_BLOCK_SIZE, op,
        lambda: f"block_size must be in [1, {MAX_BLOCK_SIZE}] for 8-bit moments, got {block_size}",
    )
    fail_value(
        moment_seed < 0, op,
        lambda: f"moment_seed >= 0 (stochastic rounding) is for bfloat16 moments; 8-bit moments round to nearest, "
        f"got moment_seed={moment_seed}",
    )
    fail_value(len(shape) >= 1, op, "8-bit moments need at least one dimension (blocks run along the last)")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(t, name, op)
        fail_type(t.dtype == torch.uint8, op, lambda: f"{name} must be uint8 codes for 8-bit moments, got {t.dtype}")
        check_shape(t, name, op, shape, "the low-rank gradient's shape")
        fail_value(t.is_contiguous(), op, lambda: f"{name} (8-bit codes) must be contiguous")
    want = _absmax_shape(shape, block_size)
    for name, t in (("m_absmax", m_absmax), ("v_absmax", v_absmax)):
        check_tensor(t, name, op)
        fail_type(t.dtype == torch.float32, op, lambda: f"{name} must be float32, got {t.dtype}")
        check_shape(t, name, op, want, lambda: f"shape[:-1] + (ceil(cols / block_size),) with block_size {block_size}")
        fail_value(t.is_contiguous(), op, lambda: f"{name} must be contiguous")
    return [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("m_absmax", m_absmax), ("v_absmax", v_absmax)]


def is_8bit(m_absmax, v_absmax) -> bool:
    """Whether the moment arguments select 8-bit moments (both absmax tensors given)."""
    return m_absmax is not None and v_absmax is not None


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


_NATIVE_UNSET = object()
#: the host helpers of csrc/python/host.cpp; the extension serves them all or none
_NATIVE_FUNCTIONS = ("tensor_signature", "any_overlap", "all_plain", "nonfinite_flags", "add_one_")
_native = _NATIVE_UNSET


def _native_helpers():
    """The extension module ``lowrank_kernels._C`` when it is built and exports the host helpers
    of csrc/python/host.cpp (:data:`_NATIVE_FUNCTIONS`), else None (the Python versions run)."""
    global _native
    if _native is _NATIVE_UNSET:
        from lowrank_kernels import _ext

        mod = None
        if _ext.load():
            import importlib

            mod = importlib.import_module("lowrank_kernels._C")
            if not all(hasattr(mod, f) for f in _NATIVE_FUNCTIONS):  # an extension built before them
                mod = None
        _native = mod
    return _native


def tensor_signature(*lists) -> Optional[object]:
    """A hashable description of every tensor in ``lists`` (lists of tensors, kept apart): per tensor its
    data pointer, shape, strides, dtype and device, i.e. everything a validator's shape, dtype,
    device, layout and aliasing checks read, but not its values. None when some entry is not a
    plain strided ``torch.Tensor`` / ``Parameter`` (FakeTensor, DTensor, other subclasses,
    sparse layouts: never cached).

    Two calls with equal signatures pass or fail those checks alike, which lets a validator's
    outcome be cached (see ``define_op(cache_key=...)`` in ``_registry``). With the C++
    extension the signature is one ``bytes`` object (an exact, prefix-free encoding of the same
    fields, computed in C++: a step validates lists of dozens of tensors), else a tuple.
    """
    native = _native_helpers()
    if native is not None:
        return native.tensor_signature(lists, True)
    return _py_signature(lists, True)


def layout_signature(*lists) -> Optional[object]:
    """:func:`tensor_signature` without the data pointers: for tensors a validator only reads
    and whose memory is checked apart on every call (:class:`SpanIndex`), such as gradients,
    which are new tensors at every step unless kept between steps."""
    native = _native_helpers()
    if native is not None:
        return native.tensor_signature(lists, False)
    return _py_signature(lists, False)


def _py_signature(lists, with_ptr: bool) -> Optional[tuple]:
    """The Python version of the signatures (without the extension)."""
    out = []
    try:
        for xs in lists:
            one = []
            for t in xs:
                if type(t) not in _PLAIN_TENSOR_TYPES or t.layout != torch.strided:
                    return None
                if with_ptr:
                    one.append((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device))
                else:
                    one.append((t.shape, t.stride(), t.dtype, t.device))
            out.append(tuple(one))  # per list: which list a tensor is in matters
    except RuntimeError:  # no storage: not cached
        return None
    return tuple(out)


_EMPTY_ARRAYS = (array.array("q"), array.array("q"))


class SpanIndex:
    """The memory spans of some tensors (e.g. every in-place output of a validated call),
    merged and sorted per device, to ask quickly whether another tensor overlaps any of them
    (the same span test as :func:`check_no_overlap`)."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        per_dev: dict = {}
        for t in tensors:
            sp = _span(t)
            if sp is not None:
                per_dev.setdefault(sp[0], []).append((sp[1], sp[2]))
        self._index = {}
        for dev, spans in per_dev.items():
            spans.sort()
            los, his = [], []
            for lo, hi in spans:
                if his and lo < his[-1]:  # overlaps the previous one: merge
                    his[-1] = max(his[-1], hi)
                else:
                    los.append(lo)
                    his.append(hi)
            self._index[dev] = (los, his)
        self._arrays = {dev: (array.array("q", los), array.array("q", his)) for dev, (los, his) in self._index.items()}

    def any_overlap(self, tensors) -> bool:
        """Whether one of ``tensors`` (None entries are skipped) meets a span of the index: in
        one C++ call with the extension when they are plain tensors on one device, else
        :meth:`overlaps` per tensor."""
        tensors = [t for t in tensors if t is not None]
        if not tensors:
            return False
        native = _native_helpers()
        if native is not None and isinstance(tensors[0], torch.Tensor):
            dev = tensors[0].device
            arrays = self._arrays.get(dev, _EMPTY_ARRAYS)
            answer = native.any_overlap(tensors, arrays[0], arrays[1], str(dev))
            if answer >= 0:
                return bool(answer)
        return any(self.overlaps(t) for t in tensors)

    def overlaps(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s memory span meets a span of the index (on the same device)."""
        sp = _span(t)
        if sp is None:
            return False
        entry = self._index.get(sp[0])
        if entry is None:
            return False
        los, his = entry
        i = bisect.bisect_right(los, sp[1]) - 1  # the last span starting at or before t's start
        if i >= 0 and his[i] > sp[1]:
            return True
        return i + 1 < len(los) and los[i + 1] < sp[2]
