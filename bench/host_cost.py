"""Host cost of one non-refresh optimizer step on a stack of tiny weights.

The stack: 4 LLaMA-shaped layers x 7 linears (q, k, v, o: ``d x d``; gate, up: ``f x d``;
down: ``d x f``) at tiny sizes (``d=64, f=172``), rank 8, so host time dominates. Every
optimizer of the step suite's registry (``bench/optimizers.py``: ours, the official
packages where importable, torch's AdamW ``foreach`` and ``fused``) plus ours with
``foreach=False`` (one op call per parameter, the path the bucketed step is
bit-identical to) steps its own copy of the same weights and gradients. Before each timed
step every parameter gets a new gradient tensor (outside the timing), as backward makes
after ``zero_grad()``; ``--keep-grads`` keeps the same tensors instead (as with
``zero_grad(set_to_none=False)`` or DDP/FSDP gradient buckets). Projector refreshes are off (``update_proj_gap=10^9`` after the first step).
Per optimizer, for one non-refresh step after three warm-up steps:

- ``lk ops``: ``lowrank_kernels`` op calls made by ``step()`` itself, counted by a
  ``TorchDispatchMode`` (:class:`CountOps`) at the top level: a custom op counts once;
  what runs inside it (its router's validation, the backend's own aten calls) is not seen
  there;
- ``aten``: the aten op calls made by ``step()`` at the same top level (same mode;
  ``aten._local_scalar_dense`` included: each is one host read of a tensor value, listed
  apart as ``reads``);
- ``all aten``: every aten op the profiler records during the step (``torch.profiler``,
  CPU activity), nested ones included: those inside the custom ops (validation, the C++
  kernel's own ``at::`` calls) and composite ones (``aten::to``, views);
- the median wall time of ``step()`` over many repetitions, the optimizers interleaved
  round by round (a loaded machine slows all of them alike), with the 20th/80th
  percentiles, and the median CPU time of the process during ``step()`` (``cpu ms``:
  ``time.process_time``, all threads; less disturbed than the wall time when other jobs
  share the cores, and equal to it on an idle machine with one thread).

``python -m bench.host_cost [--rounds N] [--reps N] [--backend cpp|reference|triton]
[--threads N] [--out FILE]``; ``rows(...)`` returns plain dicts (the step suite,
``python -m bench --suite step``, adds them as its ``host_cost`` rows).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

D, F, LAYERS, RANK = 64, 172, 4, 8
#: the host-cost targets of every projecting optimizer on CPU (op calls per non-refresh step;
#: its CPU time at most torch.optim.AdamW(foreach=True)'s).
MAX_LK_OPS, MAX_ATEN_OPS = 4, 30
#: provider -> optimizer registry name (lowrank_kernels.optim.registry) of the optimizers with these goals.
TARGET_NAMES = {
    "ours-GaLoreAdamW": "galore", "ours-DCTAdamW": "dct", "ours-QGaLoreAdamW": "qgalore",
    "ours-APOLLOAdamW": "apollo", "ours-APOLLO-Mini": "apollo-mini", "ours-FrugalAdamW": "frugal",
    "ours-GradNormLoRPAdamW": "gradnormlorp", "ours-GaLoreAdafactor": "adafactor",
    "ours-FiraAdamW": "fira", "ours-FiraAdamW-DCT": "fira-dct", "ours-Trion": "trion",
}
TARGETS = tuple(TARGET_NAMES)
#: the optimizers also held to MAX_ATEN_OPS top-level aten ops in the step suite's targets.
ATEN_TARGETS = ("ours-GaLoreAdamW", "ours-DCTAdamW")
BASELINE = "torch-adamw-foreach"
#: ours with one op call per parameter (group key foreach=False): the bucketing's reference.
#: provider -> optimizer registry name.
PER_PARAM = {f"{name} per-param": reg for name, reg in TARGET_NAMES.items()}


def stack_shapes(d: int = D, f: int = F, layers: int = LAYERS) -> List[tuple]:
    """The 28 weight shapes: per layer q, k, v, o, gate, up, down."""
    return [s for _ in range(layers) for s in ((d, d),) * 4 + ((f, d), (f, d), (d, f))]


#: ops that read a tensor's value into Python (``.item()``, ``int(t)``, ``bool(t)``, ...).
HOST_READS = ("aten._local_scalar_dense", "aten.item")


class CountOps(TorchDispatchMode):
    """Counts every op that reaches the Python dispatcher at the top level (what a custom op
    runs inside is not seen: the mode is off while it runs).

    ``counts`` maps each op's qualified name (``"aten.add"``, ``"lowrank_kernels.adam_update"``)
    to its number of calls (``names`` is the same dict); ``custom`` and ``aten`` are the
    calls of the two namespaces, :meth:`total` those of any namespace. ``forbid``: op names
    whose call raises ``AssertionError`` instead of running, e.g. :data:`HOST_READS` for a
    step that must not read a tensor value on the host.

    The one op-counting mode of the project: the tests use it through
    ``python_tests/_opcount.py``.
    """

    def __init__(self, forbid=()):
        super().__init__()
        self.custom = 0
        self.aten = 0
        self.counts: Dict[str, int] = {}
        self.forbid = frozenset(forbid)

    @property
    def names(self) -> Dict[str, int]:
        """Calls per qualified op name (the same dict as ``counts``)."""
        return self.counts

    @property
    def reads(self) -> int:
        """Host reads of a tensor value (``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ...)."""
        return self.counts.get("aten._local_scalar_dense", 0)

    def total(self, namespace: str) -> int:
        """Calls of the ops of ``namespace`` (e.g. ``"aten"``, ``"lowrank_kernels"``)."""
        prefix = namespace + "."
        return sum(c for k, c in self.counts.items() if k.startswith(prefix))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.forbid:
            what = "a host read of a tensor value" if name in HOST_READS else "a forbidden op call"
            raise AssertionError(f"{what}: {func}")
        ns = func.namespace
        if ns == "lowrank_kernels":
            self.custom += 1
        elif ns == "aten":
            self.aten += 1
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def profiled_ops(step) -> Tuple[int, int]:
    """``(aten, lowrank_kernels)`` op calls the profiler records during ``step()``, nested included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = [e.name for e in prof.events()]
    return sum(n.startswith("aten::") for n in names), sum(n.startswith("lowrank_kernels::") for n in names)


