"""The code the distributed tests run in each of their 2 gloo processes (CPU).

One spawn runs every check; each rank writes ``{check: [ok, detail]}`` to
``<outdir>/rank<r>.json`` and the tests in ``test_distributed.py`` read them.
"""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

from .._dist import rank_session

STEPS = 4  # with update_proj_gap=2: refreshes at steps 1 and 3
GAP = 2
LR = 1e-2
# Parameters after STEPS steps: ||W_dist - W_single|| / ||W_single - W_0|| must stay below this.
# Both runs see the same global batch; they differ only in the summation order of the
# gradient (per-rank halves averaged vs. the whole batch, ~1e-7 relative in fp32),
# which the SVD refresh and the Adam normalization carry to ~1e-6.
TOL = 1e-4


def make_model():
    torch.manual_seed(0)
    # W: 17x12 (right side, 9/8 rows per rank), 10x17 (left), 3x10 (left, 2/1 rows: fewer than the
    # rank), 1x3 (rank 1, left; rank 1 holds no row at all).
    return torch.nn.Sequential(
        torch.nn.Linear(12, 17), torch.nn.Tanh(), torch.nn.Linear(17, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3),
        torch.nn.Tanh(), torch.nn.Linear(3, 1),
    ).to(torch.float32)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, generator=g), torch.randn(8, 1, generator=g)


def _groups(model, **low):
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    other = [m.bias for m in model if isinstance(m, torch.nn.Linear)]
    return [dict(params=weights[:-1], **low), dict(params=weights[-1:], **{**low, "rank": 1}),
            dict(params=other, rank=None, density=None)]


def configs():
    from lowrank_kernels.optim import APOLLOAdamW, FrugalAdamW, GaLoreAdamW, QGaLoreAdamW

    cfgs = {
        "galore": lambda m: GaLoreAdamW(_groups(m, rank=2, update_proj_gap=GAP, scale=0.5), lr=LR, weight_decay=0.1),
        "galore_right_lowrank": lambda m: GaLoreAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, proj_type="right"), lr=LR, svd="lowrank"),
        "galore_full": lambda m: GaLoreAdamW(_groups(m, rank=2, update_proj_gap=GAP, proj_type="full"), lr=LR),
        "apollo": lambda m: APOLLOAdamW(_groups(m, rank=2, update_proj_gap=GAP), lr=LR, weight_decay=0.1),
        "apollo_mini": lambda m: APOLLOAdamW.mini(_groups(m, rank=1, update_proj_gap=GAP), lr=LR),
        "frugal_svd": lambda m: FrugalAdamW(_groups(m, density=0.25, update_proj_gap=GAP), lr=LR),
        "frugal_random_sgd": lambda m: FrugalAdamW(
            _groups(m, density=0.4, update_proj_gap=GAP, projection="random", update="sgd"), lr=LR),
        "frugal_columns": lambda m: FrugalAdamW(
            _groups(m, density=0.4, update_proj_gap=GAP, projection="columns"), lr=LR),
        # INT4 projector (float weights): groups of 8 values so the small projectors hold several.
        "qgalore_int4": lambda m: QGaLoreAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, quant_group_size=8), lr=LR, weight_decay=0.1),
    }
    try:
        from lowrank_kernels.optim import DCTAdamW  # noqa: F401
    except ImportError:
        DCTAdamW = None
    if DCTAdamW is not None:
        cfgs["dct_right"] = lambda m: DCTAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, proj_type="right", moment_refresh="reindex"), lr=LR)
        cfgs["dct_std_l2"] = lambda m: DCTAdamW(_groups(m, rank=2, update_proj_gap=GAP, norm=2), lr=LR)
        cfgs["frugal_dct"] = lambda m: FrugalAdamW(
            _groups(m, density=0.4, update_proj_gap=GAP, projection="dct"), lr=LR)
    return cfgs


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def train(model, opt, x, y, steps, on_step=None):
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        if on_step is not None:
            with on_step(t):
                opt.step()
        else:
            opt.step()


def full_params(model):
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


def rel_change_err(params, ref, init):
    num = sum(float((a - b).double().norm() ** 2) for a, b in zip(params, ref)) ** 0.5
    den = sum(float((b - c).double().norm() ** 2) for b, c in zip(ref, init)) ** 0.5
    return num / den


def fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


