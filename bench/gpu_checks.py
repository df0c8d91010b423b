"""Correctness checks of bench/gpu_check.sh that fail on wrong numbers, not only on crashes.

``python -m bench.gpu_checks [--tiny] [--device D] [--only NAME,...] [--steps N]``

Each check prints one line ``check <name>: pass|fail <figure>`` (``skip`` where it cannot
apply); the exit status is 1 when any check fails.

``step-correctness``
    The optimizers of the bench step (``python -m bench.bench_step --gpu-check``: GaLoreAdamW
    with the randomized SVD, DCTAdamW, Q-GaLore with an INT4 projector) on one LLaMA-1B-shaped
    layer (bf16 weights 2048x2048 x4, 5461x2048 x2, 2048x5461, rank 512; both projection
    sides), on the device's own backend (Triton on CUDA). After the first step (the projector
    refresh) its state is loaded into a float64 twin (float64 weights and moments, the same
    stored projector, the reference backend), and both take ``--steps`` more steps on fresh
    gradients. The weights are compared elementwise: ``|W - W64| <= (steps / 2 + 1)
    ulp(peak) + 1e-3 path``, with ``peak`` the largest magnitude the float64 weight takes on
    the way (it bounds the bf16 rounding of each step) and ``path`` the sum of its changes'
    magnitudes (float32 arithmetic on the update); a tile left unwritten or a wrong moment
    moves a weight by many ulps (lr 5e-2: several ulps per step). The float32
    moments within ``1e-4`` relative (``1e-5`` of the tensor's largest). Then the bucketed
    step (one grouped launch per bucket) against ``foreach=False`` (one launch per
    parameter) from the same state: weights within one bf16 ulp, moments within ``1e-5``
    relative (the grouped launch takes the tile of the list's largest problem: another
    summation order, not bitwise).
``graph-refresh``
    A small MLP (float32) trained with ``capturable=True`` GaLoreAdamW / DCTAdamW
    (``update_proj_gap=3``): a whole training step (forward, backward, ``opt.step()``)
    captured in a CUDA graph after two eager warm-up steps (fresh gradients inside the
    capture, so the grouped kernels' problem tables are made during capture), then replayed
    for the non-refresh steps while the refresh steps run eagerly (``sync_step_counts()``
    first), 8 steps in all; the weights must equal a run that takes every step eagerly
    (relative difference of the change <= 1e-5). A refresh that stores its projector in new
    memory leaves the captured launch reading the old one: this check then fails. On a CPU
    (the dry run) the "graph" replays the step eagerly, so only the bookkeeping is checked.
``build-extension`` (only when named in ``--only``)
    The C++ extension the running process imports (``bench/gpu_check.sh`` runs this from a
    copy of the package holding the extension it built against the machine's torch): it
    loads, and its ``project_adam_`` on CPU tensors equals the reference's.
``second-device``
    With two CUDA devices: the same GaLoreAdamW / DCTAdamW steps and list ops (8-bit Adam,
    DCT scores) on ``cuda:1`` while ``cuda:0`` is the current device, bitwise equal to the
    run on ``cuda:0``, and the current device unchanged. One device: ``skip`` with the
    reason. The dry run compares two CPU runs.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

NAMES = ("step-correctness", "graph-refresh", "second-device")


def report(name: str, ok: Optional[bool], figure: str) -> bool:
    """Print the check's one line; ``ok=None``: skipped (counts as passed)."""
    verdict = "skip" if ok is None else ("pass" if ok else "fail")
    print(f"check {name}: {verdict} {figure}", flush=True)
    return ok is not False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at ``|x|`` (float64; at least the smallest normal's)."""
    fi = torch.finfo(dtype)
    a = x.double().abs().clamp_min(fi.tiny)
    _, e = torch.frexp(a)  # a = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.full_like(a, fi.eps), e - 1)


# --------------------------------------------------------------------------- step-correctness
def _stack_shapes(tiny: bool):
    h, i, rank = (32, 48, 4) if tiny else (2048, 5461, 512)
    return [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)], rank


def _builders(rank: int, lr: float, wd: float) -> Dict[str, Callable]:
    from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW, QGaLoreAdamW

    def group(ps, **kw):
        return [dict(params=ps, rank=rank, update_proj_gap=10**9, scale=0.25, proj_type="std", **kw)]

    return {
        "GaLoreAdamW": (GaLoreAdamW, lambda cls, ps, **kw: cls(group(ps, **kw), lr=lr, weight_decay=wd, svd="lowrank")),
        "DCTAdamW": (DCTAdamW, lambda cls, ps, **kw: cls(group(ps, **kw), lr=lr, weight_decay=wd)),
        "QGaLoreAdamW-int4": (QGaLoreAdamW, lambda cls, ps, **kw: cls(group(ps, **kw), lr=lr, weight_decay=wd,
                                                                      svd="lowrank", quant=True)),
    }


