"""The benchmark harness: one timing helper, one row schema, the roofline, the CSV, the table, the plots.

Every suite (``bench_<family>.py``) receives a :class:`Ctx`, builds its cases from
:func:`sizes`, times callables with :meth:`Ctx.time`, and records :class:`Row`\\ s with
:meth:`Ctx.add`. A measurement that cannot be made (an API that has not landed, a
package that is not installed, the time budget spent) is recorded with
:meth:`Ctx.skip`: it is listed with its reason and never given a number.

Timing
    CUDA: ``triton.testing.do_bench`` (L2 flushed before each run) for calls under
    ~20 ms, CUDA events around each call for slower ones; CPU: ``time.perf_counter``
    around each call after a warm-up call. The median and the 20th/80th percentiles
    of the per-call times are reported.

Roofline
    Once per run the device's matmul rate (a large square GEMM in the chosen dtype)
    and copy bandwidth (bytes read + written by a large ``copy_``) are measured; each
    timed row with a FLOP or byte count gets its fraction of them.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gc
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
REPO = Path(__file__).resolve().parent.parent


class BudgetExceeded(RuntimeError):
    """The run's time budget is spent; the remaining measurements are skipped."""


# --------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class Stack:
    """A stack of LLaMA-shaped layers: per layer 4 x (h x h), 2 x (i x h), 1 x (h x i)."""

    hidden: int
    inter: int
    layers: int

    def shapes(self) -> List[tuple]:
        h, i = self.hidden, self.inter
        return [(h, h)] * 4 * self.layers + [(i, h)] * 2 * self.layers + [(h, i)] * self.layers

    @property
    def numel(self) -> int:
        return sum(m * n for m, n in self.shapes())

    def label(self) -> str:
        """e.g. ``4L-h2048-i5461``: layers, hidden width, MLP width."""
        return f"{self.layers}L-h{self.hidden}-i{self.inter}"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run (they depend on device and mode)."""

    proj_shapes: tuple  # (m, n) for the projection and refresh suites
    proj_ranks: tuple
    refresh_rank: int
    stack: Stack
    stack_rank: int
    svd_max_numel: int  # exact SVD only up to this many elements per matrix
    roof_matmul: int  # square GEMM size for the matmul rate
    roof_copy_mb: int  # buffer size for the copy bandwidth
    note: str = ""


def sizes(device: torch.device, quick: bool, tiny: bool) -> Sizes:
    """The sizes of the run: the LLaMA shapes of the issues on GPU, scaled down on CPU."""
    if tiny:  # the test suite's smoke run: seconds on a loaded 2-core CPU
        return Sizes(((48, 40), (24, 72)), (4,), 8, Stack(32, 48, 1), 4, 10**9, 128, 4,
                     "tiny smoke-test sizes")
    # Largest first: the issues' targets are stated at 4096x11008, and a run cut short by its
    # time budget should have measured those.
    llama = ((4096, 11008), (4096, 4096), (2048, 5632), (2048, 2048))
    if device.type == "cuda":
        if quick:
            return Sizes(llama[::3], (512,), 512, Stack(2048, 5461, 1), 512, 4096 * 11008, 8192, 1024,
                         "quick: 2 shapes, 1-layer stack")
        return Sizes(llama, (512, 128), 512, Stack(2048, 5461, 4), 512, 4096 * 11008, 8192, 1024)
    # CPU: the LLaMA shapes divided by 4 (rank too), a 1-layer stack of that width.
    quarter = tuple((m // 4, n // 4) for m, n in llama)
    if quick:
        return Sizes(quarter[::3], (128,), 128, Stack(256, 683, 1), 64, 1024 * 2752, 1024, 128,
                     "CPU quick: LLaMA shapes / 4, 2 of them; stack 1 layer of width 256")
    return Sizes(quarter, (128, 32), 128, Stack(512, 1365, 1), 128, 1024 * 2752, 1024, 256,
                 "CPU: LLaMA shapes / 4 (2048x2048 -> 512x512 ... 4096x11008 -> 1024x2752), ranks / 4, "
                 "stack 1 layer of width 512 (exact SVD of the full-size matrices would take minutes on a CPU)")


def side_of(m: int, n: int) -> str:
    """GaLore's "std" choice: project the smaller side."""
    return "right" if m >= n else "left"


