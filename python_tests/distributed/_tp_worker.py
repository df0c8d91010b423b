"""The code the tensor-parallel tests run in each of their 4 gloo processes (CPU).

One spawn runs every check (``test_tensor_parallel.py`` reads the per-rank results). The model
alternates ColwiseParallel and RowwiseParallel Linears, so its weights take both layouts of a
("dp", "tp") 2x2 mesh with FSDP2 on "dp": ``(_StridedShard(0), Shard(0))`` (rows split over both
mesh dimensions) and ``(Shard(0), Shard(1))`` (a block of rows and columns per rank).
"""
from __future__ import annotations

import os
import traceback

import torch

from .._dist import rank_session
from ._worker import rel_change_err

WORLD = 4
STEPS = 5  # with update_proj_gap=2: refreshes at steps 1, 3 and 5
GAP = 2
LR = 1e-2
TOL = 1e-4  # ||W_dist - W_single|| / ||W_single - W_0||, as the 2-process tests
PLAN = {"0": "col", "2": "row", "4": "col", "6": "row"}


RANK = 2
#: (in, hidden, middle, out): even splits everywhere, or ("_odd" layouts) uneven shards on both
#: the FSDP2 side (tensor parallelism needs even splits of the hidden size: 22 rows over tp, then 11
#: over dp as 6/5; 11 and 5 rows over dp as 6/5 and 3/2; 13 input columns unsplit).
DIMS = {False: (24, 32, 20, 12), True: (13, 22, 11, 5)}


def make_model(odd=False):
    torch.manual_seed(0)
    # even: 32x24 (col: rows over tp then dp), 20x32 (row: rows over dp, columns over tp; std: left
    # side), 32x20 (col), 12x32 (row; std: left side). The smallest local gradient block (6x16) holds
    # more elements than any low-rank block (RANK x 32), so the communication test can tell them apart.
    i, h, mid, o = DIMS[odd]
    return torch.nn.Sequential(
        torch.nn.Linear(i, h), torch.nn.Tanh(), torch.nn.Linear(h, mid), torch.nn.Tanh(),
        torch.nn.Linear(mid, h), torch.nn.Tanh(), torch.nn.Linear(h, o),
    )


def batch(odd=False):
    g = torch.Generator().manual_seed(1)
    i, _, _, o = DIMS[odd]
    return torch.randn(8, i, generator=g), torch.randn(8, o, generator=g)


def groups(model, plain=None, **low):
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    return [dict(params=[m.weight for m in lin], **low),
            dict(params=[m.bias for m in lin], rank=None, density=None, **(plain or {}))]


def configs():
    from lowrank_kernels.optim import APOLLOAdamW, DCTAdamW, FrugalAdamW, GaLoreAdamW, QGaLoreAdamW

    return {
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.1),
        "galore_right": lambda m: GaLoreAdamW(groups(m, rank=RANK, update_proj_gap=GAP, proj_type="right", scale=0.5),
                                              lr=LR, weight_decay=0.1),
        "galore_left": lambda m: GaLoreAdamW(groups(m, rank=RANK, update_proj_gap=GAP, proj_type="left", scale=0.5),
                                             lr=LR, weight_decay=0.1),
        "dct_right": lambda m: DCTAdamW(groups(m, rank=RANK, update_proj_gap=GAP, proj_type="right",
                                               moment_refresh="reindex"), lr=LR),
        "apollo": lambda m: APOLLOAdamW(groups(m, rank=RANK, update_proj_gap=GAP), lr=LR, weight_decay=0.1),
        # beyond the four above: every other optimizer that steps FSDP2 weights
        "galore_std_lowrank": lambda m: GaLoreAdamW(groups(m, rank=RANK, update_proj_gap=GAP), lr=LR, svd="lowrank"),
        "galore_full": lambda m: GaLoreAdamW(groups(m, rank=RANK, update_proj_gap=GAP, proj_type="full"), lr=LR),
        # 8-bit moments (blocks of 2 inside a row of R); the biases' moments stay 32-bit, as FSDP2 keeps them
        "galore_right_8bit": lambda m: GaLoreAdamW(
            groups(m, plain=dict(moment_bits=32), rank=RANK, update_proj_gap=GAP, proj_type="right"), lr=LR,
            moment_bits=8, block_size=2, min_8bit_size=0),
        "dct_std_l2": lambda m: DCTAdamW(groups(m, rank=RANK, update_proj_gap=GAP, norm=2), lr=LR),
        "apollo_mini": lambda m: APOLLOAdamW.mini(groups(m, update_proj_gap=GAP), lr=LR),
        "frugal_svd": lambda m: FrugalAdamW(groups(m, density=0.25, update_proj_gap=GAP), lr=LR),
        "frugal_columns": lambda m: FrugalAdamW(groups(m, density=0.4, update_proj_gap=GAP, projection="columns"),
                                                lr=LR),
        "qgalore_int4": lambda m: QGaLoreAdamW(groups(m, rank=RANK, update_proj_gap=GAP, quant_group_size=8), lr=LR),
    }