class _Comm:
    """Counts the collectives DTensor issues per optimizer step (all-gathers, all-reduces)."""

    def __init__(self):
        self.per_step = {}

    def __call__(self, t):
        from torch.distributed.tensor.debug import CommDebugMode

        mode = CommDebugMode()
        outer = self

        class _Ctx:
            def __enter__(self):
                mode.__enter__()

            def __exit__(self, *exc):
                mode.__exit__(*exc)
                counts = {str(k): v for k, v in mode.get_comm_counts().items()}
                outer.per_step[t] = {
                    "all_gather": sum(v for k, v in counts.items() if "all_gather" in k),
                    "all_reduce": sum(v for k, v in counts.items() if "all_reduce" in k),
                    "other": sum(v for k, v in counts.items() if "all_gather" not in k and "all_reduce" not in k),
                }

        return _Ctx()


def check_parity(name, make_opt, rank, ws, results):
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = batch()
    lo, hi = rank * x.shape[0] // ws, (rank + 1) * x.shape[0] // ws

    single = make_model()
    init = [p.detach().clone() for p in single.parameters()]
    train(single, make_opt(single), x, y, STEPS)
    ref = [p.detach().clone() for p in single.parameters()]

    ddp = DDP(make_model())
    train(ddp, make_opt(ddp.module), x[lo:hi], y[lo:hi], STEPS)
    err = rel_change_err(full_params(ddp.module), ref, init)
    results[f"ddp_parity[{name}]"] = [err < TOL, f"rel err {err:.2e} (tol {TOL:.0e})"]

    model = fsdp_model()
    comm = _Comm()
    train(model, make_opt(model), x[lo:hi], y[lo:hi], STEPS, on_step=comm)
    err = rel_change_err(full_params(model), ref, init)
    results[f"fsdp_parity[{name}]"] = [err < TOL, f"rel err {err:.2e} (tol {TOL:.0e})"]
    results[f"fsdp_comm[{name}]"] = [True, comm.per_step]


def check_qlinear_ddp(rank, ws, results):
    """Q-GaLore on INT8 QLinear weights under DDP == single process (same SR seeds on every rank).

    (FSDP2 does not apply: it would shard the QLinear's gradient placeholder, not its INT8 storage.)
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lowrank_kernels.nn import QLinear, quantize_linear_layers
    from lowrank_kernels.optim import QGaLoreAdamW

    def model_fn():
        m = make_model()
        quantize_linear_layers(m, group_size=16)
        return m

    def make_opt(m):
        return QGaLoreAdamW(_groups(m, rank=2, update_proj_gap=GAP, quant_group_size=8), lr=LR)

    def weights(m):
        out = []
        for mod in m.modules():
            if isinstance(mod, QLinear):
                out += [mod.dequantized_weight(torch.float32), mod.bias.detach().clone()]
        return out

    x, y = batch()
    lo, hi = rank * x.shape[0] // ws, (rank + 1) * x.shape[0] // ws
    single = model_fn()
    init = weights(single)
    train(single, make_opt(single), x, y, STEPS)
    ref = weights(single)
    ddp = DDP(model_fn(), init_sync=False)  # the initial broadcast cannot write the stride-0 placeholder
    train(ddp, make_opt(ddp.module), x[lo:hi], y[lo:hi], STEPS)
    err = rel_change_err(weights(ddp.module), ref, init)
    # INT8 storage: a last-bit difference in the update can move a stochastic rounding by one
    # step of the group's scale, so the bound is the rounding step relative to the change.
    results["qlinear_ddp"] = [err < 0.05, f"rel err {err:.2e} (tol 5e-2)"]


def check_checkpoint(name, make_opt, rank, ws, ckpt_dir, results):
    """2 steps, DCP save, 2 more steps (across the refresh at step 3) == load into a fresh run + 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    x, y = batch()
    lo, hi = rank * x.shape[0] // ws, (rank + 1) * x.shape[0] // ws
    x, y = x[lo:hi], y[lo:hi]
    path = os.path.join(ckpt_dir, name)

    model = fsdp_model()
    opt = make_opt(model)
    train(model, opt, x, y, 2)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    train(model, opt, x, y, 2)
    want = full_params(model)

    model2 = fsdp_model()
    for p in model2.parameters():  # a different starting point: everything must come from the checkpoint
        p.data.add_(1.0)
    opt2 = make_opt(model2)
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    train(model2, opt2, x, y, 2)
    got = full_params(model2)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
    results[f"dcp_resume[{name}]"] = [diff <= 1e-6, f"max abs diff {diff:.2e}"]

    # Sharded: every row-aligned moment is saved as one chunk per rank.
    md = dcp.FileSystemReader(path).read_metadata()
    chunks = {k: len(v.chunks) for k, v in md.state_dict_metadata.items()
              if k.startswith("optim.state.") and hasattr(v, "chunks")}
    sharded = [k for k, c in chunks.items() if c == ws]
    results[f"dcp_sharded[{name}]"] = [len(sharded) > 0, {"sharded_keys": sorted(sharded)}]


