"""``python -m bench.dct_gap``: how much of the gradient the DCT and SVD projectors capture.

Two measurements behind docs/dct_gap.md, each written as JSON (``--out``, default
``bench/out/``; the committed ones are in ``bench/results/``):

``capture`` (file ``dct_gap_capture.json``): trains the demo model (``--preset``, default
``quick``) with GaLore and DCT-AdamW at their demo recipes and logs, after every
optimizer step and for every projected weight, the fraction of that step's gradient
``G`` inside the projector the optimizer just used: ``||G P^T||^2 / ||G||^2`` (right
side, ``P`` = ``r x n`` orthonormal rows) or ``||P^T G||^2 / ||G||^2`` (left side), next
to what the best rank-``r`` subspace of that same gradient holds (the SVD optimum) and what
DCT top-``r`` chosen from that same gradient holds (a refresh every step). Per weight and
refresh it records the captured fraction at the refresh step and its mean over the
interval until the next refresh, and for DCT how many of the ``r`` indices changed.

``width`` (file ``dct_gap_width.json``): the captured-energy ratio of DCT top-``r`` to
SVD-``r`` against the model width (64 .. 512, the GPU preset's hidden size) and the rank
(``r / hidden`` = 1/16 .. 1/2). At each width the demo's LLaMA shape (MLP = 2.6875 x
hidden, 32-wide heads) at reduced depth and batch (``--layers``, ``--batch``, ``--seq``:
what a CPU can afford) is trained with AdamW for ``--train-steps`` steps on the
Python-stdlib corpus, then the gradients of ``--batches`` fresh batches are scored:
SVD-``r``, DCT-II rows top-``r`` with L1 and L2 scores (ours), the columns of the same
matrix with L1 scores (the official code's default ``sim_type="matmul"`` path), and a
random orthonormal ``r``-subspace.

Every projected weight of these models has its smaller side equal to ``hidden`` (q, k, v,
o: ``h x h``; gate, up: ``2.7h x h``, right side; down: ``h x 2.7h``, left side), so the
projected side's size is the width.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys
import time

import torch

from . import stamps
from .convergence.data import Batches, load_corpus
from .convergence.presets import PRESETS, Preset
from .convergence.recipes import RECIPES
from .convergence.training import build_model, lm_loss, lr_lambda

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out"


# ----------------------------------------------------------------------------- energies

def side_of(shape) -> str:
    """The side ``proj_type="std"`` projects: right (``G P^T``) when ``m >= n``, else left."""
    m, n = shape
    return "right" if m >= n else "left"


def captured(grad: torch.Tensor, rows: torch.Tensor, side: str) -> float:
    """``||G P^T||^2 / ||G||^2`` (right) or ``||P G||^2 / ||G||^2`` (left) for ``rows``
    = ``P``, ``r x s`` with orthonormal rows (``s`` = n right, m left)."""
    g = grad.double()
    p = rows.double()
    low = g @ p.T if side == "right" else p @ g
    total = float(g.pow(2).sum())
    return float(low.pow(2).sum()) / total if total > 0 else float("nan")


def svd_energy(grad: torch.Tensor, r: int) -> float:
    """The largest fraction any rank-``r`` projector can capture: ``sum(top r sigma^2) / ||G||^2``."""
    s = torch.linalg.svdvals(grad.double())
    e = s.pow(2)
    return float(e[:r].sum() / e.sum())


def dct_rows(size: int, kind: str = "rows") -> torch.Tensor:
    """The candidate basis vectors, one per row, of the orthonormal DCT-II matrix ``C``:
    ``"rows"``: the rows of ``C`` (the cosine waveforms: ours, and the official code's
    ``sim_type="makhoul"``); ``"cols"``: the columns of ``C`` (the official code's default
    ``sim_type="matmul"`` path scores ``G @ C`` / ``C^T @ G`` with ``C`` its ``dct3_matrix``)."""
    k = torch.arange(size, dtype=torch.float64)
    c = math.sqrt(2.0 / size) * torch.cos(math.pi * k[:, None] * (2 * k[None, :] + 1) / (2 * size))
    c[0] *= math.sqrt(0.5)
    return c if kind == "rows" else c.T.contiguous()


def dct_topk(grad: torch.Tensor, r: int, side: str, norm: int = 1, kind: str = "rows",
             basis: torch.Tensor | None = None) -> torch.Tensor:
    """The indices of the ``r`` basis vectors (rows of :func:`dct_rows`) with the largest
    ``norm``-norm alignment scores: column norms of ``G B^T`` (right), row norms of ``B G`` (left)."""
    g = grad.double()
    b = basis if basis is not None else dct_rows(g.shape[1] if side == "right" else g.shape[0], kind)
    s = g @ b.T if side == "right" else b @ g
    scores = s.norm(p=norm, dim=0 if side == "right" else 1)
    return torch.topk(scores, r).indices


def random_rows(size: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``r``-dimensional subspace of R^size, as ``r`` orthonormal rows."""
    q, _ = torch.linalg.qr(torch.randn(size, r, dtype=torch.float64, generator=gen))
    return q.T.contiguous()


