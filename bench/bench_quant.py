"""Suite ``quant``: Q-GaLore's INT4 projector and INT8 weights.

``projector_bytes``
    Bytes of a rank-r projector of each LLaMA stack shape: ``dense-bf16``; ``ours-int4``
    (``Int4Projector``: two values per byte + float32 scale/min per group of 256);
    ``q-galore-torch`` (the official quantizer with 4 bits: one value per byte + its
    scales and zero points), where importable. ``check``: relative error of the
    dequantized projector.
``step``
    ``project_update_backproject_`` with the packed INT4 projector against the same
    step with the dense projector in the run's dtype (``check``: relative error of the
    INT4 step against the dense step on the dequantized projector).
``weight_bytes``
    One LLaMA layer's seven Linear weights as ``nn.Linear`` in bf16 against
    ``lowrank_kernels.nn.QLinear`` (INT8 + group scale/min), where it exists.
"""
from __future__ import annotations

import torch

from . import bench_projection as BP
from .harness import Ctx, Row, check_str, fmt_shape, free_memory, proj_shape, rel_err, short, side_of

SUITE = "quant"
GROUP = 256


def _official_int4_bytes(p: torch.Tensor):
    """Bytes of q-galore-torch's 4-bit projector (its own quantizer), or the reason it cannot run."""
    try:
        from q_galore_torch.q_galore_projector import GaLoreProjector
    except Exception as e:  # noqa: BLE001
        return None, f"q-galore-torch not importable ({type(e).__name__}: {short(e, 80)})"
    if p.numel() % GROUP:
        return None, f"q-galore-torch needs numel divisible by {GROUP}"
    q = GaLoreProjector(rank=1, quant=True, group_size=GROUP, n_bit=4)._quantize(p, q_group_size=GROUP, n_bit=4)
    return sum(t.numel() * t.element_size() for t in q[:3]), ""


def run(ctx: Ctx) -> None:
    try:
        from lowrank_kernels.ops import Int4Projector
    except ImportError as e:
        Int4Projector = None
        ctx.skip(SUITE, "projector_bytes", "ours-int4", f"lowrank_kernels.ops.Int4Projector not available yet ({e})")
    _projector_bytes(ctx, Int4Projector)
    if Int4Projector is not None:
        _step(ctx, Int4Projector)
    _weight_bytes(ctx)
    _targets(ctx)


def _shapes(ctx: Ctx):
    return list(dict.fromkeys(ctx.sizes.stack.shapes()))


def _projector_bytes(ctx: Ctx, Int4Projector) -> None:
    rank = ctx.sizes.stack_rank
    for m, n in _shapes(ctx):
        p = BP.orthonormal_projector(m, n, rank, torch.bfloat16, ctx.device)
        kw = dict(shape=fmt_shape(*proj_shape(m, n, rank)), rank=rank, note=f"projector of a {m}x{n} weight")
        ctx.add(Row(suite=SUITE, kernel="projector_bytes", provider="dense-bf16", bytes=p.numel() * p.element_size(),
                    dtype="bf16", **kw))
        if Int4Projector is not None:
            try:
                q = Int4Projector.quantize(p, GROUP)
                nbytes = sum(t.numel() * t.element_size() for t in (q.packed, q.scale, q.minimum))
                err = rel_err(q.dequantize(torch.float32), p.float())
                ctx.add(Row(suite=SUITE, kernel="projector_bytes", provider="ours-int4", bytes=nbytes, dtype="int4",
                            check=f"rel_err={err:.1e} (4-bit)", **kw))
            except Exception as e:  # noqa: BLE001
                ctx.skip(SUITE, "projector_bytes", "ours-int4", f"failed: {type(e).__name__}: {short(e)}", **kw)
        nbytes, why = _official_int4_bytes(p)
        if nbytes is None:
            ctx.skip(SUITE, "projector_bytes", "q-galore-torch", why, **kw)
        else:
            ctx.add(Row(suite=SUITE, kernel="projector_bytes", provider="q-galore-torch", bytes=nbytes, dtype="int4",
                        **kw))
    ctx.set_baseline(SUITE, "dense-bf16", kernels=["projector_bytes"])