def _float64_twin_class(cls, stored: torch.dtype):
    """``cls`` for float64 weights that projects with the projector the tested run stores: DCTAdamW
    takes its basis in the weights' dtype, so its twin gathers from the ``stored``-dtype basis
    (in float64) instead of the exact float64 one."""
    from lowrank_kernels import ops
    from lowrank_kernels.optim import DCTAdamW

    if not issubclass(cls, DCTAdamW):
        return cls

    def _basis(self, p, state):
        m, n = p.shape
        size = n if self._side(state) == "right" else m
        return ops.dct_basis(size, stored, p.device).to(torch.float64)

    return type(cls.__name__ + "Float64Twin", (cls,), {"_basis": _basis})


def _moment_keys(state) -> List[str]:
    return [k for k in ("exp_avg", "exp_avg_sq") if isinstance(state.get(k), torch.Tensor)
            and state[k].is_floating_point()]


def _close_ratio(got: torch.Tensor, want: torch.Tensor, rtol: float, atol_frac: float) -> float:
    """max |got - want| / (rtol |want| + atol_frac max|want| + tiny): <= 1 passes."""
    g, w = got.double(), want.double()
    atol = atol_frac * float(w.abs().max()) if w.numel() else 0.0
    return float(((g - w).abs() / (rtol * w.abs() + atol + 1e-30)).max()) if w.numel() else 0.0


def check_step_correctness(device: torch.device, tiny: bool, steps: int, optimizers=None) -> bool:
    """``optimizers``: names of :func:`_builders` to check (default: all)."""
    from lowrank_kernels import ops
    from lowrank_kernels.ops import _registry as reg

    shapes, rank = _stack_shapes(tiny)
    dtype = torch.bfloat16
    lr, wd = 5e-2, 0.1
    gen = torch.Generator(device=device).manual_seed(7)
    init = [(0.02 * torch.randn(m, n, device=device, generator=gen)).to(dtype) for m, n in shapes]
    grads = [[torch.randn(m, n, device=device, generator=gen).to(dtype) for m, n in shapes]
             for _ in range(steps + 1)]
    backend = reg.resolve_backend(reg.OPS["projection_foreach_project_update_backproject"], device)
    worst_ref, worst_pp, bitwise, total, notes, ok = 0.0, 0.0, 0, 0, [], True
    for name, (cls, make) in _builders(rank, lr, wd).items():
        if optimizers is not None and name not in optimizers:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ws = [torch.nn.Parameter(w.clone()) for w in init]
                opt = make(cls, ws)
                for p, g in zip(ws, grads[0]):
                    p.grad = g
                opt.step()  # the refresh (projector from the gradient), on the tested backend
                sd = copy.deepcopy(opt.state_dict())
                w1 = [p.detach().clone() for p in ws]
                # the float64 twin: same state, float64 weights and moments, reference backend
                w64 = [torch.nn.Parameter(w.double()) for w in w1]
                twin = make(_float64_twin_class(cls, dtype), w64)
                twin.load_state_dict(copy.deepcopy(sd))
                for p in w64:
                    st = twin.state[p]
                    for k in _moment_keys(st):
                        st[k] = st[k].double()
                # the per-parameter path from the same state
                wpp = [torch.nn.Parameter(w.clone()) for w in w1]
                per_param = make(cls, wpp, foreach=False)
                per_param.load_state_dict(copy.deepcopy(sd))
                # along the float64 trajectory: each weight's largest magnitude (which bounds
                # the bf16 rounding of every step) and the length of its path (sum of |changes|)
                peak = [w.double().abs() for w in w1]
                path = [torch.zeros_like(x) for x in peak]
                for t in range(1, steps + 1):
                    for a, b, c, g in zip(ws, w64, wpp, grads[t]):
                        a.grad, b.grad, c.grad = g, g.double(), g
                    opt.step()
                    per_param.step()
                    prev = [b.detach().clone() for b in w64]
                    with ops.use_backend("reference"):
                        twin.step()
                    for b, q, pk, pa in zip(w64, prev, peak, path):
                        pk.copy_(torch.maximum(pk, b.detach().abs()))
                        pa.add_((b.detach() - q).abs())
                    del prev
                _sync(device)
        except Exception as e:  # noqa: BLE001 - a crash is a failed check with its message
            ok = False
            notes.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        r_w = r_m = r_pw = r_pm = 0.0
        for pa, pb, pc, pk, pth in zip(ws, w64, wpp, peak, path):
            a, b, c = pa.detach(), pb.detach(), pc.detach()
            allowed = (0.5 * steps + 1) * ulp(pk, dtype) + 1e-3 * pth
            r_w = max(r_w, float(((a.double() - b).abs() / allowed).max()))
            sa, sb, sc = opt.state[pa], twin.state[pb], per_param.state[pc]
            for k in _moment_keys(sa):
                r_m = max(r_m, _close_ratio(sa[k], sb[k], 1e-4, 1e-5))
                r_pm = max(r_pm, _close_ratio(sa[k], sc[k], 1e-5, 1e-6))
            r_pw = max(r_pw, float(((a.double() - c.double()).abs() / ulp(c, dtype)).max()))
            same = torch.equal(a, c) and all(torch.equal(sa[k], sc[k]) for k in _moment_keys(sa))
            bitwise += int(same)
            total += 1
        good = r_w <= 1.0 and r_m <= 1.0 and r_pw <= 1.0 and r_pm <= 1.0 and all(
            bool(torch.isfinite(p).all()) for p in ws)
        ok = ok and good
        worst_ref = max(worst_ref, r_w, r_m)
        worst_pp = max(worst_pp, r_pw, r_pm)
        notes.append(f"{name} {'ok' if good else 'WRONG'} (vs float64: weights {r_w:.3g}, moments {r_m:.3g}; "
                     f"bucketed vs foreach=False: weights {r_pw:.3g} ulp, moments {r_pm:.3g})")
        del opt, twin, per_param, ws, w64, wpp
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for n in notes:
        print(f"  step-correctness: {n}")
    label = "x".join(str(s) for s in shapes[-1])
    return report("step-correctness", ok,
                  f"worst error/tolerance vs the float64 reference {worst_ref:.3g} (<= 1), bucketed vs "
                  f"foreach=False {worst_pp:.3g} (<= 1; {bitwise}/{total} bitwise), {steps} steps after the refresh, "
                  f"{len(shapes)} bf16 weights up to {label}, rank {rank}, backend {backend}")


