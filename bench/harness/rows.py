"""The row schema of the CSV, the targets printed next to what was measured, and the check helpers."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch


ROW_FIELDS = [
    "suite", "kernel", "provider", "shape", "rank", "dtype",
    "median_ms", "p20_ms", "p80_ms", "reps",
    "tflops", "gbps", "frac_matmul", "frac_copy", "bytes",
    "baseline", "speedup", "mem_ratio", "check", "note",
    "mode", "device", "device_name", "torch", "triton", "git_sha", "timestamp",
]


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


@dataclasses.dataclass
class Row:
    """One measurement (a time, or a byte count when ``median_ms`` is None), or a skip."""

    suite: str
    kernel: str
    provider: str
    shape: str = ""
    rank: Optional[int] = None
    dtype: str = ""
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: Optional[int] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    frac_matmul: Optional[float] = None
    frac_copy: Optional[float] = None
    bytes: Optional[int] = None
    baseline: str = ""
    speedup: Optional[float] = None  # baseline time / this time (> 1: faster than the baseline)
    mem_ratio: Optional[float] = None  # these bytes / the baseline's bytes (< 1: smaller)
    check: str = ""
    note: str = ""
    skipped: bool = False

    @property
    def group(self) -> tuple:
        """Rows compared with each other: same suite, kernel, shape and rank (dtypes may differ)."""
        return (self.suite, self.kernel, self.shape, self.rank)


# The verdict of a goal measured on a device or at a size it is not stated for: the number
# is printed, but no met/missed is extrapolated from it.
NOT_ON_TARGET = "not measured on the target"


@dataclasses.dataclass
class Target:
    """A project goal, printed next to what this run measured (never asserted)."""

    suite: str
    text: str
    measured: Optional[float]
    goal: float
    higher_is_better: bool = True
    applies: bool = True  # False: measured on a device/size the goal is not stated for
    unit: str = "x"
    stated_for: str = "H100/H200 at full size"  # where the goal applies (said when this run is not there)

    def verdict(self) -> str:
        if self.measured is None or (isinstance(self.measured, float) and math.isnan(self.measured)):
            return "not measured"
        ok = self.measured >= self.goal if self.higher_is_better else self.measured <= self.goal
        if not self.applies:  # a CPU or a smaller size says nothing about the target: no verdict
            return f"{NOT_ON_TARGET} (goal stated for {self.stated_for})"
        return "met" if ok else "MISSED"


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def short(e: BaseException, n: int = 160) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s if len(s) <= n else s[: n - 3] + "..."


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    out = out.double()
    ref = ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


# Relative-error bounds of the correctness checks (the tests' tolerances, with room
# for the larger reductions of benchmark shapes).
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def check_str(err: float, dtype: torch.dtype, what: str = "rel_err") -> str:
    tol = CHECK_TOL.get(dtype, 1e-4)
    return f"{what}={err:.1e}" + ("" if err <= tol else f" FAILED(>{tol:g})")