def check_nonfinite(rank, ws, results):
    """A NaN in one rank's shard: every rank skips that parameter (one all-reduce decides)."""
    from lowrank_kernels.optim import GaLoreAdamW

    x, y = batch()
    lo, hi = rank * x.shape[0] // ws, (rank + 1) * x.shape[0] // ws
    model = fsdp_model()
    opt = GaLoreAdamW(_groups(model, rank=2, update_proj_gap=GAP), lr=LR)
    before = full_params(model)
    opt.zero_grad()
    _loss(model, x[lo:hi], y[lo:hi]).backward()
    w = model[0].weight
    if rank == ws - 1:
        w.grad.to_local()[0, 0] = float("nan")
    opt.step()
    after = full_params(model)
    same = bool(torch.equal(after[0], before[0]))
    moved = all(not torch.equal(a, b) for a, b in zip(after[1:], before[1:]))
    ok = same and moved and opt.nonfinite_skips == 1 and len(opt.state[w]) == 0
    results["nonfinite_skip"] = [ok, f"skipped weight unchanged={same}, others moved={moved}, "
                                     f"skips={opt.nonfinite_skips}, state={sorted(opt.state[w])}"]


def check_layerwise_fsdp(rank, ws, results):
    """layerwise (steps inside backward, FSDP2's post-accumulate-grad hooks) == single process."""
    from lowrank_kernels.optim import GaLoreAdamW, layerwise

    x, y = batch()
    lo, hi = rank * x.shape[0] // ws, (rank + 1) * x.shape[0] // ws
    single = make_model()
    init = [p.detach().clone() for p in single.parameters()]
    train(single, GaLoreAdamW(_groups(single, rank=2, update_proj_gap=GAP), lr=LR), x, y, STEPS)
    ref = [p.detach().clone() for p in single.parameters()]
    model = fsdp_model()
    lw = layerwise(_groups(model, rank=2, update_proj_gap=GAP), lambda g: GaLoreAdamW(g, lr=LR))
    train(model, lw, x[lo:hi], y[lo:hi], STEPS)
    err = rel_change_err(full_params(model), ref, init)
    results["layerwise_fsdp"] = [err < TOL, f"rel err {err:.2e} (tol {TOL:.0e})"]


def check_placement_error(results):
    """A placement no path serves (a pending sum, ``Partial``) is refused with a clear error, before any step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    from lowrank_kernels.optim import GaLoreAdamW

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    p = torch.nn.Parameter(DTensor.from_local(torch.randn(8, 6), mesh, [Partial()], run_check=False))
    try:
        GaLoreAdamW([dict(params=[p], rank=2)])
        results["placement_error"] = [False, "no error"]
    except ValueError as e:
        msg = str(e)
        results["placement_error"] = ["param group 0: parameter 0" in msg and "Partial(sum)" in msg, msg]


def worker(rank, ws, port, outdir, names):
    with rank_session(rank, ws, port, outdir) as results:
        cfgs = configs()
        results["configs"] = [True, sorted(cfgs)]
        for name in names.get("parity", []):
            if name not in cfgs:
                continue
            try:
                check_parity(name, cfgs[name], rank, ws, results)
            except Exception:
                results[f"ddp_parity[{name}]"] = results[f"fsdp_parity[{name}]"] = [False, traceback.format_exc()]
        for name, fn in (("nonfinite_skip", lambda: check_nonfinite(rank, ws, results)),
                         ("qlinear_ddp", lambda: check_qlinear_ddp(rank, ws, results)),
                         ("layerwise_fsdp", lambda: check_layerwise_fsdp(rank, ws, results)),
                         ("placement_error", lambda: check_placement_error(results))):
            if name in names.get("extra", []):
                try:
                    fn()
                except Exception:
                    results[name] = [False, traceback.format_exc()]
        for name in names.get("checkpoint", []):
            if name not in cfgs:
                continue
            try:
                check_checkpoint(name, cfgs[name], rank, ws, os.path.join(outdir, "ckpt"), results)
            except Exception:
                results[f"dcp_resume[{name}]"] = [False, traceback.format_exc()]
