"""The tuning grid: one method, every combination of the given hyper-parameter values,
trained on the training split and scored on the TUNING split (never on the validation
split the table reports). ``python -m bench.convergence --tune adamw --grid lr=1e-3,2e-3
--grid other_lr=3e-3,1e-2`` writes ``<out>/convergence_tuning-<method>.csv`` and ``.json``."""
from __future__ import annotations

import itertools
import json
import math
import pathlib

from .training import Result

TUNING_COLUMNS = ("method", "preset", "steps", "seed", "hparams", "tune_loss", "status")


def _value(v: str):
    """A grid value: a number, or ``"xF"`` (kept as a string: F times the recipe's value)."""
    if v.startswith("x"):
        float(v[1:])
        return v
    return float(v)


def parse_grid(items: list[str] | None) -> dict[str, list]:
    """``["lr=1e-3,2e-3", "other_lr=1e-2"]`` -> ``{"lr": [1e-3, 2e-3], "other_lr": [1e-2]}``;
    ``"lr=x0.5,x1"`` keeps ``["x0.5", "x1"]`` (multiples of the recipe's value)."""
    grid: dict[str, list[float]] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--grid: expected KEY=V1,V2,..., got {item!r}")
        key, values = item.split("=", 1)
        key = key.strip()
        if not key or key in grid:
            raise ValueError(f"--grid: empty or repeated key in {item!r}")
        try:
            vals = [_value(v.strip()) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--grid: {key} values must be numbers or xF (F times the recipe's value), "
                             f"got {values!r}") from None
        if not vals:
            raise ValueError(f"--grid: no values for {key}")
        grid[key] = vals
    if not grid:
        raise ValueError("--tune needs at least one --grid KEY=V1,V2,...")
    return grid


def grid_points(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    """Every combination, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def best(results: list[Result]) -> Result | None:
    """The run with the lowest finite final loss (first on ties), or None."""
    ok = [r for r in results if r.status == "ok" and math.isfinite(r.final_val_loss)]
    return min(ok, key=lambda r: r.final_val_loss) if ok else None


def write(out: pathlib.Path, method: str, meta: dict, grid: dict, points: list[dict], results: list[Result],
          among: list[dict] | None = None) -> tuple:
    """``convergence_tuning-<method>.csv`` (one row per grid point) and ``.json`` (stamp, grid, curves, best;
    the best among the points ``among`` when given, e.g. the protocol's grid within a longer history)."""
    out.mkdir(parents=True, exist_ok=True)
    preset = meta["preset"]
    csv_path = out / f"convergence_tuning-{method}.csv"
    keys = list(grid)
    lines = [",".join(("method", "preset", "steps", "seed", *keys, "tune_loss", "status"))]
    for pt, r in zip(points, results):
        lines.append(",".join([method, preset["name"], str(preset["steps"]), str(r.seed),
                               *(f"{pt[k]:g}" for k in keys), f"{r.final_val_loss:.6f}", r.status.replace(",", ";")]))
    csv_path.write_text("\n".join(lines) + "\n")
    b = best(results if among is None else [r for pt, r in zip(points, results) if pt in among])
    data = dict(meta)
    data.update({
        "method": method, "split": "tune", "grid": grid,
        "points": [{"hparams": pt, "recipe": r.recipe, "tune_loss": r.final_val_loss, "status": r.status,
                    "seconds": r.seconds, "curve": r.curve} for pt, r in zip(points, results)],
        "best": None if b is None else {"hparams": points[results.index(b)], "tune_loss": b.final_val_loss},
    })
    json_path = csv_path.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1))
    return csv_path, json_path
