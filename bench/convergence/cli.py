"""The command line of ``python -m bench.convergence``: the table run, and the tuning grid (``--tune``)."""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import torch

from .. import stamps
from . import protocol, report, tuning
from .data import Batches, load_corpus
from .presets import PRESETS
from .recipes import HEADLINE, RECIPES, base_of
from .training import Result, train_one, warm_up

# bench/out/ is ignored by git, so a run leaves the checkout clean; --out bench/results refreshes the
# committed results (then regenerate docs/results.md with python -m bench.readme).
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "out"


def _parse_overrides(text: str | None, what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if not text:
        return out
    for item in text.split(","):
        if "=" not in item:
            raise SystemExit(f"--{what}: expected method=value, got {item!r}")
        k, v = item.split("=", 1)
        if k not in RECIPES:
            raise SystemExit(f"--{what}: unknown method {k!r}; choose from {', '.join(RECIPES)}")
        out[k] = float(v)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    from . import __doc__ as doc

    methods = tuple(RECIPES)
    study = [m for m in methods if m not in HEADLINE]
    ap = argparse.ArgumentParser(prog="python -m bench.convergence", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default=",".join(HEADLINE),
                    help=f"comma-separated subset of {','.join(HEADLINE)} (default: all of these); "
                         f"study variants, only when named: {','.join(study)}")
    ap.add_argument("--steps", type=int, default=None, help="training steps per method (default: the preset's)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the CPU preset (default without CUDA)")
    mode.add_argument("--gpu", action="store_true", help="the GaLore LLaMA-60M preset (default with CUDA)")
    mode.add_argument("--preset", choices=sorted(PRESETS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help="a text file or folder (default: the Python stdlib's *.py)")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="output folder (default: bench/out/, ignored by git; bench/results/ holds the committed results)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (initial weights and batch order)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="number of seeds of the table, seed .. seed+N-1 (default 3; 1 with --no-tune or --tune)")
    ap.add_argument("--no-tune", action="store_true",
                    help="skip the protocol's tuning: one row per method with its recipe as registered "
                         "(the papers' values; the preset's tuned pair for AdamW)")
    ap.add_argument("--budget", type=int, default=protocol.DEFAULT_BUDGET,
                    help=f"tuning points per method, extensions included (default {protocol.DEFAULT_BUDGET}, "
                         "what AdamW's grid took)")
    ap.add_argument("--tune-steps", type=int, default=None,
                    help="steps of a tuning point (default: half the table's steps)")
    ap.add_argument("--fresh", action="store_true",
                    help="rerun everything instead of keeping the tuning points and table runs already in --out")
    ap.add_argument("--lr", default=None, help="override lr (projected weights), e.g. adamw=3e-3,galore=0.02")
    ap.add_argument("--other-lr", default=None,
                    help="override other_lr (embeddings, LM head, norms), e.g. adamw=1e-2")
    ap.add_argument("--scale", default=None, help="override scales, e.g. apollo-mini=64,galore=0.5")
    ap.add_argument("--rank", type=int, default=None, help="override the preset's rank")
    ap.add_argument("--gap", type=int, default=None, help="override the preset's update_proj_gap")
    ap.add_argument("--tune", default=None, metavar="METHOD",
                    help="run the tuning grid of METHOD (scored on the tuning split) instead of the table")
    ap.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2,...",
                    help="the values of one hyper-parameter (repeat for each key): the grid of --tune, or "
                         "of every tuned method in the protocol; xF is F times the recipe's value, e.g. lr=x0.5,x1,x2")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge result files of separate processes (same code and setup) into --out; no training")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's; 1 helps on a CPU shared with other jobs)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.optimizers.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in RECIPES]
    if bad or not args.methods:
        ap.error(f"--optimizers: unknown {bad or '(empty)'}; choose from {', '.join(methods)}")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.seeds is None:
        args.seeds = 1 if (args.no_tune or args.tune is not None) else 3
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if args.budget < 1:
        ap.error("--budget must be >= 1")
    if args.tune_steps is not None and args.tune_steps < 1:
        ap.error("--tune-steps must be >= 1")
    args.grid_values = None
    if args.tune is not None:
        if args.tune not in RECIPES:
            ap.error(f"--tune: unknown method {args.tune!r}; choose from {', '.join(methods)}")
    if args.tune is not None or args.grid:
        try:
            args.grid_values = tuning.parse_grid(args.grid)
        except ValueError as e:
            ap.error(str(e))
    if args.grid and args.no_tune and args.tune is None:
        ap.error("--grid: not with --no-tune")
    return args


def _setup(args):
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.preset or ("gpu" if args.gpu else "quick" if args.quick else
                           ("gpu" if device.type == "cuda" else "quick"))
    preset = PRESETS[name]
    changes = {}
    if args.steps is not None:
        changes["steps"] = args.steps
        changes["eval_every"] = max(1, min(preset.eval_every, args.steps // 4 or 1))
    if args.rank is not None:
        changes["rank"] = args.rank
    if args.gap is not None:
        changes["gap"] = args.gap
    return device, dataclasses.replace(preset, **changes)


def _overrides(args) -> dict[str, dict]:
    per: dict[str, dict] = {}
    for flag, key in (("lr", "lr"), ("other_lr", "other_lr"), ("scale", "scale")):
        for m, v in _parse_overrides(getattr(args, flag), flag.replace("_", "-")).items():
            per.setdefault(m, {})[key] = v
    return per


def _meta(st: dict, preset, corpus, args, split: str) -> dict:
    device = torch.device(st["device"])
    return {"git": st["git"], "device": st["device_name"], "torch": st["torch"], "timestamp": st["timestamp"],
            "data": corpus.desc, "split_sizes": {s: len(corpus.split(s)) for s in ("train", "tune", "val")},
            "evaluated_split": split, "preset": dataclasses.asdict(preset),
            "seeds": list(range(args.seed, args.seed + args.seeds)),
            "seeds_requested": list(range(args.seed, args.seed + args.seeds)),
            "peak_memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                            else "growth of VmHWM over VmRSS (reset via /proc/self/clear_refs)"),
            "command": "python -m bench.convergence " + " ".join(sys.argv[1:] if args.argv is None else args.argv)}


def _train(m, preset, batches, device, seed, hp, progress) -> Result:
    try:
        r = train_one(m, preset, batches, device, seed, hp, progress=progress)
        print(f"{m} seed {seed}: loss {r.final_val_loss:.4f}, state {r.state_bytes:,} B, peak {r.peak_bytes:,} B, "
              f"{r.tokens_per_s:.0f} tokens/s, {r.seconds:.0f} s ({r.status}) {hp}", flush=True)
        return r
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
        import traceback

        traceback.print_exc()
        return Result(m, f"failed: {type(e).__name__}: {e}", recipe=dict(hp), seed=seed)


def run(argv=None) -> tuple[list[Result], pathlib.Path]:
    """Parse ``argv``, train every requested method (or the tuning grid), write the outputs."""
    args = parse_args(argv)
    args.argv = argv
    if args.merge:
        from .merge import merge

        try:
            kind, results = merge(args.merge, pathlib.Path(args.out))
        except ValueError as e:
            raise SystemExit(str(e)) from None
        print(f"merged {len(args.merge)} {kind} file(s) into {args.out}")
        return results, pathlib.Path(args.out)
    device, preset = _setup(args)
    # The stamp is taken first: the code this process runs is what the tree holds now (a
    # stamp taken minutes later would see edits made to the tree after the code loaded).
    st = stamps.stamp(device)
    over = _overrides(args)
    corpus = load_corpus(args.data)
    dev = stamps.device_name(device)
    print(f"device: {dev}; torch {torch.__version__}; git {st['git']}")
    print(f"data: {corpus.desc}: {len(corpus.train):,} training / {len(corpus.tune):,} tuning / "
          f"{len(corpus.val):,} validation bytes")
    print(f"preset {preset.name}: hidden {preset.hidden}, MLP {preset.intermediate}, {preset.layers} layers, "
          f"{preset.heads} heads, seq {preset.seq_len}, batch {preset.batch_size}, {preset.steps} steps, "
          f"rank {preset.rank}, gap {preset.gap}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    if args.tune is not None:
        return _run_tuning(args, device, preset, corpus, over, out, progress, st), out
    if not args.no_tune:
        if over:
            raise SystemExit("--lr/--other-lr/--scale: only with --no-tune or --tune (the protocol tunes them)")
        return _run_protocol(args, device, preset, corpus, over, out, progress, st, dev), out

    meta = _meta(st, preset, corpus, args, "val")
    results: list[Result] = []
    seeds = list(range(args.seed, args.seed + args.seeds))
    for seed in seeds:
        batches = Batches(corpus.train, corpus.val, preset, seed)
        warm_up(preset, batches, device, seed)
        for m in args.methods:
            reason = RECIPES[m].why_unavailable()
            if reason is not None:
                if seed == seeds[0]:
                    results.append(Result(m, f"unavailable: {reason}", seed=seed))
                    print(f"{m}: unavailable: {reason}")
                continue
            try:
                hp = RECIPES[m].resolve(preset, over.get(m))
            except ValueError as e:
                raise SystemExit(f"--lr/--other-lr/--scale: {e}") from None
            results.append(_train(m, preset, batches, device, seed, hp, progress))
        _write_table(results, out, meta, preset, dev, seeds[:seeds.index(seed) + 1])
    return results, out


def _write_table(results, out, meta, preset, dev, seeds_done) -> None:
    """Write the CSV, plot and JSON of the seeds done so far (after every seed: a long run cut
    short keeps its finished seeds), and print the table."""
    meta = dict(meta, seeds=list(seeds_done))
    summaries = report.summarize(results)
    report.write_csv(summaries, out / "convergence.csv")
    title = (f"{dev} | LLaMA h{preset.hidden} L{preset.layers} seq{preset.seq_len}, "
             f"{preset.steps} steps x {preset.batch_size * preset.seq_len} tokens, rank {preset.rank}, "
             f"{len(seeds_done)} seed(s) | {meta['git']}")
    report.write_plot(results, out / "convergence.png", title)
    report.write_json(out / "convergence.json", meta, results, summaries)
    print()
    print(report.format_table(summaries))
    for line in report.acceptance(summaries):
        print(line)
    print(f"wrote {out / 'convergence.csv'}, {out / 'convergence.png'}, {out / 'convergence.json'}", flush=True)


def _tuning_preset(args, preset):
    steps = args.tune_steps or max(1, preset.steps // 2)
    return dataclasses.replace(preset, steps=steps, eval_every=max(1, min(preset.eval_every, steps // 4 or 1)))


def _run_protocol(args, device, preset, corpus, over, out, progress, st, dev) -> list[Result]:
    """Tune every method with a grid (resuming the points in ``out``), then train the table rows
    over the seeds (resuming the runs in ``out``); see :mod:`.protocol`."""
    tpre = _tuning_preset(args, preset)
    tmeta = dict(_meta(st, tpre, corpus, args, "tune"), seeds=[args.seed], seeds_requested=[args.seed])
    outcomes: dict[str, protocol.TuningOutcome] = {}
    available = []
    unavailable: list[Result] = []
    for m in args.methods:
        reason = RECIPES[m].why_unavailable()
        if reason is not None:
            unavailable.append(Result(m, f"unavailable: {reason}", seed=args.seed))
            print(f"{m}: unavailable: {reason}")
        else:
            available.append(m)
    tbatches = None
    for m in available:
        if not protocol.tunes(RECIPES[m]):
            continue
        if tbatches is None:
            tbatches = Batches(corpus.train, corpus.tune, tpre, args.seed)
            warm_up(tpre, tbatches, device, args.seed)
        if args.fresh:
            (out / f"convergence_tuning-{m}.json").unlink(missing_ok=True)
        try:
            oc = protocol.tune_method(
                m, preset, lambda hp, m=m: _train(m, tpre, tbatches, device, args.seed, hp, progress), out, tmeta,
                args.budget, args.grid_values)
        except ValueError as e:
            raise SystemExit(f"--grid: {e}") from None
        outcomes[m] = oc
        b = tuning.best(oc.results)
        print(f"{m}: tuned {len(oc.points)} points at {tpre.steps} steps, best {oc.best}"
              + (f" at {b.final_val_loss:.4f}" if b else "")
              + ("" if oc.complete else " (the budget ran out with the best point on an edge)"), flush=True)
    rows = [row for m in available for row in protocol.rows_for(m, preset, outcomes.get(m))]
    meta = dict(_meta(st, preset, corpus, args, "val"), protocol={
        "tuning_steps": tpre.steps, "budget": args.budget,
        "tuned": {m: {"best": oc.best, "points": len(oc.points), "complete": oc.complete} for m, oc in outcomes.items()},
        "rows": {name: hp for name, hp in rows}})
    done, old_protocol, gits = ([], {}, {}) if args.fresh else protocol.load_done(out / "convergence.json", meta)
    # Rows of methods this run does not train (an earlier run's subset) stay in the table.
    names = {name for name, _ in rows} | {r.method for r in unavailable}
    kept_rows = {k: v for k, v in old_protocol.get("rows", {}).items() if k not in names}
    kept = [r for r in done if r.method in kept_rows]
    meta["protocol"]["rows"] = {**kept_rows, **meta["protocol"]["rows"]}
    meta["protocol"]["tuned"] = {**{k: v for k, v in old_protocol.get("tuned", {}).items() if k not in args.methods},
                                 **meta["protocol"]["tuned"]}
    results: list[Result] = kept + list(unavailable)
    # The code version of every run: this process's stamp, or the one a resumed run carried.
    by_run = {protocol.run_key(r.method, r.seed): gits.get(protocol.run_key(r.method, r.seed), st["git"])
              for r in kept}

    def stamp_runs():
        meta["git_by_run"] = by_run
        meta["git"] = " + ".join(dict.fromkeys(by_run.values())) or st["git"]
    seeds = list(range(args.seed, args.seed + args.seeds))
    for seed in seeds:
        batches = None
        for name, hp in rows:
            old = next((r for r in done if r.method == name and r.seed == seed and r.status == "ok"
                        and protocol.same_hp(r.recipe, hp)), None)
            if old is not None:
                results.append(old)
                by_run[protocol.run_key(name, seed)] = gits.get(protocol.run_key(name, seed), st["git"])
                continue
            if batches is None:
                batches = Batches(corpus.train, corpus.val, preset, seed)
                warm_up(preset, batches, device, seed)
            r = _train(base_of(name), preset, batches, device, seed, hp, progress)
            r.method = name
            results.append(r)
            by_run[protocol.run_key(name, seed)] = st["git"]
            stamp_runs()
            _write_table(results, out, meta, preset, dev, seeds[:seeds.index(seed) + 1])
    stamp_runs()
    _write_table(results, out, meta, preset, dev, seeds)
    return results


def _run_tuning(args, device, preset, corpus, over, out, progress, st) -> list[Result]:
    m = args.tune
    reason = RECIPES[m].why_unavailable()
    if reason is not None:
        raise SystemExit(f"--tune {m}: unavailable: {reason}")
    paper = RECIPES[m].resolve(preset)
    try:
        axes = {k: protocol.axis_values(v, paper[k]) if k in paper else v for k, v in args.grid_values.items()}
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--grid: {e}") from None
    points = tuning.grid_points(axes)
    meta = _meta(st, preset, corpus, args, "tune")
    batches = Batches(corpus.train, corpus.tune, preset, args.seed)
    warm_up(preset, batches, device, args.seed)
    results = []
    for pt in points:
        try:
            hp = RECIPES[m].resolve(preset, {**over.get(m, {}), **pt})
        except ValueError as e:
            raise SystemExit(f"--grid: {e}") from None
        results.append(_train(m, preset, batches, device, args.seed, hp, progress))
    csv_path, json_path = tuning.write(out, m, meta, axes, points, results)
    b = tuning.best(results)
    print()
    for pt, r in zip(points, results):
        print(f"{m} {pt}: tuning-split loss {r.final_val_loss:.4f} ({r.status})")
    print(f"best: {points[results.index(b)] if b else None}" + (f" at {b.final_val_loss:.4f}" if b else ""))
    print(f"wrote {csv_path}, {json_path}")
    return results


def main(argv=None) -> int:
    results, _ = run(argv)
    return 1 if any(r.status.startswith("failed") for r in results) else 0