def energies(grad: torch.Tensor, ranks: list[int], gen: torch.Generator, bases: dict) -> dict:
    """``{r: {candidate: captured fraction of grad}}`` for every rank in ``ranks``."""
    side = side_of(grad.shape)
    size = grad.shape[1] if side == "right" else grad.shape[0]
    e = torch.linalg.svdvals(grad.double()).pow(2)
    out = {}
    for r in ranks:
        row = {"svd": float(e[:r].sum() / e.sum())}
        for name, (kind, norm) in (("dct_l1", ("rows", 1)), ("dct_l2", ("rows", 2)), ("dct_cols_l1", ("cols", 1))):
            b = bases[(size, kind)]
            row[name] = captured(grad, b[dct_topk(grad, r, side, norm, basis=b)], side)
        row["random"] = captured(grad, random_rows(size, r, gen), side)
        out[r] = row
    return out


# ----------------------------------------------------------------------------- capture log

def projector_rows(optimizer, p) -> tuple[torch.Tensor, str, torch.Tensor | None] | None:
    """``(P as r x s orthonormal rows, side, DCT indices or None)`` of ``p``'s current
    projector in a GaLore or DCT-AdamW optimizer, or None when ``p`` is not projected."""
    from lowrank_kernels import ops

    state = optimizer.state.get(p, {})
    if "indices" in state:  # DCT-AdamW: rows of the shared basis
        side = optimizer._side(state)
        size = p.shape[1] if side == "right" else p.shape[0]
        idx = state["indices"].long()
        return ops.dct_basis(size, torch.float64, p.device)[idx], side, idx.clone()
    proj = state.get("projector")
    if isinstance(proj, torch.Tensor) and proj.dim() == 2 and "side" in state:
        side = optimizer._side(state)
        if side == "right":  # r x n
            return proj.double(), side, None
        if side == "left":  # m x r
            return proj.double().T.contiguous(), side, None
    return None


