"""Merge result files of runs made in separate processes (e.g. one per seed, or one per row of a
grid, run side by side on a shared machine) into one table or one tuning file:
``python -m bench.convergence --merge A.json B.json ... [--out DIR]``.

The files must come from the same preset, data, device and evaluated split. In a table,
every method's rows must come from one code version (git stamp): rows of methods added
later (e.g. a new recipe run against the committed table) may carry a later stamp, but a
method's seeds never mix stamps. The merged stamp lists every source's stamp, and
``git_by_method`` says which one each method's rows carry. Tuning files may come from
different commits (a grid extended later). Each source file is listed with its own stamp.
"""
from __future__ import annotations

import json
import pathlib

from . import report, tuning
from .training import Result

SAME = ("git", "device", "torch", "data", "evaluated_split", "preset")


def _load(paths: list[str]) -> list[dict]:
    files = []
    for p in paths:
        path = pathlib.Path(p)
        if not path.is_file():
            raise ValueError(f"--merge: {p!r} is not a file")
        files.append(dict(json.loads(path.read_text()), _path=str(path)))
    first = files[0]
    tuning_files = "points" in first
    for f in files[1:]:
        for key in SAME:
            if key == "git":
                continue  # tuning: any commits; tables: checked per method in _git_by_method
            if f.get(key) != first.get(key):
                raise ValueError(f"--merge: {f['_path']} differs from {first['_path']} in {key!r} "
                                 f"({f.get(key)!r} vs {first.get(key)!r}); only runs of the same code and setup merge")
    kinds = {"tuning" if "points" in f else "table" for f in files}
    if len(kinds) != 1:
        raise ValueError("--merge: cannot mix tuning files and table files")
    return files


def _git_by_method(files: list[dict]) -> dict[str, str]:
    """The git stamp of every method's rows; ValueError if one method's rows carry two stamps."""
    by: dict[str, str] = {}
    for f in files:
        # A file merged before carries git_by_method; a single run's file has one stamp.
        own = f.get("git_by_method") or {}
        for r in f["runs"]:
            g = own.get(r["method"], f.get("git", "unknown"))
            if by.setdefault(r["method"], g) != g:
                raise ValueError(f"--merge: rows of {r['method']!r} come from two code versions ({by[r['method']]!r} "
                                 f"and {g!r} in {f['_path']}); only runs of the same code merge into one method's row")
    return by


def _sources(files: list[dict]) -> list[dict]:
    out = []
    for f in files:
        if f.get("merged_from"):  # a merged file: list the per-process files it came from
            out += f["merged_from"]
        else:
            out.append({"file": f["_path"], "git": f.get("git"), "timestamp": f.get("timestamp"),
                        "seeds": f.get("seeds"), "command": f.get("command")})
    return out


def _meta(files: list[dict]) -> dict:
    meta = {k: v for k, v in files[0].items()
            if k not in ("_path", "runs", "summary", "vs_control", "points", "best", "grid", "clear_margin_nats")}
    meta["merged_from"] = _sources(files)
    meta["git"] = " + ".join(dict.fromkeys(f.get("git", "unknown") for f in files))
    meta["timestamp"] = max(f.get("timestamp", "") for f in files)
    return meta


def merge(paths: list[str], out: pathlib.Path) -> tuple[str, list[Result]]:
    """Merge ``paths``; write the merged table (convergence.csv/.json/.png) or tuning file into ``out``."""
    files = _load(paths)
    out.mkdir(parents=True, exist_ok=True)
    meta = _meta(files)
    if "points" in files[0]:
        method = files[0]["method"]
        if any(f["method"] != method for f in files):
            raise ValueError("--merge: tuning files of different methods")
        keys = list(files[0]["grid"])
        grid = {k: sorted({v for f in files for v in f["grid"][k]}) for k in keys}
        points, results = [], []
        for f in files:
            if list(f["grid"]) != keys:
                raise ValueError("--merge: tuning files over different hyper-parameters")
            for pt in f["points"]:
                points.append(pt["hparams"])
                results.append(Result(method, pt["status"], final_val_loss=pt["tune_loss"], curve=pt["curve"],
                                      seconds=pt["seconds"], recipe=pt["recipe"], seed=f["seeds"][0]))
        order = sorted(range(len(points)), key=lambda i: tuple(points[i][k] for k in keys))
        points, results = [points[i] for i in order], [results[i] for i in order]
        seen = [tuple(p[k] for k in keys) for p in points]
        if len(set(seen)) != len(seen):
            raise ValueError("--merge: the same grid point appears twice")
        tuning.write(out, method, meta, grid, points, results)
        return "tuning", results
    meta["git_by_method"] = _git_by_method(files)
    meta["git"] = " + ".join(dict.fromkeys(meta["git_by_method"].values()))
    results = []
    for f in files:
        for r in f["runs"]:
            results.append(Result(r["method"], r["status"], final_val_loss=r["final_val_loss"],
                                  state_bytes=r["state_bytes"], peak_bytes=r["peak_bytes"],
                                  tokens_per_s=r["tokens_per_s"], curve=[tuple(x) for x in r["curve"]],
                                  seconds=r["seconds"], recipe=r["recipe"], seed=r["seed"]))
    pairs = [(r.method, r.seed) for r in results]
    if len(set(pairs)) != len(pairs):
        raise ValueError("--merge: the same method and seed appear twice")
    order = {m: i for i, m in enumerate(dict.fromkeys(r.method for r in results))}
    results.sort(key=lambda r: (order[r.method], r.seed))
    seeds = sorted({r.seed for r in results})
    meta["seeds"] = seeds
    meta["seeds_requested"] = sorted({s for f in files for s in f.get("seeds_requested", f.get("seeds", []))})
    summaries = report.summarize(results)
    report.write_csv(summaries, out / "convergence.csv")
    p = meta["preset"]
    title = (f"{meta['device']} | LLaMA h{p['hidden']} L{p['layers']} seq{p['seq_len']}, {p['steps']} steps x "
             f"{p['batch_size'] * p['seq_len']} tokens, rank {p['rank']}, {len(seeds)} seed(s) | {meta['git']}")
    report.write_plot(results, out / "convergence.png", title)
    report.write_json(out / "convergence.json", meta, results, summaries)
    print(report.format_table(summaries))
    for line in report.acceptance(summaries):
        print(line)
    return "table", results
