"""Suite ``projection``: the fused GaLore-Adam step against unfused PyTorch.

Kernels, per LLaMA shape and rank (side chosen as GaLore's "std": the smaller side):

``step``
    ``project_update_backproject_``: ``R = proj(G)``, Adam on ``R``, ``W += a back(N)``.
``project_adam``
    ``project_adam_``: the projection GEMM with the Adam epilogue.
``backproject_apply``
    ``backproject_apply_``: the back-projection GEMM accumulated into ``W``.
``fira_residual``
    Fira's residual part of a step (``FiraAdamW``): the scaled residual's norm
    (``residual_sumsq``), the limiter, and ``W -= lr (scale back(N) + s' (G - back(R)))``
    (``residual_apply_``): two GEMM passes over ``G``; unfused: ``back(R)``, the residual, its
    norm and ``back(N)`` as full-size temporaries.

Providers: ``ours-<backend>`` (the backend the op picks on this device: triton on
CUDA, cpp on CPU), ``reference`` (the pure-PyTorch spec, forced), ``torch-unfused``
(what galore-torch does: matmul, elementwise Adam, matmul, add) and, for ``step``,
``torch-2gemm`` (the two GEMMs alone through torch.matmul, no Adam and no update:
what a fused kernel could at best approach). Moments are float32 for every provider.
Before timing, each provider's result is compared with the reference on the same
inputs (``check``: relative error of the updated moments and weight change).
"""
from __future__ import annotations

import math

import torch

from .harness import Ctx, check_str, fmt_shape, free_memory, lowrank_shape, plot_bars, progress, rel_err, side_of

SUITE = "projection"
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=10, weight_decay=0.0, scale=0.25)
# The correctness check uses a larger step so that the weight change is many ulps of W.
HP_CHECK = dict(HP, lr=0.05, scale=1.0)


def orthonormal_projector(m: int, n: int, rank: int, dtype, device) -> torch.Tensor:
    """A projector with orthonormal rows (right: ``r x n``) or columns (left: ``m x r``)."""
    k = n if side_of(m, n) == "right" else m
    q = torch.linalg.qr(torch.randn(k, rank, device=device, dtype=torch.float32))[0]
    return (q.T if side_of(m, n) == "right" else q).contiguous().to(dtype)


def make_case(ctx: Ctx, m: int, n: int, rank: int) -> dict:
    dev, dt = ctx.device, ctx.dtype
    lshape = lowrank_shape(m, n, rank)
    return dict(
        m=m, n=n, rank=rank, side=side_of(m, n),
        grad=torch.randn(m, n, device=dev, dtype=dt),
        param=(0.02 * torch.randn(m, n, device=dev, dtype=torch.float32)).to(dt),
        proj=orthonormal_projector(m, n, rank, dt, dev),
        exp_avg=0.01 * torch.randn(lshape, device=dev, dtype=torch.float32),
        exp_avg_sq=1e-4 * torch.rand(lshape, device=dev, dtype=torch.float32) + 1e-6,
        update=torch.randn(lshape, device=dev, dtype=torch.float32),
    )


def _clone_state(c: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}


# --------------------------------------------------------------------------- unfused PyTorch (galore-torch's way)
def unfused_project_adam(grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps):
    r = grad @ proj.T if side == "right" else proj.T @ grad
    exp_avg.mul_(beta1).add_(r, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1 - beta2)
    return exp_avg / (exp_avg_sq.sqrt().add_(eps))


def unfused_backproject_apply(param, update, proj, side, alpha):
    u = update.to(proj.dtype)
    back = u @ proj if side == "right" else proj @ u
    param.add_(back, alpha=alpha)


def unfused_step(param, grad, proj, exp_avg, exp_avg_sq, side, lr, beta1, beta2, eps, step, weight_decay, scale):
    n = unfused_project_adam(grad, proj, exp_avg, exp_avg_sq, side, beta1, beta2, eps)
    step_size = lr * (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step)
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    unfused_backproject_apply(param, n, proj, side, -step_size * scale)


def two_gemm(grad, proj, side, update):
    u = update.to(proj.dtype)
    if side == "right":
        return grad @ proj.T, u @ proj
    return proj.T @ grad, proj @ u


def _fira_factor(n_lr, r, side):
    dim = 1 if side == "right" else 0
    s = n_lr.norm(dim=dim) / (r.norm(dim=dim) + 1e-8)
    return s, (s[:, None] if side == "right" else s[None, :])


def unfused_fira_residual(param, grad, proj, r, n_lr, side, lr, scale, prev):
    """Fira's residual part with full-size temporaries (the fira package's way)."""
    p = proj.float()
    back = (lambda x: x @ p) if side == "right" else (lambda x: p @ x)
    _, sb = _fira_factor(n_lr, r, side)
    q = (grad.float() - back(r)) * sb
    limiter = torch.clamp(q.norm() / (prev + 1e-8), min=1.01) / 1.01
    u = scale * back(n_lr) + q / limiter
    param.copy_(param.float() - lr * u)