def make_optimizer_names() -> List[str]:
    """Every row name :func:`make_optimizers` can build (the step suite's providers and the per-parameter rows)."""
    from . import optimizers as O

    return list(O.OPTIMIZERS) + list(PER_PARAM)


def make_optimizers(device="cpu", dtype=torch.float32, names: Optional[List[str]] = None):
    """``({name: (optimizer, params)}, {name: why not built})``, each optimizer on its own
    copy of the same weights and gradients."""
    from . import optimizers as O

    gen = torch.Generator().manual_seed(0)
    shapes = stack_shapes()
    w0 = [0.02 * torch.randn(s, generator=gen) for s in shapes]
    g0 = [torch.randn(s, generator=gen) for s in shapes]

    def params():
        ps = [torch.nn.Parameter(w.to(device, dtype).clone()) for w in w0]
        for p, g in zip(ps, g0):
            p.grad = g.to(device, dtype).clone()
        return ps

    builders = {name: builder for name, (builder, _) in O.OPTIMIZERS.items()}
    for name, registered in PER_PARAM.items():
        builders[name] = O._ours(registered, foreach=False)
    out, skipped = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, builder in builders.items():
            if names is not None and name not in names:
                continue
            ps = params()
            try:
                out[name] = (builder(ps, RANK, O.BIG_GAP), ps)
            except O.Unavailable as e:
                skipped[name] = str(e)
            except Exception as e:  # noqa: BLE001 - reported, the others still run
                skipped[name] = f"constructor failed: {type(e).__name__}: {e}"[:200]
    return out, skipped


def rows(rounds: int = 30, reps: int = 5, backend: Optional[str] = "cpp", names: Optional[List[str]] = None,
         profile_ops: bool = True, device="cpu", fresh_grads: bool = True) -> List[dict]:
    """One row per optimizer: op counts of a non-refresh step and step-time percentiles (ms).

    ``fresh_grads``: before each timed step every parameter gets a new gradient tensor (a
    copy of its fixed gradient, made outside the timing), as after ``zero_grad()`` (which
    sets gradients to None) and ``backward()``; False keeps the same gradient tensors.

    ``backend`` None: the automatic choice of each op (C++ on CPU, Triton on CUDA). On CUDA
    each timed batch of ``reps`` steps ends with a synchronization (the time is the step's
    wall time, host and device). A row whose optimizer could not be built or stepped has
    ``skipped`` (the reason) set.
    """
    import contextlib

    from lowrank_kernels.ops import use_backend

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opts, skipped = make_optimizers(device=device, names=names)
    result = []
    counts, profiled = {}, {}
    with use_backend(backend) if backend else contextlib.nullcontext():
        for name, (opt, _) in list(opts.items()):
            try:
                for _ in range(3):  # the first step refreshes; then warm up
                    opt.step()
                with CountOps() as mode:
                    opt.step()
                counts[name] = mode
                if profile_ops:
                    profiled[name] = profiled_ops(opt.step)
            except Exception as e:  # noqa: BLE001 - reported, the others still run
                skipped[name] = f"step failed: {type(e).__name__}: {e}"[:200]
                del opts[name]
        times = {name: [] for name in opts}
        cpu_times = {name: [] for name in opts}
        grads = {name: [(p, p.grad) for p in ps] for name, (_, ps) in opts.items()}
        for _ in range(rounds):  # interleaved: every optimizer once per round
            for name, (opt, _) in opts.items():
                total = cpu = 0.0
                for _ in range(reps):
                    if fresh_grads:  # new gradient tensors, as backward makes after zero_grad() (untimed)
                        for p, g in grads[name]:
                            p.grad = g.clone()
                    sync()
                    c0, t0 = time.process_time(), time.perf_counter()
                    opt.step()
                    sync()
                    total += time.perf_counter() - t0
                    cpu += time.process_time() - c0
                times[name].append(total * 1e3 / reps)
                cpu_times[name].append(cpu * 1e3 / reps)
    for name, (opt, _) in opts.items():
        ts = times[name]
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        c = counts[name]
        row = dict(optimizer=name, backend=backend or "auto", n_weights=len(stack_shapes()), lk_ops=c.custom, aten_ops=c.aten,
                   host_reads=c.reads, median_ms=round(statistics.median(ts), 4), p20_ms=round(q[0], 4),
                   p80_ms=round(q[3], 4), cpu_ms=round(statistics.median(cpu_times[name]), 4), skipped="")
        if name in profiled:
            row["aten_all"], row["lk_all"] = profiled[name]
        result.append(row)
    result += [dict(optimizer=name, backend=backend or "auto", skipped=why) for name, why in skipped.items()]
    return result