def capture_run(method: str, preset: Preset, batches: Batches, seed: int, steps: int,
                overrides: dict | None = None, progress: bool = True) -> dict:
    """Train ``method`` for ``steps`` steps and log, per projected weight and step, the captured
    fraction of the step's gradient: the projector used (``used``), the SVD optimum (``svd``)
    and DCT top-r chosen from that gradient (``dct_fresh``, L1 scores)."""
    recipe = RECIPES[method]
    hp = recipe.resolve(preset, overrides)
    model = build_model(preset, seed, torch.device("cpu"))
    opt = recipe.build(model, preset, hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(preset, preset.steps))
    names = {p: n for n, p in model.named_parameters()}
    log: dict[str, dict] = {}
    t0 = time.perf_counter()
    for step in range(steps):
        loss = lm_loss(model, batches.train_batch(step))
        loss.backward()
        opt.step()
        for p in names:
            if p.grad is None:
                continue
            got = projector_rows(opt, p)
            if got is None:
                continue
            rows, side, idx = got
            g = p.grad.detach()
            r = rows.shape[0]
            entry = log.setdefault(names[p], {"shape": list(p.shape), "side": side, "rank": r, "steps": [],
                                              "used": [], "svd": [], "dct_fresh": [], "indices": []})
            entry["steps"].append(step + 1)
            entry["used"].append(captured(g, rows, side))
            entry["svd"].append(svd_energy(g, r))
            entry["dct_fresh"].append(captured(g, dct_rows(rows.shape[1])[dct_topk(g, r, side, 1)], side))
            entry["indices"].append(None if idx is None else idx.tolist())
        opt.zero_grad(set_to_none=True)
        sched.step()
        if progress and (step + 1) % 10 == 0:
            print(f"  {method} step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    return {"method": method, "recipe": hp, "per_weight": log}


def per_refresh(entry: dict, gap: int) -> list[dict]:
    """Per refresh interval of one weight: its step, the captured fraction at the refresh, the mean
    over the interval, the SVD optimum's mean, and (DCT) how many indices changed at the refresh."""
    out = []
    steps = entry["steps"]
    for start in range(0, len(steps), gap):
        sl = slice(start, start + gap)
        rec = {"step": steps[start], "at_refresh": entry["used"][start],
               "interval_mean": statistics.fmean(entry["used"][sl]),
               "svd_mean": statistics.fmean(entry["svd"][sl]),
               "dct_fresh_mean": statistics.fmean(entry["dct_fresh"][sl])}
        idx = entry["indices"]
        if idx[start] is not None and start > 0:
            rec["indices_changed"] = len(set(idx[start]) - set(idx[start - 1]))
        out.append(rec)
    return out


def summarize_capture(run: dict, gap: int) -> list[dict]:
    """Per refresh interval, the mean over weights of :func:`per_refresh`'s numbers."""
    per = [per_refresh(e, gap) for e in run["per_weight"].values()]
    rows = []
    for k in range(len(per[0])):
        recs = [p[k] for p in per]
        row = {"step": recs[0]["step"]}
        for key in ("at_refresh", "interval_mean", "svd_mean", "dct_fresh_mean", "indices_changed"):
            vals = [r[key] for r in recs if key in r]
            if vals:
                row[key] = statistics.fmean(vals)
        rows.append(row)
    return rows


def compact_capture(result: dict) -> dict:
    """The capture result as written: fractions rounded to 5 decimals, and the DCT index sets only at
    the steps where they changed (``index_sets``: ``[[step, indices], ...]``) instead of every step."""
    for run in result["runs"]:
        for e in run["per_weight"].values():
            for k in ("used", "svd", "dct_fresh"):
                e[k] = [round(x, 5) for x in e[k]]
            if "indices" in e:
                sets, prev = [], None
                for st, idx in zip(e["steps"], e.pop("indices")):
                    if idx is not None and idx != prev:
                        sets.append([st, idx])
                    prev = idx
                e["index_sets"] = sets
    return result


def run_capture(args) -> dict:
    preset = PRESETS[args.preset]
    if args.steps:
        preset = dataclasses.replace(preset, steps=args.steps)
    corpus = load_corpus(args.data)
    batches = Batches(corpus.train, corpus.val, preset, args.seed)
    runs = []
    for m in args.methods.split(","):
        print(f"capture: {m} on {preset.name}, {preset.steps} steps, rank {preset.rank}, gap {preset.gap}",
              file=sys.stderr)
        run = capture_run(m, preset, batches, args.seed, preset.steps)
        run["per_refresh"] = summarize_capture(run, preset.gap)
        runs.append(run)
    return {"kind": "capture", "preset": dataclasses.asdict(preset), "data": corpus.desc, "seed": args.seed,
            "runs": runs}


# ----------------------------------------------------------------------------- width study

def width_config(hidden: int, layers: int, seq: int, batch: int, steps: int) -> Preset:
    """The demo's LLaMA shape at ``hidden`` (MLP 2.6875 x hidden, rounded to 8; 32-wide heads);
    ``steps`` batches of training data (the training steps and the scored batches)."""
    inter = int(round(2.6875 * hidden / 8)) * 8
    return Preset(f"w{hidden}", hidden=hidden, intermediate=inter, layers=layers, heads=max(1, hidden // 32),
                  seq_len=seq, batch_size=batch, steps=steps, warmup_frac=0.1, eval_every=steps, eval_batches=1,
                  rank=hidden // 4, gap=steps)


def run_width(args) -> dict:
    widths = [int(w) for w in args.widths.split(",")]
    fracs = [float(eval(f, {}, {})) for f in args.rank_fracs.split(",")]  # "1/16" -> 0.0625 (digits only)
    corpus = load_corpus(args.data)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for h in widths:
        preset = width_config(h, args.layers, args.seq, args.batch, args.train_steps + args.batches)
        batches = Batches(corpus.train, corpus.val, preset, args.seed)
        model = build_model(preset, args.seed, torch.device("cpu"))
        opt = torch.optim.AdamW(model.parameters(), lr=args.train_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(preset, args.train_steps))
        t0 = time.perf_counter()
        for step in range(args.train_steps):
            loss = lm_loss(model, batches.train_batch(step))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        print(f"width {h}: trained {args.train_steps} steps, loss {loss.item():.3f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        bases = {(h, k): dct_rows(h, k) for k in ("rows", "cols")}
        acc: dict[tuple, list] = {}
        for b in range(args.batches):
            lm_loss(model, batches.train_batch(args.train_steps + b)).backward()
            for name, p in model.named_parameters():
                if p.grad is None or p.dim() != 2 or not any(t in name for t in ("self_attn", "mlp")):
                    continue
                ranks = {f: max(1, int(round(f * h))) for f in fracs}
                got = energies(p.grad.detach(), sorted(set(ranks.values())), gen, bases)
                for f, r in ranks.items():
                    for k, v in got[r].items():
                        acc.setdefault((f, r, k), []).append(v)
            model.zero_grad(set_to_none=True)
        for f in fracs:
            r = max(1, int(round(f * h)))
            row = {"hidden": h, "rank": r, "rank_frac": f, "n_grads": len(acc[(f, r, "svd")])}
            for k in ("svd", "dct_l1", "dct_l2", "dct_cols_l1", "random"):
                row[k] = statistics.fmean(acc[(f, r, k)])
            row["dct_l1_over_svd"] = row["dct_l1"] / row["svd"]
            rows.append(row)
            print(f"  h {h} r {r:4d}: svd {row['svd']:.3f} dct-L1 {row['dct_l1']:.3f} dct-L2 {row['dct_l2']:.3f} "
                  f"dct-cols {row['dct_cols_l1']:.3f} random {row['random']:.3f} "
                  f"ratio {row['dct_l1_over_svd']:.3f}", file=sys.stderr, flush=True)
        del model, opt
    return {"kind": "width", "data": corpus.desc, "seed": args.seed, "layers": args.layers, "seq": args.seq,
            "batch": args.batch, "train_steps": args.train_steps, "train_lr": args.train_lr,
            "grad_batches": args.batches, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dct_gap", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("capture", help="log captured fractions while GaLore and DCT-AdamW train")
    c.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    c.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    c.add_argument("--methods", default="galore,dct")
    w = sub.add_parser("width", help="DCT top-r vs SVD-r captured energy against width and rank")
    w.add_argument("--widths", default="64,128,256,512")
    w.add_argument("--rank-fracs", default="1/16,1/8,1/4,1/2")
    w.add_argument("--layers", type=int, default=2)
    w.add_argument("--seq", type=int, default=64)
    w.add_argument("--batch", type=int, default=8)
    w.add_argument("--train-steps", type=int, default=60, help="AdamW steps before the gradients are scored")
    w.add_argument("--train-lr", type=float, default=2e-3)
    w.add_argument("--batches", type=int, default=2, help="gradients scored per weight")
    for p in (c, w):
        p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--out", default=str(DEFAULT_OUT))
        p.add_argument("--tag", default="", help="suffix of the output file name (dct_gap_<what><tag>.json)")
    args = ap.parse_args(argv)
    if args.what == "width":
        for f in args.rank_fracs.split(","):
            if not all(ch in "0123456789./" for ch in f.strip()) or not f.strip():
                ap.error(f"--rank-fracs: expected numbers or fractions like 1/8, got {f!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    st = stamps.stamp(torch.device("cpu"))
    result = run_capture(args) if args.what == "capture" else run_width(args)
    result.update({"git": st["git"], "device": st["device_name"], "torch": st["torch"], "timestamp": st["timestamp"],
                   "command": "python -m bench.dct_gap " + " ".join(sys.argv[1:] if argv is None else argv)})
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dct_gap_{args.what}{args.tag}.json"
    if args.what == "capture":
        result = compact_capture(result)
    path.write_text(json.dumps(result, indent=None if args.what == "capture" else 1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