def fira_residual(param, grad, proj, r, n_lr, side, lr, scale, prev):
    """The same through the residual ops (``FiraAdamW._residual_step``)."""
    from lowrank_kernels import ops

    s, sb = _fira_factor(n_lr, r, side)
    norm = ops.residual_sumsq(grad, r * sb * -1.0, proj, s, side=side).sqrt()
    limiter = torch.clamp(norm / (prev + 1e-8), min=1.01) / 1.01
    s = s / limiter
    sb = s[:, None] if side == "right" else s[None, :]
    ops.residual_apply_(param, grad, scale * n_lr - sb * r, proj, s, side=side, alpha=-lr, decay=1.0)


# --------------------------------------------------------------------------- counts
def counts(m: int, n: int, rank: int, esize: int, kernel: str) -> tuple:
    """(FLOPs, minimum bytes moved) per call: GEMMs only; each operand read once, each output written once."""
    low = rank * max(m, n)  # elements of R / the moments
    pbytes = rank * (n if side_of(m, n) == "right" else m) * esize
    if kernel == "project_adam":
        return 2.0 * m * n * rank, m * n * esize + pbytes + low * 4 * 5  # G, P, M/V r+w, N w
    if kernel == "backproject_apply":
        return 2.0 * m * n * rank, 2 * m * n * esize + pbytes + low * 4  # W r+w, P, N
    if kernel == "fira_residual":
        return 4.0 * m * n * rank, 4 * m * n * esize + 2 * pbytes + low * 4 * 4  # G twice, W r+w, P twice, R, N twice
    return 4.0 * m * n * rank, 3 * m * n * esize + pbytes + low * 4 * 4  # G, W r+w, P, M/V r+w


