"""The run as a printed summary, a wide printed table, and Markdown (``<device>.md``, shown by docs/results.md)."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

from .context import Ctx

#: What the targets' heading says about them.
TARGETS_NOTE = "the project's goals; printed, not asserted"


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
        lines.append(f"== targets ({TARGETS_NOTE}) ==")
        lines += [_target_line(t) for t in ts]
    failed = [r for r in ctx.rows if "FAILED" in r.check]
    if failed:
        lines.append("")
        lines.append(f"!! {len(failed)} correctness check(s) FAILED: "
                     + ", ".join(f"{r.suite}/{r.kernel}/{r.provider}/{r.shape}" for r in failed))
    return "\n".join(lines)


def _target_line(t) -> str:
    op = ">=" if t.higher_is_better else "<="
    return f"[{t.suite}] {t.text}: goal {op} {t.goal:g}{t.unit}, measured {_fmt_measured(t)}: {t.verdict()}"


def format_summary(ctx: Ctx, suites: Optional[Sequence[str]] = None, *, csv_path=None, md_path=None,
                   plots: Sequence = ()) -> str:
    """The short summary printed at the end of a run: the stamp, each goal with what was measured
    (the headline ratios), the row counts, failed checks, and where the full tables went."""
    suites = suites or list(dict.fromkeys(r.suite for r in ctx.rows))
    rows = [r for r in ctx.rows if r.suite in suites and r.suite != "roofline"]
    skipped = [r for r in rows if r.skipped]
    lines = [f"== summary: {ctx.device_name} | dtype {ctx.dtype_name} | mode {ctx.mode} | torch {ctx.meta['torch']} "
             f"| triton {ctx.meta['triton']} | git {ctx.meta['git_sha']} =="]
    if ctx.sizes.note:
        lines.append(f"sizes: {ctx.sizes.note}")
    lines.append(f"rows: {len(rows) - len(skipped)} measured, {len(skipped)} skipped (each with its reason in the tables)")
    ts = [t for t in ctx.targets if t.suite in suites]
    if ts:
        lines.append(f"== targets ({TARGETS_NOTE}) ==")
        lines += [_target_line(t) for t in ts]
    failed = [r for r in ctx.rows if "FAILED" in r.check]
    if failed:
        lines.append(f"!! {len(failed)} correctness check(s) FAILED: "
                     + ", ".join(f"{r.suite}/{r.kernel}/{r.provider}/{r.shape}" for r in failed))
    if md_path is not None:
        lines.append(f"full tables: {_shown(md_path)}")
    if csv_path is not None:
        lines.append(f"raw rows:    {_shown(csv_path)}")
    if plots:
        lines.append("plots:       " + ", ".join(_shown(p) for p in plots))
    return "\n".join(lines)


def _shown(path) -> str:
    """``path`` relative to the current directory when below it (shorter to read), else as given."""
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def format_markdown(ctx: Ctx, suites: Optional[Sequence[str]] = None) -> str:
    """The run as Markdown (``<device>.md``, shown by docs/results.md): one table per suite, then the targets."""
    suites = suites or list(dict.fromkeys(r.suite for r in ctx.rows))
    out = [f"Device: **{ctx.device_name}**, dtype {ctx.dtype_name}, mode {ctx.mode}, torch {ctx.meta['torch']}, "
           f"triton {ctx.meta['triton']}, git {ctx.meta['git_sha']}, {ctx.meta['timestamp']}.  "]
    if ctx.matmul_tflops or ctx.copy_gbps:
        out.append(f"Measured ceilings: matmul {_fmt(ctx.matmul_tflops, '.3g')} TFLOP/s ({ctx.dtype_name}), "
                   f"copy {_fmt(ctx.copy_gbps, '.4g')} GB/s.  ")
    if ctx.sizes.note:
        out.append(f"Sizes: {ctx.sizes.note}.")
    if ctx.device.type == "cpu" and ctx.load_start is not None:
        from .context import _loadavg

        end = _loadavg()
        out[-1] += "  "
        out.append(f"CPU load average (1 min): {ctx.load_start:.1f} at the start, "
                   f"{end if end is None else format(end, '.1f')} at the end, on {os.cpu_count()} cores "
                   "(a load above the core count slows the timings and widens their spread).")
    if ctx.kept_header:
        out[-1] += "  "
        out.append(ctx.kept_header)
    order = list(suites) + [s for s in ctx.kept_md if s not in suites]
    if ctx.kept_md:  # --keep: every suite in the harness's order, kept ones verbatim
        so = ctx.suite_order
        order = sorted(order, key=lambda s: so.index(s) if s in so else len(so))
    for suite in order:
        if suite in ctx.kept_md and suite not in suites:
            out += ["", ctx.kept_md[suite]]
            continue
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
    if ts or ctx.kept_targets:
        out += ["", f"**Targets** ({TARGETS_NOTE})", ""]
        new = []
        for t in ts:
            new.append((t.suite, f"- {_target_line(t)}"))
        kept = [(ln[3:].split("]", 1)[0], ln) for ln in ctx.kept_targets]
        rank = {s: i for i, s in enumerate(order)}
        out += [ln for _, ln in sorted(new + kept, key=lambda x: rank.get(x[0], len(rank)))]
    return "\n".join(out) + "\n"


def _fmt_measured(t) -> str:
    """A target's measured value to 3 significant digits, or to 7 when 3 would print the goal
    itself for a value on the other side of it (e.g. 1.0000086x against a goal of <= 1x)."""
    if t.measured is None:
        return "-"
    txt = _fmt(t.measured, ".3g")
    if not (isinstance(t.measured, float) and math.isnan(t.measured)) and float(txt) == t.goal != t.measured:
        txt = _fmt(t.measured, ".7g")
    return txt + t.unit


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
