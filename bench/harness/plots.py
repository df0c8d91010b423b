"""PNG plots of a run (matplotlib, Agg) and the progress bar."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .context import Ctx
from .rows import Row


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
