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

Targets
    The project's goals are printed next to what was measured, never asserted; a
    goal measured off its target (a CPU, a smaller size) gets "not measured on the
    target" instead of a verdict.

Modules: :mod:`.sizes` (problem sizes, shape helpers), :mod:`.rows` (row schema,
targets, checks), :mod:`.timing` (timer statistics, sync), :mod:`.context`
(:class:`Ctx`, the roofline), :mod:`.report` (summary, table, Markdown), :mod:`.plots`; the
device and git stamps come from :mod:`bench.stamps`.
"""
from __future__ import annotations

from ..stamps import REPO, device_name, device_tag, triton_version
from ..stamps import git_describe as git_sha
from .context import Ctx, measure_roofline
from .plots import plot_bars, plot_lines, progress
from .report import fmt_bytes, format_markdown, format_summary, format_table
from .rows import CHECK_TOL, NOT_ON_TARGET, ROW_FIELDS, Row, Target, Timing, check_str, rel_err, short
from .sizes import (DTYPE_NAMES, DTYPES, Sizes, Stack, fmt_shape, gpu_check_args, lowrank_shape, proj_shape, side_of,
                    sizes)
from .timing import BudgetExceeded, free_memory, summarize, sync

__all__ = [
    "REPO", "device_name", "device_tag", "triton_version", "git_sha", "Ctx", "measure_roofline", "plot_bars",
    "plot_lines", "progress", "fmt_bytes", "format_markdown", "format_summary", "format_table", "CHECK_TOL", "NOT_ON_TARGET",
    "ROW_FIELDS", "Row", "Target", "Timing", "check_str", "rel_err", "short", "DTYPE_NAMES", "DTYPES", "Sizes",
    "Stack", "fmt_shape", "gpu_check_args", "lowrank_shape", "proj_shape", "side_of", "sizes", "BudgetExceeded", "free_memory",
    "summarize", "sync",
]