# --------------------------------------------------------------------------- graph-refresh
class _MLP(torch.nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, h)
        self.fc2 = torch.nn.Linear(h, h)
        self.fc3 = torch.nn.Linear(h, d)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class _Replayer:
    """``torch.cuda.CUDAGraph`` on CUDA; on a CPU (the dry run) ``capture`` records the step and
    ``replay`` runs it eagerly (the bookkeeping without a graph)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.graph = torch.cuda.CUDAGraph() if self.cuda else None
        self.fn = self.fresh = None

    def capture(self, fn, fresh) -> None:
        """``fn``: the step; ``fresh``: what makes its gradients new (as at capture) before an
        eager replay (a captured backward writes them, an eager one would accumulate)."""
        self.fn, self.fresh = fn, fresh
        if self.cuda:
            with torch.cuda.graph(self.graph):
                fn()

    def replay(self) -> None:
        if self.cuda:
            self.graph.replay()
        else:
            self.fresh()
            self.fn()


def _captured_table_count() -> Optional[int]:
    """How many device tables the grouped launches keep for live CUDA graphs (None if unknown)."""
    from lowrank_kernels.kernels import _launch

    count = getattr(_launch, "captured_table_count", None)
    return count() if count is not None else None


def check_graph_refresh(device: torch.device, tiny: bool) -> bool:
    from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW

    d, h, batch, rank, gap, steps = (16, 24, 8, 4, 3, 8) if tiny else (256, 512, 64, 32, 3, 8)
    gen = torch.Generator(device=device).manual_seed(3)
    data = [(torch.randn(batch, d, device=device, generator=gen), torch.randn(batch, d, device=device, generator=gen))
            for _ in range(steps)]
    results, ok, tables = [], True, []
    for cls in (GaLoreAdamW, DCTAdamW):
        torch.manual_seed(11)
        eager_model = _MLP(d, h).to(device)
        graph_model = copy.deepcopy(eager_model)
        start = [p.detach().clone() for p in eager_model.parameters()]

        def make(model):
            mats = [p for p in model.parameters() if p.dim() == 2]
            vecs = [p for p in model.parameters() if p.dim() != 2]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls([dict(params=mats, rank=rank, update_proj_gap=gap), dict(params=vecs)], lr=1e-2,
                           weight_decay=0.01, capturable=True)

        def train_step(model, opt, x, y):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()

        try:
            eager_opt = make(eager_model)
            for x, y in data:
                eager_opt.zero_grad(set_to_none=True)
                train_step(eager_model, eager_opt, x, y)
            graph_opt = make(graph_model)
            sx, sy = data[0][0].clone(), data[0][1].clone()
            side = torch.cuda.Stream(device) if device.type == "cuda" else None
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(device))
            for t in (0, 1):  # step 1: the refresh; step 2: the first non-refresh step (kernels compile)
                sx.copy_(data[t][0])
                sy.copy_(data[t][1])
                graph_opt.zero_grad(set_to_none=True)
                if side is not None:
                    with torch.cuda.stream(side):
                        train_step(graph_model, graph_opt, sx, sy)
                else:
                    train_step(graph_model, graph_opt, sx, sy)
            if side is not None:
                torch.cuda.current_stream(device).wait_stream(side)
            before = _captured_table_count()
            graph_opt.zero_grad(set_to_none=True)  # gradients (and so the problem tables) made in the capture
            rep = _Replayer(device)
            rep.capture(lambda: train_step(graph_model, graph_opt, sx, sy), lambda: graph_opt.zero_grad(set_to_none=True))
            after = _captured_table_count()
            if before is not None and after is not None:
                tables.append(after - before)
            replays = refreshes = 0
            for t in range(2, steps):  # 1-based step t + 1
                sx.copy_(data[t][0])
                sy.copy_(data[t][1])
                if t % gap == 0:  # (step - 1) % gap == 0: a refresh, eagerly
                    graph_opt.sync_step_counts()
                    graph_opt.zero_grad(set_to_none=False)  # the captured gradients, zeroed in place
                    train_step(graph_model, graph_opt, sx, sy)
                    refreshes += 1
                else:
                    rep.replay()
                    replays += 1
            _sync(device)
            num = den = 0.0
            for a, b, s in zip(graph_model.parameters(), eager_model.parameters(), start):
                da, db = a.detach().double() - s.double(), b.detach().double() - s.double()
                num = max(num, float((da - db).abs().max()))
                den = max(den, float(db.abs().max()))
            rel = num / den if den > 0 else float("inf")
            finite = all(bool(torch.isfinite(p).all()) for p in graph_model.parameters())
            good = finite and rel <= 1e-5
            results.append(f"{cls.__name__} {rel:.3g}")
            print(f"  graph-refresh: {cls.__name__}: {replays} replays, {refreshes} eager refreshes, "
                  f"max |change(graph) - change(eager)| / max |change| = {rel:.3g} {'ok' if good else 'WRONG'}")
            ok = ok and good
        except Exception as e:  # noqa: BLE001
            ok = False
            results.append(f"{cls.__name__} {type(e).__name__}")
            print(f"  graph-refresh: {cls.__name__}: {type(e).__name__}: {str(e)[:300]}")
    mode = "CUDA graph" if device.type == "cuda" else "dry run: eager replay, no graph"
    tab = f"; {sum(tables)} problem tables made during capture" if tables else ""
    return report("graph-refresh", ok, f"relative difference graph vs eager after {steps} steps (<= 1e-5): "
                                       f"{', '.join(results)} ({mode}{tab})")


# --------------------------------------------------------------------------- second-device
def _device_run(device: torch.device, tiny: bool) -> List[torch.Tensor]:
    """GaLoreAdamW / DCTAdamW steps and list ops on ``device``; every result moved to the CPU."""
    from lowrank_kernels import ops
    from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW

    shapes = [(40, 24), (24, 40), (33, 33)] if tiny else [(512, 384), (384, 512), (300, 300)]
    out = []
    for cls in (GaLoreAdamW, DCTAdamW):
        gen = torch.Generator().manual_seed(5)
        ps = [torch.nn.Parameter(torch.randn(m, n, generator=gen).to(device, torch.bfloat16)) for m, n in shapes]
        gs = [[torch.randn(m, n, generator=gen).to(device, torch.bfloat16) for m, n in shapes] for _ in range(3)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls([dict(params=ps, rank=8, update_proj_gap=2)], lr=1e-2, weight_decay=0.1)
        for g in gs:
            for p, x in zip(ps, g):
                p.grad = x
            opt.step()
        out += [p.detach().cpu() for p in ps]
    gen = torch.Generator().manual_seed(6)
    rs = [torch.randn(m, n, generator=gen).to(device) for m, n in shapes]
    sts = [ops.moments8_zeros((m, n), device, block_size=64) for m, n in shapes]
    ns = ops.adam_foreach_update_(rs, [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts],
                                  m_absmax=[s["m_absmax"] for s in sts], v_absmax=[s["v_absmax"] for s in sts],
                                  block_size=64)
    out += [n.cpu() for n in ns] + [s[k].cpu() for s in sts for k in ("exp_avg", "m_absmax")]
    stack = torch.randn(3, *shapes[0], generator=gen).to(device, torch.bfloat16)
    out.append(ops.dct_scores(stack, side="right", norm=1).cpu())
    return out


def check_second_device(device: torch.device, tiny: bool) -> bool:
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count < 2:
            return report("second-device", None, f"(only {count} CUDA device: tensors on cuda:1 need two)")
        first, second = torch.device("cuda", 0), torch.device("cuda", 1)
        torch.cuda.set_device(first)
    else:
        first = second = device
    try:
        a = _device_run(first, tiny)
        b = _device_run(second, tiny)
        current = torch.cuda.current_device() if device.type == "cuda" else None
    except Exception as e:  # noqa: BLE001
        return report("second-device", False, f"{type(e).__name__}: {str(e)[:300]}")
    same = sum(int(torch.equal(x, y)) for x, y in zip(a, b))
    kept = current in (None, 0)
    ok = same == len(a) and kept
    where = f"{second} (current device {current})" if device.type == "cuda" else "cpu vs cpu (dry run)"
    return report("second-device", ok, f"{same}/{len(a)} results bitwise equal to {first}'s on {where}"
                                       + ("" if kept else "; the current device changed"))


# --------------------------------------------------------------------------- build-extension
def check_build_extension() -> bool:
    """The C++ extension this process imports (``lowrank_kernels._C``): loaded, and one C++ op on
    CPU tensors equal to the reference (``project_adam_``: the projection GEMM and the Adam
    epilogue), so a build against this torch that loads but computes nothing fails too."""
    from lowrank_kernels import _ext, ops

    if not _ext.loaded():
        return report("build-extension", False, f"lowrank_kernels._C does not load: {_ext.load_error()}")
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(96, 80, generator=gen)
    proj = torch.linalg.qr(torch.randn(80, 8, generator=gen)).Q.T.contiguous()
    moments = (0.1 * torch.randn(96, 8, generator=gen), 0.01 * torch.rand(96, 8, generator=gen))
    out = {}
    for backend in ("cpp", "reference"):
        m, v = (t.clone() for t in moments)
        with ops.use_backend(backend):
            n = ops.project_adam_(grad, proj, m, v, side="right")
        out[backend] = (n, m, v)
    ratio = max(_close_ratio(a, b, 1e-5, 1e-6) for a, b in zip(out["cpp"], out["reference"]))
    return report("build-extension", ratio <= 1.0,
                  f"{_ext.extension_path()} (torch {torch.__version__}): C++ project_adam_ vs the reference "
                  f"{ratio:.3g} of the tolerance (<= 1)")


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_checks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU dry run of the same code)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of {', '.join(NAMES)}")
    ap.add_argument("--steps", type=int, default=3, help="step-correctness: steps after the refresh")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in NAMES + ("build-extension",)]
    if bad:
        ap.error(f"--only: unknown check {bad[0]!r}; expected some of {', '.join(NAMES)}, build-extension")
    if device.type == "cuda" and not torch.cuda.is_available() and names != ["build-extension"]:
        for n in names:
            report(n, False, "no CUDA device (use --tiny for a CPU dry run)")
        return 1
    ok = True
    for n in names:
        t0 = time.perf_counter()
        fn = {"step-correctness": lambda: check_step_correctness(device, args.tiny, args.steps),
              "graph-refresh": lambda: check_graph_refresh(device, args.tiny),
              "second-device": lambda: check_second_device(device, args.tiny),
              "build-extension": check_build_extension}[n]
        try:
            ok = fn() and ok
        except Exception as e:  # noqa: BLE001 - never leave a check without its line
            ok = report(n, False, f"{type(e).__name__}: {str(e)[:300]}") and ok
        print(f"  ({n}: {time.perf_counter() - t0:.1f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