def lowrank_shape(m: int, n: int, rank: int) -> tuple:
    return (m, rank) if side_of(m, n) == "right" else (rank, n)


def proj_shape(m: int, n: int, rank: int) -> tuple:
    return (rank, n) if side_of(m, n) == "right" else (m, rank)


# --------------------------------------------------------------------------- rows
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


@dataclasses.dataclass
class Target:
    """A goal from the issues, printed next to what this run measured (never asserted)."""

    suite: str
    text: str
    measured: Optional[float]
    goal: float
    higher_is_better: bool = True
    applies: bool = True  # False: measured on a device/size the goal is not stated for
    unit: str = "x"

    def verdict(self) -> str:
        if self.measured is None or (isinstance(self.measured, float) and math.isnan(self.measured)):
            return "not measured"
        ok = self.measured >= self.goal if self.higher_is_better else self.measured <= self.goal
        tag = ("met" if ok else "MISSED") if self.applies else ("would meet" if ok else "would miss")
        return tag + ("" if self.applies else " (goal stated for H100/H200 at full size)")


def fmt_shape(*dims) -> str:
    return "x".join(str(int(d)) for d in dims)


# --------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """File-name-safe device name: letters, digits, '.', '_' and '-' only."""
    raw = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-" + _cpu_model()
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-") or device.type


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        sha = out.stdout.strip()
        if not sha:
            return os.environ.get("LOWRANK_KERNELS_GIT_SHA", "unknown")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git, no repo: the CSV says so
        return os.environ.get("LOWRANK_KERNELS_GIT_SHA", "unknown")


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "not installed"


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


