"""What a run writes and prints: per-method summaries over seeds, the CSV, the JSON, the plot, the table."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics

from .recipes import PAPER_SUFFIX, recipe_of
from .training import Result

CSV_COLUMNS = ("method", "final_val_loss", "val_ppl", "state_bytes", "peak_bytes", "tokens_per_s")
# A low-rank method "clearly" beats the frozen-weights control when its worst seed ends
# at least this many nats below the control's best seed (a difference in the third
# decimal could be noise; 0.05 nats/byte is about 5% in perplexity).
CLEAR_MARGIN_NATS = 0.05
# The protocol's bars: a low-rank row within 5% of AdamW's mean loss (by its worst seed),
# DCT-AdamW within 3 percentage points (of AdamW's loss) of GaLore.
LOSS_BAR = 0.05
DCT_GALORE_POINTS = 3.0


@dataclasses.dataclass
class Summary:
    """One method over the seeds it trained with."""

    method: str
    role: str
    status: str
    finals: list  # final validation loss per seed, in seed order
    seeds: list
    state_bytes: int
    peak_bytes: int  # the largest over seeds
    tokens_per_s: float  # mean over seeds

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finals) if self.finals else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.finals) if len(self.finals) > 1 else 0.0

    @property
    def worst(self) -> float:
        return max(self.finals) if self.finals else float("nan")

    @property
    def best(self) -> float:
        return min(self.finals) if self.finals else float("nan")

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.finals) and all(math.isfinite(x) for x in self.finals)


def summarize(results: list[Result]) -> list[Summary]:
    """Group ``results`` by method (in first-seen order); a method with any non-ok seed carries that status."""
    out: dict[str, Summary] = {}
    for r in results:
        rec = recipe_of(r.method)
        role = rec.role if rec is not None else "lowrank"
        s = out.setdefault(r.method, Summary(r.method, role, "ok", [], [], 0, 0, 0.0))
        if r.status != "ok" and s.status == "ok":
            s.status = r.status
        if r.trained:
            s.finals.append(r.final_val_loss)
            s.seeds.append(r.seed)
            s.state_bytes = max(s.state_bytes, r.state_bytes)
            s.peak_bytes = max(s.peak_bytes, r.peak_bytes)
    for s in out.values():
        speeds = [r.tokens_per_s for r in results if r.method == s.method and r.trained]
        s.tokens_per_s = statistics.fmean(speeds) if speeds else 0.0
    return list(out.values())


def _by_role(summaries: list[Summary], role: str) -> Summary | None:
    return next((s for s in summaries if s.role == role and s.ok), None)


def control_verdicts(summaries: list[Summary]) -> dict[str, dict]:
    """Per low-rank method: its margin over the frozen-weights control, and whether it is clear."""
    ctrl = _by_role(summaries, "control")
    out = {}
    if ctrl is None:
        return out
    for s in summaries:
        if s.role != "lowrank" or not s.finals:
            continue
        margin = ctrl.best - s.worst
        out[s.method] = {"mean_gap_nats": ctrl.mean - s.mean, "worst_seed_margin_nats": margin,
                         "clear": bool(s.ok and margin >= CLEAR_MARGIN_NATS)}
    return out


def write_csv(summaries: list[Summary], path: pathlib.Path) -> None:
    """One row per method that trained: ``final_val_loss`` is the mean over seeds (per-seed values: the JSON)."""
    lines = [",".join(CSV_COLUMNS)]
    for s in summaries:
        if not s.finals:
            continue
        lines.append(f"{s.method},{s.mean:.6f},{math.exp(s.mean):.6f},{s.state_bytes},{s.peak_bytes},"
                     f"{s.tokens_per_s:.1f}")
    path.write_text("\n".join(lines) + "\n")


def write_json(path: pathlib.Path, meta: dict, results: list[Result], summaries: list[Summary]) -> None:
    """Everything the README quotes about the run: stamp, config, per-seed runs, summaries, verdicts."""
    data = dict(meta)
    data["runs"] = [{"method": r.method, "seed": r.seed, "status": r.status, "recipe": r.recipe,
                     "final_val_loss": r.final_val_loss, "state_bytes": r.state_bytes, "peak_bytes": r.peak_bytes,
                     "tokens_per_s": r.tokens_per_s, "seconds": r.seconds, "curve": r.curve} for r in results]
    data["summary"] = {s.method: {"role": s.role, "status": s.status, "seeds": s.seeds, "finals": s.finals,
                                  "mean": s.mean, "std": s.std, "min": s.best, "max": s.worst,
                                  "state_bytes": s.state_bytes, "peak_bytes": s.peak_bytes,
                                  "tokens_per_s": s.tokens_per_s,
                                  "recipe": _recipe_kind(s.method, meta),
                                  "source": recipe_of(s.method).source if recipe_of(s.method) else ""}
                       for s in summaries}
    data["vs_control"] = control_verdicts(summaries)
    data["clear_margin_nats"] = CLEAR_MARGIN_NATS
    path.write_text(json.dumps(data, indent=1, default=_json_default))


def _recipe_kind(row: str, meta: dict) -> str:
    """``"paper"`` (the recipe's values), ``"tuned"`` (the protocol's grid on the tuning split)
    or ``"recipe"`` (a run without the protocol: the recipe as registered)."""
    if row.endswith(PAPER_SUFFIX):
        return "paper"
    tuned = (meta.get("protocol") or {}).get("tuned") or {}
    return "tuned" if row in tuned else "recipe"


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def write_plot(results: list[Result], path: pathlib.Path, title: str) -> None:
    """Validation loss vs step: the mean over seeds per method (band: min..max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    finals = []
    # tab10, then the light shades of tab20 dash-dotted: no two of up to 20 methods look alike.
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("tab20").colors[1::2])
    for i, method in enumerate(dict.fromkeys(r.method for r in results)):
        runs = [r for r in results if r.method == method and r.trained and r.curve]
        if not runs:
            continue
        steps = [s for s, _ in runs[0].curve]
        runs = [r for r in runs if [s for s, _ in r.curve] == steps]  # a diverged seed has a shorter curve
        ys = [[v for _, v in r.curve] for r in runs]
        mean = [statistics.fmean(col) for col in zip(*ys)]
        control = recipe_of(method) is not None and recipe_of(method).role == "control"
        line, = ax.plot(steps, mean, marker=".", label=f"{method} ({mean[-1]:.3f})", color=palette[i % len(palette)],
                        linestyle="--" if control else "-" if i < 10 else "-.")
        if len(ys) > 1:
            ax.fill_between(steps, [min(c) for c in zip(*ys)], [max(c) for c in zip(*ys)], alpha=0.15,
                            color=line.get_color())
        if math.isfinite(mean[-1]):
            finals.append(mean[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    if len(title) > 90 and " | " in title:  # too wide for one line: the stamp part on its own line
        head, _, tail = title.rpartition(" | ")
        title = f"{head}\n{tail}"
    ax.set_title(title, fontsize=9)
    if finals:  # zoom on the part of the curves where the methods differ
        ax.set_ylim(min(finals) - 0.1, max(min(finals) + 1.5, max(finals) + 0.1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mb(b: int) -> str:
    return f"{b / 2**20:.2f}"


W = 26  # the name column: "apollo-mini (paper recipe)"


def format_table(summaries: list[Summary]) -> str:
    """The printed table: mean (and spread) over seeds, against AdamW and against the control."""
    base = _by_role(summaries, "baseline")
    ctrl = _by_role(summaries, "control")
    head = (f"{'method':<{W}} {'val loss':>9} {'+-std':>7} {'seeds':>5} {'state MiB':>10} {'peak MiB':>9} "
            f"{'tokens/s':>9}  {'vs adamw':>9} {'vs frozen':>9} {'state vs adamw':>14}")
    out = [head, "-" * len(head)]
    for s in summaries:
        if not s.finals:
            out.append(f"{s.method:<{W}} {s.status}")
            continue
        vs_base = f"{100 * (s.mean / base.mean - 1):+.1f}%" if base is not None and s is not base else ""
        vs_ctrl = f"{100 * (s.mean / ctrl.mean - 1):+.1f}%" if ctrl is not None and s is not ctrl else ""
        rel_state = f"{s.state_bytes / base.state_bytes:.2f}x" if base is not None and base.state_bytes else ""
        line = (f"{s.method:<{W}} {s.mean:>9.4f} {s.std:>7.4f} {len(s.finals):>5} {_mb(s.state_bytes):>10} "
                f"{_mb(s.peak_bytes):>9} {s.tokens_per_s:>9.0f}  {vs_base:>9} {vs_ctrl:>9} {rel_state:>14}")
        if s.status != "ok":
            line += f"  ({s.status})"
        out.append(line)
    return "\n".join(out)


def acceptance(summaries: list[Summary]) -> list[str]:
    """Per low-rank method: loss within 5% of AdamW's mean by its WORST seed, state at most half,
    clearly below the control; then DCT-AdamW against GaLore (its worst seed within
    :data:`DCT_GALORE_POINTS` percentage points of GaLore's mean, in % of AdamW's mean)."""
    base = _by_role(summaries, "baseline")
    verdicts = control_verdicts(summaries)
    lines = []
    if base is None:
        lines.append("acceptance: no AdamW baseline in this run")
    if _by_role(summaries, "control") is None:
        lines.append("acceptance: no frozen-weights control in this run")
    for s in summaries:
        if s.role != "lowrank" or not s.finals:
            continue
        parts = [f"{s.method:<{W}}"]
        if base is not None:
            loss_ok = s.ok and s.worst <= (1 + LOSS_BAR) * base.mean
            state_ok = s.state_bytes <= 0.5 * base.state_bytes
            parts.append(f"loss {100 * (s.mean / base.mean - 1):+6.2f}% mean, {100 * (s.worst / base.mean - 1):+6.2f}% "
                         f"worst seed ({'ok' if loss_ok else 'MISS'}, bar +{100 * LOSS_BAR:.0f}%), "
                         f"state {s.state_bytes / base.state_bytes:.2f}x ({'ok' if state_ok else 'MISS'}, bar 0.50x)")
        if s.method in verdicts:
            v = verdicts[s.method]
            parts.append(f"vs frozen control: margin {v['worst_seed_margin_nats']:+.3f} nats (its best seed minus our worst) "
                         f"({'clear' if v['clear'] else 'NOT CLEAR'}, bar {CLEAR_MARGIN_NATS} nats)")
        lines.append(" ".join(parts))
    by = {s.method: s for s in summaries if s.ok}
    if base is not None:
        for dct, gal in (("dct", "galore"), ("dct" + PAPER_SUFFIX, "galore" + PAPER_SUFFIX)):
            if dct in by and gal in by:
                pts = 100 * (by[dct].worst - by[gal].mean) / base.mean
                lines.append(f"{dct} vs {gal}: worst seed {pts:+.2f} points of AdamW's loss "
                             f"({'ok' if pts <= DCT_GALORE_POINTS else 'MISS'}, bar +{DCT_GALORE_POINTS:g})")
    return lines
