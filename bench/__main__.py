"""``python -m bench``: every kernel and optimizer of lowrank_kernels against the baselines, in one run.

Suites (``--suite``, comma-separated or ``all``):

  projection  fused project-Adam-backproject step vs unfused PyTorch (galore-torch's way)
  refresh     projector refresh: exact SVD, torch.svd_lowrank, unfused DCT scoring, ours
  step        optimizer step on a stack of LLaMA-1B-shaped layers: torch AdamW, the
              official packages, ours (no refresh, refresh, amortized at gap 200)
  memory      optimizer-state bytes (and, on CUDA, peak extra memory of a step)
  quant       INT4 projector bytes and step time, INT8 (QLinear) weight bytes

Every figure is a ratio against baselines measured in the same run. Results:
``<out>/<device>.csv`` (one row per measurement), ``<out>/<device>.md`` (the same as
Markdown tables), ``<out>/<device>_<plot>.png``, and a short summary printed last (the
goals with what was measured, and where the files went; ``--table`` prints every row).
``<out>`` is ``bench/out/`` by default, which git ignores: a run leaves the checkout clean.
``--update-results`` writes into ``bench/results/`` instead and regenerates
``docs/results.md`` from it (the committed results; ``make bench-results``).
Sizes: LLaMA shapes (up to 4096 x 11008) on CUDA, scaled down on CPU (the header says
how). A measurement that cannot be made (an API not there yet, a package not installed)
is listed as skipped with the reason. ``--keep`` reruns only the chosen suites and keeps
the other suites' rows (with their own stamps), tables and targets from the existing
``<device>.csv``/``.md``; the header says so.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

SUITES = ("projection", "refresh", "step", "memory", "quant")
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out"  # ignored by git (.gitignore)
RESULTS_DIR = BENCH_DIR / "results"  # committed; written only with --update-results
# OpenMP threads that spin while waiting make a busy (shared, oversubscribed) CPU many times
# slower; sleeping waiters cost little otherwise. Read when torch loads, so set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="all", help=f"comma-separated from {', '.join(SUITES)}, or all (default)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer shapes, shorter timing loops (Triton tiles from the table, the default "
                         "unless LOWRANK_KERNELS_TRITON_AUTOTUNE=1 opts into runtime autotuning)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                    help="parameter/gradient dtype (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--out", default=None,
                    help="folder for the CSV, Markdown and plots (default: bench/out/, ignored by git)")
    ap.add_argument("--update-results", action="store_true",
                    help="write into bench/results/ (the committed results) and regenerate docs/results.md")
    ap.add_argument("--table", action="store_true", help="print every row as a wide table, not only the summary")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="stop measuring after S seconds (remaining rows are listed as skipped)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--keep", action="store_true",
                    help="keep the rows, tables and targets of the suites not run from the existing "
                         "<device>.csv/.md in --out (each kept row keeps its own stamp; the Markdown header "
                         "says which suites were kept and from which run)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.suite.split(",") if s.strip()]
    if names == ["all"]:
        names = list(SUITES)
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        ap.error(f"--suite: unknown suite(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SUITES)} or all")
    args.suites = names
    if args.update_results and args.out is not None:
        ap.error("--update-results writes into bench/results/: leave out --out")
    if args.update_results and args.tiny:
        ap.error("--update-results: a smoke run is not a result")
    args.out = str(RESULTS_DIR if args.update_results else (args.out or DEFAULT_OUT))
    return args


def _sigterm(signum, frame):  # timeout(1) sends TERM: finish like Ctrl-C, writing what was measured
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.quick and not args.tiny:  # read when the Triton kernels are first imported (lazily, after this)
        os.environ.setdefault("LOWRANK_KERNELS_TRITON_AUTOTUNE", "0")
    threads = torch.get_num_threads()
    if args.threads or args.tiny:  # the tiny smoke run: one thread, no waiting on a busy second core
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args, torch)
    finally:
        torch.set_num_threads(threads)


def _run(args, torch) -> int:
    from .harness import DTYPES, Ctx

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    log = (lambda *a, **k: print(*a, **k, flush=True))
    ctx = Ctx(device, dtype, quick=args.quick, tiny=args.tiny, out=Path(args.out), time_budget_s=args.time_budget,
              plots=not args.no_plots, log=log)
    if args.keep:
        kept = ctx.keep_previous(args.suites, SUITES)
        log(f"--keep: {', '.join(kept) or 'no'} suite(s) kept from {ctx.csv_path()}")
    try:
        old_handler = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread (embedded use)
        old_handler = None
    try:
        return _run_suites(args, ctx, log)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _run_suites(args, ctx, log) -> int:
    import torch

    from .harness import format_markdown, format_summary, format_table, measure_roofline

    import lowrank_kernels  # noqa: F401  (loads the ops and the C++ extension if built)
    from lowrank_kernels import _ext

    torch.manual_seed(0)
    log(f"python -m bench: {ctx.device_name}, {ctx.dtype_name}, mode {ctx.mode}, suites {', '.join(args.suites)}; "
        f"C++ extension {'built' if _ext.loaded() else 'not built (' + str(_ext.load_error()) + ')'}")
    t0 = time.perf_counter()
    crashed = []
    interrupted = False
    try:
        log("roofline: matmul rate and copy bandwidth")
        measure_roofline(ctx)
        for name in args.suites:
            log(f"suite {name} ({time.perf_counter() - t0:.0f} s elapsed)")
            t1 = time.perf_counter()
            try:
                importlib.import_module(f"bench.bench_{name}").run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a broken suite is reported, the others still run
                crashed.append(name)
                ctx.skip(name, "suite", "-", f"suite crashed: {type(e).__name__}: {e}"[:300])
                traceback.print_exc()
            ctx.write_csv()
            log(f"suite {name} done in {time.perf_counter() - t1:.1f} s")
    except KeyboardInterrupt as e:
        interrupted = True
        ctx.skip("bench", "run", "-", f"interrupted ({e or 'Ctrl-C'}); rows after this point were not measured")
    csv_path = ctx.write_csv()
    plots = []
    if ctx.plots:
        try:
            for name in args.suites:
                mod = importlib.import_module(f"bench.bench_{name}")
                if hasattr(mod, "plot"):
                    try:
                        plots += [p for p in (mod.plot(ctx) or []) if p]
                    except Exception as e:  # noqa: BLE001
                        print(f"plot for {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            interrupted = True
    md_path = ctx.csv_path().with_suffix(".md")
    md_path.write_text(format_markdown(ctx, args.suites))
    if args.table:
        print()
        print(format_table(ctx, args.suites))
    print()
    print(format_summary(ctx, args.suites, csv_path=csv_path, md_path=md_path, plots=plots))
    if args.update_results:
        from . import readme

        page = readme.DEFAULT_PAGE
        changed = readme.update(page, Path(args.out))
        print(f"{_shown(page)}: {'regenerated' if changed else 'unchanged'}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    if crashed:
        print(f"suite(s) crashed: {', '.join(crashed)} (see the traceback above)", file=sys.stderr)
        return 1
    if any("FAILED" in r.check for r in ctx.rows):
        return 3
    return 130 if interrupted else 0


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
