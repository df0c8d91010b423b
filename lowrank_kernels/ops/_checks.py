"""Input checks shared by the ops' validators: each names the argument and the problem.

They raise ``ValueError`` / ``TypeError`` through ``torch._check_value`` /
``torch._check_type``, so they also run inside fake impls under ``torch.compile``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SIDES = ("left", "right")


def fail_value(cond: bool, op: str, msg: str) -> None:
    torch._check_value(cond, lambda: f"{op}: {msg}")


def check_tensor(x, name: str, op: str) -> None:
    torch._check_type(isinstance(x, torch.Tensor), lambda: f"{op}: {name} must be a Tensor, got {type(x).__name__}")


def check_float(x: torch.Tensor, name: str, op: str, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    check_tensor(x, name, op)
    torch._check_type(
        x.dtype in allowed,
        lambda: f"{op}: {name} must have a floating dtype ({', '.join(str(d).replace('torch.', '') for d in allowed)}), got {x.dtype}",
    )


def check_ndim(x: torch.Tensor, name: str, op: str, ndim: int) -> None:
    fail_value(x.dim() == ndim, op, f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_shape(x: torch.Tensor, name: str, op: str, shape: Sequence[int], what: str = "") -> None:
    fail_value(
        tuple(x.shape) == tuple(shape),
        op,
        f"{name} must have shape {tuple(shape)}{' (' + what + ')' if what else ''}, got {tuple(x.shape)}",
    )


def check_same_device(op: str, named: Iterable[tuple]) -> None:
    named = list(named)
    dev0 = named[0][1].device
    for name, t in named[1:]:
        fail_value(
            t.device == dev0,
            op,
            f"all tensors must be on one device: {named[0][0]} is on {dev0} but {name} is on {t.device}",
        )


def check_side(side, op: str) -> None:
    fail_value(side in SIDES, op, f"side must be 'left' or 'right', got {side!r}")


def check_rank(rank: int, m: int, n: int, op: str, name: str) -> None:
    fail_value(1 <= rank <= min(m, n), op, f"rank of {name} ({rank}) must be between 1 and min(m, n) = {min(m, n)}")


def check_moment_dtype(moment: torch.Tensor, name: str, param_dtype: torch.dtype, op: str) -> None:
    torch._check_type(
        moment.dtype in (torch.float32, param_dtype, torch.float64),
        lambda: f"{op}: {name} must be float32 or the parameter dtype {param_dtype}, got {moment.dtype}",
    )


def check_no_overlap(op: str, written: Sequence[tuple], read: Sequence[tuple]) -> None:
    """An in-place output must not share memory with another argument."""
    for wname, w in written:
        for rname, r in list(written) + list(read):
            if rname == wname:
                continue
            fail_value(
                not _overlaps(w, r),
                op,
                f"{wname} and {rname} share memory; the in-place output must not alias another argument",
            )


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` intersect (real tensors only)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0 or a.device.type == "meta":
        return False
    if isinstance(a, FakeTensor) or isinstance(b, FakeTensor):
        return False
    try:
        pa, pb = a.data_ptr(), b.data_ptr()
    except Exception:  # fake / meta tensors and subclasses without storage
        return False
    if pa == 0 or pb == 0:
        return False

    def end(t, p):
        return p + (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()

    return pa < end(b, pb) and pb < end(a, pa)
