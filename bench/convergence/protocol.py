"""The demo's protocol: every method tuned with the same budget, then the table over seeds.

``python -m bench.convergence --quick --data <folder>`` (the default mode):

1. **Tuning** (per method that has a grid: the AdamW baseline and every low-rank method;
   not the frozen control): a grid of ``lr`` x ``other_lr`` around the recipe's values
   (:data:`DEFAULT_GRID`, or the recipe's own ``tune``), trained at HALF the preset's
   steps with one seed (``--seed``) and scored on the TUNING split. When the best point
   lies on the edge of an axis with two or more values, the axis is extended one value
   further (the same ratio), crossed with the other axes' values, while the points stay
   within the budget (``--budget``, default 17: what AdamW's grid cost). Each method's
   file is ``<out>/convergence_tuning-<method>.json`` (written after every point, so a
   run cut short resumes where it stopped: points already in the file are not rerun).
   ``scale`` is not a grid axis by default: for every projected update here only the
   product ``lr x scale`` (GaLore, DCT-AdamW, Q-GaLore, GradNormLoRP, GaLore-Adafactor)
   or ``lr x sqrt(scale)`` (APOLLO) enters (no weight decay in the demo), so tuning
   ``lr`` at the paper's scale tunes that product; the row records both.
2. **Table** (validation split, full length, ``--seeds`` seeds, default 3): one row per
   method under its plain name with the tuned hyper-parameters, and a second row
   ``"<method> (paper recipe)"`` with the recipe's values where they differ from the
   tuned ones. ``<out>/convergence.json`` is rewritten after every run; rows (row,
   seed) already in it with the same hyper-parameters, preset and data are kept, not
   rerun (``--fresh`` starts over). A run on another machine or process merges with
   ``--merge``.

A low-rank row counts as "within x% of AdamW" only when its WORST seed is
(:func:`bench.convergence.report.acceptance`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from . import tuning
from .recipes import PAPER_SUFFIX, RECIPES, Recipe
from .training import Result

# lr: multiples of the recipe's value; other_lr: the values AdamW's grid ranged over
# (the papers use one lr for every parameter; the tuned AdamW took 0.1).
DEFAULT_GRID: dict[str, tuple] = {"lr": ("x0.5", "x1", "x2"), "other_lr": (1e-2, 3e-2, 1e-1)}
DEFAULT_BUDGET = 17  # the points AdamW's tuning grid took (bench/results/convergence_tuning-adamw.json)


def tunes(recipe: Recipe) -> bool:
    """Whether the protocol tunes ``recipe`` (the baseline and the low-rank methods)."""
    return recipe.role != "control"


def grid_spec(recipe: Recipe, override: dict | None = None) -> dict[str, tuple]:
    """The grid of ``recipe``: ``override`` (``--grid``), else its ``tune``, else :data:`DEFAULT_GRID`;
    only the keys the recipe has."""
    spec = dict(override or recipe.tune or DEFAULT_GRID)
    return {k: tuple(v) for k, v in spec.items() if k in recipe.hparams}


def axis_values(spec: tuple, base: float) -> list[float]:
    """Numbers of one axis: ``"x0.5"`` is 0.5 x ``base`` (the recipe's value)."""
    out = []
    for v in spec:
        if isinstance(v, str) and v.startswith("x"):
            out.append(float(v[1:]) * base)
        else:
            out.append(float(v))
    return sorted(set(out))


def _key(pt: dict) -> tuple:
    return tuple(sorted((k, round(float(v), 12)) for k, v in pt.items()))


def _extension(axes: dict[str, list[float]], best: dict) -> dict[str, list[float]] | None:
    """The axes with one more value beyond the best point's edge (first such axis), or None."""
    for k, vals in axes.items():
        if len(vals) < 2:
            continue
        i = vals.index(best[k]) if best[k] in vals else None
        if i == len(vals) - 1:
            return {**axes, k: vals + [vals[-1] * vals[-1] / vals[-2]]}
        if i == 0:
            return {**axes, k: [vals[0] * vals[0] / vals[1]] + vals}
    return None


def record_history(path: pathlib.Path, meta: dict, point_git: dict, history: list) -> None:
    """Stamp every point of the tuning file at ``path`` with the code version it ran with (``git``:
    this run's stamp, or the stamp it carried in the file it was resumed from), and keep that
    file's stamps and commands under ``history`` (the file-level stamp is this run's)."""
    data = json.loads(path.read_text())
    for pt in data["points"]:
        pt["git"] = point_git.get(_key(pt["hparams"]), meta["git"])
    data["history"] = history + [{"git": meta["git"], "timestamp": meta.get("timestamp"),
                                  "command": meta.get("command")}]
    path.write_text(json.dumps(data, indent=1))


@dataclasses.dataclass
class TuningOutcome:
    method: str
    axes: dict
    points: list
    results: list
    best: dict | None  # the best point's hyper-parameters (grid keys only), None when none ran ok
    complete: bool  # the grid ended inside the budget with its best point interior or unextendable


def tune_method(m: str, preset, run_point, out: pathlib.Path, meta: dict, budget: int,
                override: dict | None = None) -> TuningOutcome:
    """Run (or resume) ``m``'s grid. ``run_point(hp) -> Result`` trains one point on the
    tuning split; ``meta`` is the tuning file's stamp (its ``preset`` and ``data`` must
    match a file being resumed)."""
    recipe = RECIPES[m]
    paper = recipe.resolve(preset)
    axes = {k: axis_values(v, paper[k]) for k, v in grid_spec(recipe, override).items()}
    done: dict[tuple, tuple] = {}
    point_git: dict[tuple, str] = {}  # the code version of every point resumed from the file
    history: list = []
    path = out / f"convergence_tuning-{m}.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("preset") == meta["preset"] and old.get("data") == meta["data"] and \
                old.get("seeds", [None])[0] == meta["seeds"][0]:
            history = old.get("history") or [{k: old.get(k) for k in ("git", "timestamp", "command", "merged_from")}]
            for p in old.get("points", []):
                r = Result(m, p["status"], final_val_loss=float(p["tune_loss"]), curve=p["curve"],
                           seconds=p["seconds"], recipe=p["recipe"], seed=meta["seeds"][0])
                done[_key(p["hparams"])] = (p["hparams"], r)
                point_git[_key(p["hparams"])] = p.get("git", old.get("git", "unknown"))
    points, results = [], []

    def write():
        # The file keeps the points of an earlier grid that this one does not hold (e.g. a
        # hand-extended grid): they stay recorded, but the best and the budget count only this grid's.
        extra = [(hp, r) for k, (hp, r) in done.items() if all(k != _key(q) for q in points)]
        allp = points + [hp for hp, _ in extra]
        allr = results + [r for _, r in extra]
        grid = {k: sorted({pt[k] for pt in allp}) for k in axes}
        order = sorted(range(len(allp)), key=lambda i: tuple(allp[i][k] for k in axes))
        _, jpath = tuning.write(out, m, meta, grid, [allp[i] for i in order], [allr[i] for i in order], among=points)
        record_history(jpath, meta, point_git, history)

    while True:
        for pt in tuning.grid_points(axes):
            if any(_key(pt) == _key(q) for q in points):
                continue
            if len(points) >= budget:
                break
            if _key(pt) in done:
                points.append(pt)
                results.append(done[_key(pt)][1])
                continue
            results.append(run_point(recipe.resolve(preset, pt)))
            points.append(pt)
            write()
        b = tuning.best(results)
        best = points[results.index(b)] if b is not None else None
        if best is None:
            write()
            return TuningOutcome(m, axes, points, results, None, False)
        ext = _extension(axes, best)
        if ext is None:
            write()
            return TuningOutcome(m, axes, points, results, best, True)
        n_new = len(tuning.grid_points(ext)) - len(tuning.grid_points(axes))
        if len(points) + n_new > budget:
            write()
            return TuningOutcome(m, axes, points, results, best, False)
        axes = ext


def rows_for(m: str, preset, outcome: TuningOutcome | None) -> list[tuple[str, dict]]:
    """``[(row name, hyper-parameters)]``: the tuned row under ``m``'s name, then the paper
    recipe's row where it differs (a method without tuning: its recipe under its name)."""
    recipe = RECIPES[m]
    paper = recipe.resolve(preset)
    if outcome is None or outcome.best is None:
        return [(m, paper)]
    tuned = recipe.resolve(preset, outcome.best)
    same = all(math.isclose(tuned[k], paper[k], rel_tol=1e-9) for k in outcome.best)
    rows = [(m, tuned)]
    if not same and recipe.role != "baseline":
        rows.append((m + PAPER_SUFFIX, paper))
    return rows


def run_key(row: str, seed: int) -> str:
    """The key of one run in ``git_by_run``."""
    return f"{row}/seed{seed}"


def load_done(path: pathlib.Path, meta: dict) -> tuple[list[Result], dict, dict]:
    """The runs of an earlier protocol ``convergence.json`` at ``path`` with the same preset, data
    and evaluated split (a resumed table may span commits, as a merge does), its ``protocol``
    record and the code version of each run (``{run_key: git}``); empty when there is none."""
    if not path.is_file():
        return [], {}, {}
    old = json.loads(path.read_text())
    if any(old.get(k) != meta.get(k) for k in ("preset", "data", "evaluated_split")) or "protocol" not in old:
        return [], {}, {}
    by_run = old.get("git_by_run") or {}
    by_method = old.get("git_by_method") or {}
    gits = {run_key(r["method"], r["seed"]): by_run.get(run_key(r["method"], r["seed"]),
                                                        by_method.get(r["method"], old.get("git", "unknown")))
            for r in old.get("runs", [])}
    return [Result(r["method"], r["status"], final_val_loss=float(r["final_val_loss"]), state_bytes=r["state_bytes"],
                   peak_bytes=r["peak_bytes"], tokens_per_s=r["tokens_per_s"], curve=[tuple(x) for x in r["curve"]],
                   seconds=r["seconds"], recipe=r["recipe"], seed=r["seed"]) for r in old.get("runs", [])], \
        old["protocol"], gits


def same_hp(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        (math.isclose(a[k], b[k], rel_tol=1e-9) if isinstance(a[k], float) or isinstance(b[k], float) else a[k] == b[k])
        for k in a)
