"""Bucketed steps: GaLoreAdamW and DCTAdamW take the plain fused step of many parameters
through one ``foreach_project_update_backproject_`` call per bucket. The result must be
bit-identical to the per-parameter path (``foreach=False``) across refreshes, on the
reference and C++ backends, and the op-call count must actually drop."""
import warnings

import pytest
import torch

from lowrank_kernels.ops import use_backend
from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW, QGaLoreAdamW

from ..conftest import require_backend
from .._opcount import CountOps

# Odd shapes; with proj_type="std" the tall ones project right and the wide ones left.
SHAPES = [(23, 11), (11, 23), (17, 17), (9, 30), (30, 9), (23, 11)]
STEPS = 8  # refreshes at steps 1, 4, 7 (update_proj_gap=3)
FOREACH_OP = "lowrank_kernels.projection_foreach_project_update_backproject"
SINGLE_OP = "lowrank_kernels.projection_project_update_backproject"


@pytest.fixture(params=["reference", "cpp"])
def backend(request):
    require_backend("projection_foreach_project_update_backproject", request.param)
    require_backend("projection_project_update_backproject", request.param)
    return request.param


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    bias = torch.nn.Parameter(torch.randn(7, generator=gen).to(dtype))
    return ws, bias


def _grads(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES + [(7,)]] for _ in range(STEPS)]


def _make(cls, ws, bias, proj_type, foreach):
    lowrank = dict(rank=3, update_proj_gap=3, scale=0.5, proj_type=proj_type, foreach=foreach)
    groups = [
        {"params": ws[:3], "weight_decay": 0.1, **lowrank},
        {"params": ws[3:], "lr": 3e-3, **lowrank},
        {"params": [bias], "foreach": foreach},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(groups, lr=1e-2, weight_decay=0.0)


def _run(cls, dtype, proj_type, foreach, backend, grads, nonfinite_at=None):
    ws, bias = _params(dtype)
    opt = _make(cls, ws, bias, proj_type, foreach)
    params = ws + [bias]
    with use_backend(backend):
        for t, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            if nonfinite_at is not None and t == nonfinite_at:
                params[1].grad[2, 3] = float("nan")
            opt.step()
    return params, opt


def _assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for x, y in zip(pa, pb):
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, k
            assert torch.equal(sa[k], sb[k]), k
    assert oa.nonfinite_skips == ob.nonfinite_skips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proj_type", ["std", "left", "right"])
@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
def test_bucketed_equals_per_parameter(backend, cls, proj_type, dtype):
    grads = _grads(dtype)
    bucketed = _run(cls, dtype, proj_type, None, backend, grads)
    single = _run(cls, dtype, proj_type, False, backend, grads)
    _assert_same(bucketed, single)
    # The weights did move, and differently per step: the comparison is not vacuous.
    w0, _ = _params(dtype)
    assert not torch.equal(bucketed[0][0], w0[0])


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
def test_bucketed_skips_nonfinite_like_per_parameter(backend, cls):
    grads = _grads(torch.float32)
    bucketed = _run(cls, torch.float32, "std", None, backend, grads, nonfinite_at=4)
    single = _run(cls, torch.float32, "std", False, backend, grads, nonfinite_at=4)
    _assert_same(bucketed, single)
    assert bucketed[1].nonfinite_skips == 1
    assert int(bucketed[1].state[bucketed[0][1]]["step"]) == STEPS - 1


def test_class_switch_forces_per_parameter(backend):
    grads = _grads(torch.float32)

    class PerParam(GaLoreAdamW):
        bucketed = False

    a = _run(GaLoreAdamW, torch.float32, "std", None, backend, grads)
    b = _run(PerParam, torch.float32, "std", None, backend, grads)
    _assert_same(a, b)


def _count_step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    with CountOps() as mode:
        opt.step()
    return mode.counts


@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
def test_one_op_call_per_bucket(cls):
    """std over tall and wide weights: two buckets (right, left) on a non-refresh step,
    one fused single-parameter call per weight on a refresh step and with foreach=False."""
    grads = _grads(torch.float32)
    for foreach, want_foreach, want_single in ((None, 2, 0), (False, 0, len(SHAPES))):
        ws, bias = _params(torch.float32)
        opt = _make(cls, ws, bias, "std", foreach)
        params = ws + [bias]
        first = _count_step(opt, params, grads[0])  # a refresh step: per parameter
        assert first.get(FOREACH_OP, 0) == 0
        assert first.get(SINGLE_OP, 0) == len(SHAPES)
        counts = _count_step(opt, params, grads[1])
        assert counts.get(FOREACH_OP, 0) == want_foreach, counts
        assert counts.get(SINGLE_OP, 0) == want_single, counts


@pytest.mark.parametrize("base", [GaLoreAdamW, QGaLoreAdamW])
def test_subclass_with_its_own_step_is_not_bucketed(base):
    """A subclass that changes the per-parameter step (its own _project_step) is stepped per
    parameter: the bucketed step would bypass its change. (Q-GaLore's own step buckets with its
    own key, python_tests/optim/test_bucketed_methods.py.)"""
    class Changed(base):
        def _project_step(self, p, grad, state, group, step):
            super()._project_step(p, grad, state, group, step)

    ws, bias = _params(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = Changed([{"params": ws, "rank": 3, "update_proj_gap": 3}], lr=1e-2)
    grads = _grads(torch.float32)
    _count_step(opt, ws, grads[0][:len(ws)])
    counts = _count_step(opt, ws, grads[1][:len(ws)])
    assert counts.get(FOREACH_OP, 0) == 0 and counts.get(SINGLE_OP, 0) == len(ws), counts


@pytest.mark.parametrize("name", ["ours-GaLoreAdamW", "ours-DCTAdamW"])
def test_host_cost_stack_op_counts(name):
    """The 28-weight stack of bench/host_cost.py: a non-refresh step is 2 lowrank_kernels op
    calls (right and left buckets) instead of 28, with fewer aten ops than per parameter."""
    from bench import host_cost

    opts, _ = host_cost.make_optimizers(names=[name, f"{name} per-param"])
    counted = {}
    for key in (name, f"{name} per-param"):
        opt, _ = opts[key]
        opt.step()  # the refresh step
        with CountOps() as mode:
            opt.step()
        counted[key] = mode
    assert counted[name].custom == 2
    assert counted[f"{name} per-param"].custom == len(host_cost.stack_shapes()) == 28
    assert counted[name].aten < counted[f"{name} per-param"].aten
