"""Timing: per-call medians and percentiles on CPU (perf_counter) and CUDA (do_bench / events)."""
from __future__ import annotations

import gc
import math
from typing import Sequence

import torch

from .rows import Timing


class BudgetExceeded(RuntimeError):
    """The run's time budget is spent; the remaining measurements are skipped."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Give cached CUDA memory back (and, with ``collect``, collect reference cycles first).

    A no-op on CPU: there memory is not the constraint, and ``gc.collect()`` on a
    heap holding transformers/bitsandbytes costs about half a second per call.
    """
    if device.type == "cuda":
        if collect:
            gc.collect()
        torch.cuda.empty_cache()


class _Quantiles(list):
    """do_bench's (median, p20, p80), marked so :func:`summarize` takes them as they are."""

    def __init__(self, q, reps: int):
        super().__init__(q)
        self.reps = reps


def summarize(times: Sequence[float]) -> Timing:
    if isinstance(times, _Quantiles):
        return Timing(float(times[0]), float(times[1]), float(times[2]), times.reps)
    xs = sorted(float(t) for t in times)
    return Timing(_quantile(xs, 0.5), _quantile(xs, 0.2), _quantile(xs, 0.8), len(xs))


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted ``xs`` (numpy's default)."""
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