def _step(ctx: Ctx, Int4Projector) -> None:
    from lowrank_kernels import ops
    from lowrank_kernels.ops import _registry as reg

    backend = "auto"
    op = reg.OPS.get("projection_project_update_backproject")
    if op is not None:
        backend = reg.resolve_backend(op, ctx.device)
    dense_name, int4_name = f"ours-{ctx.dtype_name}", f"ours-int4 ({backend})"
    rank = ctx.sizes.stack_rank
    hp = BP.HP
    for m, n in _shapes(ctx):
        side = side_of(m, n)
        c = BP.make_case(ctx, m, n, rank)
        q = Int4Projector.quantize(c["proj"], GROUP)
        kw = dict(shape=fmt_shape(m, n), rank=rank)
        # Check: the INT4 step equals the dense step on the dequantized projector.
        try:
            a, b = BP._clone_state(c), BP._clone_state(c)
            ops.project_update_backproject_(a["param"], a["grad"], q, a["exp_avg"], a["exp_avg_sq"], side=side,
                                            **BP.HP_CHECK)
            with ops.use_backend("reference"):
                ops.project_update_backproject_(b["param"], b["grad"], q.dequantize(torch.float32).to(ctx.dtype),
                                                b["exp_avg"], b["exp_avg_sq"], side=side, **BP.HP_CHECK)
            chk = check_str(max(rel_err(a["exp_avg"], b["exp_avg"]),
                                rel_err(a["param"].double() - c["param"].double(),
                                        b["param"].double() - c["param"].double())), ctx.dtype)
        except Exception as e:  # noqa: BLE001
            chk = f"check failed to run: {type(e).__name__}: {short(e, 80)}"
        flops, nbytes = BP.counts(m, n, rank, c["grad"].element_size(), "step")

        def step_fn(proj, s):
            return lambda: ops.project_update_backproject_(s["param"], s["grad"], proj, s["exp_avg"], s["exp_avg_sq"],
                                                           side=side, **hp)

        ctx.measure_many(SUITE, "step", {
            name: dict(fn=step_fn(proj, BP._clone_state(c)), flops=flops, nbytes=nbytes, check=check)
            for name, proj, check in ((dense_name, c["proj"], ""), (int4_name, q, chk))}, **kw)
        del c, q
        free_memory(ctx.device)
    ctx.set_baseline(SUITE, dense_name, kernels=["step"])


def _weight_bytes(ctx: Ctx) -> None:
    h, i = ctx.sizes.stack.hidden, ctx.sizes.stack.inter
    kw = dict(shape=f"1L-h{h}-i{i}")

    def layer():
        mods = {f"attn_{k}": torch.nn.Linear(h, h, bias=False) for k in "qkvo"}
        mods.update(mlp_gate=torch.nn.Linear(h, i, bias=False), mlp_up=torch.nn.Linear(h, i, bias=False),
                    mlp_down=torch.nn.Linear(i, h, bias=False))
        return torch.nn.ModuleDict(mods).to(device=ctx.device, dtype=torch.bfloat16)

    def nbytes(model):  # distinct storages (QLinear's float weight is a stride-0 one-element placeholder)
        seen, total = set(), 0
        for t in list(model.parameters()) + list(model.buffers()):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total

    dense = layer()
    ctx.add(Row(suite=SUITE, kernel="weight_bytes", provider="nn.Linear-bf16", bytes=nbytes(dense), dtype="bf16",
                note="one LLaMA layer's 7 Linear weights", **kw))
    try:
        from lowrank_kernels.nn import quantize_linear_layers
    except ImportError as e:
        ctx.skip(SUITE, "weight_bytes", "ours-QLinear", f"lowrank_kernels.nn.quantize_linear_layers not available yet "
                                                        f"({short(e, 80)})", **kw)
    else:
        try:
            converted = quantize_linear_layers(dense, target_modules=("attn", "mlp"))  # in place
            ctx.add(Row(suite=SUITE, kernel="weight_bytes", provider="ours-QLinear", bytes=nbytes(dense), dtype="int8",
                        note=f"{len(converted)} Linears -> INT8 weight + scale/min per group", **kw))
        except Exception as e:  # noqa: BLE001
            ctx.skip(SUITE, "weight_bytes", "ours-QLinear", f"failed: {type(e).__name__}: {short(e)}", **kw)
    del dense
    free_memory(ctx.device)
    ctx.set_baseline(SUITE, "nn.Linear-bf16", kernels=["weight_bytes"])


def _targets(ctx: Ctx) -> None:
    rows = [r for r in ctx.rows if r.suite == SUITE and r.kernel == "projector_bytes" and r.provider == "ours-int4"
            and r.mem_ratio is not None]
    ctx.target(SUITE, "ours-int4 projector bytes / dense bf16 (largest over shapes)",
               max((r.mem_ratio for r in rows), default=None), 0.27, higher_is_better=False,
               applies=not ctx.tiny, stated_for="benchmark-size projectors")  # tiny projectors are one short group: the scale/min overhead dominates
    rows = [r for r in ctx.rows if r.suite == SUITE and r.kernel == "step" and r.speedup and r.provider.startswith(
        "ours-int4")]
    full = ctx.device.type == "cuda" and ctx.dtype == torch.bfloat16 and ctx.sizes.stack.hidden == 2048
    ctx.target(SUITE, f"INT4-projector step time / {ctx.dtype_name}-projector step (worst over shapes)",
               max((1 / r.speedup for r in rows), default=None), 1.15, higher_is_better=False, applies=full)


__all__ = ["run", "lowrank_shape"]
