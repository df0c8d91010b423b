"""The context every suite receives (:class:`Ctx`): device, dtype, sizes, the timer, the rows, the CSV; and the roofline."""
from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import stamps
from .rows import ROW_FIELDS, Row, Target, _csv_value, short
from .sizes import DTYPE_NAMES, fmt_shape, sizes
from .timing import BudgetExceeded, _Quantiles, free_memory, summarize, sync


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
        # The 1-minute load average at the start (CPU runs: a load above the core count slows and
        # spreads the timings; the Markdown header prints it with the one at the end).
        self.load_start = _loadavg()
        self.deadline = None if time_budget_s is None else self.start + float(time_budget_s)
        st = stamps.stamp(device)  # git describe (+ "-dirty"), device name, versions, UTC time
        self.device_name = st["device_name"]
        # <device>[-<dtype> when not the device's default: bf16 on CUDA, fp32 on CPU][-<mode>]
        default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.tag = (stamps.device_tag(device) + ("" if dtype == default_dtype else f"-{self.dtype_name}")
                    + ("" if self.mode == "full" else f"-{self.mode}"))
        self.meta = {
            "mode": self.mode, "device": device.type, "device_name": self.device_name,
            "torch": st["torch"], "triton": st["triton"], "git_sha": st["git"], "timestamp": st["timestamp"],
        }
        self.esize = torch.empty((), dtype=dtype).element_size()
        self.shared: Dict[str, object] = {}  # figures one suite measures for another (e.g. step -> memory)
        self.matmul_tflops: Optional[float] = None
        self.copy_gbps: Optional[float] = None
        # --keep: rows (CSV dicts, their own stamps) and Markdown of suites an earlier run measured.
        self.kept_rows: List[Dict[str, str]] = []
        self.kept_md: Dict[str, str] = {}
        self.kept_targets: List[str] = []
        self.kept_header: str = ""
        self.suite_order: List[str] = []
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
               higher_is_better: bool = True, applies: bool = True, unit: str = "x",
               stated_for: str = "H100/H200 at full size") -> None:
        """Record a goal and what this run measured; ``applies=False``: this device/size is not
        where the goal is stated (``stated_for``), so no verdict is drawn from the number."""
        self.targets.append(Target(suite, text, measured, goal, higher_is_better, applies, unit, stated_for))

    # ----------------------------------------------------------------- output
    def csv_path(self) -> Path:
        return self.out / f"{self.tag}.csv"

    def keep_previous(self, suites: Sequence[str], order: Sequence[str]) -> List[str]:
        """Keep what the existing ``<tag>.csv`` / ``<tag>.md`` hold for the suites not in ``suites``
        (``--keep``): their CSV rows verbatim (with their own stamps), their Markdown tables and
        target lines; the roofline is this run's. ``order``: every suite, in the order of the
        files. Returns the kept suites (none without a CSV)."""
        self.suite_order = list(order)
        path = self.csv_path()
        if not path.exists():
            return []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != ROW_FIELDS:
                raise ValueError(f"--keep: {path} has other columns than this harness writes; rerun every suite")
            old = list(reader)
        drop = set(suites) | {"roofline", "bench"}  # "bench": an interrupted run's marker row
        self.kept_rows = [r for r in old if r["suite"] not in drop]
        kept = list(dict.fromkeys(r["suite"] for r in self.kept_rows))
        md = path.with_suffix(".md")
        if md.exists() and kept:
            self.kept_md, self.kept_targets, ceilings = _split_markdown(md.read_text(), kept)
            stamps_ = sorted({(r["git_sha"], r["timestamp"]) for r in self.kept_rows})
            self.kept_header = (f"Suites {', '.join(kept)}: kept from an earlier run ("
                                + "; ".join(f"git {g}, {t}" for g, t in stamps_)
                                + (f"; its ceilings: {ceilings}" if ceilings else "")
                                + "); the other suites and the ceilings above are this run's.")
        return kept

    def write_csv(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.csv_path()
        tmp = path.with_suffix(".csv.tmp")
        rows = []
        for r in self.rows:
            d = {k: getattr(r, k) for k in ROW_FIELDS if hasattr(r, k)}
            d.update(self.meta)
            rows.append({k: _csv_value(d.get(k)) for k in ROW_FIELDS})
        if self.kept_rows:  # --keep: the earlier run's suites, in the suites' order
            order = {s: i for i, s in enumerate(["roofline"] + self.suite_order)}
            rows = sorted(rows + self.kept_rows, key=lambda d: order.get(d["suite"], len(order)))
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
        return path


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _split_markdown(text: str, suites: Sequence[str]):
    """From a ``<tag>.md`` of :func:`format_markdown`: each of ``suites``' table block (from its
    ``**suite**`` line to the next block title), their target lines, and the ceilings line's text."""
    lines = text.split("\n")
    blocks: Dict[str, str] = {}
    cur, buf = None, []
    for line in lines + ["**end**"]:
        if line.startswith("**") and (line.endswith("**") or line.startswith("**Targets**")):
            if cur in suites:
                blocks[cur] = "\n".join(buf).strip("\n")
            cur, buf = line.strip("*") if line.endswith("**") else None, [line]
        elif cur is not None:
            buf.append(line)
    targets = [ln for ln in lines if any(ln.startswith(f"- [{s}] ") for s in suites)]
    ceil = next((ln for ln in lines if ln.startswith("Measured ceilings: ")), "")
    return blocks, targets, ceil[len("Measured ceilings: "):].strip().rstrip(".")


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