# --------------------------------------------------------------------------- context
class Ctx:
    """Everything a suite needs: device, dtype, sizes, the timer, the rows."""

    def __init__(self, device: torch.device, dtype: torch.dtype, *, quick: bool, tiny: bool, out: Path,
                 time_budget_s: Optional[float] = None, plots: bool = True, log=print):
        self.device = device
        self.dtype = dtype
        self.dtype_name = DTYPE_NAMES[dtype]
        self.quick = quick
        self.tiny = tiny
        self.mode = "tiny" if tiny else ("quick" if quick else "full")
        self.out = Path(out)
        self.plots = plots
        self.log = log
        self.sizes = sizes(device, quick, tiny)
        self.rows: List[Row] = []
        self.targets: List[Target] = []
        self.start = time.perf_counter()
        self.deadline = None if time_budget_s is None else self.start + float(time_budget_s)
        self.device_name = device_name(device)
        self.tag = device_tag(device) + ("" if self.mode == "full" else f"-{self.mode}")
        self.meta = {
            "mode": self.mode, "device": device.type, "device_name": self.device_name,
            "torch": torch.__version__, "triton": triton_version(), "git_sha": git_sha(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.esize = torch.empty((), dtype=dtype).element_size()
        self.shared: Dict[str, object] = {}  # figures one suite measures for another (e.g. step -> memory)
        self.matmul_tflops: Optional[float] = None
        self.copy_gbps: Optional[float] = None
        # Per-call time budget of a measurement (seconds of timed runs).
        if device.type == "cuda":
            self.budget_s = 0.06 if quick else 0.12
        else:
            self.budget_s = 0.02 if tiny else (0.25 if quick else 0.6)

    # ----------------------------------------------------------------- time
    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def check_budget(self) -> None:
        if self.time_left() <= 0:
            raise BudgetExceeded("the run's time budget (--time-budget) is spent")

    def time(self, fn: Callable[[], object], *, min_reps: int = 3, max_reps: int = 200,
             budget_s: Optional[float] = None, warmup: int = 1) -> Timing:
        """Median / p20 / p80 of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

        The number of timed calls is what fits ``budget_s`` (default: the run's per-
        measurement budget), between ``min_reps`` and ``max_reps``; a call slower than the
        budget is timed ``min_reps`` times. ``fn`` may mutate its inputs (optimizer steps).
        """
        self.check_budget()
        budget = self.budget_s if budget_s is None else budget_s
        if self.tiny:  # smoke run: exercise the code path, not the statistics
            min_reps, max_reps, budget = 1, min(max_reps, 3), min(budget, self.budget_s)
        dev = self.device
        for _ in range(warmup):  # compilation, autotuning, workspace allocation
            fn()
        sync(dev)
        # One timed probe call sizes the loop; it is also the first sample.
        t = time.perf_counter()
        fn()
        sync(dev)
        probe_ms = (time.perf_counter() - t) * 1e3
        reps = int(min(max_reps, max(min_reps, budget * 1e3 / max(probe_ms, 1e-4))))
        if dev.type == "cuda":
            return summarize(self._cuda_times(fn, reps, probe_ms, max_reps, budget))
        times = [probe_ms]
        for _ in range(reps - 1):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return summarize(times)

    def _cuda_times(self, fn, reps: int, probe_ms: float, max_reps: int, budget: float) -> List[float]:
        if probe_ms < 20 and max_reps >= 20:
            try:
                import triton.testing

                rep_ms = max(1, int(budget * 1e3))
                q = triton.testing.do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
                # do_bench times about rep / estimate calls; report that count.
                return _Quantiles(q, max(1, int(rep_ms / max(probe_ms, 1e-3))))  # type: ignore[return-value]
            except Exception as e:  # noqa: BLE001 - fall back to events on any do_bench problem
                self.log(f"  (do_bench unavailable: {type(e).__name__}: {short(e)}; using CUDA events)")
        # Slow calls (or do_bench missing): CUDA events around each call. A probe of
        # 20 ms or more, timed on the host after a synchronize, counts as a sample.
        keep_probe = probe_ms >= 20
        n = reps - 1 if keep_probe else reps
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return ([probe_ms] if keep_probe else []) + [s.elapsed_time(e) for s, e in zip(starts, ends)]

    # ----------------------------------------------------------------- rows
    def add(self, row: Row, *, flops: Optional[float] = None, nbytes: Optional[int] = None) -> Row:
        """Record ``row``; with ``flops``/``nbytes`` (per call) fill rates and roofline fractions."""
        if not row.dtype:
            row.dtype = self.dtype_name
        if row.median_ms is not None and row.median_ms > 0:
            sec = row.median_ms * 1e-3
            if flops:
                row.tflops = flops / sec / 1e12
                if self.matmul_tflops:
                    row.frac_matmul = row.tflops / self.matmul_tflops
            if nbytes:
                row.gbps = nbytes / sec / 1e9
                if row.bytes is None:
                    row.bytes = int(nbytes)
                if self.copy_gbps:
                    row.frac_copy = row.gbps / self.copy_gbps
        self.rows.append(row)
        return row

    def skip(self, suite: str, kernel: str, provider: str, reason: str, **kw) -> Row:
        """Record that a measurement was not made, and why (it gets no number)."""
        note = kw.pop("note", "")
        row = Row(suite=suite, kernel=kernel, provider=provider, skipped=True, **kw,
                  note=f"skipped: {reason}" + (f" ({note})" if note else ""))
        if not row.dtype:
            row.dtype = self.dtype_name
        self.rows.append(row)
        return row

    def measure(self, suite: str, kernel: str, provider: str, fn: Callable[[], object], *,
                flops: Optional[float] = None, nbytes: Optional[int] = None, check: str = "", note: str = "",
                time_kw: Optional[dict] = None, **kw) -> Optional[Row]:
        """Time ``fn`` and record the row; any failure becomes a skip row with the error."""
        try:
            t = self.time(fn, **(time_kw or {}))
        except BudgetExceeded as e:
            self.skip(suite, kernel, provider, str(e), **kw)
            return None
        except Exception as e:  # noqa: BLE001 - a broken provider must not stop the run
            self.skip(suite, kernel, provider, f"failed: {type(e).__name__}: {short(e)}", **kw)
            return None
        return self.add(Row(suite=suite, kernel=kernel, provider=provider, median_ms=t.median_ms, p20_ms=t.p20_ms,
                            p80_ms=t.p80_ms, reps=t.reps, check=check, note=note, **kw), flops=flops, nbytes=nbytes)

    def measure_many(self, suite: str, kernel: str, cases: Dict[str, dict], **kw) -> Dict[str, Optional[Row]]:
        """Time several providers of one kernel and record a row each (a skip row on failure).

        ``cases`` maps a provider to ``dict(fn=..., flops=, nbytes=, check=, note=)``. On CPU the
        providers are timed interleaved, one call of each per round (rotating the order), so
        that a shared machine's changing load falls on all of them alike; on CUDA each is timed
        on its own (the GPU is not shared).
        """
        kw = dict(kw)
        shared_note = kw.pop("note", "")
        cases = {n: dict(c, note="; ".join(x for x in (c.get("note", ""), shared_note) if x)) for n, c in cases.items()}
        if self.device.type == "cuda" or len(cases) < 2:
            return {name: self.measure(suite, kernel, name, c["fn"], **{k: v for k, v in c.items() if k != "fn"},
                                       **kw) for name, c in cases.items()}
        rows: Dict[str, Optional[Row]] = {}
        try:
            self.check_budget()
        except BudgetExceeded as e:
            for name in cases:
                self.skip(suite, kernel, name, str(e), **kw)
                rows[name] = None
            return rows
        probe: Dict[str, float] = {}
        for name, c in cases.items():  # warm-up, then a timed probe call each
            try:
                c["fn"]()
                t = time.perf_counter()
                c["fn"]()
                probe[name] = (time.perf_counter() - t) * 1e3
            except Exception as e:  # noqa: BLE001 - a broken provider must not stop the others
                self.skip(suite, kernel, name, f"failed: {type(e).__name__}: {short(e)}", **kw)
                rows[name] = None
        names = list(probe)
        times: Dict[str, List[float]] = {n: [probe[n]] for n in names}
        if names:
            rounds = int(min(200, max(3, self.budget_s * 1e3 * len(names) / max(sum(probe.values()), 1e-4))))
            if self.tiny:
                rounds = min(rounds, 3)
            for i in range(rounds - 1):
                for n in names[i % len(names):] + names[:i % len(names)]:
                    t = time.perf_counter()
                    cases[n]["fn"]()
                    times[n].append((time.perf_counter() - t) * 1e3)
        for n in names:
            t = summarize(times[n])
            c = cases[n]
            rows[n] = self.add(Row(suite=suite, kernel=kernel, provider=n, median_ms=t.median_ms, p20_ms=t.p20_ms,
                                   p80_ms=t.p80_ms, reps=t.reps, check=c.get("check", ""), note=c.get("note", ""),
                                   **kw), flops=c.get("flops"), nbytes=c.get("nbytes"))
        return rows

    def find(self, suite: str, kernel: str, provider: str, shape: Optional[str] = None,
             rank: Optional[int] = None) -> Optional[Row]:
        for r in self.rows:
            if (r.suite, r.kernel, r.provider) == (suite, kernel, provider) and not r.skipped and \
                    (shape is None or r.shape == shape) and (rank is None or r.rank == rank):
                return r
        return None

    def set_baseline(self, suite: str, baseline: str, kernels: Optional[Sequence[str]] = None) -> None:
        """Fill ``speedup`` (time rows) or ``mem_ratio`` (byte rows) against ``baseline`` in each group."""
        base: Dict[tuple, Row] = {}
        for r in self.rows:
            if r.suite == suite and r.provider == baseline and not r.skipped:
                base[r.group] = r
        for r in self.rows:
            if r.suite != suite or r.skipped or (kernels is not None and r.kernel not in kernels):
                continue
            b = base.get(r.group)
            if b is None:
                continue
            r.baseline = baseline
            if r.median_ms is not None and b.median_ms:
                r.speedup = b.median_ms / r.median_ms
            elif r.median_ms is None and r.bytes is not None and b.bytes:
                r.mem_ratio = r.bytes / b.bytes

    def ratio(self, suite: str, kernel: str, provider: str, baseline: str, shape: Optional[str] = None,
              rank: Optional[int] = None, *, memory: bool = False) -> Optional[float]:
        """``baseline time / provider time`` (or ``provider bytes / baseline bytes``), None if either is missing."""
        a = self.find(suite, kernel, provider, shape, rank)
        b = self.find(suite, kernel, baseline, shape, rank)
        if a is None or b is None:
            return None
        if memory:
            return a.bytes / b.bytes if a.bytes is not None and b.bytes else None
        return b.median_ms / a.median_ms if a.median_ms and b.median_ms else None

    def target(self, suite: str, text: str, measured: Optional[float], goal: float, *,
               higher_is_better: bool = True, applies: bool = True, unit: str = "x") -> None:
        self.targets.append(Target(suite, text, measured, goal, higher_is_better, applies, unit))

    # ----------------------------------------------------------------- output
    def csv_path(self) -> Path:
        return self.out / f"{self.tag}.csv"

    def write_csv(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.csv_path()
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            w.writeheader()
            for r in self.rows:
                d = {k: getattr(r, k) for k in ROW_FIELDS if hasattr(r, k)}
                d.update(self.meta)
                w.writerow({k: _csv_value(d.get(k)) for k in ROW_FIELDS})
        os.replace(tmp, path)
        return path


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


# --------------------------------------------------------------------------- roofline
def measure_roofline(ctx: Ctx) -> None:
    """The device's matmul rate (TFLOP/s, ctx.dtype) and copy bandwidth (GB/s, read + write)."""
    s = ctx.sizes.roof_matmul
    dev = ctx.device
    a = torch.randn(s, s, device=dev, dtype=ctx.dtype)
    b = torch.randn(s, s, device=dev, dtype=ctx.dtype)
    tkw = dict(budget_s=4 * ctx.budget_s, min_reps=5)  # the ceilings every fraction divides by: more samples
    row = ctx.measure("roofline", "matmul", "torch", lambda: torch.mm(a, b), flops=2.0 * s ** 3, time_kw=tkw,
                      shape=fmt_shape(s, s, s), note="square GEMM, random data: the matmul rate every "
                                                    "frac_matmul is relative to")
    if row is not None:
        ctx.matmul_tflops = row.tflops
        row.frac_matmul = 1.0
    del a, b
    n = ctx.sizes.roof_copy_mb * 2 ** 20 // 4
    src = torch.randn(n, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    row = ctx.measure("roofline", "copy", "torch", lambda: dst.copy_(src), nbytes=2 * src.nbytes, time_kw=tkw,
                      shape=f"{ctx.sizes.roof_copy_mb}MiB", dtype="fp32",
                      note="device-to-device copy, bytes read + written: the bandwidth every frac_copy is relative to")
    if row is not None:
        ctx.copy_gbps = row.gbps
        row.frac_copy = 1.0
    del src, dst
    free_memory(dev)


# --------------------------------------------------------------------------- table
def _fmt(v, spec: str, empty: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return empty
    return format(v, spec)


def fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return "-"
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b} B"


def format_table(ctx: Ctx, suites: Optional[Sequence[str]] = None) -> str:
    """The short table printed last: one block per suite, then the targets and the skips."""
    lines = []
    suites = suites or list(dict.fromkeys(r.suite for r in ctx.rows))
    lines.append(f"device: {ctx.device_name} | dtype {ctx.dtype_name} | mode {ctx.mode} | torch {ctx.meta['torch']} "
                 f"| triton {ctx.meta['triton']} | git {ctx.meta['git_sha']}")
    if ctx.matmul_tflops or ctx.copy_gbps:
        lines.append(f"roofline: matmul {_fmt(ctx.matmul_tflops, '.3g')} TFLOP/s ({ctx.dtype_name}), "
                     f"copy {_fmt(ctx.copy_gbps, '.4g')} GB/s")
    if ctx.sizes.note:
        lines.append(f"sizes: {ctx.sizes.note}")
    header = f"{'kernel':<22} {'provider':<24} {'shape':<17} {'rank':>4} {'median':>10} {'p20-p80':>19} " \
             f"{'vs base':>8} {'TFLOP/s':>8} {'%mm':>5} {'GB/s':>7} {'%bw':>5} {'bytes':>10}  check/note"
    for suite in suites:
        rows = [r for r in ctx.rows if r.suite == suite and r.suite != "roofline"]
        if not rows:
            continue
        lines.append("")
        lines.append(f"== {suite} ==")
        lines.append(header)
        for r in rows:
            if r.skipped:
                lines.append(f"{r.kernel:<22} {r.provider:<24} {r.shape:<17} {_fmt(r.rank, 'd'):>4} "
                             f"{'-':>10} {'':>19} {'':>8} {'':>8} {'':>5} {'':>7} {'':>5} {'':>10}  {r.note}")
                continue
            med = _fmt_ms(r.median_ms)
            spread = f"{_fmt_ms(r.p20_ms)}-{_fmt_ms(r.p80_ms)}" if r.median_ms is not None else ""
            vs = _fmt(r.speedup, ".2f") + "x" if r.speedup is not None else (
                _fmt(r.mem_ratio, ".3f") + "x" if r.mem_ratio is not None else "-")
            extra = "; ".join(x for x in (r.check, r.note) if x)
            lines.append(
                f"{r.kernel:<22} {r.provider:<24} {r.shape:<17} {_fmt(r.rank, 'd'):>4} {med:>10} {spread:>19} "
                f"{vs:>8} {_fmt(r.tflops, '.3g'):>8} {_pct(r.frac_matmul):>5} {_fmt(r.gbps, '.4g'):>7} "
                f"{_pct(r.frac_copy):>5} {fmt_bytes(r.bytes) if r.median_ms is None else '':>10}  {extra}")
    ts = [t for t in ctx.targets if t.suite in suites]
    if ts:
        lines.append("")
        lines.append("== targets (from the issues unless marked; printed, not asserted) ==")
        for t in ts:
            op = ">=" if t.higher_is_better else "<="
            meas = _fmt(t.measured, ".3g") + t.unit if t.measured is not None else "-"
            lines.append(f"[{t.suite}] {t.text}: goal {op} {t.goal:g}{t.unit}, measured {meas}: {t.verdict()}")
    failed = [r for r in ctx.rows if "FAILED" in r.check]
    if failed:
        lines.append("")
        lines.append(f"!! {len(failed)} correctness check(s) FAILED: "
                     + ", ".join(f"{r.suite}/{r.kernel}/{r.provider}/{r.shape}" for r in failed))
    return "\n".join(lines)


def format_markdown(ctx: Ctx, suites: Optional[Sequence[str]] = None) -> str:
    """The run as Markdown (for the README): one table per suite, then the targets."""
    suites = suites or list(dict.fromkeys(r.suite for r in ctx.rows))
    out = [f"Device: **{ctx.device_name}**, dtype {ctx.dtype_name}, mode {ctx.mode}, torch {ctx.meta['torch']}, "
           f"triton {ctx.meta['triton']}, git {ctx.meta['git_sha']}, {ctx.meta['timestamp']}.  "]
    if ctx.matmul_tflops or ctx.copy_gbps:
        out.append(f"Measured ceilings: matmul {_fmt(ctx.matmul_tflops, '.3g')} TFLOP/s ({ctx.dtype_name}), "
                   f"copy {_fmt(ctx.copy_gbps, '.4g')} GB/s.  ")
    if ctx.sizes.note:
        out.append(f"Sizes: {ctx.sizes.note}.")
    for suite in suites:
        rows = [r for r in ctx.rows if r.suite == suite]
        if not rows:
            continue
        out += ["", f"**{suite}**", "",
                "| kernel | provider | shape | rank | median | p20-p80 | vs baseline | TFLOP/s (% matmul) | bytes | check / note |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.skipped:
                note = r.note.replace("|", "\\|")
                out.append(f"| {r.kernel} | {r.provider} | {r.shape} | {_fmt(r.rank, 'd')} | - | | | | | {note} |")
                continue
            vs = (f"{r.speedup:.2f}x {r.baseline}" if r.speedup is not None else
                  f"{r.mem_ratio:.3f}x {r.baseline}" if r.mem_ratio is not None else "")
            rate = f"{r.tflops:.3g} ({_pct(r.frac_matmul)})" if r.tflops is not None else ""
            spread = f"{_fmt_ms(r.p20_ms)}-{_fmt_ms(r.p80_ms)}" if r.median_ms is not None else ""
            extra = "; ".join(x for x in (r.check, r.note) if x).replace("|", "\\|")
            out.append(f"| {r.kernel} | {r.provider} | {r.shape} | {_fmt(r.rank, 'd')} | {_fmt_ms(r.median_ms)} | "
                       f"{spread} | {vs} | {rate} | {fmt_bytes(r.bytes) if r.median_ms is None else ''} | {extra} |")
    ts = [t for t in ctx.targets if t.suite in suites]
    if ts:
        out += ["", "**Targets** (from the issues unless marked; printed, not asserted)", ""]
        for t in ts:
            op = ">=" if t.higher_is_better else "<="
            meas = _fmt(t.measured, ".3g") + t.unit if t.measured is not None else "-"
            out.append(f"- [{t.suite}] {t.text}: goal {op} {t.goal:g}{t.unit}, measured {meas}: {t.verdict()}")
    return "\n".join(out) + "\n"


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 1000:
        return f"{ms / 1e3:.3g} s"
    if ms >= 1:
        return f"{ms:.4g} ms"
    return f"{ms * 1e3:.4g} us"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(ctx: Ctx, name: str, rows: Sequence[Row], *, x: Callable[[Row], float], xlabel: str, ylabel: str,
               title: str, series: Callable[[Row], str] = lambda r: r.provider) -> Optional[Path]:
    """One line per series (log-log), e.g. refresh time vs matrix size per method."""
    rows = [r for r in rows if not r.skipped and r.median_ms]
    if not ctx.plots or not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(series(r) for r in rows):
        pts = sorted((x(r), r.median_ms) for r in rows if series(r) == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(ctx, fig, name)


def plot_bars(ctx: Ctx, name: str, panels: Sequence[tuple], title: str) -> Optional[Path]:
    """Horizontal bars, one panel per ``(xlabel, [(label, value), ...])``; log scale when values span > 30x."""
    panels = [(xl, [(k, v) for k, v in data if v is not None]) for xl, data in panels]
    panels = [p for p in panels if p[1]]
    if not ctx.plots or not panels:
        return None
    plt = _plt()
    height = max(2.5, 0.35 * max(len(d) for _, d in panels) + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), height), squeeze=False)
    for ax, (xlabel, data) in zip(axes[0], panels):
        labels = [k for k, _ in data]
        vals = [v for _, v in data]
        ax.barh(range(len(vals)), vals, color="tab:blue")
        ax.set_yticks(range(len(vals)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        if min(vals) > 0 and max(vals) / min(vals) > 30:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            xlabel += ", log scale"
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="x", alpha=0.3)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(ctx, fig, name)


def _save(ctx: Ctx, fig, name: str) -> Path:
    plt = _plt()
    ctx.out.mkdir(parents=True, exist_ok=True)
    path = ctx.out / f"{ctx.tag}_{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def progress(items, desc: str, ctx: Ctx):
    """A tqdm progress bar on stderr (off when stderr is not a terminal or tqdm is missing)."""
    items = list(items)
    try:
        from tqdm import tqdm
    except Exception:  # noqa: BLE001
        return items
    return tqdm(items, desc=desc, file=sys.stderr, leave=False, disable=None if not ctx.tiny else True)
