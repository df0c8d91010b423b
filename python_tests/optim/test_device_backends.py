"""Every optimizer on the test device (CPU; CUDA under LOWRANK_KERNELS_TEST_DEVICE=cuda): each
backend that runs there against the reference backend on the same device, over several steps
with a projector refresh, so one pytest on a GPU machine covers the optimizers' GPU path.

Same device on both sides, so SVDs and random projections (APOLLO regenerates its projection
from a seed on the parameter's device) are identical and only the kernels differ. float32
parameters: the weights' change and the (float32) moments elementwise at ~1e-5 (a few steps:
4e-5); bfloat16 parameters (float32 moments by default): the moments at the same tolerance,
the bf16 weight within one bf16 rounding of the reference (the rounding of a float32 value
that both compute to ~1e-6).
"""
import warnings

import pytest
import torch

from lowrank_kernels.nn import QLinear
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim import APOLLOAdamW, DCTAdamW, FrugalAdamW, GaLoreAdamW, QGaLoreAdamW

from .._numerics import assert_change_close, assert_close_f32
from ..conftest import require_backend

OPS_USED = ("projection_project_update_backproject", "projection_project_adam", "projection_backproject_apply",
            "dct_score_topk", "adam_update", "quant_int8_update_sr")


@pytest.fixture(params=[b for b in reg.BACKENDS if b != "reference"])
def dev_backend(request, device):
    name = request.param
    for op in OPS_USED:
        require_backend(op, name, device)
    return name


MAKERS = {
    "galore": lambda ps: GaLoreAdamW([{"params": ps, "rank": 5, "update_proj_gap": 2}], lr=1e-2, weight_decay=0.1),
    "galore_left": lambda ps: GaLoreAdamW([{"params": ps, "rank": 5, "update_proj_gap": 2, "proj_type": "left"}],
                                          lr=1e-2),
    "dct": lambda ps: DCTAdamW([{"params": ps, "rank": 6, "update_proj_gap": 2}], lr=1e-2, weight_decay=0.1),
    "dct_reindex": lambda ps: DCTAdamW([{"params": ps, "rank": 6, "update_proj_gap": 1}], lr=1e-2,
                                       moment_refresh="reindex", norm=2),
    "qgalore_int4": lambda ps: QGaLoreAdamW([{"params": ps, "rank": 5, "update_proj_gap": 2}], lr=1e-2,
                                            quant_group_size=32),
    "apollo": lambda ps: APOLLOAdamW([{"params": ps, "rank": 5, "update_proj_gap": 2}], lr=1e-2),
    "frugal": lambda ps: FrugalAdamW([{"params": ps, "density": 0.25, "update_proj_gap": 2}], lr=1e-2),
}
SHAPES = [(45, 29), (23, 51)]  # right and left side, odd tile edges


def _run(make, backend, device, dtype, steps):
    gen = torch.Generator().manual_seed(7)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(device, dtype) for s in SHAPES] for _ in range(steps)]
    w0 = [p.detach().clone() for p in ps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make(ps)
    with use_backend(backend):
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
    return w0, ps, opt


@pytest.mark.parametrize("name", list(MAKERS))
def test_optimizer_backend_vs_reference_float32(name, dev_backend, device):
    steps = 4
    w0, ours, o_opt = _run(MAKERS[name], dev_backend, device, torch.float32, steps)
    _, ref, r_opt = _run(MAKERS[name], "reference", device, torch.float32, steps)
    for i, (a, b, w) in enumerate(zip(ours, ref, w0)):
        assert_change_close(a.detach(), w, b.detach(), f"{name} param {i}", rtol=4e-5)
        sa, sb = o_opt.state[a], r_opt.state[b]
        for key in ("exp_avg", "exp_avg_sq", "indices"):
            if key in sa:
                if key == "indices":
                    assert torch.equal(sa[key], sb[key]), f"{name} param {i}: DCT indices differ"
                else:
                    assert sa[key].dtype == torch.float32
                    assert_close_f32(sa[key], sb[key], f"{name} param {i} {key}", rtol=4e-5)


@pytest.mark.parametrize("name", ["galore", "dct", "qgalore_int4", "apollo"])
def test_optimizer_backend_vs_reference_bf16(name, dev_backend, device):
    """bf16 parameters, float32 moments (the default): moments at ~1e-5, the weight within one
    bf16 rounding of the reference's (both round a float32 value that agrees to ~1e-6)."""
    steps = 2
    w0, ours, o_opt = _run(MAKERS[name], dev_backend, device, torch.bfloat16, steps)
    _, ref, r_opt = _run(MAKERS[name], "reference", device, torch.bfloat16, steps)
    ulp = torch.finfo(torch.bfloat16).eps
    for i, (a, b) in enumerate(zip(ours, ref)):
        sa, sb = o_opt.state[a], r_opt.state[b]
        assert sa["exp_avg"].dtype == torch.float32
        assert_close_f32(sa["exp_avg"], sb["exp_avg"], f"{name} param {i} exp_avg", rtol=4e-5)
        assert_close_f32(sa["exp_avg_sq"], sb["exp_avg_sq"], f"{name} param {i} exp_avg_sq", rtol=4e-5)
        diff = (a.detach().double() - b.detach().double()).abs()
        bound = ulp * b.detach().double().abs() + 1e-6
        assert bool((diff <= bound).all()), f"{name} param {i}: {float((diff / bound).max()):.3g} bf16 roundings apart"


def test_qgalore_int8_qlinear_backend_vs_reference(dev_backend, device):
    """Q-GaLore on an INT8 QLinear weight: same seeds, so the stochastic rounding draws the same
    numbers; the dequantized weights agree to within one quantization level (a float32 value
    within ~1e-6 of a level boundary may round the other way)."""
    outs = []
    for backend in (dev_backend, "reference"):
        torch.manual_seed(3)
        lin = QLinear(64, 40, bias=False, group_size=32, device=device)
        opt = QGaLoreAdamW([{"params": [lin.weight], "rank": 4, "update_proj_gap": 2}], lr=1e-2, seed=5)
        gen = torch.Generator().manual_seed(11)
        with use_backend(backend):
            for _ in range(3):
                lin.weight.grad = torch.randn(40, 64, generator=gen).to(device)
                opt.step()
        outs.append((lin.dequantized_weight(torch.float64), lin.weight_scale.double()))
    (wa, sa), (wb, sb) = outs
    level = sb.repeat_interleave(32)[: wb.numel()].view_as(wb)
    assert bool(((wa - wb).abs() <= level * 1.001 + 1e-6).all())
    assert float((wa != wb).double().mean()) < 0.01