def verdicts(result: List[dict]) -> List[str]:
    """The CPU targets of every projecting optimizer (:data:`TARGETS`), measured against this run's rows."""
    by = {r["optimizer"]: r for r in result if not r.get("skipped")}
    base = by.get(BASELINE)
    lines = []
    for name in TARGETS:
        r = by.get(name)
        if r is None:
            lines.append(f"{name}: not measured")
            continue
        counts_ok = r["lk_ops"] <= MAX_LK_OPS and r["aten_ops"] <= MAX_ATEN_OPS
        lines.append(f"{name}: {r['lk_ops']} lk ops (goal <= {MAX_LK_OPS}), {r['aten_ops']} aten ops "
                     f"(goal <= {MAX_ATEN_OPS}): {'met' if counts_ok else 'missed'}")
        if base is not None:
            for what, col in (("wall", "median_ms"), ("CPU", "cpu_ms")):
                ratio = r[col] / base[col]
                lines.append(f"{name}: step {what} time {r[col]:.3f} ms vs {BASELINE} {base[col]:.3f} ms = {ratio:.2f}x "
                             f"(goal <= 1.0x): {'met' if ratio <= 1.0 else 'missed'}")
    return lines


def format_table(result: List[dict], header: str = "") -> str:
    lines = [header] if header else []
    lines.append(f"{'optimizer':28s} {'lk ops':>6s} {'aten':>5s} {'reads':>5s} {'all aten':>8s} {'median ms':>10s} "
                 f"{'p20':>8s} {'p80':>8s} {'cpu ms':>8s}")
    for r in result:
        if r.get("skipped"):
            lines.append(f"{r['optimizer']:28s} skipped: {r['skipped']}")
            continue
        lines.append(f"{r['optimizer']:28s} {r['lk_ops']:6d} {r['aten_ops']:5d} {r['host_reads']:5d} "
                     f"{r.get('aten_all', -1):8d} {r['median_ms']:10.3f} {r['p20_ms']:8.3f} {r['p80_ms']:8.3f} "
                     f"{r['cpu_ms']:8.3f}")
    lines.append("")
    lines += verdicts(result)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="cpp", choices=("cpp", "reference", "triton"))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="also write the table, with its stamps, to this file")
    ap.add_argument("--keep-grads", action="store_true", help="the same gradient tensors at every step")
    ap.add_argument("--only", default=None, metavar="NAMES",
                    help="comma-separated optimizer rows to run (the baseline torch-adamw-foreach is always added)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = None
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        known = set(make_optimizer_names())
        bad = [n for n in names if n not in known]
        if bad:
            ap.error(f"--only: unknown rows {bad}; choose from {', '.join(sorted(known))}")
        names = [BASELINE] + [n for n in names if n != BASELINE]
    out = rows(args.rounds, args.reps, args.backend, names=names, fresh_grads=not args.keep_grads)
    n = next((r["n_weights"] for r in out if not r.get("skipped")), len(stack_shapes()))
    header = (f"non-refresh step, {n} weights (4 layers x 7, d={D}, f={F}, rank {RANK}), fp32, "
              f"{'the same gradient tensors' if args.keep_grads else 'new gradient tensors'} at every step, backend {args.backend}, {torch.get_num_threads()} threads, median of {args.rounds} "
              f"interleaved rounds of {args.reps} steps")
    text = format_table(out, header)
    print(text)
    if args.out:
        from . import stamps

        st = stamps.stamp("cpu")
        cmd = "python -m bench.host_cost " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out, "w") as f:
            f.write(f"# {cmd.strip()}\n# git {st['git']}, {st['timestamp']}, device: {st['device_name']}, "
                    f"torch {st['torch']}\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