# --------------------------------------------------------------------------- suite
def run(ctx: Ctx) -> None:
    from lowrank_kernels import ops
    from lowrank_kernels.ops import _registry as reg

    op = reg.OPS["projection_project_update_backproject"]
    try:
        auto = reg.resolve_backend(op, ctx.device)
    except reg.BackendUnavailableError as e:
        ctx.skip(SUITE, "step", "ours", str(e))
        return
    ours = f"ours-{auto}"
    providers = [ours]
    if auto != "reference":
        providers.append("reference")
    else:
        pref = {"cuda": "triton", "cpu": "cpp"}.get(ctx.device.type, "?")
        ctx.skip(SUITE, "step", f"ours-{pref}", f"{reg.why_unavailable(op, pref, ctx.device)}; ours = the reference")
    providers += ["torch-unfused"]

    cases = [(m, n, r) for (m, n) in ctx.sizes.proj_shapes for r in ctx.sizes.proj_ranks if r < min(m, n)]
    esize = torch.empty((), dtype=ctx.dtype).element_size()
    for m, n, rank in progress(cases, "projection", ctx):
        c = make_case(ctx, m, n, rank)
        side = c["side"]
        shape = fmt_shape(m, n)
        ctx.log(f"  projection {shape} r{rank} ({side})")

        def run_op(kernel: str, provider: str, s: dict, hp: dict):
            """One call of ``kernel`` by ``provider`` on state ``s`` (mutated)."""
            args_step = (s["param"], s["grad"], s["proj"], s["exp_avg"], s["exp_avg_sq"])
            if kernel == "fira_residual":  # R: the case's update, N: its first moment; previous norm 1
                fira = unfused_fira_residual if provider == "torch-unfused" else fira_residual
                with ops.use_backend("reference" if provider == "reference" else auto):
                    return fira(s["param"], s["grad"], s["proj"], s["update"], s["exp_avg"], side, hp["lr"],
                                hp["scale"], 1.0)
            if provider == "torch-unfused":
                if kernel == "step":
                    return unfused_step(*args_step, side, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["step"],
                                        hp["weight_decay"], hp["scale"])
                if kernel == "project_adam":
                    return unfused_project_adam(s["grad"], s["proj"], s["exp_avg"], s["exp_avg_sq"], side,
                                                hp["beta1"], hp["beta2"], hp["eps"])
                return unfused_backproject_apply(s["param"], s["update"], s["proj"], side, -hp["lr"])
            if provider == "torch-2gemm":
                return two_gemm(s["grad"], s["proj"], side, s["update"])
            backend = "reference" if provider == "reference" else auto
            with ops.use_backend(backend):
                if kernel == "step":
                    return ops.project_update_backproject_(*args_step, side=side, **hp)
                if kernel == "project_adam":
                    return ops.project_adam_(s["grad"], s["proj"], s["exp_avg"], s["exp_avg_sq"], side=side,
                                             beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"])
                return ops.backproject_apply_(s["param"], s["update"], s["proj"], side=side, alpha=-hp["lr"])

        def check(kernel: str, provider: str) -> str:
            """Relative error against the reference on the same inputs (moments and weight change)."""
            if provider in ("reference", "torch-2gemm") or (provider == ours and auto == "reference"):
                return ""  # nothing independent to compare
            try:
                a, b = _clone_state(c), _clone_state(c)
                out_a = run_op(kernel, provider, a, HP_CHECK)
                out_b = run_op(kernel, "reference", b, HP_CHECK)
                errs = []
                if kernel in ("step", "project_adam"):
                    errs += [rel_err(a["exp_avg"], b["exp_avg"]), rel_err(a["exp_avg_sq"], b["exp_avg_sq"])]
                if kernel == "project_adam":
                    errs.append(rel_err(out_a, out_b))
                else:
                    errs.append(rel_err(a["param"].double() - c["param"].double(),
                                        b["param"].double() - c["param"].double()))
                return check_str(max(errs), ctx.dtype)
            except Exception as e:  # noqa: BLE001
                return f"check failed to run: {type(e).__name__}: {e}"[:160]

        for kernel in ("step", "project_adam", "backproject_apply", "fira_residual"):
            flops, nbytes = counts(m, n, rank, esize, kernel)
            provs = providers + (["torch-2gemm"] if kernel == "step" else [])
            provs = [p for p in provs if not (ctx.quick and kernel != "step" and p == "reference")]
            states = {p: _clone_state(c) for p in provs}  # each provider mutates its own copy
            ctx.measure_many(SUITE, kernel, {
                p: dict(fn=(lambda p=p: run_op(kernel, p, states[p], HP)), flops=flops, nbytes=nbytes,
                        check=check(kernel, p)) for p in provs}, shape=shape, rank=rank)
            del states
        del c
        free_memory(ctx.device)

    ctx.set_baseline(SUITE, "torch-unfused")
    _targets(ctx, ours)


def _targets(ctx: Ctx, ours: str) -> None:
    gpu = ctx.device.type == "cuda"
    if gpu:
        full = ctx.dtype == torch.bfloat16 and not ctx.tiny
        shape, rank = "4096x11008", 512
        if ctx.find(SUITE, "step", ours, shape, rank) is None:  # quick or other sizes: the largest measured
            shape, rank = _largest(ctx, ours)
            full = False
        ctx.target(SUITE, f"fused step {ours} vs torch-unfused at {shape} r{rank} {ctx.dtype_name}",
                   ctx.ratio(SUITE, "step", ours, "torch-unfused", shape, rank), 1.5, applies=full)
        row = ctx.find(SUITE, "step", ours, shape, rank)
        ctx.target(SUITE, f"fused step's two GEMMs, fraction of the {ctx.dtype_name} matmul rate ({shape} r{rank})",
                   None if row is None or row.frac_matmul is None else 100 * row.frac_matmul, 60,
                   applies=full, unit="%")
    else:
        ratios = [ctx.ratio(SUITE, "step", ours, "reference", r.shape, r.rank)
                  for r in ctx.rows if r.suite == SUITE and r.kernel == "step" and r.provider == ours and not r.skipped]
        ratios = [x for x in ratios if x is not None]
        ctx.target(SUITE, f"CPU: {ours} step vs the reference path (slowest case over shapes/ranks)",
                   min(ratios) if ratios else None, 1.0, applies=ours == "ours-cpp",
                   stated_for="the C++ backend")


def _largest(ctx: Ctx, provider: str):
    rows = [r for r in ctx.rows if r.suite == SUITE and r.kernel == "step" and r.provider == provider and not r.skipped]
    if not rows:
        return "-", None
    r = max(rows, key=lambda r: (math.prod(int(d) for d in r.shape.split("x")), r.rank))
    return r.shape, r.rank



def plot(ctx: Ctx):
    """Fused-step time per shape and rank, and its speedup over unfused PyTorch, per provider."""
    rows = [r for r in ctx.rows if r.suite == SUITE and r.kernel == "step" and not r.skipped]
    if not rows:
        return []
    panels = [("step time (ms)", [(f"{r.shape} r{r.rank} {r.provider}", r.median_ms) for r in rows]),
              ("speedup vs torch-unfused (x)", [(f"{r.shape} r{r.rank} {r.provider}", r.speedup) for r in rows
                                                if r.provider != "torch-unfused"])]
    return [plot_bars(ctx, "projection", panels, f"GaLore-Adam step: fused vs unfused, {ctx.dtype_name} "
                                                 f"({ctx.device_name})")]