class _Comm:
    """Records the collectives of each optimizer step: ``(kind, elements)`` per call (all-gather,
    all-reduce, other), from the functional collectives DTensor issues."""

    def __init__(self):
        self.per_step = {}

    def __call__(self, t):
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self.per_step[t] = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(t is DTensor for t in types):
                    return NotImplemented  # DTensor runs first and desugars into collectives (as CommDebugMode)
                name = str(func.overloadpacket)
                if "c10d" in name and "wait" not in name and "wrap" not in name:
                    kind = "all_gather" if "all_gather" in name else "all_reduce" if "all_reduce" in name else name
                    log.append([kind, int(args[0].numel()) if isinstance(args[0], torch.Tensor) else -1])
                return func(*args, **(kwargs or {}))

        return _Mode()


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def train(model, opt, x, y, steps, on_step=None):
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        if on_step is None:
            opt.step()
        else:
            with on_step(t):
                opt.step()


def full_params(model):
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


def parallel_model(mesh, layout):
    """``layout``: "fsdp_tp" (FSDP2 on "dp" x TP on "tp"), "hsdp_tp" (HSDP on ("rep", "shard")
    x TP), "tp" (tensor parallelism alone on a 1-D mesh of every rank); "fsdp_tp_odd": "fsdp_tp"
    with uneven shards."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    odd = layout.endswith("_odd")
    layout = layout.removesuffix("_odd")
    model = make_model(odd)
    tp = mesh["tp"] if mesh.mesh_dim_names != ("tp",) else mesh
    parallelize_module(model, tp, {k: ColwiseParallel() if v == "col" else RowwiseParallel() for k, v in PLAN.items()})
    if layout == "tp":
        return model
    dp = mesh["dp"] if layout == "fsdp_tp" else mesh["rep", "shard"]
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=dp)
    fully_shard(model, mesh=dp)
    return model


def _mesh(layout):
    from torch.distributed.device_mesh import init_device_mesh

    layout = layout.removesuffix("_odd")
    if layout == "fsdp_tp":
        return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    if layout == "hsdp_tp":
        return init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("rep", "shard", "tp"))
    return init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))


def _data_slice(mesh, layout, n):
    """This rank's part of the global batch: split over the data-parallel ranks, the same on every tp rank."""
    layout = layout.removesuffix("_odd")
    if layout == "tp":
        return 0, n
    d = mesh["dp"].get_local_rank() if layout == "fsdp_tp" else mesh["rep"].get_local_rank()
    return d * n // 2, (d + 1) * n // 2


def check_parity(name, make_opt, layout, results, reference):
    mesh = _mesh(layout)
    odd = layout.endswith("_odd")
    x, y = batch(odd)
    lo, hi = _data_slice(mesh, layout, x.shape[0])
    if (name, odd) not in reference:
        single = make_model(odd)
        init = [p.detach().clone() for p in single.parameters()]
        train(single, make_opt(single), x, y, STEPS)
        reference[name, odd] = (init, [p.detach().clone() for p in single.parameters()])
    init, ref = reference[name, odd]
    model = parallel_model(mesh, layout)
    comm = _Comm()
    opt = make_opt(model)
    svd, svds = torch.linalg.svd, [0]

    def svd_counted(*a, **k):
        svds[0] += 1
        return svd(*a, **k)

    torch.linalg.svd = svd_counted  # this rank's SVDs (the refreshes are shared across the ranks)
    try:
        train(model, opt, x[lo:hi], y[lo:hi], STEPS, on_step=comm)
    finally:
        torch.linalg.svd = svd
    err = rel_change_err(full_params(model), ref, init)
    key = f"{layout}[{name}]"
    results[f"parity_{key}"] = [err < TOL, f"rel err {err:.2e} (tol {TOL:.0e})"]
    results[f"comm_{key}"] = [True, comm.per_step]
    results[f"svds_{key}"] = [True, svds[0]]
    layouts = {}
    for i, m in enumerate(mm for mm in model if isinstance(mm, torch.nn.Linear)):
        st = opt.state.get(m.weight, {})
        layouts[i] = {"weight": str(tuple(m.weight.placements)),
                      **{k: (str(tuple(v.placements)) if hasattr(v, "placements") else "plain")
                         for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() == 2}}
    results[f"state_{key}"] = [True, layouts]


def check_checkpoint(name, make_opt, results, ckpt_dir):
    """2 steps, DCP save, 2 steps (across the refresh at step 3) == load into a fresh model + 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    mesh = _mesh("fsdp_tp")
    x, y = batch()
    lo, hi = _data_slice(mesh, "fsdp_tp", x.shape[0])
    x, y = x[lo:hi], y[lo:hi]
    path = os.path.join(ckpt_dir, name)
    model = parallel_model(mesh, "fsdp_tp")
    opt = make_opt(model)
    train(model, opt, x, y, 2)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    train(model, opt, x, y, 2)
    want = full_params(model)
    model2 = parallel_model(mesh, "fsdp_tp")
    for p in model2.parameters():
        p.data.add_(1.0)
    opt2 = make_opt(model2)
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    train(model2, opt2, x, y, 2)
    diff = max(float((a - b).abs().max()) for a, b in zip(full_params(model2), want))
    results[f"dcp_resume[{name}]"] = [diff <= 1e-6, f"max abs diff {diff:.2e}"]
    md = dcp.FileSystemReader(path).read_metadata()
    chunks = {k: len(v.chunks) for k, v in md.state_dict_metadata.items()
              if k.startswith("optim.state.") and hasattr(v, "chunks")}
    results[f"dcp_chunks[{name}]"] = [True, chunks]


def check_errors(results):
    """Placements no path serves, and flattened parameters, are refused with a clear error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    from lowrank_kernels.optim import GaLoreAdamW, lowrank_param_groups

    mesh = init_device_mesh("cpu", (WORLD,))
    p = torch.nn.Parameter(DTensor.from_local(torch.randn(8, 6), mesh, [Partial()], run_check=False))
    try:
        GaLoreAdamW([dict(params=[p], rank=2)])
        results["error_partial"] = [False, "no error"]
    except ValueError as e:
        msg = str(e)
        ok = "param group 0: parameter 0" in msg and "Partial" in msg and "rank=None" in msg
        results["error_partial"] = [ok, msg]

    # FSDP1 with use_orig_params=False: one FlatParameter per wrapped module
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    fsdp1 = FSDP1(make_model(), use_orig_params=False, device_id=torch.device("cpu"))
    flat = [(n, q) for n, q in fsdp1.named_parameters()]
    msgs = []
    try:
        GaLoreAdamW([dict(params=[q for _, q in flat], rank=2)])
        msgs.append("optimizer: no error")
    except ValueError as e:
        msgs.append(str(e))
    try:
        lowrank_param_groups(fsdp1, rank=2)
        msgs.append("lowrank_param_groups: no error")
    except ValueError as e:
        msgs.append(str(e))
    ok = all("FlatParameter" in m and "use_orig_params=True" in m and "fully_shard" in m for m in msgs)
    results["error_fsdp1_flat"] = [ok, msgs]

    # 8-bit moments on the left side of a weight sharded on dim 1: refused when the group is added
    model = parallel_model(_mesh("fsdp_tp"), "fsdp_tp")
    try:
        GaLoreAdamW(groups(model, rank=RANK, proj_type="left"), moment_bits=8, block_size=2, min_8bit_size=0)
        results["error_left_8bit_columns"] = [False, "no error"]
    except ValueError as e:
        msg = str(e)
        results["error_left_8bit_columns"] = [
            "param group 0: parameter 1 has placements (Shard(dim=0), Shard(dim=1))" in msg
            and "proj_type='right'" in msg, msg]


def worker(rank, ws, port, outdir, names):
    with rank_session(rank, ws, port, outdir) as results:
        cfgs = configs()
        reference = {}
        for layout, variants in names["parity"].items():
            for name in variants:
                try:
                    check_parity(name, cfgs[name], layout, results, reference)
                except Exception:
                    results[f"parity_{layout}[{name}]"] = [False, traceback.format_exc()]
        for name in names.get("checkpoint", []):
            try:
                check_checkpoint(name, cfgs[name], results, os.path.join(outdir, "ckpt"))
            except Exception:
                results[f"dcp_resume[{name}]"] = [False, traceback.format_exc()]
        if names.get("errors"):
            try:
                check_errors(results)
            except Exception:
                results["error_partial"] = results["error_fsdp1_flat"] = results["error_left_8bit_columns"] = [
                    False, traceback.format_exc()]
